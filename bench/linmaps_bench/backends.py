"""The implementations under test: the :class:`Backend` interface, the builtin backends and
their registry (add a backend here: a class and one ``register_backend`` line at the end)."""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

with warnings.catch_warnings():
    # Without the compiled module linmaps warns at import; the harness reports "cpp" as
    # unavailable (with the reason) instead.
    warnings.simplefilter("ignore", RuntimeWarning)
    import linmaps

if TYPE_CHECKING:
    from .cases.ops import Case


class BackendError(Exception):
    """The backend raised while running a case; the message is reported for that case."""


class WorkerFailed(Exception):
    """The worker process died, hung or could not start."""


class Backend:
    """An implementation under test. Subclass it, or use :class:`FunctionalBackend`.

    ``operation`` returns the callable that is timed: it takes no argument and returns the
    outputs in the order of ``Case.output_names(op)``. Everything it needs (converted inputs,
    a prebuilt autograd graph) is made in ``prepare``/``operation``, outside the timed region.
    """

    name = "?"
    # Builtin backends are re-created by name in the memory subprocess; a backend registered at
    # run time (a test's deliberately broken one) exists only in this process.
    builtin = False
    # The mixed cases time linmaps' own functions inside a NumPy program, with the linmaps
    # backend that ``context`` selects; other implementations have no part in them.
    runs_mixed = False

    def unavailable_reason(self) -> str | None:
        """None if the backend can run here, else why not."""
        return None

    def worker_env(self) -> dict:
        """Extra environment of the worker process that runs this backend."""
        return {}

    def info(self) -> dict:
        return {}

    def set_num_threads(self, n: int) -> None:
        pass

    def threads_for(self, suite_threads: int) -> int:
        """Threads this backend runs with in a suite run with ``suite_threads`` (--threads)."""
        return suite_threads

    def prepare(self, case: Case, inputs: dict) -> Any:
        return inputs

    def operation(self, case: Case, op: str, prepared: Any) -> Callable[[], tuple]:
        raise NotImplementedError

    def context(self, op: str):
        """Entered around every call of the operation (outside the timed loop)."""
        return contextlib.nullcontext()

    def to_numpy(self, outputs) -> list:
        return [None if o is None else np.asarray(o) for o in outputs]


class FunctionalBackend(Backend):
    """A backend given by four functions with the signatures of ``linmaps``'s functional API."""

    def __init__(self, name, linear, linear_backward, bilinear, bilinear_backward, context=None):
        self.name = name
        self._linear, self._linear_backward = linear, linear_backward
        self._bilinear, self._bilinear_backward = bilinear, bilinear_backward
        self._context = context

    def context(self, op):
        return self._context() if self._context is not None else contextlib.nullcontext()

    def operation(self, case, op, prepared):
        # The arrays and functions are bound once, outside the timed calls, and the functions'
        # results (tuples already) are returned as they are: a microsecond call should be
        # timed with as little of the harness around it as possible.
        a = prepared
        grad_out = a["grad_out"]
        if case.kind == "linear":
            x, weight, bias = a["x"], a["weight"], a["bias"]
            linear, linear_backward = self._linear, self._linear_backward

            def forward():
                return (linear(x, weight, bias),)

            def backward():
                return linear_backward(grad_out, x, weight)
        else:
            x1, x2, weight, bias = a["x1"], a["x2"], a["weight"], a["bias"]
            bilinear, bilinear_backward = self._bilinear, self._bilinear_backward

            def forward():
                return (bilinear(x1, x2, weight, bias),)

            def backward():
                return bilinear_backward(grad_out, x1, x2, weight)

        def forward_backward():
            return forward() + tuple(backward())

        return {"forward": forward, "backward": backward, "fwd+bwd": forward_backward}[op]


class LinmapsBackend(FunctionalBackend):
    """``linmaps``'s public functions with one of its backends (``cpp`` or ``python``) active.

    A bilinear fwd+bwd is what a training step does: ``bilinear_with_context`` keeps the
    forward's intermediate T for the backward (reusing its buffer from call to call, as a
    ``Bilinear`` layer does). ``keep_bytes=0`` (the ``cpp-recompute`` backend) computes T
    again in the backward instead, so both are in the tables.
    """

    builtin = True
    runs_mixed = True

    def __init__(self, name, keep_bytes=None):
        super().__init__(
            name,
            linmaps.linear,
            linmaps.linear_backward,
            linmaps.bilinear,
            linmaps.bilinear_backward,
            context=lambda: linmaps.use_backend(name),
        )
        self.keep_bytes = keep_bytes

    def operation(self, case, op, prepared):
        if case.kind != "bilinear" or op != "fwd+bwd":
            return super().operation(case, op, prepared)
        a = prepared
        last = []  # the previous call's context, whose buffer the next call reuses

        def forward_backward():
            z, ctx = linmaps.bilinear_with_context(
                a["x1"],
                a["x2"],
                a["weight"],
                a["bias"],
                keep_bytes=self.keep_bytes,
                reuse=last.pop() if last else None,
            )
            grads = linmaps.bilinear_backward(a["grad_out"], context=ctx)
            last.append(ctx)
            return (z, *grads)

        return forward_backward

    def unavailable_reason(self):
        if self.name in linmaps.available_backends():
            return None
        from linmaps import _backend

        return getattr(_backend, "_cpp_error", None) or f"not in {linmaps.available_backends()}"

    def info(self):
        return {"threads": linmaps.get_num_threads()}

    def set_num_threads(self, n):
        linmaps.set_num_threads(n)


