"""The pure-NumPy backend of the all-pairs bilinear map: the fallback and the test oracle.

Arrays arrive validated (``linmaps._pairs``): C-contiguous, one dtype (float32 or float64),
``x1 (B, I, in1)``, ``x2 (B, J, in2)``, ``weight (out, in1, in2)``, ``grad (B, I, J, out)``.
The products are grouped as the compiled kernels group them (``csrc/pairs.cpp``), with
``Wf = weight`` read as ``(out*in1, in2)``:

* ``V = x2[b] @ Wf.T`` (``J x out*in1``, read as ``J*out x in1``), ``S[b] = x1[b] @ V.T``;
* ``dx1 = G @ V``, ``dV = G.T @ x1[b]``, ``dx2 = dV @ Wf``, ``dWf = sum_b dV.T @ x2[b]``,

with ``G = grad[b]`` read as ``(I, J*out)``. The batch is processed in chunks whose ``V``
holds at most ``_WORKSPACE_ELEMENTS`` numbers, so memory stays bounded for any batch.
"""

from __future__ import annotations

import numpy as np

from ._numpy_backend import _WORKSPACE_ELEMENTS, _ieee


def _chunks(batch: int, per_entry: int):
    size = max(1, _WORKSPACE_ELEMENTS // max(1, per_entry))
    for start in range(0, batch, size):
        yield slice(start, min(batch, start + size))


@_ieee
def pairs_forward(x1, x2, weight, bias):
    batch, rows1, in1 = x1.shape
    rows2, in2 = x2.shape[1:]
    out = weight.shape[0]
    wf = weight.reshape(out * in1, in2)
    s = np.empty((batch, rows1, rows2 * out), dtype=x1.dtype)
    for b in _chunks(batch, rows2 * out * in1):
        v = (x2[b] @ wf.T).reshape(b.stop - b.start, rows2 * out, in1)
        np.matmul(x1[b], v.transpose(0, 2, 1), out=s[b])
    s = s.reshape(batch, rows1, rows2, out)
    if bias is not None:
        s += bias
    return s


@_ieee
def pairs_backward(grad, x1, x2, weight, need_x1, need_x2, need_weight, need_bias):
    batch, rows1, in1 = x1.shape
    rows2, in2 = x2.shape[1:]
    out = weight.shape[0]
    dtype = x1.dtype
    wf = weight.reshape(out * in1, in2)
    g = grad.reshape(batch, rows1, rows2 * out)
    grad_x1 = np.empty(x1.shape, dtype) if need_x1 else None
    grad_x2 = np.empty(x2.shape, dtype) if need_x2 else None
    grad_wf = np.zeros((out * in1, in2), dtype) if need_weight else None
    for b in _chunks(batch, rows2 * out * in1):
        n = b.stop - b.start
        if need_x1:
            v = (x2[b] @ wf.T).reshape(n, rows2 * out, in1)
            np.matmul(g[b], v, out=grad_x1[b])
        if need_x2 or need_weight:
            dv = (g[b].transpose(0, 2, 1) @ x1[b]).reshape(n, rows2, out * in1)
            if need_x2:
                np.matmul(dv, wf, out=grad_x2[b])
            if need_weight:
                grad_wf += dv.reshape(n * rows2, out * in1).T @ x2[b].reshape(n * rows2, in2)
    grad_weight = None if grad_wf is None else grad_wf.reshape(weight.shape)
    grad_bias = grad.reshape(batch * rows1 * rows2, out).sum(axis=0) if need_bias else None
    return grad_x1, grad_x2, grad_weight, grad_bias
