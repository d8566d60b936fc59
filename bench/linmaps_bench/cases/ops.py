"""Linear and bilinear cases: each operation (forward, backward, fwd+bwd) timed per backend,
after the oracle's check; their defaults, inputs, flop counts, tables and chart panels."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np

from ..oracle import Oracle
from ..tables import (
    available_backends,
    backend_color,
    backend_names,
    error_mark,
    format_percent,
    format_ratio,
    format_seconds,
    render_table,
    wrap_to_figure,
)
from . import CaseKind, backend_errors, end_case, register_kind, seeded_rng

# Flops per operation as a multiple of prod(dims) = N*in*out (linear) or N*in1*in2*out
# (bilinear), the counts of docs/spec.md. Bias terms are not counted.
FLOP_FACTORS = {
    "linear": {"forward": 2, "backward": 4, "fwd+bwd": 6},
    "bilinear": {"forward": 2, "backward": 6, "fwd+bwd": 8},
}


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


# The linear and bilinear cases of a default run (a new size: one line here).
DEFAULTS = (
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
)


def make_inputs(case: Case, dtype, seed: int = 0) -> dict:
    """Seeded random inputs; weights scaled like PyTorch's default init so outputs are O(1)."""
    rng = seeded_rng(case, seed)
    dtype = np.dtype(dtype)
    fan_in = math.prod(case.dims[1:-1])
    inputs = {}
    for name, shape in case.input_shapes().items():
        scale = 1.0 / math.sqrt(fan_in) if name in ("weight", "bias") else 1.0
        array = rng.standard_normal(shape, dtype=dtype)  # float32 directly: half the time
        array *= scale
        inputs[name] = array
    return inputs


class OpsKind(CaseKind):
    """Linear and bilinear maps: per operation, each backend's first call is checked against
    the oracle, then timed (:func:`linmaps_bench.timing.time_operation`); the backward's
    first call is also its peak-memory measurement."""

    kinds = ("bilinear", "linear")
    section = "cases"
    order = 10
    custom_sizes = ("bilinear:NxIN1xIN2xOUT", "linear:NxINxOUT")
    defaults = DEFAULTS

    def from_dims(self, kind, dims):
        return Case(kind, dims)

    def progress_steps(self, case, settings, n_backends):
        return len(settings.ops) * n_backends

    def run(self, case, suite):
        settings, runners, progress = suite.settings, suite.runners, suite.progress
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
                with backend_errors(record):
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
            end_case(runners, name)
        return {
            **case.to_json(),
            "flops": {op: case.flops(op) for op in settings.ops},
            "results": results,
            "memory": memory,
        }

    def complete(self, record, suite, gemm_gflops):
        for backend in suite.backends:
            status = suite.status[backend.name]
            if not status["available"]:
                record["results"][backend.name] = {
                    op: {
                        "status": "unavailable",
                        "reason": status["reason"],
                        "flops": record["flops"][op],
                    }
                    for op in suite.settings.ops
                }
        record["results"] = {b.name: record["results"][b.name] for b in suite.backends}
        _add_rates(record, gemm_gflops)
        _add_speedups(record, suite.settings.ops)

    def has_errors(self, record):
        return any(
            r.get("status") == "error"
            for per_op in record["results"].values()
            for r in per_op.values()
        )

    def format(self, records, result, intro=True):
        return "\n\n".join(format_case(record, result) for record in records)

    def summary(self, records, result):
        return format_summary(records, result) if records else None

    def chart_panels(self, records, result):
        return chart_panels(records, result)


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


