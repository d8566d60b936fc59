"""PyTorch side of the all-pairs bilinear map: ``linmaps.torch.bilinear_pairs`` and
``linmaps.torch.Biaffine`` (exported from ``linmaps.torch``; see ``docs/pairs.md``).

Two registered operators, ``linmaps::bilinear_pairs`` and ``linmaps::bilinear_pairs_backward``,
each with a fake implementation, carry autograd (the backward operator's own autograd formula
makes second derivatives work), ``torch.compile`` and ``torch.jit.trace``. Without a gradient
to record, the kernels are called directly. Tensors linmaps does not compute (other devices
and dtypes, mixed dtypes) go to the same ``torch.einsum`` the definition is written with.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _pairs
from .torch import (
    _KERNEL,
    _backward_fake,
    _follow_torch_threads,
    _from_numpy,
    _kernel_tensors,
    _layer,
    _linmaps_takes,
    _numpy,
    _optional,
    _or_placeholders,
    _refuse_tangents,
    _sum,
    _tensors,
)

__all__ = ["Biaffine", "bilinear_pairs"]


def _pairs_kernel(input1, input2, weight, bias) -> Tensor:
    _follow_torch_threads()
    s = _pairs.bilinear_pairs(_numpy(input1), _numpy(input2), _numpy(weight), _optional(bias))
    return _from_numpy(s)


def _pairs_backward_kernel(grad, input1, input2, weight, *needs) -> tuple:
    _follow_torch_threads()
    need_input1, need_input2, need_weight, need_bias = needs
    grads = _pairs.bilinear_pairs_backward(
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


def _pairs_shape(input1, input2, weight):
    return (*input1.shape[:-1], input2.shape[-2], weight.shape[0])


@torch.library.custom_op("linmaps::bilinear_pairs", mutates_args=(), device_types="cpu")
def _pairs_op(
    input1: Tensor,
    input2: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
) -> Tensor:
    _refuse_tangents("bilinear_pairs", input1, input2, weight, bias)
    return _pairs_kernel(input1, input2, weight, bias)


@_pairs_op.register_fake
def _(input1, input2, weight, bias):
    return input1.new_empty(_pairs_shape(input1, input2, weight))


@torch.library.custom_op("linmaps::bilinear_pairs_backward", mutates_args=(), device_types="cpu")
def _pairs_backward_op(
    grad: Tensor,
    input1: Tensor,
    input2: Tensor,
    weight: Tensor,
    need_input1: bool,
    need_input2: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _refuse_tangents("bilinear_pairs_backward", grad, input1, input2, weight)
    grads = _pairs_backward_kernel(
        grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias
    )
    return _or_placeholders(grads, grad)


_pairs_backward_op.register_fake(_backward_fake)


def _backward_call(grad, input1, input2, weight, *needs) -> tuple:
    """The differentiable pairs backward (None for gradients not asked for)."""
    if _layer(grad, input1, input2, weight) == _KERNEL:
        return _pairs_backward_kernel(grad, input1, input2, weight, *needs)
    grads = torch.ops.linmaps.bilinear_pairs_backward(grad, input1, input2, weight, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _forward_call(input1, input2, weight, bias=None) -> Tensor:
    if _layer(input1, input2, weight, bias) == _KERNEL:
        return _pairs_kernel(input1, input2, weight, bias)
    return torch.ops.linmaps.bilinear_pairs(input1, input2, weight, bias)


def _setup_context(ctx, inputs, output):
    input1, input2, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input1, input2, weight)


def _backward(ctx, grad):
    need_input1, need_input2, need_weight, need_bias = ctx.needs_input_grad[:4]
    need_bias = need_bias and ctx.has_bias
    if not (need_input1 or need_input2 or need_weight or need_bias):
        return None, None, None, None
    input1, input2, weight = ctx.saved_tensors
    return _backward_call(
        grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias
    )


def _backward_setup_context(ctx, inputs, output):
    grad, input1, input2, weight, *computed = inputs
    ctx.computed = tuple(computed)
    ctx.save_for_backward(grad, input1, input2, weight)


def _double_backward(ctx, gg_input1, gg_input2, gg_weight, gg_bias):
    """Gradients of the backward's outputs. With ``P(x1, x2, W)`` the pairs map and ``g`` the
    incoming gradient, ``<gg_x1, grad_x1> = <g, P(gg_x1, x2, W)>`` (likewise for x2 and W),
    so ``d g = P(gg_x1, x2, W) + P(x1, gg_x2, W) + P(x1, x2, gg_W) + gg_b`` and the gradients
    for ``x1``, ``x2`` and ``W`` are pairs backwards with one argument replaced by its ``gg``."""
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
            terms.append(_forward_call(gg_input1, input2, weight))
        if gg_input2 is not None:
            terms.append(_forward_call(input1, gg_input2, weight))
        if gg_weight is not None:
            terms.append(_forward_call(input1, input2, gg_weight))
        if gg_bias is not None:
            terms.append(gg_bias.expand(grad.shape))
        d_grad = _sum(terms, grad)
    d_input1, d_input2, d_weight = [], [], []
    if gg_input1 is not None and (want_input2 or want_weight):
        _, dx2, dw, _ = _backward_call(
            grad, gg_input1, input2, weight, False, want_input2, want_weight, False
        )
        d_input2.append(dx2)
        d_weight.append(dw)
    if gg_input2 is not None and (want_input1 or want_weight):
        dx1, _, dw, _ = _backward_call(
            grad, input1, gg_input2, weight, want_input1, False, want_weight, False
        )
        d_input1.append(dx1)
        d_weight.append(dw)
    if gg_weight is not None and (want_input1 or want_input2):
        dx1, dx2, _, _ = _backward_call(
            grad, input1, input2, gg_weight, want_input1, want_input2, False, False
        )
        d_input1.append(dx1)
        d_input2.append(dx2)

    def total(terms, want):
        terms = [t for t in terms if t is not None]
        return _sum(terms, None) if (want and terms) else None

    return (
        d_grad,
        total(d_input1, want_input1),
        total(d_input2, want_input2),
        total(d_weight, want_weight),
        None,
        None,
        None,
        None,
    )


_pairs_op.register_autograd(_backward, setup_context=_setup_context)
_pairs_backward_op.register_autograd(_double_backward, setup_context=_backward_setup_context)


def _pairs_takes(input1, input2, weight, bias) -> bool:
    return (
        input1.dim() >= 2
        and input2.dim() == input1.dim()
        and input1.shape[:-2] == input2.shape[:-2]
        and weight.dim() == 3
        and input1.shape[-1] == weight.shape[1]
        and input2.shape[-1] == weight.shape[2]
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
        and _kernel_tensors(input1, input2, weight, *(() if bias is None else (bias,)))
    )


def bilinear_pairs(
    input1: Tensor, input2: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Bilinear scores of every pair of rows, as :func:`linmaps.bilinear_pairs`:
    ``S[..., i, j, o] = input1[..., i, :] @ weight[o] @ input2[..., j, :] + bias[o]``.

    Parameters
    ----------
    input1 : Tensor, shape (..., I, in1_features)
    input2 : Tensor, shape (..., J, in2_features)
        The same leading (batch) dimensions as ``input1``.
    weight : Tensor, shape (out_features, in1_features, in2_features), or (in1, in2)
    bias : Tensor, shape (out_features,) (or () for a 2-D weight), optional

    Returns
    -------
    Tensor, shape (..., I, J, out_features), or (..., I, J) for a 2-D weight
        Computed by linmaps' kernels for CPU float32/float64 tensors of one dtype, else by
        ``torch.einsum('...ia,oac,...jc->...ijo', ...)``. Differentiable twice and more, and
        traceable by ``torch.compile``; forward-mode AD and ``torch.func.vmap`` are not
        supported (they raise).
    """
    if weight.dim() == 2:
        squeezed_bias = None if bias is None else bias.reshape(1)
        return bilinear_pairs(input1, input2, weight.unsqueeze(0), squeezed_bias).squeeze(-1)
    if _linmaps_takes(_pairs_takes, input1, input2, weight, bias):
        return _forward_call(input1, input2, weight, bias)
    s = torch.einsum("...ia,oac,...jc->...ijo", input1, weight, input2)
    return s if bias is None else s + bias


