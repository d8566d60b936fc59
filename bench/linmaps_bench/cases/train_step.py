"""Train-step cases: one SGD training step of a PyTorch model with one ``Bilinear`` layer,
``torch.nn.Bilinear`` against ``linmaps.torch.Bilinear``, in the torch backend's worker."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass

import numpy as np

from ..backends import ThreadCountBackend, TorchBackend
from ..oracle import Oracle
from ..settings import Settings
from ..tables import backend_color, error_mark, format_seconds, render_table
from ..timing import time_calls
from . import PerBackendKind, on_backend, register_kind
from .ops import DEFAULTS as OPS_DEFAULTS
from .ops import Case, make_inputs

# The two models of a case, in the order they are reported.
VARIANTS = ("torch.nn", "linmaps.torch")
LEARNING_RATE = 1e-4  # small: the step's cost, not the training, is measured


@dataclass(frozen=True)
class TrainStepCase:
    """One training step: ``z = Bilinear(in1, in2, out)(x1, x2)``, ``loss = (z * g).sum()``,
    ``loss.backward()``, ``torch.optim.SGD.step()``.

    ``dims`` is ``(N, in1, in2, out)``, as for a bilinear case, whose inputs (seeded the same
    way) it uses: ``g`` is that case's ``grad_out``, so the gradients are those of its
    ``fwd+bwd`` operation, checked against the same float64 oracle. ``x1`` and ``x2`` require
    gradients (the layer sits inside a model: its input gradients flow back to earlier layers)
    and are not updated; the SGD step updates the layer's weight and bias.
    """

    dims: tuple

    kind = "train-step"  # not a field: the same for every case
    names = ("N", "in1", "in2", "out")

    def __post_init__(self):
        if len(self.dims) != 4 or any(int(d) < 1 for d in self.dims):
            raise ValueError(f"a train-step case needs 4 positive sizes, got {self.dims}")

    @property
    def id(self) -> str:
        return "train-step-" + "x".join(map(str, self.dims))

    @property
    def bilinear_case(self) -> Case:
        return Case("bilinear", self.dims)

    def describe(self) -> str:
        n, in1, in2, n_out = self.dims
        return (
            f"N={n}; Bilinear({in1}, {in2}, {n_out}): forward, backward (inputs, weight, "
            f"bias), SGD step"
        )

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "dims": list(self.dims),
            "dim_names": list(self.names),
            "description": self.describe(),
            "flops": self.bilinear_case.flops("fwd+bwd"),
        }


# A default run's train-step cases: the sizes of the default bilinear cases.
DEFAULTS = tuple(TrainStepCase(case.dims) for case in OPS_DEFAULTS if case.kind == "bilinear")


def _runs_train_step(backend) -> bool:
    base = backend.base if isinstance(backend, ThreadCountBackend) else backend
    return isinstance(base, TorchBackend)


# ----------------------------------------------------------------------------- in the worker


class TrainStep:
    """The two models of a case with the case's weights, and one step of each."""

    def __init__(self, case: TrainStepCase, dtype, seed: int):
        import torch

        import linmaps.torch as lt

        inputs = make_inputs(case.bilinear_case, dtype, seed)
        tensors = {name: torch.from_numpy(array) for name, array in inputs.items()}
        _, in1, in2, n_out = case.dims
        self.grad_out = tensors["grad_out"]
        self.inputs = [tensors["x1"].clone().requires_grad_(), tensors["x2"].clone()]
        self.inputs[1].requires_grad_()
        self.models, self.optimizers = {}, {}
        for name, layer_class in zip(VARIANTS, (torch.nn.Bilinear, lt.Bilinear)):
            model = layer_class(in1, in2, n_out, dtype=tensors["x1"].dtype)
            with torch.no_grad():
                model.weight.copy_(tensors["weight"])
                model.bias.copy_(tensors["bias"])
            self.models[name] = model
            self.optimizers[name] = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def step(self, name: str):
        """One training step of model ``name``; returns ``z`` (detached)."""
        model, optimizer = self.models[name], self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        for tensor in self.inputs:
            tensor.grad = None
        z = model(*self.inputs)
        (z * self.grad_out).sum().backward()
        optimizer.step()
        return z.detach()

    def first_step(self, name: str) -> tuple:
        """One step, and its outputs before the update (``Case.output_names("fwd+bwd")``)."""
        model = self.models[name]
        z = self.step(name)
        grads = [t.grad for t in self.inputs] + [model.weight.grad, model.bias.grad]
        return [z.numpy().copy()] + [g.detach().numpy().copy() for g in grads]


