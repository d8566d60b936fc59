// linear_forward / linear_backward of linmaps._core, for float32 and float64.
#include "linmaps.hpp"

namespace linmaps {
namespace {

using binding::new_array;
using binding::require_aligned;
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
  require_aligned(x, "x");
  require_aligned(weight, "weight");
  if (bias) require_aligned(*bias, "bias");

  Array<T> y = new_array<T>({shape.batch, shape.out});
  const T* bias_data = bias ? bias->data() : nullptr;
  const T *x_data = x.data(), *weight_data = weight.data();
  T* y_data = y.mutable_data();
  const double flops = binding::product_flops({shape.batch, shape.in, shape.out});
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    binding::ReleaseGil release(flops);
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
  require_aligned(grad, "grad");
  require_aligned(x, "x");
  require_aligned(weight, "weight");

  binding::Gradient<T> grad_x(need_x, {shape.batch, shape.in});
  binding::Gradient<T> grad_weight(need_weight, {shape.out, shape.in});
  binding::Gradient<T> grad_bias(need_bias, {shape.out});
  const T *grad_data = grad.data(), *x_data = x.data(), *weight_data = weight.data();
  T *grad_x_data = grad_x.data(), *grad_weight_data = grad_weight.data();
  T* grad_bias_data = grad_bias.data();
  const double flops = binding::product_flops({shape.batch, shape.in, shape.out});
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    binding::ReleaseGil release(flops);
    linear_backward<T>(grad_data, x_data, weight_data, grad_x_data, grad_weight_data,
                       grad_bias_data, shape, num_threads);
  }
  call.raise_if_stopped();
  return py::make_tuple(grad_x.result(), grad_weight.result(), grad_bias.result());
}

// The fast paths' checks (never raising), as exact_args in bind_bilinear.cpp: the arrays, if x
// and weight (and grad unless it is None) are exact arrays of T with fitting shapes and bias is
// None or fits; else nullopt, and the caller returns None so that the Python front validates.
template <class T>
struct ExactArgs {
  Array<T> x, weight;
  std::optional<Array<T>> bias, grad;
};

template <class T>
std::optional<ExactArgs<T>> exact_args(py::handle x, py::handle weight, py::handle bias,
                                       py::handle grad) {
  using binding::exact_array;
  if (!exact_array<T>(x, 2) || !exact_array<T>(weight, 2)) return std::nullopt;
  ExactArgs<T> args{py::reinterpret_borrow<Array<T>>(x), py::reinterpret_borrow<Array<T>>(weight),
                    std::nullopt, std::nullopt};
  const auto &a = args.x, &w = args.weight;
  if (w.shape(1) != a.shape(1)) return std::nullopt;
  if (!binding::exact_optional<T>(bias, {w.shape(0)}, args.bias) ||
      !binding::exact_optional<T>(grad, {a.shape(0), w.shape(0)}, args.grad)) {
    return std::nullopt;
  }
  return args;
}

// The front end's fast path (see bilinear_forward_fast): the result if the arguments are
// exactly what the validated path would pass on, else None; never raises for bad arguments.
template <class T>
py::object linear_forward_fast_t(py::handle x, py::handle weight, py::handle bias) {
  const auto args = exact_args<T>(x, weight, bias, py::none());
  if (!args) return py::none();
  return linear_forward_py<T>(args->x, args->weight, args->bias);
}

py::object linear_forward_fast(py::handle x, py::handle weight, py::handle bias) {
  if (binding::exact_array<float>(x, 2)) return linear_forward_fast_t<float>(x, weight, bias);
  if (binding::exact_array<double>(x, 2)) return linear_forward_fast_t<double>(x, weight, bias);
  return py::none();
}

// linear_backward's fast path, as bilinear_backward_fast: the gradients if every array is
// exact and fits and every flag is exactly True or False, else None.
template <class T>
py::object linear_backward_fast_t(py::handle grad, py::handle x, py::handle weight,
                                  const bool (&needs)[3]) {
  const auto args = exact_args<T>(x, weight, py::none(), grad);
  if (!args) return py::none();
  return linear_backward_py<T>(*args->grad, args->x, args->weight, needs[0], needs[1], needs[2]);
}

