// Shared header of the pybind11 layer of linmaps._core: one bind_<area>(py::module_&) per
// binding file, plus the small helpers they share. _core is private and thin: the public
// API, argument validation and docstrings live in python/linmaps; the checks here are only a
// last line of defence (they raise ValueError / TypeError instead of reading out of bounds).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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

// Whether `h` is exactly a numpy.ndarray (no subclass) of dtype T in native byte order,
// C-contiguous, with `ndim` dimensions: what the validated front end would pass unchanged.
template <class T>
bool exact_array(py::handle h, py::ssize_t ndim) {
  auto& api = py::detail::npy_api::get();
  if (Py_TYPE(h.ptr()) != api.PyArray_Type_) return false;
  const auto* proxy = py::detail::array_proxy(h.ptr());
  if (proxy->nd != ndim) return false;
  if (!(proxy->flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_)) return false;
  const auto* descr = py::detail::array_descriptor_proxy(proxy->descr);
  return descr->type_num == py::detail::npy_format_descriptor<T>::value && descr->byteorder != '>';
}

// Python's main thread (set at import, bind_threads.cpp): the only thread Python runs signal
// handlers in, so the only one whose calls poll for Ctrl-C.
inline unsigned long g_main_thread_ident = 0;

inline bool poll_python_signals() {
  py::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;
}

// One kernel call from Python, around the GIL-free compute: lets the kernels stop early for a
// KeyboardInterrupt (detail::CallStop; calls from the main thread only), and frees the
// calling thread's oversized scratch afterwards (detail::trim_thread_scratch).
class CallScope {
 public:
  // A call under kSerialFlops takes microseconds and its scratch is small: no poll, no trim.
  explicit CallScope(double flops)
      : active_(flops >= detail::kSerialFlops),
        stop_(active_ && PyThread_get_thread_ident() == g_main_thread_ident ? &poll_python_signals
                                                                            : nullptr) {
    if (!active_) return;
    detail::t_call_stop = &stop_;
    detail::t_is_caller = true;
  }
  ~CallScope() {
    if (!active_) return;
    detail::t_call_stop = nullptr;
    detail::t_is_caller = false;
    detail::trim_thread_scratch();
  }
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

  // With the GIL held, after the compute: the pending exception (KeyboardInterrupt, or
  // whatever a signal handler raised) if the call was stopped; the outputs are discarded.
  void raise_if_stopped() const {
    if (stop_.stopped.load(std::memory_order_relaxed)) throw py::error_already_set();
  }

 private:
  bool active_;
  detail::CallStop stop_;
};

// The threads for a kernel call of about `flops` floating-point operations. A call that will
// use threads first gives the BLAS threads callback to any OpenBLAS loaded since the last
// look (threads.cpp), so that a SciPy imported after linmaps shares the pool too.
inline int threads_for(double flops) {
  const int num_threads = threads::for_call();
  if (num_threads > 1 && flops >= detail::kSerialFlops) threads::blas_refresh();
  return num_threads;
}

inline double product_flops(std::initializer_list<Index> extents) {
  double flops = 2.0;
  for (Index extent : extents) flops *= static_cast<double>(extent);
  return flops;
}

template <class T>
py::object array_or_none(bool wanted, Array<T>& array) {
  return wanted ? py::object(array) : py::object(py::none());
}

template <class T>
T* data_or_null(bool wanted, Array<T>& array) {
  return wanted ? array.mutable_data() : nullptr;
}

}  // namespace binding
}  // namespace linmaps
