"""Argument checks shared by every backend: the one place where bad input is rejected.

Messages follow PyTorch's style: ``"<function>(): <what> ...: got X but expected Y"`` and name
the shapes or dtypes involved. Everything here runs before any arithmetic.
"""

from __future__ import annotations

import numpy as np

from . import _bf16

_SUPPORTED = (
    "a real floating-point (float16, float32, float64, ml_dtypes.bfloat16), integer or bool array"
)


def as_array(fname: str, name: str, value) -> np.ndarray:
    """``value`` as an ndarray (no copy), rejecting dtypes we cannot compute in."""
    if type(value) is np.ndarray:
        array = value
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{fname}(): {name} cannot be converted to an array: {exc}") from None
    kind = array.dtype.kind
    if kind in "biu":
        return array
    if kind == "f" and array.dtype.itemsize in (2, 4, 8):
        return array
    if kind == "V" and _bf16.is_bfloat16(array.dtype):
        return array
    raise TypeError(
        f"{fname}(): {name} has dtype {array.dtype}, which is not supported; expected {_SUPPORTED}"
    )


def result_dtype(*arrays: np.ndarray) -> np.dtype:
    """The dtype of the results: NumPy promotion, with bool and integer inputs as float64.

    Always in native byte order: a big-endian ``>f8`` input gives a native float64 result,
    and the backends compute in native order (the arrays are converted on the way in).
    """
    first = arrays[0].dtype
    for a in arrays:
        if a.dtype != first:
            break
    else:
        if first.kind == "f":  # the common case, all one float dtype: no promotion needed
            return first if first.isnative else first.newbyteorder("=")
    dtypes = [np.dtype(np.float64) if a.dtype.kind in "biu" else a.dtype for a in arrays]
    result = np.result_type(*dtypes)
    return result if result.isnative else result.newbyteorder("=")


def compute_dtype(result: np.dtype) -> np.dtype:
    """float16 and bfloat16 are computed in float32 and rounded once at the end."""
    if result.kind == "V" or result == np.float16:
        return np.dtype(np.float32)
    return result


def contiguous(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """C-contiguous, aligned ``array`` in ``dtype``; copies only when layout or dtype require it.

    Every conversion linmaps makes goes through here (or ``copy_into``). A narrowing one (a
    float32 result to float16, a float64 input to a float32 layer) rounds as IEEE 754 says,
    silently, like float32 and float64 arithmetic: out-of-range values become +-inf and tiny
    ones subnormal or zero. NumPy's cast would instead warn, or raise ``FloatingPointError``
    under ``numpy.errstate(all="raise")``. Byte order is converted to ``dtype``'s too.

    An array whose data is not aligned to its element size (``np.frombuffer`` at an odd
    offset, an array unpickled from a byte stream, as dask.distributed workers get them) is
    copied: the compiled kernels cannot read it, and NumPy's products would take slower paths
    with other rounding. ``np.ascontiguousarray`` alone would return it as it is.
    """
    flags = array.flags
    if array.dtype == dtype and flags.c_contiguous and flags.aligned:
        return array
    # bfloat16 converts on its bits (_bf16): exact to float32, rounded once from float32.
    if array.dtype != dtype and _bf16.is_bfloat16(array.dtype):
        widened = _bf16.to_float32(array)
        return widened if dtype == np.float32 else contiguous(widened, dtype)
    if dtype.kind == "V" and array.dtype == np.float32:
        return _bf16.from_float32(array, dtype)
    with np.errstate(all="ignore"):
        if not flags.aligned:
            return np.array(array, dtype=dtype, order="C", copy=True)
        return np.ascontiguousarray(array, dtype=dtype)


def copy_into(target: np.ndarray, value: np.ndarray) -> None:
    """``target[...] = value`` cast to ``target``'s dtype as IEEE says, silently (see
    ``contiguous``)."""
    with np.errstate(all="ignore"):
        np.copyto(target, value, casting="same_kind")


def check_at_least_1d(fname: str, name: str, array: np.ndarray) -> None:
    if array.ndim == 0:
        raise ValueError(f"{fname}(): {name} must have at least 1 dimension, got a 0-d array")


def check_features(fname: str, name: str, got: int, expected: int, shapes: str) -> None:
    if got != expected:
        raise ValueError(
            f"{fname}(): {name} size does not match weight size: "
            f"got {got} but expected {expected} ({shapes})"
        )


def check_bias(fname: str, bias: np.ndarray, expected: tuple, weight_shape: tuple) -> None:
    if bias.shape != expected:
        raise ValueError(
            f"{fname}(): bias size does not match weight size: got shape "
            f"{bias.shape} but expected {expected} (weight shape {weight_shape})"
        )


def check_grad_out(fname: str, grad_out: np.ndarray, expected: tuple, shapes: str) -> None:
    if grad_out.shape != expected:
        raise ValueError(
            f"{fname}(): grad_out shape does not match the output shape: "
            f"got {grad_out.shape} but expected {expected} ({shapes})"
        )


def check_flag(fname: str, name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fname}(): {name} must be a bool, got {type(value).__name__}")
    return bool(value)
