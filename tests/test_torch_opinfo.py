"""PyTorch's own gradient tests, run on linmaps.torch.

The torch wheel ships ``torch.testing._internal``: the OpInfos of
``nn.functional.bilinear`` and ``nn.functional.linear`` (their sample inputs and the flags
PyTorch's own suite runs them with) and the ModuleInfos of ``nn.Bilinear`` and ``nn.Linear``.
This file runs them through the checks of PyTorch's ``test/test_ops.py::TestGradients``
(``test_fn_grad``, ``test_fn_gradgrad``, ``test_fn_fwgrad_bwgrad``, ``test_forward_mode_AD``,
by PyTorch's own helper ``TestGradients._check_helper``) and of ``test/test_modules.py``
(``test_grad``, ``test_gradgrad``), with their default flags (batched gradients included),
in float64, with ``linmaps.torch``'s function or module in the place of PyTorch's, and
compares the values with PyTorch's operator and the ModuleInfos' reference formulas.

Each check counts linmaps' kernel calls with PyTorch's operators made to fail inside
linmaps.torch: a sample that silently went to PyTorch's fallback would fail. (Complex
samples, which PyTorch runs for ``linear`` too, go to PyTorch's operator and are not run.)
"""

import pytest

torch = pytest.importorskip("torch")

# PyTorch warns once per process, on the first forward-mode check, that its decompositions
# use torch.jit.script: PyTorch's own doing.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

import hypothesis  # noqa: E402
from torch_helpers import assert_close, count_kernel_calls  # noqa: E402

import linmaps.torch as lt  # noqa: E402


def _import_pytorch_testing():
    """Import PyTorch's test helpers, undoing what their import does to the process: it loads
    a hypothesis profile (fewer examples for every other test file) and freezes
    ``torch.backends`` flags."""
    saved_profile = hypothesis.settings.default
    try:
        from torch.testing._internal import common_methods_invocations, common_modules, common_utils
    finally:
        hypothesis.settings.register_profile("linmaps-restored", saved_profile)
        hypothesis.settings.load_profile("linmaps-restored")
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return common_methods_invocations.op_db, common_modules.module_db, common_utils


op_db, module_db, common_utils = _import_pytorch_testing()

OURS = {
    "nn.functional.bilinear": (lt.bilinear, "bilinear"),
    "nn.functional.linear": (lt.linear, "linear"),
}
# The forward kernels of each map (the eager bilinear map keeps T: bilinear_with_context).
FORWARD_KERNELS = {"bilinear": ("bilinear", "bilinear_with_context"), "linear": ("linear",)}
OPS = {op.name: op for op in op_db if op.name in OURS and not op.variant_test_name}
MODULES = {
    info.module_cls: info
    for info in module_db
    if info.module_cls in (torch.nn.Bilinear, torch.nn.Linear)
}
MODULE_OURS = {torch.nn.Bilinear: lt.Bilinear, torch.nn.Linear: lt.Linear}


@pytest.fixture
def kernel_calls(monkeypatch):
    return count_kernel_calls(monkeypatch)


@pytest.fixture
def helper():
    """PyTorch's TestGradients, whose helpers the OpInfo checks call."""
    return common_utils.TestGradients()


def test_the_wheel_has_the_opinfos_and_moduleinfos():
    assert set(OPS) == set(OURS) and set(MODULES) == set(MODULE_OURS)
    for op in OPS.values():
        assert op.supports_autograd and op.supports_gradgrad
        assert op.supports_forward_ad and op.supports_fwgrad_bwgrad
        assert op.check_batched_grad and op.check_batched_gradgrad


# ----------------------------------------------------------------------------- OpInfos


def samples(op):
    return list(op.sample_inputs("cpu", torch.float64, requires_grad=True))


