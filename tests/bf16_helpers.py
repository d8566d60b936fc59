"""The bound bfloat16 results are checked against (tests/test_bf16.py, test_torch_bf16.py).

A bfloat16 result is a float32 computation rounded once, so it may differ from the exact
value ``v`` (the float64 einsum of ``reference`` on the bfloat16 inputs) by the float32
summation bound ``d = (K + 2) * eps32 * magnitude`` plus the one final rounding, at most half
a bfloat16 ulp: ``2**-8 * (|v| + d)``. Where ``d`` is far below a bfloat16 ulp (random
inputs), the result is the correctly rounded exact value, so most entries also match
``bf16(v)`` exactly; that is checked too.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
EPS32 = np.finfo(np.float32).eps
TINY32 = np.finfo(np.float32).smallest_subnormal
BF16_HALF_ULP = 2.0**-8  # relative: bfloat16 has 8 significant bits
BF16_TINY = 2.0**-133  # bfloat16's smallest subnormal


def bf16(array):
    return np.asarray(array, np.float32).astype(BF16)


def assert_bf16_close(actual, expected, terms):
    """``actual`` (bfloat16) is the float32 computation of ``expected = (value, magnitude)``
    rounded once: within the bound of the module docstring, and equal to the correctly
    rounded value for most entries."""
    value, magnitude = expected
    assert actual.dtype == BF16, actual.dtype
    assert actual.shape == value.shape, (actual.shape, value.shape)
    a = actual.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(value), err_msg="NaN pattern differs")
    finite = np.isfinite(value)
    np.testing.assert_array_equal(a[~finite], value[~finite], err_msg="infinities differ")
    v, m = value[finite], magnitude[finite]
    summation = (terms + 2) * (EPS32 * m + TINY32)
    bound = summation + BF16_HALF_ULP * (np.abs(v) + summation) + BF16_TINY
    err = np.abs(a[finite] - v)
    bad = err > bound
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} entries exceed the bound; worst error {err.max():.3g} "
        f"vs bound {bound[np.argmax(err - bound)]:.3g}"
    )
    if v.size >= 50:
        exact = np.mean(actual[finite].view(np.uint16) == bf16(v).view(np.uint16))
        assert exact >= 0.9, f"only {exact:.0%} of entries are the correctly rounded value"
