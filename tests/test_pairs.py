"""linmaps.bilinear_pairs and bilinear_pairs_backward: every row of x1 against every row of x2.

The independent answer is the definition's literal einsum in float64
(``S[..., i, j, o] = sum_ac x1[..., i, a] W[o, a, c] x2[..., j, c] + b[o]``), with the
rounding bound of ``reference.assert_close``; the gradients are also checked by finite
differences of a scalar loss.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import linmaps

from reference import assert_close, assert_identical, ein

hyp = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
HAS_CPP = "cpp" in linmaps.available_backends()


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def _w3(weight):
    return weight if weight.ndim == 3 else weight[None]


def oracle(x1, x2, weight, bias=None):
    """``(value, magnitude)`` of the definition, term by term in float64."""
    x1, x2, weight = _f64(x1, x2, weight)
    w3 = _w3(weight)
    spec = "...ia,oac,...jc->...ijo"
    value = ein(spec, x1, w3, x2)
    magnitude = ein(spec, np.abs(x1), np.abs(w3), np.abs(x2))
    if bias is not None:
        b = np.asarray(bias, np.float64).reshape(w3.shape[0])
        value, magnitude = value + b, magnitude + np.abs(b)
    shape = x1.shape[:-1] + (x2.shape[-2],) + weight.shape[:-2]
    return value.reshape(shape), magnitude.reshape(shape)


def oracle_grads(grad, x1, x2, weight):
    x1, x2, weight = _f64(x1, x2, weight)
    w3 = _w3(weight)
    n = int(np.prod(x1.shape[:-2], dtype=np.int64))
    a = x1.reshape(n, *x1.shape[-2:])
    c = x2.reshape(n, *x2.shape[-2:])
    g = np.asarray(grad, np.float64).reshape(n, a.shape[1], c.shape[1], w3.shape[0])
    specs = {
        "x1": ("bijo,oac,bjc->bia", (g, w3, c), x1.shape),
        "x2": ("bijo,bia,oac->bjc", (g, a, w3), x2.shape),
        "weight": ("bijo,bia,bjc->oac", (g, a, c), weight.shape),
        "bias": ("bijo->o", (g,), weight.shape[:-2]),
    }
    result = {}
    for name, (spec, ops, shape) in specs.items():
        value = ein(spec, *ops)
        magnitude = ein(spec, *[np.abs(o) for o in ops])
        result[name] = (value.reshape(shape), magnitude.reshape(shape))
    return result


def make(rng, batch, rows1, rows2, in1, in2, out, dtype=np.float64, two_d=False, bias=True):
    x1 = rng.standard_normal(batch + (rows1, in1)).astype(dtype)
    x2 = rng.standard_normal(batch + (rows2, in2)).astype(dtype)
    wshape = (in1, in2) if two_d else (out, in1, in2)
    weight = rng.standard_normal(wshape).astype(dtype)
    b = rng.standard_normal(wshape[:-2]).astype(dtype) if bias else None
    grad = rng.standard_normal(batch + (rows1, rows2) + wshape[:-2]).astype(dtype)
    return x1, x2, weight, b, grad


shapes = st.tuples(
    st.lists(st.integers(0, 3), min_size=0, max_size=2).map(tuple),  # batch dims
    st.integers(0, 6),  # I
    st.integers(0, 7),  # J
    st.integers(0, 9),  # in1
    st.integers(0, 8),  # in2
    st.integers(0, 4),  # out
    st.booleans(),  # 2-D weight
    st.booleans(),  # bias
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@hyp
@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_forward_matches_einsum(backend, dtype, shape, seed):
    batch, rows1, rows2, in1, in2, out, two_d, has_bias = shape
    x1, x2, w, b, _ = make(
        np.random.default_rng(seed), batch, rows1, rows2, in1, in2, out, dtype, two_d, has_bias
    )
    s = linmaps.bilinear_pairs(x1, x2, w, b)
    assert_close(s, oracle(x1, x2, w, b), in1 * in2 + 1, dtype, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@hyp
@given(
    shape=shapes,
    needs=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**32 - 1),
)
def test_backward_matches_einsum(backend, dtype, shape, needs, seed):
    batch, rows1, rows2, in1, in2, out, two_d, _ = shape
    x1, x2, w, _, g = make(
        np.random.default_rng(seed), batch, rows1, rows2, in1, in2, out, dtype, two_d
    )
    grads = linmaps.bilinear_pairs_backward(
        g, x1, x2, w, bias=needs[3], need_x1=needs[0], need_x2=needs[1], need_weight=needs[2]
    )
    assert isinstance(grads, linmaps.BilinearGrads)
    ref = oracle_grads(g, x1, x2, w)
    out_features = 1 if two_d else out
    n = int(np.prod(batch, dtype=np.int64))
    terms = {
        "x1": rows2 * out_features * in2,
        "x2": rows1 * out_features * in1,
        "weight": n * rows1 * rows2,
        "bias": n * rows1 * rows2,
    }
    for wanted, name, got in zip(needs[:3] + needs[3:], ("x1", "x2", "weight", "bias"), grads):
        if wanted:
            assert_close(got, ref[name], terms[name], dtype, dtype)
        else:
            assert got is None


def test_leading_dims_and_row_counts_kept_apart(backend):
    """I != J, several batch axes: each S[b, i, j] uses x1[b, i] and x2[b, j] only."""
    rng = np.random.default_rng(0)
    x1, x2, w, b, _ = make(rng, (2, 3), 4, 7, 5, 6, 3)
    s = linmaps.bilinear_pairs(x1, x2, w, b)
    assert s.shape == (2, 3, 4, 7, 3)
    expected = np.empty_like(s)
    for idx in np.ndindex(2, 3, 4, 7):
        row1, row2 = x1[idx[:2] + (idx[2],)], x2[idx[:2] + (idx[3],)]
        expected[idx] = np.array([row1 @ w[o] @ row2 for o in range(3)]) + b
    np.testing.assert_allclose(s, expected, rtol=1e-12, atol=1e-12)


def test_2d_weight_gives_one_score_per_pair(backend):
    rng = np.random.default_rng(1)
    x1, x2, w, b, g = make(rng, (3,), 5, 4, 6, 2, 1, two_d=True)
    s = linmaps.bilinear_pairs(x1, x2, w, b)
    assert s.shape == (3, 5, 4)
    assert_close(s, oracle(x1, x2, w, b), 13, np.float64, np.float64)
    grads = linmaps.bilinear_pairs_backward(g, x1, x2, w)
    assert grads.grad_weight.shape == (6, 2) and grads.grad_bias.shape == ()


def test_no_batch_dims(backend):
    rng = np.random.default_rng(2)
    x1, x2, w, b, _ = make(rng, (), 1, 3, 4, 5, 2)
    s = linmaps.bilinear_pairs(x1, x2, w, b)
    assert s.shape == (1, 3, 2)
    assert_close(s, oracle(x1, x2, w, b), 21, np.float64, np.float64)


def _loss(x1, x2, w, b, r):
    with linmaps.use_backend("python"):
        return float(np.sum(linmaps.bilinear_pairs(x1, x2, w, b) * r))


@pytest.mark.parametrize("two_d", [False, True])
def test_gradients_match_finite_differences(backend, two_d):
    rng = np.random.default_rng(3)
    x1, x2, w, b, r = make(rng, (2,), 3, 4, 3, 2, 2, two_d=two_d)
    grads = linmaps.bilinear_pairs_backward(r, x1, x2, w)
    step = 1e-6
    for name, array, got in zip(("x1", "x2", "w", "b"), (x1, x2, w, b), grads):
        numeric = np.zeros_like(array, dtype=np.float64)
        flat = array.reshape(-1)
        for k in range(flat.size):
            saved = flat[k]
            flat[k] = saved + step
            up = _loss(x1, x2, w, b, r)
            flat[k] = saved - step
            down = _loss(x1, x2, w, b, r)
            flat[k] = saved
            numeric.reshape(-1)[k] = (up - down) / (2 * step)
        np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-6, err_msg=name)


# Shapes past the compiled kernels' block sizes: several j blocks per batch entry (out * in1
# = 131072 numbers per row of V), and a weight gradient tiled over in1.
LARGE = [
    ((2,), 3, 20, 2048, 2, 64),
    ((3,), 17, 11, 40, 30, 5),
    ((32,), 12, 9, 50, 20, 1),
]


@pytest.mark.skipif(not HAS_CPP, reason="the compiled backend is not available")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", LARGE)
def test_backends_agree_past_block_sizes(dtype, shape):
    rng = np.random.default_rng(4)
    x1, x2, w, b, g = make(rng, *shape, dtype)
    results = {}
    for name in ("cpp", "python"):
        with linmaps.use_backend(name):
            results[name] = (linmaps.bilinear_pairs(x1, x2, w, b),) + tuple(
                linmaps.bilinear_pairs_backward(g, x1, x2, w)
            )
    batch, rows1, rows2, in1, in2, out = shape
    n = int(np.prod(batch))
    terms = (
        in1 * in2 + 1,
        rows2 * out * in2,
        rows1 * out * in1,
        n * rows1 * rows2,
        n * rows1 * rows2,
    )
    ref = oracle(x1, x2, w, b)
    ref_grads = oracle_grads(g, x1, x2, w)
    expected = (ref,) + tuple(ref_grads[k] for k in ("x1", "x2", "weight", "bias"))
    for name in ("cpp", "python"):
        for got, exp, k in zip(results[name], expected, terms):
            assert_close(got, exp, k, dtype, dtype)


@pytest.fixture
def restore_threads():
    before = linmaps.get_num_threads()
    yield
    linmaps.set_num_threads(before)


@pytest.mark.skipif(not HAS_CPP, reason="the compiled backend is not available")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_for_1_2_3_threads(dtype, restore_threads):
    rng = np.random.default_rng(5)
    cases = [make(rng, *shape, dtype) for shape in LARGE + [((4,), 40, 33, 64, 48, 8)]]
    results = {}
    with linmaps.use_backend("cpp"):
        for threads in (1, 2, 3):
            linmaps.set_num_threads(threads)
            out = []
            for x1, x2, w, b, g in cases:
                out.append(linmaps.bilinear_pairs(x1, x2, w, b))
                out.extend(linmaps.bilinear_pairs_backward(g, x1, x2, w))
            results[threads] = out
    for threads in (2, 3):
        assert_identical(results[threads], results[1])


def test_float16_computed_in_float32(backend):
    rng = np.random.default_rng(6)
    x1, x2, w, b, g = make(rng, (2,), 3, 5, 4, 6, 2, np.float16)
    s = linmaps.bilinear_pairs(x1, x2, w, b)
    assert_close(s, oracle(x1, x2, w, b), 25, np.float32, np.float16)
    grads = linmaps.bilinear_pairs_backward(g, x1, x2, w)
    ref = oracle_grads(g, x1, x2, w)
    for got, name, terms in zip(grads, ("x1", "x2", "weight", "bias"), (60, 24, 30, 30)):
        assert_close(got, ref[name], terms, np.float32, np.float16)


def test_bfloat16_computed_in_float32_and_rounded_once(backend):
    pytest.importorskip("ml_dtypes")
    from bf16_helpers import assert_bf16_close, bf16

    rng = np.random.default_rng(9)
    x1, x2, w, b, g = (bf16(a) for a in make(rng, (2,), 5, 7, 9, 6, 3))
    assert_bf16_close(linmaps.bilinear_pairs(x1, x2, w, b), oracle(x1, x2, w, b), 9 * 6 + 1)
    grads = linmaps.bilinear_pairs_backward(g, x1, x2, w)
    ref = oracle_grads(g, x1, x2, w)
    for got, name, terms in zip(grads, ("x1", "x2", "weight", "bias"), (126, 135, 70, 70)):
        assert_bf16_close(got, ref[name], terms)


def test_mixed_dtypes_promote(backend):
    rng = np.random.default_rng(7)
    x1, x2, w, _, _ = make(rng, (2,), 3, 4, 5, 6, 2)
    s = linmaps.bilinear_pairs(x1.astype(np.float32), x2.astype(np.int64), w.astype(np.float32))
    assert s.dtype == np.float64


def test_any_layout_and_byte_order_gives_the_same_bits(backend):
    rng = np.random.default_rng(8)
    x1, x2, w, b, g = make(rng, (3,), 5, 4, 6, 7, 2)
    expected = (linmaps.bilinear_pairs(x1, x2, w, b),) + tuple(
        linmaps.bilinear_pairs_backward(g, x1, x2, w)
    )
    x1_t = np.asfortranarray(x1)
    x2_view = np.ascontiguousarray(np.swapaxes(x2, 0, 1)).swapaxes(0, 1)
    w_big = w.astype(">f8")
    g_strided = np.repeat(g, 2, axis=-1)[..., ::2]
    got = (linmaps.bilinear_pairs(x1_t, x2_view, w_big, b.astype(">f8")),) + tuple(
        linmaps.bilinear_pairs_backward(g_strided, x1_t, x2_view, w_big)
    )
    assert got[0].dtype == np.float64 and got[0].dtype.isnative
    assert_identical(got, expected)


def test_inputs_not_modified(backend):
    rng = np.random.default_rng(9)
    args = make(rng, (2,), 3, 4, 5, 6, 2)
    copies = [a.copy() for a in args]
    linmaps.bilinear_pairs(*args[:4])
    linmaps.bilinear_pairs_backward(args[4], *args[:3])
    for a, c in zip(args, copies):
        assert np.array_equal(a, c)


# ----------------------------------------------------------------------------- bad input

X1 = np.zeros((2, 3, 4))
X2 = np.zeros((2, 5, 6))
W = np.zeros((7, 4, 6))
G = np.zeros((2, 3, 5, 7))

BAD_FORWARD = [
    (
        (np.zeros(4), X2, W, None),
        ValueError,
        "bilinear_pairs(): input1 must have at least 2 dimensions (..., rows, features), "
        "got shape (4,)",
    ),
    (
        (X1, np.zeros(6), W, None),
        ValueError,
        "bilinear_pairs(): input2 must have at least 2 dimensions (..., rows, features), "
        "got shape (6,)",
    ),
    (
        (X1, np.zeros((3, 5, 6)), W, None),
        ValueError,
        "bilinear_pairs(): input batch dimensions do not match: got (2,) and (3,) "
        "(input1 shape (2, 3, 4), input2 shape (3, 5, 6), weight shape (7, 4, 6))",
    ),
    (
        (X1, X2[None], W, None),
        ValueError,
        "bilinear_pairs(): input batch dimensions do not match: got (2,) and (1, 2)",
    ),
    (
        (np.zeros((2, 3, 5)), X2, W, None),
        ValueError,
        "bilinear_pairs(): input1 size does not match weight size: got 5 but expected 4 "
        "(input1 shape (2, 3, 5), input2 shape (2, 5, 6), weight shape (7, 4, 6))",
    ),
    (
        (X1, np.zeros((2, 5, 3)), W, None),
        ValueError,
        "bilinear_pairs(): input2 size does not match weight size: got 3 but expected 6",
    ),
    (
        (X1, X2, np.zeros((1, 7, 4, 6)), None),
        ValueError,
        "bilinear_pairs(): weight must be 3-D (out_features, in1_features, in2_features) or "
        "2-D (in1_features, in2_features), got shape (1, 7, 4, 6)",
    ),
    (
        (X1, X2, np.zeros(4), None),
        ValueError,
        "bilinear_pairs(): weight must be 3-D",
    ),
    (
        (X1, X2, W, np.zeros(6)),
        ValueError,
        "bilinear_pairs(): bias size does not match weight size: got shape (6,) but expected "
        "(7,) (weight shape (7, 4, 6))",
    ),
    (
        (X1.astype(complex), X2, W, None),
        TypeError,
        "bilinear_pairs(): input1 has dtype complex128, which is not supported",
    ),
    (
        (X1, X2, W.astype(object), None),
        TypeError,
        "bilinear_pairs(): weight has dtype object, which is not supported",
    ),
]

BAD_BACKWARD = [
    (
        (G[..., :6], X1, X2, W),
        {},
        ValueError,
        "bilinear_pairs_backward(): grad_out shape does not match the output shape: got "
        "(2, 3, 5, 6) but expected (2, 3, 5, 7) (input1 shape (2, 3, 4), input2 shape "
        "(2, 5, 6), weight shape (7, 4, 6))",
    ),
    (
        (G, X1, np.zeros((2, 4, 6)), W),
        {},
        ValueError,
        "bilinear_pairs_backward(): grad_out shape does not match the output shape: got "
        "(2, 3, 5, 7) but expected (2, 3, 4, 7)",
    ),
    (
        (G, X1, np.zeros((1, 5, 6)), W),
        {},
        ValueError,
        "bilinear_pairs_backward(): input batch dimensions do not match: got (2,) and (1,)",
    ),
    (
        (G, X1, X2, W),
        {"need_x1": 1},
        TypeError,
        "bilinear_pairs_backward(): need_x1 must be a bool, got int",
    ),
    (
        (G, X1, X2, W),
        {"bias": None},
        TypeError,
        "bilinear_pairs_backward(): bias must be a bool, got NoneType",
    ),
    (
        (G.astype(str), X1, X2, W),
        {},
        TypeError,
        "bilinear_pairs_backward(): grad_out has dtype <U32, which is not supported",
    ),
]


@pytest.mark.parametrize(("args", "error", "message"), BAD_FORWARD)
def test_bad_forward_input(backend, args, error, message):
    with pytest.raises(error, match=re.escape(message)) as info:
        linmaps.bilinear_pairs(*args)
    with linmaps.use_backend("python"), pytest.raises(error) as python_info:
        linmaps.bilinear_pairs(*args)
    assert str(info.value) == str(python_info.value)


@pytest.mark.parametrize(("args", "kwargs", "error", "message"), BAD_BACKWARD)
def test_bad_backward_input(backend, args, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)) as info:
        linmaps.bilinear_pairs_backward(*args, **kwargs)
    with linmaps.use_backend("python"), pytest.raises(error) as python_info:
        linmaps.bilinear_pairs_backward(*args, **kwargs)
    assert str(info.value) == str(python_info.value)


# ----------------------------------------------------------------------------- layer


def _with_ones(array):
    return np.concatenate([array, np.ones(array.shape[:-1] + (1,), array.dtype)], axis=-1)


@pytest.mark.parametrize(("bias_x", "bias_y"), [(False, False), (True, False), (True, True)])
def test_layer_matches_the_function_on_inputs_with_ones(backend, bias_x, bias_y):
    layer = linmaps.BilinearPairs(4, 3, 2, bias_x=bias_x, bias_y=bias_y, dtype=np.float64, seed=0)
    assert layer.weight.shape == (2, 4 + bias_x, 3 + bias_y)
    rng = np.random.default_rng(10)
    x1, x2 = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 6, 3))
    g = rng.standard_normal((2, 5, 6, 2))
    s = layer(x1, x2)
    a1 = _with_ones(x1) if bias_x else x1
    a2 = _with_ones(x2) if bias_y else x2
    assert_close(s, oracle(a1, a2, layer.weight, layer.bias), 21, np.float64, np.float64)
    grad_x1, grad_x2 = layer.backward(g)
    ref = oracle_grads(g, a1, a2, layer.weight)
    assert grad_x1.shape == x1.shape and grad_x2.shape == x2.shape
    np.testing.assert_allclose(grad_x1, ref["x1"][0][..., :4], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_x2, ref["x2"][0][..., :3], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, ref["weight"][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_bias, ref["bias"][0], rtol=1e-12, atol=1e-12)


def test_layer_accumulates_freezes_and_round_trips(backend, tmp_path):
    layer = linmaps.BilinearPairs(3, 3, 2, bias_x=True, bias_y=True, seed=1)
    assert layer.dtype == np.float32
    rng = np.random.default_rng(11)
    x1, x2 = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))  # no batch axis
    g = rng.standard_normal((4, 5, 2)).astype(np.float32)
    layer(x1, x2)
    layer.backward(g)
    once = layer.grad_weight.copy()
    layer(x1, x2)
    layer.backward(g)
    np.testing.assert_allclose(layer.grad_weight, 2 * once, rtol=1e-6)
    layer.zero_grad()
    layer.freeze("weight")
    layer(x1, x2)
    layer.backward(g)
    assert not layer.grad_weight.any() and layer.grad_bias.any()
    path = tmp_path / "pairs.npz"
    layer.save(path)
    other = linmaps.BilinearPairs(3, 3, 2, bias_x=True, bias_y=True, seed=2)
    other.load(path)
    np.testing.assert_array_equal(other.weight, layer.weight)
    np.testing.assert_array_equal(other(x1, x2), layer(x1, x2))
    assert "BilinearPairs(in1_features=3" in repr(layer)


def test_layer_errors():
    layer = linmaps.BilinearPairs(3, 2, 1)
    with pytest.raises(RuntimeError, match="no saved inputs"):
        layer.backward(np.zeros((1, 1, 1)))
    with pytest.raises(ValueError, match=re.escape("input2 size does not match the layer")):
        layer(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layer(np.zeros(3), np.zeros((2, 2)))
    layer(np.zeros((2, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=re.escape("got (2, 3, 1) but expected (2, 4, 1)")):
        layer.backward(np.zeros((2, 3, 1)))


PAIRS_FORK = """
    import os
    import numpy as np
    import linmaps as lm

    x1 = np.ones((2, 64, 128), np.float32)
    x2 = np.ones((2, 48, 128), np.float32)
    w = np.ones((4, 128, 128), np.float32)
    g = np.ones((2, 64, 48, 4), np.float32)

    def work():
        s = lm.bilinear_pairs(x1, x2, w)
        grads = lm.bilinear_pairs_backward(g, x1, x2, w)
        gx1, gw = grads.grad_x1, grads.grad_weight
        return float(s[1, -1, -1, -1]), float(gx1[0, 0, 0]), float(gw[3, 1, 2])

    work()  # the parent's OpenMP threads start
    pid = os.fork()
    if pid == 0:
        print("child", *work(), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    print("parent", *work())
"""


@pytest.mark.skipif(not HAS_CPP, reason="the compiled backend is not available")
def test_forked_child_computes_and_does_not_hang():
    from test_threads import run_script

    lines = run_script(PAIRS_FORK, timeout=60).splitlines()
    # S = in1 * in2; grad_x1 = J * out * in2; grad_weight = batch * I * J.
    expected = ["16384.0", "24576.0", "6144.0"]
    assert lines[0].split() == ["child", *expected]
    assert lines[1].split() == ["parent", *expected]
