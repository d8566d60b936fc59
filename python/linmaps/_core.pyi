"""Type stubs for linmaps._core, the private compiled core (csrc/).

The same stubs describe _core_avx2, _core_avx512 and _core_native: one module per
instruction set, compiled from the same sources (linmaps._dispatch picks one at import).

Every kernel exists for float32 and float64. Array arguments must be C-contiguous numpy
arrays of exactly one of those dtypes, all the same: there is no implicit conversion, so
anything else matches no overload and raises TypeError. Inconsistent shapes raise
ValueError. Results are new C-contiguous arrays; gradients not requested are None.
"""

from typing import Any, overload

import numpy as np
import numpy.typing as npt

__version__: str
eigen_version: str
compiler: str
cxx_flags: str
simd: str
openmp: int
isa: str
"""Instruction-set level this module was compiled for: baseline, avx2, avx512 or native."""

def cpu_supports(level: str) -> bool:
    """Whether this CPU and OS can run 'baseline', 'avx2' (x86-64-v3) or 'avx512' (x86-64-v4)."""

def get_max_threads() -> int:
    """omp_get_max_threads() of the calling thread."""

def get_num_threads() -> int:
    """Threads a call made now from this Python thread may use."""

def set_num_threads(n: int) -> None:
    """Process-wide number of threads, n >= 1 (ValueError otherwise)."""

def get_thread_setting() -> int:
    """The process-wide setting (OpenMP's default until set_num_threads)."""

def team_size() -> int:
    """Size of the OpenMP team a kernel's parallel region would get now from this thread."""

def thread_cap() -> int:
    """The most threads a call ever uses (4 per usable CPU)."""

def openmp_default() -> int:
    """OpenMP's process default thread count, as read at import."""

def in_forked_child() -> bool:
    """Whether this is a forked child of a process that had started OpenMP threads."""

def blas_set_sharing(enable: bool) -> None:
    """Share the BLAS pool with every OpenBLAS loaded now and later, or take it back."""

def blas_refresh() -> None:
    """When sharing, give the callback to OpenBLAS libraries loaded since the last look."""

def blas_looked() -> bool:
    """Whether a threaded call has looked for OpenBLAS libraries since sharing began."""

def blas_uninstall() -> None:
    """Give every OpenBLAS its own threads back."""

def blas_installed() -> list[tuple[str, str]]:
    """(path, setter symbol) of every OpenBLAS whose parallel calls run on linmaps' pool."""

def blas_calls() -> int:
    """Number of BLAS calls the callback has run (diagnostics and tests)."""

def contention_engaged() -> int:
    """How many times calls took a smaller team because other programs kept preempting."""

@overload
def linear_forward(
    x: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
) -> npt.NDArray[np.float32]: ...
@overload
def linear_forward(
    x: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    bias: npt.NDArray[np.float64] | None,
) -> npt.NDArray[np.float64]: ...
@overload
def linear_backward(
    grad: npt.NDArray[np.float32],
    x: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[
    npt.NDArray[np.float32] | None,
    npt.NDArray[np.float32] | None,
    npt.NDArray[np.float32] | None,
]: ...
@overload
def linear_backward(
    grad: npt.NDArray[np.float64],
    x: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[
    npt.NDArray[np.float64] | None,
    npt.NDArray[np.float64] | None,
    npt.NDArray[np.float64] | None,
]: ...
@overload
def bilinear_forward(
    x1: npt.NDArray[np.float32],
    x2: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
    kept: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
@overload
def bilinear_forward(
    x1: npt.NDArray[np.float64],
    x2: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    bias: npt.NDArray[np.float64] | None,
    kept: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]: ...
@overload
def bilinear_backward(
    grad: npt.NDArray[np.float32],
    x1: npt.NDArray[np.float32],
    x2: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    kept: npt.NDArray[np.float32] | None,
    need_x1: bool,
    need_x2: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[
    npt.NDArray[np.float32] | None,
    npt.NDArray[np.float32] | None,
    npt.NDArray[np.float32] | None,
    npt.NDArray[np.float32] | None,
]: ...
@overload
def bilinear_backward(
    grad: npt.NDArray[np.float64],
    x1: npt.NDArray[np.float64],
    x2: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    kept: npt.NDArray[np.float64] | None,
    need_x1: bool,
    need_x2: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[
    npt.NDArray[np.float64] | None,
    npt.NDArray[np.float64] | None,
    npt.NDArray[np.float64] | None,
    npt.NDArray[np.float64] | None,
]: ...
def linear_forward_fast(x: object, weight: object, bias: object) -> npt.NDArray[Any] | None:
    """linear_forward if the arguments are exact C-contiguous float32/float64 ndarrays of one
    dtype and matching shapes, else None (never raises for bad arguments)."""

def linear_backward_fast(
    grad: object, x: object, weight: object, bias: object, need_x: object, need_weight: object
) -> tuple[npt.NDArray[Any] | None, ...] | None:
    """linear_backward if the arrays are exact and the flags are True/False, else None."""

def bilinear_forward_fast(
    x1: object, x2: object, weight: object, bias: object
) -> npt.NDArray[Any] | None:
    """bilinear_forward if the arguments are exact C-contiguous float32/float64 ndarrays of
    one dtype and matching shapes, else None (never raises for bad arguments)."""

def bilinear_backward_fast(
    grad: object,
    x1: object,
    x2: object,
    weight: object,
    bias: object,
    need_x1: object,
    need_x2: object,
    need_weight: object,
    kept: object = None,
) -> tuple[npt.NDArray[Any] | None, ...] | None:
    """bilinear_backward if the arrays are exact (kept: None or a large enough kept T) and
    the flags are True/False, else None."""

def bilinear_layer_forward_fast(
    x1: object,
    x2: object,
    weight: object,
    bias: object,
    kept: object,
    keep_bytes: int,
    copy_inputs: bool,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any] | None] | None:
    """Bilinear layer forward for exact arguments: (z, x1, x2, kept T or None), else None."""

def bilinear_layer_backward_fast(
    grad: object,
    x1: object,
    x2: object,
    weight: object,
    kept: object,
    need_x1: object,
    need_x2: object,
    acc_weight: object,
    acc_bias: object,
) -> tuple[npt.NDArray[Any] | None, npt.NDArray[Any] | None] | None:
    """Bilinear layer backward for exact arguments: accumulates the parameter gradients and
    returns (grad_x1, grad_x2), else None."""

def linear_layer_forward_fast(
    x: object, weight: object, bias: object, copy_inputs: bool
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
    """Linear layer forward for exact arguments: (y, x kept), else None."""

def linear_layer_backward_fast(
    grad: object,
    x: object,
    weight: object,
    need_x: object,
    acc_weight: object,
    acc_bias: object,
) -> tuple[npt.NDArray[Any] | None] | None:
    """Linear layer backward for exact arguments: accumulates the parameter gradients and
    returns (grad_x,), else None."""

def bilinear_kept_elements(batch: int, in1: int, in2: int, out: int, itemsize: int) -> int:
    """Length of the buffer bilinear_forward keeps T in, for this shape and item size."""

def bf16_path() -> str:
    """'avx512_bf16' if this module has the AVX512-BF16 kernel and the CPU runs it, else
    'float32' (csrc/bf16.cpp)."""

def bf16_gemm_nt(a: npt.NDArray[np.uint16], b: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """a (M, K) @ b (N, K).T for bfloat16 bits: float32 (M, N), float32 sums; RuntimeError
    where bf16_path() is 'float32'."""
