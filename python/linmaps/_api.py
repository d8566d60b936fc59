"""The functional API: forward and backward of linear and bilinear maps on NumPy arrays.

Each function validates its arguments (``_validation``), brings them to one dtype and a
C-contiguous 2-D layout, calls the active backend (``_backend``) and restores the caller's
batch shape and dtype. The formulas are those of ``docs/spec.md``; see
``docs/derivation.md`` for the map from each formula to the code.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from . import _backend, _bf16_kernel, _precision
from . import _validation as v

__all__ = [
    "KEEP_BYTES_DEFAULT",
    "BilinearContext",
    "BilinearGrads",
    "LinearGrads",
    "bilinear",
    "bilinear_backward",
    "bilinear_with_context",
    "linear",
    "linear_backward",
]

#: Default memory budget (bytes) for the intermediate a bilinear forward keeps for its
#: backward (``bilinear_with_context``, ``Bilinear`` layers): 256 MiB.
KEEP_BYTES_DEFAULT = 256 * 1024 * 1024
# The largest budget: the compiled kernels count bytes in a signed 64-bit integer.
_KEEP_BYTES_MAX = 2**63 - 1


class LinearGrads(NamedTuple):
    """Gradients of a linear map; an entry is None when it was not requested."""

    grad_x: np.ndarray | None
    grad_weight: np.ndarray | None
    grad_bias: np.ndarray | None


class BilinearGrads(NamedTuple):
    """Gradients of a bilinear map; an entry is None when it was not requested."""

    grad_x1: np.ndarray | None
    grad_x2: np.ndarray | None
    grad_weight: np.ndarray | None
    grad_bias: np.ndarray | None


# The fast paths build their result tuples with tuple.__new__: a NamedTuple's own constructor
# is a Python function, and costs a tenth of a tiny backward.
_tuple_new = tuple.__new__


class _Shapes:
    """The arguments' shapes for an error message, formatted only if an error is raised."""

    __slots__ = ("arrays",)

    def __init__(self, **arrays):
        self.arrays = arrays

    def __str__(self) -> str:
        return ", ".join(f"{name} shape {a.shape}" for name, a in self.arrays.items())


_shapes = _Shapes


def _flat(array, features):
    """``array (..., features)`` as 2-D ``(batch, features)``; explicit so 0-sized dims work."""
    if array.ndim == 2:
        return array
    return array.reshape(math.prod(array.shape[:-1]), features)


def _restore(array, shape, dtype):
    """A backend result in the caller's batch shape and result dtype.

    The only cast here rounds a float32 result to float16; like float32 and float64
    arithmetic it overflows to inf silently (``_validation.contiguous``), whatever
    ``numpy.errstate`` says.
    """
    if array is None:
        return None
    if array.shape != shape:
        array = array.reshape(shape)
    return v.contiguous(array, dtype)


# ----------------------------------------------------------------------------- linear


def _check_linear(fname, x, weight):
    v.check_at_least_1d(fname, "input", x)
    if weight.ndim != 2:
        raise ValueError(
            f"{fname}(): weight must be 2-D (out_features, in_features), got shape {weight.shape}"
        )
    v.check_features(fname, "input", x.shape[-1], weight.shape[1], _shapes(input=x, weight=weight))


def linear(x: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None) -> np.ndarray:
    """Apply the linear map ``y = x @ weight.T + bias`` (``torch.nn.functional.linear``).

    Parameters
    ----------
    x : array_like, shape (..., in_features)
        Input; any number of leading batch dimensions, or none.
    weight : array_like, shape (out_features, in_features)
    bias : array_like, shape (out_features,), optional

    Returns
    -------
    y : ndarray, shape (..., out_features)
        In the promoted dtype of the arguments (float32, float64 or float16; bool and
        integer arrays count as float64).

    Raises
    ------
    ValueError
        If the shapes do not fit together.
    TypeError
        If an argument has a complex, object, string or other unsupported dtype.
    """
    # Fast path, as in bilinear(): exact arguments go straight to the compiled kernel.
    fast = _precision.fast_core()
    if fast is not None:
        y = fast.linear_forward_fast(x, weight, bias)
        if y is not None:
            return y
    fname = "linear"
    x = v.as_array(fname, "input", x)
    weight = v.as_array(fname, "weight", weight)
    _check_linear(fname, x, weight)
    out_features, in_features = weight.shape
    arrays = [x, weight]
    if bias is not None:
        bias = v.as_array(fname, "bias", bias)
        v.check_bias(fname, bias, (out_features,), weight.shape)
        arrays.append(bias)
    dtype = v.result_dtype(*arrays)
    if _bf16_kernel.applies(dtype):
        y = _bf16_kernel.linear_forward(_flat(x, in_features), weight, bias, dtype)
        return y.reshape(x.shape[:-1] + (out_features,))
    work = v.compute_dtype(dtype)
    x2d = v.contiguous(_flat(x, in_features), work)
    y = _precision.backend_for(_backend.current(), dtype).linear_forward(
        x2d, v.contiguous(weight, work), None if bias is None else v.contiguous(bias, work)
    )
    return _restore(y, x.shape[:-1] + (out_features,), dtype)


