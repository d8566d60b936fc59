"""linmaps.torch under torch.func transforms (vmap, grad, jacrev, jacfwd, hessian, jvp),
forward-mode AD and batched gradients (is_grads_batched, gradcheck's batched checks).

Every result is compared with PyTorch's own operators on the same tensors, and every
linmaps run counts its kernel calls with PyTorch's operators made to fail inside
linmaps.torch, so that a silent fallback to PyTorch fails the test."""

import itertools
import warnings
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap  # noqa: E402
from torch_helpers import assert_all_close, count_kernel_calls, randn  # noqa: E402

import linmaps.torch as lt  # noqa: E402

# PyTorch warns once per process, on the first forward-mode transform, that its
# decompositions use torch.jit.script; that is PyTorch's own doing, on either side.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


@pytest.fixture
def kernel_calls(monkeypatch):
    return count_kernel_calls(monkeypatch)


def tensors():
    """Fresh float64 arguments: a bilinear map (x1, x2, w, b), a linear one (x1, wl, b),
    batches of each argument (leading dimension 6) and incoming gradients and tangents."""
    return SimpleNamespace(
        x1=randn(3, 4, seed=1),
        x2=randn(3, 5, seed=2),
        w=randn(2, 4, 5, seed=3),
        b=randn(2, seed=4),
        wl=randn(2, 4, seed=5),
        x1s=randn(6, 3, 4, seed=6),
        x2s=randn(6, 3, 5, seed=7),
        ws=randn(6, 2, 4, 5, seed=8),
        bs=randn(6, 2, seed=9),
        wls=randn(6, 2, 4, seed=10),
        gs=randn(7, 3, 2, seed=11),
        dx1=randn(3, 4, seed=12),
        dw=randn(2, 4, 5, seed=13),
        dx1s=randn(7, 3, 4, seed=14),
    )


