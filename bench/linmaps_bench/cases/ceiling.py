"""Ceiling cases: linmaps against the libraries it is measured by, in one process, in
alternating rounds. Bilinear: OpenBLAS's three products of a kept-T training step against
linmaps' kept-T step (and a ``Bilinear`` layer's); linear: linmaps against NumPy and PyTorch,
forward and forward + backward."""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import textwrap
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..backends import CpuLevelBackend, LinmapsBackend, ThreadCountBackend, TorchBackend, linmaps
from ..oracle import Oracle, check_outputs, expected_with_tolerance
from ..settings import Settings
from ..tables import backend_color, error_mark, format_percent, format_seconds, render_table
from ..threads import thread_pools
from . import PerBackendKind, on_backend, register_kind
from .ops import DEFAULTS as OPS_DEFAULTS
from .ops import Case, make_inputs

# The three products of a kept-T bilinear step (docs/kernels.md), in the step's order.
PRODUCTS = ("T", "dP", "dA_hat")
# The bilinear case's variants, in the order they are reported.
BILINEAR_VARIANTS = ("openblas", "kept_t_step", "layer")
# The linear case's libraries and operations.
LIBRARIES = ("linmaps", "numpy", "torch")
LINEAR_OPS = ("forward", "fwd+bwd")
# The linear shapes the target names: linmaps at least as fast as the faster of NumPy and
# PyTorch there. The suite's other linear shapes are a one-sample call (overhead, not a
# product) and (16384,128,128).
LINEAR_TARGET_DIMS = ((4096, 1024, 1024), (256, 512, 512), (64, 4096, 4096))
TARGET = 1.0
# A block of steps starts with one untimed step when a step is shorter than this: it brings
# back into the caches what the previous block evicted. A longer step streams its operands
# from memory anyway.
WARMUP_BELOW_S = 0.05
MAX_STEPS = 100_000  # per block: a microsecond step needs no more


@dataclass(frozen=True)
class CeilingCase:
    """``dims`` is ``(N, in1, in2, out)`` (a bilinear map) or ``(N, in, out)`` (linear), the
    sizes of the bilinear or linear case of the same dims, whose seeded inputs it uses."""

    dims: tuple

    kind = "ceiling"  # not a field: the same for every case

    def __post_init__(self):
        if len(self.dims) not in (3, 4) or any(int(d) < 1 for d in self.dims):
            raise ValueError(
                "a ceiling case needs 4 positive sizes (bilinear N x in1 x in2 x out) or 3 "
                f"(linear N x in x out), got {self.dims}"
            )

    @property
    def map(self) -> str:
        return "bilinear" if len(self.dims) == 4 else "linear"

    @property
    def id(self) -> str:
        return f"ceiling-{self.map}-" + "x".join(map(str, self.dims))

    @property
    def ops_case(self) -> Case:
        return Case(self.map, self.dims)

    @property
    def names(self) -> tuple:
        return ("N", "in1", "in2", "out") if self.map == "bilinear" else ("N", "in", "out")

    @property
    def unit(self) -> int:
        """N*out*in1*in2 (bilinear) or N*in*out (linear): the multiply-adds of one product."""
        return math.prod(self.dims)

    def describe(self) -> str:
        sizes = " ".join(f"{name}={size}" for name, size in zip(self.names, self.dims))
        if self.map == "bilinear":
            return (
                f"{sizes}: OpenBLAS's three products vs linmaps' kept-T step and a "
                "Bilinear layer's step"
            )
        return f"{sizes}: linmaps vs NumPy and PyTorch, forward and fwd+bwd"

    def flops(self) -> dict:
        """Flops counted the suite's way (cases/ops.py): a bilinear step as its ``fwd+bwd``,
        8 units, whatever it saves; a product, 2 units; linear forward 2, fwd+bwd 6."""
        if self.map == "bilinear":
            return {"step": 8 * self.unit, "product": 2 * self.unit}
        return {"forward": 2 * self.unit, "fwd+bwd": 6 * self.unit}

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "map": self.map,
            "dims": list(self.dims),
            "dim_names": list(self.names),
            "description": self.describe(),
            "flops": self.flops(),
        }


