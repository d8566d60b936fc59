"""linmaps.torch.bilinear_pairs and Biaffine: values and gradients against the definition's
einsum and supar's biaffine formula, gradcheck/gradgradcheck, opcheck, torch.compile and the
fallback. Skipped when torch is not installed."""

import pytest

torch = pytest.importorskip("torch")

from torch_helpers import assert_close, randn  # noqa: E402

import linmaps.torch as lt  # noqa: E402

DTYPES = [torch.float32, torch.float64]


def einsum_pairs(x1, x2, weight, bias=None):
    s = torch.einsum("...ia,oac,...jc->...ijo", x1, weight, x2)
    return s if bias is None else s + bias


def grads_of(function, inputs, grad_out):
    output = function(*inputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return output, torch.autograd.grad(output, wanted, grad_out)


def ran_linmaps(tensor) -> bool:
    return tensor.grad_fn is not None and "linmaps" in type(tensor.grad_fn).__name__


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lead", "rows1", "rows2", "in1", "in2", "out", "with_bias"),
    [((2,), 3, 5, 4, 6, 2, True), ((), 1, 4, 3, 3, 1, False), ((2, 3), 4, 1, 5, 2, 3, True)],
)
def test_values_and_gradients_equal_einsum(dtype, lead, rows1, rows2, in1, in2, out, with_bias):
    x1 = randn(*lead, rows1, in1, dtype=dtype, requires_grad=True)
    x2 = randn(*lead, rows2, in2, dtype=dtype, seed=1, requires_grad=True)
    weight = randn(out, in1, in2, dtype=dtype, seed=2, requires_grad=True)
    bias = randn(out, dtype=dtype, seed=3, requires_grad=True) if with_bias else None
    grad_out = randn(*lead, rows1, rows2, out, dtype=dtype, seed=4)
    s, grads = grads_of(lt.bilinear_pairs, (x1, x2, weight, bias), grad_out)
    s_ref, grads_ref = grads_of(einsum_pairs, (x1, x2, weight, bias), grad_out)
    assert ran_linmaps(s)
    assert_close(s, s_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref)


def test_no_grad_calls_the_kernels_and_2d_weight():
    x1, x2, weight = randn(2, 3, 4), randn(2, 5, 6, seed=1), randn(4, 6, seed=2)
    with torch.no_grad():
        s = lt.bilinear_pairs(x1, x2, weight, torch.tensor(0.5, dtype=torch.float64))
    assert s.shape == (2, 3, 5)
    assert_close(s, einsum_pairs(x1, x2, weight[None]).squeeze(-1) + 0.5)