def linear_backward(
    grad_out: ArrayLike,
    x: ArrayLike,
    weight: ArrayLike,
    *,
    bias: bool = True,
    need_x: bool = True,
    need_weight: bool = True,
) -> LinearGrads:
    """Gradients of a linear map ``y = x @ weight.T + bias`` given ``grad_out = dL/dy``.

    ``grad_x = grad_out @ weight``, ``grad_weight = grad_out.T @ x`` and
    ``grad_bias = grad_out.sum(batch axes)`` (batch axes flattened).

    Parameters
    ----------
    grad_out : array_like, shape (..., out_features)
    x : array_like, shape (..., in_features)
        The input of the forward pass.
    weight : array_like, shape (out_features, in_features)
    bias : bool, default True
        Whether to compute ``grad_bias`` (set False when the map has no bias or it is frozen).
    need_x, need_weight : bool, default True
        Whether to compute ``grad_x`` / ``grad_weight``; a gradient not asked for costs nothing
        and is returned as None.

    Returns
    -------
    LinearGrads
        ``(grad_x (..., in_features), grad_weight (out_features, in_features),
        grad_bias (out_features,))``, each None when not requested.
    """
    # Fast path, as in linear(): exact arrays and flags go straight to the compiled kernel.
    fast = _precision.fast_core()
    if fast is not None:
        grads = fast.linear_backward_fast(grad_out, x, weight, bias, need_x, need_weight)
        if grads is not None:
            return _tuple_new(LinearGrads, grads)
    fname = "linear_backward"
    need_bias = v.check_flag(fname, "bias", bias)
    need_x = v.check_flag(fname, "need_x", need_x)
    need_weight = v.check_flag(fname, "need_weight", need_weight)
    grad_out = v.as_array(fname, "grad_out", grad_out)
    x = v.as_array(fname, "input", x)
    weight = v.as_array(fname, "weight", weight)
    _check_linear(fname, x, weight)
    out_features, in_features = weight.shape
    v.check_grad_out(
        fname, grad_out, x.shape[:-1] + (out_features,), _shapes(input=x, weight=weight)
    )
    dtype = v.result_dtype(grad_out, x, weight)
    if _bf16_kernel.applies(dtype):
        grad_x, grad_weight, grad_bias = _bf16_kernel.linear_backward(
            _flat(grad_out, out_features),
            _flat(x, in_features),
            weight,
            need_x,
            need_weight,
            need_bias,
            dtype,
        )
        return LinearGrads(
            None if grad_x is None else grad_x.reshape(x.shape), grad_weight, grad_bias
        )
    work = v.compute_dtype(dtype)
    grad_x, grad_weight, grad_bias = _precision.backend_for(
        _backend.current(), dtype
    ).linear_backward(
        v.contiguous(_flat(grad_out, out_features), work),
        v.contiguous(_flat(x, in_features), work),
        v.contiguous(weight, work),
        need_x,
        need_weight,
        need_bias,
    )
    return LinearGrads(
        _restore(grad_x, x.shape, dtype),
        _restore(grad_weight, weight.shape, dtype),
        _restore(grad_bias, (out_features,), dtype),
    )


# ----------------------------------------------------------------------------- bilinear


def _check_bilinear(fname, x1, x2, weight):
    v.check_at_least_1d(fname, "input1", x1)
    v.check_at_least_1d(fname, "input2", x2)
    _check_bilinear_operands(fname, x1, x2, weight, x1.shape[:-1], x2.shape[:-1])


