"""Helpers of the linmaps.torch tests; import it only after ``pytest.importorskip("torch")``."""

import collections

import torch

import linmaps.torch as lt
from linmaps import _api

# What linmaps.torch calls to compute: every one of its layers ends in these.
KERNELS = ("linear", "linear_backward", "bilinear", "bilinear_backward", "bilinear_with_context")


def randn(*shape, dtype=torch.float64, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, dtype=dtype, generator=generator)
    return tensor.requires_grad_(requires_grad)


def ran_linmaps(tensor) -> bool:
    """Whether ``tensor`` came out of linmaps (a registered operator, or one of the eager
    path's autograd.Functions), not out of PyTorch's fallback."""
    if tensor.grad_fn is None:
        return False
    name = type(tensor.grad_fn).__name__
    return "linmaps" in name or name.startswith(
        ("_LinearFunction", "_BilinearFunction", "_BilinearKeptFunction")
    )


def assert_close(actual, expected):
    """Same dtype and shape; values equal up to a few roundings of sums of products.

    The tolerance is PyTorch's for the dtype, scaled by the largest magnitude of the expected
    tensor (different summation orders differ by roundings relative to it).
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    eps = torch.finfo(expected.dtype).eps
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=64 * eps * scale)


def assert_all_close(actual, expected):
    """``assert_close`` over (nested) tuples of tensors; None only where None is expected."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_all_close(a, e)
    elif expected is None:
        assert actual is None
    else:
        assert_close(actual, expected)


class _NoFallback:
    """Stands in for torch.nn.functional inside linmaps.torch: a call to PyTorch's own
    operator instead of linmaps' kernels fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"linmaps.torch called PyTorch's {name} instead of its kernels")


def count_kernel_calls(monkeypatch) -> collections.Counter:
    """Count the kernel calls linmaps.torch makes, by name, and make its fallback to
    PyTorch's operators fail the test."""
    calls = collections.Counter()
    for name in KERNELS:
        original = getattr(_api, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_api, name, counting)
    monkeypatch.setattr(lt, "F", _NoFallback())
    return calls
