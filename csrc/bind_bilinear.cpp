// bilinear_forward / bilinear_backward of linmaps._core, for float32 and float64.
#include "linmaps.hpp"

namespace linmaps {
namespace {

using binding::new_array;
using binding::require_ndim;
using binding::require_shape;

template <class T>
BilinearShape bilinear_shape(const Array<T>& x1, const Array<T>& x2, const Array<T>& weight) {
  require_ndim(x1, "x1", 2);
  require_ndim(weight, "weight", 3);
  const BilinearShape shape{x1.shape(0), x1.shape(1), weight.ndim() == 3 ? weight.shape(2) : 0,
                            weight.shape(0)};
  require_shape(x2, "x2", {shape.batch, shape.in2});
  require_shape(weight, "weight", {shape.out, shape.in1, shape.in2});
  return shape;
}

template <class T>
Array<T> bilinear_forward_py(const Array<T>& x1, const Array<T>& x2, const Array<T>& weight,
                             const std::optional<Array<T>>& bias) {
  const BilinearShape shape = bilinear_shape(x1, x2, weight);
  if (bias) require_shape(*bias, "bias", {shape.out});

  Array<T> z = new_array<T>({shape.batch, shape.out});
  const T* bias_data = bias ? bias->data() : nullptr;
  const T *x1_data = x1.data(), *x2_data = x2.data(), *weight_data = weight.data();
  T* z_data = z.mutable_data();
  const double flops = binding::product_flops({shape.batch, shape.in1, shape.in2, shape.out});
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    py::gil_scoped_release release;
    bilinear_forward<T>(x1_data, x2_data, weight_data, bias_data, z_data, shape, num_threads);
  }
  call.raise_if_stopped();
  return z;
}

template <class T>
py::tuple bilinear_backward_py(const Array<T>& grad, const Array<T>& x1, const Array<T>& x2,
                               const Array<T>& weight, bool need_x1, bool need_x2, bool need_weight,
                               bool need_bias) {
  const BilinearShape shape = bilinear_shape(x1, x2, weight);
  require_shape(grad, "grad", {shape.batch, shape.out});

  // Unrequested gradients get a 0-size placeholder and a null pointer: no work, no memory.
  Array<T> grad_x1 = new_array<T>({need_x1 ? shape.batch : 0, need_x1 ? shape.in1 : 0});
  Array<T> grad_x2 = new_array<T>({need_x2 ? shape.batch : 0, need_x2 ? shape.in2 : 0});
  Array<T> grad_weight = new_array<T>(
      {need_weight ? shape.out : 0, need_weight ? shape.in1 : 0, need_weight ? shape.in2 : 0});
  Array<T> grad_bias = new_array<T>({need_bias ? shape.out : 0});
  const T *grad_data = grad.data(), *x1_data = x1.data(), *x2_data = x2.data();
  const T* weight_data = weight.data();
  T* grad_x1_data = binding::data_or_null(need_x1, grad_x1);
  T* grad_x2_data = binding::data_or_null(need_x2, grad_x2);
  T* grad_weight_data = binding::data_or_null(need_weight, grad_weight);
  T* grad_bias_data = binding::data_or_null(need_bias, grad_bias);
  const double flops = binding::product_flops({shape.batch, shape.in1, shape.in2, shape.out});
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    py::gil_scoped_release release;
    bilinear_backward<T>(grad_data, x1_data, x2_data, weight_data, grad_x1_data, grad_x2_data,
                         grad_weight_data, grad_bias_data, shape, num_threads);
  }
  call.raise_if_stopped();
  return py::make_tuple(binding::array_or_none(need_x1, grad_x1),
                        binding::array_or_none(need_x2, grad_x2),
                        binding::array_or_none(need_weight, grad_weight),
                        binding::array_or_none(need_bias, grad_bias));
}

// The front end's fast path: the result if every argument is already exactly what the
// validated path would pass on (so the same kernel runs on the same arrays), else None; never
// raises for bad arguments, so that the Python front reports errors as it always does.
template <class T>
py::object bilinear_forward_fast_t(py::handle x1, py::handle x2, py::handle weight,
                                   py::handle bias) {
  using binding::exact_array;
  if (!exact_array<T>(x1, 2) || !exact_array<T>(x2, 2) || !exact_array<T>(weight, 3)) {
    return py::none();
  }
  const auto a1 = py::reinterpret_borrow<Array<T>>(x1);
  const auto a2 = py::reinterpret_borrow<Array<T>>(x2);
  const auto w = py::reinterpret_borrow<Array<T>>(weight);
  if (a1.shape(0) != a2.shape(0) || w.shape(1) != a1.shape(1) || w.shape(2) != a2.shape(1)) {
    return py::none();
  }
  std::optional<Array<T>> b;
  if (!bias.is_none()) {
    if (!exact_array<T>(bias, 1)) return py::none();
    b = py::reinterpret_borrow<Array<T>>(bias);
    if (b->shape(0) != w.shape(0)) return py::none();
  }
  return bilinear_forward_py<T>(a1, a2, w, b);
}

py::object bilinear_forward_fast(py::handle x1, py::handle x2, py::handle weight, py::handle bias) {
  if (binding::exact_array<float>(x1, 2))
    return bilinear_forward_fast_t<float>(x1, x2, weight, bias);
  if (binding::exact_array<double>(x1, 2)) {
    return bilinear_forward_fast_t<double>(x1, x2, weight, bias);
  }
  return py::none();
}

template <class T>
void define(py::module_& m) {
  m.def("bilinear_forward", &bilinear_forward_py<T>, py::arg("x1").noconvert(),
        py::arg("x2").noconvert(), py::arg("weight").noconvert(),
        py::arg("bias").noconvert().none(true),
        "z[k,l] = x1[k] @ weight[l] @ x2[k] + bias[l] for C-contiguous float32/float64 "
        "arrays of one dtype.");
  m.def("bilinear_backward", &bilinear_backward_py<T>, py::arg("grad").noconvert(),
        py::arg("x1").noconvert(), py::arg("x2").noconvert(), py::arg("weight").noconvert(),
        py::arg("need_x1"), py::arg("need_x2"), py::arg("need_weight"), py::arg("need_bias"),
        "(grad_x1, grad_x2, grad_weight, grad_bias); None for gradients not requested.");
}

}  // namespace

void bind_bilinear(py::module_& m) {
  define<float>(m);
  define<double>(m);
  m.def("bilinear_forward_fast", &bilinear_forward_fast, py::arg("x1"), py::arg("x2"),
        py::arg("weight"), py::arg("bias").none(true),
        "bilinear_forward if the arguments are exact C-contiguous float32/float64 ndarrays of "
        "one dtype and matching shapes, else None (never raises for bad arguments).");
}

}  // namespace linmaps