def reference(case):
    """``case`` computed by PyTorch's operators (their batching fallback warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return case(F.bilinear, F.linear, tensors())


def run_linmaps(case, kernel_calls):
    result = case(lt.bilinear, lt.linear, tensors())
    assert sum(kernel_calls.values()) > 0
    return result


# Each case computes something with a bilinear map B and a linear map L, given the tensors.
CASES = {
    "grad": lambda B, L, t: grad(lambda x, w: B(x, t.x2, w, t.b).square().sum(), argnums=(0, 1))(
        t.x1, t.w
    ),
    "grad linear": lambda B, L, t: grad(lambda x, w: L(x, w, t.b).square().sum(), argnums=(0, 1))(
        t.x1, t.wl
    ),
    "vmap x1 x2": lambda B, L, t: vmap(lambda a, c: B(a, c, t.w, t.b))(t.x1s, t.x2s),
    "vmap x1": lambda B, L, t: vmap(lambda a: B(a, t.x2, t.w, t.b))(t.x1s),
    "vmap x1 in_dims=1": lambda B, L, t: vmap(lambda a: B(a, t.x2, t.w, t.b), in_dims=1)(
        t.x1s.transpose(0, 1)
    ),
    "vmap w": lambda B, L, t: vmap(lambda w: B(t.x1, t.x2, w, t.b))(t.ws),
    "vmap w b": lambda B, L, t: vmap(lambda w, b: B(t.x1, t.x2, w, b))(t.ws, t.bs),
    "vmap b": lambda B, L, t: vmap(lambda b: B(t.x1, t.x2, t.w, b))(t.bs),
    "vmap x1 w": lambda B, L, t: vmap(lambda a, w: B(a, t.x2, w, t.b))(t.x1s, t.ws),
    "vmap of vmap": lambda B, L, t: vmap(vmap(lambda a, w: B(a, t.x2, w, t.b)))(
        t.x1s.unsqueeze(0).expand(2, -1, -1, -1), t.ws[:2].unsqueeze(1).expand(-1, 6, -1, -1, -1)
    ),
    "vmap linear x": lambda B, L, t: vmap(lambda a: L(a, t.wl, t.b))(t.x1s),
    "vmap linear w": lambda B, L, t: vmap(lambda w: L(t.x1, w, t.b))(t.wls),
    "vmap linear x w": lambda B, L, t: vmap(lambda a, w: L(a, w, t.b))(t.x1s, t.wls),
    "vmap linear b": lambda B, L, t: vmap(lambda b: L(t.x1, t.wl, b))(t.bs),
    "jacrev": lambda B, L, t: jacrev(lambda x, w: B(x, t.x2, w, t.b), argnums=(0, 1))(t.x1, t.w),
    "jacfwd": lambda B, L, t: jacfwd(lambda x, w: B(x, t.x2, w, t.b), argnums=(0, 1))(t.x1, t.w),
    "jacrev linear": lambda B, L, t: jacrev(lambda x, w: L(x, w, t.b), argnums=(0, 1))(t.x1, t.wl),
    "jacfwd linear": lambda B, L, t: jacfwd(lambda x, w: L(x, w, t.b), argnums=(0, 1))(t.x1, t.wl),
    "hessian x1": lambda B, L, t: hessian(lambda x: B(x, t.x2, t.w, t.b).pow(3).sum())(t.x1),
    "hessian w": lambda B, L, t: hessian(lambda w: B(t.x1, t.x2, w, t.b).pow(3).sum())(t.w),
    "hessian linear": lambda B, L, t: hessian(lambda w: L(t.x1, w, t.b).pow(3).sum())(t.wl),
    "jvp": lambda B, L, t: jvp(lambda x, w: B(x, t.x2, w, t.b), (t.x1, t.w), (t.dx1, t.dw)),
    "per-sample gradients": lambda B, L, t: vmap(
        grad(lambda w, b, a, c: B(a, c, w, b).square().sum(), argnums=(0, 1)),
        in_dims=(None, None, 0, 0),
    )(t.w, t.b, t.x1, t.x2),
    "per-sample gradients linear": lambda B, L, t: vmap(
        grad(lambda w, b, a: L(a, w, b).square().sum(), argnums=(0, 1)), in_dims=(None, None, 0)
    )(t.wl, t.b, t.x1),
    "vmap of vjp": lambda B, L, t: vmap(
        vjp(lambda a, c, w, b: B(a, c, w, b), t.x1, t.x2, t.w, t.b)[1]
    )(t.gs),
    "vmap of jvp": lambda B, L, t: vmap(
        lambda d: jvp(lambda a: B(a, t.x2, t.w, t.b), (t.x1,), (d,))[1]
    )(t.dx1s),
    "jvp of grad": lambda B, L, t: jvp(
        grad(lambda a: B(a, t.x2, t.w, t.b).pow(3).sum()), (t.x1,), (t.dx1,)
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torch_func_transforms_equal_torch_on_linmaps_kernels(name, kernel_calls):
    case = CASES[name]
    expected = reference(case)
    assert_all_close(run_linmaps(case, kernel_calls), expected)


@pytest.mark.parametrize(
    ("name", "calls"),
    [
        # A batch of inputs with one weight is more leading dimensions: one forward call.
        ("vmap x1 x2", {"bilinear": 1}),
        ("vmap x1", {"bilinear": 1}),
        ("vmap x1 in_dims=1", {"bilinear": 1}),
        ("vmap linear x", {"linear": 1}),
        ("vmap b", {"bilinear": 1}),
        # A batch of weights with one input: the batch folded into the output features.
        ("vmap w", {"bilinear": 1}),
        ("vmap w b", {"bilinear": 1}),
        ("vmap linear w", {"linear": 1}),
        # Both batched: one call per batch entry.
        ("vmap x1 w", {"bilinear": 6}),
        ("vmap linear x w", {"linear": 6}),
        # A batch of incoming gradients: one call for the inputs' gradients, one for the
        # weight's and bias's (the batch folded into the output features).
        ("vmap of vjp", {"bilinear": 1, "bilinear_backward": 2}),
    ],
)
def test_vmap_runs_the_batch_in_few_kernel_calls(name, calls, kernel_calls):
    assert_all_close(run_linmaps(CASES[name], kernel_calls), reference(CASES[name]))
    assert dict(kernel_calls) == calls


def test_vmap_over_an_empty_batch(kernel_calls):
    # PyTorch's own batching fallback refuses a batch of size 0; a batch that loops over its
    # entries (input and weight both batched) gives the empty result and its gradients.
    t = tensors()
    x1s, ws = t.x1s[:0], t.ws[:0]
    z = vmap(lambda a, w: lt.bilinear(a, t.x2, w, t.b))(x1s, ws)
    assert z.shape == (0, 3, 2)
    assert vmap(lambda a, w: lt.linear(a, w, t.b))(x1s, t.wls[:0]).shape == (0, 3, 2)
    grads = vmap(grad(lambda a, w: lt.bilinear(a, t.x2, w, t.b).sum(), argnums=(0, 1)))(x1s, ws)
    assert [g.shape for g in grads] == [(0, 3, 4), (0, 2, 4, 5)]
    assert kernel_calls["bilinear_backward"] > 0


# ----------------------------------------------------------------------------- forward-mode AD


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_tangent", [(0,), (1,), (2,), (3,), (0, 2), (0, 1, 2, 3)])
def test_forward_ad_tangents_equal_torch(with_tangent, requires_grad, kernel_calls):
    t = tensors()
    primals = [t.x1, t.x2, t.w, t.b]
    tangents = [randn(*p.shape, seed=20 + i) for i, p in enumerate(primals)]
    linear_index = {0: 0, 2: 1, 3: 2}  # x1, wl, b of the linear map

    def run(B, L):
        with fwAD.dual_level():
            args = [
                fwAD.make_dual(p.clone().requires_grad_(requires_grad), d)
                if i in with_tangent
                else p
                for i, (p, d) in enumerate(zip(primals, tangents))
            ]
            z = fwAD.unpack_dual(B(*args))
            linear_args = [args[0], t.wl, args[3]]
            if 2 in with_tangent:
                linear_args[1] = fwAD.make_dual(t.wl.clone(), randn(2, 4, seed=30))
            y = fwAD.unpack_dual(L(*linear_args))
            return z.primal, z.tangent, y.primal, y.tangent

    expected = run(F.bilinear, F.linear)
    assert expected[1] is not None
    got = run(lt.bilinear, lt.linear)
    assert_all_close(got, expected)
    assert kernel_calls["bilinear"] > 0
    assert any(i in linear_index for i in with_tangent) == (expected[3] is not None)


def test_forward_ad_of_a_backward_pass_equals_torch(kernel_calls):
    """Forward mode over reverse mode: the backward operators' jvp formulas."""
    t = tensors()
    primals = [t.x1, t.x2, t.w, t.b]
    tangents = [randn(*p.shape, seed=40 + i) for i, p in enumerate(primals)]
    g = randn(3, 2, seed=50)

    def run(B):
        with fwAD.dual_level():
            args = [
                fwAD.make_dual(p.clone().requires_grad_(True), d) for p, d in zip(primals, tangents)
            ]
            grads = torch.autograd.grad(B(*args), args, g, create_graph=True)
            return [fwAD.unpack_dual(gr) for gr in grads]

    expected = run(F.bilinear)
    # grad_bias = sum(g) has no tangent in PyTorch's formula; an autograd.Function's jvp
    # cannot say "none", and PyTorch gives it zeros.
    assert expected[3].tangent is None
    expected[3] = (expected[3].primal, torch.zeros_like(expected[3].primal))
    assert_all_close(run(lt.bilinear), expected)
    assert kernel_calls["bilinear_backward"] > 0


