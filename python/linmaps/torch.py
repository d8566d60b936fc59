"""PyTorch drop-in: ``Linear``/``Bilinear`` modules and ``linear``/``bilinear`` functions that run
linmaps' kernels for CPU float32/float64 tensors (``docs/torch.md``).

::

    import linmaps.torch as lt
    layer = lt.Bilinear(32, 16, 8)        # a torch.nn.Bilinear whose forward uses linmaps
    z = lt.bilinear(x1, x2, weight, bias)  # like torch.nn.functional.bilinear

linmaps computes only what its kernels compute exactly as PyTorch would: strided CPU
tensors, all float32, all float64 or (with ``ml_dtypes`` installed) all bfloat16, shapes
PyTorch accepts without broadcasting, outside CPU autocast. Everything else (CUDA and other
devices, float16, integer, complex or mixed dtypes, a broadcast bias, bad shapes) goes to
PyTorch's own
``torch.nn.functional.linear``/``bilinear``, which computes it or raises its own error.

What linmaps computes runs on one of four layers (``_layer``): the kernels directly when no
gradient is recorded; autograd.Functions with backward and jvp formulas and vmap rules for
autograd, forward-mode AD and torch.func transforms (the bilinear one of plain autograd also
keeps linmaps' intermediate T for its backward); and the operators registered with
``torch.library.custom_op`` (``linmaps::linear``, ``linmaps::linear_backward``,
``linmaps::bilinear``, ``linmaps::bilinear_backward``, each with a fake implementation, the
same autograd formulas and batching rules) for torch.compile, torch.jit.trace and tensor
subclasses. The backward of a linear or bilinear map is again made of linear and bilinear
maps, and differentiable itself, so gradients of any order, in either mode, work.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, NamedTuple, Optional

import numpy as np

from . import _api, _backend, _bf16, _threads

try:
    if "torch" in sys.modules:
        import torch

        _threads.torch_wait_policy = "torch's own (torch was imported before linmaps.torch)"
    else:
        with _threads.short_spin_while_importing_torch():
            import torch
    import torch.nn.functional as F
    from torch import Tensor
    from torch.autograd import forward_ad as _forward_ad
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

__all__ = ["Biaffine", "Bilinear", "Linear", "bilinear", "bilinear_pairs", "linear"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- fork


def _one_thread_in_forked_child() -> None:
    """In a forked child of a process in which linmaps ran threads, PyTorch's CPU ops run on
    one thread, as in DataLoader workers (which call torch.set_num_threads(1) themselves).

    linmaps' threads are libgomp's pool, which PyTorch shares when both use one libgomp (a
    source build of linmaps, or a linmaps wheel with torch imported first), and GNU libgomp
    cannot use a pool in a forked child: PyTorch's parallel regions there (a matmul,
    AccumulateGrad) would wait forever for threads that were not forked. linmaps' own
    handler already caps the forking thread's OpenMP count and runs its own calls serially;
    this also lowers the count torch keeps for MKL, which torch.set_num_threads(n) set
    explicitly in the parent."""
    core = getattr(_backend._cpp_backend, "_core", None)
    if core is not None and core.in_forked_child():
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_in_forked_child)


# ----------------------------------------------------------------------------- tensors <-> NumPy


def _numpy(tensor: Tensor):
    """The tensor's data as an ndarray: shared, no copy, for a contiguous tensor.

    A non-contiguous tensor (a transpose, a slice with steps, an expanded gradient) is first
    copied by PyTorch into a contiguous one, which the kernels need anyway.
    """
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits, as ml_dtypes'
        return tensor.resolve_neg().view(torch.int16).numpy().view(_bf16.dtype())
    return tensor.resolve_neg().numpy()


def _from_numpy(array) -> Tensor:
    """A tensor sharing ``array``'s memory (an ``ml_dtypes.bfloat16`` array as bfloat16)."""
    if array.dtype.kind == "V":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _bfloat16_usable() -> bool:
    """Whether bfloat16 tensors can go to linmaps: ml_dtypes is installed (imported once)."""
    global _BFLOAT16_USABLE
    if _BFLOAT16_USABLE is None:
        try:
            _bf16.dtype()
            _BFLOAT16_USABLE = True
        except TypeError:
            _BFLOAT16_USABLE = False
    return _BFLOAT16_USABLE


_BFLOAT16_USABLE = None


def _follow_torch_threads() -> None:
    """Use torch.get_num_threads() threads, unless linmaps.set_num_threads() was called."""
    _backend.follow_num_threads(torch.get_num_threads())


def _optional(tensor):
    return None if tensor is None else _numpy(tensor)


def _tensors(arrays) -> tuple:
    return tuple(None if a is None else _from_numpy(a) for a in arrays)


def _stand_in(shape, like: Tensor) -> Tensor:
    """A tensor of ``shape`` in the place of an argument whose values a backward call does not
    read (it was not saved, as PyTorch saves only what the wanted gradients need): the kernels
    check every argument's shape. Zeros from ``calloc`` in eager mode (no page is touched), a
    traced ``zeros`` under torch.compile."""
    if type(like) in _PLAIN_TYPES and not torch.compiler.is_compiling():
        zeros = torch.from_numpy(np.zeros(tuple(shape), dtype=_NUMPY_DTYPES[like.dtype]))
        return zeros.view(like.dtype)  # int16 zeros are bfloat16 zeros
    return torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------- kernel calls
