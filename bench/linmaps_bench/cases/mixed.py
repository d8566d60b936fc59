"""Mixed cases: one training step alternating NumPy products and linmaps calls in a worker;
the ratio (t_numpy + t_linmaps) / t_alternating says what mixing the two costs."""

from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from ..backends import linmaps
from ..oracle import CheckResult, check_outputs, expected_with_tolerance
from ..settings import Settings
from ..tables import backend_color, error_mark, format_seconds, render_table
from ..threads import thread_pools
from ..timing import time_calls
from . import PerBackendKind, on_backend, register_kind, seeded_rng


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


# The mixed cases of a default run.
DEFAULTS = (
    # A training step alternating NumPy and linmaps, each part 1-20 ms ...
    MixedCase((1024, 1024, 128, 64, 32), "long"),
    # ... and with short calls, each part tens of microseconds.
    MixedCase((32, 64, 64, 64, 8), "short"),
)


def make_mixed_inputs(case: MixedCase, dtype, seed: int = 0) -> dict:
    """Seeded inputs of a mixed case, all of ``dtype`` (weights scaled by 1/sqrt(fan-in))."""
    rng = seeded_rng(case, seed)
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
    expected = {
        "pre": expected_with_tolerance(
            a["x"] @ a["w1"].T, absolute["x"] @ absolute["w1"].T, n_in, dtype
        )
    }
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
        z=expected_with_tolerance(z, z_mag, hidden * in2, dtype),
        grad_h=expected_with_tolerance(grads.grad_x1, mags.grad_x1, n_out * in2, dtype),
        grad_weight=expected_with_tolerance(grads.grad_weight, mags.grad_weight, n, dtype),
        grad_w1=expected_with_tolerance(
            grad_h.T @ a["x"], np.abs(grad_h).T @ absolute["x"], n, dtype
        ),
    )
    return check_outputs(expected, names, outputs)


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
        per_step[part] = time_calls(lambda part=part: step.run(part), 2)
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


# ----------------------------------------------------------------------------- in the worker


def worker_first_step(session, case: MixedCase):
    """Make the inputs of ``case`` and run one alternating step: ``(seconds, outputs)``.

    Runs in the backend's worker (``BackendSession.run``); the outputs
    (``MixedStep.output_names``) go back for the check."""
    if not session.backend.runs_mixed:
        raise RuntimeError(f"backend {session.backend.name!r} does not run the mixed cases")
    session.end_case()
    step = MixedStep(make_mixed_inputs(case, session.dtype, session.seed))
    with session.backend.context("fwd+bwd"):
        start = time.perf_counter()
        step.run("alternating")
        elapsed = time.perf_counter() - start
    session.case, session.state = case, step
    return elapsed, [None if o is None else np.asarray(o) for o in step.outputs()]


def worker_time(session, case: MixedCase, settings: Settings) -> dict:
    """Time the step :func:`worker_first_step` made and checked (in the worker)."""
    if session.case != case or not isinstance(session.state, MixedStep):
        raise RuntimeError("worker_time() needs worker_first_step() on the same case")
    with session.backend.context("fwd+bwd"):
        stats = time_mixed(session.state, settings)
    return {**stats, "environment": mixed_environment()}


# ----------------------------------------------------------------------------- in the harness


class MixedKind(PerBackendKind):
    """The mixed cases, on the backends that run linmaps (``Backend.runs_mixed``)."""

    kinds = ("mixed",)
    section = "mixed"
    order = 20
    custom_sizes = ("mixed:NxINxHIDDENxIN2xOUT",)
    defaults = DEFAULTS

    def from_dims(self, kind, dims):
        return MixedCase(dims)

    def run(self, case, suite):
        settings, runners, progress = suite.settings, suite.runners, suite.progress
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
            with on_backend(runners, name, record):
                first_step_s, outputs = runners.call(name, "run", worker_first_step, case)
                check = check_mixed(case, inputs, outputs)
                del outputs
                record["check"] = check.to_json()
                if not check.ok:  # wrong: reported as an error, never timed
                    record.update(status="error", error=check.message)
                    continue
                stats = runners.call(name, "run", worker_time, case, settings)
                record.update(status="ok", first_step_s=first_step_s, **stats)
        return {**case.to_json(), "dtype": settings.dtype, "results": results}

    def format(self, records, result, intro=True):
        return format_mixed(records, result, intro)

    def summary(self, records, result):
        return mixed_summary(records) if records else None

    def chart_panels(self, records, result):
        if not records:
            return []
        return [(2.2, lambda ax: plot_mixed(ax, records, result))]


MIXED_GUIDE = (
    "ratio = (t_numpy + t_linmaps) / t_alternating: 1.00 = mixing costs nothing; "
    "the target is >= 0.9"
)
MIXED_TARGET = 0.9


def _describe_environment(env) -> str:
    if env["default"]:
        where = "default environment"
    else:
        where = "NOT the default environment: " + ", ".join(
            f"{k}={v}" for k, v in env["variables"].items()
        )
    return (
        f"{where}; NumPy's BLAS: {env['blas_threads']}; linmaps' OpenMP wait: {env['openmp_wait']}"
    )


