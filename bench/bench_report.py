"""Turn a benchmark record (``linmaps_bench.run_suite``) into text tables and a PNG chart."""

from __future__ import annotations

import os


def format_seconds(seconds) -> str:
    """Three significant digits in the unit that fits: ``12.3 us``, ``1.23 ms``, ``2.05 s``."""
    if seconds is None:
        return "-"
    for scale, unit in ((1e-6, "us"), (1e-3, "ms"), (1.0, "s")):
        value = seconds / scale
        if value < 1000 or unit == "s":
            digits = 2 if value < 10 else 1 if value < 100 else 0
            return f"{value:.{digits}f} {unit}"
    raise AssertionError("unreachable")


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(fraction) -> str:
    return f"{100 * fraction:.1f}%" if fraction < 0.1 else f"{100 * fraction:.0f}%"


def render_table(headers, rows, right_aligned=()) -> str:
    """Columns padded to their widest cell; a row of one string spans the whole line."""
    widths = [len(h) for h in headers]
    for row in rows:
        if isinstance(row, str):
            continue
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells):
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i in right_aligned else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [line(headers), "  ".join("-" * w for w in widths)]
    for row in rows:
        lines.append("  " + row if isinstance(row, str) else line(row))
    return "\n".join(lines)


def _backend_names(result) -> list:
    return list(result["backends"])


def format_header(result) -> str:
    settings, machine, versions = result["settings"], result["machine"], result["versions"]
    gemm = result["reference_gemm"]
    lines = [
        f"linmaps benchmark, {result['started']} ({result['duration_s']:.0f} s)"
        f"{'  [--quick]' if settings['quick'] else ''}",
        f"machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs; "
        f"{settings['dtype']}, {settings['threads']} threads for every backend",
        f"versions: linmaps {versions['linmaps']}, numpy {versions['numpy']}, "
        f"torch {versions['torch'] or '-'}; build SIMD: {versions['build_simd'] or '-'}",
        f"reference: numpy.matmul {gemm['size']}x{gemm['size']} {gemm['dtype']}: "
        f"{gemm['gflops']:.1f} GFLOP/s (start {gemm['gflops_start']:.1f}, "
        f"end {gemm['gflops_end']:.1f})",
    ]
    for name, status in result["backends"].items():
        if status["available"]:
            lines.append(f"backend {name}: available")
        else:
            lines.append(f"backend {name}: UNAVAILABLE ({status['reason']})")
    return "\n".join(lines)


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
        for name in _backend_names(result):
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
                    _percent(record["roofline_fraction"]),
                    "" if name == "cpp" else _ratio(speedup),
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


def format_mixed(result) -> str:
    """The mixed cases: per case and backend, the three medians and the ratio."""
    headers = ["case", "backend", "t_numpy", "t_linmaps", "t_alternating", "ratio", "rounds"]
    rows, skipped, environments = [], {}, {}
    for case in result["mixed"]:
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
    dtype = result["mixed"][0].get("dtype", result["settings"]["dtype"])
    lines = [
        f"mixed: one training step of a NumPy model, NumPy products and linmaps calls "
        f"alternating in one process ({dtype}, median time per step)",
        MIXED_GUIDE,
        "rounds: the ratio's lowest and highest value over the rounds (their number)",
    ]
    lines += [f"  {case['id']}: {case['description']}" for case in result["mixed"]]
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


def _mixed_summary(result) -> str:
    parts = []
    for case in result["mixed"]:
        cells = []
        for name, record in case["results"].items():
            if record["status"] == "ok":
                cells.append(f"{name} {record['ratio']:.2f}")
            elif record["status"] == "error":
                cells.append(f"{name} ERROR")
        if cells:
            parts.append(f"{case['id']}: {', '.join(cells)}")
    return "mixing ratio (1.00 = free, target >= 0.9): " + ("; ".join(parts) or "-")


def format_summary(result) -> str:
    """Every case and operation on one line: medians, and speedups of the reference backend
    (``cpp`` when it ran, else the first backend listed, e.g. ``cpp@avx512``)."""
    names = [n for n in _backend_names(result) if result["backends"][n]["available"]]
    ref = "cpp" if "cpp" in names else (names[0] if names else None)
    others = [n for n in names if n != ref]
    headers = ["case", "op", *names, *(f"{ref} vs {n}" for n in others)]
    rows = []
    for case in result["cases"]:
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
                row.append(_ratio(other["median_s"] / base["median_s"] if ok else None))
            rows.append(row)
    title = (
        f"summary: median time per call; '{ref} vs X' = X's median / {ref}'s median "
        f"(above 1: {ref} is faster)"
    )
    text = title + "\n" + render_table(headers, rows, right_aligned=set(range(2, len(headers))))
    if not result.get("mixed"):
        return text
    if not result["cases"]:
        return "summary: " + _mixed_summary(result)
    return text + "\n" + _mixed_summary(result)


