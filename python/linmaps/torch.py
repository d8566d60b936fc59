"""PyTorch drop-in: ``Linear``/``Bilinear`` modules and ``linear``/``bilinear`` functions that run
linmaps' kernels for CPU float32/float64 tensors (``docs/torch.md``).

::

    import linmaps.torch as lt
    layer = lt.Bilinear(32, 16, 8)        # a torch.nn.Bilinear whose forward uses linmaps
    z = lt.bilinear(x1, x2, weight, bias)  # like torch.nn.functional.bilinear

The arithmetic is four operators registered with ``torch.library.custom_op``:
``linmaps::linear``, ``linmaps::linear_backward``, ``linmaps::bilinear`` and
``linmaps::bilinear_backward``, each with a fake (meta) implementation for ``torch.compile`` and
an autograd formula. The backward operators are differentiable themselves (their derivatives
are again linear and bilinear maps), so gradients of any order work.

The functions send to these operators only what linmaps' kernels compute exactly as PyTorch
would: strided CPU tensors, all float32 or all float64, shapes PyTorch accepts without
broadcasting, outside CPU autocast. Everything else (CUDA and other devices, float16,
bfloat16, integer or mixed dtypes, a broadcast bias, bad shapes) goes to PyTorch's own
``torch.nn.functional.linear``/``bilinear``, which computes it or raises its own error.
"""

from __future__ import annotations

import sys
from typing import Optional

from . import _api, _backend, _threads

try:
    if "torch" in sys.modules:
        import torch

        _threads.torch_wait_policy = "torch's own (torch was imported before linmaps.torch)"
    else:
        with _threads.short_spin_while_importing_torch():
            import torch
    import torch.nn.functional as F
    from torch import Tensor
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "linmaps.torch needs PyTorch 2.4 or later, which is not installed: install it with "
        "`pip install 'linmaps[torch]'` (or pick a torch build from https://pytorch.org)"
    ) from exc

if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):  # pragma: no cover
    raise ImportError(
        f"linmaps.torch needs PyTorch 2.4 or later (torch.library.custom_op); this is torch "
        f"{torch.__version__}: upgrade with `pip install 'linmaps[torch]'`"
    )

__all__ = ["Bilinear", "Linear", "bilinear", "linear"]

_KERNEL_DTYPES = (torch.float32, torch.float64)
_CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- tensors <-> NumPy


def _numpy(tensor: Tensor):
    """The tensor's data as an ndarray: shared, no copy, for a contiguous tensor.

    A non-contiguous tensor (a transpose, a slice with steps, an expanded gradient) is first
    copied by PyTorch into a contiguous one, which the kernels need anyway.
    """
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.resolve_neg().numpy()


def _follow_torch_threads() -> None:
    """Use torch.get_num_threads() threads, unless linmaps.set_num_threads() was called."""
    _backend.follow_num_threads(torch.get_num_threads())


def _optional(tensor):
    return None if tensor is None else _numpy(tensor)


def _tensors(arrays) -> tuple:
    return tuple(None if a is None else torch.from_numpy(a) for a in arrays)


# ----------------------------------------------------------------------------- kernel calls
# Tensors in, tensors out (sharing memory with the kernels' arrays); gradients not asked for
# are None. Both the registered operators and the eager path below call these.


def _linear_kernel(input, weight, bias) -> Tensor:
    _follow_torch_threads()
    return torch.from_numpy(_api.linear(_numpy(input), _numpy(weight), _optional(bias)))


def _linear_backward_kernel(grad, input, weight, need_input, need_weight, need_bias) -> tuple:
    _follow_torch_threads()
    grads = _api.linear_backward(
        _numpy(grad),
        _numpy(input),
        _numpy(weight),
        bias=need_bias,
        need_x=need_input,
        need_weight=need_weight,
    )
    return _tensors(grads)


def _bilinear_kernel(input1, input2, weight, bias) -> Tensor:
    _follow_torch_threads()
    z = _api.bilinear(_numpy(input1), _numpy(input2), _numpy(weight), _optional(bias))
    return torch.from_numpy(z)


