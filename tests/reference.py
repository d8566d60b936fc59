"""Independent answers for the tests: the spec's elementwise sums, evaluated literally with
``numpy.einsum`` in float64 (and, for inputs with infinities, in the documented grouping:
``bilinear_grouped``, ``bilinear_grads_grouped``).

Each function returns ``(value, magnitude)`` where ``magnitude`` is the same sum taken over
the absolute values of the terms. A computed result may differ from the exact one by at most
about ``K * eps * magnitude`` for a sum of ``K`` terms (the standard forward error bound of
floating-point summation), which is how ``assert_close`` sets its tolerance.
"""

from __future__ import annotations

import numpy as np


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def einsum2(subscripts, *operands):
    operands = _f64(*operands)
    with np.errstate(all="ignore"):  # IEEE specials are part of what is checked
        return _einsum2(subscripts, operands)


def _einsum2(subscripts, operands):
    value = ein(subscripts, *operands)
    magnitude = ein(subscripts, *[np.abs(o) for o in operands])
    return value, magnitude


def ein(subscripts, *operands):
    """``numpy.einsum`` term by term (no reordering into BLAS calls).

    Every term takes one entry of each operand, so with an empty operand the result is either
    empty or all empty sums, i.e. zero. NumPy 2.4's einsum does not always write empty sums:
    the result then holds whatever the memory held (seen as NaN), so they are zeroed here.
    """
    result = np.einsum(subscripts, *operands, optimize=False)
    if any(np.size(o) == 0 for o in operands):
        result = np.zeros_like(result)
    return result


def linear(x, weight, bias=None):
    """``y[k, j] = sum_i x[k, i] weight[j, i] + bias[j]`` over flattened batch ``k``."""
    x, weight = _f64(x, weight)
    lead = x.shape[:-1]
    y, mag = einsum2("ki,ji->kj", x.reshape(int(np.prod(lead)), x.shape[-1]), weight)
    if bias is not None:
        with np.errstate(all="ignore"):  # inf + -inf is a legitimate NaN here
            y, mag = y + bias, mag + np.abs(np.asarray(bias, np.float64))
    shape = lead + (weight.shape[0],)
    return y.reshape(shape), mag.reshape(shape)


def linear_grads(grad_out, x, weight):
    grad_out, x, weight = _f64(grad_out, x, weight)
    n = int(np.prod(x.shape[:-1]))
    g = grad_out.reshape(n, weight.shape[0])
    x2 = x.reshape(n, weight.shape[1])
    gx, gx_mag = einsum2("kj,ji->ki", g, weight)
    gw = einsum2("kj,ki->ji", g, x2)
    gb = einsum2("kj->j", g)
    return (gx.reshape(x.shape), gx_mag.reshape(x.shape)), gw, gb


def _bilinear_operands(x1, x2, weight):
    x1, x2, weight = _f64(x1, x2, weight)
    w3 = weight if weight.ndim == 3 else weight[None]
    n = int(np.prod(x1.shape[:-1]))
    return x1.reshape(n, w3.shape[1]), x2.reshape(n, w3.shape[2]), w3


def _bilinear_result(z, mag, bias, x1, weight):
    """``(z + bias, mag + |bias|)`` in the caller's batch shape."""
    out_features = np.shape(weight)[0] if np.ndim(weight) == 3 else 1
    if bias is not None:
        bias = np.asarray(bias, np.float64).reshape(out_features)
        with np.errstate(all="ignore"):  # inf + -inf is a legitimate NaN here
            z, mag = z + bias, mag + np.abs(bias)
    shape = np.shape(x1)[:-1] + np.shape(weight)[:-2]
    return z.reshape(shape), mag.reshape(shape)


def bilinear(x1, x2, weight, bias=None):
    """``z[k, l] = sum_{i,j} x1[k, i] weight[l, i, j] x2[k, j] + bias[l]``."""
    a, b, w3 = _bilinear_operands(x1, x2, weight)
    z, mag = einsum2("ki,lij,kj->kl", a, w3, b)
    return _bilinear_result(z, mag, bias, x1, weight)


def bilinear_grads(grad_out, x1, x2, weight):
    a, b, w3 = _bilinear_operands(x1, x2, weight)
    g = np.asarray(grad_out, np.float64).reshape(a.shape[0], w3.shape[0])
    gx1 = einsum2("kl,lij,kj->ki", g, w3, b)
    gx2 = einsum2("kl,ki,lij->kj", g, a, w3)
    gw = einsum2("kl,ki,kj->lij", g, a, b)
    gb = einsum2("kl->l", g)
    reshape = [np.shape(x1), np.shape(x2), np.shape(weight), np.shape(weight)[:-2]]
    return tuple((v.reshape(s), m.reshape(s)) for (v, m), s in zip((gx1, gx2, gw, gb), reshape))


