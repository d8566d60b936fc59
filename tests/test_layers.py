"""The layer classes ``Linear`` and ``Bilinear``: forward and backward against the functional
API and the einsum oracle, gradient accumulation, freezing, state dicts, initialisation, every
error case, and the training example."""

import io
import os
import re
import runpy
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

import linmaps
from linmaps import Bilinear, Linear

import reference as ref

DTYPES = [np.float32, np.float64]
LEAD_SHAPES = [(), (5,), (2, 3)]
EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_bilinear.py"
)
SMALL_EXAMPLE_ARGS = [
    "--steps",
    "100",
    "--batch",
    "32",
    "--in1",
    "6",
    "--in2",
    "5",
    "--hidden",
    "4",
    "--out",
    "3",
    "--print-every",
    "50",
]


def normal(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def assert_same(actual, expected):
    """Equal shape and dtype, values equal up to a few roundings (two calls of one backend)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    eps = np.finfo(expected.dtype).eps
    scale = max(1.0, float(np.abs(expected).max(initial=0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=16 * eps * scale)


def linear_case(dtype, bias=True, lead=(5,), seed=0):
    layer = Linear(4, 3, bias=bias, dtype=dtype, seed=seed)
    return layer, normal((*lead, 4), seed + 1), normal((*lead, 3), seed + 2)


def bilinear_case(dtype, bias=True, lead=(5,), seed=0):
    layer = Bilinear(4, 3, 2, bias=bias, dtype=dtype, seed=seed)
    return (
        layer,
        normal((*lead, 4), seed + 1),
        normal((*lead, 3), seed + 2),
        normal((*lead, 2), seed + 3),
    )


# ----------------------------------------------------------------------------- forward/backward


@pytest.mark.parametrize("lead", LEAD_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_functional_api_and_oracle(backend, dtype, bias, lead):
    layer, x, grad_y = linear_case(dtype, bias, lead)
    n = int(np.prod(lead))
    y = layer(x)
    # The layer computes in its own dtype: the float64 input is converted first.
    x_cast, grad_cast = x.astype(dtype), grad_y.astype(dtype)
    assert_same(y, linmaps.linear(x_cast, layer.weight, layer.bias))
    ref.assert_close(y, ref.linear(x_cast, layer.weight, layer.bias), 4 + 1, dtype, dtype)

    grad_x = layer.backward(grad_y)
    expected = linmaps.linear_backward(grad_cast, x_cast, layer.weight, bias=bias)
    assert_same(grad_x, expected.grad_x)
    assert_same(layer.grad_weight, expected.grad_weight)
    oracle_x, oracle_w, oracle_b = ref.linear_grads(grad_cast, x_cast, layer.weight)
    ref.assert_close(grad_x, oracle_x, 3, dtype, dtype)
    ref.assert_close(layer.grad_weight, oracle_w, n, dtype, dtype)
    if bias:
        assert_same(layer.grad_bias, expected.grad_bias)
        ref.assert_close(layer.grad_bias, oracle_b, n, dtype, dtype)
    else:
        assert layer.bias is None and layer.grad_bias is None


@pytest.mark.parametrize("lead", LEAD_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_matches_functional_api_and_oracle(backend, dtype, bias, lead):
    layer, x1, x2, grad_z = bilinear_case(dtype, bias, lead)
    n = int(np.prod(lead))
    z = layer(x1, x2)
    x1c, x2c, gc = x1.astype(dtype), x2.astype(dtype), grad_z.astype(dtype)
    assert_same(z, linmaps.bilinear(x1c, x2c, layer.weight, layer.bias))
    ref.assert_close(z, ref.bilinear(x1c, x2c, layer.weight, layer.bias), 4 * 3 + 1, dtype, dtype)

    grad_x1, grad_x2 = layer.backward(grad_z)
    expected = linmaps.bilinear_backward(gc, x1c, x2c, layer.weight, bias=bias)
    assert_same(grad_x1, expected.grad_x1)
    assert_same(grad_x2, expected.grad_x2)
    assert_same(layer.grad_weight, expected.grad_weight)
    oracle = ref.bilinear_grads(gc, x1c, x2c, layer.weight)
    ref.assert_close(grad_x1, oracle[0], 2 * 3, dtype, dtype)
    ref.assert_close(grad_x2, oracle[1], 2 * 4, dtype, dtype)
    ref.assert_close(layer.grad_weight, oracle[2], n, dtype, dtype)
    if bias:
        assert_same(layer.grad_bias, expected.grad_bias)
        ref.assert_close(layer.grad_bias, oracle[3], n, dtype, dtype)
    else:
        assert layer.bias is None and layer.grad_bias is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_and_input_gradients_have_the_layer_dtype(backend, dtype):
    linear = Linear(3, 2, dtype=dtype, seed=0)
    bilinear = Bilinear(3, 2, 2, dtype=dtype, seed=0)
    for x in (
        np.ones((4, 3), np.float64),
        np.ones((4, 3), np.float16),
        np.ones((4, 3), int),
        np.ones((4, 3), bool),
    ):
        y = linear(x)
        assert y.dtype == dtype and linear.backward(y).dtype == dtype
        z = bilinear(x, x[:, :2])
        assert z.dtype == dtype
        assert all(g.dtype == dtype for g in bilinear.backward(z))
    assert linear.grad_weight.dtype == dtype and bilinear.grad_weight.dtype == dtype


def test_empty_batch_and_zero_features(backend):
    layer = Linear(0, 3, seed=0)
    np.testing.assert_array_equal(layer.bias, 0)  # no fan-in, no init scale
    y = layer(np.ones((2, 0)))
    np.testing.assert_array_equal(y, np.zeros((2, 3)))
    assert layer.backward(np.ones((2, 3))).shape == (2, 0)
    np.testing.assert_array_equal(layer.grad_bias, 2)
    bilinear = Bilinear(2, 3, 4, seed=0)
    z = bilinear(np.ones((0, 2)), np.ones((0, 3)))
    assert z.shape == (0, 4)
    grad_x1, grad_x2 = bilinear.backward(np.ones((0, 4)))
    assert grad_x1.shape == (0, 2) and grad_x2.shape == (0, 3)
    np.testing.assert_array_equal(bilinear.grad_weight, 0)


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_backward_calls_accumulate_twice_one(backend, dtype):
    layer, x, grad_y = linear_case(dtype)
    layer(x)
    layer.backward(grad_y)
    once = [g.copy() for g in layer.gradients()]
    layer.backward(grad_y)  # again, on the same saved input
    for twice, one in zip(layer.gradients(), once):
        np.testing.assert_array_equal(twice, 2 * one)  # g + g == 2 g exactly

    bilinear, x1, x2, grad_z = bilinear_case(dtype)
    bilinear(x1, x2)
    bilinear.backward(grad_z)
    once = [g.copy() for g in bilinear.gradients()]
    bilinear(x1, x2)  # a new forward does not reset the accumulators
    bilinear.backward(grad_z)
    for twice, one in zip(bilinear.gradients(), once):
        np.testing.assert_array_equal(twice, 2 * one)


def test_accumulation_over_batches_is_the_sum(backend):
    layer = Bilinear(4, 3, 2, seed=0)
    grads = []
    for seed in (10, 20):
        _, x1, x2, grad_z = bilinear_case(np.float32, seed=seed)
        single = Bilinear(4, 3, 2, seed=0)
        single(x1, x2)
        single.backward(grad_z)
        grads.append(single.gradients())
        layer(x1, x2)
        layer.backward(grad_z)
    for total, first, second in zip(layer.gradients(), *grads):
        np.testing.assert_array_equal(total, first + second)


def test_zero_grad_zeroes_in_place(backend):
    layer, x, grad_y = linear_case(np.float32)
    accumulators = layer.gradients()
    layer(x)
    layer.backward(grad_y)
    layer.freeze()  # frozen parameters' accumulators are zeroed too
    assert all(np.any(g != 0) for g in accumulators)
    layer.zero_grad()
    assert [id(g) for g in layer.gradients()] == [id(g) for g in accumulators]
    for grad in accumulators:
        np.testing.assert_array_equal(grad, 0)


# ----------------------------------------------------------------------------- skipping gradients


def test_need_input_flags_return_none_and_still_accumulate(backend):
    layer, x, grad_y = linear_case(np.float64)
    layer(x)
    assert layer.backward(grad_y, need_x=False) is None
    expected = linmaps.linear_backward(grad_y, x, layer.weight)
    assert_same(layer.grad_weight, expected.grad_weight)
    assert_same(layer.grad_bias, expected.grad_bias)

    bilinear, x1, x2, grad_z = bilinear_case(np.float64)
    bilinear(x1, x2)
    expected = linmaps.bilinear_backward(grad_z, x1, x2, bilinear.weight)
    grad_x1, grad_x2 = bilinear.backward(grad_z, need_x1=False)
    assert grad_x1 is None
    assert_same(grad_x2, expected.grad_x2)
    grad_x1, grad_x2 = bilinear.backward(grad_z, need_x2=False)
    assert_same(grad_x1, expected.grad_x1)
    assert grad_x2 is None
    assert bilinear.backward(grad_z, need_x1=False, need_x2=False) == (None, None)
    assert_same(bilinear.grad_weight, 3 * expected.grad_weight)


@pytest.mark.parametrize("frozen", [("weight",), ("bias",), ("weight", "bias")])
def test_frozen_parameters_get_no_gradient(backend, frozen):
    layer, x1, x2, grad_z = bilinear_case(np.float64)
    reference_layer, *_ = bilinear_case(np.float64)
    assert layer.freeze(*frozen) is layer
    assert layer.frozen == frozenset(frozen)
    layer(x1, x2)
    reference_layer(x1, x2)
    grads = layer.backward(grad_z)
    expected = reference_layer.backward(grad_z)
    for got, want in zip(grads, expected):  # input gradients are unaffected by freezing
        assert_same(got, want)
    for name, grad in layer.named_gradients():
        if name in frozen:
            np.testing.assert_array_equal(grad, 0)
        else:
            assert_same(grad, dict(reference_layer.named_gradients())[name])
    trainable = [name for name, _ in layer.named_parameters(trainable_only=True)]
    assert trainable == [name for name in ("weight", "bias") if name not in frozen]
    assert len(layer.gradients(trainable_only=True)) == len(trainable)

    layer.unfreeze()
    assert layer.frozen == frozenset()
    layer.backward(grad_z)
    for name, grad in layer.named_gradients():
        want = dict(reference_layer.named_gradients())[name]
        assert_same(grad, want if name in frozen else 2 * want)


def test_freezing_a_gradient_keeps_its_accumulated_value(backend):
    layer, x, grad_y = linear_case(np.float64)
    layer(x)
    layer.backward(grad_y)
    before = layer.grad_weight.copy()
    layer.freeze("weight")
    layer.backward(grad_y)
    np.testing.assert_array_equal(layer.grad_weight, before)


def test_skip_flags_reach_the_functional_api(backend, monkeypatch):
    calls = []

    def spy(function):
        def wrapper(*args, **kwargs):
            calls.append({k: v for k, v in kwargs.items() if k != "context"})
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(linmaps._api, "linear_backward", spy(linmaps._api.linear_backward))
    monkeypatch.setattr(linmaps._api, "bilinear_backward", spy(linmaps._api.bilinear_backward))
    layer, x, grad_y = linear_case(np.float32)
    layer.freeze("weight")
    layer(x)
    layer.backward(grad_y, need_x=False)
    assert calls[-1] == {"bias": True, "need_x": False, "need_weight": False}
    no_bias = Linear(4, 3, bias=False, seed=0)
    no_bias(x)
    no_bias.backward(grad_y)
    assert calls[-1] == {"bias": False, "need_x": True, "need_weight": True}
    bilinear, x1, x2, grad_z = bilinear_case(np.float32)
    bilinear.freeze("bias")
    bilinear(x1, x2)
    bilinear.backward(grad_z, need_x2=False)
    assert calls[-1] == {"bias": False, "need_x1": True, "need_x2": False, "need_weight": True}


# ----------------------------------------------------------------------------- saved inputs


def test_inputs_modified_after_forward_do_not_change_backward(backend):
    layer, x1, x2, grad_z = bilinear_case(np.float32)
    x1, x2 = x1.astype(np.float32), x2.astype(np.float32)  # no conversion copy needed
    layer(x1, x2)
    expected = linmaps.bilinear_backward(grad_z.astype(np.float32), x1, x2, layer.weight)
    x1[...] = 7
    x2[...] = -3
    grad_x1, grad_x2 = layer.backward(grad_z)
    assert_same(grad_x1, expected.grad_x1)
    assert_same(grad_x2, expected.grad_x2)
    assert_same(layer.grad_weight, expected.grad_weight)


def test_copy_inputs_false_keeps_a_reference(backend):
    layer = Linear(4, 3, seed=0, copy_inputs=False)
    assert not layer.copy_inputs and Linear(1, 1).copy_inputs
    x = normal((5, 4), dtype=np.float32)
    grad_y = normal((5, 3), dtype=np.float32)
    layer(x)
    x[...] = 1  # documented: with copy_inputs=False the backward sees this change
    layer.backward(grad_y)
    expected = linmaps.linear_backward(grad_y, x, layer.weight)
    assert_same(layer.grad_weight, expected.grad_weight)


def test_backward_without_saved_inputs_raises(backend):
    for layer, backward in (
        (Linear(2, 3), lambda lay: lay.backward(np.ones(3))),
        (Bilinear(2, 2, 3), lambda lay: lay.backward(np.ones(3))),
    ):
        name = type(layer).__name__
        with pytest.raises(RuntimeError, match=rf"^{name}\.backward\(\): no saved inputs"):
            backward(layer)
    layer = Linear(2, 3)
    layer(np.ones(2))
    layer.backward(np.ones(3))  # fine
    layer(np.ones(2), save_for_backward=False)  # inference: releases the saved input
    with pytest.raises(RuntimeError, match="no saved inputs"):
        layer.backward(np.ones(3))
    bilinear = Bilinear(2, 2, 3)
    bilinear(np.ones(2), np.ones(2))
    with pytest.raises(ValueError):
        bilinear(np.ones(3), np.ones(2))  # a failed forward releases the old inputs as well
    with pytest.raises(RuntimeError, match="no saved inputs"):
        bilinear.backward(np.ones(3))


# ----------------------------------------------------------------------------- parameters


def test_parameters_and_gradients_are_live_and_ordered():
    layer = Bilinear(3, 2, 4, seed=0)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.parameters()[0] is layer.weight and layer.parameters()[1] is layer.bias
    assert layer.gradients()[0] is layer.grad_weight and layer.gradients()[1] is layer.grad_bias
    assert [name for name, _ in layer.named_gradients()] == ["weight", "bias"]
    assert layer.weight.shape == layer.grad_weight.shape == (4, 3, 2)
    assert layer.bias.shape == layer.grad_bias.shape == (4,)
    no_bias = Linear(3, 2, bias=False)
    assert [name for name, _ in no_bias.named_parameters()] == ["weight"]
    assert len(no_bias.gradients()) == 1
    assert no_bias.weight.shape == (2, 3)


def test_sgd_step_in_place_updates_the_layer(backend):
    layer, x, grad_y = linear_case(np.float64)
    layer(x)
    layer.backward(grad_y)
    before = [p.copy() for p in layer.parameters()]
    for param, grad in zip(layer.parameters(), layer.gradients()):
        param -= 0.1 * grad
    for param, old, grad in zip(layer.parameters(), before, layer.gradients()):
        np.testing.assert_array_equal(param, old - 0.1 * grad)
    weight = layer.weight
    layer.weight -= 1.0  # property get, in-place subtract, set of the same array
    assert layer.weight is weight


@pytest.mark.parametrize("dtype", DTYPES)
def test_assigning_parameters_copies_and_casts(dtype):
    layer = Bilinear(3, 2, 4, dtype=dtype, seed=0)
    weight, params = layer.weight, layer.parameters()
    new = normal((4, 3, 2), seed=5)  # float64
    layer.weight = new
    assert layer.weight is weight and params[0] is weight  # references stay valid
    assert layer.weight.dtype == dtype
    np.testing.assert_array_equal(layer.weight, new.astype(dtype))
    new[...] = 0  # the layer holds a copy
    assert np.all(layer.weight != 0)
    layer.bias = [1, 2, 3, 4]  # any real array_like; integers are cast
    np.testing.assert_array_equal(layer.bias, np.array([1, 2, 3, 4], dtype))
    no_bias = Linear(2, 2, bias=False)
    no_bias.bias = None  # nothing to do
    assert no_bias.bias is None


@pytest.mark.parametrize("errors", ["default", "raise"])
def test_conversions_to_the_layer_dtype_round_silently(backend, errors):
    # A float64 value beyond float32's range becomes inf in a float32 layer (and a tiny one
    # 0), as float32 arithmetic overflows: no NumPy cast warning (an error under pytest) and no
    # FloatingPointError, whatever numpy.errstate says.
    big, tiny = 1e300, 1e-300
    layer, same = Linear(2, 2, seed=0), Linear(2, 2, seed=0)
    with np.errstate(all="raise") if errors == "raise" else np.errstate():
        y = layer(np.array([[big, 1.0]]))
        grad_x = layer.backward(np.array([[big, tiny]]))
        layer.load_state_dict({"weight": [[big, 0.0], [tiny, 1.0]], "bias": [0.0, 0.0]})
        layer.bias = np.array([-big, tiny])
    # The same layer fed the float32 values those round to gives the same results.
    y_same = same(np.array([[np.inf, 1.0]], np.float32))
    grad_x_same = same.backward(np.array([[np.inf, 0.0]], np.float32))
    assert y.dtype == grad_x.dtype == np.float32
    assert np.isinf(y).all() and np.isinf(grad_x).any()
    np.testing.assert_array_equal(y, y_same)
    np.testing.assert_array_equal(grad_x, grad_x_same)
    np.testing.assert_array_equal(layer.grad_weight, same.grad_weight)
    np.testing.assert_array_equal(layer.weight, [[np.inf, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(layer.bias, [-np.inf, 0.0])


def test_assigning_parameters_rejects_bad_values():
    layer = Bilinear(3, 2, 4, seed=0)
    with pytest.raises(ValueError, match=r"got \(4, 3\) but expected \(4, 3, 2\)"):
        layer.weight = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"got \(3,\) but expected \(4,\)"):
        layer.bias = np.ones(3)
    with pytest.raises(ValueError):
        layer.weight = np.ones((4, 3, 2, 1))  # no broadcasting or squeezing either
    with pytest.raises(TypeError, match="complex128"):
        layer.weight = np.ones((4, 3, 2), complex)
    with pytest.raises(TypeError):
        layer.weight = None
    with pytest.raises(TypeError):
        layer.weight = "weights"
    with pytest.raises(ValueError, match="cannot set bias to None"):
        layer.bias = None
    with pytest.raises(ValueError, match="bias=False"):
        Linear(2, 2, bias=False).bias = np.ones(2)
    with pytest.raises(AttributeError):
        layer.grad_weight = np.zeros((4, 3, 2))


# ----------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(backend, bias):
    layer = Bilinear(3, 2, 4, bias=bias, seed=0)
    state = layer.state_dict()
    assert list(state) == (["weight", "bias"] if bias else ["weight"])
    np.testing.assert_array_equal(state["weight"], layer.weight)
    assert state["weight"] is not layer.weight  # a snapshot
    layer.weight += 1
    assert not np.array_equal(state["weight"], layer.weight)

    other = Bilinear(3, 2, 4, bias=bias, seed=1)
    assert other.load_state_dict(state) == ([], [])
    layer.load_state_dict(state)
    x1, x2 = normal((5, 3)), normal((5, 2))
    np.testing.assert_array_equal(other(x1, x2), layer(x1, x2))


def test_npz_round_trip(backend, tmp_path):
    layer = Linear(4, 3, seed=0)
    path = tmp_path / "linear.npz"
    layer.save(path)
    restored = Linear(4, 3, seed=1)
    restored.load(path)
    for got, want in zip(restored.parameters(), layer.parameters()):
        np.testing.assert_array_equal(got, want)

    # The documented NumPy-only route, interchangeable with save/load.
    np.savez(tmp_path / "numpy.npz", **layer.state_dict())
    with np.load(tmp_path / "numpy.npz") as archive:
        assert sorted(archive.files) == ["bias", "weight"]
        Linear(4, 3, seed=2).load_state_dict(archive)
    again = Linear(4, 3, seed=3)
    again.load(tmp_path / "numpy.npz")
    np.testing.assert_array_equal(again.weight, layer.weight)

    # save writes exactly the path given (no .npz appended), also to an open file.
    layer.save(tmp_path / "noext")
    assert (tmp_path / "noext").exists()
    Linear(4, 3).load(str(tmp_path / "noext"))
    with open(tmp_path / "file.npz", "wb") as file:
        layer.save(file)
    Linear(4, 3).load(tmp_path / "file.npz")


def test_load_state_dict_casts_to_the_layer_dtype():
    source = Linear(4, 3, dtype=np.float64, seed=0)
    target = Linear(4, 3, dtype=np.float32, seed=1)
    target.load_state_dict(source.state_dict())
    assert target.weight.dtype == np.float32
    np.testing.assert_array_equal(target.weight, source.weight.astype(np.float32))


def test_load_state_dict_errors(tmp_path):
    layer = Linear(4, 3, seed=0)
    good = layer.state_dict()
    original = layer.state_dict()
    with pytest.raises(ValueError, match=r"missing key\(s\) \['bias'\]"):
        layer.load_state_dict({"weight": good["weight"]})
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['extra'\]"):
        layer.load_state_dict({**good, "extra": np.ones(1)})
    with pytest.raises(ValueError, match=r"got \(3, 5\) but expected \(3, 4\)"):
        layer.load_state_dict({"weight": np.ones((3, 5)), "bias": np.ones(3)})
    # A bad entry leaves every parameter untouched.
    with pytest.raises(ValueError, match="bias shape"):
        layer.load_state_dict({"weight": np.zeros((3, 4)), "bias": np.zeros(2)})
    with pytest.raises(TypeError, match="complex"):
        layer.load_state_dict({"weight": np.zeros((3, 4)), "bias": np.zeros(3, complex)})
    for name, value in original.items():
        np.testing.assert_array_equal(getattr(layer, name), value)
    with pytest.raises(TypeError, match="mapping"):
        layer.load_state_dict([("weight", good["weight"])])
    with pytest.raises(TypeError, match="strict must be a bool"):
        layer.load_state_dict(good, strict="no")

    result = layer.load_state_dict({"weight": np.zeros((3, 4)), "extra": 1}, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(layer.weight, 0)
    np.testing.assert_array_equal(layer.bias, original["bias"])

    np.save(tmp_path / "single.npy", np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"not an \.npz archive"):
        layer.load(tmp_path / "single.npy")
    Bilinear(2, 2, 2, bias=False).save(tmp_path / "no_bias.npz")
    with pytest.raises(ValueError, match="missing key"):
        Bilinear(2, 2, 2).load(tmp_path / "no_bias.npz")


# ----------------------------------------------------------------------------- loading files


def npy_bytes(array) -> bytes:
    """``array`` as the bytes of a .npy file (objects pickled, as only a hostile file would)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def write_zip(path, members: dict, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def good_members(weight=None, bias=None) -> dict:
    """The members of a valid archive for a Linear(4, 3), with ``weight``/``bias`` replaced."""
    weight = np.ones((3, 4)) if weight is None else weight
    bias = np.ones(3) if bias is None else bias
    return {"weight.npy": npy_bytes(weight), "bias.npy": npy_bytes(bias)}


def with_flipped_byte(path, offset_in_member: int, member: str = "weight.npy"):
    """Flip one byte of ``member``'s stored (possibly compressed) data in place."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    # A local file header is 30 bytes plus the name and the extra field.
    name_len, extra_len = np.frombuffer(
        data[info.header_offset + 26 : info.header_offset + 30], "<u2"
    )
    start = info.header_offset + 30 + int(name_len) + int(extra_len)
    data[start + offset_in_member] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def savez_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# name: (write the file at `path` for a Linear(4, 3) with a bias, the reason in the message)
BAD_FILES = {
    "empty file": (lambda p: p.write_bytes(b""), "the file is empty"),
    "not a zip file": (lambda p: p.write_text("weight,bias\n"), r"not an \.npz archive"),
    "a single .npy array": (
        lambda p: p.write_bytes(npy_bytes(np.ones((3, 4)))),
        r"single array \(\.npy\)",
    ),
    "truncated archive": (
        lambda p: p.write_bytes(savez_bytes(weight=np.ones((3, 4)), bias=np.ones(3))[:300]),
        r"not an \.npz archive: no zip directory found",
    ),
    "corrupt stored data": (
        lambda p: with_flipped_byte(write_zip(p, good_members()), 140),
        r"corrupt or unreadable archive \(BadZipFile: Bad CRC-32",
    ),
    "corrupt compressed data": (
        lambda p: with_flipped_byte(write_zip(p, good_members(), zipfile.ZIP_DEFLATED), 5),
        r"corrupt or unreadable archive",
    ),
    "a member that is not .npy": (
        lambda p: write_zip(p, {"weight": b"3 4\n1 1 1 1", "bias.npy": npy_bytes(np.ones(3))}),
        r"member 'weight' is not a \.npy array",
    ),
    "a complex member": (
        lambda p: write_zip(p, good_members(weight=np.ones((3, 4), complex))),
        r"member 'weight\.npy' has dtype complex128, which cannot be cast",
    ),
    "an object member": (
        lambda p: write_zip(p, good_members(bias=np.array([None, 1, 2], dtype=object))),
        r"member 'bias\.npy' has dtype object",
    ),
    "a string member": (
        lambda p: write_zip(p, good_members(bias=np.array(["1", "2", "3"]))),
        r"member 'bias\.npy' has dtype <U1",
    ),
    "a member of the wrong shape": (
        lambda p: write_zip(p, good_members(weight=np.ones((4, 3)))),
        r"weight shape does not match the layer: got \(4, 3\) but expected \(3, 4\)",
    ),
    "a truncated member": (
        lambda p: write_zip(p, {**good_members(), "weight.npy": npy_bytes(np.ones((3, 4)))[:-8]}),
        r"member 'weight\.npy' is truncated: 88 of 96 data bytes",
    ),
    "a member longer than its header": (
        lambda p: write_zip(p, {**good_members(), "bias.npy": npy_bytes(np.ones(3)) + b"\0" * 8}),
        r"member 'bias\.npy' holds more data than its header describes",
    ),
    "a malformed header": (
        lambda p: write_zip(
            p, {**good_members(), "bias.npy": b"\x93NUMPY\x01\x00\x0c\x00{'shape': 3}"}
        ),
        r"member 'bias\.npy' has a malformed \.npy header",
    ),
    "a member twice": (
        lambda p: write_zip(p, {**good_members(), "weight": npy_bytes(np.zeros((3, 4)))}),
        r"two members hold 'weight': 'weight\.npy' and 'weight'",
    ),
    "a missing member": (
        lambda p: write_zip(p, {"weight.npy": npy_bytes(np.ones((3, 4)))}),
        r"missing key\(s\) \['bias'\], unexpected key\(s\) \[\]",
    ),
    "an unexpected member": (
        lambda p: write_zip(p, {**good_members(), "running_mean.npy": npy_bytes(np.ones(3))}),
        r"missing key\(s\) \[\], unexpected key\(s\) \['running_mean'\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_every_failed_load_raises_load_error(tmp_path, case):
    write, reason = BAD_FILES[case]
    path = tmp_path / "layer.npz"
    write(path)
    layer = Linear(4, 3, seed=0)
    before = layer.state_dict()
    with pytest.raises(linmaps.LoadError) as info:
        layer.load(path)
    assert isinstance(info.value, ValueError)  # documented: a ValueError subclass
    message = str(info.value)
    assert message.startswith(f"Linear.load(): cannot load {str(path)!r}: "), message
    assert re.search(reason, message), message
    for name, value in before.items():  # a failed load leaves the layer unchanged
        np.testing.assert_array_equal(getattr(layer, name), value)
    # The same from an open file object, named by its file name.
    with open(path, "rb") as file, pytest.raises(linmaps.LoadError, match=reason):
        layer.load(file)


def test_load_errors_name_a_nameless_file_object_by_type():
    with pytest.raises(linmaps.LoadError, match=r"^Bilinear\.load\(\): cannot load <BytesIO>: "):
        Bilinear(2, 2, 2).load(io.BytesIO(b""))


def test_a_file_that_cannot_be_opened_raises_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        Linear(4, 3).load(tmp_path / "missing.npz")
    with pytest.raises(IsADirectoryError):
        Linear(4, 3).load(tmp_path)


def write_bomb(path, member: str, shape: tuple, others: dict):
    """A small archive whose ``member`` claims ``shape`` float64 zeros (deflated ~1000:1)."""
    nbytes = 8 * int(np.prod(shape))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in others.items():
            archive.writestr(name, data)
        with archive.open(member, "w", force_zip64=True) as stream:
            header = {"descr": "<f8", "fortran_order": False, "shape": shape}
            npy_format.write_array_header_1_0(stream, header)
            zeros = bytes(1 << 20)
            for _ in range(nbytes >> 20):
                stream.write(zeros)
    return nbytes


def peak_traced_bytes(function):
    """Peak memory traced (NumPy's array data included) while ``function()`` runs."""
    tracemalloc.start()
    try:
        function()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("member", ["weight", "bias"])
def test_load_checks_every_header_before_reading_data(tmp_path, member):
    # A decompression bomb: a member whose header claims tens of MiB in a file of ~50 kB.
    # Its header is read and rejected before any data: the other member's data neither.
    shapes = {"weight": (3, 1 << 21), "bias": (1 << 22,)}
    others = {k: v for k, v in good_members().items() if not k.startswith(member)}
    path = tmp_path / "bomb.npz"
    claimed = write_bomb(path, f"{member}.npy", shapes[member], others)
    assert path.stat().st_size < claimed / 200
    layer = Linear(4, 3, seed=0)
    before = layer.state_dict()

    def load():
        with pytest.raises(linmaps.LoadError, match=f"{member} shape does not match the layer"):
            layer.load(path)

    assert peak_traced_bytes(load) < (1 << 20) < claimed / 30
    for name, value in before.items():
        np.testing.assert_array_equal(getattr(layer, name), value)


def test_load_not_strict_skips_unexpected_members_unread(tmp_path):
    path = tmp_path / "extra.npz"
    claimed = write_bomb(path, "extra.npy", (1 << 22,), good_members(np.full((3, 4), 2.0)))
    layer = Linear(4, 3, seed=0)
    result = []
    assert peak_traced_bytes(lambda: result.append(layer.load(path, strict=False))) < claimed / 30
    assert result == [([], ["extra"])]
    np.testing.assert_array_equal(layer.weight, 2.0)


def test_load_accepts_any_real_dtype_byte_order_layout_and_compression(tmp_path):
    weight = np.arange(12.0).reshape(3, 4)
    cases = {
        "big-endian": {"weight": weight.astype(">f8"), "bias": np.arange(3, dtype=">i4")},
        "Fortran order": {"weight": np.asfortranarray(weight), "bias": np.arange(3.0)},
        "integer and bool": {"weight": weight.astype(np.int16), "bias": np.array([0, 1, 2])},
        "float16": {"weight": weight.astype(np.float16), "bias": np.arange(3.0, dtype="<f2")},
    }
    for name, arrays in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        layer = Linear(4, 3, dtype=np.float64, seed=0)
        assert layer.load(path) == ([], []), name
        np.testing.assert_array_equal(layer.weight, weight, err_msg=name)
        np.testing.assert_array_equal(layer.bias, [0.0, 1.0, 2.0], err_msg=name)
        assert layer.weight.dtype == np.float64 and layer.weight.flags.c_contiguous
    # Missing members with strict=False keep their values.
    write_zip(tmp_path / "weight_only.npz", {"weight.npy": npy_bytes(weight)})
    layer = Linear(4, 3, seed=0)
    bias = layer.bias.copy()
    assert layer.load(tmp_path / "weight_only.npz", strict=False) == (["bias"], [])
    np.testing.assert_array_equal(layer.weight, weight)
    np.testing.assert_array_equal(layer.bias, bias)


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("dtype", DTYPES)
def test_init_is_uniform_in_plus_minus_one_over_sqrt_fan_in(dtype):
    for layer, fan_in in (
        (Linear(64, 50, dtype=dtype, seed=0), 64),
        (Bilinear(4, 30, 40, dtype=dtype, seed=0), 4),
    ):
        bound = 1 / np.sqrt(fan_in)
        weight = layer.weight.astype(np.float64)
        # Drawn in float64, rounded once: at most half an ulp beyond the bound.
        assert np.abs(weight).max() <= bound * (1 + np.finfo(dtype).eps)
        assert weight.max() > 0.95 * bound and weight.min() < -0.95 * bound
        assert abs(weight.mean()) < 0.05 * bound
        assert np.abs(layer.bias.astype(np.float64)).max() <= bound * (1 + np.finfo(dtype).eps)
        assert layer.weight.dtype == layer.bias.dtype == dtype
        assert layer.dtype == dtype
        for grad in layer.gradients():
            assert grad.dtype == dtype
            np.testing.assert_array_equal(grad, 0)


def test_init_is_deterministic_with_seed_or_rng():
    first, second = Bilinear(5, 4, 3, seed=0), Bilinear(5, 4, 3, seed=0)
    for a, b in zip(first.parameters(), second.parameters()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(Bilinear(5, 4, 3, seed=1).weight, first.weight)
    from_rng = Bilinear(5, 4, 3, rng=np.random.default_rng(0))  # seed=s is default_rng(s)
    np.testing.assert_array_equal(from_rng.weight, first.weight)
    np.testing.assert_array_equal(from_rng.bias, first.bias)
    # A shared generator is advanced: two layers drawn from it differ.
    rng = np.random.default_rng(0)
    assert not np.array_equal(Linear(3, 3, rng=rng).weight, Linear(3, 3, rng=rng).weight)
    # Without seed or rng: fresh entropy.
    assert not np.array_equal(Linear(8, 8).weight, Linear(8, 8).weight)
    # One seed, both dtypes: the same numbers up to rounding.
    single, double = Linear(6, 5, seed=3), Linear(6, 5, dtype=np.float64, seed=3)
    np.testing.assert_array_equal(single.weight, double.weight.astype(np.float32))


def test_dtype_spellings_and_default():
    assert Linear(2, 2).dtype == np.float32
    assert Linear(2, 2, dtype=None).dtype == np.float32
    for spelling in (np.float64, "float64", "f8", np.dtype(np.float64), float):
        assert Linear(2, 2, dtype=spelling).dtype == np.float64


# ----------------------------------------------------------------------------- repr


def test_repr():
    assert repr(
        Bilinear(
            in1_features=32, in2_features=16, out_features=8, bias=True, dtype=np.float32, seed=0
        )
    ) == ("Bilinear(in1_features=32, in2_features=16, out_features=8, bias=True, dtype=float32)")
    assert repr(Linear(5, 3, bias=False, dtype=np.float64)) == (
        "Linear(in_features=5, out_features=3, bias=False, dtype=float64)"
    )
    layer = Linear(5, 3)
    assert (layer.in_features, layer.out_features) == (5, 3)
    bilinear = Bilinear(4, 3, 2)
    assert (bilinear.in1_features, bilinear.in2_features, bilinear.out_features) == (4, 3, 2)


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: Linear(3, 2, **kw),
        lambda **kw: Bilinear(3, 2, 2, **kw),
    ],
    ids=["Linear", "Bilinear"],
)
def test_constructor_errors(make):
    for dtype in (np.float16, np.int32, np.complex64, np.longdouble, "bogus", object, 3):
        with pytest.raises(TypeError, match="dtype must be float32 or float64"):
            make(dtype=dtype)
    with pytest.raises(ValueError, match="seed or rng, not both"):
        make(seed=0, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"numpy\.random\.Generator"):
        make(rng=np.random.RandomState(0))
    with pytest.raises(TypeError, match=r"numpy\.random\.Generator"):
        make(rng=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        make(seed=1.5)
    with pytest.raises(TypeError, match="seed must be an int"):
        make(seed=True)
    with pytest.raises(ValueError, match="seed must be non-negative"):
        make(seed=-1)
    with pytest.raises(TypeError, match="copy_inputs must be a bool"):
        make(copy_inputs=1)
    make(seed=np.int64(3))  # NumPy integers are ints


def test_constructor_size_and_bias_errors():
    with pytest.raises(TypeError, match=r"^Linear\(\): in_features must be an int, got float"):
        Linear(3.0, 2)
    with pytest.raises(TypeError, match="out_features must be an int, got str"):
        Linear(3, "2")
    with pytest.raises(TypeError, match="in_features must be an int, got bool"):
        Linear(True, 2)
    with pytest.raises(ValueError, match="out_features must be non-negative, got -1"):
        Linear(3, -1)
    with pytest.raises(TypeError, match="bias must be a bool"):
        Linear(3, 2, bias=None)
    with pytest.raises(TypeError, match=r"^Bilinear\(\): in2_features must be an int"):
        Bilinear(3, 2.5, 2)
    with pytest.raises(ValueError, match="in1_features must be non-negative"):
        Bilinear(-3, 2, 2)
    with pytest.raises(TypeError, match="bias must be a bool"):
        Bilinear(3, 2, 2, bias=1)
    with pytest.raises(TypeError):
        Linear(3, 2, True, np.float64)  # dtype and the rest are keyword-only


def test_forward_errors():
    layer = Linear(4, 3)
    with pytest.raises(
        ValueError,
        match=r"^Linear\.forward\(\): input size does not match the "
        r"layer: got shape \(5, 3\) but expected \(\.\.\., 4\)",
    ):
        layer(np.ones((5, 3)))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        layer(np.float64(1.0))
    with pytest.raises(TypeError, match=r"^Linear\.forward\(\): input has dtype complex128"):
        layer(np.ones((5, 4), complex))
    with pytest.raises(TypeError, match="save_for_backward must be a bool"):
        layer(np.ones(4), save_for_backward=None)
    bilinear = Bilinear(4, 3, 2)
    with pytest.raises(
        ValueError,
        match=r"input2 size does not match the layer: got shape "
        r"\(5, 4\) but expected \(\.\.\., 3\)",
    ):
        bilinear(np.ones((5, 4)), np.ones((5, 4)))
    with pytest.raises(
        ValueError,
        match=r"^Bilinear\.forward\(\): input1 and input2 batch "
        r"dimensions do not match: got \(5,\) and \(6,\)",
    ):
        bilinear(np.ones((5, 4)), np.ones((6, 3)))
    with pytest.raises(TypeError, match="input1 has dtype"):
        bilinear(np.array(["a", "b", "c", "d"]), np.ones(3))
    with pytest.raises(TypeError):
        bilinear(np.ones(4))  # both inputs are required


def test_backward_errors():
    layer = Linear(4, 3)
    layer(np.ones((5, 4)))
    with pytest.raises(
        ValueError,
        match=r"^Linear\.backward\(\): grad_out shape does not "
        r"match the output of the last forward: got \(5, 4\) "
        r"but expected \(5, 3\)",
    ):
        layer.backward(np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"got \(3,\) but expected \(5, 3\)"):
        layer.backward(np.ones(3))  # no broadcasting
    with pytest.raises(TypeError, match="grad_out has dtype complex128"):
        layer.backward(np.ones((5, 3), complex))
    with pytest.raises(TypeError, match="need_x must be a bool"):
        layer.backward(np.ones((5, 3)), need_x=0)
    np.testing.assert_array_equal(layer.grad_weight, 0)  # failed calls accumulate nothing

    bilinear = Bilinear(4, 3, 2)
    bilinear(np.ones((2, 5, 4)), np.ones((2, 5, 3)))
    with pytest.raises(
        ValueError,
        match=r"^Bilinear\.backward\(\): grad_out shape .* got "
        r"\(10, 2\) but expected \(2, 5, 2\)",
    ):
        bilinear.backward(np.ones((10, 2)))
    with pytest.raises(TypeError, match="need_x2 must be a bool"):
        bilinear.backward(np.ones((2, 5, 2)), need_x2="yes")


def test_freeze_errors():
    layer = Linear(3, 2)
    with pytest.raises(
        ValueError,
        match=r"^Linear\.freeze\(\): unknown parameter 'weights'; "
        r"the parameters are 'weight', 'bias'",
    ):
        layer.freeze("weights")
    with pytest.raises(
        ValueError,
        match=r"unknown parameter 'bias' \(the layer was built with "
        r"bias=False\)",
    ):
        Bilinear(2, 2, 2, bias=False).unfreeze("bias")
    with pytest.raises(TypeError, match="parameter names must be strings"):
        layer.freeze(["weight"])
    assert layer.frozen == frozenset()  # nothing half-applied


# ----------------------------------------------------------------------------- the example


def test_training_example_loss_falls(backend, capsys):
    main = runpy.run_path(EXAMPLE)["main"]
    assert main([*SMALL_EXAMPLE_ARGS, "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert f"backend {backend}" in out and "held-out loss fell" in out
    assert linmaps.get_backend() == backend  # the example left the caller's backend alone
    # The exit status reports a loss that did not fall enough.
    assert main([*SMALL_EXAMPLE_ARGS, "--steps", "2", "--backend", backend]) == 1


def test_training_example_as_a_script(backend):
    package_root = os.path.dirname(os.path.dirname(linmaps.__file__))
    env = dict(
        os.environ,
        LINMAPS_BACKEND=backend,
        PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [sys.executable, EXAMPLE, *SMALL_EXAMPLE_ARGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "held-out loss fell" in result.stdout
