"""The printed report and the PNG chart of a record (:func:`linmaps_bench.run_suite`)."""

from __future__ import annotations

import os

from .cases import case_kinds
from .tables import available_backends, backend_color, backend_names, wrap_to_figure


def format_header(result) -> str:
    """Machine, versions, reference rate and backends; before any case has run, the GEMM end
    rate is not known yet and the line says so."""
    settings, machine, versions = result["settings"], result["machine"], result["versions"]
    gemm = result["reference_gemm"]
    duration = f" ({result['duration_s']:.0f} s)" if "duration_s" in result else ""
    if gemm.get("gflops_end") is None:
        rate = f"{gemm['gflops_start']:.1f} GFLOP/s at the start (the 'of GEMM' columns)"
    else:
        rate = (
            f"{gemm['gflops']:.1f} GFLOP/s (start {gemm['gflops_start']:.1f}, "
            f"end {gemm['gflops_end']:.1f})"
        )
    lines = [
        f"linmaps benchmark, {result['started']}{duration}"
        f"{'  [--quick]' if settings['quick'] else ''}",
        f"machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs; "
        f"{settings['dtype']}, {settings['threads']} threads for every backend",
        f"versions: linmaps {versions['linmaps']}, numpy {versions['numpy']}, "
        f"torch {versions['torch'] or '-'}; build SIMD: {versions['build_simd'] or '-'}",
        f"reference: numpy.matmul {gemm['size']}x{gemm['size']} {gemm['dtype']}: {rate}",
    ]
    for name, status in result["backends"].items():
        if status["available"]:
            lines.append(f"backend {name}: available")
        else:
            lines.append(f"backend {name}: UNAVAILABLE ({status['reason']})")
    return "\n".join(lines)


def format_cases(result) -> list:
    """Every kind's tables, kinds in their order."""
    parts = []
    for case_kind in case_kinds():
        records = result.get(case_kind.section, [])
        if records:
            parts.append(case_kind.format(records, result))
    return parts


def format_summary(result) -> str:
    """Each kind's summary (the linear and bilinear table, the mixing ratios, ...)."""
    parts = []
    for case_kind in case_kinds():
        part = case_kind.summary(result.get(case_kind.section, []), result)
        if part:
            parts.append(part)
    text = "\n".join(parts)
    return text if text.startswith("summary") else "summary: " + text


def format_quiet(result) -> str:
    """One ``WARNING`` line per sign that the machine was not quiet; empty when it was."""
    quiet = result.get("quiet") or {"warnings": []}
    return "\n".join(
        f"WARNING: the machine was not quiet: {warning}; these timings may be off, rerun on "
        "a quiet machine"
        for warning in quiet["warnings"]
    )


def format_end(result) -> str:
    """What the report prints once every case has run: the reference GEMM at the start and
    the end, the summary, and the quiet-machine warnings."""
    gemm = result["reference_gemm"]
    parts = [
        f"finished in {result['duration_s']:.0f} s; reference GEMM: {gemm['gflops']:.1f} "
        f"GFLOP/s (start {gemm['gflops_start']:.1f}, end {gemm['gflops_end']:.1f}; the "
        "JSON's rates use the median of all its samples)",
        format_summary(result),
    ]
    warnings = format_quiet(result)
    if warnings:
        parts.append(warnings)
    return "\n\n".join(parts)


def format_report(result) -> str:
    """The whole report at once: header, every case's table, summary, warnings."""
    parts = [format_header(result), *format_cases(result), format_summary(result)]
    warnings = format_quiet(result)
    if warnings:
        parts.append(warnings)
    return "\n\n".join(parts)


def plot(result, path) -> str:
    """Write the PNG chart: a title, one line of the backends' colours, then each kind's
    panels (``CaseKind.chart_panels``) one above the other.

    Returns the path; raises ImportError if matplotlib is missing (the caller reports it).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = []
    n_cases = 1
    for case_kind in case_kinds():
        records = result.get(case_kind.section, [])
        panels += case_kind.chart_panels(records, result)
        n_cases = max(n_cases, len(records))
    names = available_backends(result)
    missing = [n for n in backend_names(result) if n not in names]
    # A panel is (axes height, draw) or (axes height, draw, inches for what is under it).
    heights = [0.25] + [panel[0] for panel in panels]
    fig_height = sum(heights) + sum(panel[2] for panel in panels if len(panel) > 2) + 0.7
    fig = plt.figure(figsize=(max(8.0, 0.95 * n_cases + 2.5), fig_height), layout="constrained")
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    legend_ax = fig.add_subplot(grid[0, 0])
    legend_ax.axis("off")
    handles = [Patch(color=backend_color(result, name)) for name in names]
    labels = list(names)
    if missing:
        labels.append(f"not run: {', '.join(missing)} (unavailable)")
        handles.append(plt.Line2D([], [], linestyle="none"))
    legend_ax.legend(
        handles,
        labels,
        loc="center",
        ncol=len(labels),
        fontsize=8,
        frameon=False,
        borderaxespad=0,
        handlelength=1.5,
    )
    for row, panel in enumerate(panels, start=1):
        panel[1](fig.add_subplot(grid[row, 0]))
    settings = result["settings"]
    quick = ", --quick" if settings["quick"] else ""
    title = (
        f"linmaps benchmark: {settings['dtype']}, {settings['threads']} threads{quick}, "
        f"{result['machine']['cpu_model']}, {result['started'][:10]}"
    )
    quiet = result.get("quiet")
    if quiet and not quiet["quiet"]:
        title += (
            "\nWARNING: the machine was not quiet ("
            + "; ".join(
                "reference GEMM " + f"{100 * quiet['gemm_change']:+.0f}% from start to end"
                if "GEMM" in warning
                else f"load average {quiet['load_start']:.2f} at the start"
                for warning in quiet["warnings"]
            )
            + "): these timings may be off"
        )
    title = "\n".join(wrap_to_figure(fig, line, 10) for line in title.split("\n"))
    fig.suptitle(title, fontsize=10, color="black" if not quiet or quiet["quiet"] else "darkred")
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
