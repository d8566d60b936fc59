"""``show_config()``: what this installation of linmaps is built from and runs with."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

from . import _backend, _bf16_kernel, _threads


def _openmp_runtime() -> str:
    """Path of the OpenMP runtime library loaded in this process (bundled or system); all of
    them when there are several (linmaps' wheel and torch's each bring a libgomp)."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                name = os.path.basename(path)
                if name.startswith(("libgomp", "libomp", "libiomp")) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    if not paths:
        return "runtime not identified"
    if len(paths) == 1:
        return paths[0]
    return f"{len(paths)} runtimes loaded: {', '.join(paths)}"


def _torch_version(version, not_found) -> dict:
    """``{"torch": version}`` when PyTorch is installed (for ``linmaps.torch``), else ``{}``.

    Read from the package metadata, so that show_config() does not import torch (seconds).
    """
    if "torch" in sys.modules:
        return {"torch": str(sys.modules["torch"].__version__)}
    try:
        return {"torch": version("torch")}
    except not_found:
        return {}


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
        **_torch_version(version, PackageNotFoundError),
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
        core = _backend._cpp_backend._core  # the module of the selected instruction set
        info.update(
            {
                "compiled": "yes",
                "eigen": core.eigen_version,
                "compiler": core.compiler,
                "cxx_flags": " ".join(core.cxx_flags.split()),
                "isa": _backend._cpp_backend.isa,
                "available_isas": list(_backend._cpp_backend.available_isas),
                "simd": core.simd,
                # AMX is not built: "avx512_bf16" or "float32" (docs/bfloat16.md).
                "bfloat16_path": _bf16_kernel.path,
                "openmp": f"{core.openmp} ({_openmp_runtime()})",
                "openmp_wait": _threads.wait_policy,
                **(
                    {}
                    if _threads.torch_wait_policy is None
                    else {"torch_openmp_wait": _threads.torch_wait_policy}
                ),
                "thread_cap": int(core.thread_cap()),
                "blas_threads": _threads.describe(),
            }
        )
    return info


def show_config() -> None:
    """Print versions (linmaps, NumPy, PyTorch if installed, Eigen), compiler and flags, the
    instruction set selected and those available, OpenMP runtime and its spin setting, thread
    count and cap, whose threads NumPy's BLAS runs on, the backend, and the path of bfloat16
    products (``avx512_bf16`` or ``float32``)."""
    for key, value in config().items():
        print(f"{key:>20}: {value}")
