"""bfloat16: recognising ``ml_dtypes.bfloat16`` arrays, and the two conversions linmaps makes.

``ml_dtypes`` is never imported here: a bfloat16 array can only reach linmaps if the caller
imported it already, and the dtype is recognised by its name and module. The conversions
work on the bits (a ``uint16`` view), so they are NumPy only:

* bfloat16 to float32 is exact: the 16 bits are the top half of the float32.
* float32 to bfloat16 rounds to nearest, ties to even, as IEEE 754 rounds: overflow gives
  +-inf, and a NaN stays a NaN (quiet, with its sign and top payload bits).
"""

from __future__ import annotations

import sys

import numpy as np

_U16 = np.dtype(np.uint16)


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (without importing ml_dtypes)."""
    return (
        dtype.kind == "V"
        and dtype.itemsize == 2
        and dtype.name == "bfloat16"
        and getattr(dtype.type, "__module__", "").split(".")[0] == "ml_dtypes"
    )


def dtype() -> np.dtype:
    """``ml_dtypes.bfloat16`` as a NumPy dtype; imports ml_dtypes (a TypeError without it)."""
    module = sys.modules.get("ml_dtypes")
    if module is None:
        try:
            import ml_dtypes as module
        except ImportError:
            raise TypeError(
                "bfloat16 needs the ml_dtypes package: pip install 'linmaps[bf16]'"
            ) from None
    return np.dtype(module.bfloat16)


def to_float32(array: np.ndarray) -> np.ndarray:
    """A new C-contiguous float32 array with the values of the bfloat16 ``array`` (exact)."""
    bits = np.ascontiguousarray(array.view(_U16), dtype=np.uint32)
    bits <<= 16
    return bits.view(np.float32)


def round_bits(array: np.ndarray) -> np.ndarray:
    """The bfloat16 bits (``uint16``, C-contiguous) of float32 ``array`` rounded to nearest
    even; a NaN stays a quiet NaN with its sign."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    bits = values.view(np.uint32)
    # Round to nearest even on the dropped 16 bits: add 0x7FFF plus the lowest kept bit. A
    # carry out of the mantissa steps the exponent, which is right (up to inf at the top).
    lowest_kept = (bits >> 16) & 1
    rounded = ((bits + (0x7FFF + lowest_kept)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        # Truncating a NaN could leave a zero mantissa (an inf): keep it a NaN, quiet.
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def from_float32(array: np.ndarray, bf16: np.dtype) -> np.ndarray:
    """float32 ``array`` rounded once to the bfloat16 dtype ``bf16`` (new, C-contiguous)."""
    return round_bits(array).view(bf16)


def round_float32(array: np.ndarray) -> np.ndarray:
    """float32 ``array`` rounded to bfloat16 and back: a new float32 array of bfloat16 values."""
    bits = round_bits(array).astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32)


def split_float32(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)``, float32 arrays of bfloat16 values: ``hi`` is ``array`` rounded to
    bfloat16 and ``lo`` the rest ``array - hi`` (exact in float32) rounded to bfloat16."""
    hi = round_float32(array)
    with np.errstate(all="ignore"):
        rest = array - hi
    # inf - inf is NaN: an infinite value is all in hi.
    rest[~np.isfinite(hi)] = 0
    return hi, round_float32(rest)
