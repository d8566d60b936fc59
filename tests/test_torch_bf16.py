"""linmaps.torch on bfloat16 tensors: linmaps' kernels, checked against the float64 einsum
of the spec on the bfloat16 values (the bound of tests/test_bf16.py), with gradients in
bfloat16 as PyTorch gives them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

import torch.nn.functional as F  # noqa: E402
from bf16_helpers import BF16, assert_bf16_close  # noqa: E402
from torch_helpers import ran_linmaps  # noqa: E402

import linmaps.torch as lt  # noqa: E402

import reference as ref  # noqa: E402


def as_numpy(tensor):
    """A bfloat16 tensor's values as an ml_dtypes.bfloat16 array (the same bits)."""
    return tensor.detach().contiguous().view(torch.int16).numpy().view(BF16)


def randn(*shape, seed, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=generator).to(torch.bfloat16)
    return t.requires_grad_(requires_grad)


def test_bilinear_and_its_gradients(backend):
    x1, x2 = randn(2, 9, 17, seed=0), randn(2, 9, 33, seed=1)
    weight, bias = randn(5, 17, 33, seed=2), randn(5, seed=3)
    z = lt.bilinear(x1, x2, weight, bias)
    assert ran_linmaps(z) and z.dtype == torch.bfloat16
    a1, a2, w, b = (as_numpy(t) for t in (x1, x2, weight, bias))
    assert_bf16_close(as_numpy(z), ref.bilinear(a1, a2, w, b), 17 * 33 + 1)
    grad = randn(2, 9, 5, seed=4, requires_grad=False)
    z.backward(grad)
    expected = ref.bilinear_grads(as_numpy(grad), a1, a2, w)
    for tensor, want, terms in zip((x1, x2, weight, bias), expected, (165, 85, 18, 18)):
        assert tensor.grad.dtype == torch.bfloat16
        assert_bf16_close(as_numpy(tensor.grad), want, terms)


def test_linear_layer_and_its_gradients(backend):
    layer = lt.Linear(33, 7).to(torch.bfloat16)
    x = randn(40, 33, seed=5)
    y = layer(x)
    assert ran_linmaps(y) and y.dtype == torch.bfloat16
    w, b, a = as_numpy(layer.weight), as_numpy(layer.bias), as_numpy(x)
    assert_bf16_close(as_numpy(y), ref.linear(a, w, b), 34)
    grad = randn(40, 7, seed=6, requires_grad=False)
    y.backward(grad)
    gx, gw, gb = ref.linear_grads(as_numpy(grad), a, w)
    assert_bf16_close(as_numpy(x.grad), gx, 7)
    assert_bf16_close(as_numpy(layer.weight.grad), gw, 40)
    assert_bf16_close(as_numpy(layer.bias.grad), gb, 40)
    with torch.no_grad():
        assert torch.equal(layer(x), y)


def test_compiled_and_registered_operators():
    layer = lt.Bilinear(6, 5, 4).to(torch.bfloat16)
    x1, x2 = randn(8, 6, seed=7), randn(8, 5, seed=8)
    eager = layer(x1, x2)
    compiled = torch.compile(layer, backend="eager")(x1, x2)
    assert compiled.dtype == torch.bfloat16 and torch.equal(compiled, eager)
    args = (x1.detach(), x2.detach(), layer.weight.detach(), layer.bias.detach())
    torch.library.opcheck(torch.ops.linmaps.bilinear.default, args)
    torch.library.opcheck(torch.ops.linmaps.linear.default, (x1.detach(), args[2][0].T, None))


def test_without_ml_dtypes_bfloat16_goes_to_torch(monkeypatch):
    monkeypatch.setattr(lt, "_BFLOAT16_USABLE", False)
    x, weight = randn(6, 5, seed=9), randn(3, 5, seed=10)
    y = lt.linear(x, weight)
    assert not ran_linmaps(y) and torch.equal(y, F.linear(x, weight))


def test_mixed_dtypes_go_to_torch():
    x, weight = randn(6, 5, seed=11), randn(3, 5, seed=12).float()
    with pytest.raises(RuntimeError):
        F.linear(x, weight)  # PyTorch refuses mixed dtypes: so does linmaps.torch, by it
    with pytest.raises(RuntimeError):
        lt.linear(x, weight)
