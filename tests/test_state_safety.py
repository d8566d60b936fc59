"""State that outlives a call: contexts and layers copied or pickled, a layer's weight changed
between forward and backward, gradient accumulation under numpy.errstate, zero-size features
and budgets beyond 64 bits. Each case gives the answer of an untouched call, bit for bit, or a
clear error; never a silently different result."""

import copy
import pickle

import numpy as np
import pytest

import linmaps
from linmaps import Bilinear, Linear

import reference as ref
from reference import assert_identical

DTYPES = [np.float32, np.float64]


def normal(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def bilinear_args(dtype=np.float32, n=64, in1=16, in2=12, out=8):
    return (
        normal((n, in1), 1, dtype),
        normal((n, in2), 2, dtype),
        normal((out, in1, in2), 3, dtype),
        normal((n, out), 4, dtype),
    )


# ----------------------------------------------------------------------------- contexts


COPIES = {
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
    "pickle": lambda ctx: pickle.loads(pickle.dumps(ctx)),
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_copied_context_gives_the_same_gradients(backend, dtype, how):
    x1, x2, w, g = bilinear_args(dtype)
    _, ctx = linmaps.bilinear_with_context(x1, x2, w)
    assert ctx.kept_bytes > 0
    expected = linmaps.bilinear_backward(g, x1, x2, w)
    duplicate = COPIES[how](ctx)
    assert duplicate.kept_bytes == 0  # T never travels: the copy computes it again
    assert_identical(linmaps.bilinear_backward(g, context=duplicate), expected)
    assert_identical(linmaps.bilinear_backward(g, context=ctx), expected)


@pytest.mark.parametrize("how", list(COPIES))
def test_recycling_a_copy_leaves_the_original_context_intact(backend, how):
    # A shallow copy used to share the kept T: recycling it overwrote the original's T.
    x1, x2, w, g = bilinear_args()
    _, ctx = linmaps.bilinear_with_context(x1, x2, w)
    expected = linmaps.bilinear_backward(g, context=ctx)
    linmaps.bilinear_with_context(2 * x1, x2, w, reuse=COPIES[how](ctx))
    assert_identical(linmaps.bilinear_backward(g, context=ctx), expected)
    assert ctx.kept_bytes > 0


def test_a_pickled_context_from_the_compiled_backend_works_on_the_numpy_backend():
    if "cpp" not in linmaps.available_backends():
        pytest.skip("the compiled backend is not available")
    x1, x2, w, g = bilinear_args(np.float64)
    with linmaps.use_backend("cpp"):
        _, ctx = linmaps.bilinear_with_context(x1, x2, w)
    restored = pickle.loads(pickle.dumps(ctx))
    with linmaps.use_backend("python"):
        assert_identical(
            linmaps.bilinear_backward(g, context=restored), linmaps.bilinear_backward(g, x1, x2, w)
        )


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_a_copied_layer_between_forward_and_backward_gives_the_same_gradients(backend, how):
    x1, x2, _, g = bilinear_args()
    layer = Bilinear(16, 12, 8, seed=0)
    layer(x1, x2)
    assert layer.kept_bytes > 0
    duplicate = {"copy": copy.copy, "deepcopy": copy.deepcopy}.get(
        how, lambda lay: pickle.loads(pickle.dumps(lay))
    )(layer)
    expected = linmaps.bilinear_backward(g, x1, x2, layer.weight)
    if how != "copy":  # a shallow copy shares the accumulators, as Python's copies do
        assert_identical(duplicate.backward(g), expected[:2])
        assert_identical([duplicate.grad_weight], [expected.grad_weight])
    # The copy's forward recycles no buffer of the original's: its T stays the original's.
    duplicate(2 * x1, x2)
    layer.zero_grad()
    assert_identical(layer.backward(g), expected[:2])
    assert_identical([layer.grad_weight, layer.grad_bias], [expected.grad_weight, g.sum(0)])


def test_the_weight_is_read_only_while_a_kept_t_may_be_read(backend):
    x1, x2, _, g = bilinear_args()
    layer = Bilinear(16, 12, 8, seed=0)
    layer(x1, x2)
    assert layer.kept_bytes > 0
    with pytest.raises(ValueError, match="read-only"):
        layer.weight[...] *= 2
    with pytest.raises(ValueError, match="read-only"):
        layer.parameters()[0] -= 1
    expected = linmaps.bilinear_backward(g, x1, x2, layer.weight)
    assert_identical(layer.backward(g), expected[:2])
    layer.weight[...] *= 2  # writable again after the backward: the training loop's update
    assert layer.weight.flags.writeable


@pytest.mark.parametrize("keep_bytes", [None, 0])
def test_a_second_backward_uses_the_weight_as_it_is_then(backend, keep_bytes):
    # Kept or recomputed T: the backward sees the parameters as they are at backward time.
    x1, x2, _, g = bilinear_args()
    layer = Bilinear(16, 12, 8, seed=0, keep_bytes=keep_bytes)
    layer(x1, x2)
    layer.backward(g)
    layer.weight[...] *= 2
    layer.zero_grad()
    expected = linmaps.bilinear_backward(g, x1, x2, layer.weight)
    assert_identical(layer.backward(g), expected[:2])
    assert_identical([layer.grad_weight], [expected.grad_weight])


@pytest.mark.parametrize("how", ["assign", "load_state_dict", "load"])
def test_setting_the_weight_through_the_layer_between_forward_and_backward(backend, how, tmp_path):
    x1, x2, _, g = bilinear_args()
    layer = Bilinear(16, 12, 8, seed=0)
    layer(x1, x2)
    new_weight = normal(layer.weight.shape, 9)
    if how == "assign":
        layer.weight = new_weight
    elif how == "load_state_dict":
        layer.load_state_dict({"weight": new_weight, "bias": layer.bias})
    else:
        np.savez(tmp_path / "w.npz", weight=new_weight, bias=layer.bias)
        layer.load(tmp_path / "w.npz")
    expected = linmaps.bilinear_backward(g, x1, x2, new_weight)
    assert_identical(layer.backward(g), expected[:2])


def test_a_weight_the_user_made_read_only_stays_read_only(backend):
    x1, x2, _, g = bilinear_args()
    layer = Bilinear(16, 12, 8, seed=0)
    layer.weight.flags.writeable = False
    layer(x1, x2)
    layer.backward(g)
    assert not layer.weight.flags.writeable


def test_an_inference_forward_releases_the_weight(backend):
    x1, x2, _, _ = bilinear_args()
    layer = Bilinear(16, 12, 8, seed=0)
    layer(x1, x2)
    layer(x1, x2, save_for_backward=False)
    assert layer.weight.flags.writeable
    layer.weight[...] = 0


@pytest.mark.parametrize("kind", ["linear", "bilinear"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulation_is_all_or_nothing_under_errstate_raise(backend, kind, dtype):
    # grad_weight overflows, grad_bias does not: both are updated, on every path, no error.
    big = np.finfo(dtype).max
    if kind == "linear":
        layer = Linear(3, 2, seed=0, dtype=dtype)
        x = np.full((4, 3), big / 2, dtype=dtype)
        layer.grad_weight[...] = big
        layer(x)
        with np.errstate(all="raise"):
            layer.backward(np.ones((4, 2), dtype=dtype))
    else:
        layer = Bilinear(3, 2, 2, seed=0, dtype=dtype)
        x1 = np.full((4, 3), big / 2, dtype=dtype)
        x2 = np.ones((4, 2), dtype=dtype)
        layer.grad_weight[...] = big
        layer(x1, x2)
        with np.errstate(all="raise"):
            layer.backward(np.ones((4, 2), dtype=dtype))
    assert np.all(np.isinf(layer.grad_weight))
    np.testing.assert_array_equal(layer.grad_bias, 4)


# ----------------------------------------------------------------------------- zero sizes


@pytest.mark.parametrize("features", [(0, 4, 2), (3, 0, 2), (3, 4, 0), (0, 0, 2), (0, 0, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_feature_bilinear_layers_work_throughout(backend, features, dtype):
    in1, in2, out = features
    layer = Bilinear(in1, in2, out, dtype=dtype, seed=0)
    x1, x2, g = normal((5, in1), 1, dtype), normal((5, in2), 2, dtype), normal((5, out), 3, dtype)
    z = layer(x1, x2)
    expected_z, _ = ref.bilinear(x1, x2, layer.weight, layer.bias)  # (value, magnitude)
    np.testing.assert_allclose(z, expected_z, rtol=1e-5, atol=1e-5)
    grad_x1, grad_x2 = layer.backward(g)
    expected = [value for value, _ in ref.bilinear_grads(g, x1, x2, layer.weight)]
    for got, want in zip((grad_x1, grad_x2, layer.grad_weight), expected):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.grad_bias, g.sum(0))


@pytest.mark.parametrize("features", [(0, 3), (4, 0), (0, 0)])
def test_zero_feature_linear_layers_work_throughout(backend, features):
    in_features, out = features
    layer = Linear(in_features, out, seed=0)
    x, g = normal((5, in_features), 1), normal((5, out), 3)
    y = layer(x)
    np.testing.assert_allclose(y, ref.linear(x, layer.weight, layer.bias)[0], rtol=1e-6, atol=1e-6)
    grad_x = layer.backward(g)
    (expected_x, _), (expected_weight, _), _ = ref.linear_grads(g, x, layer.weight)
    np.testing.assert_allclose(grad_x, expected_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.grad_weight, expected_weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.grad_bias, g.sum(0))


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("keep_bytes", [2**63, 2**64 + 5])
def test_a_budget_beyond_64_bits_is_refused_everywhere(backend, keep_bytes):
    x1, x2, w, _ = bilinear_args()
    pattern = r"keep_bytes must be at most 2\*\*63 - 1, got " + str(keep_bytes)
    with pytest.raises(ValueError, match=r"^bilinear_with_context\(\): " + pattern):
        linmaps.bilinear_with_context(x1, x2, w, keep_bytes=keep_bytes)
    with pytest.raises(ValueError, match=r"^Bilinear\(\): " + pattern):
        Bilinear(16, 12, 8, keep_bytes=keep_bytes)
    layer = Bilinear(16, 12, 8)
    with pytest.raises(ValueError, match=r"^Bilinear.keep_bytes\(\): " + pattern):
        layer.keep_bytes = keep_bytes
    with pytest.raises(ValueError, match=r"^Bilinear.forward\(\): " + pattern):
        layer(x1, x2, keep_bytes=keep_bytes)


def test_the_largest_budget_keeps_t(backend):
    x1, x2, w, g = bilinear_args()
    _, ctx = linmaps.bilinear_with_context(x1, x2, w, keep_bytes=2**63 - 1)
    assert ctx.kept_bytes > 0
    assert_identical(
        linmaps.bilinear_backward(g, context=ctx), linmaps.bilinear_backward(g, x1, x2, w)
    )