def format_report(result) -> str:
    parts = [format_header(result)]
    parts.extend(format_case(case, result) for case in result["cases"])
    if result.get("mixed"):
        parts.append(format_mixed(result))
    parts.append(format_summary(result))
    return "\n\n".join(parts)


def plot(result, path) -> str:
    """Write a PNG: GFLOP/s per case and backend, one panel per operation, GEMM rate drawn;
    below them, when the run had mixed cases, a panel of their ratios with the 0.9 target.

    Returns the path; raises ImportError if matplotlib is missing (the caller reports it).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    cases, mixed = result["cases"], result.get("mixed", [])
    ops = result["settings"]["ops"] if cases else []
    all_names = _backend_names(result)
    names = [n for n in all_names if result["backends"][n]["available"]]
    missing = [n for n in all_names if n not in names]
    gemm, size = result["reference_gemm"]["gflops"], result["reference_gemm"]["size"]
    width = 0.8 / max(1, len(names))
    # The operations' panels (sharing their x axis), then the mixed cases' panel.
    heights = ([3.2 * len(ops)] if ops else []) + ([2.6] if mixed else [])
    # 0.9 inch on top for the title and the legend, whatever the number of panels.
    fig_height = sum(heights) + 0.9
    fig = plt.figure(figsize=(max(8, 1.1 * len(cases) + 3), fig_height))
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    op_axes = []
    if ops:
        op_grid = grid[0, 0].subgridspec(len(ops), 1)
        op_axes = list(op_grid.subplots(sharex=True, squeeze=False)[:, 0])
    for ax, op in zip(op_axes, ops):
        for b, name in enumerate(names):
            xs, bar_heights, low, high = [], [], [], []
            for c, case in enumerate(cases):
                record = case["results"][name][op]
                x = c + (b - (len(names) - 1) / 2) * width
                if record["status"] == "ok":
                    xs.append(x)
                    bar_heights.append(record["gflops"])
                    slow, fast = record["gflops_iqr"]
                    low.append(record["gflops"] - slow)
                    high.append(fast - record["gflops"])
                elif record["status"] == "error":
                    _error_mark(ax, x)
            # A backend keeps its colour whether or not the others ran.
            ax.bar(
                xs,
                bar_heights,
                width,
                yerr=[low, high],
                capsize=2,
                label=name,
                color=f"C{all_names.index(name)}",
            )
        ax.axhline(
            gemm,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"roofline: numpy GEMM {size}x{size}, {gemm:.0f} GFLOP/s",
        )
        ax.set_yscale("log")
        ax.set_ylabel("GFLOP/s")
        ax.set_title(op, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    if op_axes:
        op_axes[-1].set_xticks(range(len(cases)))
        op_axes[-1].set_xticklabels(
            [case["id"] for case in cases], rotation=30, ha="right", fontsize=8
        )
        handles, labels = op_axes[0].get_legend_handles_labels()
    else:
        from matplotlib.patches import Patch

        labels = list(names)
        handles = [Patch(color=f"C{all_names.index(name)}") for name in names]
    if mixed:
        _plot_mixed(fig.add_subplot(grid[len(heights) - 1, 0]), mixed, names, all_names)
    if missing:
        labels = [*labels, f"not run: {', '.join(missing)} (unavailable)"]
        handles = [*handles, plt.Line2D([], [], linestyle="none")]
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(labels),
        fontsize=8,
        bbox_to_anchor=(0.5, 1 - 0.45 / fig_height),
        frameon=False,
    )
    settings = result["settings"]
    what = "throughput per case" if cases else "in a NumPy program"
    fig.suptitle(
        f"linmaps {what}: {settings['dtype']}, {settings['threads']} "
        f"threads, {result['machine']['cpu_model']}, {result['started'][:10]}"
        + ("\nbars: median, whiskers: interquartile range" if cases else ""),
        fontsize=10,
        y=1 - 0.06 / fig_height,
        va="top",
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig_height))
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _error_mark(ax, x) -> None:
    ax.text(
        x,
        0.03,
        "ERROR",
        rotation=90,
        ha="center",
        va="bottom",
        color="red",
        transform=ax.get_xaxis_transform(),
        fontsize=7,
    )


def _plot_mixed(ax, mixed, names, all_names) -> None:
    """The mixed cases' ratios: a bar per case and backend (whiskers: interquartile range of
    the rounds' ratios), 1.0 (mixing costs nothing) and the 0.9 target drawn."""
    import numpy as np

    runs = [n for n in names if any(c["results"][n]["status"] in ("ok", "error") for c in mixed)]
    width = 0.8 / max(1, len(runs))
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
                _error_mark(ax, x)
        ax.bar(xs, ratios, width, yerr=[low, high], capsize=2, color=f"C{all_names.index(name)}")
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
