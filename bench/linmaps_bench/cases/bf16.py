"""bfloat16 cases: one forward plus backward (``fwd+bwd``) of a linear or bilinear map in each
float32 precision mode of linmaps, on bfloat16 arrays, and in PyTorch bfloat16, each with its
error against float64, in the worker of the torch backend (``docs/bfloat16.md``).

The variants, in the order they are reported:

* ``ieee``, ``bf16``, ``bf16x3``: linmaps on the case's float32 inputs in that mode;
* ``bfloat16``: linmaps on the inputs rounded to ``ml_dtypes.bfloat16``;
* ``torch-bf16``: ``torch.nn.functional.linear``/``bilinear`` on bfloat16 tensors, autograd.

The error of a variant is ``||r - e|| / ||e||`` of its forward result ``r`` against ``e``,
linmaps' float64 result on the float32 inputs; a variant on bfloat16 inputs is also compared
with the float64 result on those inputs (``error_vs_rounded``), which leaves out the
rounding of the inputs and shows what the computation itself adds.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass

import numpy as np

from ..backends import ThreadCountBackend, TorchBackend
from ..settings import Settings
from ..tables import format_seconds, render_table
from . import PerBackendKind, on_backend, register_kind
from .ops import Case, make_inputs

VARIANTS = ("ieee", "bf16", "bf16x3", "bfloat16", "torch-bf16")
MODES = ("ieee", "bf16", "bf16x3")


@dataclass(frozen=True)
class Bf16Case:
    """``fwd+bwd`` of ``Case(map_kind, dims)`` in every variant."""

    map_kind: str
    dims: tuple

    kind = "bf16"  # not a field: the same for every case

    def __post_init__(self):
        Case(self.map_kind, self.dims)  # the same checks

    @property
    def case(self) -> Case:
        return Case(self.map_kind, self.dims)

    @property
    def id(self) -> str:
        return f"bf16-{self.map_kind}-" + "x".join(map(str, self.dims))

    def describe(self) -> str:
        return f"{self.map_kind} {self.case.describe()}: fwd+bwd in each precision, and torch"

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "map": self.map_kind,
            "dims": list(self.dims),
            "description": self.describe(),
            "flops": self.case.flops("fwd+bwd"),
        }


# A default run's bfloat16 cases (others: --cases bf16:NxINxOUT or bf16:NxIN1xIN2xOUT).
DEFAULTS = (
    Bf16Case("linear", (256, 512, 512)),
    Bf16Case("linear", (64, 4096, 4096)),
    Bf16Case("bilinear", (256, 64, 64, 64)),
    Bf16Case("bilinear", (512, 256, 256, 16)),
)


def _runs_bf16(backend) -> bool:
    base = backend.base if isinstance(backend, ThreadCountBackend) else backend
    return isinstance(base, TorchBackend)


# ----------------------------------------------------------------------------- in the worker


class Bf16Step:
    """Each variant's ``fwd+bwd`` on one case's inputs: ``step(variant)`` returns the forward
    result as float64."""

    def __init__(self, case: Bf16Case, seed: int):
        import ml_dtypes
        import torch

        import linmaps

        self.linmaps, self.torch = linmaps, torch
        self.map_kind = case.map_kind
        inputs = make_inputs(case.case, np.float32, seed)
        self.grad_out = inputs.pop("grad_out")
        self.float32 = list(inputs.values())  # x (or x1, x2), weight, bias
        self.bfloat16 = [a.astype(ml_dtypes.bfloat16) for a in self.float32]
        self.grad_bf16 = self.grad_out.astype(ml_dtypes.bfloat16)
        self.tensors = [
            torch.from_numpy(a).to(torch.bfloat16).requires_grad_() for a in self.float32
        ]
        self.grad_tensor = torch.from_numpy(self.grad_out).to(torch.bfloat16)

    def _linmaps(self, args, grad):
        lm = self.linmaps
        if self.map_kind == "linear":
            x, weight, bias = args
            y = lm.linear(x, weight, bias)
            lm.linear_backward(grad, x, weight)
            return y
        x1, x2, weight, bias = args
        z, ctx = lm.bilinear_with_context(x1, x2, weight, bias)
        lm.bilinear_backward(grad, context=ctx)
        return z

    def step(self, variant: str):
        if variant in MODES:
            with self.linmaps.fp32_precision(variant):
                return self._linmaps(self.float32, self.grad_out)
        if variant == "bfloat16":
            return self._linmaps(self.bfloat16, self.grad_bf16)
        F = self.torch.nn.functional
        for tensor in self.tensors:
            tensor.grad = None
        function = F.linear if self.map_kind == "linear" else F.bilinear
        out = function(*self.tensors)
        out.backward(self.grad_tensor)
        return out.detach()

    def result64(self, variant: str) -> np.ndarray:
        out = self.step(variant)
        if variant == "torch-bf16":
            return out.to(self.torch.float64).numpy()
        return np.asarray(out, np.float64)

    def reference(self, rounded: bool) -> np.ndarray:
        """linmaps' float64 forward on the float32 inputs, or on their bfloat16 roundings."""
        args = self.bfloat16 if rounded else self.float32
        args = [np.asarray(a, np.float64) for a in args]
        if self.map_kind == "linear":
            return self.linmaps.linear(*args)
        return self.linmaps.bilinear(*args)


def _relative_error(result, expected) -> float:
    return float(np.linalg.norm(result - expected) / np.linalg.norm(expected))


