"""The functional API: forward and backward of linear and bilinear maps on NumPy arrays.

Each function validates its arguments (``_validation``), brings them to one dtype and a
C-contiguous 2-D layout, calls the active backend (``_backend``) and restores the caller's
batch shape and dtype. The formulas are those of ``shared/spec/maps.md``; see
``docs/derivation.md`` for the map from each formula to the code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _backend
from . import _validation as v

__all__ = [
    "BilinearGrads",
    "LinearGrads",
    "bilinear",
    "bilinear_backward",
    "linear",
    "linear_backward",
]


class LinearGrads(NamedTuple):
    """Gradients of a linear map; an entry is None when it was not requested."""

    grad_x: np.ndarray | None
    grad_weight: np.ndarray | None
    grad_bias: np.ndarray | None


class BilinearGrads(NamedTuple):
    """Gradients of a bilinear map; an entry is None when it was not requested."""

    grad_x1: np.ndarray | None
    grad_x2: np.ndarray | None
    grad_weight: np.ndarray | None
    grad_bias: np.ndarray | None


class _Shapes:
    """The arguments' shapes for an error message, formatted only if an error is raised."""

    __slots__ = ("arrays",)

    def __init__(self, **arrays):
        self.arrays = arrays

    def __str__(self) -> str:
        return ", ".join(f"{name} shape {a.shape}" for name, a in self.arrays.items())


_shapes = _Shapes


def _flat(array, features):
    """``array (..., features)`` as 2-D ``(batch, features)``; explicit so 0-sized dims work."""
    if array.ndim == 2:
        return array
    return array.reshape(math.prod(array.shape[:-1]), features)


def _restore(array, shape, dtype):
    """A backend result in the caller's batch shape and result dtype.

    The only cast here rounds a float32 result to float16; like float32 and float64
    arithmetic it overflows to inf silently (``_validation.contiguous``), whatever
    ``numpy.errstate`` says.
    """
    if array is None:
        return None
    if array.shape != shape:
        array = array.reshape(shape)
    return v.contiguous(array, dtype)


# ----------------------------------------------------------------------------- linear


def _check_linear(fname, x, weight):
    v.check_at_least_1d(fname, "input", x)
    if weight.ndim != 2:
        raise ValueError(
            f"{fname}(): weight must be 2-D (out_features, in_features), got shape {weight.shape}"
        )
    v.check_features(fname, "input", x.shape[-1], weight.shape[1], _shapes(input=x, weight=weight))


def linear(x, weight, bias=None):
    """Apply the linear map ``y = x @ weight.T + bias`` (``torch.nn.functional.linear``).

    Parameters
    ----------
    x : array_like, shape (..., in_features)
        Input; any number of leading batch dimensions, or none.
    weight : array_like, shape (out_features, in_features)
    bias : array_like, shape (out_features,), optional

    Returns
    -------
    y : ndarray, shape (..., out_features)
        In the promoted dtype of the arguments (float32, float64 or float16; bool and
        integer arrays count as float64).

    Raises
    ------
    ValueError
        If the shapes do not fit together.
    TypeError
        If an argument has a complex, object, string or other unsupported dtype.
    """
    # Fast path, as in bilinear(): exact arguments go straight to the compiled kernel.
    fast = _backend.fast_core
    if fast is not None and (_backend._override.get() or _backend._default) == "cpp":
        y = fast.linear_forward_fast(x, weight, bias)
        if y is not None:
            return y
    fname = "linear"
    x = v.as_array(fname, "input", x)
    weight = v.as_array(fname, "weight", weight)
    _check_linear(fname, x, weight)
    out_features, in_features = weight.shape
    arrays = [x, weight]
    if bias is not None:
        bias = v.as_array(fname, "bias", bias)
        v.check_bias(fname, bias, (out_features,), weight.shape)
        arrays.append(bias)
    dtype = v.result_dtype(*arrays)
    work = v.compute_dtype(dtype)
    x2d = v.contiguous(_flat(x, in_features), work)
    y = _backend.current().linear_forward(
        x2d, v.contiguous(weight, work), None if bias is None else v.contiguous(bias, work)
    )
    return _restore(y, x.shape[:-1] + (out_features,), dtype)