# A default run's ceiling cases: every bilinear size of the suite, and the linear target sizes.
DEFAULTS = tuple(CeilingCase(c.dims) for c in OPS_DEFAULTS if c.kind == "bilinear") + tuple(
    CeilingCase(dims) for dims in LINEAR_TARGET_DIMS
)


def _runs_ceiling(backend) -> bool:
    """The compiled backend with T kept (``cpp``, ``cpp@LEVEL``, ``cpp/T``) runs the case."""
    base = backend.base if isinstance(backend, ThreadCountBackend) else backend
    if isinstance(base, CpuLevelBackend):
        return True
    return type(base) is LinmapsBackend and base.name == "cpp" and base.keep_bytes is None


def bilinear_operands(inputs: dict) -> dict:
    """The operands of a kept-T step's three products (docs/kernels.md), from a bilinear
    case's inputs: ``P`` (N x p), ``A_hat`` (p x L q) and ``W = grad_out (x) Q`` (N x L q),
    with ``p = max(in1, in2)``, ``q = min(in1, in2)`` (P the input with p features)."""
    x1, x2, weight, grad_out = (inputs[k] for k in ("x1", "x2", "weight", "grad_out"))
    n_out, in1, in2 = weight.shape
    if in1 >= in2:
        p_in, q_in, a_hat = x1, x2, weight.transpose(1, 0, 2).reshape(in1, n_out * in2)
    else:
        p_in, q_in, a_hat = x2, x1, weight.transpose(2, 0, 1).reshape(in2, n_out * in1)
    w = (grad_out[:, :, None] * q_in[:, None, :]).reshape(len(grad_out), -1)
    return {
        "P": np.ascontiguousarray(p_in),
        "A_hat": np.ascontiguousarray(a_hat),
        "W": np.ascontiguousarray(w),
    }


def products_oracle(operands: dict, dtype) -> dict:
    """``(value, tolerance)`` of each product (``PRODUCTS``) in float64, from the operands as
    the worker makes them (the same float32 numbers)."""
    exact = {name: a.astype(np.float64) for name, a in operands.items()}
    p, a_hat, w = exact["P"], exact["A_hat"], exact["W"]
    ap, aa, aw = np.abs(p), np.abs(a_hat), np.abs(w)
    return {
        "T": expected_with_tolerance(p @ a_hat, ap @ aa, p.shape[1], dtype),
        "dP": expected_with_tolerance(w @ a_hat.T, aw @ aa.T, w.shape[1], dtype),
        "dA_hat": expected_with_tolerance(p.T @ w, ap.T @ aw, p.shape[0], dtype),
    }


# ----------------------------------------------------------------------------- in the worker


@dataclass
class Variant:
    """One thing timed: a step is ``parts`` called in order (several parts: each part is
    also timed on its own, on extra steps). ``first()`` runs a step and returns its outputs
    for the check. ``pool``: whose threads run it; a block after one of another pool starts
    with a pause (``settle_s``), so that the other's idle threads stop spinning."""

    name: str
    parts: tuple
    first: Callable[[], list]
    context: Callable = contextlib.nullcontext
    pool: str = "linmaps"


@dataclass
class CeilingRun:
    """A case's variants in the worker, in groups (one group per library) whose order
    rotates from round to round; what the check and the record need besides."""

    groups: list
    info: dict = field(default_factory=dict)
    first_s: dict = field(default_factory=dict)  # each variant's first step, in seconds

    @property
    def variants(self) -> list:
        return [v for group in self.groups for v in group]