py::object linear_backward_fast(py::handle grad, py::handle x, py::handle weight, py::handle bias,
                                py::handle need_x, py::handle need_weight) {
  bool needs[3];
  if (!binding::exact_bools({need_x, need_weight, bias}, needs)) return py::none();
  if (binding::exact_array<float>(grad, 2)) {
    return linear_backward_fast_t<float>(grad, x, weight, needs);
  }
  if (binding::exact_array<double>(grad, 2)) {
    return linear_backward_fast_t<double>(grad, x, weight, needs);
  }
  return py::none();
}

// The Linear layer's forward fast path (python/linmaps/_layers.py): for exact arguments,
// (y, x kept: a copy if copy_inputs), else None.
template <class T>
py::object linear_layer_forward_t(py::handle x, py::handle weight, py::handle bias,
                                  bool copy_inputs) {
  auto args = exact_args<T>(x, weight, bias, py::none());
  if (!args) return py::none();
  if (copy_inputs) args->x = binding::copy_of(args->x);
  Array<T> y = linear_forward_py<T>(args->x, args->weight, args->bias);
  return py::make_tuple(y, args->x);
}

py::object linear_layer_forward(py::handle x, py::handle weight, py::handle bias,
                                bool copy_inputs) {
  if (binding::exact_array<float>(weight, 2)) {
    return linear_layer_forward_t<float>(x, weight, bias, copy_inputs);
  }
  if (binding::exact_array<double>(weight, 2)) {
    return linear_layer_forward_t<double>(x, weight, bias, copy_inputs);
  }
  return py::none();
}

// The Linear layer's backward fast path: for exact arguments, adds the parameter gradients to
// the accumulators (None: not wanted) and returns the 1-tuple (grad_x or None,); else None.
// acc_bias goes through exact_args' bias check (an exact array of length out).
template <class T>
py::object linear_layer_backward_t(py::handle grad, py::handle x, py::handle weight, bool need_x,
                                   py::handle acc_weight, py::handle acc_bias) {
  const auto args = exact_args<T>(x, weight, acc_bias, grad);
  if (!args || !binding::accumulator_fits<T>(acc_weight, args->weight)) return py::none();
  py::tuple grads = linear_backward_py<T>(*args->grad, args->x, args->weight, need_x,
                                          !acc_weight.is_none(), !acc_bias.is_none());
  binding::accumulate<T>(acc_weight, grads[1]);
  binding::accumulate<T>(acc_bias, grads[2]);
  return py::make_tuple(grads[0]);
}

py::object linear_layer_backward(py::handle grad, py::handle x, py::handle weight,
                                 py::handle need_x, py::handle acc_weight, py::handle acc_bias) {
  bool needs[1];
  if (!binding::exact_bools({need_x}, needs)) return py::none();
  if (binding::exact_array<float>(weight, 2)) {
    return linear_layer_backward_t<float>(grad, x, weight, needs[0], acc_weight, acc_bias);
  }
  if (binding::exact_array<double>(weight, 2)) {
    return linear_layer_backward_t<double>(grad, x, weight, needs[0], acc_weight, acc_bias);
  }
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
  m.def("linear_layer_forward_fast", &linear_layer_forward, py::arg("x"), py::arg("weight"),
        py::arg("bias").none(true), py::arg("copy_inputs"),
        "Linear layer forward for exact arguments: (y, x kept), else None.");
  m.def("linear_layer_backward_fast", &linear_layer_backward, py::arg("grad"), py::arg("x"),
        py::arg("weight"), py::arg("need_x"), py::arg("acc_weight").none(true),
        py::arg("acc_bias").none(true),
        "Linear layer backward for exact arguments: accumulates the parameter gradients and "
        "returns (grad_x,), else None.");
  m.def("linear_backward_fast", &linear_backward_fast, py::arg("grad"), py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("need_x"), py::arg("need_weight"),
        "linear_backward if the arrays are exact C-contiguous float32/float64 ndarrays of one "
        "dtype and matching shapes and the flags are True/False, else None.");
}

}  // namespace linmaps
