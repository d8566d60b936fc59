// bilinear_pairs_forward / bilinear_pairs_backward of linmaps._core, for float32 and float64.
#include "linmaps.hpp"

namespace linmaps {
namespace {

using binding::new_array;
using binding::require_aligned;
using binding::require_ndim;
using binding::require_shape;

template <class T>
PairsShape pairs_shape(const Array<T>& x1, const Array<T>& x2, const Array<T>& weight) {
  require_ndim(x1, "x1", 3);
  require_ndim(x2, "x2", 3);
  require_ndim(weight, "weight", 3);
  const PairsShape shape{x1.shape(0),     x1.shape(1),     x2.shape(1),
                         weight.shape(1), weight.shape(2), weight.shape(0)};
  require_shape(x1, "x1", {shape.batch, shape.rows1, shape.in1});
  require_shape(x2, "x2", {shape.batch, shape.rows2, shape.in2});
  require_aligned(x1, "x1");
  require_aligned(x2, "x2");
  require_aligned(weight, "weight");
  return shape;
}

// Multiply-adds of the forward's two products (V = X2 Wf^T, S = X1 V^T), times 2.
double pairs_flops(const PairsShape& shape) {
  return binding::product_flops({shape.batch, shape.rows2, shape.out, shape.in1}) *
         (double(shape.in2) + double(shape.rows1));
}

template <class T>
Array<T> bilinear_pairs_forward_py(const Array<T>& x1, const Array<T>& x2, const Array<T>& weight,
                                   const std::optional<Array<T>>& bias) {
  const PairsShape shape = pairs_shape(x1, x2, weight);
  if (bias) require_shape(*bias, "bias", {shape.out});
  if (bias) require_aligned(*bias, "bias");
  Array<T> s = new_array<T>({shape.batch, shape.rows1, shape.rows2, shape.out});
  const T* bias_data = bias ? bias->data() : nullptr;
  const T *x1_data = x1.data(), *x2_data = x2.data(), *weight_data = weight.data();
  T* s_data = s.mutable_data();
  const double flops = pairs_flops(shape);
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    binding::ReleaseGil release(flops);
    bilinear_pairs_forward<T>(x1_data, x2_data, weight_data, bias_data, s_data, shape, num_threads);
  }
  call.raise_if_stopped();
  return s;
}

template <class T>
py::tuple bilinear_pairs_backward_py(const Array<T>& grad, const Array<T>& x1, const Array<T>& x2,
                                     const Array<T>& weight, bool need_x1, bool need_x2,
                                     bool need_weight, bool need_bias) {
  const PairsShape shape = pairs_shape(x1, x2, weight);
  require_shape(grad, "grad", {shape.batch, shape.rows1, shape.rows2, shape.out});
  require_aligned(grad, "grad");
  binding::Gradient<T> grad_x1(need_x1, {shape.batch, shape.rows1, shape.in1});
  binding::Gradient<T> grad_x2(need_x2, {shape.batch, shape.rows2, shape.in2});
  binding::Gradient<T> grad_weight(need_weight, {shape.out, shape.in1, shape.in2});
  binding::Gradient<T> grad_bias(need_bias, {shape.out});
  const T *grad_data = grad.data(), *x1_data = x1.data(), *x2_data = x2.data();
  const T* weight_data = weight.data();
  T *grad_x1_data = grad_x1.data(), *grad_x2_data = grad_x2.data();
  T *grad_weight_data = grad_weight.data(), *grad_bias_data = grad_bias.data();
  const double flops = 2.0 * pairs_flops(shape);
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    binding::ReleaseGil release(flops);
    bilinear_pairs_backward<T>(grad_data, x1_data, x2_data, weight_data, grad_x1_data, grad_x2_data,
                               grad_weight_data, grad_bias_data, shape, num_threads);
  }
  call.raise_if_stopped();
  return py::make_tuple(grad_x1.result(), grad_x2.result(), grad_weight.result(),
                        grad_bias.result());
}

template <class T>
void define(py::module_& m) {
  m.def("bilinear_pairs_forward", &bilinear_pairs_forward_py<T>, py::arg("x1").noconvert(),
        py::arg("x2").noconvert(), py::arg("weight").noconvert(),
        py::arg("bias").noconvert().none(true),
        "s[b,i,j,o] = x1[b,i] @ weight[o] @ x2[b,j] + bias[o] for C-contiguous float32/float64 "
        "arrays of one dtype: x1 (B,I,in1), x2 (B,J,in2), weight (out,in1,in2).");
  m.def("bilinear_pairs_backward", &bilinear_pairs_backward_py<T>, py::arg("grad").noconvert(),
        py::arg("x1").noconvert(), py::arg("x2").noconvert(), py::arg("weight").noconvert(),
        py::arg("need_x1"), py::arg("need_x2"), py::arg("need_weight"), py::arg("need_bias"),
        "(grad_x1, grad_x2, grad_weight, grad_bias) for grad (B,I,J,out); None for gradients "
        "not requested.");
}

}  // namespace

void bind_pairs(py::module_& m) {
  define<float>(m);
  define<double>(m);
}

}  // namespace linmaps
