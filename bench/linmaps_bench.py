"""The linmaps benchmark harness: cases, backends, correctness checks, timing, memory, records.

``bench/run.py`` is the command line; this module holds the logic so that it can be imported
and tested. The flow of :func:`run_suite`:

1. Each backend of the registry (:data:`BACKENDS`: ``cpp``, ``python``, ``torch``, plus any
   added with :func:`register_backend`) is started in a worker process of its own
   (:class:`BackendSession`); one that cannot run there is recorded as unavailable, never as
   an error. Separate processes, used one at a time, matter: NumPy's OpenBLAS threads keep
   spinning for ~0.15 s after a call, and on a 2-core machine torch's calls in that window ran
   2-5x slower; interleaving libraries in one process would bias every comparison.
2. Every backend gets the same thread count (linmaps' OpenMP, NumPy's BLAS pool through
   threadpoolctl, ``torch.set_num_threads``).
3. Per case, this process computes the float64 oracle with the NumPy backend; then, one
   backend after the other, the worker makes the same seeded inputs, runs each operation once
   and sends the result back; a result outside the rounding tolerance is recorded as an error
   and not timed. A correct one is warmed up and timed in the worker.
4. The reference rate, a 2048x2048 ``numpy.matmul``, is timed at the start and at the end.
5. The first (checked) backward call of each case doubles as the measurement of the
   backend's peak extra memory in its worker (see :data:`MEMORY_METHOD`).
6. The mixed cases (:class:`MixedCase`) run after the others, on the linmaps backends only:
   the worker runs one training step that alternates NumPy products and linmaps calls
   (:class:`MixedStep`), sends its outputs back for the check (:func:`check_mixed`), then
   times the NumPy part, the linmaps part and the alternating step in rounds
   (:func:`time_mixed`); the record's ``ratio`` is ``(t_numpy + t_linmaps) / t_alternating``.

The result is one JSON-ready dict (:data:`SCHEMA`); ``bench_report`` turns it into tables and
a chart.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import platform
import re
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

with warnings.catch_warnings():
    # Without the compiled module linmaps warns at import; the harness reports "cpp" as
    # unavailable (with the reason) instead.
    warnings.simplefilter("ignore", RuntimeWarning)
    import linmaps

SCHEMA = "linmaps-bench/1"
OPS = ("forward", "backward", "fwd+bwd")
DTYPES = ("float32", "float64")

# Flops per operation as a multiple of prod(dims) = N*in*out (linear) or N*in1*in2*out
# (bilinear), the counts of shared/spec/maps.md. Bias terms are not counted.
FLOP_FACTORS = {
    "linear": {"forward": 2, "backward": 4, "fwd+bwd": 6},
    "bilinear": {"forward": 2, "backward": 6, "fwd+bwd": 8},
}

# A correct result differs from the float64 oracle by rounding only. For a sum of K terms the
# worst-case bound is ~K*eps*magnitude, too loose to catch anything at K = 512*512 in float32;
# the usual probabilistic bound (Higham, "Accuracy and Stability", 3.1) replaces K by sqrt(K).
# TOLERANCE_FACTOR is its safety margin: a wrong transpose or a missing term is off by O(1)
# relative to the values, hundreds of times beyond this.
TOLERANCE_FACTOR = 4.0

REFERENCE_GEMM_SIZE = 2048


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One problem size. ``dims`` is ``(N, in, out)`` for linear, ``(N, in1, in2, out)`` for
    bilinear: the order of the issue's tables."""

    kind: str
    dims: tuple

    def __post_init__(self):
        if self.kind not in FLOP_FACTORS:
            raise ValueError(f"unknown case kind {self.kind!r}; expected 'linear' or 'bilinear'")
        expected = 3 if self.kind == "linear" else 4
        if len(self.dims) != expected or any(int(d) < 1 for d in self.dims):
            raise ValueError(f"a {self.kind} case needs {expected} positive sizes, got {self.dims}")

    @property
    def id(self) -> str:
        return f"{self.kind}-" + "x".join(map(str, self.dims))

    @property
    def batch(self) -> int:
        return self.dims[0]

    @property
    def out_features(self) -> int:
        return self.dims[-1]

    def describe(self) -> str:
        names = ("N", "in", "out") if self.kind == "linear" else ("N", "in1", "in2", "out")
        return " ".join(f"{name}={size}" for name, size in zip(names, self.dims))

    def flops(self, op: str) -> int:
        return FLOP_FACTORS[self.kind][op] * math.prod(self.dims)

    def input_shapes(self) -> dict:
        if self.kind == "linear":
            n, n_in, n_out = self.dims
            return {
                "x": (n, n_in),
                "weight": (n_out, n_in),
                "bias": (n_out,),
                "grad_out": (n, n_out),
            }
        n, in1, in2, n_out = self.dims
        return {
            "x1": (n, in1),
            "x2": (n, in2),
            "weight": (n_out, in1, in2),
            "bias": (n_out,),
            "grad_out": (n, n_out),
        }

    def output_names(self, op: str) -> tuple:
        forward = ("y",) if self.kind == "linear" else ("z",)
        backward = (
            ("grad_x", "grad_weight", "grad_bias")
            if self.kind == "linear"
            else ("grad_x1", "grad_x2", "grad_weight", "grad_bias")
        )
        return {"forward": forward, "backward": backward, "fwd+bwd": forward + backward}[op]

    def sum_lengths(self) -> dict:
        """Number of terms summed into one entry of each output (K of the tolerance)."""
        if self.kind == "linear":
            n, n_in, n_out = self.dims
            return {"y": n_in, "grad_x": n_out, "grad_weight": n, "grad_bias": n}
        n, in1, in2, n_out = self.dims
        return {
            "z": in1 * in2,
            "grad_x1": n_out * in2,
            "grad_x2": n_out * in1,
            "grad_weight": n,
            "grad_bias": n,
        }

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "dims": list(self.dims),
            "description": self.describe(),
        }


@dataclass(frozen=True)
class MixedCase:
    """One training step of a small NumPy model that alternates NumPy products and linmaps.

    ``dims`` is ``(N, in, hidden, in2, out)``: a NumPy ``Linear``-like layer ``in -> hidden``
    on a batch of ``N`` (``x @ W.T``, ReLU, and its weight gradient as a NumPy product) feeding
    a linmaps bilinear layer ``(hidden x in2) -> out`` (forward and backward). ``name`` gives
    the default cases their ids (``mixed-long``); a custom size is ``mixed-NxINxHxIN2xOUT``.
    """

    dims: tuple
    name: str | None = None

    kind = "mixed"  # not a field: the same for every mixed case
    names = ("N", "in", "hidden", "in2", "out")

    def __post_init__(self):
        if len(self.dims) != 5 or any(int(d) < 1 for d in self.dims):
            raise ValueError(f"a mixed case needs 5 positive sizes, got {self.dims}")

    @property
    def id(self) -> str:
        return f"mixed-{self.name}" if self.name else "mixed-" + "x".join(map(str, self.dims))

    def describe(self) -> str:
        n, n_in, hidden, in2, n_out = self.dims
        return (
            f"N={n}; NumPy layer {n_in}->{hidden} (x @ W.T, ReLU, weight gradient), "
            f"linmaps bilinear {hidden}x{in2}->{n_out} (forward, backward)"
        )

    def flops(self) -> dict:
        """Nominal flops of each part of one step: two NumPy products; the bilinear forward
        and its backward without ``grad_x2`` (``grad_x1`` and ``grad_weight``)."""
        n, n_in, hidden, in2, n_out = self.dims
        return {"numpy": 4 * n * n_in * hidden, "linmaps": 6 * n * hidden * in2 * n_out}

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "dims": list(self.dims),
            "dim_names": list(self.names),
            "description": self.describe(),
            "flops": self.flops(),
        }


