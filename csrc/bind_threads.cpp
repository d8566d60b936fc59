// Thread control of linmaps._core (the policy itself is documented in threads.cpp).
#include "linmaps.hpp"

namespace linmaps {

void bind_threads(py::module_& m) {
  threads::setting();  // read the OpenMP process default now, not on the first call

  m.def("get_num_threads", &threads::for_call,
        "Threads a linmaps call made now from this Python thread may use: the process-wide "
        "setting, capped by this thread's OpenMP limit if that was changed (threadpoolctl).");
  m.def("set_num_threads", &threads::set_setting, py::arg("n"),
        "Set the process-wide number of threads (n >= 1) used by calls from any thread.");
  m.def("get_thread_setting", &threads::setting,
        "The process-wide setting itself (the OpenMP default until set_num_threads).");
  m.def("team_size", &threads::team_size,
        "Size of the OpenMP team a parallel region opened now from this thread gets, opened "
        "the way the kernels open theirs (diagnostics and tests).");
}

}  // namespace linmaps