def _torch_info():
    """``(torch or None, info)``: PyTorch if it imports here, with linmaps' thread count."""
    reason = TorchBackend().unavailable_reason()
    if reason is not None:
        return None, {"status": "unavailable", "reason": reason}
    import torch

    torch.set_num_threads(linmaps.get_num_threads())
    return torch, {
        "status": "ok",
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _bilinear_run(case: CeilingCase, session) -> CeilingRun:
    inputs = make_inputs(case.ops_case, session.dtype, session.seed)
    x1, x2, weight, bias, grad_out = (inputs[k] for k in ("x1", "x2", "weight", "bias", "grad_out"))
    operands = bilinear_operands(inputs)
    p, a_hat, w = operands["P"], operands["A_hat"], operands["W"]
    outs = {
        "T": np.empty((p.shape[0], a_hat.shape[1]), p.dtype),
        "dP": np.empty(p.shape, p.dtype),
        "dA_hat": np.empty(a_hat.shape, p.dtype),
    }
    products = (
        functools.partial(np.matmul, p, a_hat, out=outs["T"]),
        functools.partial(np.matmul, w, a_hat.T, out=outs["dP"]),
        functools.partial(np.matmul, p.T, w, out=outs["dA_hat"]),
    )

    def products_first():
        for product in products:
            product()
        return [outs[name].copy() for name in PRODUCTS]

    info = {}
    last = []  # the previous step's context, whose buffer the next step reuses

    def kept_t_step():
        z, ctx = linmaps.bilinear_with_context(
            x1, x2, weight, bias, reuse=last.pop() if last else None
        )
        grads = linmaps.bilinear_backward(grad_out, context=ctx)
        last.append(ctx)
        return z, grads

    def kept_t_first():
        z, grads = kept_t_step()
        info["kept_bytes"] = last[0].kept_bytes
        return [z, *grads]

    _, in1, in2, n_out = case.dims
    layer = linmaps.Bilinear(in1, in2, n_out, dtype=session.dtype, seed=0)
    layer.weight, layer.bias = weight, bias

    def layer_step():
        layer(x1, x2)
        layer.backward(grad_out)

    def layer_first():
        layer.zero_grad()
        z = layer(x1, x2)
        grad_x1, grad_x2 = layer.backward(grad_out)
        return [z, grad_x1, grad_x2, layer.grad_weight.copy(), layer.grad_bias.copy()]

    context = functools.partial(session.backend.context, "fwd+bwd")
    groups = [
        [Variant("openblas", products, products_first)],
        [Variant("kept_t_step", (kept_t_step,), kept_t_first, context)],
        [Variant("layer", (layer_step,), layer_first, context)],
    ]
    return CeilingRun(groups, info)


def _linear_run(case: CeilingCase, session) -> CeilingRun:
    ops_case = case.ops_case
    inputs = make_inputs(ops_case, session.dtype, session.seed)
    x, weight, bias, grad_out = (inputs[k] for k in ("x", "weight", "bias", "grad_out"))

    def numpy_forward():
        return (x @ weight.T + bias,)

    def numpy_forward_backward():
        return (x @ weight.T + bias, grad_out @ weight, grad_out.T @ x, grad_out.sum(0))

    numpy_calls = {"forward": numpy_forward, "fwd+bwd": numpy_forward_backward}
    linmaps_backend = session.backend
    linmaps_calls = {op: linmaps_backend.operation(ops_case, op, inputs) for op in LINEAR_OPS}
    groups = [
        [
            Variant(
                f"linmaps {op}",
                (linmaps_calls[op],),
                lambda op=op: list(linmaps_calls[op]()),
                functools.partial(linmaps_backend.context, op),
            )
            for op in LINEAR_OPS
        ],
        [
            Variant(f"numpy {op}", (numpy_calls[op],), lambda op=op: list(numpy_calls[op]()))
            for op in LINEAR_OPS
        ],
    ]
    torch, info = _torch_info()
    if torch is not None:
        torch_backend = TorchBackend()
        prepared = torch_backend.prepare(ops_case, inputs)
        group = []
        for op in LINEAR_OPS:
            with torch_backend.context(op):
                call = torch_backend.operation(ops_case, op, prepared)
            group.append(
                Variant(
                    f"torch {op}",
                    (call,),
                    lambda call=call: torch_backend.to_numpy(call()),
                    functools.partial(torch_backend.context, op),
                    pool="torch",
                )
            )
        groups.append(group)
    return CeilingRun(groups, {"torch": info})


def worker_environment(session) -> dict:
    """Who runs what in the worker: thread counts, OpenBLAS and its kernels, linmaps' ISA."""
    from linmaps import _threads

    isa = None
    with contextlib.suppress(ImportError, AttributeError):
        from linmaps import _cpp_backend

        isa = _cpp_backend.isa
    return {
        "linmaps_threads": linmaps.get_num_threads(),
        "linmaps_isa": isa,
        "blas_threads": _threads.describe(),
        "blas_pools": [
            {
                k: pool.get(k)
                for k in ("internal_api", "version", "architecture", "num_threads", "prefix")
            }
            for pool in thread_pools()
            if pool.get("user_api") == "blas"
        ],
    }


def worker_first_calls(session, case: CeilingCase) -> dict:
    """Make the case's variants and run one step of each: their outputs, for the check."""
    session.end_case()
    # NumPy's BLAS on linmaps' threads from now on, as in a program that uses linmaps: one
    # pool, so OpenBLAS's own threads never spin beside linmaps' (docs/performance.md).
    linmaps.share_blas_threads()
    run = _bilinear_run(case, session) if case.map == "bilinear" else _linear_run(case, session)
    outputs = {}
    for variant in run.variants:
        with variant.context():
            start = time.perf_counter()
            first = variant.first()
            run.first_s[variant.name] = time.perf_counter() - start
        outputs[variant.name] = [None if o is None else np.asarray(o) for o in first]
    session.case, session.state = case, run
    return {
        "outputs": outputs,
        "first_step_s": dict(run.first_s),
        "info": run.info,
        "environment": worker_environment(session),
    }


def _block(variant: Variant, min_steps: int, measure_s: float) -> tuple:
    """Steps of ``variant``, each timed, until there are ``min_steps`` of them and they took
    ``measure_s`` seconds (at most ``MAX_STEPS``). With several parts, every second step is
    followed by an extra one that times each part: ``(step times, [times of each part])``."""
    parts = variant.parts
    split = [[] for _ in parts] if len(parts) > 1 else None
    times = []
    elapsed = 0.0
    perf_counter = time.perf_counter
    while len(times) < min_steps or (elapsed < measure_s and len(times) < MAX_STEPS):
        start = perf_counter()
        for part in parts:
            part()
        step_s = perf_counter() - start
        if split is not None and len(times) % 2 == 0:  # outside the step's own timing
            before = perf_counter()
            for part, part_times in zip(parts, split):
                part()
                now = perf_counter()
                part_times.append(now - before)
                before = now
        times.append(step_s)
        elapsed += step_s
    return times, split


def time_rounds(run: CeilingRun, settings: Settings) -> dict:
    """Median seconds per step of each variant of ``run``, in ``ceiling_rounds`` rounds.

    Each round times every variant, a block of steps each, group after group; the groups'
    order rotates from round to round, so that a machine getting busier or quieter weighs on
    every library alike. A block starts with a ``settle_s`` pause when the previous block
    ran on another thread pool (PyTorch's), and with one untimed step when the variant's
    first step was short (:data:`WARMUP_BELOW_S`); then at least ``ceiling_min_steps``
    steps and ``ceiling_measure_s`` seconds of steps, each timed on its own. The round's
    figure is their median; the result, the median over the rounds.
    """
    per_step = run.first_s
    rounds = {v.name: [] for v in run.variants}
    steps = {v.name: [] for v in run.variants}
    part_rounds = {v.name: [[] for _ in v.parts] for v in run.variants if len(v.parts) > 1}
    pool = run.variants[-1].pool
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(settings.ceiling_rounds):
            shift = r % len(run.groups)
            for group in run.groups[shift:] + run.groups[:shift]:
                for variant in group:
                    if variant.pool != pool:
                        time.sleep(settings.settle_s)
                    pool = variant.pool
                    with variant.context():
                        if per_step[variant.name] < WARMUP_BELOW_S:
                            _block(variant, 1, 0.0)
                        times, split = _block(
                            variant, settings.ceiling_min_steps, settings.ceiling_measure_s
                        )
                    rounds[variant.name].append(float(np.median(times)))
                    steps[variant.name].append(len(times))
                    for part_times, part_round in zip(
                        split or (), part_rounds.get(variant.name, ())
                    ):
                        part_round.append(float(np.median(part_times)))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        "t_s": {name: float(np.median(values)) for name, values in rounds.items()},
        "parts_s": {
            name: [float(np.median(values)) for values in per_part]
            for name, per_part in part_rounds.items()
        },
        "rounds_s": rounds,
        "steps_per_round": steps,
        "n_rounds": settings.ceiling_rounds,
    }