# Plain tensors in, tensors out (sharing memory with the kernels' arrays); gradients not asked
# for are None. Every layer below ends in these.


def _linear_kernel(input, weight, bias) -> Tensor:
    _follow_torch_threads()
    return _from_numpy(_api.linear(_numpy(input), _numpy(weight), _optional(bias)))


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
    return _from_numpy(z)


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


# ----------------------------------------------------------------------------- which layer runs
# A call that linmaps computes runs on one of four layers:
#   _KERNEL    the kernels directly: no autograd record, nothing saved;
#   _GRAPH     an autograd.Function around the kernels (an autograd graph is being recorded);
#   _TRANSFORM the same Functions, as torch.func transforms (vmap, grad, jvp, jacrev, ...) and
#              forward-mode AD need them: their vmap rules, jvp formulas and functorch-aware
#              saving. The bilinear _GRAPH Function also keeps linmaps' intermediate T, which
#              these cannot (see _BilinearKeptFunction);
#   _OPERATOR  the registered operators torch.ops.linmaps.*: under torch.compile and
#              torch.jit.trace, for the fake and functional tensors of tracing and other
#              tensor subclasses, and for the batched tensors of PyTorch's older vmap (which
#              torch.autograd.grad(..., is_grads_batched=True) and gradcheck's batched-gradient
#              check use), whose fallback calls the operator once per batch entry.

_KERNEL, _GRAPH, _TRANSFORM, _OPERATOR = range(4)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.int16}
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (torch.autograd.forward_ad.dual_level)."""
    return _forward_ad._current_level >= 0


def _layer(*tensors) -> int:
    """Which layer computes a call on ``tensors`` (None entries allowed)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return _OPERATOR
    graph = False
    grad_mode = torch.is_grad_enabled()
    for tensor in tensors:
        if tensor is None:
            continue
        if type(tensor) not in _PLAIN_TYPES or _is_legacy_batched(tensor):
            return _OPERATOR
        graph = graph or (grad_mode and tensor.requires_grad)
    if torch._C._are_functorch_transforms_active() or _forward_ad_active():
        return _TRANSFORM
    return _GRAPH if graph else _KERNEL


def _sum(terms: list, like: Tensor) -> Tensor:
    """The sum of ``terms``, or zeros like ``like`` when there are none."""
    if not terms:
        return torch.zeros_like(like)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _save_for_forward_if_needed(ctx, *tensors) -> None:
    """Keep ``tensors`` for the jvp only when forward-mode AD can happen: saving them
    otherwise would keep them alive with the graph."""
    if _forward_ad_active() or torch._C._are_functorch_transforms_active():
        ctx.save_for_forward(*tensors)


def _needs(ctx, count: int) -> tuple:
    """Which of the first ``count`` inputs need a gradient (a registered operator's ctx has
    one more entry, PyTorch's own, while its forward runs)."""
    return tuple(ctx.needs_input_grad[:count])


# ----------------------------------------------------------------------------- differentiable calls
# What the autograd formulas call: the differentiable backward of a linear or bilinear map on
# whichever layer fits the tensors, with None for the gradients not asked for.


def _linear_backward_call(grad, input, weight, need_input, need_weight, need_bias) -> tuple:
    layer = _layer(grad, input, weight)
    if layer == _KERNEL:
        return _linear_backward_kernel(grad, input, weight, need_input, need_weight, need_bias)
    if layer == _OPERATOR:
        return _operator_linear_backward(grad, input, weight, need_input, need_weight, need_bias)
    return _LinearBackwardFunction.apply(grad, input, weight, need_input, need_weight, need_bias)


def _bilinear_backward_call(
    grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias
) -> tuple:
    needs = (need_input1, need_input2, need_weight, need_bias)
    layer = _layer(grad, input1, input2, weight)
    if layer == _KERNEL:
        return _bilinear_backward_kernel(grad, input1, input2, weight, *needs)
    if layer == _OPERATOR:
        return _operator_bilinear_backward(grad, input1, input2, weight, *needs)
    return _BilinearBackwardFunction.apply(grad, input1, input2, weight, *needs)


# ----------------------------------------------------------------------------- linear formulas
# Shared by the registered operator (register_autograd) and the autograd.Functions.


def _linear_setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    need_input, need_weight, _ = _needs(ctx, 3)
    ctx.has_bias = bias is not None
    ctx.shapes = (input.shape, weight.shape)
    # Only what the wanted gradients read, as PyTorch saves: grad_input = g W reads the
    # weight, grad_weight = g^T x the input. The backward gets a stand-in of the other's
    # shape, so that an in-place change of it between forward and backward (an optimizer's
    # step on a weight whose gradient alone is wanted) is no error, as in PyTorch. Under
    # torch.compile the compiled graph keeps its inputs anyway: all are saved, which spares
    # the compiled backward a stand-in's zeros.
    every = torch.compiler.is_compiling()
    ctx.save_for_backward(
        input if (need_weight or every) else None, weight if (need_input or every) else None
    )
    _save_for_forward_if_needed(ctx, input, weight)


