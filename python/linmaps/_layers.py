"""NumPy-facing layers :class:`Linear` and :class:`Bilinear` (like ``torch.nn.Linear`` and
``torch.nn.Bilinear``).

A layer owns its parameters (``weight``, ``bias``) and their gradient accumulators
(``grad_weight``, ``grad_bias``). Calling it runs the forward pass through the functional API,
so whichever backend is active does the arithmetic, and keeps the inputs that the backward
pass needs; ``backward`` returns the input gradients and adds the parameter gradients to the
accumulators. Usage, accumulation semantics, freezing and state dicts: ``docs/layers.md``.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple

import numpy as np

from . import _api, _backend, _bf16, _npz, _precision
from . import _validation as v

__all__ = ["Bilinear", "IncompatibleKeys", "Linear", "LoadError"]

_LAYER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class LoadError(ValueError):
    """A layer's ``load`` could not use a file's contents.

    Raised for every file that cannot be loaded into the layer: an empty file, a single
    ``.npy`` array, a file that is not a zip archive or is corrupt or truncated, a member that
    is not a ``.npy`` array or has a non-real dtype or the wrong shape, and missing or
    unexpected keys (when strict). The message names the file and the reason. A subclass of
    ``ValueError``. A file that cannot be opened at all raises ``OSError`` as ``open`` does.
    """


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(..., strict=False)`` did not match (both empty when all did)."""

    missing_keys: list
    unexpected_keys: list


# ----------------------------------------------------------------------------- argument checks


def _check_size(where: str, name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{where}: {name} must be non-negative, got {value}")
    return int(value)


def _layer_dtype(where: str, dtype) -> np.dtype:
    if dtype is None:
        return _LAYER_DTYPES[0]
    try:
        resolved = np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    # `is None` first: np.dtype.__eq__ takes None for float64, so `None in _LAYER_DTYPES` holds.
    if resolved is not None and _bf16.is_bfloat16(resolved):
        return resolved
    if resolved is None or resolved not in _LAYER_DTYPES:
        got = repr(dtype) if resolved is None else resolved.name
        raise TypeError(
            f"{where}: dtype must be float32 or float64, or ml_dtypes.bfloat16, got {got}"
        )
    return resolved


def _random_generator(where: str, seed, rng) -> np.random.Generator:
    if seed is not None and rng is not None:
        raise ValueError(f"{where}: pass seed or rng, not both")
    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"{where}: rng must be a numpy.random.Generator "
                f"(e.g. numpy.random.default_rng(0)), got {type(rng).__name__}"
            )
        return rng
    if seed is not None:
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}")
        if seed < 0:
            raise ValueError(f"{where}: seed must be non-negative, got {seed}")
        seed = int(seed)
    return np.random.default_rng(seed)