def _check_bilinear_operands(fname, x1, x2, weight, batch1, batch2):
    """The weight's rank, the inputs' batch dimensions ``batch1``/``batch2`` and the feature
    sizes (bilinear and bilinear_pairs)."""
    if weight.ndim not in (2, 3):
        raise ValueError(
            f"{fname}(): weight must be 3-D (out_features, in1_features, "
            f"in2_features) or 2-D (in1_features, in2_features), "
            f"got shape {weight.shape}"
        )
    shapes = _shapes(input1=x1, input2=x2, weight=weight)
    if batch1 != batch2:
        raise ValueError(
            f"{fname}(): input batch dimensions do not match: got {batch1} and {batch2} ({shapes})"
        )
    v.check_features(fname, "input1", x1.shape[-1], weight.shape[-2], shapes)
    v.check_features(fname, "input2", x2.shape[-1], weight.shape[-1], shapes)


def _prepared_bilinear(fname, x1, x2, weight, bias):
    """The validated forward arguments: ``(x1, x2, weight, bias)`` as C-contiguous 2-D/3-D arrays
    in the compute dtype, the result dtype, the batch shape and the output shape."""
    x1 = v.as_array(fname, "input1", x1)
    x2 = v.as_array(fname, "input2", x2)
    weight = v.as_array(fname, "weight", weight)
    _check_bilinear(fname, x1, x2, weight)
    out_shape = weight.shape[:-2]
    in1, in2 = weight.shape[-2:]
    arrays = [x1, x2, weight]
    if bias is not None:
        bias = v.as_array(fname, "bias", bias)
        v.check_bias(fname, bias, out_shape, weight.shape)
        arrays.append(bias)
    dtype = v.result_dtype(*arrays)
    work = v.compute_dtype(dtype)
    out_features = math.prod(out_shape)
    prepared = (
        v.contiguous(_flat(x1, in1), work),
        v.contiguous(_flat(x2, in2), work),
        v.contiguous(weight.reshape(out_features, in1, in2), work),
        None if bias is None else v.contiguous(bias.reshape(out_features), work),
    )
    return prepared, dtype, x1, x2, weight


def bilinear(
    x1: ArrayLike, x2: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None
) -> np.ndarray:
    """Apply the bilinear map ``z[..., l] = x1 @ weight[l] @ x2 + bias[l]``.

    Like ``torch.nn.functional.bilinear``. A 2-D ``weight`` is a single bilinear form
    ``z = x1 @ weight @ x2``, one scalar per sample.

    Parameters
    ----------
    x1 : array_like, shape (..., in1_features)
    x2 : array_like, shape (..., in2_features)
        Same leading (batch) shape as ``x1``.
    weight : array_like, shape (out_features, in1_features, in2_features) or (in1, in2)
    bias : array_like, shape (out_features,) (or () for a 2-D weight), optional

    Returns
    -------
    z : ndarray, shape (..., out_features), or (...) for a 2-D weight
        In the promoted dtype of the arguments.

    Raises
    ------
    ValueError
        If the shapes do not fit together.
    TypeError
        If an argument has an unsupported dtype.

    See Also
    --------
    bilinear_with_context : the same forward, keeping what makes the backward cheaper.
    """
    # Fast path: arguments already exact C-contiguous float32/float64 ndarrays of one dtype and
    # fitting shapes go straight to the same compiled kernel (None otherwise: validate below).
    fast = _precision.fast_core()
    if fast is not None:
        z = fast.bilinear_forward_fast(x1, x2, weight, bias)
        if z is not None:
            return z
    prepared, dtype, x1, _, weight = _prepared_bilinear("bilinear", x1, x2, weight, bias)
    z = _precision.backend_for(_backend.current(), dtype).bilinear_forward(*prepared)
    return _restore(z, x1.shape[:-1] + weight.shape[:-2], dtype)


