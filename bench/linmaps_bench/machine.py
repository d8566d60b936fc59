"""The machine and the software under test: CPU, load, versions, for the record's header."""

from __future__ import annotations

import contextlib
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
        "avx512bw",
        "avx512vl",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
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
