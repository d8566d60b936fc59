"""``show_config()``: what this installation of linmaps is built from and runs with."""

from __future__ import annotations

import platform
import sys

import numpy as np

from . import _backend


def config() -> dict:
    """The facts ``show_config`` prints, as a dict (for bug reports and benchmark records)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        linmaps_version = version("linmaps")
    except PackageNotFoundError:
        linmaps_version = "0+unknown"
    info = {
        "linmaps": linmaps_version,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "backend": _backend.get_backend(),
        "available_backends": list(_backend.available_backends()),
        "num_threads": _backend.get_num_threads(),
    }
    if _backend._cpp_backend is None:
        info["compiled"] = f"unavailable ({_backend._cpp_error})"
    else:
        from . import _core

        info.update(
            {
                "compiled": "yes",
                "eigen": _core.eigen_version,
                "compiler": _core.compiler,
                "cxx_flags": _core.cxx_flags.strip(),
                "simd": _core.simd,
                "openmp": _core.openmp,
            }
        )
    return info


def show_config() -> None:
    """Print linmaps, NumPy and Eigen versions, compiler and flags, SIMD, threads, backend."""
    for key, value in config().items():
        print(f"{key:>20}: {value}")