class BilinearContext:
    """What a bilinear forward keeps for its backward (``bilinear_with_context``).

    It holds the forward's arguments (as the arrays the kernels read: no copy of C-contiguous
    input in the compute dtype, so do not modify them in place before the backward) and,
    within the memory budget, the intermediate ``T = P @ A_hat`` of ``docs/derivation.md``
    (``batch * out_features * min(in1, in2)`` numbers). With ``T`` kept, the backward does
    two of its three large matrix products instead of three; without it, it computes ``T``
    again. The gradients are bitwise the same either way.

    Pass it to ``bilinear_backward(grad_out, context=ctx)``, as often as needed. Copies
    (``copy.copy``, ``copy.deepcopy``) and pickles hold the same arguments but never ``T``:
    their backward computes it again, with the same bits.
    """

    __slots__ = ("_arrays", "_backend", "_dtype", "_kept", "_shapes")

    def __init__(self, arrays, shapes, dtype, backend, kept):
        self._arrays = arrays  # (x1, x2, weight) as passed to the kernels
        self._shapes = shapes  # the caller's (x1, x2, weight) shapes
        self._dtype = dtype  # result dtype of (x1, x2, weight)
        self._backend = backend
        self._kept = kept

    @property
    def kept_bytes(self) -> int:
        """Bytes held by the kept intermediate (0 when it was not kept or was released)."""
        return 0 if self._kept is None else self._kept.nbytes

    def release(self) -> None:
        """Free the kept intermediate now; a later backward computes it again."""
        self._kept = None

    # Copies and pickles never carry the kept T. Sharing the buffer would let `reuse=` on one
    # context overwrite the other's T; and a copy of it would sit at another address, while
    # the compiled kernels lay T out from the buffer's 64-byte alignment. Without T the
    # backward computes it again, with the same bits.
    def __copy__(self) -> BilinearContext:
        return BilinearContext(self._arrays, self._shapes, self._dtype, self._backend, None)

    def __deepcopy__(self, memo) -> BilinearContext:
        arrays = copy.deepcopy(self._arrays, memo)
        return BilinearContext(arrays, self._shapes, self._dtype, self._backend, None)

    def __reduce__(self):
        backend = "cpp" if self._backend is _backend._cpp_backend else "python"
        return (_unpickled_context, (self._arrays, self._shapes, self._dtype, backend))

    def __repr__(self) -> str:
        x1, x2, weight = self._shapes
        return (
            f"BilinearContext(input1 shape {x1}, input2 shape {x2}, weight shape {weight}, "
            f"dtype={self._dtype.name}, kept_bytes={self.kept_bytes})"
        )


def _unpickled_context(arrays, shapes, dtype, backend) -> BilinearContext:
    """A pickled ``BilinearContext`` again (without ``T``), for the backend that made it when
    this process has it."""
    module = _backend._cpp_backend if backend == "cpp" else None
    if module is None:
        module = _backend._numpy_backend
    return BilinearContext(tuple(arrays), tuple(shapes), np.dtype(dtype), module, None)


def _keep_budget(fname, keep_bytes) -> int:
    if keep_bytes is None:
        return KEEP_BYTES_DEFAULT
    if isinstance(keep_bytes, (bool, np.bool_)) or not isinstance(keep_bytes, (int, np.integer)):
        raise TypeError(
            f"{fname}(): keep_bytes must be an int (bytes) or None, got {type(keep_bytes).__name__}"
        )
    if keep_bytes < 0:
        raise ValueError(f"{fname}(): keep_bytes must be >= 0, got {keep_bytes}")
    if keep_bytes > _KEEP_BYTES_MAX:
        raise ValueError(f"{fname}(): keep_bytes must be at most 2**63 - 1, got {keep_bytes}")
    return int(keep_bytes)


def bilinear_with_context(
    x1: ArrayLike,
    x2: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    keep_bytes: int | None = None,
    reuse: BilinearContext | None = None,
) -> tuple[np.ndarray, BilinearContext]:
    """``bilinear`` that also returns what makes its backward cheaper.

    ``z, ctx = bilinear_with_context(x1, x2, weight, bias)`` gives the same ``z`` as
    ``bilinear``; ``bilinear_backward(grad_out, context=ctx)`` then gives the same gradients
    as ``bilinear_backward(grad_out, x1, x2, weight)``, faster when the forward's intermediate
    ``T`` fits the memory budget: a forward plus a backward then costs 6 units of
    ``N * L * in1 * in2`` multiply-adds instead of 8 (``docs/performance.md``).

    Parameters
    ----------
    x1, x2, weight, bias
        As for :func:`bilinear`.
    keep_bytes : int, optional
        Memory budget for ``T`` (``N * out_features * min(in1, in2)`` numbers of the compute
        dtype): kept only if it fits. Default :data:`KEEP_BYTES_DEFAULT` (256 MiB); 0 keeps
        nothing; at most ``2**63 - 1`` (``ValueError`` above).
    reuse : BilinearContext, optional
        A context whose buffer may be recycled for this one's ``T`` (as a training loop does
        from one step to the next: no fresh memory per step). That context then no longer
        holds ``T``; its backward still gives the same results, computing ``T`` again.

    Returns
    -------
    z : ndarray
        As ``bilinear(x1, x2, weight, bias)``.
    ctx : BilinearContext
    """
    # Fast path, as in bilinear(): exact arrays (and an int budget) go to one compiled call.
    fast = _precision.fast_core()
    if (
        fast is not None
        and (reuse is None or type(reuse) is BilinearContext)
        and (keep_bytes is None or (type(keep_bytes) is int and 0 <= keep_bytes <= _KEEP_BYTES_MAX))
    ):
        budget = KEEP_BYTES_DEFAULT if keep_bytes is None else keep_bytes
        buffer = None if reuse is None else reuse._kept
        result = fast.bilinear_layer_forward_fast(x1, x2, weight, bias, buffer, budget, False)
        if result is not None:
            z, x1, x2, kept = result
            if reuse is not None:
                reuse._kept = None
            ctx = BilinearContext(
                (x1, x2, weight),
                (x1.shape, x2.shape, weight.shape),
                z.dtype,
                _backend._cpp_backend,
                kept,
            )
            return z, ctx
    fname = "bilinear_with_context"
    budget = _keep_budget(fname, keep_bytes)
    if reuse is not None and not isinstance(reuse, BilinearContext):
        raise TypeError(
            f"{fname}(): reuse must be a BilinearContext or None, got {type(reuse).__name__}"
        )
    buffer = None
    if reuse is not None:
        buffer, reuse._kept = reuse._kept, None
    z, ctx = _forward_keeping(fname, x1, x2, weight, bias, budget, buffer)
    return z, ctx


