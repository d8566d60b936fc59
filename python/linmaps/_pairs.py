"""The all-pairs bilinear map (biaffine scores): every row of ``x1`` against every row of ``x2``.

``S[..., i, j, o] = sum_{a,c} x1[..., i, a] weight[o, a, c] x2[..., j, c] + bias[o]``.

As in ``_api``: arguments are validated (``_validation``), brought to one dtype and a
C-contiguous 3-D layout ``(batch, rows, features)``, passed to the active backend (the
compiled ``_core.bilinear_pairs_*`` or ``_numpy_pairs``) and returned in the caller's batch
shape and dtype. float16 is computed in float32 and rounded once at the end.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend, _numpy_pairs
from . import _validation as v
from ._api import BilinearGrads, _check_bilinear_operands, _restore, _shapes
from ._layers import _check_bool, _check_size, _Layer

__all__ = ["BilinearPairs", "bilinear_pairs", "bilinear_pairs_backward"]


def _check_pairs(fname, x1, x2, weight):
    for name, array in (("input1", x1), ("input2", x2)):
        if array.ndim < 2:
            raise ValueError(
                f"{fname}(): {name} must have at least 2 dimensions (..., rows, features), "
                f"got shape {array.shape}"
            )
    _check_bilinear_operands(fname, x1, x2, weight, x1.shape[:-2], x2.shape[:-2])


def _as_3d(array, work):
    """``array (..., rows, features)`` as C-contiguous ``(batch, rows, features)`` in ``work``."""
    if array.ndim != 3:
        array = array.reshape((math.prod(array.shape[:-2]),) + array.shape[-2:])
    return v.contiguous(array, work)


def _output_shape(x1, x2, weight):
    return x1.shape[:-1] + (x2.shape[-2],) + weight.shape[:-2]


def _weight_3d(weight, work):
    in1, in2 = weight.shape[-2:]
    return v.contiguous(weight.reshape(math.prod(weight.shape[:-2]), in1, in2), work)


def _current():
    """The compiled kernels when the active backend is ``"cpp"``, else the NumPy backend."""
    if _backend.get_backend() == "cpp":
        core = _backend._cpp_backend._core
        return core.bilinear_pairs_forward, core.bilinear_pairs_backward
    return _numpy_pairs.pairs_forward, _numpy_pairs.pairs_backward


def bilinear_pairs(x1, x2, weight, bias=None):
    """Bilinear scores of every pair of rows: ``S[..., i, j, :] = bilinear(x1[..., i, :],
    x2[..., j, :], weight, bias)``.

    ``S[..., i, j, o] = sum_{a,c} x1[..., i, a] weight[o, a, c] x2[..., j, c] + bias[o]``: the
    biaffine scorer of dependency parsers (with ones appended to the inputs), computed without
    forming the pairs.

    Parameters
    ----------
    x1 : array_like, shape (..., I, in1_features)
    x2 : array_like, shape (..., J, in2_features)
        Same leading (batch) shape as ``x1``; ``I`` and ``J`` may differ.
    weight : array_like, shape (out_features, in1_features, in2_features) or (in1, in2)
    bias : array_like, shape (out_features,) (or () for a 2-D weight), optional

    Returns
    -------
    S : ndarray, shape (..., I, J, out_features), or (..., I, J) for a 2-D weight
        In the promoted dtype of the arguments (float32, float64 or float16; bool and integer
        arrays count as float64).

    Raises
    ------
    ValueError
        If the shapes do not fit together.
    TypeError
        If an argument has an unsupported dtype.
    """
    fname = "bilinear_pairs"
    x1 = v.as_array(fname, "input1", x1)
    x2 = v.as_array(fname, "input2", x2)
    weight = v.as_array(fname, "weight", weight)
    _check_pairs(fname, x1, x2, weight)
    out_shape = weight.shape[:-2]
    arrays = [x1, x2, weight]
    if bias is not None:
        bias = v.as_array(fname, "bias", bias)
        v.check_bias(fname, bias, out_shape, weight.shape)
        arrays.append(bias)
    dtype = v.result_dtype(*arrays)
    work = v.compute_dtype(dtype)
    forward, _ = _current()
    s = forward(
        _as_3d(x1, work),
        _as_3d(x2, work),
        _weight_3d(weight, work),
        None if bias is None else v.contiguous(bias.reshape(math.prod(out_shape)), work),
    )
    return _restore(s, _output_shape(x1, x2, weight), dtype)


def bilinear_pairs_backward(
    grad_out, x1, x2, weight, *, bias=True, need_x1=True, need_x2=True, need_weight=True
):
    """Gradients of :func:`bilinear_pairs` given ``grad_out = dL/dS``.

    With ``g = grad_out``: ``grad_x1[i] = sum_{j,o} g[i, j, o] weight[o] @ x2[j]``,
    ``grad_x2[j] = sum_{i,o} g[i, j, o] x1[i] @ weight[o]``,
    ``grad_weight[o] = sum_{batch,i,j} g[i, j, o] outer(x1[i], x2[j])`` and
    ``grad_bias = grad_out`` summed over every axis but the last.

    Parameters
    ----------
    grad_out : array_like, shape (..., I, J, out_features), or (..., I, J) for a 2-D weight
    x1, x2, weight
        The forward's arguments.
    bias : bool, default True
        Whether to compute ``grad_bias``.
    need_x1, need_x2, need_weight : bool, default True
        Whether to compute each gradient; one not asked for costs nothing and is None.

    Returns
    -------
    BilinearGrads
        ``(grad_x1, grad_x2, grad_weight, grad_bias)`` shaped like ``x1``, ``x2``, ``weight``
        and ``weight.shape[:-2]``, each None when not requested.
    """
    fname = "bilinear_pairs_backward"
    need_bias = v.check_flag(fname, "bias", bias)
    need_x1 = v.check_flag(fname, "need_x1", need_x1)
    need_x2 = v.check_flag(fname, "need_x2", need_x2)
    need_weight = v.check_flag(fname, "need_weight", need_weight)
    grad_out = v.as_array(fname, "grad_out", grad_out)
    x1 = v.as_array(fname, "input1", x1)
    x2 = v.as_array(fname, "input2", x2)
    weight = v.as_array(fname, "weight", weight)
    _check_pairs(fname, x1, x2, weight)
    v.check_grad_out(
        fname,
        grad_out,
        _output_shape(x1, x2, weight),
        _shapes(input1=x1, input2=x2, weight=weight),
    )
    dtype = v.result_dtype(grad_out, x1, x2, weight)
    work = v.compute_dtype(dtype)
    x1c = _as_3d(x1, work)
    x2c = _as_3d(x2, work)
    out_shape = weight.shape[:-2]
    out_features = math.prod(out_shape)
    grad = v.contiguous(np.reshape(grad_out, x1c.shape[:2] + (x2c.shape[1], out_features)), work)
    _, backward = _current()
    grad_x1, grad_x2, grad_weight, grad_bias = backward(
        grad, x1c, x2c, _weight_3d(weight, work), need_x1, need_x2, need_weight, need_bias
    )
    return BilinearGrads(
        _restore(grad_x1, x1.shape, dtype),
        _restore(grad_x2, x2.shape, dtype),
        _restore(grad_weight, weight.shape, dtype),
        _restore(grad_bias, out_shape, dtype),
    )


# ----------------------------------------------------------------------------- layer


class BilinearPairs(_Layer):
    """All-pairs bilinear map ``S[..., i, j, o] = x1[..., i, :] @ weight[o] @ x2[..., j, :] +
    bias[o]`` with parameters and gradients: the biaffine scorer of dependency parsers.

    Parameters
    ----------
    in1_features, in2_features : int
        Size of the last dimension of each input.
    out_features : int
        Number of scores per pair (the last dimension of the output).
    bias : bool, default True
        Whether the layer has an additive bias ``(out_features,)``.
    bias_x, bias_y : bool, default False
        Append a column of ones to ``x1`` (``x2``) before the product, as the biaffine scorer
        does: the weight then has ``in1_features + 1`` (``in2_features + 1``) rows (columns),
        the last of which scores each row of the other input on its own.
    dtype, seed, rng, copy_inputs
        As for :class:`Bilinear`.

    Attributes
    ----------
    weight : ndarray, shape (out_features, in1_features + bias_x, in2_features + bias_y)
        Initialised from U(-k, k), ``k = 1/sqrt(in1_features + bias_x)``, as ``Bilinear``.
    bias : ndarray, shape (out_features,), or None
    grad_weight, grad_bias : ndarray
        Gradient accumulators, initially zero.

    Examples
    --------
    >>> layer = BilinearPairs(4, 4, 2, bias_x=True, bias_y=True, seed=0)
    >>> s = layer(np.ones((3, 5, 4)), np.ones((3, 6, 4)))   # (3, 5, 6, 2), float32
    >>> grad_x1, grad_x2 = layer.backward(np.ones_like(s))
    >>> layer.grad_weight.shape
    (2, 5, 5)
    """

    def __init__(
        self,
        in1_features: int,
        in2_features: int,
        out_features: int,
        bias: bool = True,
        bias_x: bool = False,
        bias_y: bool = False,
        *,
        dtype=np.float32,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        copy_inputs: bool = True,
    ):
        where = "BilinearPairs()"
        self.in1_features = _check_size(where, "in1_features", in1_features)
        self.in2_features = _check_size(where, "in2_features", in2_features)
        self.out_features = _check_size(where, "out_features", out_features)
        self.bias_x = _check_bool(where, "bias_x", bias_x)
        self.bias_y = _check_bool(where, "bias_y", bias_y)
        rows, cols = self.in1_features + self.bias_x, self.in2_features + self.bias_y
        shapes = {"weight": (self.out_features, rows, cols)}
        if _check_bool(where, "bias", bias):
            shapes["bias"] = (self.out_features,)
        super().__init__(shapes, rows, dtype, seed, rng, copy_inputs)

    def _input(self, where, name, value, features_name, ones, keep):
        array = self._checked_input(where, name, value, features_name)
        if array.ndim < 2:
            raise ValueError(
                f"{where}(): {name} must have at least 2 dimensions (..., rows, "
                f"{features_name}), got shape {array.shape}"
            )
        if not ones:
            return self._converted(array, keep)
        # A new array with the ones column: private whatever copy_inputs says.
        widened = np.empty(array.shape[:-1] + (array.shape[-1] + 1,), self._dtype)
        v.copy_into(widened[..., :-1], array)
        widened[..., -1] = 1
        return widened

    def forward(self, x1, x2, *, save_for_backward: bool = True) -> np.ndarray:
        """Compute the scores of every pair and keep the inputs for ``backward``.

        Parameters
        ----------
        x1 : array_like, shape (..., I, in1_features)
        x2 : array_like, shape (..., J, in2_features)
            Same leading (batch) shape as ``x1``; converted to the layer's dtype.
        save_for_backward : bool, default True
            Keep the inputs (until the next forward) for ``backward``; False is for inference.

        Returns
        -------
        S : ndarray, shape (..., I, J, out_features), the layer's dtype
        """
        where = "BilinearPairs.forward"
        save = _check_bool(where + "()", "save_for_backward", save_for_backward)
        self._saved = None
        x1 = self._input(where, "input1", x1, "in1_features", self.bias_x, save)
        x2 = self._input(where, "input2", x2, "in2_features", self.bias_y, save)
        s = bilinear_pairs(x1, x2, self.weight, self.bias)
        if save:
            self._saved = (x1, x2)
        return s

    def __call__(self, x1, x2, *, save_for_backward: bool = True) -> np.ndarray:
        """Same as ``forward``."""
        return self.forward(x1, x2, save_for_backward=save_for_backward)

    def backward(self, grad_out, *, need_x1: bool = True, need_x2: bool = True) -> tuple:
        """Back-propagate ``grad_out = dL/dS`` of the last forward: adds the parameter
        gradients to ``grad_weight`` / ``grad_bias`` (skipping frozen parameters; they
        accumulate until ``zero_grad()``) and returns ``(grad_x1, grad_x2)`` (None where not
        asked for), shaped like the inputs as given (without the ones columns)."""
        where = "BilinearPairs.backward"
        need_x1 = _check_bool(where + "()", "need_x1", need_x1)
        need_x2 = _check_bool(where + "()", "need_x2", need_x2)
        x1, x2 = self._saved_inputs(where)
        expected = x1.shape[:-1] + (x2.shape[-2], self.out_features)
        grad_out = self._grad_out(where, grad_out, expected)
        grads = bilinear_pairs_backward(
            grad_out,
            x1,
            x2,
            self.weight,
            bias=self._needs_grad("bias"),
            need_x1=need_x1,
            need_x2=need_x2,
            need_weight=self._needs_grad("weight"),
        )
        self._accumulate({"weight": grads.grad_weight, "bias": grads.grad_bias})
        grad_x1, grad_x2 = grads.grad_x1, grads.grad_x2
        if grad_x1 is not None and self.bias_x:
            grad_x1 = np.ascontiguousarray(grad_x1[..., :-1])
        if grad_x2 is not None and self.bias_y:
            grad_x2 = np.ascontiguousarray(grad_x2[..., :-1])
        return grad_x1, grad_x2

    def __repr__(self) -> str:
        return (
            f"BilinearPairs(in1_features={self.in1_features}, "
            f"in2_features={self.in2_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bias_x={self.bias_x}, bias_y={self.bias_y}, "
            f"dtype={self._dtype.name})"
        )
