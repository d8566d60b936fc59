"""The float32 precision mode: how float32 products are computed (``fp32_precision``).

Named as PyTorch names its own setting. ``"ieee"``, the default, is float32 arithmetic as
always. ``"bf16"`` and ``"bf16x3"`` compute the products of float32 arrays from their
bfloat16 roundings; float64, float16 and bfloat16 arrays are never affected.

The modes are defined on top of any backend's float32 functions, so both backends give them
the same meaning: each product below is one call of the backend, on float32 arrays that hold
bfloat16 values (whose pairwise products float32 holds exactly), with float32 sums. Where the
compiled backend has the ``vdpbf16ps`` kernel (``_bf16_kernel``), the linear map's products
run on it instead, the terms of ``"bf16x3"`` in one float32 sum: the same meaning, other
rounding.

* ``"bf16"``: every factor of a product (inputs, weight, ``grad_out``) rounded to bfloat16.
  The bias, which is added and not multiplied, and the bias gradient (a sum of ``grad_out``)
  are float32, as in ``"ieee"``.
* ``"bf16x3"``: every factor ``a`` split into ``hi = bf16(a)`` and ``lo = bf16(a - hi)``;
  a product of two factors is ``hi*hi + hi*lo + lo*hi``, one of three factors (the bilinear
  map and its gradients) the four terms with at most one ``lo``. What is left out is below
  about ``2**-16`` of each product, relative.

Neither mode keeps the bilinear intermediate ``T`` for the backward: the backward computes
it again (``bilinear_with_context`` then holds no ``T``).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

import numpy as np

from . import _backend, _bf16, _bf16_kernel

MODES = ("ieee", "bf16", "bf16x3")

_default = "ieee"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "linmaps_fp32_precision", default=None
)
_lock = threading.Lock()
_FLOAT32 = np.dtype(np.float32)


def _check_mode(where: str, mode) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(
            f"{where}: unknown float32 precision {mode!r}; valid modes are "
            f"{', '.join(map(repr, MODES))}"
        )
    return mode


def get_fp32_precision() -> str:
    """The float32 precision mode of calls from this thread now: ``"ieee"`` (the default),
    ``"bf16"`` or ``"bf16x3"``."""
    return _override.get() or _default


def set_fp32_precision(mode: str) -> None:
    """Make ``mode`` the process-wide float32 precision (``"ieee"``, ``"bf16"`` or
    ``"bf16x3"``); :func:`fp32_precision` overrides it in one thread.

    ``"ieee"`` computes float32 as float32. ``"bf16"`` rounds the factors of every product of
    float32 arrays to bfloat16 and sums in float32; ``"bf16x3"`` splits each factor into two
    bfloat16 parts and sums three products (four for the bilinear map), close to float32's
    accuracy. Results stay float32; float64, float16 and bfloat16 arrays are never affected.
    See docs/bfloat16.md. Raises ``ValueError`` for another mode.
    """
    global _default
    mode = _check_mode("set_fp32_precision()", mode)
    with _lock:
        _default = mode


@contextlib.contextmanager
def fp32_precision(mode: str):
    """Context manager: float32 precision ``mode`` inside the ``with`` block, for this thread
    (or async task) only; see :func:`set_fp32_precision`."""
    token = _override.set(_check_mode("fp32_precision()", mode))
    try:
        yield mode
    finally:
        _override.reset(token)


def fast_core():
    """The compiled module if a call made here may take its fast path (exact arguments straight
    to the kernel, which checks them and returns None when they are not): the compiled backend
    is in use and float32 is computed as float32. Otherwise None. The one place the fast paths'
    condition is written."""
    fast = _backend.fast_core
    if fast is None or (_backend._override.get() or _backend._default) != "cpp":
        return None
    return fast if (_override.get() or _default) == "ieee" else None


def ieee() -> bool:
    """Whether float32 is computed as float32 here (the compiled fast paths' condition)."""
    return (_override.get() or _default) == "ieee"


def backend_for(backend, dtype: np.dtype):
    """The functions computing a call whose result has ``dtype``: ``backend`` itself, or the
    current mode's composition of its float32 functions."""
    if dtype != _FLOAT32:
        return backend
    mode = _override.get() or _default
    if mode == "bf16":
        return _Bf16(backend)
    if mode == "bf16x3":
        return _Bf16x3(backend)
    return backend


def _sum(*terms):
    """The sum of the non-None ``terms`` (float32, left to right); None if all are None."""
    total = None
    with np.errstate(all="ignore"):
        for term in terms:
            if term is not None:
                total = term if total is None else total + term
    return total


def _add_bias(y, bias):
    if bias is not None:
        with np.errstate(all="ignore"):
            y += bias
    return y


class _Mode:
    """A backend's contract (``_numpy_backend``) computed from the backend's own functions."""

    keeps_t = False

    def __init__(self, backend):
        self.backend = backend

    def bilinear_kept_elements(self, n_samples, in1, in2, out_features, dtype) -> int:
        return self.backend.bilinear_kept_elements(n_samples, in1, in2, out_features, dtype)

    def _grad_bias(self, linear: bool, grad, *inputs):
        """The bias gradient of ``"ieee"``: the backend's float32 sum of ``grad``, no product."""
        if linear:
            return self.backend.linear_backward(grad, *inputs, False, False, True)[2]
        return self.backend.bilinear_backward(grad, *inputs, False, False, False, True)[3]


class _Bf16(_Mode):
    """``"bf16"``: the factors rounded to bfloat16, products and sums as float32."""

    def linear_forward(self, x, weight, bias):
        r = _bf16.round_float32
        if _bf16_kernel.takes_modes(self.backend):
            return _add_bias(_bf16_kernel.products([(r(x), r(weight))]), bias)
        return self.backend.linear_forward(r(x), r(weight), bias)

    def linear_backward(self, grad, x, weight, need_x, need_weight, need_bias):
        r = _bf16.round_float32
        grad_x, grad_weight = None, None
        if (need_x or need_weight) and _bf16_kernel.takes_modes(self.backend):
            g = r(grad)
            if need_x:
                grad_x = _bf16_kernel.products([(g, r(weight).T)])
            if need_weight:
                grad_weight = _bf16_kernel.products([(g.T, r(x).T)])
        elif need_x or need_weight:
            grad_x, grad_weight, _ = self.backend.linear_backward(
                r(grad), r(x), r(weight), need_x, need_weight, False
            )
        grad_bias = self._grad_bias(True, grad, x, weight) if need_bias else None
        return grad_x, grad_weight, grad_bias

    def bilinear_forward(self, x1, x2, weight, bias, kept=None):
        r = _bf16.round_float32
        return self.backend.bilinear_forward(r(x1), r(x2), r(weight), bias)

    def bilinear_backward(
        self, grad, x1, x2, weight, need_x1, need_x2, need_weight, need_bias, kept=None
    ):
        r = _bf16.round_float32
        grads = [None, None, None]
        if need_x1 or need_x2 or need_weight:
            grads = list(
                self.backend.bilinear_backward(
                    r(grad), r(x1), r(x2), r(weight), need_x1, need_x2, need_weight, False
                )[:3]
            )
        grad_bias = self._grad_bias(False, grad, x1, x2, weight) if need_bias else None
        return (*grads, grad_bias)


class _Bf16x3(_Mode):
    """``"bf16x3"``: each factor as ``hi + lo`` (two bfloat16 values); the terms with at most
    one ``lo``, each a product of bfloat16 values summed in float32."""

    def linear_forward(self, x, weight, bias):
        (xh, xl), (wh, wl) = _bf16.split_float32(x), _bf16.split_float32(weight)
        if _bf16_kernel.takes_modes(self.backend):
            # The large term first, then the small ones, in one float32 sum.
            y = _bf16_kernel.products([(xh, wh), (xh, wl), (xl, wh)])
            return _add_bias(y, bias)
        f = self.backend.linear_forward
        # The small terms first, then the large one with the bias.
        return _sum(f(xh, wl, None), f(xl, wh, None), f(xh, wh, bias))

    def linear_backward(self, grad, x, weight, need_x, need_weight, need_bias):
        (gh, gl), (xh, xl) = _bf16.split_float32(grad), _bf16.split_float32(x)
        wh, wl = _bf16.split_float32(weight)
        grad_x, grad_weight = None, None
        if (need_x or need_weight) and _bf16_kernel.takes_modes(self.backend):
            p = _bf16_kernel.products
            if need_x:
                grad_x = p([(gh, wh.T), (gh, wl.T), (gl, wh.T)])
            if need_weight:
                grad_weight = p([(gh.T, xh.T), (gh.T, xl.T), (gl.T, xh.T)])
        elif need_x or need_weight:
            b = self.backend.linear_backward
            # grad_x = g @ w and grad_weight = g.T @ x: (gh, xl, wl) gives gh*wl and gh*xl.
            small_h = b(gh, xl, wl, need_x, need_weight, False)
            small_l = b(gl, xh, wh, need_x, need_weight, False)
            large = b(gh, xh, wh, need_x, need_weight, False)
            grad_x = _sum(small_h[0], small_l[0], large[0])
            grad_weight = _sum(small_h[1], small_l[1], large[1])
        grad_bias = self._grad_bias(True, grad, x, weight) if need_bias else None
        return grad_x, grad_weight, grad_bias

    def bilinear_forward(self, x1, x2, weight, bias, kept=None):
        (ah, al), (bh, bl) = _bf16.split_float32(x1), _bf16.split_float32(x2)
        wh, wl = _bf16.split_float32(weight)
        f = self.backend.bilinear_forward
        return _sum(
            f(al, bh, wh, None), f(ah, bl, wh, None), f(ah, bh, wl, None), f(ah, bh, wh, bias)
        )

    def bilinear_backward(
        self, grad, x1, x2, weight, need_x1, need_x2, need_weight, need_bias, kept=None
    ):
        gh, gl = _bf16.split_float32(grad)
        (ah, al), (bh, bl) = _bf16.split_float32(x1), _bf16.split_float32(x2)
        wh, wl = _bf16.split_float32(weight)
        grads = [None, None, None]
        if need_x1 or need_x2 or need_weight:
            b = self.backend.bilinear_backward
            # Each gradient is a product of three of (grad, x1, x2, weight); a call with one
            # factor's lo gives, for the gradients that use that factor, its terms with that lo.
            terms = [
                b(gl, ah, bh, wh, need_x1, need_x2, need_weight, False),
                b(gh, al, bh, wh, False, need_x2, need_weight, False),
                b(gh, ah, bl, wh, need_x1, False, need_weight, False),
                b(gh, ah, bh, wl, need_x1, need_x2, False, False),
                b(gh, ah, bh, wh, need_x1, need_x2, need_weight, False),
            ]
            grads = [_sum(*(t[i] for t in terms)) for i in range(3)]
        grad_bias = self._grad_bias(False, grad, x1, x2, weight) if need_bias else None
        return (*grads, grad_bias)