DEFAULT_CASES = (
    Case("bilinear", (1, 16, 16, 8)),
    Case("bilinear", (256, 64, 64, 64)),
    Case("bilinear", (1024, 128, 128, 64)),
    Case("bilinear", (4096, 64, 64, 32)),
    Case("bilinear", (512, 256, 256, 16)),
    Case("bilinear", (64, 512, 512, 8)),
    Case("linear", (1, 64, 64)),
    Case("linear", (256, 512, 512)),
    Case("linear", (4096, 1024, 1024)),
    Case("linear", (64, 4096, 4096)),
    Case("linear", (16384, 128, 128)),
    # A training step alternating NumPy and linmaps, each part 1-20 ms ...
    MixedCase((1024, 1024, 128, 64, 32), "long"),
    # ... and with short calls, each part tens of microseconds.
    MixedCase((32, 64, 64, 64, 8), "short"),
)
KINDS = ("linear", "bilinear", "mixed")

_CUSTOM_CASE = re.compile(r"^(linear|bilinear|mixed):(\d+(?:x\d+)+)$")


def _case_matches(case, token: str) -> bool:
    if token in KINDS:
        return case.kind == token
    if token.startswith(KINDS):  # "linear-1x" must not pick "bilinear-1x..."
        return case.id.startswith(token)
    return token in case.id


def select_cases(spec: str | None, cases=DEFAULT_CASES) -> list:
    """The cases named by ``spec``, a comma-separated list of tokens, in ``cases`` order.

    A token is a kind (``linear``, ``bilinear`` or ``mixed``: every case of that kind), a
    custom size (``bilinear:8x4x4x2``, ``linear:8x16x4``, ``mixed:8x16x8x4x2``, added after the
    defaults) or any part of a case id (``1024x``; a part that starts with a kind,
    ``linear-1x``, must start the id). ``None`` or an empty spec selects every case.
    """
    if not spec or not spec.strip():
        return list(cases)
    chosen, custom = [], []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        match = _CUSTOM_CASE.match(token)
        if match:
            kind, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
            custom.append(MixedCase(dims) if kind == "mixed" else Case(kind, dims))
            continue
        hits = [c for c in cases if _case_matches(c, token)]
        if not hits:
            raise ValueError(
                f"--cases: {token!r} matches no case; the cases are "
                f"{', '.join(c.id for c in cases)} (or give one as "
                "'bilinear:NxIN1xIN2xOUT' / 'linear:NxINxOUT' / 'mixed:NxINxHIDDENxIN2xOUT')"
            )
        chosen.extend(hits)
    picked = [c for c in cases if c in chosen] + custom
    return list(dict.fromkeys(picked))  # drop repeats, keep order


def make_inputs(case: Case, dtype, seed: int = 0) -> dict:
    """Seeded random inputs; weights scaled like PyTorch's default init so outputs are O(1)."""
    # The case id feeds the seed so that every process (the oracle's, each backend's worker)
    # sees the same numbers for a case whatever the selection.
    rng = np.random.default_rng([seed, zlib.crc32(case.id.encode())])
    dtype = np.dtype(dtype)
    fan_in = math.prod(case.dims[1:-1])
    inputs = {}
    for name, shape in case.input_shapes().items():
        scale = 1.0 / math.sqrt(fan_in) if name in ("weight", "bias") else 1.0
        array = rng.standard_normal(shape, dtype=dtype)  # float32 directly: half the time
        array *= scale
        inputs[name] = array
    return inputs


def make_mixed_inputs(case: MixedCase, dtype, seed: int = 0) -> dict:
    """Seeded inputs of a mixed case, all of ``dtype`` (weights scaled by 1/sqrt(fan-in))."""
    rng = np.random.default_rng([seed, zlib.crc32(case.id.encode())])
    dtype = np.dtype(dtype)
    n, n_in, hidden, in2, n_out = case.dims
    shapes = {
        "x": ((n, n_in), 1.0),
        "w1": ((hidden, n_in), 1.0 / math.sqrt(n_in)),
        "x2": ((n, in2), 1.0),
        "weight": ((n_out, hidden, in2), 1.0 / math.sqrt(hidden * in2)),
        "bias": ((n_out,), 1.0 / math.sqrt(hidden * in2)),
        "grad_z": ((n, n_out), 1.0),
    }
    inputs = {}
    for name, (shape, scale) in shapes.items():
        array = rng.standard_normal(shape, dtype=dtype)
        array *= scale  # in place: stays of ``dtype`` (``array / np.sqrt(k)`` would not, NEP 50)
        inputs[name] = array
    return inputs


class MixedStep:
    """One training step of a mixed case, as four calls that keep their results.

    NumPy part: ``numpy_forward`` (``pre = x @ W1.T``, ``h = relu(pre)``) and
    ``numpy_backward`` (``grad_W1 = (grad_h * (pre > 0)).T @ x``). linmaps part:
    ``linmaps_forward`` (``z = linmaps.bilinear(h, x2, A, b)``) and ``linmaps_backward``
    (``linmaps.bilinear_backward(grad_z, h, x2, A, need_x2=False)``: ``grad_h``, and the
    layer's weight and bias gradients). The alternating step runs them in a program's order;
    each part alone runs on the values the last step left (the same shapes and work).
    """

    output_names = ("pre", "z", "grad_h", "grad_weight", "grad_w1")

    def __init__(self, inputs: dict):
        self.inputs = inputs
        self.pre = self.h = self.mask = self.z = self.grad_h = None
        self.grad_weight = self.grad_bias = self.grad_w1 = None
        self.parts = {
            "numpy": (self.numpy_forward, self.numpy_backward),
            "linmaps": (self.linmaps_forward, self.linmaps_backward),
            "alternating": (
                self.numpy_forward,
                self.linmaps_forward,
                self.linmaps_backward,
                self.numpy_backward,
            ),
        }

    def numpy_forward(self) -> None:
        a = self.inputs
        self.pre = a["x"] @ a["w1"].T
        self.h = np.maximum(self.pre, 0)
        self.mask = self.pre > 0

    def numpy_backward(self) -> None:
        self.grad_w1 = (self.grad_h * self.mask).T @ self.inputs["x"]

    def linmaps_forward(self) -> None:
        a = self.inputs
        self.z = linmaps.bilinear(self.h, a["x2"], a["weight"], a["bias"])

    def linmaps_backward(self) -> None:
        a = self.inputs
        grads = linmaps.bilinear_backward(a["grad_z"], self.h, a["x2"], a["weight"], need_x2=False)
        self.grad_h, self.grad_weight, self.grad_bias = (
            grads.grad_x1,
            grads.grad_weight,
            grads.grad_bias,
        )

    def run(self, part: str) -> None:
        for call in self.parts[part]:
            call()

    def outputs(self) -> list:
        return [getattr(self, name) for name in self.output_names]


