#!/bin/bash
# Build and run linear_kernel_vs_openblas.cpp (see its header) with the Eigen headers of the
# installed cmeel-eigen and the OpenBLAS bundled with the installed NumPy:
#   bash bench/studies/linear_kernel_vs_openblas.sh [CSRC_DIR] -- N IN OUT [THREADS] [ROUNDS] [OP]
# CSRC_DIR defaults to this checkout's csrc. Flags as the avx512 module's (CMakeLists.txt).
# Needs the build requirement cmeel-eigen in the environment: pip install cmeel-eigen
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
csrc="$here/../../csrc"
if [[ $# -gt 0 && $1 != "--" ]]; then csrc=$1; shift; fi
[[ $# -gt 0 && $1 == "--" ]] && shift
eigen=$(python -c "import sysconfig, pathlib; print(next(pathlib.Path(sysconfig.get_paths()['purelib']).glob('cmeel.prefix/include/eigen3'), 'cmeel-eigen-not-installed'))")
openblas=$(python -c "import numpy, pathlib; print(next((pathlib.Path(numpy.__file__).parent.parent / 'numpy.libs').glob('libscipy_openblas64_*.so')))")
out=$(mktemp -d)/linear_kernel_vs_openblas
g++ -O3 -DNDEBUG -march=x86-64-v4 -mtune=generic -fopenmp -DEIGEN_DONT_PARALLELIZE \
  -DEIGEN_GEMM_TO_COEFFBASED_THRESHOLD=0 -I"$csrc" -I"$eigen" "$here/linear_kernel_vs_openblas.cpp" \
  "$csrc/linear.cpp" "$csrc/threads.cpp" -o "$out" "$openblas" -Wl,-rpath,"$(dirname "$openblas")"
OPENBLAS_THREAD_TIMEOUT=${OPENBLAS_THREAD_TIMEOUT:-4} "$out" "$@"