def test_gradcheck_and_gradgradcheck():
    x1 = randn(2, 3, 4, requires_grad=True)
    x2 = randn(2, 2, 3, seed=1, requires_grad=True)
    weight = randn(2, 4, 3, seed=2, requires_grad=True)
    bias = randn(2, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(lt.bilinear_pairs, (x1, x2, weight, bias))
    assert torch.autograd.gradgradcheck(lt.bilinear_pairs, (x1, x2, weight, bias))
    assert torch.autograd.gradgradcheck(
        lambda a, w: lt.bilinear_pairs(a, x2.detach(), w), (x1, weight)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x1 = randn(2, 3, 4, dtype=dtype, requires_grad=True)
    x2 = randn(2, 5, 3, dtype=dtype, seed=1)
    weight = randn(2, 4, 3, dtype=dtype, seed=2, requires_grad=True)
    bias = randn(2, dtype=dtype, seed=3, requires_grad=True)
    grad = randn(2, 3, 5, 2, dtype=dtype, seed=4, requires_grad=True)
    ops = torch.ops.linmaps
    cases = [
        (ops.bilinear_pairs.default, (x1, x2, weight, bias)),
        (ops.bilinear_pairs.default, (x1, x2, weight, None)),
        (ops.bilinear_pairs_backward.default, (grad, x1, x2, weight, True, True, True, True)),
        (ops.bilinear_pairs_backward.default, (grad, x1, x2, weight, False, True, False, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def supar_biaffine(x, y, weight, bias_x, bias_y):
    """supar.modules.affine.Biaffine.forward, as published."""
    if bias_x:
        x = torch.cat((x, torch.ones_like(x[..., :1])), -1)
    if bias_y:
        y = torch.cat((y, torch.ones_like(y[..., :1])), -1)
    s = torch.einsum("bxi,oij,byj->boxy", x, weight, y)
    return s.squeeze(1) if weight.shape[0] == 1 else s


@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize(("bias_x", "bias_y"), [(True, True), (True, False), (False, False)])
def test_biaffine_equals_supar(n_out, bias_x, bias_y):
    module = lt.Biaffine(5, n_out, bias_x=bias_x, bias_y=bias_y).double()
    assert module.weight.shape == (n_out, 5 + bias_x, 5 + bias_y)
    assert not module.weight.detach().any()  # supar's initialisation
    with torch.no_grad():
        module.weight.copy_(randn(*module.weight.shape, seed=7))
    x = randn(2, 4, 5, requires_grad=True)
    y = randn(2, 6, 5, seed=1, requires_grad=True)
    s = module(x, y)
    expected_shape = (2, 4, 6) if n_out == 1 else (2, n_out, 4, 6)
    assert s.shape == expected_shape
    grad_out = randn(*expected_shape, seed=5)
    inputs = (x, y, module.weight)
    grads = torch.autograd.grad(s, inputs, grad_out)
    s_ref = supar_biaffine(x, y, module.weight, bias_x, bias_y)
    grads_ref = torch.autograd.grad(s_ref, inputs, grad_out)
    assert_close(s, s_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref)


def test_torch_compile_fullgraph():
    import torch._dynamo

    module = lt.Biaffine(4, 2).float()
    with torch.no_grad():
        module.weight.copy_(randn(*module.weight.shape, dtype=torch.float32, seed=3))
    x, y = randn(2, 3, 4, dtype=torch.float32), randn(2, 5, 4, dtype=torch.float32, seed=1)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    (grad,) = torch.autograd.grad(out.square().sum(), [module.weight])
    expected = supar_biaffine(x, y, module.weight, True, True)
    (grad_ref,) = torch.autograd.grad(expected.square().sum(), [module.weight])
    assert_close(out, expected)
    assert_close(grad, grad_ref)
    torch._dynamo.reset()


def test_other_dtypes_go_to_einsum():
    x1 = randn(2, 3, 4, dtype=torch.float16, requires_grad=True)
    x2, weight = randn(2, 5, 6, dtype=torch.float16, seed=1), randn(2, 4, 6, seed=2)
    s = lt.bilinear_pairs(x1, x2, weight.to(torch.float16))
    assert s.dtype == torch.float16 and not ran_linmaps(s)
    expected = einsum_pairs(x1.double(), x2.double(), weight.to(torch.float16).double())
    torch.testing.assert_close(s.double(), expected, rtol=0.01, atol=0.02)


def test_bfloat16_runs_on_linmaps_with_bfloat16_gradients():
    pytest.importorskip("ml_dtypes")
    x1 = randn(2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    x2 = randn(2, 5, 6, dtype=torch.bfloat16, seed=1, requires_grad=True)
    weight = randn(2, 4, 6, seed=2).to(torch.bfloat16).requires_grad_()
    s = lt.bilinear_pairs(x1, x2, weight)
    assert s.dtype == torch.bfloat16 and ran_linmaps(s)
    expected = einsum_pairs(x1.double(), x2.double(), weight.double())
    # float32 sums of 24 exact products, rounded once to bfloat16 (half an ulp: 2**-8)
    torch.testing.assert_close(s.double(), expected, rtol=2.0**-8, atol=1e-5)
    s.sum().backward()
    assert x1.grad.dtype == x2.grad.dtype == weight.grad.dtype == torch.bfloat16


def test_bad_shapes_raise_torch_errors():
    x1, x2, weight = randn(2, 3, 4), randn(2, 5, 6, seed=1), randn(2, 5, 6, seed=2)
    with pytest.raises(RuntimeError):
        lt.bilinear_pairs(x1, x2, weight)


def test_parser_example_runs():
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "biaffine_parser.py"
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(example), run_name="__main__")
    assert info.value.code == 0