def worker_time(session, case: CeilingCase, settings: Settings) -> dict:
    """Time the variants :func:`worker_first_calls` made and the harness checked."""
    if session.case != case or not isinstance(session.state, CeilingRun):
        raise RuntimeError("worker_time() needs worker_first_calls() on the same case")
    return time_rounds(session.state, settings)


# ----------------------------------------------------------------------------- in the harness


def check_first_calls(case: CeilingCase, oracle: Oracle, products, outputs: dict) -> dict:
    """Each variant's first outputs against the float64 oracle: the products against their
    own (``products``, from :func:`products_oracle`), the rest against the case's."""
    checks = {}
    for name, got in outputs.items():
        if name == "openblas":
            checks[name] = check_outputs(products, PRODUCTS, got)
        elif case.map == "bilinear":
            checks[name] = oracle.check("fwd+bwd", got)
        else:
            checks[name] = oracle.check(name.split(" ", 1)[1], got)
    return checks


def _bilinear_stats(stats: dict) -> dict:
    t, rounds = stats["t_s"], stats["rounds_s"]
    return {
        "t_s": {name: t[name] for name in BILINEAR_VARIANTS},
        "products_s": dict(zip(PRODUCTS, stats["parts_s"]["openblas"])),
        # How many times the kept-T step's rate is the three products' (>= 1: at the ceiling).
        "ratio": t["openblas"] / t["kept_t_step"],
        "ratio_rounds": [a / b for a, b in zip(rounds["openblas"], rounds["kept_t_step"])],
    }