# ----------------------------------------------------------------------------- backends


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
        a = prepared
        if case.kind == "linear":

            def forward():
                return (self._linear(a["x"], a["weight"], a["bias"]),)

            def backward():
                return tuple(self._linear_backward(a["grad_out"], a["x"], a["weight"]))
        else:

            def forward():
                return (self._bilinear(a["x1"], a["x2"], a["weight"], a["bias"]),)

            def backward():
                return tuple(self._bilinear_backward(a["grad_out"], a["x1"], a["x2"], a["weight"]))

        def forward_backward():
            return forward() + backward()

        return {"forward": forward, "backward": backward, "fwd+bwd": forward_backward}[op]


class LinmapsBackend(FunctionalBackend):
    """``linmaps``'s public functions with one of its backends (``cpp`` or ``python``) active."""

    builtin = True
    runs_mixed = True

    def __init__(self, name):
        super().__init__(
            name,
            linmaps.linear,
            linmaps.linear_backward,
            linmaps.bilinear,
            linmaps.bilinear_backward,
            context=lambda: linmaps.use_backend(name),
        )

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


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry under ``backend.name``."""
    BACKENDS[backend.name] = backend


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


for _builtin in (LinmapsBackend("cpp"), LinmapsBackend("python"), TorchBackend()):
    register_backend(_builtin)
del _builtin


# ----------------------------------------------------------------------------- oracle and check


@dataclass
class CheckResult:
    ok: bool
    message: str
    worst_error_vs_tolerance: float | None

    def to_json(self) -> dict:
        return {"passed": self.ok, "worst_error_vs_tolerance": self.worst_error_vs_tolerance}


class Oracle:
    """The right answer for one case, and the check of a backend's outputs against it.

    Every output (forward and backward) is computed once, in float64, by the NumPy backend,
    together with its magnitude: the same map applied to the absolute values of the inputs.
    Every output is a sum of products of inputs, so the magnitude is the sum of the absolute
    values of its terms, the scale of its rounding error. An entry passes when

        |result - oracle| <= TOLERANCE_FACTOR * (sqrt(K) + 2) * eps * magnitude
                             + eps * |oracle| + (K + 2) * tiny

    with ``K`` the number of terms of the entry (``Case.sum_lengths``), ``eps`` and ``tiny``
    those of the benchmark's dtype. The tolerances are computed once and shared by every
    backend and operation.
    """

    def __init__(self, case: Case, inputs: dict, dtype):
        self.case = case
        exact = {name: a.astype(np.float64) for name, a in inputs.items()}
        absolute = {name: np.abs(a) for name, a in exact.items()}
        python = FunctionalBackend(
            "oracle",
            linmaps.linear,
            linmaps.linear_backward,
            linmaps.bilinear,
            linmaps.bilinear_backward,
        )
        with linmaps.use_backend("python"):
            values = python.operation(case, "fwd+bwd", exact)()
            magnitudes = python.operation(case, "fwd+bwd", absolute)()
        lengths = case.sum_lengths()
        self.expected = {
            name: _expected(value, magnitude, lengths[name], dtype)
            for name, value, magnitude in zip(case.output_names("fwd+bwd"), values, magnitudes)
        }

    def check(self, op: str, outputs) -> CheckResult:
        """Compare a backend's outputs for ``op`` (in ``Case.output_names(op)`` order)."""
        return check_outputs(self.expected, self.case.output_names(op), outputs)


def _expected(value, magnitude, k: int, dtype) -> tuple:
    """``(value, tolerance)`` of an output whose entries are sums of ``k`` terms (Oracle)."""
    finfo = np.finfo(dtype)
    tolerance = magnitude * (TOLERANCE_FACTOR * (math.sqrt(k) + 2) * finfo.eps)
    tolerance += finfo.eps * np.abs(value)
    tolerance += (k + 2) * finfo.tiny
    return value, tolerance


def check_outputs(expected: dict, names, outputs) -> CheckResult:
    """Compare ``outputs`` (in ``names`` order) with ``expected[name] = (value, tolerance)``."""
    if len(outputs) != len(names):
        return CheckResult(
            False,
            f"expected {len(names)} outputs ({', '.join(names)}), got {len(outputs)}",
            None,
        )
    worst = 0.0
    for name, actual in zip(names, outputs):
        if actual is None:
            return CheckResult(False, f"{name}: missing (None)", None)
        value, tolerance = expected[name]
        if actual.shape != value.shape:
            return CheckResult(False, f"{name}: shape {actual.shape}, expected {value.shape}", None)
        ratio = actual.astype(np.float64)  # in place from here: outputs reach 16M entries
        ratio -= value
        np.abs(ratio, out=ratio)
        ratio /= tolerance
        if not np.isfinite(ratio).all():  # NaN or inf where the oracle is finite
            bad = int(np.count_nonzero(~np.isfinite(ratio)))
            return CheckResult(False, f"wrong result: {name}: {bad} non-finite entries", None)
        if ratio.size == 0:
            continue
        index = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        worst_here = float(ratio[index])
        worst = max(worst, worst_here)
        if worst_here > 1:
            bad = int(np.count_nonzero(ratio > 1))
            return CheckResult(
                False,
                f"wrong result: {name}: {bad} of {ratio.size} entries outside the "
                f"tolerance; worst at {tuple(map(int, index))}: got {actual[index]:.6g}, "
                f"expected {value[index]:.6g} ({worst_here:.3g}x the tolerance)",
                worst_here,
            )
    return CheckResult(True, "", worst)


