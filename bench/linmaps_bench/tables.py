"""Text and chart building blocks shared by every kind's report: times, ratios, tables, colours."""

from __future__ import annotations

import textwrap


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


def format_ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_percent(fraction) -> str:
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


def backend_names(result) -> list:
    """Every backend of the run, in the order they were listed."""
    return list(result["backends"])


def available_backends(result) -> list:
    return [n for n in backend_names(result) if result["backends"][n]["available"]]


def backend_color(result, name) -> str:
    """A backend's colour in every panel, whether or not the others ran."""
    return f"C{backend_names(result).index(name) % 10}"


def error_mark(ax, x) -> None:
    """``ERROR`` written upright at ``x`` in a chart panel, where a bar would be."""
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


def wrap_to_figure(fig, text: str, fontsize: float) -> str:
    """``text`` broken into lines that fit the width of ``fig`` at ``fontsize`` points
    (about 0.6 em per character: DejaVu Sans, with a margin)."""
    chars = int(fig.get_figwidth() * 72 / (0.6 * fontsize))
    return "\n".join(textwrap.wrap(text, width=max(20, chars)))
