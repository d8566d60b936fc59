// bilinear_forward / bilinear_backward of linmaps._core, for float32 and float64.
#include "linmaps.hpp"

namespace linmaps {
namespace {

using binding::new_array;
using binding::require_aligned;
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
  require_aligned(x1, "x1");
  require_aligned(x2, "x2");
  require_aligned(weight, "weight");
  return shape;
}

// Throws ValueError unless `kept` is an aligned 1-D buffer large enough for the T of this shape.
template <class T>
void require_kept(const std::optional<Array<T>>& kept, const BilinearShape& shape) {
  if (!kept) return;
  require_ndim(*kept, "kept", 1);
  require_aligned(*kept, "kept");
  const Index needed = bilinear_kept_elements<T>(shape);
  if (kept->shape(0) < needed) {
    throw std::invalid_argument("kept must have at least " + std::to_string(needed) +
                                " elements for this shape, got " + binding::shape_string(*kept));
  }
}

template <class T>
Array<T> bilinear_forward_py(const Array<T>& x1, const Array<T>& x2, const Array<T>& weight,
                             const std::optional<Array<T>>& bias, std::optional<Array<T>> kept) {
  const BilinearShape shape = bilinear_shape(x1, x2, weight);
  if (bias) require_shape(*bias, "bias", {shape.out});
  if (bias) require_aligned(*bias, "bias");
  require_kept(kept, shape);
  T* kept_data = kept ? kept->mutable_data() : nullptr;

  Array<T> z = new_array<T>({shape.batch, shape.out});
  const T* bias_data = bias ? bias->data() : nullptr;
  const T *x1_data = x1.data(), *x2_data = x2.data(), *weight_data = weight.data();
  T* z_data = z.mutable_data();
  const double flops = binding::product_flops({shape.batch, shape.in1, shape.in2, shape.out});
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    binding::ReleaseGil release(flops);
    bilinear_forward<T>(x1_data, x2_data, weight_data, bias_data, z_data, kept_data, shape,
                        num_threads);
  }
  call.raise_if_stopped();
  return z;
}

// The backward kernel call: the requested gradients as new arrays (None for the others) --
// or, given accumulators acc_weight / acc_bias, the parameter gradients added to those instead
// (all or nothing, even when interrupted: commit_call in kernels.hpp) and None in their place.
template <class T>
py::tuple run_bilinear_backward(const Array<T>& grad, const Array<T>& x1, const Array<T>& x2,
                                const Array<T>& weight, const std::optional<Array<T>>& kept,
                                bool need_x1, bool need_x2, bool need_weight, bool need_bias,
                                T* acc_weight = nullptr, T* acc_bias = nullptr) {
  const BilinearShape shape = bilinear_shape(x1, x2, weight);
  require_shape(grad, "grad", {shape.batch, shape.out});
  require_aligned(grad, "grad");
  require_kept(kept, shape);
  const T* kept_data = kept ? kept->data() : nullptr;
  const bool accumulate = acc_weight != nullptr || acc_bias != nullptr;

  binding::Gradient<T> grad_x1(need_x1, {shape.batch, shape.in1});
  binding::Gradient<T> grad_x2(need_x2, {shape.batch, shape.in2});
  binding::Gradient<T> grad_weight(need_weight && !accumulate, {shape.out, shape.in1, shape.in2});
  binding::Gradient<T> grad_bias(need_bias && !accumulate, {shape.out});
  const T *grad_data = grad.data(), *x1_data = x1.data(), *x2_data = x2.data();
  const T* weight_data = weight.data();
  T *grad_x1_data = grad_x1.data(), *grad_x2_data = grad_x2.data();
  T* grad_weight_data = accumulate ? acc_weight : grad_weight.data();
  T* grad_bias_data = accumulate ? acc_bias : grad_bias.data();
  const double flops = binding::product_flops({shape.batch, shape.in1, shape.in2, shape.out});
  const int num_threads = binding::threads_for(flops);
  binding::CallScope call(flops);
  {
    binding::ReleaseGil release(flops);
    bilinear_backward<T>(grad_data, x1_data, x2_data, weight_data, kept_data, grad_x1_data,
                         grad_x2_data, grad_weight_data, grad_bias_data, accumulate, shape,
                         num_threads);
  }
  call.raise_if_stopped();
  return py::make_tuple(grad_x1.result(), grad_x2.result(), grad_weight.result(),
                        grad_bias.result());
}