def _check_bool(where: str, name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _parameter_value(where: str, name: str, value, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """``value`` checked to be a real array of exactly ``shape`` (it is cast to ``dtype`` later)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where}: {name} cannot be converted to an array: {exc}") from None
    if array.dtype.kind not in "biuf" and not _bf16.is_bfloat16(array.dtype):
        raise TypeError(
            f"{where}: {name} has dtype {array.dtype}, which cannot be cast to the "
            f"layer's dtype {dtype}; expected a real floating-point, integer or "
            f"bool array"
        )
    if array.shape != shape:
        raise ValueError(
            f"{where}: {name} shape does not match the layer: got {array.shape} "
            f"but expected {shape}"
        )
    return array


# ----------------------------------------------------------------------------- shared base


class _Layer:
    """Parameters, gradient accumulators, freezing and state dicts shared by both layers."""

    def __init__(self, shapes: dict, fan_in: int, dtype, seed, rng, copy_inputs: bool):
        where = f"{type(self).__name__}()"
        self._dtype = _layer_dtype(where, dtype)
        generator = _random_generator(where, seed, rng)
        self._copy_inputs = _check_bool(where, "copy_inputs", copy_inputs)
        # PyTorch's default init for both layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight
        # and bias. An empty fan-in has no scale to speak of; its bias starts at zero.
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        # Drawn in float64 and rounded once, in the order weight then bias, so that one seed
        # gives the same numbers (up to rounding) in a float32 and a float64 layer.
        self._params = {
            name: generator.uniform(-bound, bound, size=shape).astype(self._dtype)
            for name, shape in shapes.items()
        }
        self._grads = {name: np.zeros_like(p) for name, p in self._params.items()}
        self._frozen: set[str] = set()
        self._saved: tuple | None = None

    # -- attributes ----------------------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the parameters, gradients, outputs and input gradients."""
        return self._dtype

    @property
    def copy_inputs(self) -> bool:
        """Whether forward keeps private copies of its inputs for backward (see ``forward``)."""
        return self._copy_inputs

    @property
    def weight(self) -> np.ndarray:
        """The weight array, owned by the layer; in-place updates (``layer.weight -= step``)
        change the layer. Assigning an array copies its values in (cast to ``dtype``)."""
        return self._params["weight"]

    @weight.setter
    def weight(self, value) -> None:
        self._assign("weight", value)

    @property
    def bias(self) -> np.ndarray | None:
        """The bias array ``(out_features,)``, or None for a layer built with ``bias=False``."""
        return self._params.get("bias")

    @bias.setter
    def bias(self, value) -> None:
        if "bias" not in self._params:
            if value is None:
                return
            raise ValueError(
                f"{type(self).__name__}: cannot set bias: the layer was built with bias=False"
            )
        if value is None:
            raise ValueError(
                f"{type(self).__name__}: cannot set bias to None: a layer's "
                f"parameters are fixed at construction (build it with bias=False)"
            )
        self._assign("bias", value)

    @property
    def grad_weight(self) -> np.ndarray:
        """Accumulated ``dL/dweight``, same shape and dtype as ``weight``."""
        return self._grads["weight"]

    @property
    def grad_bias(self) -> np.ndarray | None:
        """Accumulated ``dL/dbias``, or None for a layer built with ``bias=False``."""
        return self._grads.get("bias")

    def _assign(self, name: str, value) -> None:
        target = self._params[name]
        if value is target:  # `layer.weight -= step` has already updated it in place
            return
        array = _parameter_value(
            f"{type(self).__name__}: cannot set {name}", name, value, target.shape, self._dtype
        )
        self._parameters_changing()
        # Copy into the existing array, as torch's load_state_dict does: references that an
        # optimiser took from parameters() stay valid.
        v.copy_into(target, array)

    # -- freezing ------------------------------------------------------------------------------

    def _parameter_names(self, method: str, names: tuple) -> tuple:
        if not names:
            return tuple(self._params)
        where = f"{type(self).__name__}.{method}()"
        for name in names:
            if not isinstance(name, str):
                raise TypeError(
                    f"{where}: parameter names must be strings, got {type(name).__name__}"
                )
            if name not in self._params:
                hint = " (the layer was built with bias=False)" if name == "bias" else ""
                raise ValueError(
                    f"{where}: unknown parameter {name!r}{hint}; the parameters are "
                    f"{', '.join(map(repr, self._params))}"
                )
        return names

    def freeze(self, *names: str):
        """Stop computing gradients for the named parameters (all of them when none are named).

        A frozen parameter's gradient is neither computed nor accumulated by ``backward`` (the
        backend skips that work); its accumulator keeps its value until ``zero_grad``. Input
        gradients are still returned. Returns the layer, for chaining.

        Raises
        ------
        ValueError
            For a name that is not a parameter of this layer.
        """
        self._frozen.update(self._parameter_names("freeze", names))
        return self

    def unfreeze(self, *names: str):
        """Undo ``freeze`` for the named parameters (all of them when none are named)."""
        self._frozen.difference_update(self._parameter_names("unfreeze", names))
        return self

    @property
    def frozen(self) -> frozenset:
        """Names of the frozen parameters, e.g. ``frozenset({'weight'})``."""
        return frozenset(self._frozen)

    def _parameters_changing(self) -> None:
        """Before the layer itself writes new parameter values (assignment, loading): what the
        last forward computed from the old ones is not used by a later backward."""

    def _needs_grad(self, name: str) -> bool:
        return name in self._params and name not in self._frozen

    # -- parameters and gradients --------------------------------------------------------------

    def named_parameters(self, trainable_only: bool = False) -> list:
        """``[(name, array), ...]`` in the order ``weight``, ``bias``; the live arrays.

        With ``trainable_only=True``, frozen parameters are left out.
        """
        return [
            (name, p)
            for name, p in self._params.items()
            if not (trainable_only and name in self._frozen)
        ]

    def parameters(self, trainable_only: bool = False) -> list:
        """The parameter arrays (live, updated in place by an optimiser), in the order
        ``weight``, ``bias``; with ``trainable_only=True`` frozen ones are left out."""
        return [p for _, p in self.named_parameters(trainable_only)]

    def named_gradients(self, trainable_only: bool = False) -> list:
        """``[(name, gradient), ...]`` matching ``named_parameters(trainable_only)``."""
        return [(name, self._grads[name]) for name, _ in self.named_parameters(trainable_only)]

    def gradients(self, trainable_only: bool = False) -> list:
        """The gradient accumulators, in the same order as ``parameters(trainable_only)``."""
        return [g for _, g in self.named_gradients(trainable_only)]

    def zero_grad(self) -> None:
        """Set every gradient accumulator (frozen parameters' too) to zero, in place."""
        for grad in self._grads.values():
            grad.fill(0)

    def _accumulate(self, grads: dict) -> None:
        """``grad_<name> += grad`` for each gradient computed. IEEE arithmetic whatever
        ``numpy.errstate`` says, as in the compiled fast path: an overflow gives inf and never
        raises between the additions, so the accumulators are updated all together."""
        with np.errstate(all="ignore"):
            for name, grad in grads.items():
                if grad is not None:
                    np.add(self._grads[name], grad, out=self._grads[name])

    # -- state dicts ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"weight": ..., "bias": ...}`` (no ``bias`` key without a bias): PyTorch's keys.

        The arrays are copies, a snapshot that later training does not change. Gradients,
        frozen flags and saved inputs are not part of the state.
        """
        return {name: p.copy() for name, p in self._params.items()}

    def load_state_dict(self, state, strict: bool = True) -> IncompatibleKeys:
        """Copy parameter values from a mapping such as ``state_dict()`` or ``numpy.load(path)``.

        Values are cast to the layer's dtype; shapes must match exactly. Nothing is changed
        unless every entry to be loaded is valid.

        Parameters
        ----------
        state : mapping of str to array_like
            An ``.npz`` archive opened with ``numpy.load`` works as it is.
        strict : bool, default True
            Require the keys to be exactly the layer's parameter names. With False, missing
            and unexpected keys are skipped and reported.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``.

        Raises
        ------
        ValueError
            On missing or unexpected keys (when strict) or a shape mismatch.
        TypeError
            If ``state`` is not a mapping or a value has a dtype that cannot be cast to a real
            float (complex, object, ...).
        """
        where = f"{type(self).__name__}.load_state_dict()"
        strict = _check_bool(where, "strict", strict)
        if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
            raise TypeError(
                f"{where}: state must be a mapping of parameter names to arrays, "
                f"got {type(state).__name__}"
            )
        keys = list(state.keys())
        missing = [name for name in self._params if name not in keys]
        unexpected = [key for key in keys if key not in self._params]
        if strict and (missing or unexpected):
            raise ValueError(
                f"{where}: error(s) in loading the state dict of {self!r}: "
                f"missing key(s) {missing}, unexpected key(s) {unexpected}"
            )
        # Check everything before copying anything, so a bad entry leaves the layer untouched.
        values = {
            name: _parameter_value(where, name, state[name], p.shape, self._dtype)
            for name, p in self._params.items()
            if name in keys
        }
        self._parameters_changing()
        for name, value in values.items():
            v.copy_into(self._params[name], value)
        return IncompatibleKeys(missing, unexpected)

    def save(self, path) -> None:
        """Write ``state_dict()`` to an ``.npz`` archive at exactly ``path`` (str, path-like or
        a binary file object). Unlike ``numpy.savez``, no ``.npz`` suffix is appended, so
        ``load(path)`` reads the same path back. A bfloat16 layer's parameters are written as
        float32 (exactly: ``.npy`` files have no bfloat16)."""
        state = {
            name: _bf16.to_float32(value) if _bf16.is_bfloat16(value.dtype) else value
            for name, value in self.state_dict().items()
        }
        if hasattr(path, "write"):
            np.savez(path, **state)
            return
        with open(path, "wb") as file:
            np.savez(file, **state)

    def load(self, path, strict: bool = True) -> IncompatibleKeys:
        """Load parameters from an ``.npz`` archive, as written by ``save`` or
        ``numpy.savez(path, **layer.state_dict())``.

        Each member's ``.npy`` header is read and checked against the layer (shape exactly the
        parameter's, a real dtype) before any member's data is read, and then only as many
        bytes as that header describes: a small file claiming a huge array costs nothing.
        Values are cast to the layer's dtype, as in ``load_state_dict``; nothing is unpickled.
        The layer is changed only when the whole load succeeds.

        Parameters
        ----------
        path : str, path-like or binary file object
            The archive; a file object must be seekable and is read from its position.
        strict : bool, default True
            Require the members to be exactly the layer's parameters. With False, missing
            parameters keep their values and unexpected members are skipped unread.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``.

        Raises
        ------
        LoadError
            If the file's contents cannot be loaded into the layer (see :class:`LoadError`);
            the message names the file and the reason.
        OSError
            If the file cannot be opened (missing, a directory, no permission).
        """
        where = f"{type(self).__name__}.load()"
        strict = _check_bool(where, "strict", strict)
        if hasattr(path, "read"):
            name = getattr(path, "name", None)
            shown = repr(name) if isinstance(name, (str, bytes)) else f"<{type(path).__name__}>"
            return self._load_from(path, shown, where, strict)
        path = os.fspath(path)
        with open(path, "rb") as file:  # OSError (missing file, ...) propagates as is
            return self._load_from(file, repr(path), where, strict)

    def _load_from(self, file, shown: str, where: str, strict: bool) -> IncompatibleKeys:
        shapes = {name: p.shape for name, p in self._params.items()}
        try:
            values, missing, unexpected = _npz.read_parameters(file, shapes, self._dtype, strict)
        except _npz.Invalid as exc:
            raise LoadError(f"{where}: cannot load {shown}: {exc}") from exc.__cause__
        self._parameters_changing()
        for name, value in values.items():  # every member was checked: now copy them all
            v.copy_into(self._params[name], value)
        return IncompatibleKeys(missing, unexpected)

    # -- forward/backward helpers --------------------------------------------------------------

    def _checked_input(self, where: str, name: str, value, features_name: str) -> np.ndarray:
        """``value`` as an array, its dtype and last dimension checked against the layer."""
        array = v.as_array(where, name, value)
        features = getattr(self, features_name)
        if array.ndim == 0:
            raise ValueError(
                f"{where}(): {name} must have at least 1 dimension "
                f"(..., {features_name}={features}), got a 0-d array"
            )
        if array.shape[-1] != features:
            raise ValueError(
                f"{where}(): {name} size does not match the layer: got shape "
                f"{array.shape} but expected (..., {features}) "
                f"({features_name}={features})"
            )
        return array

    def _converted(self, array: np.ndarray, keep: bool) -> np.ndarray:
        """``array`` C-contiguous in the layer's dtype; never sharing memory with ``array`` when
        it is kept for backward (``keep``) and ``copy_inputs`` is on."""
        converted = v.contiguous(array, self._dtype)
        # A conversion that had to copy already gives a private array; otherwise copy once, so
        # a caller who modifies the input in place afterwards cannot corrupt the backward pass.
        if keep and self._copy_inputs and np.may_share_memory(converted, array):
            converted = converted.copy()
        return converted

    def _grad_out(self, where: str, value, expected_shape: tuple) -> np.ndarray:
        array = v.as_array(where, "grad_out", value)
        if array.shape != expected_shape:
            raise ValueError(
                f"{where}(): grad_out shape does not match the output of the last "
                f"forward: got {array.shape} but expected {expected_shape}"
            )
        return v.contiguous(array, self._dtype)

    def _saved_inputs(self, where: str) -> tuple:
        if self._saved is None:
            raise RuntimeError(
                f"{where}(): no saved inputs: call the layer on a batch (with "
                f"save_for_backward=True, the default) before backward"
            )
        return self._saved


# ----------------------------------------------------------------------------- Linear


class Linear(_Layer):
    """Linear map ``y = x @ weight.T + bias`` with parameters and gradients, like
    ``torch.nn.Linear``.

    Parameters
    ----------
    in_features : int
        Size of the last dimension of the input.
    out_features : int
        Size of the last dimension of the output.
    bias : bool, default True
        Whether the layer has an additive bias.
    dtype : {numpy.float32, numpy.float64, ml_dtypes.bfloat16}, default float32
        dtype of the parameters and of every computation. Inputs of other real dtypes are
        converted to it; other dtypes raise TypeError.
    seed : int, optional
        Seed for the initial parameters (``numpy.random.default_rng(seed)``).
    rng : numpy.random.Generator, optional
        Generator to draw the initial parameters from (it is advanced). Give at most one of
        ``seed`` and ``rng``; with neither, fresh OS entropy is used.
    copy_inputs : bool, default True
        Keep a private copy of each forward input for backward, so modifying the input in
        place afterwards is harmless. False keeps a reference when no conversion was needed
        (saves one copy of the batch; the caller must then leave the input alone until the
        backward).

    Attributes
    ----------
    weight : ndarray, shape (out_features, in_features)
        Initialised from U(-k, k), ``k = 1/sqrt(in_features)``.
    bias : ndarray, shape (out_features,), or None
        Initialised from U(-k, k).
    grad_weight, grad_bias : ndarray
        Gradient accumulators, same shapes as the parameters, initially zero.

    Examples
    --------
    >>> layer = Linear(4, 3, seed=0)
    >>> y = layer(np.ones((5, 4)))            # (5, 3), float32
    >>> grad_x = layer.backward(np.ones_like(y))
    >>> layer.grad_weight.shape
    (3, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype=np.float32,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        copy_inputs: bool = True,
    ):
        where = "Linear()"
        self.in_features = _check_size(where, "in_features", in_features)
        self.out_features = _check_size(where, "out_features", out_features)
        shapes = {"weight": (self.out_features, self.in_features)}
        if _check_bool(where, "bias", bias):
            shapes["bias"] = (self.out_features,)
        super().__init__(shapes, self.in_features, dtype, seed, rng, copy_inputs)

    def forward(self, x, *, save_for_backward: bool = True) -> np.ndarray:
        """Compute ``y = x @ weight.T + bias`` and keep ``x`` for ``backward``.

        Parameters
        ----------
        x : array_like, shape (..., in_features)
            Any number of leading batch dimensions, or none. Converted to the layer's dtype.
        save_for_backward : bool, default True
            Keep ``x`` (until the next forward) for ``backward``. False is for inference:
            nothing is kept and inputs saved by an earlier forward are released, so a later
            ``backward`` raises instead of using a stale batch.

        Returns
        -------
        y : ndarray, shape (..., out_features), the layer's dtype
        """
        # Fast path, as in Bilinear.forward.
        fast = _precision.fast_core()
        if save_for_backward is True and fast is not None:
            result = fast.linear_layer_forward_fast(
                x, self._params["weight"], self._params.get("bias"), self._copy_inputs
            )
            if result is not None:
                y, x = result
                self._saved = (x,)
                return y
        where = "Linear.forward"
        save = _check_bool(where + "()", "save_for_backward", save_for_backward)
        self._saved = None  # release the previous batch before holding a new one
        x = self._converted(self._checked_input(where, "input", x, "in_features"), save)
        y = _api.linear(x, self.weight, self.bias)
        if save:
            self._saved = (x,)
        return y

    def __call__(self, x, *, save_for_backward: bool = True) -> np.ndarray:
        """Same as ``forward``."""
        return self.forward(x, save_for_backward=save_for_backward)

    def backward(self, grad_out, *, need_x: bool = True) -> np.ndarray | None:
        """Back-propagate ``grad_out = dL/dy`` of the last forward.

        Adds ``grad_out.T @ x`` to ``grad_weight`` and the batch sum of ``grad_out`` to
        ``grad_bias`` (skipping frozen parameters) and returns ``grad_x = grad_out @ weight``.
        Gradients accumulate over calls until ``zero_grad()``; calling ``backward`` twice after
        one forward is the backward of the sum of both losses. The parameters are used as they
        are now, so update them only after the backward.

        Parameters
        ----------
        grad_out : array_like, shape (..., out_features)
            The shape of the last forward's output.
        need_x : bool, default True
            Whether to compute the input gradient (False skips that product and returns None).

        Returns
        -------
        grad_x : ndarray, shape (..., in_features), or None when ``need_x`` is False

        Raises
        ------
        RuntimeError
            If no forward has saved an input.
        ValueError
            If ``grad_out`` does not have the shape of the last output.
        """
        fast = _precision.fast_core()
        if self._saved is not None and fast is not None:
            grads = fast.linear_layer_backward_fast(
                grad_out,
                self._saved[0],
                self._params["weight"],
                need_x,
                self._grads["weight"] if self._needs_grad("weight") else None,
                self._grads["bias"] if self._needs_grad("bias") else None,
            )
            if grads is not None:
                return grads[0]
        where = "Linear.backward"
        need_x = _check_bool(where + "()", "need_x", need_x)
        (x,) = self._saved_inputs(where)
        grad_out = self._grad_out(where, grad_out, x.shape[:-1] + (self.out_features,))
        grads = _api.linear_backward(
            grad_out,
            x,
            self.weight,
            bias=self._needs_grad("bias"),
            need_x=need_x,
            need_weight=self._needs_grad("weight"),
        )
        self._accumulate({"weight": grads.grad_weight, "bias": grads.grad_bias})
        return grads.grad_x

    def __repr__(self) -> str:
        return (
            f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self._dtype.name})"
        )