def test_registered_operators_refuse_a_tangent():
    # torch.library.custom_op takes no jvp formula: the operators must not drop the tangent.
    # Without requires_grad the operator's own check says so; with it, PyTorch asks for the
    # jvp that its custom operators cannot have.
    t = tensors()
    for requires_grad, message in [
        (False, r"no forward-mode AD formula: call linmaps\.torch\."),
        (True, r"You must implement the jvp function"),
    ]:
        with fwAD.dual_level():
            dual = fwAD.make_dual(t.x1.clone().requires_grad_(requires_grad), t.dx1)
            with pytest.raises(NotImplementedError, match=message):
                torch.ops.linmaps.bilinear(dual, t.x2, t.w, t.b)
            with pytest.raises(NotImplementedError, match=message):
                torch.ops.linmaps.linear(dual, t.wl, None)
            grad = fwAD.make_dual(randn(3, 2, requires_grad=requires_grad), randn(3, 2, seed=1))
            with pytest.raises(NotImplementedError, match=message):
                torch.ops.linmaps.bilinear_backward(grad, t.x1, t.x2, t.w, True, True, True, True)


# ----------------------------------------------------------------------------- batched gradients


@pytest.mark.parametrize(
    "wanted", [m for m in itertools.product([False, True], repeat=4) if any(m)]
)
def test_is_grads_batched_equals_torch(wanted, kernel_calls):
    t = tensors()

    def run(B, L):
        bilinear_args = [
            a.clone().requires_grad_(w) for a, w in zip((t.x1, t.x2, t.w, t.b), wanted)
        ]
        out = B(*bilinear_args)
        wanted_args = [a for a in bilinear_args if a.requires_grad]
        grads = torch.autograd.grad(out, wanted_args, t.gs, is_grads_batched=True)
        linear_args = [bilinear_args[0], t.wl.clone().requires_grad_(wanted[2]), bilinear_args[3]]
        wanted_args = [a for a in linear_args if a.requires_grad]
        if wanted_args:
            out = L(*linear_args)
            grads += torch.autograd.grad(out, wanted_args, t.gs, is_grads_batched=True)
        return grads

    expected = run(F.bilinear, F.linear)
    assert_all_close(run(lt.bilinear, lt.linear), expected)
    assert kernel_calls["bilinear_backward"] > 0


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_with_every_check(lead, with_bias, kernel_calls):
    x1 = randn(*lead, 4, requires_grad=True)
    x2 = randn(*lead, 3, seed=1, requires_grad=True)
    weight = randn(2, 4, 3, seed=2, requires_grad=True)
    bias = randn(2, seed=3, requires_grad=True) if with_bias else None
    w_linear = randn(2, 4, seed=4, requires_grad=True)
    for function, args in [
        (lt.bilinear, (x1, x2, weight, bias)),
        (lt.linear, (x1, w_linear, bias)),
    ]:
        assert torch.autograd.gradcheck(
            function,
            args,
            check_batched_grad=True,
            check_forward_ad=True,
            check_batched_forward_grad=True,
            check_undefined_grad=True,
        )
        assert torch.autograd.gradgradcheck(function, args, check_batched_grad=True)
        assert torch.autograd.gradgradcheck(
            function,
            args,
            check_fwd_over_rev=True,
            check_rev_over_rev=False,
            check_undefined_grad=False,
        )
    assert kernel_calls["bilinear_backward"] > 0 and kernel_calls["linear_backward"] > 0


def test_registered_operators_under_vmap_equal_torch(kernel_calls):
    t = tensors()
    ops = torch.ops.linmaps
    expected = reference(CASES["vmap x1 w"])
    got = vmap(lambda a, w: ops.bilinear(a, t.x2, w, t.b))(t.x1s, t.ws)
    assert_all_close(got, expected)
    expected = reference(CASES["vmap linear x"])
    assert_all_close(vmap(lambda a: ops.linear(a, t.wl, t.b))(t.x1s), expected)
    grads = vmap(lambda g: ops.bilinear_backward(g, t.x1, t.x2, t.w, True, True, True, True))(t.gs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        x1, x2, w, b = (a.clone().requires_grad_() for a in (t.x1, t.x2, t.w, t.b))
        expected = torch.autograd.grad(
            F.bilinear(x1, x2, w, b), (x1, x2, w, b), t.gs, is_grads_batched=True
        )
    assert_all_close(grads, expected)
    assert dict(kernel_calls) == {"bilinear": 6, "linear": 1, "bilinear_backward": 2}