template <class T>
py::tuple bilinear_backward_py(const Array<T>& grad, const Array<T>& x1, const Array<T>& x2,
                               const Array<T>& weight, const std::optional<Array<T>>& kept,
                               bool need_x1, bool need_x2, bool need_weight, bool need_bias) {
  return run_bilinear_backward<T>(grad, x1, x2, weight, kept, need_x1, need_x2, need_weight,
                                  need_bias);
}

// The fast paths' checks (never raising): the arrays, if x1, x2 and weight (and grad unless it
// is None) are exact arrays of T (binding::exact_array) with fitting shapes and bias is None or
// fits; else nullopt, and the caller returns None so that the Python front validates.
template <class T>
struct ExactArgs {
  Array<T> x1, x2, weight;
  std::optional<Array<T>> bias, grad;
  BilinearShape shape() const { return {x1.shape(0), x1.shape(1), x2.shape(1), weight.shape(0)}; }
};

template <class T>
std::optional<ExactArgs<T>> exact_args(py::handle x1, py::handle x2, py::handle weight,
                                       py::handle bias, py::handle grad) {
  using binding::exact_array;
  if (!exact_array<T>(x1, 2) || !exact_array<T>(x2, 2) || !exact_array<T>(weight, 3)) {
    return std::nullopt;
  }
  ExactArgs<T> args{py::reinterpret_borrow<Array<T>>(x1), py::reinterpret_borrow<Array<T>>(x2),
                    py::reinterpret_borrow<Array<T>>(weight), std::nullopt, std::nullopt};
  const auto &a1 = args.x1, &a2 = args.x2, &w = args.weight;
  if (a1.shape(0) != a2.shape(0) || w.shape(1) != a1.shape(1) || w.shape(2) != a2.shape(1)) {
    return std::nullopt;
  }
  if (!binding::exact_optional<T>(bias, {w.shape(0)}, args.bias) ||
      !binding::exact_optional<T>(grad, {a1.shape(0), w.shape(0)}, args.grad)) {
    return std::nullopt;
  }
  return args;
}

// A kept-T buffer argument: true with `out` set if `kept` is None or an exact 1-D array of T
// large enough for `shape`, else false.
template <class T>
bool exact_kept(py::handle kept, const BilinearShape& shape, std::optional<Array<T>>& out) {
  if (kept.is_none()) return true;
  if (!binding::exact_array<T>(kept, 1) ||
      py::reinterpret_borrow<py::array>(kept).shape(0) < bilinear_kept_elements<T>(shape)) {
    return false;
  }
  out = py::reinterpret_borrow<Array<T>>(kept);
  return true;
}

// The front end's fast path: the result if every argument is already exactly what the
// validated path would pass on (so the same kernel runs on the same arrays), else None; never
// raises for bad arguments, so that the Python front reports errors as it always does.
template <class T>
py::object bilinear_forward_fast_t(py::handle x1, py::handle x2, py::handle weight,
                                   py::handle bias) {
  const auto args = exact_args<T>(x1, x2, weight, bias, py::none());
  if (!args) return py::none();
  return bilinear_forward_py<T>(args->x1, args->x2, args->weight, args->bias, std::nullopt);
}

py::object bilinear_forward_fast(py::handle x1, py::handle x2, py::handle weight, py::handle bias) {
  if (binding::exact_array<float>(x1, 2))
    return bilinear_forward_fast_t<float>(x1, x2, weight, bias);
  if (binding::exact_array<double>(x1, 2)) {
    return bilinear_forward_fast_t<double>(x1, x2, weight, bias);
  }
  return py::none();
}

// bilinear_backward's fast path, as bilinear_forward_fast: the gradients if every array is
// exact and fits and every flag is exactly True or False, else None.
template <class T>
py::object bilinear_backward_fast_t(py::handle grad, py::handle x1, py::handle x2,
                                    py::handle weight, py::handle kept, const bool (&needs)[4]) {
  const auto args = exact_args<T>(x1, x2, weight, py::none(), grad);
  std::optional<Array<T>> t;
  if (!args || !exact_kept<T>(kept, args->shape(), t)) return py::none();
  return bilinear_backward_py<T>(*args->grad, args->x1, args->x2, args->weight, t, needs[0],
                                 needs[1], needs[2], needs[3]);
}