def worker_first_steps(session, case: TrainStepCase):
    """Build both models and run one step of each: ``{variant: (seconds, outputs)}``."""
    import torch

    session.end_case()
    step = TrainStep(case, session.dtype, session.seed)
    results = {}
    with torch.enable_grad():
        for name in VARIANTS:
            start = time.perf_counter()
            outputs = step.first_step(name)
            results[name] = (time.perf_counter() - start, outputs)
    session.case, session.state = case, step
    return results


def worker_time(session, case: TrainStepCase, settings: Settings) -> dict:
    """Time a step of each model, in rounds (in the worker, after worker_first_steps)."""
    import torch

    import linmaps

    if session.case != case or not isinstance(session.state, TrainStep):
        raise RuntimeError("worker_time() needs worker_first_steps() on the same case")
    with torch.enable_grad():
        stats = time_train_steps(session.state, settings)
    stats.update(
        torch_threads=torch.get_num_threads(),
        linmaps_threads=linmaps.get_num_threads(),
        torch_version=torch.__version__,
    )
    return stats


def time_train_steps(step: TrainStep, settings: Settings) -> dict:
    """Median seconds per step of each model over ``mixed_rounds`` rounds.

    Each round times both models one after the other (the order alternates), each after a
    ``settle_s`` pause and untimed warm-up steps (``mixed_warmup_steps``, one for a step
    slower than 0.1 s), over at least ``mixed_min_steps`` steps and ``mixed_measure_s``
    seconds; the round's figure is the median step. ``speedup = t_torch.nn / t_linmaps.torch``
    of the medians over the rounds.
    """
    per_step = {name: time_calls(lambda n=name: step.step(n), 1) for name in VARIANTS}
    steps = {
        name: max(settings.mixed_min_steps, min(10_000, math.ceil(settings.mixed_measure_s / t)))
        for name, t in per_step.items()
    }
    warmup = {name: 1 if t > 0.1 else settings.mixed_warmup_steps for name, t in per_step.items()}
    rounds = {name: [] for name in VARIANTS}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(settings.mixed_rounds):
            for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                time.sleep(settings.settle_s)
                for _ in range(warmup[name]):
                    step.step(name)
                times = []
                for _ in range(steps[name]):
                    start = time.perf_counter()
                    step.step(name)
                    times.append(time.perf_counter() - start)
                rounds[name].append(float(np.median(times)))
    finally:
        if gc_was_enabled:
            gc.enable()
    t = {name: float(np.median(rounds[name])) for name in VARIANTS}
    return {
        "t_torch_nn_s": t["torch.nn"],
        "t_linmaps_torch_s": t["linmaps.torch"],
        "speedup": t["torch.nn"] / t["linmaps.torch"],
        "speedup_rounds": [a / b for a, b in zip(rounds["torch.nn"], rounds["linmaps.torch"])],
        "n_rounds": settings.mixed_rounds,
        "rounds_s": rounds,
        "steps_per_round": steps,
    }


# ----------------------------------------------------------------------------- in the harness


def check_first_steps(oracle: Oracle, first: dict) -> dict:
    """Each model's first-step outputs against the bilinear case's oracle."""
    return {name: oracle.check("fwd+bwd", outputs) for name, (_, outputs) in first.items()}


class TrainStepKind(PerBackendKind):
    """The train-step cases, in the worker of the torch backend (``torch``, ``torch/T``)."""

    kinds = ("train-step",)
    section = "train_step"
    order = 30
    custom_sizes = ("train-step:NxIN1xIN2xOUT",)
    defaults = DEFAULTS

    def from_dims(self, kind, dims):
        return TrainStepCase(dims)

    def run(self, case, suite):
        settings, runners, progress = suite.settings, suite.runners, suite.progress
        dtype = np.dtype(settings.dtype)
        progress.step(f"{case.id}: oracle", 0, major=True)
        oracle = Oracle(
            case.bilinear_case, make_inputs(case.bilinear_case, dtype, settings.seed), dtype
        )
        results = {}
        for name in list(runners.proxies):
            if not _runs_train_step(runners.backends[name]):
                results[name] = {
                    "status": "not applicable",
                    "reason": "the train-step cases compare two PyTorch models (torch backend)",
                }
                progress.step(f"{case.id} {name} (not applicable)")
                continue
            progress.step(f"{case.id} {name}")
            record = results[name] = {}
            time.sleep(settings.settle_s)
            with on_backend(runners, name, record):
                first = runners.call(name, "run", worker_first_steps, case)
                checks = check_first_steps(oracle, first)
                record["first_step_s"] = {variant: first[variant][0] for variant in VARIANTS}
                record["check"] = {variant: c.to_json() for variant, c in checks.items()}
                del first
                wrong = {variant: c for variant, c in checks.items() if not c.ok}
                if wrong:  # reported as an error, never timed
                    record.update(
                        status="error",
                        error="; ".join(f"{v}: {c.message}" for v, c in wrong.items()),
                    )
                    continue
                stats = runners.call(name, "run", worker_time, case, settings)
                record.update(status="ok", **stats)
        return {**case.to_json(), "dtype": settings.dtype, "results": results}

    def format(self, records, result, intro=True):
        return format_train_step(records, result, intro)

    def summary(self, records, result):
        return train_step_summary(records) if records else None

    def chart_panels(self, records, result):
        if not records:
            return []
        return [(2.6, lambda ax: plot_train_step(ax, records, result))]