def worker_errors(session, case: Bf16Case):
    """Build the case and each variant's errors: ``{variant: {error, error_vs_rounded}}``."""
    session.end_case()
    step = Bf16Step(case, session.seed)
    exact, exact_rounded = step.reference(False), step.reference(True)
    errors = {}
    for variant in VARIANTS:
        start = time.perf_counter()
        result = step.result64(variant)
        errors[variant] = {
            "first_call_s": time.perf_counter() - start,
            "error": _relative_error(result, exact),
        }
        if variant in ("bfloat16", "torch-bf16", "bf16"):
            errors[variant]["error_vs_rounded"] = _relative_error(result, exact_rounded)
    session.case, session.state = case, step
    return errors


def worker_time(session, case: Bf16Case, settings: Settings) -> dict:
    """Median seconds per ``fwd+bwd`` of each variant over ``mixed_rounds`` rounds (after
    worker_errors on the same case), the variants' order alternating between rounds."""
    import linmaps

    if session.case != case or not isinstance(session.state, Bf16Step):
        raise RuntimeError("worker_time() needs worker_errors() on the same case")
    step = session.state
    steps = {}
    for variant in VARIANTS:
        start = time.perf_counter()
        step.step(variant)
        per_step = time.perf_counter() - start
        steps[variant] = max(
            settings.mixed_min_steps, min(10_000, math.ceil(settings.mixed_measure_s / per_step))
        )
    rounds = {variant: [] for variant in VARIANTS}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(settings.mixed_rounds):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                time.sleep(settings.settle_s)
                step.step(variant)
                times = []
                for _ in range(steps[variant]):
                    start = time.perf_counter()
                    step.step(variant)
                    times.append(time.perf_counter() - start)
                rounds[variant].append(float(np.median(times)))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        "t_s": {variant: float(np.median(rounds[variant])) for variant in VARIANTS},
        "rounds_s": rounds,
        "bfloat16_path": linmaps._config.config().get("bfloat16_path", "float32"),
    }


# ----------------------------------------------------------------------------- in the harness


class Bf16Kind(PerBackendKind):
    """The bfloat16 cases, in the worker of the torch backend (``torch``, ``torch/T``)."""

    kinds = ("bf16",)
    section = "bf16"
    order = 35
    custom_sizes = ("bf16:NxINxOUT", "bf16:NxIN1xIN2xOUT")
    defaults = DEFAULTS

    def from_dims(self, kind, dims):
        return Bf16Case("linear" if len(dims) == 3 else "bilinear", dims)

    def run(self, case, suite):
        settings, runners, progress = suite.settings, suite.runners, suite.progress
        results = {}
        for name in list(runners.proxies):
            if not _runs_bf16(runners.backends[name]):
                results[name] = {
                    "status": "not applicable",
                    "reason": "the bf16 cases run beside PyTorch bfloat16 (torch backend)",
                }
                progress.step(f"{case.id} {name} (not applicable)")
                continue
            progress.step(f"{case.id} {name}")
            record = results[name] = {}
            time.sleep(settings.settle_s)
            with on_backend(runners, name, record):
                record["errors"] = runners.call(name, "run", worker_errors, case)
                stats = runners.call(name, "run", worker_time, case, settings)
                record.update(status="ok", **stats)
        return {**case.to_json(), "results": results}

    def format(self, records, result, intro=True):
        return format_bf16(records, intro)

    def summary(self, records, result):
        return bf16_summary(records) if records else None


BF16_GUIDE = (
    "each variant's median fwd+bwd time, its speed-up over ieee (t_ieee / t), and its "
    "forward's relative error ||r - e|| / ||e|| against float64 on the float32 inputs "
    "(in brackets: against float64 on the bfloat16-rounded inputs)"
)


def _records(records):
    for case in records:
        for name, record in case["results"].items():
            yield case, name, record


def format_bf16(records, intro=True) -> str:
    headers = ["case", "backend", "variant", "time", "vs ieee", "error (vs rounded)", "path"]
    rows, skipped = [], {}
    for case, name, record in _records(records):
        status = record["status"]
        if status in ("unavailable", "not applicable"):
            skipped.setdefault(status, []).append(name)
            continue
        if status == "error":
            rows.append([case["id"], name, "ERROR", "", "", "", ""])
            rows.append(f"  {record['error']}")
            continue
        t_ieee = record["t_s"]["ieee"]
        for variant in VARIANTS:
            err = record["errors"][variant]
            error = f"{err['error']:.2g}"
            if "error_vs_rounded" in err:
                error += f" ({err['error_vs_rounded']:.2g})"
            rows.append(
                [
                    case["id"],
                    name,
                    variant,
                    format_seconds(record["t_s"][variant]),
                    f"{t_ieee / record['t_s'][variant]:.2f}x",
                    error,
                    record["bfloat16_path"] if variant == "bfloat16" else "",
                ]
            )
    lines = []
    if intro:
        lines += [
            "bf16: linmaps' float32 precision modes, bfloat16 arrays, PyTorch bfloat16",
            BF16_GUIDE,
        ]
    text = "\n".join(lines) + "\n" + render_table(headers, rows, right_aligned={3, 4, 5})
    notes = [f"not run: {', '.join(dict.fromkeys(n))} ({s})" for s, n in skipped.items()]
    if notes:
        text += "\n" + "\n".join(f"  ({note})" for note in notes)
    return text


def bf16_summary(records) -> str:
    cells = []
    for case, name, record in _records(records):
        if record["status"] == "ok":
            t = record["t_s"]
            cells.append(
                f"{case['id'][len('bf16-') :]} bfloat16 {t['ieee'] / t['bfloat16']:.2f}x, "
                f"bf16 {t['ieee'] / t['bf16']:.2f}x, bf16x3 {t['ieee'] / t['bf16x3']:.2f}x"
            )
        elif record["status"] == "error":
            cells.append(f"{case['id']} {name} ERROR")
    return "bf16 speed-up over linmaps float32 (ieee): " + ("; ".join(cells) or "-")


register_kind(Bf16Kind())