py::object bilinear_backward_fast(py::handle grad, py::handle x1, py::handle x2, py::handle weight,
                                  py::handle bias, py::handle need_x1, py::handle need_x2,
                                  py::handle need_weight, py::handle kept) {
  bool needs[4];
  if (!binding::exact_bools({need_x1, need_x2, need_weight, bias}, needs)) return py::none();
  if (binding::exact_array<float>(grad, 2)) {
    return bilinear_backward_fast_t<float>(grad, x1, x2, weight, kept, needs);
  }
  if (binding::exact_array<double>(grad, 2)) {
    return bilinear_backward_fast_t<double>(grad, x1, x2, weight, kept, needs);
  }
  return py::none();
}

// The Bilinear layer's forward fast path (python/linmaps/_layers.py): for exact arguments,
// (z, x1 kept, x2 kept, T buffer or None) -- the inputs copied if copy_inputs, T kept if it
// fits keep_bytes, in `kept` if that is a large enough buffer; else None.
template <class T>
py::object bilinear_layer_forward_t(py::handle x1, py::handle x2, py::handle weight,
                                    py::handle bias, py::handle kept, Index keep_bytes,
                                    bool copy_inputs) {
  auto args = exact_args<T>(x1, x2, weight, bias, py::none());
  if (!args) return py::none();
  const BilinearShape shape = args->shape();
  std::optional<Array<T>> t;
  const Index elements = bilinear_kept_elements<T>(shape);
  if (elements <= keep_bytes / Index(sizeof(T))) {
    if (kept.is_none() || !exact_kept<T>(kept, shape, t)) t = new_array<T>({elements});
  }
  if (copy_inputs) {
    args->x1 = binding::copy_of(args->x1);
    args->x2 = binding::copy_of(args->x2);
  }
  Array<T> z = bilinear_forward_py<T>(args->x1, args->x2, args->weight, args->bias, t);
  return py::make_tuple(z, args->x1, args->x2, t ? py::object(*t) : py::object(py::none()));
}

py::object bilinear_layer_forward(py::handle x1, py::handle x2, py::handle weight, py::handle bias,
                                  py::handle kept, Index keep_bytes, bool copy_inputs) {
  if (binding::exact_array<float>(weight, 3)) {
    return bilinear_layer_forward_t<float>(x1, x2, weight, bias, kept, keep_bytes, copy_inputs);
  }
  if (binding::exact_array<double>(weight, 3)) {
    return bilinear_layer_forward_t<double>(x1, x2, weight, bias, kept, keep_bytes, copy_inputs);
  }
  return py::none();
}

// The Bilinear layer's backward fast path: for exact arguments, adds the parameter gradients to
// the accumulators (None: not wanted) and returns (grad_x1, grad_x2); else None. acc_bias
// goes through exact_args' bias check (an exact array of length out).
template <class T>
py::object bilinear_layer_backward_t(py::handle grad, py::handle x1, py::handle x2,
                                     py::handle weight, py::handle kept, const bool (&needs)[2],
                                     py::handle acc_weight, py::handle acc_bias) {
  const auto args = exact_args<T>(x1, x2, weight, acc_bias, grad);
  std::optional<Array<T>> t;
  if (!args || !exact_kept<T>(kept, args->shape(), t) ||
      !binding::accumulator_fits<T>(acc_weight, args->weight) || !binding::writeable(acc_bias)) {
    return py::none();
  }
  py::tuple grads = run_bilinear_backward<T>(
      *args->grad, args->x1, args->x2, args->weight, t, needs[0], needs[1], false, false,
      binding::accumulator_data<T>(acc_weight), binding::accumulator_data<T>(acc_bias));
  return py::make_tuple(grads[0], grads[1]);
}

