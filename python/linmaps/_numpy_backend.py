"""The pure-NumPy backend: the fallback when ``linmaps._core`` is absent, and the test oracle.

Every function receives arrays already validated by the front (``linmaps._api``): C-contiguous,
one dtype (float32 or float64), shapes consistent, batch dimensions flattened to 2-D, and a 3-D
bilinear weight. Each returns new arrays and never writes to its inputs.

The work is done in large matrix products (BLAS via ``numpy.matmul``), following the
reformulation of ``docs/spec.md`` section 4, grouped exactly as the compiled backend
groups it (``csrc/bilinear.cpp``): ``P`` is the wider input (``x2`` when ``in2 > in1``, the
"swapped" case, else ``x1``) and ``Q`` the other, ``p`` and ``q`` their widths, and
``A_hat (p, L*q)`` holds ``A[l]`` (or ``A[l].T`` when swapped) in columns ``l*q : (l+1)*q``:

* ``T = P @ A_hat`` and ``Z[k, l] = sum_j T[k, l*q + j] * Q[k, j]``;
* ``W[k, l*q + j] = dZ[k, l] * Q[k, j]``, ``dA_hat = P.T @ W``, ``dP = W @ A_hat.T``;
* ``dQ[k, j] = sum_l dZ[k, l] * T[k, l*q + j]``.

For finite inputs the grouping changes only rounding. With infinities it decides between NaN
and Inf (``inf * 0`` inside ``T`` or outside it), so both backends must group alike: this
backend is the oracle the compiled one is tested against (``docs/derivation.md``).

``T`` and ``W`` have ``L*q`` columns per sample, so the batch is processed in row blocks whose
intermediates hold at most ``_WORKSPACE_ELEMENTS`` numbers: memory stays bounded for any N.

A forward given a ``kept`` buffer (``bilinear_kept_elements`` long) also keeps ``T`` there,
and a backward given it reads ``T`` instead of computing it again, as the compiled backend does:
each row block of ``T`` is the same matrix product either way, so the gradients are the same.
"""

from __future__ import annotations

import functools

import numpy as np

# 2**21 numbers: 8 MiB in float32, 16 MiB in float64, per intermediate. Large enough that each
# block is still one big, efficient matrix product; small enough that N = 65536 samples with
# L*n = 4096 do not allocate gigabytes.
_WORKSPACE_ELEMENTS = 1 << 21


def _ieee(function):
    """NaN and Inf propagate silently, as in the compiled backend: no NumPy FP warnings."""

    @functools.wraps(function)
    def wrapper(*args):
        with np.errstate(all="ignore"):
            return function(*args)

    return wrapper


def _row_blocks(n_rows: int, row_width: int):
    rows = max(1, _WORKSPACE_ELEMENTS // max(1, row_width))
    for start in range(0, n_rows, rows):
        yield slice(start, min(n_rows, start + rows))


def _grouping(x1: np.ndarray, x2: np.ndarray, weight: np.ndarray):
    """``(swapped, P, Q, A_hat)``: the grouping of the compiled backend (``csrc/bilinear.cpp``).

    ``P`` is the wider input (``x2`` when ``in2 > in1``: "swapped") and ``Q`` the other;
    ``A_hat (p, L*q)`` has ``A_hat[i, l*q + j] = A[l, i, j]``, or ``A[l, j, i]`` when swapped.
    """
    out_features, in1, in2 = weight.shape
    if in2 > in1:
        a_hat = np.ascontiguousarray(weight.transpose(2, 0, 1)).reshape(in2, out_features * in1)
        return True, x2, x1, a_hat
    a_hat = np.ascontiguousarray(weight.transpose(1, 0, 2)).reshape(in1, out_features * in2)
    return False, x1, x2, a_hat


@_ieee
def linear_forward(x, weight, bias):
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


@_ieee
def linear_backward(grad, x, weight, need_x, need_weight, need_bias):
    grad_x = grad @ weight if need_x else None
    grad_weight = grad.T @ x if need_weight else None
    grad_bias = grad.sum(axis=0) if need_bias else None
    return grad_x, grad_weight, grad_bias


def bilinear_kept_elements(n_samples, in1, in2, out_features, dtype) -> int:
    """Length of the buffer a forward keeps ``T (n_samples, out_features * q)`` in."""
    return n_samples * out_features * min(in1, in2)


def _kept_t(kept, n_samples, width):
    """``T`` as the (n_samples, width) matrix at the start of the 1-D ``kept`` buffer."""
    return kept[: n_samples * width].reshape(n_samples, width)


@_ieee
def bilinear_forward(x1, x2, weight, bias, kept=None):
    n_samples = x1.shape[0]
    out_features = weight.shape[0]
    _, p_in, q_in, a_hat = _grouping(x1, x2, weight)
    q = q_in.shape[1]
    z = np.empty((n_samples, out_features), dtype=x1.dtype)
    kept_t = None if kept is None else _kept_t(kept, n_samples, out_features * q)
    for rows in _row_blocks(n_samples, out_features * q):
        t = np.matmul(p_in[rows], a_hat, out=None if kept_t is None else kept_t[rows])
        t = t.reshape(len(p_in[rows]), out_features, q)
        np.matmul(t, q_in[rows, :, None], out=z[rows, :, None])
    if bias is not None:
        z += bias
    return z


@_ieee
def bilinear_backward(grad, x1, x2, weight, need_x1, need_x2, need_weight, need_bias, kept=None):
    n_samples = x1.shape[0]
    out_features = weight.shape[0]
    dtype = x1.dtype
    swapped, p_in, q_in, a_hat = _grouping(x1, x2, weight)
    p, q = p_in.shape[1], q_in.shape[1]
    need_p, need_q = (need_x2, need_x1) if swapped else (need_x1, need_x2)
    grad_p = np.empty((n_samples, p), dtype=dtype) if need_p else None
    grad_q = np.empty((n_samples, q), dtype=dtype) if need_q else None
    grad_a_hat = np.zeros((p, out_features * q), dtype=dtype) if need_weight else None
    kept_t = None if kept is None else _kept_t(kept, n_samples, out_features * q)
    if need_p or need_q or need_weight:
        for rows in _row_blocks(n_samples, out_features * q):
            g = grad[rows]
            if need_p or need_weight:
                w = (g[:, :, None] * q_in[rows, None, :]).reshape(len(g), out_features * q)
                if need_weight:
                    grad_a_hat += p_in[rows].T @ w
                if need_p:
                    np.matmul(w, a_hat.T, out=grad_p[rows])
            if need_q:
                t = p_in[rows] @ a_hat if kept_t is None else kept_t[rows]
                t = t.reshape(len(g), out_features, q)
                np.matmul(g[:, None, :], t, out=grad_q[rows, None, :])
    grad_weight = None
    if need_weight:
        # dA_hat[i, l*q + j] back to (L, in1, in2): dA[l, i, j], or dA[l, j, i] when swapped.
        axes = (1, 2, 0) if swapped else (1, 0, 2)
        grad_weight = np.ascontiguousarray(grad_a_hat.reshape(p, out_features, q).transpose(axes))
    grad_x1, grad_x2 = (grad_q, grad_p) if swapped else (grad_p, grad_q)
    grad_bias = grad.sum(axis=0) if need_bias else None
    return grad_x1, grad_x2, grad_weight, grad_bias