def check_mixed(case: MixedCase, inputs: dict, outputs) -> CheckResult:
    """Check the outputs of one alternating step (``MixedStep.output_names`` order).

    Each stage is checked against float64 NumPy (linmaps' python backend) applied to the
    stage's own inputs as the backend computed them (its ``pre``, hence ``h`` and the ReLU
    mask, and its ``grad_h``), with the tolerance of :class:`Oracle`: a ReLU mask that rounding
    flips near 0 does not count as an error, while a wrong NumPy product (say, a BLAS job run
    twice or not at all on linmaps' threads) or a wrong linmaps result does.
    """
    names = MixedStep.output_names
    if len(outputs) != len(names) or any(o is None for o in outputs):
        return check_outputs({}, names, outputs)
    dtype = inputs["x"].dtype
    a = {name: array.astype(np.float64) for name, array in inputs.items()}
    got = dict(zip(names, outputs))
    n, n_in, hidden, in2, n_out = case.dims
    for name in ("pre", "grad_h"):  # the inputs of the later stages' oracles
        if got[name].shape != (n, hidden):
            return CheckResult(
                False, f"{name}: shape {got[name].shape}, expected {(n, hidden)}", None
            )
    absolute = {name: np.abs(array) for name, array in a.items()}
    expected = {"pre": _expected(a["x"] @ a["w1"].T, absolute["x"] @ absolute["w1"].T, n_in, dtype)}
    pre = got["pre"].astype(np.float64)
    h, mask = np.maximum(pre, 0), pre > 0
    with linmaps.use_backend("python"):
        z = linmaps.bilinear(h, a["x2"], a["weight"], a["bias"])
        z_mag = linmaps.bilinear(h, absolute["x2"], absolute["weight"], absolute["bias"])
        grads = linmaps.bilinear_backward(a["grad_z"], h, a["x2"], a["weight"], need_x2=False)
        mags = linmaps.bilinear_backward(
            absolute["grad_z"], h, absolute["x2"], absolute["weight"], need_x2=False
        )
    grad_h = got["grad_h"].astype(np.float64) * mask
    expected.update(
        z=_expected(z, z_mag, hidden * in2, dtype),
        grad_h=_expected(grads.grad_x1, mags.grad_x1, n_out * in2, dtype),
        grad_weight=_expected(grads.grad_weight, mags.grad_weight, n, dtype),
        grad_w1=_expected(grad_h.T @ a["x"], np.abs(grad_h).T @ absolute["x"], n, dtype),
    )
    return check_outputs(expected, names, outputs)


# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """How much to measure. :func:`Settings.for_mode` gives the full and ``--quick`` presets."""

    dtype: str = "float32"
    threads: int = 1
    ops: tuple = OPS
    repeat: int = 15  # timed samples per measurement, at most
    min_samples: int = 5  # ... and at least, whatever the time budget
    budget_s: float = 1.5  # no more samples once this much time went into one measurement
    min_sample_s: float = 0.02  # a sample loops over the call until it lasts this long
    extra_warmup: bool = True  # an untimed call after the first (checked) call, always
    # --quick only: a call slower than this is timed once, by its checked first call. The
    # worker's pools are already warm (tiny problems at start), so at these durations the
    # first call's extra cost (fresh pages) is a few percent; repeating torch's bilinear
    # backward (seconds per call) would take most of the run.
    first_call_is_sample_above_s: float | None = None
    gemm_repeats: int = 5  # reference GEMM samples at the start, and again at the end
    gemm_size: int = REFERENCE_GEMM_SIZE
    # Idle BLAS/OpenMP threads keep spinning for ~0.15 s after a call and would steal the
    # cores from the next backend; the harness pauses this long before switching backends.
    settle_s: float = 0.25
    # Mixed cases: rounds of (NumPy part, linmaps part, alternating step), each timed over
    # at least mixed_measure_s and mixed_min_steps steps, after a settle_s pause and
    # mixed_warmup_steps untimed steps.
    mixed_rounds: int = 5
    mixed_measure_s: float = 0.1
    mixed_min_steps: int = 5
    mixed_warmup_steps: int = 3
    measure_memory: bool = True
    isolate: bool = True  # time each builtin backend in its own worker process
    worker_timeout_s: float = 1800.0
    quick: bool = False
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool, **overrides) -> Settings:
        if quick:
            # min_samples 1: a call slower than the budget (torch's bilinear backward takes
            # seconds) gets one timed sample after its checked first call, not three.
            preset = {
                "repeat": 5,
                "min_samples": 1,
                "budget_s": 0.3,
                "min_sample_s": 0.005,
                "extra_warmup": False,
                "first_call_is_sample_above_s": 1.0,
                "gemm_repeats": 2,
                "settle_s": 0.15,
                "mixed_rounds": 3,
                "mixed_measure_s": 0.02,
                "mixed_min_steps": 3,
                "quick": True,
            }
        else:
            preset = {}
        preset.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**preset)
        settings.min_samples = max(1, min(settings.min_samples, settings.repeat))
        return settings


# ----------------------------------------------------------------------------- timing