# ----------------------------------------------------------------------------- Bilinear


class Bilinear(_Layer):
    """Bilinear map ``z[..., l] = x1 @ weight[l] @ x2 + bias[l]`` with parameters and
    gradients, like ``torch.nn.Bilinear``.

    Parameters
    ----------
    in1_features : int
        Size of the last dimension of the first input.
    in2_features : int
        Size of the last dimension of the second input.
    out_features : int
        Size of the last dimension of the output.
    bias : bool, default True
        Whether the layer has an additive bias.
    dtype : {numpy.float32, numpy.float64, ml_dtypes.bfloat16}, default float32
        dtype of the parameters and of every computation. Inputs of other real dtypes are
        converted to it; other dtypes raise TypeError.
    seed : int, optional
        Seed for the initial parameters (``numpy.random.default_rng(seed)``).
    rng : numpy.random.Generator, optional
        Generator to draw the initial parameters from (it is advanced). Give at most one of
        ``seed`` and ``rng``; with neither, fresh OS entropy is used.
    copy_inputs : bool, default True
        Keep private copies of the forward inputs for backward (see :class:`Linear`).
    keep_bytes : int, optional
        Memory budget (bytes) for the forward's intermediate ``T``
        (``batch * out_features * min(in1, in2)`` numbers), kept so that the backward does two
        large matrix products instead of three: a training step costs 6 units of
        ``batch * out_features * in1 * in2`` multiply-adds instead of 8. Above the budget the
        backward computes ``T`` again; the gradients are bitwise the same either way. Default
        ``linmaps.KEEP_BYTES_DEFAULT`` (256 MiB); 0 keeps nothing. Settable as an attribute,
        and per call in ``forward``. The buffer is reused from one forward to the next and
        freed by an inference forward (``save_for_backward=False``).

    Attributes
    ----------
    weight : ndarray, shape (out_features, in1_features, in2_features)
        Initialised from U(-k, k), ``k = 1/sqrt(in1_features)``, as in PyTorch.
    bias : ndarray, shape (out_features,), or None
        Initialised from U(-k, k).
    grad_weight, grad_bias : ndarray
        Gradient accumulators, same shapes as the parameters, initially zero.

    Examples
    --------
    >>> layer = Bilinear(in1_features=4, in2_features=2, out_features=3, seed=0)
    >>> z = layer(np.ones((5, 4)), np.ones((5, 2)))     # (5, 3), float32
    >>> grad_x1, grad_x2 = layer.backward(np.ones_like(z))
    >>> layer.grad_weight.shape
    (3, 4, 2)
    """

    def __init__(
        self,
        in1_features: int,
        in2_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype=np.float32,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        copy_inputs: bool = True,
        keep_bytes: int | None = None,
    ):
        where = "Bilinear()"
        self.in1_features = _check_size(where, "in1_features", in1_features)
        self.in2_features = _check_size(where, "in2_features", in2_features)
        self.out_features = _check_size(where, "out_features", out_features)
        shapes = {"weight": (self.out_features, self.in1_features, self.in2_features)}
        if _check_bool(where, "bias", bias):
            shapes["bias"] = (self.out_features,)
        super().__init__(shapes, self.in1_features, dtype, seed, rng, copy_inputs)
        self._keep_bytes = _api._keep_budget("Bilinear", keep_bytes)
        # The buffer of the intermediate T (for the backend that made it), or None; it holds
        # the last forward's T while _kept_live (until a backward or a change of the weight).
        self._kept: np.ndarray | None = None
        self._kept_backend = None
        self._kept_live = False
        # Whether the layer made the weight read-only (while T is live, see _hold_kept_t).
        self._weight_locked = False

    # T is computed from the weight as it is at the forward. While a backward may still read
    # it, the weight is read-only, so that the backward sees the parameters as they are at
    # backward time whether T was kept or is computed again (docs/layers.md).
    def _hold_kept_t(self, kept, backend) -> None:
        self._kept, self._kept_backend, self._kept_live = kept, backend, kept is not None
        weight = self._params["weight"]
        if self._kept_live and weight.flags.writeable:
            weight.flags.writeable = False
            self._weight_locked = True

    def _release_kept_t(self) -> None:
        self._kept_live = False
        if self._weight_locked:
            self._params["weight"].flags.writeable = True
            self._weight_locked = False

    def _parameters_changing(self) -> None:
        self._release_kept_t()

    def __getstate__(self) -> dict:
        # Copies and pickles leave T behind: a copy of the buffer would sit at another address,
        # while the compiled kernels lay T out from the buffer's alignment. The copy's backward
        # computes T again (same bits).
        state = self.__dict__.copy()
        state.update(_kept=None, _kept_backend=None, _kept_live=False, _weight_locked=False)
        return state

    @property
    def keep_bytes(self) -> int:
        """Memory budget (bytes) for the intermediate kept from forward to backward."""
        return self._keep_bytes

    @keep_bytes.setter
    def keep_bytes(self, value) -> None:
        self._keep_bytes = _api._keep_budget("Bilinear.keep_bytes", value)

    @property
    def kept_bytes(self) -> int:
        """Bytes the layer holds now for the intermediate of its last forward."""
        return 0 if self._kept is None else self._kept.nbytes

    def forward(
        self, x1, x2, *, save_for_backward: bool = True, keep_bytes: int | None = None
    ) -> np.ndarray:
        """Compute ``z[..., l] = x1 @ weight[l] @ x2 + bias[l]`` and keep ``x1``, ``x2``.

        Parameters
        ----------
        x1 : array_like, shape (..., in1_features)
        x2 : array_like, shape (..., in2_features)
            Same leading (batch) shape as ``x1``, or none. Both converted to the layer's dtype.
        save_for_backward : bool, default True
            Keep the inputs (until the next forward) for ``backward``, and the intermediate
            ``T`` within the memory budget. False is for inference: nothing is kept and what
            an earlier forward kept is released.
        keep_bytes : int, optional
            The memory budget for ``T`` for this call (default: the layer's ``keep_bytes``).

        Returns
        -------
        z : ndarray, shape (..., out_features), the layer's dtype
        """
        # Fast path: exact arrays of the layer's dtype go to one compiled call that copies the
        # inputs, keeps T (reusing the last buffer) and runs the same kernel.
        fast = _precision.fast_core()
        buffer = None
        if save_for_backward is False and fast is not None:
            z = fast.bilinear_forward_fast(x1, x2, self._params["weight"], self._params.get("bias"))
            if z is not None:
                self._release_kept_t()
                self._saved = self._kept = None
                return z
        if save_for_backward is True and keep_bytes is None and fast is not None:
            # Nothing of the last batch stays valid if this call is interrupted part-way.
            self._release_kept_t()
            buffer, self._kept, self._saved = self._kept, None, None
            result = fast.bilinear_layer_forward_fast(
                x1,
                x2,
                self._params["weight"],
                self._params.get("bias"),
                buffer,
                self._keep_bytes,
                self._copy_inputs,
            )
            if result is not None:
                z, x1, x2, kept = result
                self._hold_kept_t(kept, _backend._cpp_backend)
                self._saved = (x1, x2)
                return z
        where = "Bilinear.forward"
        save = _check_bool(where + "()", "save_for_backward", save_for_backward)
        budget = self._keep_bytes if keep_bytes is None else _api._keep_budget(where, keep_bytes)
        self._release_kept_t()
        self._saved = None
        buffer, self._kept = self._kept if buffer is None else buffer, None
        x1 = self._checked_input(where, "input1", x1, "in1_features")
        x2 = self._checked_input(where, "input2", x2, "in2_features")
        if x1.shape[:-1] != x2.shape[:-1]:
            raise ValueError(
                f"{where}(): input1 and input2 batch dimensions do not match: got "
                f"{x1.shape[:-1]} and {x2.shape[:-1]} (input1 shape {x1.shape}, "
                f"input2 shape {x2.shape})"
            )
        x1, x2 = self._converted(x1, save), self._converted(x2, save)
        if not save:
            return _api.bilinear(x1, x2, self.weight, self.bias)
        z, context = _api._forward_keeping(where, x1, x2, self.weight, self.bias, budget, buffer)
        self._hold_kept_t(context._kept, context._backend)
        self._saved = (x1, x2)
        return z

    def __call__(
        self, x1, x2, *, save_for_backward: bool = True, keep_bytes: int | None = None
    ) -> np.ndarray:
        """Same as ``forward``."""
        return self.forward(x1, x2, save_for_backward=save_for_backward, keep_bytes=keep_bytes)

    def backward(self, grad_out, *, need_x1: bool = True, need_x2: bool = True) -> tuple:
        """Back-propagate ``grad_out = dL/dz`` of the last forward.

        Adds ``grad_weight[l] += x1.T @ (grad_out[:, l:l+1] * x2)`` and the batch sum of
        ``grad_out`` to ``grad_bias`` (skipping frozen parameters) and returns the input
        gradients. Gradients accumulate over calls until ``zero_grad()``; the parameters are
        used as they are now, so update them only after the backward.

        Parameters
        ----------
        grad_out : array_like, shape (..., out_features)
            The shape of the last forward's output.
        need_x1, need_x2 : bool, default True
            Whether to compute each input gradient (False skips it and gives None there).

        Returns
        -------
        (grad_x1, grad_x2) : tuple of ndarray or None
            Shapes (..., in1_features) and (..., in2_features), the layer's dtype.

        Raises
        ------
        RuntimeError
            If no forward has saved inputs.
        ValueError
            If ``grad_out`` does not have the shape of the last output.
        """
        fast = _precision.fast_core()
        if self._saved is not None and fast is not None:
            x1, x2 = self._saved
            grads = fast.bilinear_layer_backward_fast(
                grad_out,
                x1,
                x2,
                self._params["weight"],
                self._kept
                if self._kept_live and self._kept_backend is _backend._cpp_backend
                else None,
                need_x1,
                need_x2,
                self._grads["weight"] if self._needs_grad("weight") else None,
                self._grads["bias"] if self._needs_grad("bias") else None,
            )
            if grads is not None:
                self._release_kept_t()
                return grads
        where = "Bilinear.backward"
        need_x1 = _check_bool(where + "()", "need_x1", need_x1)
        need_x2 = _check_bool(where + "()", "need_x2", need_x2)
        x1, x2 = self._saved_inputs(where)
        grad_out = self._grad_out(where, grad_out, x1.shape[:-1] + (self.out_features,))
        weight = self.weight
        context = _api.BilinearContext(
            (_api._flat(x1, self.in1_features), _api._flat(x2, self.in2_features), weight),
            (x1.shape, x2.shape, weight.shape),
            self._dtype,
            self._kept_backend,
            self._kept if self._kept_live else None,
        )
        grads = _api.bilinear_backward(
            grad_out,
            context=context,
            bias=self._needs_grad("bias"),
            need_x1=need_x1,
            need_x2=need_x2,
            need_weight=self._needs_grad("weight"),
        )
        self._accumulate({"weight": grads.grad_weight, "bias": grads.grad_bias})
        self._release_kept_t()
        return grads.grad_x1, grads.grad_x2

    def __repr__(self) -> str:
        return (
            f"Bilinear(in1_features={self.in1_features}, "
            f"in2_features={self.in2_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self._dtype.name})"
        )
