"""The pure-NumPy backend: the fallback when ``linmaps._core`` is absent, and the test oracle.

Every function receives arrays already validated by the front (``linmaps._api``): C-contiguous,
one dtype (float32 or float64), shapes consistent, batch dimensions flattened to 2-D, and a 3-D
bilinear weight. Each returns new arrays and never writes to its inputs.

The work is done in large matrix products (BLAS via ``numpy.matmul``), following the
reformulation of ``shared/spec/maps.md`` section 4: with ``A_hat[i, l*n + j] = A[l, i, j]``,

* ``T = X1 @ A_hat`` and ``Z[k, l] = sum_j T[k, l*n + j] * X2[k, j]``;
* ``W[k, l*n + j] = dZ[k, l] * X2[k, j]``, ``dA_hat = X1.T @ W``, ``dX1 = W @ A_hat.T``;
* ``dX2[k, j] = sum_l dZ[k, l] * T[k, l*n + j]``.

``T`` and ``W`` have ``L*n`` columns per sample, so the batch is processed in row blocks whose
intermediates hold at most ``_WORKSPACE_ELEMENTS`` numbers: memory stays bounded for any N.
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


def _weight_hat(weight: np.ndarray) -> np.ndarray:
    """``A (L, m, n)`` as ``A_hat (m, L*n)`` with ``A_hat[i, l*n + j] = A[l, i, j]``."""
    out_features, in1, in2 = weight.shape
    return np.ascontiguousarray(weight.transpose(1, 0, 2)).reshape(in1, out_features * in2)


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


@_ieee
def bilinear_forward(x1, x2, weight, bias):
    n_samples = x1.shape[0]
    out_features, _, in2 = weight.shape
    a_hat = _weight_hat(weight)
    z = np.empty((n_samples, out_features), dtype=x1.dtype)
    for rows in _row_blocks(n_samples, out_features * in2):
        t = (x1[rows] @ a_hat).reshape(len(x1[rows]), out_features, in2)
        np.matmul(t, x2[rows, :, None], out=z[rows, :, None])
    if bias is not None:
        z += bias
    return z


@_ieee
def bilinear_backward(grad, x1, x2, weight, need_x1, need_x2, need_weight, need_bias):
    n_samples, in1 = x1.shape
    out_features, _, in2 = weight.shape
    dtype = x1.dtype
    a_hat = _weight_hat(weight)
    grad_x1 = np.empty((n_samples, in1), dtype=dtype) if need_x1 else None
    grad_x2 = np.empty((n_samples, in2), dtype=dtype) if need_x2 else None
    grad_a_hat = np.zeros((in1, out_features * in2), dtype=dtype) if need_weight else None
    if need_x1 or need_x2 or need_weight:
        for rows in _row_blocks(n_samples, out_features * in2):
            g = grad[rows]
            if need_x1 or need_weight:
                w = (g[:, :, None] * x2[rows, None, :]).reshape(len(g), out_features * in2)
                if need_weight:
                    grad_a_hat += x1[rows].T @ w
                if need_x1:
                    np.matmul(w, a_hat.T, out=grad_x1[rows])
            if need_x2:
                t = (x1[rows] @ a_hat).reshape(len(x1[rows]), out_features, in2)
                np.matmul(g[:, None, :], t, out=grad_x2[rows, None, :])
    grad_weight = None
    if need_weight:
        grad_weight = np.ascontiguousarray(
            grad_a_hat.reshape(in1, out_features, in2).transpose(1, 0, 2)
        )
    grad_bias = grad.sum(axis=0) if need_bias else None
    return grad_x1, grad_x2, grad_weight, grad_bias