def _time_calls(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def summarize(samples) -> dict:
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    return {
        "median_s": float(median),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "min_s": float(min(samples)),
        "max_s": float(max(samples)),
        "n_samples": len(samples),
        "samples_s": [float(s) for s in samples],
    }


def time_operation(fn, context, first_call_s: float, settings: Settings) -> dict:
    """Warm up, calibrate, then take the samples of one operation; seconds per call.

    A sample loops over the call ``calls_per_sample`` times (so that microsecond calls are not
    lost in the timer's resolution) and reports the mean of the loop; the samples' median and
    quartiles are what the tables show.
    """
    threshold = settings.first_call_is_sample_above_s
    if threshold is not None and first_call_s > threshold:
        return {"calls_per_sample": 1, "first_call_only": True, **summarize([first_call_s])}
    with context():
        per_call = first_call_s
        # The first call paid one-time costs (page faults, lazy init). A second, untimed call
        # is skipped only with --quick and only when it would be expensive.
        if settings.extra_warmup or per_call < 0.1:
            per_call = _time_calls(fn, 1)
        number = max(1, min(100_000, math.ceil(settings.min_sample_s / max(per_call, 1e-9))))
        if number > 1:  # a single short call is a noisy estimate; refine it on a loop
            per_call = _time_calls(fn, number)
            number = max(1, min(100_000, math.ceil(settings.min_sample_s / max(per_call, 1e-9))))
    affordable = int(settings.budget_s // (per_call * number))
    target = max(settings.min_samples, min(settings.repeat, affordable))
    samples = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # like timeit: a collection in the middle of a sample is not the kernel's cost
    try:
        for _ in range(target):
            with context():
                samples.append(_time_calls(fn, number))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"calls_per_sample": number, "first_call_only": False, **summarize(samples)}


MIXED_PARTS = ("numpy", "linmaps", "alternating")


def time_mixed(step: MixedStep, settings: Settings) -> dict:
    """Time the NumPy part, the linmaps part and the alternating step of ``step``, in rounds.

    Each round times the three one after the other (the order rotates from round to round).
    Each measurement starts with a ``settle_s`` pause, so that the threads of the one before
    are idle (OpenBLAS's own threads would otherwise spin into a part timed "alone"), then
    ``mixed_warmup_steps`` untimed steps bring the pools to this loop's steady state; then at
    least ``mixed_min_steps`` steps and ``mixed_measure_s`` seconds of steps, each timed on
    its own. The round's figure is their median; the result is the median over the rounds,
    and ``ratio = (t_numpy + t_linmaps) / t_alternating`` of those medians.
    """
    per_step = {}
    for part in MIXED_PARTS:  # warm-up and calibration
        step.run(part)
        per_step[part] = _time_calls(lambda part=part: step.run(part), 2)
    steps = {
        part: max(settings.mixed_min_steps, min(100_000, math.ceil(settings.mixed_measure_s / t)))
        for part, t in per_step.items()
    }
    rounds = {part: [] for part in MIXED_PARTS}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(settings.mixed_rounds):
            shift = r % len(MIXED_PARTS)
            for part in MIXED_PARTS[shift:] + MIXED_PARTS[:shift]:
                calls = step.parts[part]
                time.sleep(settings.settle_s)
                for _ in range(settings.mixed_warmup_steps):
                    for call in calls:
                        call()
                times = []
                for _ in range(steps[part]):
                    start = time.perf_counter()
                    for call in calls:
                        call()
                    times.append(time.perf_counter() - start)
                rounds[part].append(float(np.median(times)))
    finally:
        if gc_was_enabled:
            gc.enable()
    return mixed_stats(rounds, steps)


def mixed_stats(rounds: dict, steps: dict) -> dict:
    """The record of a mixed case's timing from its per-round medians (seconds per step)."""
    t = {part: float(np.median(rounds[part])) for part in MIXED_PARTS}
    per_round = [
        (n + l) / m for n, l, m in zip(rounds["numpy"], rounds["linmaps"], rounds["alternating"])
    ]
    return {
        "t_numpy_s": t["numpy"],
        "t_linmaps_s": t["linmaps"],
        "t_alternating_s": t["alternating"],
        "ratio": (t["numpy"] + t["linmaps"]) / t["alternating"],
        "ratio_rounds": per_round,
        "n_rounds": len(per_round),
        "rounds_s": {part: list(rounds[part]) for part in MIXED_PARTS},
        "steps_per_round": dict(steps),
    }


def measure_gemm(dtype, repeats: int, size: int = REFERENCE_GEMM_SIZE) -> list:
    """Seconds per ``numpy.matmul`` of two ``size x size`` matrices, ``repeats`` samples."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    c = np.empty_like(a)
    np.matmul(a, b, out=c)  # warm-up: BLAS buffers and threads
    return [_time_calls(lambda: np.matmul(a, b, out=c), 1) for _ in range(repeats)]


# ----------------------------------------------------------------------------- threads


def apply_threads(threads: int, backends=()):
    """Give linmaps, NumPy's BLAS and every backend ``threads`` threads.

    Returns ``(report, restore)``: what each library now reports, and a function that puts
    linmaps' and the native pools' previous sizes back (for in-process callers such as tests).
    """
    report = {"requested": threads}
    previous_linmaps = linmaps.get_num_threads()
    limiter = None
    try:
        import threadpoolctl
    except ImportError:
        report["threadpoolctl"] = (
            "not installed: NumPy's BLAS pool follows the environment "
            "(bench/run.py sets OPENBLAS_NUM_THREADS and friends)"
        )
    else:
        limiter = threadpoolctl.threadpool_limits(limits=threads)
        report["threadpoolctl"] = threadpoolctl.__version__
    linmaps.set_num_threads(threads)
    for backend in backends:
        backend.set_num_threads(threads)
    report["linmaps"] = linmaps.get_num_threads()
    report["pools"] = thread_pools()

    def restore():
        if limiter is not None:
            limiter.restore_original_limits()
        linmaps.set_num_threads(previous_linmaps)

    return report, restore


def thread_pools() -> list:
    """The native thread pools threadpoolctl sees (BLAS, OpenMP), with their sizes."""
    try:
        import threadpoolctl
    except ImportError:
        return []
    keep = (
        "user_api",
        "internal_api",
        "version",
        "num_threads",
        "threading_layer",
        "architecture",
        "prefix",
    )
    return [{k: pool.get(k) for k in keep if k in pool} for pool in threadpoolctl.threadpool_info()]


# Variables that change how idle BLAS and OpenMP threads wait, or who runs NumPy's BLAS calls.
# The harness sets none of them: the mixed cases measure the environment a program gets by
# default (and record any of these it inherited from the caller's environment).
MIXED_ENV_VARIABLES = (
    "OPENBLAS_THREAD_TIMEOUT",
    "GOMP_SPINCOUNT",
    "OMP_WAIT_POLICY",
    "LINMAPS_BLAS_THREADS",
)


def mixed_environment() -> dict:
    """How this process's thread pools are set up, for the record of a mixed case."""
    from linmaps import _threads

    variables = {name: os.environ[name] for name in MIXED_ENV_VARIABLES if name in os.environ}
    return {
        "default": not variables,
        "variables": variables,
        "openmp_wait": _threads.wait_policy,
        "blas_threads": _threads.describe(),
        "linmaps_threads": linmaps.get_num_threads(),
        "blas_pools": [
            {k: pool.get(k) for k in ("internal_api", "version", "num_threads")}
            for pool in thread_pools()
            if pool.get("user_api") == "blas"
        ],
    }


# ----------------------------------------------------------------------------- memory

MEMORY_METHOD = (
    "peak RSS (VmHWM, reset through /proc/self/clear_refs) during the first, "
    "checked backward call of each case in the backend's own worker process, "
    "minus the RSS just before it (inputs made, pools warmed on tiny problems, "
    "torch's forward graph built, glibc's free heap pages handed back with "
    "malloc_trim so that memory freed earlier is not silently reused)"
)

_malloc_trim = None


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_accounting_problem() -> str | None:
    """None if this process can measure the peak RSS of a call, else why not."""
    global _malloc_trim
    try:
        _status_kib("VmRSS")
    except (OSError, ValueError):
        return "needs Linux's /proc/self/status"
    if not _reset_peak_rss():
        return "needs a writable /proc/self/clear_refs (Linux >= 4.0)"
    try:
        import ctypes

        _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return "needs glibc (malloc_trim)"
    return None


# ----------------------------------------------------------------------------- sessions


class BackendError(Exception):
    """The backend raised while running a case; the message is reported for that case."""


class WorkerFailed(Exception):
    """The worker process died, hung or could not start."""


class BackendSession:
    """One backend's side of the run: makes inputs, calls, times, measures memory.

    It runs in a worker process of its own (:func:`_worker_main`) so that no other library's
    thread pool shares the cores while it is timed, or in the harness's process for backends
    that a worker cannot rebuild (those registered at run time, e.g. a test's broken backend).
    Inputs are remade from the seed, so every session sees the numbers the oracle saw.
    """

    def __init__(
        self,
        backend: Backend,
        threads: int,
        dtype: str,
        seed: int,
        memory_problem: str | None = None,
    ):
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.reason = backend.unavailable_reason()
        self.threads = None
        self.memory_problem = memory_problem
        self._case, self._prepared, self._fns, self._mixed = None, None, {}, None
        if self.reason is None:
            self.threads = apply_threads(threads, [backend])[0]
            self._warm_up()
            self.memory_problem = memory_problem or _rss_accounting_problem()

    def _warm_up(self) -> None:
        """Start thread pools, BLAS buffers and lazy state on tiny problems, so that the first
        case's first call neither pays for them nor counts their memory."""
        for case in (Case("linear", (8, 8, 8)), Case("bilinear", (8, 8, 8, 2))):
            with contextlib.suppress(Exception):  # a failing backend is reported per case
                prepared = self.backend.prepare(case, make_inputs(case, self.dtype, self.seed))
                for op in ("forward", "backward"):
                    with self.backend.context(op):
                        self.backend.operation(case, op, prepared)()

    def describe(self) -> dict:
        if self.reason is not None:
            return {"available": False, "reason": self.reason}
        return {
            "available": True,
            "info": self.backend.info(),
            "threads": self.threads,
            "pid": os.getpid(),
        }

    def first_call(self, case: Case, op: str):
        """The first call of ``op`` on ``case``: ``(seconds, outputs, memory)``.

        The outputs go back for the check. For the backward operation the call is also the
        peak-memory measurement (``memory``, see :data:`MEMORY_METHOD`); None otherwise.
        """
        if self._case != case:
            self.end_case()
            self._prepared = self.backend.prepare(case, make_inputs(case, self.dtype, self.seed))
            self._case = case
        fn = self._fns[op] = self.backend.operation(case, op, self._prepared)
        measure = op == "backward" and self.memory_problem is None
        if measure:
            gc.collect()
            _malloc_trim(0)
            baseline_kib = _status_kib("VmRSS")
            _reset_peak_rss()
        with self.backend.context(op):
            start = time.perf_counter()
            outputs = fn()
            elapsed = time.perf_counter() - start
        memory = None
        if measure:
            peak_kib = _status_kib("VmHWM")
            memory = {
                "status": "ok",
                "backward_peak_extra_mib": max(0, peak_kib - baseline_kib) / 1024,
                "baseline_rss_mib": baseline_kib / 1024,
            }
        elif op == "backward":
            memory = {"status": "not measured", "reason": self.memory_problem}
        outputs = self.backend.to_numpy(outputs)
        if memory is not None:
            memory["backward_outputs_mib"] = sum(a.nbytes for a in outputs if a is not None) / 2**20
        return elapsed, outputs, memory

    def time_op(self, case: Case, op: str, first_call_s: float, settings: Settings) -> dict:
        if self._case != case or op not in self._fns:
            raise RuntimeError("time_op() needs first_call() on the same case and operation")
        return time_operation(
            self._fns[op], lambda: self.backend.context(op), first_call_s, settings
        )

    def mixed_first_step(self, case: MixedCase):
        """Make the inputs of ``case`` and run one alternating step: ``(seconds, outputs)``.

        The outputs (``MixedStep.output_names``) go back for the check."""
        if not self.backend.runs_mixed:
            raise RuntimeError(f"backend {self.backend.name!r} does not run the mixed cases")
        self.end_case()
        step = MixedStep(make_mixed_inputs(case, self.dtype, self.seed))
        with self.backend.context("fwd+bwd"):
            start = time.perf_counter()
            step.run("alternating")
            elapsed = time.perf_counter() - start
        self._case, self._mixed = case, step
        return elapsed, [None if o is None else np.asarray(o) for o in step.outputs()]

    def time_mixed(self, case: MixedCase, settings: Settings) -> dict:
        if self._case != case or self._mixed is None:
            raise RuntimeError("time_mixed() needs mixed_first_step() on the same case")
        with self.backend.context("fwd+bwd"):
            stats = time_mixed(self._mixed, settings)
        return {**stats, "environment": mixed_environment()}

    def end_case(self) -> None:
        self._case, self._prepared, self._fns, self._mixed = None, None, {}, None
        gc.collect()


def _worker_main(connection_fd: int) -> None:
    """Worker process: serve ``(method, args)`` requests with a :class:`BackendSession`.

    The first message says which backend to run and how; the socket is the process's only
    channel (stdout stays free for whatever the libraries print).
    """
    import signal
    from multiprocessing.connection import Connection

    # Ctrl-C reaches the whole process group; the harness handles it and closes the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(connection_fd)
    try:
        backend_name, threads, dtype, seed, memory_problem = conn.recv()
        session = BackendSession(lookup_backend(backend_name), threads, dtype, seed, memory_problem)
        conn.send(("ok", session.describe()))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            method, args = conn.recv()
        except EOFError:  # the harness went away
            return
        if method == "close":
            return
        try:
            conn.send(("ok", getattr(session, method)(*args)))
        except Exception as exc:  # reported by the harness for this case; keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _WorkerProxy:
    """The harness's handle on a worker process running one builtin backend.

    A plain ``python -c`` subprocess rather than ``multiprocessing``: a fresh interpreter with
    none of this process's threads or libraries, and no re-import of the caller's main module
    (which multiprocessing's "spawn" needs, and which fails for an unguarded script).
    """

    isolated = True

    def __init__(self, backend: Backend, settings: Settings):
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        self.name = backend.name
        self.timeout_s = settings.worker_timeout_s
        ours, theirs = socket.socketpair()
        module_dir = os.path.dirname(os.path.abspath(__file__))
        module_name = os.path.splitext(os.path.basename(__file__))[0]
        code = (
            f"import sys; sys.path.insert(0, {module_dir!r}); import {module_name}; "
            f"{module_name}._worker_main({theirs.fileno()})"
        )
        env = dict(os.environ)
        # The same linmaps (and torch) as this process, found the same way.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(backend.threads_for(settings.threads))  # pools sized from the start
        env.update(backend.worker_env())
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(
            (
                backend.name,
                backend.threads_for(settings.threads),
                settings.dtype,
                settings.seed,
                None if settings.measure_memory else "not requested (--no-memory)",
            )
        )
        self.description = None

    def wait_ready(self) -> dict:
        self.description = self._receive()
        return self.description

    def call(self, method: str, *args):
        try:
            self._conn.send((method, args))
        except OSError as exc:
            raise WorkerFailed(f"worker process is gone ({exc})") from None
        return self._receive()

    def _receive(self):
        if not self._conn.poll(self.timeout_s):
            self._process.kill()
            raise WorkerFailed(f"no answer from the worker within {self.timeout_s:.0f} s")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            code = self._process.wait(5)
            raise WorkerFailed(f"the worker process died (exit code {code})") from None
        if status == "error":
            raise BackendError(value)
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("close", ()))
        try:
            self._process.wait(10)
        except Exception:  # still busy in a long call: stop it
            self._process.kill()
            self._process.wait(5)
        self._conn.close()


