"""The C++ fast path of ``linmaps.bilinear``: taken only for exact arguments, bit-identical."""

import numpy as np
import pytest

import linmaps
from linmaps import _backend

pytestmark = pytest.mark.skipif(_backend.fast_core is None, reason="no compiled fast path")


def _args(dtype, n=3, m=4, p=5, out=2):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((n, m)).astype(dtype),
        rng.standard_normal((n, p)).astype(dtype),
        rng.standard_normal((out, m, p)).astype(dtype),
        rng.standard_normal(out).astype(dtype),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fast_path_bit_identical(dtype, with_bias, monkeypatch):
    x1, x2, w, b = _args(dtype)
    b = b if with_bias else None
    fast = _backend.fast_core.bilinear_forward_fast(x1, x2, w, b)
    assert fast is not None and fast.dtype == dtype and fast.shape == (3, 2)
    via_api = linmaps.bilinear(x1, x2, w, b)
    monkeypatch.setattr(_backend, "fast_core", None)
    slow = linmaps.bilinear(x1, x2, w, b)
    assert np.array_equal(fast.view(np.uint8), slow.view(np.uint8))
    assert np.array_equal(via_api.view(np.uint8), slow.view(np.uint8))


def _unaligned(a):
    """A copy of ``a`` whose data starts one byte past an aligned address."""
    u = np.empty(a.nbytes + 1, np.uint8)[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned
    return u


def _declined():
    x1, x2, w, b = _args(np.float32)
    yield "list input", (x1.tolist(), x2, w, b)
    yield "mixed dtypes", (x1, x2.astype(np.float64), w, b)
    yield "float16", tuple(a.astype(np.float16) for a in (x1, x2, w, b))
    yield "int", (x1.astype(np.int64), x2, w, b)
    yield "non-contiguous", (np.asfortranarray(x1), x2, w, b)
    yield "byte-swapped", (x1.astype(x1.dtype.newbyteorder()), x2, w, b)
    yield "subclass", (x1.view(np.matrix), x2, w, b)
    yield "1-D input", (x1[0], x2[0], w, b)
    yield "2-D weight", (x1, x2, w[0], None)
    yield "batch mismatch", (x1, x2[:2], w, b)
    yield "feature mismatch", (x1[:, :3], x2, w, b)
    yield "bias length", (x1, x2, w, b[:1])
    yield "bias 0-d", (x1, x2, w, b[0])
    yield "bias list", (x1, x2, w, b.tolist())
    yield "bias dtype", (x1, x2, w, b.astype(np.float64))
    yield "unaligned input", (_unaligned(x1), x2, w, b)
    yield "unaligned weight", (x1, x2, _unaligned(w), b)
    yield "unaligned bias", (x1, x2, w, _unaligned(b))


@pytest.mark.parametrize("name,args", list(_declined()), ids=[n for n, _ in _declined()])
def test_fast_path_declines(name, args):
    assert _backend.fast_core.bilinear_forward_fast(*args) is None


def test_fast_path_skipped_for_python_backend(monkeypatch):
    x1, x2, w, b = _args(np.float32)
    calls = []
    real = _backend.fast_core

    class Spy:
        def bilinear_forward_fast(self, *a):
            calls.append(a)
            return real.bilinear_forward_fast(*a)

    monkeypatch.setattr(_backend, "fast_core", Spy())
    with linmaps.use_backend("python"):
        linmaps.bilinear(x1, x2, w, b)
    assert calls == []
    linmaps.bilinear(x1, x2, w, b)
    assert len(calls) == 1


def _linear_args(dtype):
    rng = np.random.default_rng(1)
    return (
        rng.standard_normal((3, 5)).astype(dtype),
        rng.standard_normal((4, 5)).astype(dtype),
        rng.standard_normal(4).astype(dtype),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_fast_path_bit_identical(dtype, with_bias, monkeypatch):
    x, w, b = _linear_args(dtype)
    b = b if with_bias else None
    fast = _backend.fast_core.linear_forward_fast(x, w, b)
    assert fast is not None and fast.dtype == dtype and fast.shape == (3, 4)
    via_api = linmaps.linear(x, w, b)
    monkeypatch.setattr(_backend, "fast_core", None)
    slow = linmaps.linear(x, w, b)
    assert np.array_equal(fast.view(np.uint8), slow.view(np.uint8))
    assert np.array_equal(via_api.view(np.uint8), slow.view(np.uint8))


def _linear_declined():
    x, w, b = _linear_args(np.float32)
    yield "list input", (x.tolist(), w, b)
    yield "mixed dtypes", (x, w.astype(np.float64), b)
    yield "float16", tuple(a.astype(np.float16) for a in (x, w, b))
    yield "non-contiguous", (np.asfortranarray(x), w, b)
    yield "byte-swapped", (x, w.astype(w.dtype.newbyteorder()), b)
    yield "subclass", (x, w.view(np.matrix), b)
    yield "1-D input", (x[0], w, b)
    yield "3-D input", (x[None], w, b)
    yield "feature mismatch", (x[:, :4], w, b)
    yield "bias length", (x, w, b[:1])
    yield "bias dtype", (x, w, b.astype(np.float64))
    yield "unaligned input", (_unaligned(x), w, b)
    yield "unaligned weight", (x, _unaligned(w), b)
    yield "unaligned bias", (x, w, _unaligned(b))


@pytest.mark.parametrize(
    "name,args", list(_linear_declined()), ids=[n for n, _ in _linear_declined()]
)
def test_linear_fast_path_declines(name, args):
    assert _backend.fast_core.linear_forward_fast(*args) is None


def test_unaligned_arrays_take_the_validated_path_and_never_reach_a_kernel():
    # Every fast path declines an array whose data is not aligned to its element size (the
    # validated path copies it), including the arrays a call writes into: a layer's gradient
    # accumulators and the buffer a forward keeps T in. The kernels' own entry points refuse
    # one with a ValueError rather than read it.
    core = _backend.fast_core
    x1, x2, w, b = _args(np.float32, n=6)
    g = np.ones((6, 2), np.float32)
    acc_w, acc_b = np.zeros_like(w), np.zeros_like(b)
    kept = np.empty(core.bilinear_kept_elements(6, 4, 5, 2, 4), np.float32)
    assert core.bilinear_backward_fast(g, x1, x2, w, True, True, True, True) is not None
    assert core.bilinear_backward_fast(_unaligned(g), x1, x2, w, True, True, True, True) is None
    assert (
        core.bilinear_backward_fast(g, x1, x2, w, True, True, True, True, _unaligned(kept)) is None
    )
    assert (
        core.bilinear_layer_backward_fast(g, x1, x2, w, None, True, True, acc_w, acc_b) is not None
    )
    for acc in ((_unaligned(acc_w), acc_b), (acc_w, _unaligned(acc_b))):
        assert core.bilinear_layer_backward_fast(g, x1, x2, w, None, True, True, *acc) is None
    # A forward given an unaligned buffer to reuse keeps T in a new one.
    result = core.bilinear_layer_forward_fast(x1, x2, w, b, _unaligned(kept), 1 << 20, False)
    assert result[3].flags.aligned and result[3].size >= kept.size
    np.testing.assert_array_equal(result[0], linmaps.bilinear(x1, x2, w, b))

    x, wl, bl = _linear_args(np.float32)
    gl = np.ones((3, 4), np.float32)
    assert core.linear_backward_fast(_unaligned(gl), x, wl, True, True, True) is None
    accs = (np.zeros_like(wl), np.zeros_like(bl))
    assert core.linear_layer_backward_fast(gl, x, wl, True, *accs) is not None
    assert core.linear_layer_backward_fast(gl, x, wl, True, _unaligned(accs[0]), accs[1]) is None
    assert core.linear_layer_backward_fast(gl, x, wl, True, accs[0], _unaligned(accs[1])) is None
    assert core.linear_layer_forward_fast(_unaligned(x), wl, bl, False) is None

    with pytest.raises(ValueError, match="x1 is not aligned"):
        core.bilinear_forward(_unaligned(x1), x2, w, b)
    with pytest.raises(ValueError, match="kept is not aligned"):
        core.bilinear_forward(x1, x2, w, b, _unaligned(kept))
    with pytest.raises(ValueError, match="grad is not aligned"):
        core.bilinear_backward(_unaligned(g), x1, x2, w, None, True, True, True, True)
    with pytest.raises(ValueError, match="weight is not aligned"):
        core.linear_forward(x, _unaligned(wl), bl)
    with pytest.raises(ValueError, match="bias is not aligned"):
        core.linear_forward(x, wl, _unaligned(bl))
    with pytest.raises(ValueError, match="x is not aligned"):
        core.linear_backward(gl, _unaligned(x), wl, True, True, True)