def _linear_stats(stats: dict) -> dict:
    t, rounds = stats["t_s"], stats["rounds_s"]
    libraries = [lib for lib in LIBRARIES if f"{lib} forward" in t]
    result = {"t_s": {}, "best_peer": {}, "vs_best": {}, "vs_best_rounds": {}}
    for op in LINEAR_OPS:
        result["t_s"][op] = {lib: t[f"{lib} {op}"] for lib in libraries}
        peers = [lib for lib in libraries if lib != "linmaps"]
        best = min(peers, key=lambda lib: t[f"{lib} {op}"])
        result["best_peer"][op] = best
        result["vs_best"][op] = t[f"{best} {op}"] / t[f"linmaps {op}"]
        result["vs_best_rounds"][op] = [
            min(rounds[f"{lib} {op}"][r] for lib in peers) / rounds[f"linmaps {op}"][r]
            for r in range(stats["n_rounds"])
        ]
    return result


class CeilingKind(PerBackendKind):
    """The ceiling cases, in the worker of the compiled backend (``cpp``, ``cpp@LEVEL``,
    ``cpp/T``); the other backends are "not applicable"."""

    kinds = ("ceiling",)
    section = "ceiling"
    order = 40  # last: the worker imports torch for the linear cases
    custom_sizes = ("ceiling:NxIN1xIN2xOUT", "ceiling:NxINxOUT")
    defaults = DEFAULTS

    def from_dims(self, kind, dims):
        return CeilingCase(dims)

    def run(self, case, suite):
        settings, runners, progress = suite.settings, suite.runners, suite.progress
        dtype = np.dtype(settings.dtype)
        progress.step(f"{case.id}: oracle", 0, major=True)
        inputs = make_inputs(case.ops_case, dtype, settings.seed)
        oracle = Oracle(case.ops_case, inputs, dtype)
        products = None
        if case.map == "bilinear":
            products = products_oracle(bilinear_operands(inputs), dtype)
        del inputs
        results = {}
        for name in list(runners.proxies):
            if not _runs_ceiling(runners.backends[name]):
                results[name] = {
                    "status": "not applicable",
                    "reason": "the ceiling cases time linmaps' compiled backend (cpp)",
                }
                progress.step(f"{case.id} {name} (not applicable)")
                continue
            progress.step(f"{case.id} {name}")
            record = results[name] = {}
            time.sleep(settings.settle_s)  # let the oracle's / previous worker's threads go idle
            with on_backend(runners, name, record):
                first = runners.call(name, "run", worker_first_calls, case)
                checks = check_first_calls(case, oracle, products, first["outputs"])
                del first["outputs"]
                record.update(
                    first["info"],
                    first_step_s=first["first_step_s"],
                    environment=first["environment"],
                )
                record["check"] = {variant: c.to_json() for variant, c in checks.items()}
                wrong = {variant: c for variant, c in checks.items() if not c.ok}
                if wrong:  # reported as an error, never timed
                    record.update(
                        status="error",
                        error="; ".join(f"{v}: {c.message}" for v, c in wrong.items()),
                    )
                    continue
                # No pause here: since the one before the first calls, this process only
                # compared arrays, on one thread.
                stats = runners.call(name, "run", worker_time, case, settings)
                summary = _bilinear_stats(stats) if case.map == "bilinear" else _linear_stats(stats)
                record.update(
                    status="ok",
                    **summary,
                    rounds_s=stats["rounds_s"],
                    steps_per_round=stats["steps_per_round"],
                    n_rounds=stats["n_rounds"],
                )
        return {**case.to_json(), "dtype": settings.dtype, "results": results}

    def complete(self, record, suite, gemm_gflops):
        super().complete(record, suite, gemm_gflops)
        flops = record["flops"]
        for result in record["results"].values():
            if result.get("status") != "ok":
                continue
            if record["map"] == "bilinear":
                result["of_gemm"] = {
                    **{
                        name: flops["step"] / t / 1e9 / gemm_gflops
                        for name, t in result["t_s"].items()
                    },
                    **{
                        name: flops["product"] / t / 1e9 / gemm_gflops
                        for name, t in result["products_s"].items()
                    },
                }
            else:
                result["of_gemm"] = {
                    op: {lib: flops[op] / t / 1e9 / gemm_gflops for lib, t in per_lib.items()}
                    for op, per_lib in result["t_s"].items()
                }

    def format(self, records, result, intro=True):
        return format_ceiling(records, result, intro)

    def summary(self, records, result):
        return ceiling_summary(records) if records else None

    def chart_panels(self, records, result):
        if not records:
            return []
        return [(2.4, lambda ax: plot_ceiling(ax, records, result), 0.9)]