class _LocalProxy:
    """A backend run in the harness's own process (same interface as :class:`_WorkerProxy`)."""

    isolated = False

    def __init__(self, backend: Backend, settings: Settings):
        self.name = backend.name
        self._session = BackendSession(
            backend,
            backend.threads_for(settings.threads),
            settings.dtype,
            settings.seed,
            memory_problem="runs in the harness's own process (a backend registered at run "
            "time), not a clean one",
        )
        self.description = None

    def wait_ready(self) -> dict:
        self.description = self._session.describe()
        return self.description

    def call(self, method: str, *args):
        try:
            return getattr(self._session, method)(*args)
        except Exception as exc:  # same contract as the worker: an error for this case only
            raise BackendError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._session.end_case()


def _start(backend: Backend, settings: Settings):
    proxy_class = _WorkerProxy if settings.isolate and backend.builtin else _LocalProxy
    return proxy_class(backend, settings)


# ----------------------------------------------------------------------------- machine


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    cpuinfo = ""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f,
    ):
        cpuinfo = f.read()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    cores = set(
        re.findall(r"^physical id\s*:\s*(\d+)$.*?^core id\s*:\s*(\d+)$", cpuinfo, re.M | re.S)
    )
    simd_flags = (
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "asimd",
        "sve",
    )
    cpu_flags = set(flags.group(1).split()) if flags else set()
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "physical_cores": len(cores) or None,
        "cpu_simd_flags": [f for f in simd_flags if f in cpu_flags],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions(backend_status: dict) -> dict:
    config = linmaps._config.config()
    torch_info = backend_status.get("torch", {}).get("info", {})
    result = {
        "linmaps": config.get("linmaps"),
        "linmaps_path": os.path.dirname(linmaps.__file__),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "torch": torch_info.get("version"),
        "compiled": config.get("compiled"),
        "compiler": config.get("compiler"),
        "cxx_flags": config.get("cxx_flags"),
        "eigen": config.get("eigen"),
        "openmp": config.get("openmp"),
        "build_simd": config.get("simd"),
        "blas": [p for p in thread_pools() if p.get("user_api") == "blas"],
    }
    with contextlib.suppress(ImportError):
        import threadpoolctl

        result["threadpoolctl"] = threadpoolctl.__version__
    with contextlib.suppress(ImportError):
        import matplotlib

        result["matplotlib"] = matplotlib.__version__
    return result


