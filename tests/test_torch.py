"""linmaps.torch: values and gradients against torch.nn.functional, gradcheck/gradgradcheck,
opcheck, the modules against torch.nn, fallbacks, errors, modes, threads, torch.compile and a
small training run against the all-PyTorch model. Skipped when torch is not installed."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch_helpers import assert_close, ran_linmaps, randn  # noqa: E402

import linmaps  # noqa: E402
import linmaps.torch as lt  # noqa: E402
from linmaps import _api, _backend  # noqa: E402

DTYPES = [torch.float32, torch.float64]
hyp = settings(max_examples=25, deadline=None)


def grads_of(function, inputs, grad_out):
    output = function(*inputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return output, torch.autograd.grad(output, wanted, grad_out)


# ----------------------------------------------------------------------------- values, gradients

shape_strategy = st.fixed_dictionaries(
    {
        "lead": st.lists(st.integers(0, 4), max_size=2).map(tuple),
        "in1": st.integers(1, 7),
        "in2": st.integers(1, 7),
        "out": st.integers(1, 6),
        "bias": st.booleans(),
        "dtype": st.sampled_from(DTYPES),
        "seed": st.integers(0, 2**16),
    }
)


@hyp
@given(case=shape_strategy)
def test_bilinear_values_and_gradients_equal_torch(case):
    lead, dtype, seed = case["lead"], case["dtype"], case["seed"]
    x1 = randn(*lead, case["in1"], dtype=dtype, seed=seed, requires_grad=True)
    x2 = randn(*lead, case["in2"], dtype=dtype, seed=seed + 1, requires_grad=True)
    weight = randn(case["out"], case["in1"], case["in2"], dtype=dtype, seed=seed + 2)
    weight.requires_grad_(True)
    bias = randn(case["out"], dtype=dtype, seed=seed + 3, requires_grad=True)
    inputs = (x1, x2, weight, bias if case["bias"] else None)
    grad_out = randn(*lead, case["out"], dtype=dtype, seed=seed + 4)
    z, grads = grads_of(lt.bilinear, inputs, grad_out)
    z_ref, grads_ref = grads_of(F.bilinear, inputs, grad_out)
    assert ran_linmaps(z)
    assert_close(z, z_ref)
    assert len(grads) == len(grads_ref) == (4 if case["bias"] else 3)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref)


@hyp
@given(case=shape_strategy)
def test_linear_values_and_gradients_equal_torch(case):
    lead, dtype, seed = case["lead"], case["dtype"], case["seed"]
    x = randn(*lead, case["in1"], dtype=dtype, seed=seed, requires_grad=True)
    weight = randn(case["out"], case["in1"], dtype=dtype, seed=seed + 1, requires_grad=True)
    bias = randn(case["out"], dtype=dtype, seed=seed + 2, requires_grad=True)
    inputs = (x, weight, bias if case["bias"] else None)
    grad_out = randn(*lead, case["out"], dtype=dtype, seed=seed + 3)
    y, grads = grads_of(lt.linear, inputs, grad_out)
    y_ref, grads_ref = grads_of(F.linear, inputs, grad_out)
    assert ran_linmaps(y)
    assert_close(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref)


def test_non_contiguous_inputs_and_gradients():
    # Transposed inputs and the expanded (stride-0) gradient that .sum().backward() sends.
    x1 = randn(5, 6, seed=1).t().requires_grad_(True)
    x2 = randn(4, 6, seed=2).t().requires_grad_(True)
    weight = randn(3, 4, 5, seed=3).transpose(1, 2).requires_grad_(True)
    assert not (x1.is_contiguous() or weight.is_contiguous())
    z = lt.bilinear(x1, x2, weight)
    assert ran_linmaps(z)
    grads = torch.autograd.grad(z.sum(), (x1, x2, weight))
    z_ref = F.bilinear(x1, x2, weight)
    for grad, grad_ref in zip(grads, torch.autograd.grad(z_ref.sum(), (x1, x2, weight))):
        assert_close(grad, grad_ref)
    assert_close(z, z_ref)
    x = randn(4, 7, seed=4)[:, ::2].requires_grad_(True)
    weight = randn(4, 3, seed=5).t().requires_grad_(True)
    y = lt.linear(x, weight)
    assert ran_linmaps(y)
    assert_close(y, F.linear(x, weight))


def test_contiguous_tensors_reach_the_kernels_without_a_copy(monkeypatch):
    seen = []
    original = _api.bilinear

    def recording(x1, x2, weight, bias=None):
        seen.extend(a.__array_interface__["data"][0] for a in (x1, x2, weight, bias))
        return original(x1, x2, weight, bias)

    monkeypatch.setattr(_api, "bilinear", recording)
    x1, x2, weight, bias = randn(8, 5), randn(8, 4, seed=1), randn(3, 5, 4, seed=2), randn(3)
    lt.bilinear(x1, x2, weight, bias)
    assert seen == [t.data_ptr() for t in (x1, x2, weight, bias)]


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (0, 2), (1, 3), ()])
def test_only_the_needed_bilinear_gradients_are_computed(monkeypatch, wanted):
    calls = []
    original = _api.bilinear_backward

    def recording(*args, **flags):
        calls.append({k: v for k, v in flags.items() if k != "context"})
        contexts.append(flags.get("context"))
        return original(*args, **flags)

    contexts = []
    monkeypatch.setattr(_api, "bilinear_backward", recording)
    inputs = [randn(6, 5), randn(6, 4, seed=1), randn(3, 5, 4, seed=2), randn(3, seed=3)]
    for index in wanted:
        inputs[index].requires_grad_(True)
    z = lt.bilinear(*inputs)
    if not wanted:
        assert z.grad_fn is None
        return
    z.sum().backward()
    names = ("need_x1", "need_x2", "need_weight", "bias")
    assert calls == [{name: i in wanted for i, name in enumerate(names)}]
    # The eager path's backward uses the forward's kept intermediate (bilinear_with_context).
    assert isinstance(contexts[0], linmaps.BilinearContext) and contexts[0].kept_bytes > 0
    for index, tensor in enumerate(inputs):
        assert (tensor.grad is not None) == (index in wanted)


def test_only_the_needed_linear_gradients_are_computed(monkeypatch):
    calls = []
    original = _api.linear_backward

    def recording(*args, **flags):
        calls.append(flags)
        return original(*args, **flags)

    monkeypatch.setattr(_api, "linear_backward", recording)
    x, weight, bias = randn(6, 5, requires_grad=True), randn(3, 5, seed=1), randn(3, seed=2)
    lt.linear(x, weight, bias).sum().backward()
    weight.requires_grad_(True)
    lt.linear(x.detach(), weight, bias).sum().backward()
    assert calls == [
        {"bias": False, "need_x": True, "need_weight": False},
        {"bias": False, "need_x": False, "need_weight": True},
    ]


# ----------------------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_gradcheck_and_gradgradcheck(with_bias, lead):
    x1 = randn(*lead, 4, requires_grad=True)
    x2 = randn(*lead, 3, seed=1, requires_grad=True)
    weight = randn(2, 4, 3, seed=2, requires_grad=True)
    bias = randn(2, seed=3, requires_grad=True) if with_bias else None
    assert ran_linmaps(lt.bilinear(x1, x2, weight, bias))
    assert torch.autograd.gradcheck(lt.bilinear, (x1, x2, weight, bias))
    assert torch.autograd.gradgradcheck(lt.bilinear, (x1, x2, weight, bias))
    w_linear = randn(2, 4, seed=4, requires_grad=True)
    assert torch.autograd.gradcheck(lt.linear, (x1, w_linear, bias))
    assert torch.autograd.gradgradcheck(lt.linear, (x1, w_linear, bias))


def test_gradgradcheck_with_some_inputs_constant():
    x1, x2 = randn(3, 4, requires_grad=True), randn(3, 3, seed=1)
    weight = randn(2, 4, 3, seed=2, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, w: lt.bilinear(a, x2, w), (x1, weight))
    assert torch.autograd.gradgradcheck(
        lambda w: lt.linear(x1.detach(), w), (randn(2, 4).requires_grad_(),)
    )


def test_third_order_gradient_equals_torch():
    inputs = [randn(3, 4, requires_grad=True), randn(3, 3, seed=1, requires_grad=True)]
    weight = randn(2, 4, 3, seed=2, requires_grad=True)

    def third(function):
        z = function(*inputs, weight).pow(3).sum()
        (g,) = torch.autograd.grad(z, inputs[0], create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), weight, create_graph=True)
        return torch.autograd.grad(gg.sum(), inputs[1])[0]

    assert_close(third(lt.bilinear), third(F.bilinear))


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_registered_operators_directly(lead):
    # What torch.compile runs: the operators and their registered autograd, without the
    # eager path's autograd.Function.
    x1, x2 = randn(*lead, 4, requires_grad=True), randn(*lead, 3, seed=1, requires_grad=True)
    weight = randn(2, 4, 3, seed=2, requires_grad=True)
    bias = randn(2, seed=3, requires_grad=True)
    w_linear = randn(2, 4, seed=4, requires_grad=True)
    ops = torch.ops.linmaps
    grad_out = randn(*lead, 2, seed=5)
    for ours, theirs, args in [
        (ops.bilinear, F.bilinear, (x1, x2, weight, bias)),
        (ops.linear, F.linear, (x1, w_linear, bias)),
    ]:
        z, grads = grads_of(ours, args, grad_out)
        z_ref, grads_ref = grads_of(theirs, args, grad_out)
        assert "linmaps" in type(z.grad_fn).__name__
        assert_close(z, z_ref)
        for grad, grad_ref in zip(grads, grads_ref):
            assert_close(grad, grad_ref)
        assert torch.autograd.gradcheck(ours, args)
        assert torch.autograd.gradgradcheck(ours, args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x1, x2 = randn(5, 4, dtype=dtype, requires_grad=True), randn(5, 3, dtype=dtype, seed=1)
    weight = randn(2, 4, 3, dtype=dtype, seed=2, requires_grad=True)
    bias = randn(2, dtype=dtype, seed=3, requires_grad=True)
    grad = randn(5, 2, dtype=dtype, seed=4, requires_grad=True)
    w_linear = randn(2, 4, dtype=dtype, seed=5, requires_grad=True)
    ops = torch.ops.linmaps
    cases = [
        (ops.bilinear.default, (x1, x2, weight, bias)),
        (ops.bilinear.default, (x1, x2, weight, None)),
        (ops.bilinear_backward.default, (grad, x1, x2, weight, True, True, True, True)),
        (ops.bilinear_backward.default, (grad, x1, x2, weight, False, True, False, True)),
        (ops.linear.default, (x1, w_linear, bias)),
        (ops.linear.default, (x1, w_linear, None)),
        (ops.linear_backward.default, (grad, x1, w_linear, True, True, True)),
        (ops.linear_backward.default, (grad, x1, w_linear, False, True, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- fallback, errors


@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision_goes_to_torch(dtype):
    # bfloat16 goes to linmaps where ml_dtypes is installed (tests/test_torch_bf16.py).
    x1, x2 = randn(6, 5, dtype=dtype, requires_grad=True), randn(6, 4, dtype=dtype, seed=1)
    weight, bias = randn(3, 5, 4, dtype=dtype, seed=2), randn(3, dtype=dtype, seed=3)
    z = lt.bilinear(x1, x2, weight, bias)
    assert not ran_linmaps(z)
    assert torch.equal(z, F.bilinear(x1, x2, weight, bias))
    (grad,) = torch.autograd.grad(z.sum(), x1)
    (grad_ref,) = torch.autograd.grad(F.bilinear(x1, x2, weight, bias).sum(), x1)
    assert torch.equal(grad, grad_ref)
    w_linear = randn(3, 5, dtype=dtype, seed=4)
    y = lt.linear(x1, w_linear, bias)
    assert not ran_linmaps(y) and torch.equal(y, F.linear(x1, w_linear, bias))


def test_other_devices_and_what_the_kernels_do_not_take_go_to_torch():
    # The meta device stands in for CUDA and other devices on a machine without them.
    meta = lt.bilinear(*(torch.empty(s, device="meta") for s in [(6, 5), (6, 4), (3, 5, 4)]))
    assert meta.device.type == "meta" and meta.shape == (6, 3)
    assert lt.linear(torch.empty(6, 5, device="meta"), torch.empty(3, 5)).shape == (6, 3)
    x, weight = randn(6, 5, requires_grad=True), randn(3, 5, seed=1)
    cases = [
        (x, weight, randn(1, seed=2)),  # a broadcast bias
        (x, randn(5, seed=3)),  # a 1-D weight
        (x.to_sparse(), weight),
    ]
    for args in cases:
        y = lt.linear(*args)
        assert not ran_linmaps(y)
        expected = F.linear(*args)
        assert torch.equal(y.to_dense(), expected.to_dense())
    x, weight = x.float(), weight.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = lt.linear(x, weight), F.linear(x, weight)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)


BAD_BILINEAR = [
    [(2, 5), (3, 4), (3, 5, 4)],
    [(2, 6), (2, 4), (3, 5, 4)],
    [(2, 5), (2, 4), (5, 4)],
    [(2, 5), (2, 4), (3, 5, 4), (4,)],
    [(2, 3, 5), (6, 4), (3, 5, 4)],
    [(5,), (1, 4), (3, 5, 4)],
    [(), (), (3, 5, 4)],
]
BAD_LINEAR = [
    [(2, 5), (3, 4)],
    [(), (3, 1)],
    [(2, 5), (3, 5), (4,)],
    [(2, 5), (3, 5), (3, 1)],
    [(2, 5), (3, 5, 1)],
]


@pytest.mark.parametrize(
    ("function", "reference", "shapes"),
    [(lt.bilinear, F.bilinear, s) for s in BAD_BILINEAR]
    + [(lt.linear, F.linear, s) for s in BAD_LINEAR],
)
def test_bad_shapes_raise_torchs_own_error(function, reference, shapes):
    args = [randn(*shape, seed=i) for i, shape in enumerate(shapes)]
    with pytest.raises(Exception) as expected:
        reference(*args)
    with pytest.raises(type(expected.value)) as got:
        function(*args)
    assert str(got.value) == str(expected.value)


def test_mixed_dtypes_raise_torchs_own_error():
    args = [randn(2, 5), randn(2, 4, dtype=torch.float32), randn(3, 5, 4)]
    with pytest.raises(RuntimeError) as expected:
        F.bilinear(*args)
    with pytest.raises(RuntimeError, match="same dtype") as got:
        lt.bilinear(*args)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("zero", ["in1", "in2", "both"])
def test_zero_size_features_give_the_empty_sum_where_torch_raises(zero):
    # The accepted difference (docs/torch.md): PyTorch cannot reshape the 0 elements of an
    # empty feature dimension and raises; the map with no features is the empty sum, plus
    # the bias, and its gradients are zeros (inputs), empty (weight) and sum(g) (bias).
    in1, in2 = (0 if zero in ("in1", "both") else 4), (0 if zero in ("in2", "both") else 5)
    x1 = randn(3, in1, requires_grad=True)
    x2 = randn(3, in2, seed=1, requires_grad=True)
    weight, bias = randn(2, in1, in2, seed=2, requires_grad=True), randn(2, seed=3)
    bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match="cannot reshape tensor of 0 elements"):
        F.bilinear(x1, x2, weight, bias)
    z = lt.bilinear(x1, x2, weight, bias)
    assert ran_linmaps(z)
    assert torch.equal(z, bias.detach().expand(3, 2))
    g = randn(3, 2, seed=4)
    grads = torch.autograd.grad(z, (x1, x2, weight, bias), g)
    assert torch.equal(grads[0], torch.zeros(3, in1, dtype=torch.float64))
    assert torch.equal(grads[1], torch.zeros(3, in2, dtype=torch.float64))
    assert grads[2].shape == (2, in1, in2)
    assert_close(grads[3], g.sum(0))


# ----------------------------------------------------------------------------- modes, modules


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(mode):
    layer = lt.Bilinear(5, 4, 3)
    x1, x2 = randn(6, 5, dtype=torch.float32), randn(6, 4, dtype=torch.float32, seed=1)
    with mode():
        z = layer(x1, x2)
        expected = F.bilinear(x1, x2, layer.weight, layer.bias)
        y = lt.Linear(5, 2)(x1)
    assert z.grad_fn is None and not z.requires_grad and y.shape == (6, 2)
    assert_close(z, expected)


@pytest.mark.parametrize("bias", [True, False])
def test_modules_are_torch_modules_with_the_same_init_and_state_dict(bias):
    for ours, theirs, args in [
        (lt.Bilinear, torch.nn.Bilinear, (5, 4, 3)),
        (lt.Linear, torch.nn.Linear, (5, 3)),
    ]:
        torch.manual_seed(7)
        layer = ours(*args, bias=bias, dtype=torch.float64)
        torch.manual_seed(7)
        reference = theirs(*args, bias=bias, dtype=torch.float64)
        assert isinstance(layer, theirs)
        assert repr(layer) == repr(reference)
        assert layer.state_dict().keys() == reference.state_dict().keys()
        for key, value in reference.state_dict().items():
            assert torch.equal(layer.state_dict()[key], value)
        # Both ways: a torch layer's state into ours, ours into a torch layer.
        other = theirs(*args, bias=bias, dtype=torch.float64)
        layer.load_state_dict(other.state_dict())
        fresh = ours(*args, bias=bias, dtype=torch.float64)
        reference.load_state_dict(fresh.state_dict())
        for key in other.state_dict():
            assert torch.equal(layer.state_dict()[key], other.state_dict()[key])
            assert torch.equal(reference.state_dict()[key], fresh.state_dict()[key])
        inputs = [randn(6, n, seed=i) for i, n in enumerate(args[:-1])]
        out = layer(*inputs)
        assert ran_linmaps(out)
        assert_close(out, other(*inputs))


class _Model(torch.nn.Module):
    def __init__(self, linear_cls, bilinear_cls, dtype):
        super().__init__()
        self.encode = linear_cls(6, 8, dtype=dtype)
        self.combine = bilinear_cls(8, 5, 3, dtype=dtype)

    def forward(self, x, y):
        return self.combine(torch.tanh(self.encode(x)), y)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_training_matches_the_all_pytorch_model(dtype, rtol):
    torch.manual_seed(0)
    ours = _Model(lt.Linear, lt.Bilinear, dtype)
    theirs = _Model(torch.nn.Linear, torch.nn.Bilinear, dtype)
    theirs.load_state_dict(ours.state_dict())
    x, y = randn(32, 6, dtype=dtype, seed=1), randn(32, 5, dtype=dtype, seed=2)
    target = randn(32, 3, dtype=dtype, seed=3)
    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        losses[name] = []
        for _ in range(50):
            optimizer.zero_grad()
            loss = F.mse_loss(model(x, y), target)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["ours"][-1] < 0.7 * losses["ours"][0]  # it learned something
    np.testing.assert_allclose(losses["ours"], losses["theirs"], rtol=rtol)


def test_torch_compile_fullgraph_without_graph_breaks():
    import torch._dynamo

    torch.manual_seed(0)
    model = _Model(lt.Linear, lt.Bilinear, torch.float32)
    x, y = randn(16, 6, dtype=torch.float32), randn(16, 5, dtype=torch.float32, seed=1)
    explanation = torch._dynamo.explain(model)(x, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    expected = model(x, y)
    grads_ref = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    assert ran_linmaps(expected)
    assert_close(out, expected)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- in place, tracing

INPLACE_ERROR = "modified by an inplace operation"


def backward_after_inplace_change(function, shapes, wanted, changed, how):
    """Forward, then ``changed`` (argument indices) doubled in place under no_grad, then the
    gradients of the ``wanted`` arguments: the gradients, or the error's message."""
    args = [randn(*shape, seed=i).requires_grad_(i in wanted) for i, shape in enumerate(shapes)]
    if how == "operator":
        function = {F.bilinear: torch.ops.linmaps.bilinear, F.linear: torch.ops.linmaps.linear}.get(
            function, function
        )
    out = function(*args)
    with torch.no_grad():
        for index in changed:
            args[index].mul_(2)
    try:
        grads = torch.autograd.grad(
            out.square().sum(), [args[i] for i in wanted], create_graph=how == "create_graph"
        )
    except RuntimeError as error:
        assert INPLACE_ERROR in str(error)
        return INPLACE_ERROR
    return grads