BILINEAR_GUIDE = (
    "bilinear: step / ceiling = t(OpenBLAS's T = P @ A_hat, dP = W @ A_hat.T, "
    "dA_hat = P.T @ W; numpy.matmul into preallocated outputs) / t(linmaps' kept-T step: "
    "bilinear_with_context, then bilinear_backward(context=), T's buffer reused); the target "
    f"is >= {TARGET:.1f} at every shape. 'of GEMM' counts a step as 8 units of N*out*in1*in2 "
    "multiply-adds (the suite's fwd+bwd) and a product as 2, so three products at the "
    "reference's rate would be 133%"
)
LINEAR_GUIDE = (
    "linear: vs best = the faster of NumPy's (x @ W.T + b; g @ W, g.T @ x, g.sum(0)) and "
    "PyTorch's (F.linear, autograd) median / linmaps'; the target is >= "
    f"{TARGET:.1f}, forward and fwd+bwd, at "
    + ", ".join("x".join(map(str, dims)) for dims in LINEAR_TARGET_DIMS)
)


GUIDE_WIDTH = 100


def _short(case) -> str:
    return "x".join(map(str, case["dims"]))


def _rounds(values) -> str:
    return f"{min(values):.2f}-{max(values):.2f} ({len(values)})"


def describe_environment(environment: dict) -> str:
    """One line: OpenBLAS (version, kernels, threads, whose threads run it), linmaps."""
    parts = [
        f"{pool.get('internal_api') or 'BLAS'} {pool.get('version') or '?'} "
        f"({pool.get('architecture') or '?'} kernels, {pool.get('num_threads')} threads)"
        for pool in environment["blas_pools"]
    ]
    parts.append(f"its parallel calls: {environment['blas_threads']}")
    parts.append(
        f"linmaps kernels {environment['linmaps_isa'] or '?'}, "
        f"{environment['linmaps_threads']} threads"
    )
    return "; ".join(parts)


