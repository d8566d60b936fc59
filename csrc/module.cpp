// linmaps._core: the compiled arithmetic behind linmaps. Private; the public API, argument
// checks and docstrings live in python/linmaps.
#include <Eigen/Core>

#include "linmaps.hpp"

namespace linmaps {

namespace {

bool cpu_supports(const std::string& level) {
  if (level == "baseline") return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // libgcc's checks include the OS's XSAVE support for the AVX and AVX-512 register state.
  __builtin_cpu_init();
  if (level == "avx2") return __builtin_cpu_supports("x86-64-v3");
  if (level == "avx512") return __builtin_cpu_supports("x86-64-v4");
#endif
  if (level == "avx2" || level == "avx512") return false;
  throw std::invalid_argument("unknown instruction-set level '" + level +
                              "'; expected 'baseline', 'avx2' or 'avx512'");
}

}  // namespace

void bind_info(py::module_& m) {
  m.attr("__version__") = LINMAPS_VERSION;
  m.attr("eigen_version") = std::to_string(EIGEN_WORLD_VERSION) + "." +
                            std::to_string(EIGEN_MAJOR_VERSION) + "." +
                            std::to_string(EIGEN_MINOR_VERSION);
  m.attr("compiler") = LINMAPS_COMPILER;
  m.attr("cxx_flags") = LINMAPS_CXX_FLAGS;
  m.attr("simd") = Eigen::SimdInstructionSetsInUse();
  m.attr("isa") = LINMAPS_ISA;
  m.def("cpu_supports", &cpu_supports, py::arg("level"),
        "Whether this CPU (and OS) can run the instruction-set level 'baseline', 'avx2' "
        "(x86-64-v3) or 'avx512' (x86-64-v4).");
#ifdef _OPENMP
  m.attr("openmp") = _OPENMP;
#else
  m.attr("openmp") = 0;
#endif
  m.def(
      "get_max_threads",
      []() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
      },
      "omp_get_max_threads() of the calling thread (OpenMP's own per-thread setting).");
}

}  // namespace linmaps

PYBIND11_MODULE(LINMAPS_MODULE_NAME, m) {
  m.doc() = "linmaps compiled core (private; use the linmaps package)";
  linmaps::bind_info(m);
  linmaps::bind_threads(m);
  linmaps::bind_linear(m);
  linmaps::bind_bilinear(m);
  linmaps::bind_pairs(m);
  linmaps::bind_bf16(m);
}