def format_case(case, result) -> str:
    """One case: a row per operation and backend, with rates, speedups and memory."""
    headers = [
        "op",
        "backend",
        "median",
        "IQR (25%-75%)",
        "GFLOP/s",
        "of GEMM",
        "cpp speedup",
        "bwd peak extra",
    ]
    rows = []
    unavailable = []
    for op in result["settings"]["ops"]:
        for name in backend_names(result):
            record = case["results"][name][op]
            if record["status"] == "unavailable":
                if name not in unavailable:
                    unavailable.append(name)
                continue
            if record["status"] == "error":
                rows.append([op, name, "ERROR", "", "", "", "", ""])
                rows.append(f"  {record['error']}")
                continue
            speedup = case["speedups"][op].get(f"cpp_vs_{name}")
            if record.get("first_call_only"):
                spread = "(first call only)"
            elif record["n_samples"] == 1:
                spread = "(1 sample)"
            else:
                spread = f"{format_seconds(record['q1_s'])} - {format_seconds(record['q3_s'])}"
            memory = ""
            mem = case.get("memory", {}).get(name)
            if op == "backward" and mem is not None:
                memory = (
                    f"{mem['backward_peak_extra_mib']:.1f} MiB"
                    if mem.get("status") == "ok"
                    else mem.get("status", "-")
                )
            rows.append(
                [
                    op,
                    name,
                    format_seconds(record["median_s"]),
                    spread,
                    f"{record['gflops']:.2f}",
                    format_percent(record["roofline_fraction"]),
                    "" if name == "cpp" else format_ratio(speedup),
                    memory,
                ]
            )
    title = f"{case['id']}  ({case['description']}; {result['settings']['dtype']})"
    text = title + "\n" + render_table(headers, rows, right_aligned={2, 3, 4, 5, 6, 7})
    notes = []
    if unavailable:
        notes.append(f"not run: {', '.join(unavailable)} (unavailable)")
    outputs_mib = [
        m["backward_outputs_mib"]
        for m in case.get("memory", {}).values()
        if m.get("status") == "ok"
    ]
    if outputs_mib:
        notes.append(f"the gradients themselves take {outputs_mib[0]:.1f} MiB")
    if notes:
        text += "\n  (" + "; ".join(notes) + ")"
    return text


def format_summary(records, result) -> str:
    """Every case and operation on one line: medians, and speedups of the reference backend
    (``cpp`` when it ran, else the first backend listed, e.g. ``cpp@avx512``)."""
    names = available_backends(result)
    ref = "cpp" if "cpp" in names else (names[0] if names else None)
    others = [n for n in names if n != ref]
    headers = ["case", "op", *names, *(f"{ref} vs {n}" for n in others)]
    rows = []
    for case in records:
        for op in result["settings"]["ops"]:
            row = [case["id"], op]
            for name in names:
                record = case["results"][name][op]
                row.append(
                    format_seconds(record["median_s"])
                    if record["status"] == "ok"
                    else record["status"].upper()
                )
            base = case["results"][ref][op] if ref else None
            for name in others:
                other = case["results"][name][op]
                ok = base is not None and base["status"] == "ok" and other["status"] == "ok"
                row.append(format_ratio(other["median_s"] / base["median_s"] if ok else None))
            rows.append(row)
    title = (
        f"summary: median time per call; '{ref} vs X' = X's median / {ref}'s median "
        f"(above 1: {ref} is faster)"
    )
    return title + "\n" + render_table(headers, rows, right_aligned=set(range(2, len(headers))))


def chart_panels(records, result) -> list:
    """First, per operation, how many times faster the reference backend (``cpp``) is than
    each other backend, per case (log2 axis, 1x line); then, per operation, GFLOP/s per case
    and backend against the measured GEMM rate. Only the last panel of each group names the
    cases (their x axes line up)."""
    if not records:
        return []
    ops = result["settings"]["ops"]
    names = available_backends(result)
    ref = "cpp" if "cpp" in names else (names[0] if names else None)
    others = [n for n in names if n != ref]
    panels = []
    if ref is not None and others:
        for i, op in enumerate(ops):
            panels.append(
                (
                    2.0,
                    functools.partial(
                        _draw_speedups,
                        records=records,
                        result=result,
                        op=op,
                        ref=ref,
                        others=others,
                        first=i == 0,
                        last=i == len(ops) - 1,
                    ),
                    1.1 if i == len(ops) - 1 else 0.0,  # room for the case names
                )
            )
    for i, op in enumerate(ops):
        panels.append(
            (
                1.6,
                functools.partial(
                    _draw_gflops,
                    records=records,
                    result=result,
                    op=op,
                    names=names,
                    first=i == 0,
                    last=i == len(ops) - 1,
                ),
                1.1 if i == len(ops) - 1 else 0.0,  # room for the case names
            )
        )
    return panels


def _times(value: float) -> str:
    """``41x``, ``2.3x``, ``0.78x``: the precision a reader of a bar wants."""
    if value >= 9.95:
        return f"{value:.0f}x"
    return f"{value:.1f}x" if value >= 1 else f"{value:.2f}x"


def _case_axis(ax, records, op, last) -> None:
    ax.set_xlim(-0.5, len(records) - 0.5)
    ax.set_xticks(range(len(records)))
    if last:
        ax.set_xticklabels([case["id"] for case in records], rotation=25, ha="right", fontsize=8)
    else:
        ax.set_xticklabels([])
    # The operation's name on the right, outside the bars' way.
    ax.text(
        1.004,
        0.5,
        op,
        transform=ax.transAxes,
        rotation=270,
        va="center",
        ha="left",
        fontsize=9,
        weight="bold",
    )