def _forward_keeping(fname, x1, x2, weight, bias, budget, buffer):
    """``bilinear_with_context`` after its own argument checks: ``T`` kept if it fits
    ``budget`` bytes, in ``buffer`` (an earlier kept buffer, or None) if that is large
    enough."""
    prepared, dtype, x1_in, x2_in, weight_in = _prepared_bilinear(fname, x1, x2, weight, bias)
    x1c, x2c, weightc, _ = prepared
    backend = _backend.current()
    compute = _precision.backend_for(backend, dtype)
    work = x1c.dtype
    out_features, in1, in2 = weightc.shape
    elements = backend.bilinear_kept_elements(x1c.shape[0], in1, in2, out_features, work)
    kept = None
    if elements * work.itemsize <= budget and compute is backend:
        if (
            buffer is not None
            and buffer.dtype == work
            and buffer.size >= elements
            and buffer.flags.aligned
            and buffer.flags.writeable
        ):
            kept = buffer
        else:
            kept = np.empty(elements, dtype=work)
    z = compute.bilinear_forward(*prepared, kept)
    arg_dtype = v.result_dtype(x1_in, x2_in, weight_in)
    ctx = BilinearContext(
        (x1c, x2c, weightc), (x1_in.shape, x2_in.shape, weight_in.shape), arg_dtype, backend, kept
    )
    return _restore(z, x1_in.shape[:-1] + weight_in.shape[:-2], dtype), ctx


