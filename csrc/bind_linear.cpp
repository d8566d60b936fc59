// linear_forward / linear_backward of linmaps._core, for float32 and float64.
#include "linmaps.hpp"

namespace linmaps {
namespace {

using binding::new_array;
using binding::require_ndim;
using binding::require_shape;

template <class T>
Array<T> linear_forward_py(const Array<T>& x, const Array<T>& weight,
                           const std::optional<Array<T>>& bias) {
  require_ndim(x, "x", 2);
  require_ndim(weight, "weight", 2);
  const LinearShape shape{x.shape(0), x.shape(1), weight.shape(0)};
  require_shape(weight, "weight", {shape.out, shape.in});
  if (bias) require_shape(*bias, "bias", {shape.out});

  Array<T> y = new_array<T>({shape.batch, shape.out});
  const T* bias_data = bias ? bias->data() : nullptr;
  const T *x_data = x.data(), *weight_data = weight.data();
  T* y_data = y.mutable_data();
  const double flops = binding::product_flops({shape.batch, shape.in, shape.out});
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    py::gil_scoped_release release;
    linear_forward<T>(x_data, weight_data, bias_data, y_data, shape, num_threads);
  }
  call.raise_if_stopped();
  return y;
}

template <class T>
py::tuple linear_backward_py(const Array<T>& grad, const Array<T>& x, const Array<T>& weight,
                             bool need_x, bool need_weight, bool need_bias) {
  require_ndim(x, "x", 2);
  require_ndim(weight, "weight", 2);
  const LinearShape shape{x.shape(0), x.shape(1), weight.shape(0)};
  require_shape(weight, "weight", {shape.out, shape.in});
  require_shape(grad, "grad", {shape.batch, shape.out});

  // Unrequested gradients get a 0-size placeholder and a null pointer: no work, no memory.
  Array<T> grad_x = new_array<T>({need_x ? shape.batch : 0, need_x ? shape.in : 0});
  Array<T> grad_weight = new_array<T>({need_weight ? shape.out : 0, need_weight ? shape.in : 0});
  Array<T> grad_bias = new_array<T>({need_bias ? shape.out : 0});
  const T *grad_data = grad.data(), *x_data = x.data(), *weight_data = weight.data();
  T* grad_x_data = binding::data_or_null(need_x, grad_x);
  T* grad_weight_data = binding::data_or_null(need_weight, grad_weight);
  T* grad_bias_data = binding::data_or_null(need_bias, grad_bias);
  const double flops = binding::product_flops({shape.batch, shape.in, shape.out});
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    py::gil_scoped_release release;
    linear_backward<T>(grad_data, x_data, weight_data, grad_x_data, grad_weight_data,
                       grad_bias_data, shape, num_threads);
  }
  call.raise_if_stopped();
  return py::make_tuple(binding::array_or_none(need_x, grad_x),
                        binding::array_or_none(need_weight, grad_weight),
                        binding::array_or_none(need_bias, grad_bias));
}

// The front end's fast path (see bilinear_forward_fast): the result if the arguments are
// exactly what the validated path would pass on, else None; never raises for bad arguments.
template <class T>
py::object linear_forward_fast_t(py::handle x, py::handle weight, py::handle bias) {
  using binding::exact_array;
  if (!exact_array<T>(x, 2) || !exact_array<T>(weight, 2)) return py::none();
  const auto a = py::reinterpret_borrow<Array<T>>(x);
  const auto w = py::reinterpret_borrow<Array<T>>(weight);
  if (w.shape(1) != a.shape(1)) return py::none();
  std::optional<Array<T>> b;
  if (!bias.is_none()) {
    if (!exact_array<T>(bias, 1)) return py::none();
    b = py::reinterpret_borrow<Array<T>>(bias);
    if (b->shape(0) != w.shape(0)) return py::none();
  }
  return linear_forward_py<T>(a, w, b);
}

py::object linear_forward_fast(py::handle x, py::handle weight, py::handle bias) {
  if (binding::exact_array<float>(x, 2)) return linear_forward_fast_t<float>(x, weight, bias);
  if (binding::exact_array<double>(x, 2)) return linear_forward_fast_t<double>(x, weight, bias);
  return py::none();
}

template <class T>
void define(py::module_& m) {
  m.def("linear_forward", &linear_forward_py<T>, py::arg("x").noconvert(),
        py::arg("weight").noconvert(), py::arg("bias").noconvert().none(true),
        "y = x @ weight.T + bias for C-contiguous float32/float64 arrays of one dtype.");
  m.def("linear_backward", &linear_backward_py<T>, py::arg("grad").noconvert(),
        py::arg("x").noconvert(), py::arg("weight").noconvert(), py::arg("need_x"),
        py::arg("need_weight"), py::arg("need_bias"),
        "(grad_x, grad_weight, grad_bias); None for gradients not requested.");
}

}  // namespace

void bind_linear(py::module_& m) {
  define<float>(m);
  define<double>(m);
  m.def("linear_forward_fast", &linear_forward_fast, py::arg("x"), py::arg("weight"),
        py::arg("bias").none(true),
        "linear_forward if the arguments are exact C-contiguous float32/float64 ndarrays of "
        "one dtype and matching shapes, else None (never raises for bad arguments).");
}

}  // namespace linmaps
