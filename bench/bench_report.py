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
    return title + "\n" + render_table(headers, rows, right_aligned=set(range(2, len(headers))))


def format_report(result) -> str:
    parts = [format_header(result)]
    parts.extend(format_case(case, result) for case in result["cases"])
    parts.append(format_summary(result))
    return "\n\n".join(parts)


def plot(result, path) -> str:
    """Write a PNG: GFLOP/s per case and backend, one panel per operation, GEMM rate drawn.

    Returns the path; raises ImportError if matplotlib is missing (the caller reports it).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    ops = result["settings"]["ops"]
    names = [n for n in _backend_names(result) if result["backends"][n]["available"]]
    missing = [n for n in _backend_names(result) if n not in names]
    cases = result["cases"]
    gemm, size = result["reference_gemm"]["gflops"], result["reference_gemm"]["size"]
    width = 0.8 / max(1, len(names))
    fig, axes = plt.subplots(
        len(ops),
        1,
        figsize=(max(8, 1.1 * len(cases) + 3), 3.2 * len(ops) + 1.2),
        sharex=True,
        squeeze=False,
    )
    for ax, op in zip(axes[:, 0], ops):
        for b, name in enumerate(names):
            xs, heights, low, high = [], [], [], []
            for c, case in enumerate(cases):
                record = case["results"][name][op]
                x = c + (b - (len(names) - 1) / 2) * width
                if record["status"] == "ok":
                    xs.append(x)
                    heights.append(record["gflops"])
                    slow, fast = record["gflops_iqr"]
                    low.append(record["gflops"] - slow)
                    high.append(fast - record["gflops"])
                elif record["status"] == "error":
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
            # A backend keeps its colour whether or not the others ran.
            ax.bar(
                xs,
                heights,
                width,
                yerr=[low, high],
                capsize=2,
                label=name,
                color=f"C{_backend_names(result).index(name)}",
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
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if missing:
        labels = [*labels, f"not run: {', '.join(missing)} (unavailable)"]
        handles = [*handles, plt.Line2D([], [], linestyle="none")]
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(labels),
        fontsize=8,
        bbox_to_anchor=(0.5, 0.962),
        frameon=False,
    )
    axes[-1, 0].set_xticks(range(len(cases)))
    axes[-1, 0].set_xticklabels([case["id"] for case in cases], rotation=30, ha="right", fontsize=8)
    settings = result["settings"]
    fig.suptitle(
        f"linmaps throughput per case: {settings['dtype']}, {settings['threads']} "
        f"threads, {result['machine']['cpu_model']}, {result['started'][:10]}\n"
        "bars: median, whiskers: interquartile range",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.945))
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