def bilinear_backward(
    grad_out: ArrayLike,
    x1: ArrayLike | None = None,
    x2: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    *,
    context: BilinearContext | None = None,
    bias: bool = True,
    need_x1: bool = True,
    need_x2: bool = True,
    need_weight: bool = True,
) -> BilinearGrads:
    """Gradients of a bilinear map given ``grad_out = dL/dz``.

    With ``g_l = grad_out[..., l]``: ``grad_x1 = sum_l g_l * (x2 @ weight[l].T)``,
    ``grad_x2 = sum_l g_l * (x1 @ weight[l])``, ``grad_weight[l] = x1.T @ (g_l * x2)`` and
    ``grad_bias = grad_out.sum(batch axes)``.

    Parameters
    ----------
    grad_out : array_like, shape (..., out_features), or (...) for a 2-D weight
    x1 : array_like, shape (..., in1_features)
    x2 : array_like, shape (..., in2_features)
    weight : array_like, shape (out_features, in1_features, in2_features) or (in1, in2)
        The forward's arguments; omit all three when giving ``context``.
    context : BilinearContext, optional
        From ``bilinear_with_context``: the forward's arguments and, if kept, its
        intermediate, which spares a third of this backward's work. Same results.
    bias : bool, default True
        Whether to compute ``grad_bias``.
    need_x1, need_x2, need_weight : bool, default True
        Whether to compute each gradient; one not asked for costs nothing and is None.

    Returns
    -------
    BilinearGrads
        ``(grad_x1, grad_x2, grad_weight, grad_bias)`` shaped like ``x1``, ``x2``, ``weight``
        and ``weight.shape[:-2]``, each None when not requested.
    """
    # Fast path, as in bilinear(): exact arrays and flags go straight to the compiled kernel
    # (with a context's arrays and kept T if it was made by the compiled backend).
    fast = _precision.fast_core()
    if fast is not None:
        if context is None:
            grads = fast.bilinear_backward_fast(
                grad_out, x1, x2, weight, bias, need_x1, need_x2, need_weight
            )
            if grads is not None:
                return _tuple_new(BilinearGrads, grads)
        arrays, kept = (x1, x2, weight), None
        if context is not None:
            if (
                type(context) is not BilinearContext
                or x1 is not None
                or x2 is not None
                or weight is not None
                or context._backend is not _backend._cpp_backend
            ):
                kept = False  # the validated path says what is wrong, or converts
            else:
                arrays, kept = context._arrays, context._kept
        if context is not None and kept is not False:
            grads = fast.bilinear_backward_fast(
                grad_out, *arrays, bias, need_x1, need_x2, need_weight, kept
            )
            if grads is not None:
                return _tuple_new(BilinearGrads, grads)
    fname = "bilinear_backward"
    need_bias = v.check_flag(fname, "bias", bias)
    need_x1 = v.check_flag(fname, "need_x1", need_x1)
    need_x2 = v.check_flag(fname, "need_x2", need_x2)
    need_weight = v.check_flag(fname, "need_weight", need_weight)
    grad_out = v.as_array(fname, "grad_out", grad_out)
    kept = None
    if context is not None:
        if not isinstance(context, BilinearContext):
            raise TypeError(
                f"{fname}(): context must be a BilinearContext (from bilinear_with_context), "
                f"got {type(context).__name__}"
            )
        if x1 is not None or x2 is not None or weight is not None:
            raise TypeError(f"{fname}(): give either x1, x2 and weight, or context, not both")
        x1c, x2c, weightc = context._arrays
        x1_shape, x2_shape, weight_shape = context._shapes
        expected = x1_shape[:-1] + weight_shape[:-2]
        v.check_grad_out(
            fname,
            grad_out,
            expected,
            f"input1 shape {x1_shape}, input2 shape {x2_shape}, weight shape {weight_shape}",
        )
        dtype = v.result_dtype(grad_out, np.empty(0, context._dtype))
        work = v.compute_dtype(dtype)
        if _backend.current() is context._backend and work == x1c.dtype:
            kept = context._kept
            # T's place in the buffer depends on the buffer's address: an unaligned one
            # (unpickled) cannot be read, nor copied elsewhere; T is computed again instead
            # (the same bits).
            if kept is not None and not kept.flags.aligned:
                kept = None
        x1c, x2c, weightc = (v.contiguous(a, work) for a in (x1c, x2c, weightc))
    else:
        if x1 is None or x2 is None or weight is None:
            raise TypeError(f"{fname}(): give x1, x2 and weight, or context")
        x1 = v.as_array(fname, "input1", x1)
        x2 = v.as_array(fname, "input2", x2)
        weight = v.as_array(fname, "weight", weight)
        _check_bilinear(fname, x1, x2, weight)
        x1_shape, x2_shape, weight_shape = x1.shape, x2.shape, weight.shape
        v.check_grad_out(
            fname,
            grad_out,
            x1.shape[:-1] + weight.shape[:-2],
            _shapes(input1=x1, input2=x2, weight=weight),
        )
        dtype = v.result_dtype(grad_out, x1, x2, weight)
        work = v.compute_dtype(dtype)
        in1, in2 = weight.shape[-2:]
        out_features = math.prod(weight.shape[:-2])
        x1c = v.contiguous(_flat(x1, in1), work)
        x2c = v.contiguous(_flat(x2, in2), work)
        weightc = v.contiguous(weight.reshape(out_features, in1, in2), work)
    out_shape = weight_shape[:-2]
    grad_x1, grad_x2, grad_weight, grad_bias = _precision.backend_for(
        _backend.current(), dtype
    ).bilinear_backward(
        v.contiguous(grad_out.reshape(x1c.shape[0], weightc.shape[0]), work),
        x1c,
        x2c,
        weightc,
        need_x1,
        need_x2,
        need_weight,
        need_bias,
        kept,
    )
    return BilinearGrads(
        _restore(grad_x1, x1_shape, dtype),
        _restore(grad_x2, x2_shape, dtype),
        _restore(grad_weight, weight_shape, dtype),
        _restore(grad_bias, out_shape, dtype),
    )