class CpuLevelBackend(LinmapsBackend):
    """``cpp@LEVEL``: the compiled backend forced to one instruction-set level.

    Runs in a worker started with ``LINMAPS_CPU=LEVEL``, so one run compares, for example,
    the dispatched kernels with a ``-march=native`` build's (``cpp@native``) or the baseline.
    """

    def __init__(self, level):
        super().__init__("cpp")
        self.name = f"cpp@{level}"
        self.level = level

    def unavailable_reason(self):
        if "cpp" not in linmaps.available_backends():
            return LinmapsBackend("cpp").unavailable_reason()
        from linmaps import _cpp_backend

        if self.level not in _cpp_backend.available_isas:
            return f"level {self.level!r} not available here ({list(_cpp_backend.available_isas)})"
        return None

    def worker_env(self):
        return {"LINMAPS_CPU": self.level}

    def info(self):
        from linmaps import _cpp_backend

        return {**super().info(), "isa": _cpp_backend.isa}


class TorchBackend(Backend):
    """``torch.nn.functional.linear``/``bilinear`` on CPU and autograd for the backward pass.

    Forward runs under ``torch.no_grad()`` (it saves nothing, like linmaps' forward). Backward
    alone is ``torch.autograd.grad`` on a graph built once beforehand (``retain_graph``), so it
    times exactly the backward kernels; fwd+bwd builds the graph in each call. Inputs are
    ``torch.from_numpy`` views (no copy), made outside the timed region.
    """

    name = "torch"
    builtin = True

    def unavailable_reason(self):
        try:
            importlib.import_module("torch")
        except Exception as exc:  # not installed, or a broken install: either way unavailable
            return f"{type(exc).__name__}: {exc}"
        return None

    def info(self):
        import torch

        return {"version": torch.__version__, "threads": torch.get_num_threads()}

    def set_num_threads(self, n):
        import torch

        torch.set_num_threads(n)

    def prepare(self, case, inputs):
        import torch

        return {name: torch.from_numpy(array) for name, array in inputs.items()}

    def context(self, op):
        import torch

        return torch.no_grad() if op == "forward" else torch.enable_grad()

    def operation(self, case, op, prepared):
        import torch
        import torch.nn.functional as F

        args = ["x", "weight", "bias"] if case.kind == "linear" else ["x1", "x2", "weight", "bias"]
        function = F.linear if case.kind == "linear" else F.bilinear
        if op == "forward":
            inputs = [prepared[name] for name in args]
            return lambda: (function(*inputs),)
        # Fresh leaves per operation: detach() shares the memory, requires_grad_ marks them.
        leaves = [prepared[name].detach().requires_grad_() for name in args]
        grad_out = prepared["grad_out"]
        if op == "backward":
            with torch.enable_grad():
                out = function(*leaves)
            return lambda: tuple(torch.autograd.grad(out, leaves, grad_out, retain_graph=True))

        def forward_backward():
            out = function(*leaves)
            return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))

        return forward_backward

    def to_numpy(self, outputs):
        return [None if o is None else o.detach().numpy() for o in outputs]


class RecomputeBackend(LinmapsBackend):
    """``cpp-recompute``: the compiled backend with nothing kept from forward to backward (a
    bilinear fwd+bwd computes T twice: 8 units of N*L*in1*in2 multiply-adds instead of 6)."""

    def __init__(self):
        super().__init__("cpp", keep_bytes=0)
        self.name = "cpp-recompute"

    def unavailable_reason(self):
        return LinmapsBackend("cpp").unavailable_reason()