# ----------------------------------------------------------------------------- the suite


class Progress:
    """A one-line progress bar on stderr when it is a terminal.

    When stderr is a file or a pipe (CI logs) a bar redrawn with carriage returns is noise, so
    only the major steps (each case, the GEMM) get a plain line.
    """

    width = 28

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done = max(1, total), 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label: str, count: int = 1, major: bool = False) -> None:
        """Announce ``label`` (about to run); it accounts for ``count`` units of the total."""
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            if self.tty:
                filled = int(self.width * self.done / self.total)
                line = (
                    f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/"
                    f"{self.total} {elapsed:4.0f} s  {label}"
                )
                self.stream.write("\r" + line[:118].ljust(118))
                self.stream.flush()
            elif major:
                self.stream.write(f"[{self.done}/{self.total}, {elapsed:.0f} s] {label}\n")
                self.stream.flush()
        self.done += count

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 118 + "\r")
            self.stream.flush()


def _resolve_backends(backends) -> list:
    resolved = []
    for backend in backends:
        if isinstance(backend, str):
            backend = lookup_backend(backend)
        resolved.append(backend)
    if len({b.name for b in resolved}) != len(resolved):
        raise ValueError("a backend is listed twice")
    return resolved


class _Runners:
    """The started backends, restarting a worker that died so the next case still runs."""

    def __init__(self, backends: list, settings: Settings):
        self.settings = settings
        self.backends = {b.name: b for b in backends}
        self.status, self.proxies = {}, {}
        started = {b.name: _start(b, settings) for b in backends}  # imports run in parallel
        for name, proxy in started.items():
            try:
                description = proxy.wait_ready()
            except (WorkerFailed, BackendError) as exc:
                description = {"available": False, "reason": f"worker did not start: {exc}"}
            description["isolated"] = proxy.isolated
            self.status[name] = description
            if description["available"]:
                self.proxies[name] = proxy
            else:
                proxy.close()

    def call(self, name: str, method: str, *args):
        proxy = self.proxies.get(name)
        if proxy is None:
            raise WorkerFailed("the worker could not be restarted after an earlier failure")
        try:
            return proxy.call(method, *args)
        except WorkerFailed:
            proxy.close()
            self.proxies.pop(name)
            with contextlib.suppress(WorkerFailed, BackendError):
                replacement = _start(self.backends[name], self.settings)
                if replacement.wait_ready()["available"]:
                    self.proxies[name] = replacement
            self.status[name]["restarts"] = self.status[name].get("restarts", 0) + 1
            raise

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()


def _run_case(case: Case, runners: _Runners, settings: Settings, progress: Progress) -> dict:
    dtype = np.dtype(settings.dtype)
    progress.step(f"{case.id}: inputs and oracle", 0, major=True)
    oracle = Oracle(case, make_inputs(case, dtype, settings.seed), dtype)
    results, memory = {}, {}
    for name in list(runners.proxies):
        results[name] = {}
        memory[name] = {"status": "not measured", "reason": "the backward pass was not run"}
        time.sleep(settings.settle_s)  # let the oracle's / previous backend's threads go idle
        for op in settings.ops:
            progress.step(f"{case.id} {op} {name}")
            record = results[name][op] = {"flops": case.flops(op)}
            try:
                first_call_s, outputs, call_memory = runners.call(name, "first_call", case, op)
                check = oracle.check(op, outputs)
                del outputs
                record["check"] = check.to_json()
                if not check.ok:  # wrong: reported as an error, never timed
                    record.update(status="error", error=check.message)
                    if op == "backward":
                        memory[name]["reason"] = "wrong result"
                    continue
                if call_memory is not None:
                    memory[name] = call_memory
                stats = runners.call(name, "time_op", case, op, first_call_s, settings)
                record.update(status="ok", first_call_s=first_call_s, **stats)
            except BackendError as exc:
                record.update(status="error", error=str(exc))
            except WorkerFailed as exc:
                record.update(status="error", error=f"worker process failed: {exc}")
        with contextlib.suppress(WorkerFailed, BackendError):
            runners.call(name, "end_case")
    return {
        **case.to_json(),
        "flops": {op: case.flops(op) for op in settings.ops},
        "results": results,
        "memory": memory,
    }


