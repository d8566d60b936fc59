// Shared header of the pybind11 layer of linmaps._core: one bind_<area>(py::module_&) per
// binding file, plus the small helpers they share. _core is private and thin: the public
// API, argument validation and docstrings live in python/linmaps; the checks here are only a
// last line of defence (they raise ValueError / TypeError instead of reading out of bounds).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.hpp"

namespace linmaps {
namespace py = pybind11;

// C-contiguous arrays of exactly T. Without py::array::forcecast, and with every array
// argument declared .noconvert(), pybind11 never makes a silent converted copy: an array of
// another dtype or layout simply matches no overload (TypeError).
template <class T>
using Array = py::array_t<T, py::array::c_style>;

void bind_info(py::module_& m);
void bind_threads(py::module_& m);
void bind_linear(py::module_& m);
void bind_bilinear(py::module_& m);
void bind_pairs(py::module_& m);
void bind_bf16(py::module_& m);

namespace binding {

inline std::string shape_string(const py::array& array) {
  std::string text = "(";
  for (py::ssize_t axis = 0; axis < array.ndim(); ++axis) {
    if (axis > 0) text += ", ";
    text += std::to_string(array.shape(axis));
  }
  return text + (array.ndim() == 1 ? ",)" : ")");
}

// Throws std::invalid_argument (ValueError) unless `array` has exactly this shape.
inline void require_shape(const py::array& array, const char* name,
                          std::initializer_list<Index> expected) {
  bool ok = array.ndim() == static_cast<py::ssize_t>(expected.size());
  py::ssize_t axis = 0;
  for (Index extent : expected) {
    if (!ok) break;
    ok = array.shape(axis++) == extent;
  }
  if (!ok) {
    std::string wanted = "(";
    for (Index extent : expected) wanted += std::to_string(extent) + ", ";
    if (expected.size() > 1) wanted.resize(wanted.size() - 2);
    throw std::invalid_argument(std::string(name) + " must have shape " + wanted + ")" + ", got " +
                                shape_string(array));
  }
}

inline void require_ndim(const py::array& array, const char* name, py::ssize_t ndim) {
  if (array.ndim() != ndim) {
    throw std::invalid_argument(std::string(name) + " must be " + std::to_string(ndim) +
                                "-D, got shape " + shape_string(array));
  }
}

// A new, uninitialised, C-contiguous array (allocated with the GIL held; the kernels
// write every element).
template <class T>
Array<T> new_array(std::initializer_list<Index> shape) {
  return Array<T>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
}

// Whether the data of `array` is aligned to its element size (NumPy's ALIGNED flag). An array
// can be without: np.frombuffer at an odd offset, or one unpickled from a byte stream (a
// dask.distributed worker's). Reading or writing one as T is undefined behaviour, so no such
// array reaches a kernel: the front end copies it first (_validation.contiguous).
inline bool aligned(const py::array& array) {
  return py::detail::array_proxy(array.ptr())->flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_;
}

// Throws std::invalid_argument (ValueError) if `array` is not aligned (see aligned).
inline void require_aligned(const py::array& array, const char* name) {
  if (!aligned(array)) {
    throw std::invalid_argument(std::string(name) +
                                " is not aligned to its element size; pass an aligned copy");
  }
}

// Whether `h` is exactly a numpy.ndarray (no subclass) of dtype T in native byte order,
// C-contiguous and aligned, with `ndim` dimensions: what the validated front end would pass
// unchanged.
template <class T>
bool exact_array(py::handle h, py::ssize_t ndim) {
  auto& api = py::detail::npy_api::get();
  if (Py_TYPE(h.ptr()) != api.PyArray_Type_) return false;
  const auto* proxy = py::detail::array_proxy(h.ptr());
  if (proxy->nd != ndim) return false;
  constexpr int kLayout =
      py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ | py::detail::npy_api::NPY_ARRAY_ALIGNED_;
  if ((proxy->flags & kLayout) != kLayout) return false;
  const auto* descr = py::detail::array_descriptor_proxy(proxy->descr);
  return descr->type_num == py::detail::npy_format_descriptor<T>::value && descr->byteorder != '>';
}

// For the fast paths' optional arguments: true for None (`out` left empty), true with `out`
// set for an exact array of T of exactly `shape`, else false.
template <class T>
bool exact_optional(py::handle h, std::initializer_list<py::ssize_t> shape,
                    std::optional<Array<T>>& out) {
  if (h.is_none()) return true;
  if (!exact_array<T>(h, py::ssize_t(shape.size()))) return false;
  const auto array = py::reinterpret_borrow<Array<T>>(h);
  py::ssize_t axis = 0;
  for (py::ssize_t extent : shape) {
    if (array.shape(axis++) != extent) return false;
  }
  out = array;
  return true;
}

// Whether every flag is exactly True or False (what the validated front end would accept and
// pass on unchanged); their values go to `out`.
inline bool exact_bools(std::initializer_list<py::handle> flags, bool* out) {
  for (py::handle flag : flags) {
    if (flag.ptr() != Py_True && flag.ptr() != Py_False) return false;
    *out++ = flag.ptr() == Py_True;
  }
  return true;
}

// A new C-contiguous copy of `array` (a layer's private copy of its input).
template <class T>
Array<T> copy_of(const Array<T>& array) {
  std::vector<py::ssize_t> shape(array.shape(), array.shape() + array.ndim());
  Array<T> copy(shape);
  if (array.size() > 0) std::memcpy(copy.mutable_data(), array.data(), array.nbytes());
  return copy;
}

// Whether `array` (an ndarray, or None) may be written to.
inline bool writeable(py::handle array) {
  return array.is_none() ||
         (py::detail::array_proxy(array.ptr())->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_);
}

// For the layers' fast paths: `acc` if it is None (nothing to accumulate) or a writeable exact
// array of `like`'s shape; otherwise false (the caller then takes the validated path).
template <class T>
bool accumulator_fits(py::handle acc, const py::array& like) {
  if (acc.is_none()) return true;
  if (!exact_array<T>(acc, like.ndim()) || !writeable(acc)) return false;
  const auto a = py::reinterpret_borrow<py::array>(acc);
  for (py::ssize_t axis = 0; axis < like.ndim(); ++axis) {
    if (a.shape(axis) != like.shape(axis)) return false;
  }
  return true;
}

// The data of an accumulator that passed accumulator_fits, or null for None.
template <class T>
T* accumulator_data(py::handle acc) {
  if (acc.is_none()) return nullptr;
  return reinterpret_cast<T*>(py::detail::array_proxy(acc.ptr())->data);
}

// acc += grad (elementwise, as numpy.add(acc, grad, out=acc) rounds it) unless acc is None.
template <class T>
void accumulate(py::handle acc, const py::object& grad) {
  if (acc.is_none() || grad.is_none()) return;
  auto a = py::reinterpret_borrow<Array<T>>(acc);
  const auto g = py::reinterpret_borrow<Array<T>>(grad);
  Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>(a.mutable_data(), a.size()) +=
      Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(g.data(), g.size());
}

// Python's main thread (set at import, bind_threads.cpp): the only thread Python runs signal
// handlers in, so the only one whose calls poll for Ctrl-C.
inline unsigned long g_main_thread_ident = 0;

inline bool poll_python_signals() {
  py::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;
}

// One kernel call from Python, around the GIL-free compute: lets the kernels stop early for a
// KeyboardInterrupt (detail::CallStop; calls from the main thread only), gives the call its
// own level of the calling thread's scratch and frees what it grew too large afterwards
// (detail::CallerState). A Python signal handler that the poll runs may call linmaps again, on
// this thread, in the middle of this call: that call gets a CallScope of its own, and this
// one's state is restored when it ends.
class CallScope {
 public:
  // A call under kSerialFlops takes microseconds and its scratch is small: no poll, no trim.
  explicit CallScope(double flops)
      : stop_(flops >= detail::kSerialFlops && PyThread_get_thread_ident() == g_main_thread_ident
                  ? &poll_python_signals
                  : nullptr),
        caller_(flops >= detail::kSerialFlops ? &stop_ : nullptr, flops >= detail::kSerialFlops) {}
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