def _draw_speedups(ax, records, result, op, ref, others, first, last) -> None:
    from matplotlib.ticker import FuncFormatter

    width = 0.8 / len(others)
    low_end, high_end = 1.0, 1.0
    for b, name in enumerate(others):
        xs, ratios, whisker_low, whisker_high = [], [], [], []
        for c, case in enumerate(records):
            x = c + (b - (len(others) - 1) / 2) * width
            base, other = case["results"][ref][op], case["results"][name][op]
            if "error" in (base["status"], other["status"]):
                error_mark(ax, x)
                continue
            if base["status"] != "ok" or other["status"] != "ok":
                continue
            ratio = other["median_s"] / base["median_s"]
            # From the quartiles: the other's fast quartile over cpp's slow one, and back.
            low, high = other["q1_s"] / base["q3_s"], other["q3_s"] / base["q1_s"]
            xs.append(x)
            ratios.append(ratio)
            whisker_low.append(max(0.0, ratio - low))
            whisker_high.append(max(0.0, high - ratio))
            low_end, high_end = min(low_end, low, ratio), max(high_end, high, ratio)
            ax.text(  # beyond the whisker's end
                x,
                high * 1.08 if ratio >= 1 else low / 1.08,
                _times(ratio),
                ha="center",
                va="bottom" if ratio >= 1 else "top",
                fontsize=6.5,
            )
        # Bars grow from the 1x line: up where the reference is faster, down where slower.
        heights = [r - 1 for r in ratios]
        ax.bar(xs, heights, width, bottom=1, color=backend_color(result, name))
        ax.errorbar(
            xs,
            ratios,
            yerr=[whisker_low, whisker_high],
            fmt="none",
            ecolor="black",
            elinewidth=0.7,
            capsize=1.5,
        )
    ax.set_yscale("log", base=2)
    ax.set_ylim(min(0.5, low_end / 1.5), max(2.0, high_end * 2.2))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_ylabel(f"{ref} is N times\nas fast as", fontsize=8)
    ax.grid(axis="y", which="major", alpha=0.3)
    _case_axis(ax, records, op, last)
    if first:
        title = (
            f"How many times faster is {ref} than each alternative? Their median time / "
            f"{ref}'s, same run (log2 axis; above the 1x line {ref} is faster; whiskers "
            "from the quartiles)"
        )
        ax.set_title(wrap_to_figure(ax.figure, title, 9), fontsize=9)


def _draw_gflops(ax, records, result, op, names, first, last) -> None:
    gemm = result["reference_gemm"]
    width = 0.8 / max(1, len(names))
    for b, name in enumerate(names):
        xs, bar_heights, low, high = [], [], [], []
        for c, case in enumerate(records):
            record = case["results"][name][op]
            x = c + (b - (len(names) - 1) / 2) * width
            if record["status"] == "ok":
                xs.append(x)
                bar_heights.append(record["gflops"])
                slow, fast = record["gflops_iqr"]
                low.append(record["gflops"] - slow)
                high.append(fast - record["gflops"])
            elif record["status"] == "error":
                error_mark(ax, x)
        ax.bar(
            xs,
            bar_heights,
            width,
            yerr=[low, high],
            capsize=1.5,
            error_kw={"elinewidth": 0.7},
            color=backend_color(result, name),
        )
    ax.axhline(gemm["gflops"], color="black", linestyle="--", linewidth=1)
    ax.text(
        -0.45,
        gemm["gflops"] * 1.08,
        f"measured GEMM rate {gemm['gflops']:.0f} GFLOP/s",
        ha="left",
        va="bottom",
        fontsize=7,
    )
    ax.set_yscale("log")
    top = max([gemm["gflops"]] + [h for h in ax.get_ylim()[1:]])
    ax.set_ylim(top=top * 3)
    ax.set_ylabel("GFLOP/s", fontsize=8)
    ax.grid(axis="y", which="major", alpha=0.3)
    _case_axis(ax, records, op, last)
    if first:
        title = (
            f"GFLOP/s against the measured GEMM rate (dashed: numpy.matmul "
            f"{gemm['size']}x{gemm['size']} {gemm['dtype']} in this run, with the same "
            "threads; log axis; whiskers: quartiles)"
        )
        ax.set_title(wrap_to_figure(ax.figure, title, 9), fontsize=9)


register_kind(OpsKind())