def _run_mixed_case(case: MixedCase, runners: _Runners, settings: Settings, progress) -> dict:
    dtype = np.dtype(settings.dtype)
    progress.step(f"{case.id}: inputs", 0, major=True)
    inputs = make_mixed_inputs(case, dtype, settings.seed)
    results = {}
    for name in list(runners.proxies):
        if not runners.backends[name].runs_mixed:
            results[name] = {
                "status": "not applicable",
                "reason": "the mixed cases time linmaps' own functions in a NumPy program",
            }
            progress.step(f"{case.id} {name} (not applicable)")
            continue
        progress.step(f"{case.id} {name}")
        record = results[name] = {}
        time.sleep(settings.settle_s)  # let the previous backend's threads go idle
        try:
            first_step_s, outputs = runners.call(name, "mixed_first_step", case)
            check = check_mixed(case, inputs, outputs)
            del outputs
            record["check"] = check.to_json()
            if not check.ok:  # wrong: reported as an error, never timed
                record.update(status="error", error=check.message)
                continue
            stats = runners.call(name, "time_mixed", case, settings)
            record.update(status="ok", first_step_s=first_step_s, **stats)
        except BackendError as exc:
            record.update(status="error", error=str(exc))
        except WorkerFailed as exc:
            record.update(status="error", error=f"worker process failed: {exc}")
        finally:
            with contextlib.suppress(WorkerFailed, BackendError):
                runners.call(name, "end_case")
    return {**case.to_json(), "dtype": settings.dtype, "results": results}


def _add_rates(case_record: dict, gemm_gflops: float) -> None:
    for per_op in case_record["results"].values():
        for record in per_op.values():
            if record.get("status") == "ok":
                record["gflops"] = record["flops"] / record["median_s"] / 1e9
                record["gflops_iqr"] = [
                    record["flops"] / record["q3_s"] / 1e9,
                    record["flops"] / record["q1_s"] / 1e9,
                ]
                record["roofline_fraction"] = record["gflops"] / gemm_gflops


def _add_speedups(case_record: dict, ops) -> None:
    """``cpp_vs_<other>`` = other's median / cpp's median: above 1 means cpp is faster."""
    results = case_record["results"]
    speedups = {}
    for op in ops:
        speedups[op] = {}
        cpp = results.get("cpp", {}).get(op, {})
        for name, per_op in results.items():
            if name == "cpp":
                continue
            other = per_op.get(op, {})
            ok = cpp.get("status") == "ok" and other.get("status") == "ok"
            speedups[op][f"cpp_vs_{name}"] = other["median_s"] / cpp["median_s"] if ok else None
    case_record["speedups"] = speedups


def run_suite(
    cases,
    backends=("cpp", "python", "torch"),
    settings: Settings | None = None,
    progress: bool = True,
    command=None,
) -> dict:
    """Run the benchmark and return the record (the JSON document, see docs/benchmarks.md)."""
    settings = settings or Settings(threads=usable_cpus())
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {settings.dtype!r}")
    unknown_ops = set(settings.ops) - set(OPS)
    if unknown_ops:
        raise ValueError(f"unknown operations {sorted(unknown_ops)}; expected some of {OPS}")
    cases = list(cases)
    mixed_cases = [case for case in cases if case.kind == "mixed"]
    cases = [case for case in cases if case.kind != "mixed"]
    backends = _resolve_backends(backends)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = _load_average()
    threads, restore_threads = apply_threads(settings.threads)  # for the oracle and the GEMM

    runners = _Runners(backends, settings)
    n_ready = len(runners.proxies)
    total = (len(cases) * len(settings.ops) + len(mixed_cases)) * n_ready + 2
    bar = Progress(total, enabled=progress)
    try:
        bar.step("reference GEMM (start)", major=True)
        time.sleep(settings.settle_s)
        gemm_start = measure_gemm(settings.dtype, settings.gemm_repeats, settings.gemm_size)
        case_records = [_run_case(case, runners, settings, bar) for case in cases]
        mixed_records = [_run_mixed_case(case, runners, settings, bar) for case in mixed_cases]
        bar.step("reference GEMM (end)", major=True)
        time.sleep(settings.settle_s)
        gemm_end = measure_gemm(settings.dtype, settings.gemm_repeats, settings.gemm_size)
    finally:
        bar.close()
        runners.close()
        restore_threads()

    gemm = summarize(gemm_start + gemm_end)
    gemm_flops = 2 * settings.gemm_size**3
    gemm.update(
        size=settings.gemm_size,
        dtype=settings.dtype,
        flops=gemm_flops,
        gflops=gemm_flops / gemm["median_s"] / 1e9,
        gflops_start=gemm_flops / float(np.median(gemm_start)) / 1e9,
        gflops_end=gemm_flops / float(np.median(gemm_end)) / 1e9,
    )
    for record in case_records:
        for backend in backends:
            status = runners.status[backend.name]
            if not status["available"]:
                record["results"][backend.name] = {
                    op: {
                        "status": "unavailable",
                        "reason": status["reason"],
                        "flops": record["flops"][op],
                    }
                    for op in settings.ops
                }
        record["results"] = {b.name: record["results"][b.name] for b in backends}
        _add_rates(record, gemm["gflops"])
        _add_speedups(record, settings.ops)
    for record in mixed_records:
        for backend in backends:
            status = runners.status[backend.name]
            if not status["available"]:
                record["results"][backend.name] = {
                    "status": "unavailable",
                    "reason": status["reason"],
                }
        record["results"] = {b.name: record["results"][b.name] for b in backends}

    finished = datetime.datetime.now(datetime.timezone.utc)
    return {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round((finished - started).total_seconds(), 2),
        "command": command,
        "machine": {
            **machine_info(),
            "load_average_start": load_start,
            "load_average_end": _load_average(),
        },
        "versions": versions(runners.status),
        "settings": {
            "dtype": settings.dtype,
            "threads": settings.threads,
            "ops": list(settings.ops),
            "quick": settings.quick,
            "repeat": settings.repeat,
            "min_samples": settings.min_samples,
            "budget_s": settings.budget_s,
            "min_sample_s": settings.min_sample_s,
            "extra_warmup": settings.extra_warmup,
            "first_call_is_sample_above_s": settings.first_call_is_sample_above_s,
            "settle_s": settings.settle_s,
            "mixed_rounds": settings.mixed_rounds,
            "mixed_measure_s": settings.mixed_measure_s,
            "mixed_min_steps": settings.mixed_min_steps,
            "mixed_warmup_steps": settings.mixed_warmup_steps,
            "isolate": settings.isolate,
            "seed": settings.seed,
            "measure_memory": settings.measure_memory,
            "tolerance": f"|result - oracle| <= {TOLERANCE_FACTOR} * (sqrt(K) + 2) * eps * "
            "sum|terms| + eps * |oracle|, oracle = NumPy backend in float64",
            "memory_method": MEMORY_METHOD if settings.measure_memory else None,
        },
        "threads": threads,
        "backends": runners.status,
        "reference_gemm": gemm,
        "cases": case_records,
        "mixed": mixed_records,
    }


def has_errors(result: dict) -> bool:
    return any(
        record.get("status") == "error"
        for case in result["cases"]
        for per_op in case["results"].values()
        for record in per_op.values()
    ) or any(
        record.get("status") == "error"
        for case in result.get("mixed", [])
        for record in case["results"].values()
    )


def write_json(result: dict, path) -> str:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path
