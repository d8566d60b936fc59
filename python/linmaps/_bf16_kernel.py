"""The compiled backend's path for the products of bfloat16 arrays.

* ``"avx512_bf16"``: the ``vdpbf16ps`` kernel of ``csrc/bf16.cpp``, in the modules built for
  AVX-512 (``avx512``, ``native``), on a CPU with AVX512-BF16. It computes the linear map's
  products (``linear``, ``linear_backward`` and the ``Linear`` layer) from the bfloat16 bits,
  for bfloat16 arrays and for the float32 modes ``"bf16"`` and ``"bf16x3"`` (``_precision``).
* ``"float32"``: the bfloat16 arrays are widened to float32 (exactly) and computed by the
  float32 kernels. The bilinear map always takes this path.

Either way, products are exact, sums float32 and each result is rounded once to bfloat16.
The two paths group the float32 sums differently, so results may differ in the last bit of
a bfloat16 where a float32 sum lies near a rounding boundary; and ``vdpbf16ps`` counts
subnormal inputs and results (below about 1.2e-38 in magnitude) as zero.

``LINMAPS_BF16_PATH`` (read at import) forces a path: ``float32`` always works,
``avx512_bf16`` raises ``RuntimeError`` where it cannot run. AMX is not built.
"""

from __future__ import annotations

import os

import numpy as np

from . import _backend, _bf16
from . import _validation as v

PATHS = ("avx512_bf16", "float32")


def _available() -> str:
    module = _backend._cpp_backend
    if module is None or not hasattr(module._core, "bf16_path"):
        return "float32"
    return str(module._core.bf16_path())


def _choose() -> str:
    available = _available()
    raw = os.environ.get("LINMAPS_BF16_PATH", "")
    forced = raw.strip().lower()
    if not forced:
        return available
    if forced not in PATHS:
        raise ValueError(
            f"LINMAPS_BF16_PATH={raw!r} is not a bfloat16 path; valid paths are "
            f"{', '.join(map(repr, PATHS))}"
        )
    if forced != available and forced == "avx512_bf16":
        isa = getattr(_backend._cpp_backend, "isa", "none")
        raise RuntimeError(
            f"LINMAPS_BF16_PATH='avx512_bf16' cannot be used: the compiled module in use "
            f"(instruction set {isa!r}) or this CPU has no AVX512-BF16 kernel"
        )
    return forced


path = _choose()


def applies(dtype: np.dtype) -> bool:
    """Whether a call with result ``dtype`` goes to the ``vdpbf16ps`` kernel."""
    return (
        path == "avx512_bf16" and dtype.kind == "V" and _backend.current() is _backend._cpp_backend
    )


def _bits(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return v.contiguous(array, dtype).view(np.uint16)


def _transposed_bits(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(_bits(array, dtype).T)


def linear_forward(x, weight, bias, dtype):
    """``x (N, n) @ weight (m, n).T + bias``, all bfloat16 (``dtype``), rounded once."""
    gemm = _backend._cpp_backend._core.bf16_gemm_nt
    y = gemm(_bits(x, dtype), _bits(weight, dtype))
    if bias is not None:
        with np.errstate(all="ignore"):
            y += _bf16.to_float32(bias)
    return _bf16.from_float32(y, dtype)


def linear_backward(grad, x, weight, need_x, need_weight, need_bias, dtype):
    """``(grad_x, grad_weight, grad_bias)`` of ``linear_forward``, each None if not needed."""
    gemm = _backend._cpp_backend._core.bf16_gemm_nt
    grad_bits = _bits(grad, dtype)
    grad_x = grad_weight = grad_bias = None
    if need_x:
        grad_x = gemm(grad_bits, _transposed_bits(weight, dtype))
        grad_x = _bf16.from_float32(grad_x, dtype)
    if need_weight:
        x_t = _transposed_bits(x, dtype)
        grad_weight = _bf16.from_float32(gemm(np.ascontiguousarray(grad_bits.T), x_t), dtype)
    if need_bias:
        # The float32 kernel's sum of grad_out (no product), as on the float32 path.
        grad32 = _bf16.to_float32(grad_bits.view(dtype))
        empty = np.empty((grad32.shape[0], 0), np.float32)
        grad_bias = _backend._cpp_backend.linear_backward(
            grad32, empty, np.empty((grad32.shape[1], 0), np.float32), False, False, True
        )[2]
        grad_bias = _bf16.from_float32(grad_bias, dtype)
    return grad_x, grad_weight, grad_bias


# ----------------------------------------------------------------------------- float32 modes


def takes_modes(backend) -> bool:
    """Whether the float32 modes' linear products run on the kernel (compiled backend)."""
    return path == "avx512_bf16" and backend is _backend._cpp_backend


def _bits_of(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bits of a float32 array that holds bfloat16 values (exact)."""
    return (np.ascontiguousarray(values).view(np.uint32) >> 16).astype(np.uint16)


def products(pairs) -> np.ndarray:
    """``sum(a @ b.T for a, b in pairs)`` for float32 arrays of bfloat16 values, ``a (M, K_i)``
    and ``b (N, K_i)``: one kernel call on the operands laid end to end along k, so that
    every entry is one float32 sum of exact products."""
    gemm = _backend._cpp_backend._core.bf16_gemm_nt
    a = np.concatenate([_bits_of(a) for a, _ in pairs], axis=1)
    b = np.concatenate([_bits_of(b) for _, b in pairs], axis=1)
    return gemm(a, b)