def _grouped(compute, *operands):
    """``(value, magnitude)`` of ``compute(*operands)``; the magnitude is the same computation
    on ``|operands|``, which is the sum of ``|terms|`` of every entry."""
    with np.errstate(all="ignore"):
        return compute(*operands), compute(*[np.abs(o) for o in operands])


def _wider_first(x1, x2, w3):
    """The documented grouping rule: ``P`` is the wider input (``x2`` only when ``in2 > in1``),
    ``Q`` the other, and the weight as ``(L, p, q)``."""
    if w3.shape[2] > w3.shape[1]:
        return True, x2, x1, w3.transpose(0, 2, 1)
    return False, x1, x2, w3


def bilinear_grouped(x1, x2, weight, bias=None):
    """The forward as ``docs/derivation.md`` groups it: ``T = P A'`` over the wider input's
    features first, then ``z[k, l] = sum_j T[k, l, j] Q[k, j]``.

    Equal to :func:`bilinear` up to rounding for finite inputs; with infinities the grouping
    decides between NaN and Inf (``inf * 0`` inside ``T`` or outside it), and this is the
    answer both backends must give.
    """
    a, b, w3 = _bilinear_operands(x1, x2, weight)
    _, p, q, wpq = _wider_first(a, b, w3)
    z, mag = _grouped(lambda p, w, q: ein("klj,kj->kl", ein("ki,lij->klj", p, w), q), p, wpq, q)
    return _bilinear_result(z, mag, bias, x1, weight)


def bilinear_grads_grouped(grad_out, x1, x2, weight):
    """The gradients as ``docs/derivation.md`` groups them, with ``W[k, l, j] = g[k, l] Q[k, j]``:
    ``dP = sum_{l,j} W A'``, ``dQ = sum_l g T`` and ``dA' = sum_k P W``."""
    a, b, w3 = _bilinear_operands(x1, x2, weight)
    g = np.asarray(grad_out, np.float64).reshape(a.shape[0], w3.shape[0])
    swapped, p, q, wpq = _wider_first(a, b, w3)
    dp = _grouped(lambda g, q, w: ein("klj,lij->ki", ein("kl,kj->klj", g, q), w), g, q, wpq)
    dq = _grouped(lambda g, p, w: ein("kl,klj->kj", g, ein("ki,lij->klj", p, w)), g, p, wpq)
    dw = _grouped(lambda p, g, q: ein("ki,klj->lij", p, ein("kl,kj->klj", g, q)), p, g, q)
    if swapped:
        dp, dq = dq, dp
        dw = tuple(d.transpose(0, 2, 1) for d in dw)
    gb = _grouped(lambda g: ein("kl->l", g), g)
    reshape = [np.shape(x1), np.shape(x2), np.shape(weight), np.shape(weight)[:-2]]
    return tuple((v.reshape(s), m.reshape(s)) for (v, m), s in zip((dp, dq, dw, gb), reshape))


def assert_close(actual, expected, terms: int, compute_dtype, result_dtype=None):
    """``actual`` matches ``expected = (value, magnitude)`` within the rounding bound.

    ``terms`` is the length of the longest sum behind one entry (products of up to three
    factors add two roundings each). NaN must stand where the oracle has NaN and infinities
    must agree exactly: IEEE propagation is part of the contract.
    """
    value, magnitude = expected
    actual = np.asarray(actual)
    assert actual.shape == value.shape, (actual.shape, value.shape)
    if result_dtype is not None:
        assert actual.dtype == result_dtype, (actual.dtype, result_dtype)
    a = actual.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(value), err_msg="NaN pattern differs")
    inf = np.isinf(value)
    np.testing.assert_array_equal(a[inf], value[inf], err_msg="infinities differ")
    finite = ~np.isnan(value) & ~inf
    eps = np.finfo(compute_dtype).eps
    # Rounding model fl(a op b) = (a op b)(1 + d) + e, |d| <= eps/2, |e| <= tiny/2 (underflow).
    tiny = np.finfo(compute_dtype).smallest_subnormal
    bound = (terms + 2) * (eps * magnitude[finite] + tiny)
    if result_dtype is not None and np.dtype(result_dtype) != np.dtype(compute_dtype):
        bound = bound + np.finfo(result_dtype).eps * np.abs(value[finite])  # final rounding
    # A NaN bound (a magnitude with inf * 0 where the value is finite) would pass anything.
    assert not np.isnan(bound).any(), "the oracle's magnitude is NaN at a finite value"
    err = np.abs(a[finite] - value[finite])
    bad = err > bound
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} entries exceed the rounding bound; worst error "
        f"{err.max():.3g} vs bound {bound[np.argmax(err - bound)]:.3g}"
    )


def assert_identical(actual, expected):
    """Bitwise equal (NaNs included), or both None, entry by entry."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
            continue
        assert a.dtype == e.dtype and a.shape == e.shape
        assert np.array_equal(a, e, equal_nan=True) and a.tobytes() == e.tobytes()
