// Thread control of linmaps._core (the policy itself is documented in threads.cpp).
#include "linmaps.hpp"

#define LINMAPS_STRINGIFY_(x) #x
#define LINMAPS_STRINGIFY(x) LINMAPS_STRINGIFY_(x)

namespace linmaps {
namespace {

constexpr const char* kStateCapsule = "linmaps._core.process_state";

// The baseline module _core creates the process-wide thread state; every other
// instruction-set module takes the same one from it, so that all of them share one
// setting and one fork flag (they share one libgomp).
void attach_process_state(py::module_& m) {
  if (std::string(LINMAPS_STRINGIFY(LINMAPS_MODULE_NAME)) == "_core") {
    threads::ProcessState* state = threads::new_process_state();
    m.attr("_process_state") =
        py::reinterpret_steal<py::object>(PyCapsule_New(state, kStateCapsule, nullptr));
    return;
  }
  py::object capsule = py::module_::import("linmaps._core").attr("_process_state");
  void* state = PyCapsule_GetPointer(capsule.ptr(), kStateCapsule);
  if (state == nullptr) throw py::error_already_set();
  threads::use_process_state(static_cast<threads::ProcessState*>(state));
}

}  // namespace

void bind_threads(py::module_& m) {
  attach_process_state(m);
  binding::g_main_thread_ident =
      py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();

  m.def("get_num_threads", &threads::for_call,
        "Threads a linmaps call made now from this Python thread may use: the process-wide "
        "setting, capped by this thread's OpenMP limit if that was changed (threadpoolctl); "
        "1 in a forked child of a process that had started OpenMP threads.");
  m.def("set_num_threads", &threads::set_setting, py::arg("n"),
        "Set the process-wide number of threads (n >= 1; stored as min(n, thread_cap())).");
  m.def("get_thread_setting", &threads::setting,
        "The process-wide setting itself (the OpenMP default until set_num_threads).");
  m.def("thread_cap", &threads::cap, "The most threads a call ever uses.");
  m.def("openmp_default", &threads::openmp_default,
        "OpenMP's process default thread count, as read at import (OMP_NUM_THREADS or CPUs).");
  m.def("in_forked_child", &threads::in_forked_child,
        "Whether this process is a fork of one that had started OpenMP threads (calls then "
        "run on the calling thread).");
  m.def("team_size", &threads::team_size,
        "Size of the OpenMP team a parallel region opened now from this thread gets, opened "
        "the way the kernels open theirs (diagnostics and tests).");
  m.def("contention_engaged", &threads::contention_engaged,
        "How many times calls took a smaller team because other programs kept preempting "
        "linmaps' threads (diagnostics and tests).");
  m.def("blas_set_sharing", &threads::blas_set_sharing, py::arg("enable"),
        "Share the BLAS pool: give the callback to every OpenBLAS loaded now and later (True), "
        "or take it back from all (False).");
  m.def("blas_refresh", &threads::blas_refresh,
        "When sharing, give the callback to OpenBLAS libraries loaded since the last look.");
  m.def("blas_looked", &threads::blas_looked,
        "Whether a threaded call has looked for OpenBLAS libraries since sharing began.");
  m.def("blas_uninstall", &threads::blas_uninstall,
        "Give every library back its own threads (call when no other thread is in a BLAS "
        "call).");
  m.def("blas_installed", &threads::blas_installed,
        "(path, symbol) of every library whose parallel BLAS calls run on linmaps' pool.");
  m.def("blas_calls", &threads::blas_calls,
        "Number of BLAS calls the callback has run (diagnostics and tests).");
}

}  // namespace linmaps