def describe_torch(torch_info: dict) -> str:
    if torch_info["status"] == "ok":
        return f"torch {torch_info['version']}, {torch_info['threads']} threads"
    return f"torch unavailable, its columns empty ({torch_info['reason']})"


def _bilinear_rows(case) -> list:
    rows = []
    for name, record in case["results"].items():
        if record["status"] == "error":
            rows.append([_short(case), name, "ERROR", "", "", "", "", "", "", "", ""])
            rows.append(f"  {record['error']}")
        if record["status"] != "ok":
            continue
        t, of_gemm = record["t_s"], record.get("of_gemm", {})

        def percent(key, of_gemm=of_gemm):
            return format_percent(of_gemm[key]) if key in of_gemm else "-"

        step = format_seconds(t["kept_t_step"])
        if not record.get("kept_bytes"):
            step += " (T not kept)"
        rows.append(
            [
                _short(case),
                name,
                " / ".join(percent(p) for p in PRODUCTS),
                format_seconds(t["openblas"]),
                percent("openblas"),
                step,
                percent("kept_t_step"),
                format_seconds(t["layer"]),
                percent("layer"),
                f"{record['ratio']:.2f}",
                _rounds(record["ratio_rounds"]),
            ]
        )
    return rows


def _linear_rows(case) -> list:
    rows = []
    for name, record in case["results"].items():
        if record["status"] == "error":
            rows.append([_short(case), name, "ERROR", "", "", "", "", "", "", "", ""])
            rows.append(f"  {record['error']}")
        if record["status"] != "ok":
            continue
        for op in LINEAR_OPS:
            t, of_gemm = record["t_s"][op], record.get("of_gemm", {}).get(op, {})
            cells = []
            for lib in LIBRARIES:
                if lib in t:
                    percent = format_percent(of_gemm[lib]) if lib in of_gemm else "-"
                    cells += [format_seconds(t[lib]), percent]
                else:
                    cells += ["-", ""]
            rows.append(
                [
                    _short(case),
                    name,
                    op,
                    *cells,
                    f"{record['vs_best'][op]:.2f}x ({record['best_peer'][op]})",
                    _rounds(record["vs_best_rounds"][op]),
                ]
            )
    return rows


def format_ceiling(records, result, intro=True) -> str:
    """The ceiling cases' tables (bilinear and linear apart); ``intro``: with the CPU, the
    libraries and the reading guides."""
    lines = []
    if intro:
        machine = result["machine"]
        dtype = records[0].get("dtype", result["settings"]["dtype"])
        flags = " ".join(machine.get("cpu_simd_flags") or []) or "-"
        lines += [
            "ceiling: linmaps beside OpenBLAS (NumPy's BLAS) and PyTorch in one process, the "
            f"compiled backend's worker, in alternating rounds ({dtype}, median time per step)",
            f"CPU: {machine['cpu_model']}; SIMD flags: {flags}; "
            f"{machine['usable_cpus']} usable CPUs",
            *textwrap.wrap(BILINEAR_GUIDE, GUIDE_WIDTH),
            *textwrap.wrap(LINEAR_GUIDE, GUIDE_WIDTH),
            "rounds: the ratio's lowest and highest value over the rounds (their number)",
        ]
    tables = []
    bilinear = [case for case in records if case["map"] == "bilinear"]
    linear = [case for case in records if case["map"] == "linear"]
    if bilinear:
        headers = [
            "bilinear",
            "backend",
            "T / dP / dA_hat",
            "OpenBLAS 3 products",
            "of GEMM",
            "kept-T step",
            "of GEMM",
            "layer step",
            "of GEMM",
            "step / ceiling",
            "rounds",
        ]
        rows = [row for case in bilinear for row in _bilinear_rows(case)]
        tables.append(render_table(headers, rows, right_aligned=set(range(2, 11))))
    if linear:
        headers = [
            "linear",
            "backend",
            "op",
            "linmaps",
            "of GEMM",
            "NumPy",
            "of GEMM",
            "torch",
            "of GEMM",
            "vs best",
            "rounds",
        ]
        rows = [row for case in linear for row in _linear_rows(case)]
        tables.append(render_table(headers, rows, right_aligned=set(range(3, 11))))
    notes, skipped = [], {}
    for case in records:
        for name, record in case["results"].items():
            if record["status"] in ("unavailable", "not applicable"):
                skipped.setdefault(record["status"], []).append(name)
                continue
            # Who ran what: with the reading guide, and for torch with every linear table.
            if intro and "environment" in record:
                notes.append(f"{name}: {describe_environment(record['environment'])}")
            if "torch" in record:
                notes.append(f"{name}: {describe_torch(record['torch'])}")
    notes = list(dict.fromkeys(notes))
    notes += [f"not run: {', '.join(dict.fromkeys(n))} ({s})" for s, n in skipped.items()]
    text = "\n".join(lines + tables)
    if notes:
        text += "\n" + "\n".join(f"  ({note})" for note in notes)
    return text


