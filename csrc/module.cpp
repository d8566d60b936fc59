// linmaps._core: the compiled arithmetic behind linmaps. Private; the public API, argument
// checks and docstrings live in python/linmaps.
#include <pybind11/pybind11.h>

#include <Eigen/Core>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

void bind_info(py::module_& m) {
  m.attr("__version__") = LINMAPS_VERSION;
  m.attr("eigen_version") = std::to_string(EIGEN_WORLD_VERSION) + "." +
                            std::to_string(EIGEN_MAJOR_VERSION) + "." +
                            std::to_string(EIGEN_MINOR_VERSION);
  m.attr("compiler") = LINMAPS_COMPILER;
  m.attr("cxx_flags") = LINMAPS_CXX_FLAGS;
  m.attr("simd") = Eigen::SimdInstructionSetsInUse();
#ifdef _OPENMP
  m.attr("openmp") = _OPENMP;
#else
  m.attr("openmp") = 0;
#endif
  m.def("get_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "linmaps compiled core (private; use the linmaps package)";
  bind_info(m);
}