def linear_backward(grad_out, x, weight, *, bias=True, need_x=True, need_weight=True):
    """Gradients of a linear map ``y = x @ weight.T + bias`` given ``grad_out = dL/dy``.

    ``grad_x = grad_out @ weight``, ``grad_weight = grad_out.T @ x`` and
    ``grad_bias = grad_out.sum(batch axes)`` (batch axes flattened).

    Parameters
    ----------
    grad_out : array_like, shape (..., out_features)
    x : array_like, shape (..., in_features)
        The input of the forward pass.
    weight : array_like, shape (out_features, in_features)
    bias : bool, default True
        Whether to compute ``grad_bias`` (set False when the map has no bias or it is frozen).
    need_x, need_weight : bool, default True
        Whether to compute ``grad_x`` / ``grad_weight``; a gradient not asked for costs nothing
        and is returned as None.

    Returns
    -------
    LinearGrads
        ``(grad_x (..., in_features), grad_weight (out_features, in_features),
        grad_bias (out_features,))``, each None when not requested.
    """
    fname = "linear_backward"
    need_bias = v.check_flag(fname, "bias", bias)
    need_x = v.check_flag(fname, "need_x", need_x)
    need_weight = v.check_flag(fname, "need_weight", need_weight)
    grad_out = v.as_array(fname, "grad_out", grad_out)
    x = v.as_array(fname, "input", x)
    weight = v.as_array(fname, "weight", weight)
    _check_linear(fname, x, weight)
    out_features, in_features = weight.shape
    v.check_grad_out(
        fname, grad_out, x.shape[:-1] + (out_features,), _shapes(input=x, weight=weight)
    )
    dtype = v.result_dtype(grad_out, x, weight)
    work = v.compute_dtype(dtype)
    grad_x, grad_weight, grad_bias = _backend.current().linear_backward(
        v.contiguous(_flat(grad_out, out_features), work),
        v.contiguous(_flat(x, in_features), work),
        v.contiguous(weight, work),
        need_x,
        need_weight,
        need_bias,
    )
    return LinearGrads(
        _restore(grad_x, x.shape, dtype),
        _restore(grad_weight, weight.shape, dtype),
        _restore(grad_bias, (out_features,), dtype),
    )


# ----------------------------------------------------------------------------- bilinear


def _check_bilinear(fname, x1, x2, weight):
    v.check_at_least_1d(fname, "input1", x1)
    v.check_at_least_1d(fname, "input2", x2)
    if weight.ndim not in (2, 3):
        raise ValueError(
            f"{fname}(): weight must be 3-D (out_features, in1_features, "
            f"in2_features) or 2-D (in1_features, in2_features), "
            f"got shape {weight.shape}"
        )
    shapes = _shapes(input1=x1, input2=x2, weight=weight)
    if x1.shape[:-1] != x2.shape[:-1]:
        raise ValueError(
            f"{fname}(): input batch dimensions do not match: got "
            f"{x1.shape[:-1]} and {x2.shape[:-1]} ({shapes})"
        )
    v.check_features(fname, "input1", x1.shape[-1], weight.shape[-2], shapes)
    v.check_features(fname, "input2", x2.shape[-1], weight.shape[-1], shapes)