@pytest.mark.parametrize("how", ["eager", "create_graph", "operator"])
@pytest.mark.parametrize("in1_in2", [(4, 5), (5, 4)])
@pytest.mark.parametrize("changed", [(0,), (1,), (2,)])
@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (2, 3), (0, 2)])
def test_inplace_change_before_backward_as_in_torch(wanted, changed, in1_in2, how):
    # PyTorch saves only what the wanted gradients read: an optimizer's in-place step on a
    # weight whose gradient is wanted, but not read, is no error. linmaps' kept T (made from
    # the wider input and the weight) must still be caught when the gradient that reads it is
    # wanted: the same cases raise, the others give the same gradients.
    in1, in2 = in1_in2
    shapes = [(3, in1), (3, in2), (2, in1, in2), (2,)]
    expected = backward_after_inplace_change(F.bilinear, shapes, wanted, changed, "eager")
    ours = lt.bilinear if how != "operator" else F.bilinear
    got = backward_after_inplace_change(ours, shapes, wanted, changed, how)
    if expected == INPLACE_ERROR:
        assert got == INPLACE_ERROR
    else:
        assert got != INPLACE_ERROR
        for grad, grad_ref in zip(got, expected):
            assert_close(grad, grad_ref)


@pytest.mark.parametrize("how", ["eager", "create_graph", "operator"])
@pytest.mark.parametrize("changed", [(0,), (1,)])
@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (1, 2)])
def test_inplace_change_before_linear_backward_as_in_torch(wanted, changed, how):
    shapes = [(3, 4), (2, 4), (2,)]
    expected = backward_after_inplace_change(F.linear, shapes, wanted, changed, "eager")
    ours = lt.linear if how != "operator" else F.linear
    got = backward_after_inplace_change(ours, shapes, wanted, changed, how)
    if expected == INPLACE_ERROR:
        assert got == INPLACE_ERROR
    else:
        assert got != INPLACE_ERROR
        for grad, grad_ref in zip(got, expected):
            assert_close(grad, grad_ref)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("module", ["Bilinear", "Linear"])
