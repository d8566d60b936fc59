"""Adapter from linmaps' internal backend contract to the compiled kernels in ``_core``.

The front end (``_api``) validates before calling: every array is a C-contiguous numpy
array, all of one dtype (float32 or float64), with consistent shapes; ``bias`` may be None.
Each function returns new C-contiguous arrays of that dtype (inputs are never modified) and
None for gradients that were not requested, whose cost is skipped in the kernels.
``_core`` picks the float32 or float64 kernel from the dtype and never converts silently.
"""

from __future__ import annotations

from . import _core as _baseline_core
from . import _dispatch

# The kernels compiled for the best instruction set this CPU supports (or LINMAPS_CPU).
_core, isa = _dispatch.load(_baseline_core)
available_isas = _dispatch.available(_baseline_core)

__all__ = [
    "bilinear_backward",
    "bilinear_forward",
    "bilinear_kept_elements",
    "get_num_threads",
    "linear_backward",
    "linear_forward",
    "set_num_threads",
]


def linear_forward(x, weight, bias):
    """y (N, m) = x (N, n) @ weight (m, n).T + bias (m,)."""
    return _core.linear_forward(x, weight, bias)


def linear_backward(grad, x, weight, need_x, need_weight, need_bias):
    """(grad_x (N, n) | None, grad_weight (m, n) | None, grad_bias (m,) | None)."""
    return _core.linear_backward(grad, x, weight, bool(need_x), bool(need_weight), bool(need_bias))


def bilinear_kept_elements(n_samples, in1, in2, out_features, dtype) -> int:
    """Length of the 1-D buffer a forward keeps its intermediate T in, for this shape."""
    return _core.bilinear_kept_elements(n_samples, in1, in2, out_features, dtype.itemsize)


def bilinear_forward(x1, x2, weight, bias, kept=None):
    """z (N, L), z[k, l] = x1[k] @ weight[l] @ x2[k] + bias[l]; T kept in ``kept`` if given."""
    return _core.bilinear_forward(x1, x2, weight, bias, kept)


def bilinear_backward(grad, x1, x2, weight, need_x1, need_x2, need_weight, need_bias, kept=None):
    """(grad_x1 | None, grad_x2 | None, grad_weight (L, m, n) | None, grad_bias (L,) | None);
    T read from ``kept`` (what the forward kept for these arguments) if given."""
    return _core.bilinear_backward(
        grad,
        x1,
        x2,
        weight,
        kept,
        bool(need_x1),
        bool(need_x2),
        bool(need_weight),
        bool(need_bias),
    )


def get_num_threads() -> int:
    """Threads a call from this Python thread uses now (process-wide setting, capped by
    this thread's OpenMP limit if threadpoolctl or omp_set_num_threads changed it)."""
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the process-wide number of threads (n >= 1; validated by the front end)."""
    _core.set_num_threads(n)