py::object bilinear_layer_backward(py::handle grad, py::handle x1, py::handle x2, py::handle weight,
                                   py::handle kept, py::handle need_x1, py::handle need_x2,
                                   py::handle acc_weight, py::handle acc_bias) {
  bool needs[2];
  if (!binding::exact_bools({need_x1, need_x2}, needs)) return py::none();
  if (binding::exact_array<float>(weight, 3)) {
    return bilinear_layer_backward_t<float>(grad, x1, x2, weight, kept, needs, acc_weight,
                                            acc_bias);
  }
  if (binding::exact_array<double>(weight, 3)) {
    return bilinear_layer_backward_t<double>(grad, x1, x2, weight, kept, needs, acc_weight,
                                             acc_bias);
  }
  return py::none();
}

Index bilinear_kept_elements_py(Index batch, Index in1, Index in2, Index out, Index itemsize) {
  if (batch < 0 || in1 < 0 || in2 < 0 || out < 0) {
    throw std::invalid_argument("bilinear_kept_elements: negative size");
  }
  const BilinearShape shape{batch, in1, in2, out};
  if (itemsize == sizeof(float)) return bilinear_kept_elements<float>(shape);
  if (itemsize == sizeof(double)) return bilinear_kept_elements<double>(shape);
  throw std::invalid_argument("bilinear_kept_elements: itemsize must be 4 or 8");
}

template <class T>
void define(py::module_& m) {
  m.def("bilinear_forward", &bilinear_forward_py<T>, py::arg("x1").noconvert(),
        py::arg("x2").noconvert(), py::arg("weight").noconvert(),
        py::arg("bias").noconvert().none(true), py::arg("kept").noconvert().none(true) = py::none(),
        "z[k,l] = x1[k] @ weight[l] @ x2[k] + bias[l] for C-contiguous float32/float64 "
        "arrays of one dtype; T kept in `kept` (1-D, bilinear_kept_elements long) if given.");
  m.def("bilinear_backward", &bilinear_backward_py<T>, py::arg("grad").noconvert(),
        py::arg("x1").noconvert(), py::arg("x2").noconvert(), py::arg("weight").noconvert(),
        py::arg("kept").noconvert().none(true), py::arg("need_x1"), py::arg("need_x2"),
        py::arg("need_weight"), py::arg("need_bias"),
        "(grad_x1, grad_x2, grad_weight, grad_bias); None for gradients not requested. "
        "`kept`: what bilinear_forward kept for the same arguments, or None.");
}

}  // namespace

void bind_bilinear(py::module_& m) {
  define<float>(m);
  define<double>(m);
  m.def("bilinear_forward_fast", &bilinear_forward_fast, py::arg("x1"), py::arg("x2"),
        py::arg("weight"), py::arg("bias").none(true),
        "bilinear_forward if the arguments are exact C-contiguous float32/float64 ndarrays of "
        "one dtype and matching shapes, else None (never raises for bad arguments).");
  m.def("bilinear_backward_fast", &bilinear_backward_fast, py::arg("grad"), py::arg("x1"),
        py::arg("x2"), py::arg("weight"), py::arg("bias"), py::arg("need_x1"), py::arg("need_x2"),
        py::arg("need_weight"), py::arg("kept").none(true) = py::none(),
        "bilinear_backward if the arrays are exact C-contiguous float32/float64 ndarrays of one "
        "dtype and matching shapes (kept: None or a large enough kept T) and the flags are "
        "True/False, else None.");
  m.def("bilinear_layer_forward_fast", &bilinear_layer_forward, py::arg("x1"), py::arg("x2"),
        py::arg("weight"), py::arg("bias").none(true), py::arg("kept").none(true),
        py::arg("keep_bytes"), py::arg("copy_inputs"),
        "Bilinear layer forward for exact arguments: (z, x1, x2, kept T or None), else None.");
  m.def("bilinear_layer_backward_fast", &bilinear_layer_backward, py::arg("grad"), py::arg("x1"),
        py::arg("x2"), py::arg("weight"), py::arg("kept").none(true), py::arg("need_x1"),
        py::arg("need_x2"), py::arg("acc_weight").none(true), py::arg("acc_bias").none(true),
        "Bilinear layer backward for exact arguments: accumulates the parameter gradients and "
        "returns (grad_x1, grad_x2), else None.");
  m.def("bilinear_kept_elements", &bilinear_kept_elements_py, py::arg("batch"), py::arg("in1"),
        py::arg("in2"), py::arg("out"), py::arg("itemsize"),
        "Length of the buffer bilinear_forward keeps T in, for this shape and item size.");
}

}  // namespace linmaps