@pytest.mark.parametrize("name", sorted(OURS))
def test_opinfo_samples_equal_torch(name, kernel_calls):
    op = OPS[name]
    ours, kernel = OURS[name]
    for sample in samples(op):
        args = (sample.input, *sample.args)
        expected = op(*args, **sample.kwargs)
        assert_close(ours(*args, **sample.kwargs), expected)
    assert sum(kernel_calls[k] for k in FORWARD_KERNELS[kernel]) == len(samples(op))


# test_ops.py's TestGradients tests: the check and the extra flags each test passes.
GRADIENT_TESTS = {
    "test_fn_grad": ("gradcheck", {}),
    "test_fn_gradgrad": ("bwgrad_bwgrad", {}),
    "test_fn_fwgrad_bwgrad": ("fwgrad_bwgrad", {}),
    "test_forward_mode_AD": ("gradcheck", {"check_forward_ad": True, "check_backward_ad": False}),
}


@pytest.mark.parametrize("test", list(GRADIENT_TESTS))
@pytest.mark.parametrize("name", sorted(OURS))
def test_opinfo_gradients_with_torchs_own_checks(name, test, helper, kernel_calls):
    op = OPS[name]
    ours, kernel = OURS[name]
    check, flags = GRADIENT_TESTS[test]
    if test == "test_forward_mode_AD":
        flags = {
            **flags,
            "check_batched_grad": False,
            "check_batched_forward_grad": op.check_batched_forward_grad,
        }
    helper._check_helper("cpu", torch.float64, op, ours, check, **flags)
    assert sum(kernel_calls[k] for k in FORWARD_KERNELS[kernel]) > 0
    if check != "gradcheck" or flags.get("check_backward_ad", True):
        assert kernel_calls[f"{kernel}_backward"] > 0


# ----------------------------------------------------------------------------- ModuleInfos


def module_cases(module_cls):
    info = MODULES[module_cls]
    return [
        case
        for case in info.module_inputs_func(
            info, device="cpu", dtype=torch.float64, requires_grad=True, training=True
        )
        if case.forward_input is not None
    ]


def make_module(module_cls, case):
    constructor = case.constructor_input
    module = MODULE_OURS[module_cls](*constructor.args, **constructor.kwargs)
    return module.to(torch.float64)


@pytest.mark.parametrize("module_cls", list(MODULE_OURS), ids=lambda cls: cls.__name__)
def test_moduleinfo_outputs_equal_the_reference(module_cls, kernel_calls):
    cases = module_cases(module_cls)
    for case in cases:
        module = make_module(module_cls, case)
        args, kwargs = case.forward_input.args, case.forward_input.kwargs
        expected = case.reference_fn(module, *args, **kwargs)
        assert_close(module(*args, **kwargs), expected.detach())
    assert sum(kernel_calls.values()) >= len(cases)


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("module_cls", list(MODULE_OURS), ids=lambda cls: cls.__name__)
def test_moduleinfo_gradients_with_torchs_own_checks(module_cls, check, kernel_calls):
    """test_modules.py's _test_gradients_helper: the total derivative, then the partial
    derivative of each parameter, by common_utils' gradcheck/gradgradcheck (batched
    gradients and fast mode by default)."""
    checker = getattr(common_utils, check)
    for case in module_cases(module_cls):
        module = make_module(module_cls, case)
        module.train(True)
        params = tuple(module.parameters())
        input_args, input_kwargs = case.forward_input.args, case.forward_input.kwargs
        names, count = list(input_kwargs), len(input_args)
        grad_inputs = (*input_args, *params, *input_kwargs.values())

        def forward(*flat, module=module, count=count, names=names):
            args, kwargs = flat[:count], dict(zip(names, flat[len(flat) - len(names) :]))
            return torch.utils._pytree.tree_leaves(module(*args, **kwargs))

        assert checker(forward, grad_inputs)
        for p in params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            assert checker(forward, grad_inputs)
            p.requires_grad_(False)
    kernel = "bilinear" if module_cls is torch.nn.Bilinear else "linear"
    assert kernel_calls[f"{kernel}_backward"] > 0