def bilinear(x1, x2, weight, bias=None):
    """Apply the bilinear map ``z[..., l] = x1 @ weight[l] @ x2 + bias[l]``.

    Like ``torch.nn.functional.bilinear``. A 2-D ``weight`` is a single bilinear form
    ``z = x1 @ weight @ x2``, one scalar per sample.

    Parameters
    ----------
    x1 : array_like, shape (..., in1_features)
    x2 : array_like, shape (..., in2_features)
        Same leading (batch) shape as ``x1``.
    weight : array_like, shape (out_features, in1_features, in2_features) or (in1, in2)
    bias : array_like, shape (out_features,) (or () for a 2-D weight), optional

    Returns
    -------
    z : ndarray, shape (..., out_features), or (...) for a 2-D weight
        In the promoted dtype of the arguments.

    Raises
    ------
    ValueError
        If the shapes do not fit together.
    TypeError
        If an argument has an unsupported dtype.
    """
    # Fast path: arguments already exact C-contiguous float32/float64 ndarrays of one dtype and
    # fitting shapes go straight to the same compiled kernel (None otherwise: validate below).
    fast = _backend.fast_core
    if fast is not None and (_backend._override.get() or _backend._default) == "cpp":
        z = fast.bilinear_forward_fast(x1, x2, weight, bias)
        if z is not None:
            return z
    fname = "bilinear"
    x1 = v.as_array(fname, "input1", x1)
    x2 = v.as_array(fname, "input2", x2)
    weight = v.as_array(fname, "weight", weight)
    _check_bilinear(fname, x1, x2, weight)
    out_shape = weight.shape[:-2]
    in1, in2 = weight.shape[-2:]
    arrays = [x1, x2, weight]
    if bias is not None:
        bias = v.as_array(fname, "bias", bias)
        v.check_bias(fname, bias, out_shape, weight.shape)
        arrays.append(bias)
    dtype = v.result_dtype(*arrays)
    work = v.compute_dtype(dtype)
    out_features = math.prod(out_shape)
    z = _backend.current().bilinear_forward(
        v.contiguous(_flat(x1, in1), work),
        v.contiguous(_flat(x2, in2), work),
        v.contiguous(weight.reshape(out_features, in1, in2), work),
        None if bias is None else v.contiguous(bias.reshape(math.prod(out_shape)), work),
    )
    return _restore(z, x1.shape[:-1] + out_shape, dtype)


def bilinear_backward(
    grad_out, x1, x2, weight, *, bias=True, need_x1=True, need_x2=True, need_weight=True
):
    """Gradients of a bilinear map given ``grad_out = dL/dz``.

    With ``g_l = grad_out[..., l]``: ``grad_x1 = sum_l g_l * (x2 @ weight[l].T)``,
    ``grad_x2 = sum_l g_l * (x1 @ weight[l])``, ``grad_weight[l] = x1.T @ (g_l * x2)`` and
    ``grad_bias = grad_out.sum(batch axes)``.

    Parameters
    ----------
    grad_out : array_like, shape (..., out_features), or (...) for a 2-D weight
    x1 : array_like, shape (..., in1_features)
    x2 : array_like, shape (..., in2_features)
    weight : array_like, shape (out_features, in1_features, in2_features) or (in1, in2)
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
    fname = "bilinear_backward"
    need_bias = v.check_flag(fname, "bias", bias)
    need_x1 = v.check_flag(fname, "need_x1", need_x1)
    need_x2 = v.check_flag(fname, "need_x2", need_x2)
    need_weight = v.check_flag(fname, "need_weight", need_weight)
    grad_out = v.as_array(fname, "grad_out", grad_out)
    x1 = v.as_array(fname, "input1", x1)
    x2 = v.as_array(fname, "input2", x2)
    weight = v.as_array(fname, "weight", weight)
    _check_bilinear(fname, x1, x2, weight)
    out_shape = weight.shape[:-2]
    in1, in2 = weight.shape[-2:]
    v.check_grad_out(
        fname, grad_out, x1.shape[:-1] + out_shape, _shapes(input1=x1, input2=x2, weight=weight)
    )
    dtype = v.result_dtype(grad_out, x1, x2, weight)
    work = v.compute_dtype(dtype)
    out_features = math.prod(out_shape)
    grad_x1, grad_x2, grad_weight, grad_bias = _backend.current().bilinear_backward(
        v.contiguous(grad_out.reshape(math.prod(x1.shape[:-1]), out_features), work),
        v.contiguous(_flat(x1, in1), work),
        v.contiguous(_flat(x2, in2), work),
        v.contiguous(weight.reshape(out_features, in1, in2), work),
        need_x1,
        need_x2,
        need_weight,
        need_bias,
    )
    return BilinearGrads(
        _restore(grad_x1, x1.shape, dtype),
        _restore(grad_x2, x2.shape, dtype),
        _restore(grad_weight, weight.shape, dtype),
        _restore(grad_bias, out_shape, dtype),
    )
