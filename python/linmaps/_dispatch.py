"""Runtime CPU dispatch: import the compiled kernel module best suited to this CPU.

The build compiles the same kernels once per x86-64 instruction-set level, as separate
extension modules: ``_core`` (baseline x86-64), ``_core_avx2`` (x86-64-v3: AVX2, FMA) and
``_core_avx512`` (x86-64-v4), plus ``_core_native`` (``-march=native``) in a source build
configured with ``LINMAPS_NATIVE=ON``. ``_core`` always loads and tells which levels the CPU
supports; the best one that is both supported and built is chosen, unless ``LINMAPS_CPU``
asks for another. ``native`` counts as supported when built: it was built on this machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

LEVELS = ("baseline", "avx2", "avx512", "native")
_MODULES = {
    "baseline": "_core",
    "avx2": "_core_avx2",
    "avx512": "_core_avx512",
    "native": "_core_native",
}


class CpuLevelError(RuntimeError):
    """``LINMAPS_CPU`` names an unknown level, or one this CPU or build cannot run."""


def _import(level: str):
    return importlib.import_module(f"{__package__}.{_MODULES[level]}")


def _built(level: str) -> bool:
    # find_spec locates the file without running it: a module's own initialisation may
    # already use its instruction set, so nothing is imported before the CPU is checked.
    return importlib.util.find_spec(f"{__package__}.{_MODULES[level]}") is not None


def _supported(core, level: str) -> bool:
    return level == "native" or core.cpu_supports(level)


def available(core) -> tuple[str, ...]:
    """Levels this CPU supports and this installation was built for, lowest first."""
    return tuple(lv for lv in LEVELS if _supported(core, lv) and _built(lv))


def load(core):
    """The kernel module to use, and its level."""
    levels = available(core)
    forced = os.environ.get("LINMAPS_CPU", "").strip().lower()
    if not forced:
        return _import(levels[-1]), levels[-1]
    if forced not in LEVELS:
        raise CpuLevelError(
            f"LINMAPS_CPU={os.environ['LINMAPS_CPU']!r} is not an instruction-set "
            f"level; valid levels are {', '.join(map(repr, LEVELS))}"
        )
    if forced not in levels:
        why = (
            "this installation was not built with it"
            if _supported(core, forced)
            else "this CPU does not support it"
        )
        raise CpuLevelError(
            f"LINMAPS_CPU={forced!r} cannot be used: {why}; available here: {', '.join(levels)}"
        )
    return _import(forced), forced