def format_mixed(records, result, intro=True) -> str:
    """The mixed cases: per case and backend, the three medians and the ratio; ``intro``: with
    the reading guide."""
    headers = ["case", "backend", "t_numpy", "t_linmaps", "t_alternating", "ratio", "rounds"]
    rows, skipped, environments = [], {}, {}
    for case in records:
        for name, record in case["results"].items():
            status = record["status"]
            if status in ("unavailable", "not applicable"):
                skipped.setdefault(status, []).append(name)
                continue
            if status == "error":
                rows.append([case["id"], name, "ERROR", "", "", "", ""])
                rows.append(f"  {record['error']}")
                continue
            per_round = record["ratio_rounds"]
            rows.append(
                [
                    case["id"],
                    name,
                    format_seconds(record["t_numpy_s"]),
                    format_seconds(record["t_linmaps_s"]),
                    format_seconds(record["t_alternating_s"]),
                    f"{record['ratio']:.2f}",
                    f"{min(per_round):.2f}-{max(per_round):.2f} ({len(per_round)})",
                ]
            )
            environments.setdefault(_describe_environment(record["environment"]), []).append(name)
    lines = []
    if intro:
        dtype = records[0].get("dtype", result["settings"]["dtype"])
        lines += [
            f"mixed: one training step of a NumPy model, NumPy products and linmaps calls "
            f"alternating in one process ({dtype}, median time per step)",
            MIXED_GUIDE,
            "rounds: the ratio's lowest and highest value over the rounds (their number)",
        ]
    lines += [f"  {case['id']}: {case['description']}" for case in records]
    text = "\n".join(lines) + "\n" + render_table(headers, rows, right_aligned={2, 3, 4, 5, 6})
    notes = []
    if any(row[1] == "python" for row in rows if not isinstance(row, str)):
        notes.append(
            "python: its linmaps part is linmaps' NumPy backend, NumPy's BLAS again "
            "(alternating two NumPy workloads)"
        )
    for description, names in environments.items():
        notes.append(f"{', '.join(dict.fromkeys(names))}: {description}")
    for status, names in skipped.items():
        notes.append(f"not run: {', '.join(dict.fromkeys(names))} ({status})")
    if notes:
        text += "\n" + "\n".join(f"  ({note})" for note in notes)
    return text


def mixed_summary(records) -> str:
    parts = []
    for case in records:
        cells = []
        for name, record in case["results"].items():
            if record["status"] == "ok":
                cells.append(f"{name} {record['ratio']:.2f}")
            elif record["status"] == "error":
                cells.append(f"{name} ERROR")
        if cells:
            parts.append(f"{case['id']}: {', '.join(cells)}")
    return "mixing ratio (1.00 = free, target >= 0.9): " + ("; ".join(parts) or "-")


def plot_mixed(ax, mixed, result) -> None:
    """The mixed cases' ratios: a bar per case and backend (whiskers: interquartile range of
    the rounds' ratios), 1.0 (mixing costs nothing) and the 0.9 target drawn."""
    names = [n for n, s in result["backends"].items() if s["available"]]
    runs = [n for n in names if any(c["results"][n]["status"] in ("ok", "error") for c in mixed)]
    width = min(0.3, 0.8 / max(1, len(runs)))  # two cases need no wall of colour
    top = 1.4
    for b, name in enumerate(runs):
        xs, ratios, low, high = [], [], [], []
        for c, case in enumerate(mixed):
            record = case["results"][name]
            x = c + (b - (len(runs) - 1) / 2) * width
            if record["status"] == "ok":
                q1, q3 = np.percentile(record["ratio_rounds"], [25, 75])
                xs.append(x)
                ratios.append(record["ratio"])
                low.append(max(0.0, record["ratio"] - q1))
                high.append(max(0.0, q3 - record["ratio"]))
                top = max(top, 1.25 * record["ratio"])
                ax.text(
                    x,
                    0.03,
                    f"{record['ratio']:.2f}",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="white",
                    transform=ax.get_xaxis_transform(),
                )
            elif record["status"] == "error":
                error_mark(ax, x)
        ax.bar(xs, ratios, width, yerr=[low, high], capsize=2, color=backend_color(result, name))
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="1.0: mixing costs nothing")
    ax.axhline(
        MIXED_TARGET, color="red", linestyle="--", linewidth=1, label=f"target {MIXED_TARGET}"
    )
    ax.set_ylim(0, top)  # a wild round's whisker may leave the panel; the bar stays readable
    ax.set_xlim(-0.6, len(mixed) - 0.4)
    ax.set_xticks(range(len(mixed)))
    ax.set_xticklabels([case["id"] for case in mixed], fontsize=8)
    ax.set_ylabel("(t_numpy + t_linmaps)\n/ t_alternating", fontsize=8)
    ax.set_title(
        "mixed: NumPy and linmaps alternating in one training step\n"
        "bars: ratio of the medians, whiskers: interquartile range of the rounds' ratios",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)


register_kind(MixedKind())
