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


@pytest.mark.parametrize(
    "name,args", list(_linear_declined()), ids=[n for n, _ in _linear_declined()]
)
def test_linear_fast_path_declines(name, args):
    assert _backend.fast_core.linear_forward_fast(*args) is None
