"""The machine and the software under test: CPU, load, versions; was the machine quiet?"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import sys

import numpy as np

from .backends import linmaps
from .threads import thread_pools


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    cpuinfo = ""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f,
    ):
        cpuinfo = f.read()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    cores = set(
        re.findall(r"^physical id\s*:\s*(\d+)$.*?^core id\s*:\s*(\d+)$", cpuinfo, re.M | re.S)
    )
    simd_flags = (
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512dq",
        "avx512bw",
        "avx512vl",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
        "asimd",
        "sve",
    )
    cpu_flags = set(flags.group(1).split()) if flags else set()
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "physical_cores": len(cores) or None,
        "cpu_simd_flags": [f for f in simd_flags if f in cpu_flags],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions(backend_status: dict) -> dict:
    config = linmaps._config.config()
    torch_info = backend_status.get("torch", {}).get("info", {})
    result = {
        "linmaps": config.get("linmaps"),
        "linmaps_path": os.path.dirname(linmaps.__file__),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "torch": torch_info.get("version"),
        "compiled": config.get("compiled"),
        "compiler": config.get("compiler"),
        "cxx_flags": config.get("cxx_flags"),
        "eigen": config.get("eigen"),
        "openmp": config.get("openmp"),
        "build_simd": config.get("simd"),
        "blas": [p for p in thread_pools() if p.get("user_api") == "blas"],
    }
    with contextlib.suppress(ImportError):
        import threadpoolctl

        result["threadpoolctl"] = threadpoolctl.__version__
    with contextlib.suppress(ImportError):
        import matplotlib

        result["matplotlib"] = matplotlib.__version__
    return result


# ----------------------------------------------------------------------------- quiet machine

# The reference GEMM may move this much (relative) between the start and the end of a run.
GEMM_CHANGE_LIMIT = 0.10
# Load the machine may carry besides the run's own process (daemons, a shell, the terminal).
BACKGROUND_LOAD = 0.5


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), None where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22 (starttime, in clock ticks since boot) follows the command name in
            # parentheses, which may itself hold spaces or parentheses.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime_s = float(f.read().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def own_load(age_s: float | None) -> float:
    """What this process alone adds to the 1-minute load average after ``age_s`` seconds of
    running (one runnable task: the kernel's average moves towards 1 as ``1 - exp(-t/60)``);
    1.0, the most it can add, when the age is unknown."""
    if age_s is None:
        return 1.0
    return 1.0 - math.exp(-age_s / 60.0)


def quiet_check(
    gemm_start_gflops: float,
    gemm_end_gflops: float | None,
    load_start,
    own_load_start: float,
) -> dict:
    """Was the machine quiet during a run? ``{"quiet", "warnings", "gemm_change", ...}``.

    Two signs that it was not, each with its warning: the reference GEMM rate changed by more
    than :data:`GEMM_CHANGE_LIMIT` between the start and the end (something else took the
    cores during the run), or the 1-minute load average at the start (``load_start``, as
    ``os.getloadavg()``) exceeded what the run explains: its own process
    (``own_load_start``, see :func:`own_load`) plus :data:`BACKGROUND_LOAD`.
    """
    warnings = []
    change = None
    if gemm_end_gflops is not None and gemm_start_gflops > 0:
        change = gemm_end_gflops / gemm_start_gflops - 1.0
        if abs(change) > GEMM_CHANGE_LIMIT:
            warnings.append(
                f"the reference GEMM went from {gemm_start_gflops:.1f} to "
                f"{gemm_end_gflops:.1f} GFLOP/s ({100 * change:+.0f}%, more than "
                f"{100 * GEMM_CHANGE_LIMIT:.0f}%) between the start and the end: something "
                "else used the CPUs during the run"
            )
    explained = own_load_start + BACKGROUND_LOAD
    load = None if not load_start else float(load_start[0])
    if load is not None and load > explained:
        warnings.append(
            f"the load average was {load:.2f} at the start, more than the {explained:.2f} "
            f"this run explains ({own_load_start:.2f} for its own process + "
            f"{BACKGROUND_LOAD} for background tasks): other processes were busy in the "
            "minute before it"
        )
    return {
        "quiet": not warnings,
        "warnings": warnings,
        "gemm_change": change,
        "load_start": load,
        "load_explained": explained,
    }