def ceiling_summary(records) -> str:
    bilinear, linear = [], []
    for case in records:
        for name, record in case["results"].items():
            label = _short(case) + ("" if name == "cpp" else f" {name}")
            if record["status"] == "error":
                (bilinear if case["map"] == "bilinear" else linear).append(f"{label} ERROR")
            elif record["status"] != "ok":
                continue
            elif case["map"] == "bilinear":
                bilinear.append(f"{label} {record['ratio']:.2f}")
            else:
                linear.append(
                    f"{label} fwd {record['vs_best']['forward']:.2f}, "
                    f"fwd+bwd {record['vs_best']['fwd+bwd']:.2f}"
                )
    parts = []
    if bilinear:
        parts.append(
            f"ceiling: kept-T step / OpenBLAS's three products (target >= {TARGET:.1f}): "
            + ", ".join(bilinear)
        )
    if linear:
        parts.append(
            f"ceiling: linear, linmaps vs the faster of NumPy and PyTorch (target >= "
            f"{TARGET:.1f}): " + "; ".join(linear)
        )
    return "\n".join(parts) or "ceiling: -"


def plot_ceiling(ax, records, result) -> None:
    """The ceiling ratios: per bilinear case the kept-T step over OpenBLAS's products, per
    linear case and operation linmaps over the faster peer; a bar per backend (whiskers: the
    rounds' lowest and highest), the 1.0 target drawn."""
    names = [n for n, s in result["backends"].items() if s["available"]]
    runs = [n for n in names if any(c["results"][n]["status"] in ("ok", "error") for c in records)]
    labels, slots = [], []  # one x position per bilinear case, two per linear case
    for case in records:
        if case["map"] == "bilinear":
            labels.append(_short(case))
            slots.append((case, None))
        else:
            for op in LINEAR_OPS:
                labels.append(f"{_short(case)} {'fwd' if op == 'forward' else op}")
                slots.append((case, op))
    width = min(0.4, 0.8 / max(1, len(runs)))
    for b, name in enumerate(runs):
        xs, values, low, high = [], [], [], []
        for i, (case, op) in enumerate(slots):
            record = case["results"][name]
            x = i + (b - (len(runs) - 1) / 2) * width
            if record["status"] == "error":
                error_mark(ax, x)
            if record["status"] != "ok":
                continue
            value = record["ratio"] if op is None else record["vs_best"][op]
            per_round = record["ratio_rounds"] if op is None else record["vs_best_rounds"][op]
            xs.append(x)
            values.append(value)
            low.append(max(0.0, value - min(per_round)))
            high.append(max(0.0, max(per_round) - value))
        ax.bar(xs, values, width, yerr=[low, high], capsize=2, color=backend_color(result, name))
    ax.axhline(TARGET, color="red", linestyle="--", linewidth=1, label=f"target {TARGET:.1f}")
    ax.set_xlim(-0.6, len(slots) - 0.4)
    ax.set_xticks(range(len(slots)))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("linmaps / ceiling\n(rate ratio)", fontsize=8)
    ax.set_title(
        "ceiling: bilinear kept-T step vs OpenBLAS's three products; linear vs the faster of "
        f"NumPy and PyTorch ({result['machine']['cpu_model']})",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", frameon=False)


register_kind(CeilingKind())