def _linear_backward(ctx, grad):
    """Backward of a linear map: the differentiable linear backward, asked only for the
    gradients autograd needs."""
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = _needs(ctx, 3)
    need_bias = need_bias and ctx.has_bias
    if not (need_input or need_weight or need_bias):
        return None, None, None
    input_shape, weight_shape = ctx.shapes
    return _linear_backward_call(
        grad,
        _stand_in(input_shape, grad) if input is None else input,
        _stand_in(weight_shape, grad) if weight is None else weight,
        need_input,
        need_weight,
        need_bias,
    )


def _linear_jvp(ctx, d_input, d_weight, d_bias):
    """Tangent of ``x W^T + b``: ``dx W^T + x dW^T + db``, by linmaps' kernels again."""
    input, weight = ctx.saved_tensors
    terms = []
    if d_input is not None:
        terms.append(linear(d_input, weight))
    if d_weight is not None:
        terms.append(linear(input, d_weight))
    out_shape = (*input.shape[:-1], weight.shape[0])
    if d_bias is not None:
        terms.append(d_bias.expand(out_shape) if not terms else d_bias)
    return _sum(terms, input.new_empty(out_shape))


def _linear_backward_setup_context(ctx, inputs, output):
    grad, input, weight, need_input, need_weight, need_bias = inputs
    ctx.computed = (need_input, need_weight, need_bias)
    ctx.save_for_backward(grad, input, weight)
    _save_for_forward_if_needed(ctx, grad, input, weight)