def test_jit_trace_records_the_registered_operator(module):
    torch.manual_seed(0)
    layer = lt.Bilinear(5, 4, 3) if module == "Bilinear" else lt.Linear(5, 3)
    reference = torch.nn.Bilinear(5, 4, 3) if module == "Bilinear" else torch.nn.Linear(5, 3)
    reference.load_state_dict(layer.state_dict())
    sizes = (5, 4) if module == "Bilinear" else (5,)
    traced = torch.jit.trace(layer, tuple(randn(6, n, dtype=torch.float32) for n in sizes))
    assert f"linmaps::{module.lower()}" in str(traced.graph)
    # Another batch size, and gradients through the traced module.
    inputs = [
        randn(9, n, dtype=torch.float32, seed=i, requires_grad=True) for i, n in enumerate(sizes)
    ]
    out, grads = grads_of(traced, inputs, randn(9, 3, dtype=torch.float32, seed=7))
    out_ref, grads_ref = grads_of(reference, inputs, randn(9, 3, dtype=torch.float32, seed=7))
    assert_close(out, out_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref)


# ----------------------------------------------------------------------------- threads, packaging


def test_linmaps_follows_torchs_thread_count_unless_set(monkeypatch):
    if "cpp" not in linmaps.available_backends():
        pytest.skip("the compiled backend is not available")
    monkeypatch.setattr(_backend, "_user_threads", False)
    monkeypatch.setattr(_backend, "_followed", 0)
    before_torch, before_linmaps = torch.get_num_threads(), _backend._cpp_backend._core
    setting = before_linmaps.get_thread_setting()
    args = (randn(4, 3), randn(2, 3, seed=1))
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            lt.linear(*args)
            assert before_linmaps.get_thread_setting() == n
        monkeypatch.setattr(_backend, "_user_threads", True)  # as after linmaps.set_num_threads
        torch.set_num_threads(2)
        lt.linear(*args)
        assert before_linmaps.get_thread_setting() == 3
    finally:
        torch.set_num_threads(before_torch)
        before_linmaps.set_num_threads(setting)