class JaxBackend(Backend):
    """JAX (``jax.jit`` on CPU), a peer for the bilinear map; optional, never a dependency.

    The bilinear map in its GEMM form (``T = P @ A_hat``, then a row-wise product with Q, as
    linmaps computes it): faster under ``jit`` than ``jnp.einsum`` at every suite shape
    (measured: 1.1-1.5x, docs/performance.md). fwd+bwd is one jitted ``jax.vjp`` (XLA keeps T
    as a residual); backward alone is the jitted vjp of given inputs. Compiled in
    ``operation``, before the timed region; every call waits for its results.
    """

    name = "jax"
    builtin = True

    def unavailable_reason(self):
        try:
            importlib.import_module("jax")
        except Exception as exc:  # not installed, or a broken install: either way unavailable
            return f"{type(exc).__name__}: {exc} (optional: pip install jax jaxlib)"
        return None

    def worker_env(self):
        return {"JAX_PLATFORMS": "cpu"}

    def info(self):
        import jax

        # XLA's CPU thread pool takes every core and cannot be resized once started, so
        # --threads does not apply to JAX: compare at --threads equal to the core count.
        return {"version": jax.__version__, "threads": os.cpu_count()}

    def prepare(self, case, inputs):
        import jax.numpy as jnp

        return {name: jnp.asarray(array) for name, array in inputs.items()}

    @staticmethod
    def _bilinear(x1, x2, weight, bias):
        import jax.numpy as jnp

        out, in1, in2 = weight.shape
        if in2 > in1:
            a_hat, p_in, q_in = jnp.transpose(weight, (2, 0, 1)).reshape(in2, out * in1), x2, x1
        else:
            a_hat, p_in, q_in = jnp.transpose(weight, (1, 0, 2)).reshape(in1, out * in2), x1, x2
        t = (p_in @ a_hat).reshape(p_in.shape[0], out, q_in.shape[1])
        return jnp.einsum("nlq,nq->nl", t, q_in) + bias

    @staticmethod
    def _linear(x, weight, bias):
        return x @ weight.T + bias

    def operation(self, case, op, prepared):
        import jax

        if case.kind == "linear":
            function, names = self._linear, ["x", "weight", "bias"]
        else:
            function, names = self._bilinear, ["x1", "x2", "weight", "bias"]
        args = [prepared[name] for name in names]
        grad_out = prepared["grad_out"]

        def forward(*args):
            return (function(*args),)

        def backward(grad, *args):
            _, vjp = jax.vjp(function, *args)
            return vjp(grad)[: len(args)]

        def forward_backward(grad, *args):
            out, vjp = jax.vjp(function, *args)
            return (out, *vjp(grad))

        if op == "forward":
            compiled, call_args = jax.jit(forward), args
        else:
            compiled = jax.jit(backward if op == "backward" else forward_backward)
            call_args = [grad_out, *args]
        jax.block_until_ready(compiled(*call_args))  # compile now, outside every timing
        return lambda: jax.block_until_ready(compiled(*call_args))

    def to_numpy(self, outputs):
        return [None if o is None else np.asarray(o) for o in outputs]


class ThreadCountBackend(Backend):
    """``NAME/T``: backend ``NAME`` with ``T`` threads, whatever the suite's ``--threads``.

    Listed next to ``NAME`` (``--backends cpp,cpp/1``), one run measures the thread scaling:
    the summary's ``cpp vs cpp/1`` column is the speed-up of ``--threads`` over one thread,
    both timed in the same run.
    """

    def __init__(self, base: Backend, threads: int):
        self.base, self.threads = base, threads
        self.name = f"{base.name}/{threads}"
        self.builtin = base.builtin
        self.runs_mixed = base.runs_mixed

    def unavailable_reason(self):
        return self.base.unavailable_reason()

    def worker_env(self):
        return self.base.worker_env()

    def info(self):
        return self.base.info()

    def set_num_threads(self, n):
        self.base.set_num_threads(n)

    def threads_for(self, suite_threads):
        return self.threads

    def prepare(self, case, inputs):
        return self.base.prepare(case, inputs)

    def operation(self, case, op, prepared):
        return self.base.operation(case, op, prepared)

    def context(self, op):
        return self.base.context(op)

    def to_numpy(self, outputs):
        return self.base.to_numpy(outputs)


BACKENDS: dict = {}
# The backends a run uses when none are named (``--backends``' default), in this order.
DEFAULT_BACKENDS: list = []


def register_backend(backend: Backend, default: bool = False) -> None:
    """Add (or replace) a backend in the registry under ``backend.name``; ``default=True``
    also puts it in the runs that name no backends (:data:`DEFAULT_BACKENDS`)."""
    BACKENDS[backend.name] = backend
    if default and backend.name not in DEFAULT_BACKENDS:
        DEFAULT_BACKENDS.append(backend.name)


def lookup_backend(name: str) -> Backend:
    """The registered backend ``name``; ``cpp@LEVEL`` and ``NAME/T`` ones are made on first use."""
    if name not in BACKENDS:
        base_name, slash, threads = name.rpartition("/")
        if slash and threads.isdigit() and int(threads) >= 1:
            register_backend(ThreadCountBackend(lookup_backend(base_name), int(threads)))
        elif name.startswith("cpp@"):
            register_backend(CpuLevelBackend(name[len("cpp@") :]))
    if name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; known: {', '.join(BACKENDS)}, cpp@LEVEL, NAME/THREADS"
        )
    return BACKENDS[name]


def resolve_backends(backends) -> list:
    """Backends given by name or as objects, as objects; a name listed twice is an error."""
    resolved = [lookup_backend(b) if isinstance(b, str) else b for b in backends]
    if len({b.name for b in resolved}) != len(resolved):
        raise ValueError("a backend is listed twice")
    return resolved


# The builtin backends. A new one: its class above, and one line here.
register_backend(LinmapsBackend("cpp"), default=True)
register_backend(LinmapsBackend("python"), default=True)
register_backend(TorchBackend(), default=True)
register_backend(RecomputeBackend(), default=True)
register_backend(JaxBackend(), default=True)