class Biaffine(torch.nn.Module):
    """The biaffine scorer of dependency parsers (Dozat & Manning), in supar's form:
    ``S[b, o, x, y] = [x_b,x; 1]^T W_o [y_b,y; 1]``, computed by :func:`bilinear_pairs`.

    Parameters
    ----------
    n_in : int
        Size of the input features.
    n_out : int, default 1
        Number of scores per pair (labels); 1 gives arc scores.
    bias_x, bias_y : bool, default True
        Append a ones feature to ``x`` (``y``).

    Attributes
    ----------
    weight : Parameter, shape (n_out, n_in + bias_x, n_in + bias_y)
        Initialised to zeros, as supar's ``Biaffine`` does.

    ``forward(x, y)`` takes ``x (batch, Lx, n_in)`` and ``y (batch, Ly, n_in)`` and returns
    ``(batch, n_out, Lx, Ly)``, or ``(batch, Lx, Ly)`` when ``n_out == 1``.
    """

    def __init__(
        self, n_in: int, n_out: int = 1, bias_x: bool = True, bias_y: bool = True, **factory
    ):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.bias_x, self.bias_y = bias_x, bias_y
        shape = (n_out, n_in + bias_x, n_in + bias_y)
        self.weight = torch.nn.Parameter(torch.zeros(shape, **factory))

    def reset_parameters(self) -> None:
        torch.nn.init.zeros_(self.weight)

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, bias_x={self.bias_x}, bias_y={self.bias_y}"

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.bias_x:
            x = torch.cat((x, torch.ones_like(x[..., :1])), -1)
        if self.bias_y:
            y = torch.cat((y, torch.ones_like(y[..., :1])), -1)
        s = bilinear_pairs(x, y, self.weight).movedim(-1, -3)
        return s.squeeze(-3) if self.n_out == 1 else s