FORK_AFTER_ONE_CALL = """
import os, signal, time
import torch
import torch.nn.functional as F
import linmaps.torch as lt
from linmaps import _cpp_backend

torch.set_num_threads(2)
x1, x2 = torch.randn(256, 64), torch.randn(256, 64)
w = torch.randn(32, 64, 64, requires_grad=True)
lt.bilinear(x1, x2, w).sum().backward()  # the parent's only threaded work
pid = os.fork()
if pid == 0:
    a = torch.randn(512, 512, requires_grad=True)
    (a @ a).sum().backward()  # PyTorch's own parallel regions, and AccumulateGrad
    x = torch.randn(256, 64, requires_grad=True)
    z = lt.bilinear(x, x2, w.detach())
    z.sum().backward()
    same = torch.allclose(z, F.bilinear(x, x2, w.detach()), rtol=1e-4, atol=1e-3)
    print("child", _cpp_backend._core.in_forked_child(), torch.get_num_threads(), same, flush=True)
    os._exit(0)
deadline = time.monotonic() + 60
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("status", status)
        break
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("the child hung")
        break
    time.sleep(0.05)
"""


def test_forked_child_runs_torchs_own_threaded_ops_after_a_linmaps_call():
    # One pool for both libraries (torch's libgomp): a forked child's parallel regions wait
    # for threads that were not forked, PyTorch's too, unless the child runs them on one
    # thread. The child is killed after 60 s, so a hang fails the test instead of hanging it.
    if "cpp" not in linmaps.available_backends():
        pytest.skip("the compiled backend is not available")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOMP_", "OMP_"))}
    result = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_ONE_CALL],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["child True 1 True", "status 0"], result.stderr


def test_show_config_shows_the_torch_version(capsys):
    linmaps.show_config()
    assert f"torch: {torch.__version__}" in capsys.readouterr().out


def test_import_error_names_the_extra_without_torch():
    code = "import sys; sys.modules['torch'] = None; import linmaps.torch"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "linmaps[torch]" in result.stderr


def test_example_runs(capsys):
    example = Path(__file__).resolve().parent.parent / "examples" / "torch_bilinear.py"
    namespace = runpy.run_path(str(example), run_name="example")
    assert namespace["main"](["--steps", "6", "--batch", "16", "--hidden", "8"]) == 0
    assert "per step: linmaps.torch" in capsys.readouterr().out
