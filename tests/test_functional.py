"""Forward and backward of every public function against the literal sums of the spec and
against central finite differences, on every backend, over Hypothesis-generated shapes."""

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import linmaps

import reference as ref

dims = st.integers(0, 5)
lead_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=2).map(tuple)
values = st.floats(-4, 4, allow_nan=False, width=64)
# Zeros, infinities and NaN among finite values: where inf * 0 lands decides NaN or Inf. The
# finite values are multiples of 1/4 in [-2, 2], so every product and sum of the tests' sizes
# is exact in float32 and float64 alike: whether an intermediate is exactly zero (NaN after
# a product with inf, or inf if it were a tiny nonzero) then depends on neither the dtype nor
# the summation order, only on the grouping.
exact = st.integers(-8, 8).map(lambda i: i / 4)
with_specials = st.one_of(exact, st.sampled_from([0.0, np.inf, -np.inf, np.nan]))
VALUES = {"finite": values, "specials": with_specials}
hyp = settings(max_examples=40, deadline=None)


def arrays(shape, dtype=np.float64, elements=values):
    return hnp.arrays(np.float64, shape, elements=elements).map(lambda a: a.astype(dtype))


@st.composite
def linear_case(draw, dtype=np.float64, elements=values):
    lead, n_in, n_out = draw(lead_shapes), draw(dims), draw(dims)
    with_bias = draw(st.booleans())
    return (
        draw(arrays(lead + (n_in,), dtype, elements)),
        draw(arrays((n_out, n_in), dtype, elements)),
        draw(arrays((n_out,), dtype, elements)) if with_bias else None,
        draw(arrays(lead + (n_out,), dtype, elements)),
    )


@st.composite
def bilinear_case(draw, dtype=np.float64, elements=values):
    lead, n1, n2 = draw(lead_shapes), draw(dims), draw(dims)
    form = draw(st.booleans())  # a 2-D weight: the single bilinear form of spec section 3
    out_shape = () if form else (draw(dims),)
    with_bias = draw(st.booleans())
    return (
        draw(arrays(lead + (n1,), dtype, elements)),
        draw(arrays(lead + (n2,), dtype, elements)),
        draw(arrays(out_shape + (n1, n2), dtype, elements)),
        draw(arrays(out_shape, dtype, elements)) if with_bias else None,
        draw(arrays(lead + out_shape, dtype, elements)),
    )