def _linear_double_backward(ctx, gg_input, gg_weight, gg_bias):
    """Gradients of ``(grad_input, grad_weight, grad_bias)`` = ``(g W, g^T x, sum g)``.

    With ``gg_*`` the incoming gradients of those outputs: ``d grad = gg_input W^T +
    x gg_weight^T + gg_bias``, ``d x = g gg_weight`` and ``d W = g^T gg_input``; linear maps
    again, computed by the differentiable calls so that higher orders work too. (The input
    or weight is a stand-in only where its gradient was not computed, and then its ``gg`` is
    absent and it is not read.)
    """
    grad, input, weight = ctx.saved_tensors
    gg_input, gg_weight, gg_bias = (
        gg if (done and gg is not None) else None
        for gg, done in zip((gg_input, gg_weight, gg_bias), ctx.computed)
    )
    want_grad, want_input, want_weight = _needs(ctx, 3)
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
        d_input, d_weight, _ = _linear_backward_call(
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


def _linear_backward_jvp(ctx, d_grad, d_input, d_weight, *_flags):
    """Tangents of ``(g W, g^T x, sum g)``: ``(dg W + g dW, dg^T x + g^T dx, sum dg)``."""
    grad, input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.computed
    tangents = [[], [], []]
    if d_grad is not None:
        for terms, term in zip(
            tangents,
            _linear_backward_call(d_grad, input, weight, need_input, need_weight, need_bias),
        ):
            if term is not None:
                terms.append(term)
    # g dW and g^T dx: one backward call with dx, dW in the places of x, W.
    with_input = need_weight and d_input is not None
    with_weight = need_input and d_weight is not None
    if with_input or with_weight:
        by_weight, by_input, _ = _linear_backward_call(
            grad,
            d_input if with_input else input,
            d_weight if with_weight else weight,
            with_weight,
            with_input,
            False,
        )
        if with_weight:
            tangents[0].append(by_weight)
        if with_input:
            tangents[1].append(by_input)
    # An output with no term has no tangent (None), as in PyTorch's own formulas.
    return tuple(_sum(terms, None) if terms else None for terms in tangents)


# ----------------------------------------------------------------------------- bilinear formulas


def _bilinear_setup_context(ctx, inputs, output):
    input1, input2, weight, bias = inputs
    need_input1, need_input2, need_weight, _ = _needs(ctx, 4)
    ctx.has_bias = bias is not None
    ctx.shapes = (input1.shape, input2.shape, weight.shape)
    # Only what the wanted gradients read, as PyTorch saves (see _linear_setup_context):
    # grad_input1 reads input2 and the weight, grad_input2 input1 and the weight, grad_weight
    # the two inputs.
    every = torch.compiler.is_compiling()
    ctx.save_for_backward(
        input1 if (need_input2 or need_weight or every) else None,
        input2 if (need_input1 or need_weight or every) else None,
        weight if (need_input1 or need_input2 or every) else None,
    )
    _save_for_forward_if_needed(ctx, input1, input2, weight)


def _bilinear_saved_or_stand_ins(ctx, like):
    return tuple(
        _stand_in(shape, like) if saved is None else saved
        for saved, shape in zip(ctx.saved_tensors, ctx.shapes)
    )


def _bilinear_backward(ctx, grad):
    need_input1, need_input2, need_weight, need_bias = _needs(ctx, 4)
    need_bias = need_bias and ctx.has_bias
    if not (need_input1 or need_input2 or need_weight or need_bias):
        return None, None, None, None
    input1, input2, weight = _bilinear_saved_or_stand_ins(ctx, grad)
    return _bilinear_backward_call(
        grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias
    )


def _bilinear_jvp(ctx, d_input1, d_input2, d_weight, d_bias):
    """Tangent of a bilinear map: ``B(dx1, x2, W) + B(x1, dx2, W) + B(x1, x2, dW) + db``."""
    input1, input2, weight = ctx.saved_tensors
    terms = []
    if d_input1 is not None:
        terms.append(bilinear(d_input1, input2, weight))
    if d_input2 is not None:
        terms.append(bilinear(input1, d_input2, weight))
    if d_weight is not None:
        terms.append(bilinear(input1, input2, d_weight))
    out_shape = (*input1.shape[:-1], weight.shape[0])
    if d_bias is not None:
        terms.append(d_bias.expand(out_shape) if not terms else d_bias)
    return _sum(terms, input1.new_empty(out_shape))


def _bilinear_backward_setup_context(ctx, inputs, output):
    grad, input1, input2, weight, *computed = inputs
    ctx.computed = tuple(computed)
    ctx.save_for_backward(grad, input1, input2, weight)
    _save_for_forward_if_needed(ctx, grad, input1, input2, weight)


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

    An argument is a stand-in only where no gradient that reads it was computed; then the
    terms that would read it are absent.
    """
    grad, input1, input2, weight = ctx.saved_tensors
    gg_input1, gg_input2, gg_weight, gg_bias = (
        gg if (done and gg is not None) else None
        for gg, done in zip((gg_input1, gg_input2, gg_weight, gg_bias), ctx.computed)
    )
    want_grad, want_input1, want_input2, want_weight = _needs(ctx, 4)
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
    d_input1, d_input2, d_weight = _bilinear_products(
        grad,
        (input1, input2, weight),
        (gg_input1, gg_input2, gg_weight),
        (want_input1, want_input2, want_weight),
    )
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


def _bilinear_products(grad, arguments, replacements, wanted) -> tuple:
    """The terms ``B_a(g; ..., r_b, ...)`` for each wanted argument ``a`` and each other
    argument ``b`` with a replacement ``r_b``: one backward call per replacement, with that
    argument replaced. Returns three lists of terms (for x1, x2, W)."""
    terms = ([], [], [])
    for index, replacement in enumerate(replacements):
        if replacement is None:
            continue
        needs = [wanted[k] and k != index for k in range(3)]
        if not any(needs):
            continue
        args = list(arguments)
        args[index] = replacement
        grads = _bilinear_backward_call(grad, *args, *needs, False)
        for k in range(3):
            if needs[k]:
                terms[k].append(grads[k])
    return terms


def _bilinear_backward_jvp(ctx, d_grad, d_input1, d_input2, d_weight, *_flags):
    """Tangents of the bilinear backward's outputs. Each output is linear in ``g`` and in each
    of the two arguments it reads: its tangent is the backward of ``dg``, plus the backward of
    ``g`` with one argument replaced by its tangent, for each argument (the same products as
    the double backward's)."""
    grad, input1, input2, weight = ctx.saved_tensors
    computed = ctx.computed
    tangents = ([], [], [], [])
    if d_grad is not None:
        for terms, term in zip(
            tangents, _bilinear_backward_call(d_grad, input1, input2, weight, *computed)
        ):
            if term is not None:
                terms.append(term)
    products = _bilinear_products(
        grad, (input1, input2, weight), (d_input1, d_input2, d_weight), computed[:3]
    )
    for terms, more in zip(tangents, products):
        terms.extend(more)
    # An output with no term has no tangent (None), as in PyTorch's own formulas.
    return tuple(_sum(terms, None) if terms else None for terms in tangents)


# ----------------------------------------------------------------------------- vmap rules
# Batching rules for torch.func.vmap (the Functions' vmap staticmethods, and register_vmap on
# the operators). Where the weight is not batched, a batch of inputs is just more leading
# dimensions: one call on the batch moved to the front. A batched weight with unbatched inputs
# becomes one call with B * out_features output features. Gradients of the weight (a sum over
# rows, which must not mix batch entries) take one call with the batch folded into the output
# features when only the incoming gradient is batched; the rest loops over the batch entries,
# calling the same differentiable functions on each. Every result is differentiable for the
# transforms outside this one.


def _to_front(tensor, dim, batch_size):
    """``tensor`` with its batch dimension first; an unbatched one is expanded to the batch."""
    if dim is None:
        return tensor.expand(batch_size, *tensor.shape)
    return tensor.movedim(dim, 0)


def _loop(function, batch_size, args, in_dims):
    """``function`` on each batch entry, results stacked on dimension 0 (None stays None).
    An empty batch runs ``function`` once on zeros of an entry's shape, for the shapes."""

    def entries(b):
        for a, d in zip(args, in_dims):
            if not isinstance(a, Tensor) or d is None:
                yield a
            elif batch_size == 0:
                yield a.new_zeros(a.shape[:d] + a.shape[d + 1 :])
            else:
                yield a.select(d, b)

    results = [function(*entries(b)) for b in range(max(batch_size, 1))]

    def stack(parts):
        return torch.stack(parts) if batch_size else parts[0].unsqueeze(0)[:0]

    if isinstance(results[0], tuple):
        stacked = tuple(None if parts[0] is None else stack(parts) for parts in zip(*results))
        return stacked, tuple(None if s is None else 0 for s in stacked)
    return stack(results), 0


def _add_batched_bias(out, out_dim, bias, bias_dim, batch_size):
    """``out`` plus a batched bias ``(B, out_features)``, the batch first in the result."""
    out = _to_front(out, out_dim, batch_size)
    bias = bias.movedim(bias_dim, 0)
    return out + bias.reshape(batch_size, *([1] * (out.dim() - 2)), bias.shape[-1]), 0


def _folded_weight(weight, weight_dim, bias, bias_dim, batch_size):
    """A batched weight ``(B, out, ...)`` as ``(B * out, ...)`` and its bias to match."""
    weight = weight.movedim(weight_dim, 0)
    folded = weight.reshape(batch_size * weight.shape[1], *weight.shape[2:])
    if bias is not None:
        bias = (
            bias.movedim(bias_dim, 0).reshape(-1)
            if bias_dim is not None
            else bias.repeat(batch_size)
        )
    return folded, bias


def _linear_vmap(calls, info, in_dims, input, weight, bias):
    input_dim, weight_dim, bias_dim = in_dims
    size = info.batch_size
    if weight_dim is None:
        plain_bias = bias if bias_dim is None else None
        if input_dim is None:
            out, out_dim = calls.linear(input, weight, plain_bias), None
        else:
            out, out_dim = calls.linear(input.movedim(input_dim, 0), weight, plain_bias), 0
        if bias_dim is not None:
            return _add_batched_bias(out, out_dim, bias, bias_dim, size)
        return out, out_dim
    if input_dim is None:
        folded, folded_bias = _folded_weight(weight, weight_dim, bias, bias_dim, size)
        out = calls.linear(input, folded, folded_bias)
        return out.unflatten(-1, (size, -1)), out.dim() - 1
    return _loop(calls.linear, size, (input, weight, bias), in_dims)


def _bilinear_vmap(calls, info, in_dims, input1, input2, weight, bias):
    dim1, dim2, weight_dim, bias_dim = in_dims
    size = info.batch_size
    if weight_dim is None:
        plain_bias = bias if bias_dim is None else None
        if dim1 is None and dim2 is None:
            out, out_dim = calls.bilinear(input1, input2, weight, plain_bias), None
        else:
            out = calls.bilinear(
                _to_front(input1, dim1, size), _to_front(input2, dim2, size), weight, plain_bias
            )
            out_dim = 0
        if bias_dim is not None:
            return _add_batched_bias(out, out_dim, bias, bias_dim, size)
        return out, out_dim
    if dim1 is None and dim2 is None:
        folded, folded_bias = _folded_weight(weight, weight_dim, bias, bias_dim, size)
        out = calls.bilinear(input1, input2, folded, folded_bias)
        return out.unflatten(-1, (size, -1)), out.dim() - 1
    return _loop(calls.bilinear, size, (input1, input2, weight, bias), in_dims)


def _weight_grads_folded(grad, grad_dim, rest, weight_shape, size, call, needs):
    """Weight and bias gradients for a batched incoming gradient and unbatched arguments: the
    batch folded into the output features (``(..., B * out)``), one call."""
    grad = grad.movedim(grad_dim, -2)
    grad = grad.reshape(*grad.shape[:-2], size * grad.shape[-1])
    folded_weight = _stand_in((size * weight_shape[0], *weight_shape[1:]), grad)
    grads = call(grad, *rest, folded_weight, *needs)
    weight_grad, bias_grad = grads[-2], grads[-1]
    return (
        None if weight_grad is None else weight_grad.unflatten(0, (size, -1)),
        None if bias_grad is None else bias_grad.unflatten(0, (size, -1)),
    )


def _linear_backward_vmap(calls, info, in_dims, grad, input, weight, *needs):
    grad_dim, input_dim, weight_dim = in_dims[:3]
    need_input, need_weight, need_bias = needs
    size = info.batch_size
    if weight_dim is not None:
        return _loop(
            calls.linear_backward,
            size,
            (grad, input, weight, *needs),
            (*in_dims[:3], None, None, None),
        )
    grads, dims = [None, None, None], [None, None, None]
    if need_input:
        # grad_input = g W reads neither the input nor anything batched but g.
        if grad_dim is None:
            grads[0] = calls.linear_backward(grad, input, weight, True, False, False)[0]
            dims[0] = None
        else:
            front = grad.movedim(grad_dim, 0)
            rows = _stand_in((*front.shape[:-1], weight.shape[1]), front)
            grads[0] = calls.linear_backward(front, rows, weight, True, False, False)[0]
            dims[0] = 0
    if need_weight or need_bias:
        if grad_dim is None and input_dim is None:
            _, grads[1], grads[2] = calls.linear_backward(
                grad, input, weight, False, need_weight, need_bias
            )
        elif input_dim is None:
            grads[1], grads[2] = _weight_grads_folded(
                grad,
                grad_dim,
                (input,),
                weight.shape,
                size,
                lambda g, x, w, nw, nb: calls.linear_backward(g, x, w, False, nw, nb),
                (need_weight, need_bias),
            )
            dims[1] = dims[2] = 0
        else:
            (_, grads[1], grads[2]), (_, dims[1], dims[2]) = _loop(
                calls.linear_backward,
                size,
                (grad, input, weight, False, need_weight, need_bias),
                (grad_dim, input_dim, None, None, None, None),
            )
    return tuple(grads), tuple(d if g is not None else None for g, d in zip(grads, dims))


def _bilinear_backward_vmap(calls, info, in_dims, grad, input1, input2, weight, *needs):
    grad_dim, dim1, dim2, weight_dim = in_dims[:4]
    need_input1, need_input2, need_weight, need_bias = needs
    size = info.batch_size
    if weight_dim is not None:
        return _loop(
            calls.bilinear_backward,
            size,
            (grad, input1, input2, weight, *needs),
            (*in_dims[:4], None, None, None, None),
        )
    grads, dims = [None] * 4, [None] * 4
    unbatched = grad_dim is None and dim1 is None and dim2 is None
    if need_input1 or need_input2:
        if unbatched:
            grads[0], grads[1], _, _ = calls.bilinear_backward(
                grad, input1, input2, weight, need_input1, need_input2, False, False
            )
        else:
            grads[0], grads[1], _, _ = calls.bilinear_backward(
                _to_front(grad, grad_dim, size),
                _to_front(input1, dim1, size),
                _to_front(input2, dim2, size),
                weight,
                need_input1,
                need_input2,
                False,
                False,
            )
            dims[0] = dims[1] = 0
    if need_weight or need_bias:
        if unbatched:
            _, _, grads[2], grads[3] = calls.bilinear_backward(
                grad, input1, input2, weight, False, False, need_weight, need_bias
            )
        elif dim1 is None and dim2 is None:
            grads[2], grads[3] = _weight_grads_folded(
                grad,
                grad_dim,
                (input1, input2),
                weight.shape,
                size,
                lambda g, x1, x2, w, nw, nb: calls.bilinear_backward(
                    g, x1, x2, w, False, False, nw, nb
                ),
                (need_weight, need_bias),
            )
            dims[2] = dims[3] = 0
        else:
            (_, _, grads[2], grads[3]), (_, _, dims[2], dims[3]) = _loop(
                calls.bilinear_backward,
                size,
                (grad, input1, input2, weight, False, False, need_weight, need_bias),
                (grad_dim, dim1, dim2, None, None, None, None, None),
            )
    return tuple(grads), tuple(d if g is not None else None for g, d in zip(grads, dims))


# ----------------------------------------------------------------------------- autograd.Functions
# Eager calls that record a graph, or run under torch.func transforms or forward-mode AD, go
# through these rather than the registered operators: an autograd.Function costs a fraction of
# a custom operator's per-call overhead (about 20 us against 35 us forward, 140 against 350 us
# forward + backward, measured on tiny shapes), which decides small problems; and, unlike the
# operators, it takes a jvp formula and works under torch.func.grad.


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(input, weight, bias):
        return _linear_kernel(input, weight, bias)

    setup_context = staticmethod(_linear_setup_context)
    backward = staticmethod(_linear_backward)
    jvp = staticmethod(_linear_jvp)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _linear_vmap(_FUNCTION_CALLS, info, in_dims, *args)


class _LinearBackwardFunction(torch.autograd.Function):
    @staticmethod
    def forward(grad, input, weight, need_input, need_weight, need_bias):
        return _linear_backward_kernel(grad, input, weight, need_input, need_weight, need_bias)

    setup_context = staticmethod(_linear_backward_setup_context)
    backward = staticmethod(_linear_double_backward)
    jvp = staticmethod(_linear_backward_jvp)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _linear_backward_vmap(_FUNCTION_CALLS, info, in_dims, *args)


class _BilinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(input1, input2, weight, bias):
        return _bilinear_kernel(input1, input2, weight, bias)

    setup_context = staticmethod(_bilinear_setup_context)
    backward = staticmethod(_bilinear_backward)
    jvp = staticmethod(_bilinear_jvp)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _bilinear_vmap(_FUNCTION_CALLS, info, in_dims, *args)


class _BilinearBackwardFunction(torch.autograd.Function):
    @staticmethod
    def forward(grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias):
        return _bilinear_backward_kernel(
            grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias
        )

    setup_context = staticmethod(_bilinear_backward_setup_context)
    backward = staticmethod(_bilinear_double_backward)
    jvp = staticmethod(_bilinear_backward_jvp)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _bilinear_backward_vmap(_FUNCTION_CALLS, info, in_dims, *args)


class _BilinearKeptFunction(torch.autograd.Function):
    """The eager bilinear map of an ordinary training step (the _GRAPH layer). Its forward
    keeps linmaps' intermediate ``T`` for the backward (``linmaps.bilinear_with_context``: a
    forward plus a backward then cost 6 units of ``N * out * in1 * in2`` multiply-adds
    instead of 8) when it fits linmaps' budget (``KEEP_BYTES_DEFAULT``), and frees it with
    the graph, like a saved tensor. ``T`` is made from an input and the weight, which are
    then saved too (they are what the gradient that reads ``T`` needs): autograd's version
    check still raises if either was changed in place before the backward.

    A forward that keeps ``T`` needs the old ``forward(ctx, ...)`` form, which torch.func
    transforms and forward-mode AD do not take; those use :class:`_BilinearFunction`.
    """

    @staticmethod
    def forward(ctx, input1, input2, weight, bias):
        _bilinear_setup_context(ctx, (input1, input2, weight, bias), None)
        _follow_torch_threads()
        z, ctx.linmaps_context = _api.bilinear_with_context(
            _numpy(input1), _numpy(input2), _numpy(weight), _optional(bias)
        )
        return _from_numpy(z)

    @staticmethod
    def backward(ctx, grad):
        if _layer(grad) != _KERNEL:
            # A graph of the backward is being built (create_graph=True), or the gradient is
            # batched (is_grads_batched, vmap over autograd.grad): the differentiable calls.
            return _bilinear_backward(ctx, grad)
        ctx.saved_tensors  # noqa: B018  (raises if a saved tensor was modified in place since)
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


# ----------------------------------------------------------------------------- registered operators
# What torch.compile and torch.jit.trace record. The autograd formulas and batching rules are
# the Functions' own; a backward operator returns an empty placeholder for a gradient it was
# not asked for (an operator's outputs are Tensors, not None). The operators have no
# forward-mode AD formula (torch.library.custom_op takes none): they refuse a tangent rather
# than drop it (_refuse_tangents). (Optional[...] rather than `X | None` in the signatures:
# torch evaluates them to infer the schema, and Python 3.9 cannot evaluate `X | None`.)


def _placeholder(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _or_placeholders(grads: tuple, like: Tensor) -> tuple:
    return tuple(_placeholder(like) if g is None else g for g in grads)


def _refuse_tangents(name: str, *tensors) -> None:
    """Raise if forward-mode AD is tracking any of ``tensors``: the operator's result would
    silently carry no tangent (PyTorch's custom operators drop it)."""
    if _forward_ad_active():
        for tensor in tensors:
            if tensor is not None and _forward_ad.unpack_dual(tensor).tangent is not None:
                public = name.replace("_backward", "")
                raise NotImplementedError(
                    f"torch.ops.linmaps.{name} has no forward-mode AD formula: call "
                    f"linmaps.torch.{public}, whose autograd has one, instead of the operator"
                )


@torch.library.custom_op("linmaps::linear", mutates_args=(), device_types="cpu")
def _linear_op(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # noqa: UP045
    _refuse_tangents("linear", input, weight, bias)
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
    _refuse_tangents("linear_backward", grad, input, weight)
    grads = _linear_backward_kernel(grad, input, weight, need_input, need_weight, need_bias)
    return _or_placeholders(grads, grad)


@_linear_backward_op.register_fake
def _(grad, input, weight, need_input, need_weight, need_bias):
    return (
        torch.empty_like(input) if need_input else _placeholder(grad),
        torch.empty_like(weight) if need_weight else _placeholder(grad),
        grad.new_empty((weight.shape[0],)) if need_bias else _placeholder(grad),
    )


@torch.library.custom_op("linmaps::bilinear", mutates_args=(), device_types="cpu")
def _bilinear_op(
    input1: Tensor,
    input2: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
) -> Tensor:
    _refuse_tangents("bilinear", input1, input2, weight, bias)
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
    _refuse_tangents("bilinear_backward", grad, input1, input2, weight)
    grads = _bilinear_backward_kernel(
        grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias
    )
    return _or_placeholders(grads, grad)


@_bilinear_backward_op.register_fake
def _backward_fake(grad, input1, input2, weight, need_input1, need_input2, need_weight, need_bias):
    """Shapes of a bilinear backward's gradients (also linmaps::bilinear_pairs_backward's)."""
    return (
        torch.empty_like(input1) if need_input1 else _placeholder(grad),
        torch.empty_like(input2) if need_input2 else _placeholder(grad),
        torch.empty_like(weight) if need_weight else _placeholder(grad),
        grad.new_empty((weight.shape[0],)) if need_bias else _placeholder(grad),
    )


class _Calls(NamedTuple):
    """The calls a batching rule makes on the unbatched tensors."""

    linear: Callable
    bilinear: Callable
    linear_backward: Callable
    bilinear_backward: Callable


def _operator_linear_backward(grad, input, weight, *needs) -> tuple:
    grads = torch.ops.linmaps.linear_backward(grad, input, weight, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _operator_bilinear_backward(grad, input1, input2, weight, *needs) -> tuple:
    grads = torch.ops.linmaps.bilinear_backward(grad, input1, input2, weight, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


# An operator's batching rule calls the operators again (an autograd.Function cannot run
# inside an operator's batching rule), the Functions' rules the differentiable calls.
_OPERATOR_CALLS = _Calls(
    torch.ops.linmaps.linear,
    torch.ops.linmaps.bilinear,
    _operator_linear_backward,
    _operator_bilinear_backward,
)


def _linear_op_vmap(info, in_dims, *args):
    return _linear_vmap(_OPERATOR_CALLS, info, in_dims, *args)


def _bilinear_op_vmap(info, in_dims, *args):
    return _bilinear_vmap(_OPERATOR_CALLS, info, in_dims, *args)


def _linear_backward_op_vmap(info, in_dims, grad, *args):
    grads, dims = _linear_backward_vmap(_OPERATOR_CALLS, info, in_dims, grad, *args)
    return _or_placeholders(grads, grad), dims


def _bilinear_backward_op_vmap(info, in_dims, grad, *args):
    grads, dims = _bilinear_backward_vmap(_OPERATOR_CALLS, info, in_dims, grad, *args)
    return _or_placeholders(grads, grad), dims


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
_linear_backward_op.register_autograd(
    _linear_double_backward, setup_context=_linear_backward_setup_context
)
_bilinear_op.register_autograd(_bilinear_backward, setup_context=_bilinear_setup_context)
_bilinear_backward_op.register_autograd(
    _bilinear_double_backward, setup_context=_bilinear_backward_setup_context
)

# register_vmap is newer than custom_op itself: under a torch whose operators lack it, vmap of
# the operators themselves uses PyTorch's fallback (the Functions that lt.linear/lt.bilinear
# use have their rules in every version).
if hasattr(_linear_op, "register_vmap"):
    _linear_op.register_vmap(_linear_op_vmap)
    _linear_backward_op.register_vmap(_linear_backward_op_vmap)
    _bilinear_op.register_vmap(_bilinear_op_vmap)
    _bilinear_backward_op.register_vmap(_bilinear_backward_op_vmap)


# ----------------------------------------------------------------------------- public functions


def _kernel_tensors(*tensors) -> bool:
    """Whether linmaps' kernels take these tensors: strided CPU tensors of one float32,
    float64 or (with ml_dtypes installed) bfloat16 dtype (plain tensors or parameters, or the
    fake tensors of torch.compile)."""
    dtype = tensors[0].dtype
    if dtype not in _KERNEL_DTYPES or (dtype == torch.bfloat16 and not _bfloat16_usable()):
        return False
    for tensor in tensors:
        if tensor.dtype != dtype or tensor.device != _CPU or tensor.layout != torch.strided:
            return False
    return True


def _linear_takes(input, weight, bias) -> bool:
    return (
        input.dim() >= 1
        and weight.dim() == 2
        and input.shape[-1] == weight.shape[1]
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
        and _kernel_tensors(input, weight, *(() if bias is None else (bias,)))
    )


def _bilinear_takes(input1, input2, weight, bias) -> bool:
    return (
        input1.dim() >= 1
        and input1.shape[:-1] == input2.shape[:-1]
        and input2.dim() == input1.dim()
        and weight.dim() == 3
        and input1.shape[-1] == weight.shape[1]
        and input2.shape[-1] == weight.shape[2]
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
        and _kernel_tensors(input1, input2, weight, *(() if bias is None else (bias,)))
    )


def _linmaps_takes(takes, *args) -> bool:
    """Whether linmaps computes the call (``takes``: its shapes, dtypes and devices), outside
    CPU autocast, which computes in its own dtype and so needs PyTorch's operator.

    Under torch.jit.trace the shapes read here are traced values, and PyTorch warns that
    reading them makes the trace specific to them; a trace records the branch taken here as
    it records the shapes, which is what a trace is, so the warnings are not passed on."""
    if torch.is_autocast_enabled("cpu"):
        return False
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return takes(*args)
    return takes(*args)


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
        Computed by linmaps' kernels for CPU float32/float64 tensors of one dtype, else by
        ``torch.nn.functional.linear`` (which also raises PyTorch's errors for bad shapes).
        Differentiable to any order, in reverse and forward mode, and under torch.func.
    """
    if _linmaps_takes(_linear_takes, input, weight, bias):
        layer = _layer(input, weight, bias)
        if layer == _KERNEL:
            return _linear_kernel(input, weight, bias)
        if layer == _OPERATOR:
            return torch.ops.linmaps.linear(input, weight, bias)
        return _LinearFunction.apply(input, weight, bias)
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
        Computed by linmaps' kernels for CPU float32/float64 tensors of one dtype, else by
        ``torch.nn.functional.bilinear`` (which also raises PyTorch's errors for bad shapes).
        Differentiable to any order, in reverse and forward mode, and under torch.func.
    """
    if _linmaps_takes(_bilinear_takes, input1, input2, weight, bias):
        layer = _layer(input1, input2, weight, bias)
        if layer == _KERNEL:
            return _bilinear_kernel(input1, input2, weight, bias)
        if layer == _GRAPH:
            return _BilinearKeptFunction.apply(input1, input2, weight, bias)
        if layer == _OPERATOR:
            return torch.ops.linmaps.bilinear(input1, input2, weight, bias)
        return _BilinearFunction.apply(input1, input2, weight, bias)
    return F.bilinear(input1, input2, weight, bias)


_FUNCTION_CALLS = _Calls(linear, bilinear, _linear_backward_call, _bilinear_backward_call)


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


# The all-pairs map and the biaffine scorer live in their own module, built on the helpers above.
from ._torch_pairs import Biaffine, bilinear_pairs  # noqa: E402