  // With the GIL held, after the compute: the pending exception (KeyboardInterrupt, or
  // whatever a signal handler raised) if the call was stopped; the outputs are discarded.
  void raise_if_stopped() const {
    if (stop_.stopped()) throw py::error_already_set();
  }

 private:
  detail::CallStop stop_;
  detail::CallerState caller_;
};

// Calls under this many flops keep the GIL: they take about a microsecond, about what
// releasing and taking back the GIL costs, and no other Python thread could use the gap.
constexpr double kReleaseGilFlops = 1.0e5;

// Releases the GIL for the kernel of a call of about `flops` flops (see kReleaseGilFlops).
class ReleaseGil {
 public:
  explicit ReleaseGil(double flops) {
    if (flops >= kReleaseGilFlops) release_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> release_;
};

// The threads for a kernel call of about `flops` floating-point operations: fewer while other
// programs keep preempting linmaps' threads (threads::contention_cap). A call that will
// use threads first gives the BLAS threads callback to any OpenBLAS loaded since the last
// look (threads.cpp), so that a SciPy imported after linmaps shares the pool too.
inline int threads_for(double flops) {
  const int num_threads = threads::contention_cap(threads::for_call(), flops);
  if (num_threads > 1 && flops >= detail::kSerialFlops) threads::blas_refresh();
  return num_threads;
}

inline double product_flops(std::initializer_list<Index> extents) {
  double flops = 2.0;
  for (Index extent : extents) flops *= static_cast<double>(extent);
  return flops;
}

// A gradient output: a new array when it is requested, else no array at all (a null pointer
// for the kernel, None for Python), so that an unrequested gradient costs nothing.
template <class T>
class Gradient {
 public:
  Gradient(bool wanted, std::initializer_list<Index> shape) {
    if (wanted) array_.emplace(new_array<T>(shape));
  }
  T* data() { return array_ ? array_->mutable_data() : nullptr; }
  py::object result() const { return array_ ? py::object(*array_) : py::object(py::none()); }

 private:
  std::optional<Array<T>> array_;
};

}  // namespace binding
}  // namespace linmaps