@pytest.mark.parametrize("values", list(VALUES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_linear_matches_spec_sums(backend, dtype, values):
    @hyp
    @given(linear_case(dtype, VALUES[values]))
    def check(case):
        x, w, b, g = case
        n_out, n_in = w.shape
        n = int(np.prod(x.shape[:-1]))
        y = linmaps.linear(x, w, b)
        ref.assert_close(y, ref.linear(x, w, b), n_in + 1, dtype, dtype)
        grads = linmaps.linear_backward(g, x, w, bias=b is not None)
        exp_x, exp_w, exp_b = ref.linear_grads(g, x, w)
        ref.assert_close(grads.grad_x, exp_x, n_out, dtype, dtype)
        ref.assert_close(grads.grad_weight, exp_w, n, dtype, dtype)
        if b is None:
            assert grads.grad_bias is None
        else:
            ref.assert_close(grads.grad_bias, exp_b, n, dtype, dtype)

    check()


@pytest.mark.parametrize("values", list(VALUES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bilinear_matches_spec_sums(backend, dtype, values):
    # With infinities the result follows the documented grouping (the wider input's features
    # summed first), not the literal triple sum: there the oracle evaluates the same sums in
    # that grouping. For finite values the two differ only by rounding.
    forward = ref.bilinear if values == "finite" else ref.bilinear_grouped
    backward = ref.bilinear_grads if values == "finite" else ref.bilinear_grads_grouped

    @hyp
    @given(bilinear_case(dtype, VALUES[values]))
    def check(case):
        x1, x2, w, b, g = case
        n1, n2 = w.shape[-2:]
        n_out = w.shape[0] if w.ndim == 3 else 1
        n = int(np.prod(x1.shape[:-1]))
        z = linmaps.bilinear(x1, x2, w, b)
        ref.assert_close(z, forward(x1, x2, w, b), n1 * n2 + 1, dtype, dtype)
        grads = linmaps.bilinear_backward(g, x1, x2, w, bias=b is not None)
        exp = backward(g, x1, x2, w)
        ref.assert_close(grads.grad_x1, exp[0], n_out * n2, dtype, dtype)
        ref.assert_close(grads.grad_x2, exp[1], n_out * n1, dtype, dtype)
        ref.assert_close(grads.grad_weight, exp[2], n, dtype, dtype)
        if b is None:
            assert grads.grad_bias is None
        else:
            ref.assert_close(grads.grad_bias, exp[3], n, dtype, dtype)

    check()


inf, nan = np.inf, np.nan
# (x1, x2, weight, grad_out, {output: value derived by hand}). The documented grouping
# (docs/derivation.md): P is the wider input (x2 only when in2 > in1), Q the other;
# T = P A' sums over P's features first, then z = rowdot(T, Q), dQ = sum_l g T, dP = (g Q) A'.
GROUPING_CASES = {
    # The example. x2 is wider: T = [inf+1+1, inf+1+1], z = inf*0 + inf*1 = NaN
    # (x1 first would give T = [1, 1, 1] and z = inf).
    "issue": ([[0.0, 1.0]], [[inf, 1.0, 1.0]], np.ones((1, 2, 3)), [[1.0]], {"z": nan}),
    # x2 is wider: T = 1*0 + 1*1 = 1 and z = 1 * inf = inf. The literal triple sum has the
    # term inf*0*1 = NaN, and so has x1 first (T = [inf*0, inf*1]).
    "x2 wider, forward": ([[inf]], [[1.0, 1.0]], [[[0.0, 1.0]]], [[1.0]], {"z": inf}),
    # x2 is wider: grad_x1 = dQ = g T = inf * (1*1 + 1*0) = inf. Literally, and with the
    # other grouping ((g x2) A' = inf*1 + inf*0), it is NaN.
    "x2 wider, grad_x1": ([[1.0]], [[1.0, 1.0]], [[[1.0, 0.0]]], [[inf]], {"grad_x1": inf}),
    # x1 is wider: grad_x2 = dQ = g T = inf * (1*1 + 1*0) = inf; literally NaN.
    "x1 wider, grad_x2": ([[1.0, 1.0]], [[1.0]], [[[1.0], [0.0]]], [[inf]], {"grad_x2": inf}),
    # Equal widths: P = x1. T = x1 A = [1*0 + 1*1, 1*1 + 1*1] = [1, 2], z = 1*inf + 2*1 = inf;
    # literally 1*0*inf = NaN, and x2 first gives A x2 = [0*inf + 1, inf + 1] and NaN.
    "equal widths": ([[1.0, 1.0]], [[inf, 1.0]], [[[0.0, 1.0], [1.0, 1.0]]], [[1.0]], {"z": inf}),
}


@pytest.mark.parametrize("case", list(GROUPING_CASES))
def test_infinities_follow_the_documented_grouping(backend, case):
    *arrays_, by_hand = GROUPING_CASES[case]
    x1, x2, w, g = (np.asarray(a, np.float64) for a in arrays_)
    z = linmaps.bilinear(x1, x2, w)
    grads = linmaps.bilinear_backward(g, x1, x2, w)
    got = {"z": z, **grads._asdict()}
    for name, value in by_hand.items():
        np.testing.assert_array_equal(got[name], np.full(got[name].shape, value), err_msg=name)
    # Every output, in every entry, as the grouped oracle says (NaN and Inf exactly).
    ref.assert_close(z, ref.bilinear_grouped(x1, x2, w), w.shape[1] * w.shape[2], np.float64)
    exp = ref.bilinear_grads_grouped(g, x1, x2, w)
    for got_grad, want in zip(grads, exp):
        ref.assert_close(got_grad, want, 8, np.float64)


def central_difference(loss, arrays, index, h):
    """d loss / d arrays[index], one central difference per entry."""
    grad = np.zeros_like(arrays[index])
    for pos in np.ndindex(grad.shape):
        plus = [a.copy() for a in arrays]
        minus = [a.copy() for a in arrays]
        plus[index][pos] += h
        minus[index][pos] -= h
        grad[pos] = (loss(*plus) - loss(*minus)) / (2 * h)
    return grad


def assert_fd_close(analytic, numeric, loss_magnitude, h):
    # Both maps are linear in each argument separately, so a central difference has no
    # truncation error: what is left is the rounding of two loss evaluations, divided by 2h.
    # loss_magnitude bounds the sum of |terms| of the loss at any perturbed point.
    info = np.finfo(np.float64)
    bound = 8 * (info.eps * loss_magnitude + info.smallest_subnormal) / h
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=bound)


small = st.integers(1, 3)
# The backend fixture only selects the backend; sharing it across examples is intended.
hyp_fixture = settings(hyp, suppress_health_check=[HealthCheck.function_scoped_fixture])


@hyp_fixture
@given(data=st.data())
def test_linear_gradients_are_finite_differences(backend, data):
    lead = data.draw(st.lists(small, max_size=2).map(tuple))
    n_in, n_out = data.draw(small), data.draw(small)
    x = data.draw(arrays(lead + (n_in,)))
    w = data.draw(arrays((n_out, n_in)))
    b = data.draw(arrays((n_out,)))
    g = data.draw(arrays(lead + (n_out,)))

    h = 0.5

    def loss(x, w, b):
        return float(np.sum(linmaps.linear(x, w, b) * g))

    perturbed = [np.abs(a) + h for a in (x, w, b)]
    magnitude = float(np.sum(np.abs(g) * ref.linear(*perturbed)[1]))
    grads = linmaps.linear_backward(g, x, w)
    for index, analytic in enumerate(grads):
        assert_fd_close(analytic, central_difference(loss, [x, w, b], index, h), magnitude, h)


@hyp_fixture
@given(data=st.data())
def test_bilinear_gradients_are_finite_differences(backend, data):
    lead = data.draw(st.lists(small, max_size=2).map(tuple))
    n1, n2 = data.draw(small), data.draw(small)
    out_shape = data.draw(st.sampled_from([(), (1,), (2,), (3,)]))
    x1 = data.draw(arrays(lead + (n1,)))
    x2 = data.draw(arrays(lead + (n2,)))
    w = data.draw(arrays(out_shape + (n1, n2)))
    b = data.draw(arrays(out_shape))
    g = data.draw(arrays(lead + out_shape))

    h = 0.5

    def loss(x1, x2, w, b):
        return float(np.sum(linmaps.bilinear(x1, x2, w, b) * g))

    perturbed = [np.abs(a) + h for a in (x1, x2, w, b)]
    magnitude = float(np.sum(np.abs(g) * ref.bilinear(*perturbed)[1]))
    grads = linmaps.bilinear_backward(g, x1, x2, w)
    for index, analytic in enumerate(grads):
        numeric = central_difference(loss, [x1, x2, w, b], index, h)
        assert_fd_close(analytic, numeric, magnitude, h)


def test_one_dimensional_inputs(backend):
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal(4), rng.standard_normal((3, 4)), rng.standard_normal(3)
    y = linmaps.linear(x, w, b)
    assert y.shape == (3,)
    ref.assert_close(y, ref.linear(x, w, b), 5, np.float64, np.float64)
    grads = linmaps.linear_backward(np.ones(3), x, w)
    assert [a.shape for a in grads] == [(4,), (3, 4), (3,)]

    x1, x2, w3 = rng.standard_normal(4), rng.standard_normal(5), rng.standard_normal((2, 4, 5))
    z = linmaps.bilinear(x1, x2, w3)
    assert z.shape == (2,)
    ref.assert_close(z, ref.bilinear(x1, x2, w3), 21, np.float64, np.float64)
    form = linmaps.bilinear(x1, x2, w3[0])
    assert form.shape == ()
    ref.assert_close(form, ref.bilinear(x1, x2, w3[0]), 21, np.float64, np.float64)


@pytest.mark.parametrize("skip", ["x", "weight", "bias"])
def test_linear_backward_skips_unrequested(backend, skip):
    rng = np.random.default_rng(2)
    x, w, g = rng.standard_normal((6, 4)), rng.standard_normal((3, 4)), rng.standard_normal((6, 3))
    full = linmaps.linear_backward(g, x, w)
    flags = {"need_x": skip != "x", "need_weight": skip != "weight", "bias": skip != "bias"}
    part = linmaps.linear_backward(g, x, w, **flags)
    for name, got, want in zip(("x", "weight", "bias"), part, full):
        if name == skip:
            assert got is None
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("skip", ["x1", "x2", "weight", "bias"])
def test_bilinear_backward_skips_unrequested(backend, skip):
    rng = np.random.default_rng(3)
    x1, x2 = rng.standard_normal((6, 4)), rng.standard_normal((6, 5))
    w, g = rng.standard_normal((3, 4, 5)), rng.standard_normal((6, 3))
    full = linmaps.bilinear_backward(g, x1, x2, w)
    flags = {
        "need_x1": skip != "x1",
        "need_x2": skip != "x2",
        "need_weight": skip != "weight",
        "bias": skip != "bias",
    }
    part = linmaps.bilinear_backward(g, x1, x2, w, **flags)
    for name, got, want in zip(("x1", "x2", "weight", "bias"), part, full):
        if name == skip:
            assert got is None
        else:
            np.testing.assert_array_equal(got, want)


def test_nothing_requested_returns_all_none(backend):
    x1, x2, w, g = np.ones((2, 3)), np.ones((2, 4)), np.ones((5, 3, 4)), np.ones((2, 5))
    flags = {"need_x1": False, "need_x2": False, "need_weight": False, "bias": False}
    assert tuple(linmaps.bilinear_backward(g, x1, x2, w, **flags)) == (None,) * 4


def test_large_batch_is_blocked_and_exact_on_sampled_rows(backend):
    # More rows than one workspace block of the NumPy backend (2**21 / (L*n) = 512 rows) and
    # not a multiple of it, so block edges are crossed.
    rng = np.random.default_rng(4)
    n, m, k, L = 1500, 24, 64, 64
    x1, x2 = rng.standard_normal((n, m)), rng.standard_normal((n, k))
    w, b, g = rng.standard_normal((L, m, k)), rng.standard_normal(L), rng.standard_normal((n, L))
    z = linmaps.bilinear(x1, x2, w, b)
    grads = linmaps.bilinear_backward(g, x1, x2, w)
    rows = np.r_[0, 511, 512, 513, 1023, 1024, 1499]
    ref.assert_close(z[rows], ref.bilinear(x1[rows], x2[rows], w, b), m * k + 1, np.float64)
    exp = ref.bilinear_grads(g[rows], x1[rows], x2[rows], w)
    ref.assert_close(grads.grad_x1[rows], exp[0], L * k, np.float64)
    ref.assert_close(grads.grad_x2[rows], exp[1], L * m, np.float64)
    ref.assert_close(grads.grad_weight, ref.bilinear_grads(g, x1, x2, w)[2], n, np.float64)