TRAIN_STEP_GUIDE = (
    "speedup = t_torch.nn / t_linmaps.torch (same process, same threads); "
    "the target is >= 20 at 1024x128x128x64 and >= 1 everywhere"
)


def _ok_records(records):
    for case in records:
        for name, record in case["results"].items():
            yield case, name, record


def format_train_step(records, result, intro=True) -> str:
    """Per case and torch backend: both models' median step, the speed-up, its range."""
    headers = ["case", "backend", "torch.nn", "linmaps.torch", "speedup", "rounds"]
    rows, skipped = [], {}
    for case, name, record in _ok_records(records):
        status = record["status"]
        if status in ("unavailable", "not applicable"):
            skipped.setdefault(status, []).append(name)
            continue
        if status == "error":
            rows.append([case["id"], name, "ERROR", "", "", ""])
            rows.append(f"  {record['error']}")
            continue
        per_round = record["speedup_rounds"]
        rows.append(
            [
                case["id"],
                name,
                format_seconds(record["t_torch_nn_s"]),
                format_seconds(record["t_linmaps_torch_s"]),
                f"{record['speedup']:.1f}x",
                f"{min(per_round):.1f}-{max(per_round):.1f} ({len(per_round)})",
            ]
        )
    lines = []
    if intro:
        dtype = records[0].get("dtype", result["settings"]["dtype"])
        lines += [
            "train-step: one SGD step of a PyTorch model with one Bilinear layer, "
            f"torch.nn.Bilinear vs linmaps.torch.Bilinear ({dtype}, median time per step)",
            TRAIN_STEP_GUIDE,
            "rounds: the speed-up's lowest and highest value over the rounds (their number)",
        ]
    text = "\n".join(lines) + "\n" + render_table(headers, rows, right_aligned={2, 3, 4, 5})
    notes = [f"not run: {', '.join(dict.fromkeys(n))} ({s})" for s, n in skipped.items()]
    if notes:
        text += "\n" + "\n".join(f"  ({note})" for note in notes)
    return text


def train_step_summary(records) -> str:
    cells = []
    for case, name, record in _ok_records(records):
        if record["status"] == "ok":
            cells.append(f"{case['id'][len('train-step-') :]} {record['speedup']:.1f}x")
        elif record["status"] == "error":
            cells.append(f"{case['id']} {name} ERROR")
    return "train-step speed-up of linmaps.torch over torch.nn: " + (", ".join(cells) or "-")


def plot_train_step(ax, records, result) -> None:
    """The speed-ups on a log scale, a bar per case and torch backend (whiskers: the rounds'
    lowest and highest), 1x and the 20x target drawn."""
    names = [n for n, s in result["backends"].items() if s["available"]]
    runs = [n for n in names if any(c["results"][n]["status"] in ("ok", "error") for c in records)]
    width = 0.8 / max(1, len(runs))
    for b, name in enumerate(runs):
        xs, speedups, low, high = [], [], [], []
        for c, case in enumerate(records):
            record = case["results"][name]
            x = c + (b - (len(runs) - 1) / 2) * width
            if record["status"] == "ok":
                xs.append(x)
                speedups.append(record["speedup"])
                low.append(max(0.0, record["speedup"] - min(record["speedup_rounds"])))
                high.append(max(0.0, max(record["speedup_rounds"]) - record["speedup"]))
            elif record["status"] == "error":
                error_mark(ax, x)
        ax.bar(xs, speedups, width, yerr=[low, high], capsize=2, color=backend_color(result, name))
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="1x: as fast as torch.nn")
    ax.axhline(20.0, color="red", linestyle="--", linewidth=1, label="20x target (1024x128x128x64)")
    ax.set_xlim(-0.6, len(records) - 0.4)
    ax.set_xticks(range(len(records)))
    ax.set_xticklabels([case["id"][len("train-step-") :] for case in records], fontsize=8)
    ax.set_ylabel("t_torch.nn / t_linmaps.torch", fontsize=8)
    ax.set_title(
        "train-step: SGD step of a model with one Bilinear layer, linmaps.torch vs torch.nn",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", frameon=False)


register_kind(TrainStepKind())