def _bilinear_backward_kernel(
    grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias
) -> tuple:
    _follow_torch_threads()
    grads = _api.bilinear_backward(
        _numpy(grad),
        _numpy(input1),
        _numpy(input2),
        _numpy(weight),
        bias=need_bias,
        need_x1=need_input1,
        need_x2=need_input2,
        need_weight=need_weight,
    )
    return _tensors(grads)


def _placeholder(like: Tensor) -> Tensor:
    """What a backward operator returns for a gradient it was not asked for (never read):
    an operator's outputs are Tensors, not None."""
    return like.new_empty((0,))


def _or_placeholders(grads: tuple, like: Tensor) -> tuple:
    return tuple(_placeholder(like) if g is None else g for g in grads)


# ----------------------------------------------------------------------------- linear operators
# (Optional[...] rather than `X | None` in the operators' signatures: torch evaluates them to
# infer the schema, and Python 3.9 cannot evaluate `X | None`.)


@torch.library.custom_op("linmaps::linear", mutates_args=(), device_types="cpu")
def _linear_op(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # noqa: UP045
    return _linear_kernel(input, weight, bias)


@_linear_op.register_fake
def _(input, weight, bias):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.custom_op("linmaps::linear_backward", mutates_args=(), device_types="cpu")
def _linear_backward_op(
    grad: Tensor,
    input: Tensor,
    weight: Tensor,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _linear_backward_kernel(grad, input, weight, need_input, need_weight, need_bias)
    return _or_placeholders(grads, grad)


@_linear_backward_op.register_fake
def _(grad, input, weight, need_input, need_weight, need_bias):
    return (
        torch.empty_like(input) if need_input else _placeholder(grad),
        torch.empty_like(weight) if need_weight else _placeholder(grad),
        grad.new_empty((weight.shape[0],)) if need_bias else _placeholder(grad),
    )


def _linear_setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight)


def _linear_backward(ctx, grad):
    """Backward of ``linmaps::linear``: the differentiable ``linmaps::linear_backward``,
    asked only for the gradients autograd needs."""
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad
    need_bias = need_bias and ctx.has_bias
    if not (need_input or need_weight or need_bias):
        return None, None, None
    grad_input, grad_weight, grad_bias = torch.ops.linmaps.linear_backward(
        grad, input, weight, need_input, need_weight, need_bias
    )
    return (
        grad_input if need_input else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
    )


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _linear_backward_setup_context(ctx, inputs, output):
    grad, input, weight, need_input, need_weight, need_bias = inputs
    ctx.computed = (need_input, need_weight, need_bias)
    ctx.save_for_backward(grad, input, weight)


def _linear_double_backward(ctx, gg_input, gg_weight, gg_bias):
    """Gradients of ``(grad_input, grad_weight, grad_bias)`` = ``(g W, g^T x, sum g)``.

    With ``gg_*`` the incoming gradients of those outputs: ``d grad = gg_input W^T +
    x gg_weight^T + gg_bias``, ``d x = g gg_weight`` and ``d W = g^T gg_input``; linear maps
    again, computed by the differentiable operators so that higher orders work too.
    """
    grad, input, weight = ctx.saved_tensors
    gg_input, gg_weight, gg_bias = (
        gg if (done and gg is not None) else None
        for gg, done in zip((gg_input, gg_weight, gg_bias), ctx.computed)
    )
    want_grad, want_input, want_weight = ctx.needs_input_grad[:3]
    d_grad = d_input = d_weight = None
    if want_grad:
        terms = []
        if gg_input is not None:
            terms.append(linear(gg_input, weight))
        if gg_weight is not None:
            terms.append(linear(input, gg_weight, gg_bias))
        elif gg_bias is not None:
            terms.append(gg_bias.expand(grad.shape))
        d_grad = _sum(terms, grad)
    # d input = g @ gg_weight and d weight = g^T @ gg_input: one backward call computes both,
    # with gg_input in the place of the input and gg_weight in that of the weight.
    want_input = want_input and gg_weight is not None
    want_weight = want_weight and gg_input is not None
    if want_input or want_weight:
        d_input, d_weight, _ = torch.ops.linmaps.linear_backward(
            grad,
            gg_input if gg_input is not None else input,
            gg_weight if gg_weight is not None else weight,
            want_input,
            want_weight,
            False,
        )
    return (
        d_grad,
        d_input if want_input else None,
        d_weight if want_weight else None,
        None,
        None,
        None,
    )


_linear_backward_op.register_autograd(
    _linear_double_backward, setup_context=_linear_backward_setup_context
)


# ----------------------------------------------------------------------------- bilinear operators


@torch.library.custom_op("linmaps::bilinear", mutates_args=(), device_types="cpu")
def _bilinear_op(
    input1: Tensor,
    input2: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
) -> Tensor:
    return _bilinear_kernel(input1, input2, weight, bias)


@_bilinear_op.register_fake
def _(input1, input2, weight, bias):
    return input1.new_empty((*input1.shape[:-1], weight.shape[0]))


@torch.library.custom_op("linmaps::bilinear_backward", mutates_args=(), device_types="cpu")
def _bilinear_backward_op(
    grad: Tensor,
    input1: Tensor,
    input2: Tensor,
    weight: Tensor,
    need_input1: bool,
    need_input2: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _bilinear_backward_kernel(
        grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias
    )
    return _or_placeholders(grads, grad)


@_bilinear_backward_op.register_fake
def _(grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias):
    return (
        torch.empty_like(input1) if need_input1 else _placeholder(grad),
        torch.empty_like(input2) if need_input2 else _placeholder(grad),
        torch.empty_like(weight) if need_weight else _placeholder(grad),
        grad.new_empty((weight.shape[0],)) if need_bias else _placeholder(grad),
    )


def _bilinear_setup_context(ctx, inputs, output):
    input1, input2, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input1, input2, weight)


def _bilinear_backward(ctx, grad):
    input1, input2, weight = ctx.saved_tensors
    need_input1, need_input2, need_weight, need_bias = ctx.needs_input_grad
    need_bias = need_bias and ctx.has_bias
    if not (need_input1 or need_input2 or need_weight or need_bias):
        return None, None, None, None
    grads = torch.ops.linmaps.bilinear_backward(
        grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias
    )
    return tuple(
        g if need else None
        for g, need in zip(grads, (need_input1, need_input2, need_weight, need_bias))
    )


_bilinear_op.register_autograd(_bilinear_backward, setup_context=_bilinear_setup_context)


def _bilinear_backward_setup_context(ctx, inputs, output):
    grad, input1, input2, weight, *computed = inputs
    ctx.computed = tuple(computed)
    ctx.save_for_backward(grad, input1, input2, weight)


def _bilinear_double_backward(ctx, gg_input1, gg_input2, gg_weight, gg_bias):
    """Gradients of the bilinear backward's outputs, as bilinear maps again.

    The backward computes ``grad_input1 = B_x1(g; x2, W)``, ``grad_input2 = B_x2(g; x1, W)``,
    ``grad_weight = B_W(g; x1, x2)`` and ``grad_bias = sum g``, each linear in every argument.
    Given the incoming gradients ``gg_*`` of those outputs:

    * ``d g = bilinear(gg_input1, x2, W) + bilinear(x1, gg_input2, W) +
      bilinear(x1, x2, gg_weight) + gg_bias``;
    * ``d x1``, ``d x2`` and ``d W`` are backward passes of the bilinear maps with one argument
      replaced by its ``gg``: backward(g; gg_input1, x2, W) gives the x2 and W terms,
      backward(g; x1, gg_input2, W) the x1 and W terms, backward(g; x1, x2, gg_weight) the x1
      and x2 terms.
    """
    grad, input1, input2, weight = ctx.saved_tensors
    gg_input1, gg_input2, gg_weight, gg_bias = (
        gg if (done and gg is not None) else None
        for gg, done in zip((gg_input1, gg_input2, gg_weight, gg_bias), ctx.computed)
    )
    want_grad, want_input1, want_input2, want_weight = ctx.needs_input_grad[:4]
    d_grad = None
    if want_grad:
        terms = []
        if gg_input1 is not None:
            terms.append(bilinear(gg_input1, input2, weight))
        if gg_input2 is not None:
            terms.append(bilinear(input1, gg_input2, weight))
        if gg_weight is not None:
            terms.append(bilinear(input1, input2, gg_weight, gg_bias))
        elif gg_bias is not None:
            terms.append(gg_bias.expand(grad.shape))
        d_grad = _sum(terms, grad)
    d_input1, d_input2, d_weight = [], [], []
    if gg_input1 is not None and (want_input2 or want_weight):
        _, d2, dw, _ = torch.ops.linmaps.bilinear_backward(
            grad, gg_input1, input2, weight, False, want_input2, want_weight, False
        )
        d_input2.append(d2)
        d_weight.append(dw)
    if gg_input2 is not None and (want_input1 or want_weight):
        d1, _, dw, _ = torch.ops.linmaps.bilinear_backward(
            grad, input1, gg_input2, weight, want_input1, False, want_weight, False
        )
        d_input1.append(d1)
        d_weight.append(dw)
    if gg_weight is not None and (want_input1 or want_input2):
        d1, d2, _, _ = torch.ops.linmaps.bilinear_backward(
            grad, input1, input2, gg_weight, want_input1, want_input2, False, False
        )
        d_input1.append(d1)
        d_input2.append(d2)
    return (
        d_grad,
        _sum(d_input1, input1) if want_input1 else None,
        _sum(d_input2, input2) if want_input2 else None,
        _sum(d_weight, weight) if want_weight else None,
        None,
        None,
        None,
        None,
    )


_bilinear_backward_op.register_autograd(
    _bilinear_double_backward, setup_context=_bilinear_backward_setup_context
)


def _sum(terms: list, like: Tensor) -> Tensor:
    """The sum of ``terms``, or zeros like ``like`` when there are none."""
    if not terms:
        return torch.zeros_like(like)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


# ----------------------------------------------------------------------------- eager path
# Outside torch.compile the public functions skip the dispatcher: an autograd.Function calls
# the same kernels with a fraction of a custom operator's per-call cost (about 20 us against
# 35 us forward, 140 against 350 us forward + backward, measured on tiny shapes), which
# decides small problems. Its backward runs the kernels directly, or, when a graph of the
# backward is being built (create_graph=True), the differentiable backward operators.


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight)
        return _linear_kernel(input, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            return _linear_backward(ctx, grad)
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad
        return _linear_backward_kernel(
            grad, input, weight, need_input, need_weight, need_bias and ctx.has_bias
        )


class _BilinearFunction(torch.autograd.Function):
    """The eager bilinear map. Its forward keeps linmaps' intermediate ``T`` for the backward
    (``linmaps.bilinear_with_context``: a forward plus a backward then cost 6 units of
    ``N * out * in1 * in2`` multiply-adds instead of 8) when it fits linmaps' budget
    (``KEEP_BYTES_DEFAULT``), and frees it with the graph, like a saved tensor."""

    @staticmethod
    def forward(ctx, input1, input2, weight, bias):
        ctx.has_bias = bias is not None
        # Saved as tensors too: the double backward uses them, and autograd checks that none
        # was modified in place before the backward reads them (through ctx.saved_tensors).
        ctx.save_for_backward(input1, input2, weight)
        _follow_torch_threads()
        z, ctx.linmaps_context = _api.bilinear_with_context(
            _numpy(input1), _numpy(input2), _numpy(weight), _optional(bias)
        )
        return torch.from_numpy(z)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            return _bilinear_backward(ctx, grad)
        ctx.saved_tensors  # noqa: B018  (raises if an input was modified in place since)
        need_input1, need_input2, need_weight, need_bias = ctx.needs_input_grad
        _follow_torch_threads()
        grads = _api.bilinear_backward(
            _numpy(grad),
            context=ctx.linmaps_context,
            bias=need_bias and ctx.has_bias,
            need_x1=need_input1,
            need_x2=need_input2,
            need_weight=need_weight,
        )
        return _tensors(grads)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _eager(*tensors) -> bool:
    """Whether the eager path may run: plain tensors (not the fake or functional tensors of
    torch.compile and AOT tracing, nor other subclasses), outside torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in _PLAIN_TYPES for t in tensors)


def _needs_graph(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------- public functions


def _torch_semantics_needed() -> bool:
    """Whether PyTorch's own operator must run whatever the tensors: under CPU autocast (it
    computes in autocast's dtype) and inside torch.func transforms (vmap, grad, jacrev, ...:
    they need batching and functorch-aware autograd rules, which PyTorch's ops have)."""
    if torch.is_autocast_enabled("cpu"):
        return True
    # Constant under torch.compile (its own functorch handling traces through this check).
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _kernel_tensors(*tensors) -> bool:
    """Whether linmaps' kernels take these tensors: strided CPU tensors of one float32 or
    float64 dtype (plain tensors or parameters, or the fake tensors of torch.compile)."""
    dtype = tensors[0].dtype
    if dtype not in _KERNEL_DTYPES:
        return False
    for tensor in tensors:
        if tensor.dtype != dtype or tensor.device != _CPU or tensor.layout != torch.strided:
            return False
    return True


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``input @ weight.T + bias``, as ``torch.nn.functional.linear``.

    Parameters
    ----------
    input : Tensor, shape (..., in_features)
        Any number of leading batch dimensions, or none (1-D).
    weight : Tensor, shape (out_features, in_features)
    bias : Tensor, shape (out_features,), optional

    Returns
    -------
    Tensor, shape (..., out_features)
        Computed by ``linmaps::linear`` for CPU float32/float64 tensors of one dtype, else by
        ``torch.nn.functional.linear`` (which also raises PyTorch's errors for bad shapes).
        Differentiable to any order.
    """
    if (
        input.dim() >= 1
        and weight.dim() == 2
        and input.shape[-1] == weight.shape[1]
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
        and _kernel_tensors(input, weight, *(() if bias is None else (bias,)))
        and not _torch_semantics_needed()
    ):
        if not _eager(input, weight, bias):
            return torch.ops.linmaps.linear(input, weight, bias)
        if _needs_graph(input, weight, bias):
            return _LinearFunction.apply(input, weight, bias)
        return _linear_kernel(input, weight, bias)
    return F.linear(input, weight, bias)


def bilinear(input1: Tensor, input2: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``z[..., l] = input1 @ weight[l] @ input2 + bias[l]``, as ``torch.nn.functional.bilinear``.

    Parameters
    ----------
    input1 : Tensor, shape (..., in1_features)
    input2 : Tensor, shape (..., in2_features)
        The same leading (batch) dimensions as ``input1``, or none (both 1-D).
    weight : Tensor, shape (out_features, in1_features, in2_features)
    bias : Tensor, shape (out_features,), optional

    Returns
    -------
    Tensor, shape (..., out_features)
        Computed by ``linmaps::bilinear`` for CPU float32/float64 tensors of one dtype, else by
        ``torch.nn.functional.bilinear`` (which also raises PyTorch's errors for bad shapes).
        Differentiable to any order.
    """
    if (
        input1.dim() >= 1
        and input1.shape[:-1] == input2.shape[:-1]
        and input2.dim() == input1.dim()
        and weight.dim() == 3
        and input1.shape[-1] == weight.shape[1]
        and input2.shape[-1] == weight.shape[2]
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
        and _kernel_tensors(input1, input2, weight, *(() if bias is None else (bias,)))
        and not _torch_semantics_needed()
    ):
        if not _eager(input1, input2, weight, bias):
            return torch.ops.linmaps.bilinear(input1, input2, weight, bias)
        if _needs_graph(input1, input2, weight, bias):
            return _BilinearFunction.apply(input1, input2, weight, bias)
        return _bilinear_kernel(input1, input2, weight, bias)
    return F.bilinear(input1, input2, weight, bias)


# ----------------------------------------------------------------------------- modules


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` whose forward is :func:`linear` (linmaps' kernels on CPU float32 and
    float64): the same constructor, parameters, initialisation, ``state_dict`` keys and
    ``repr``. Input ``(..., in_features)``, output ``(..., out_features)``."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)


class Bilinear(torch.nn.Bilinear):
    """``torch.nn.Bilinear`` whose forward is :func:`bilinear` (linmaps' kernels on CPU float32
    and float64): the same constructor, parameters, initialisation, ``state_dict`` keys and
    ``repr``. Inputs ``(..., in1_features)`` and ``(..., in2_features)``, output
    ``(..., out_features)``."""

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:
        return bilinear(input1, input2, self.weight, self.bias)
