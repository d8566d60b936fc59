"""How linmaps' OpenMP pool lives with NumPy's BLAS pool in one process.

Two measures, both described in docs/performance.md ("Mixing linmaps with NumPy's BLAS"):

* **A short spin for linmaps' OpenMP threads.** libgomp's waiting threads (idle ones after
  a parallel region, and those at a barrier) spin about 10 ms (300,000 rounds) before they
  sleep, taking cores from anything else that runs then. libgomp reads ``GOMP_SPINCOUNT``
  once, when it is loaded, so linmaps sets it just while its compiled module (and with it,
  in a wheel, its own copy of libgomp) loads, and restores the environment right after. A
  user's own ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` wins.
* **One pool for NumPy's BLAS and linmaps.** OpenBLAS (0.3.27 and later) lets a program run
  its parallel calls on the program's own threads (``openblas_set_threads_callback_function``).
  linmaps gives every OpenBLAS loaded in the process (NumPy's, SciPy's) a callback that runs
  each call's jobs on linmaps' OpenMP team, one job per thread. OpenBLAS still decides how
  many jobs and how to split the work, so NumPy's results are unchanged; its own threads,
  never woken again, sleep. This starts at linmaps' first call that uses threads, so a
  program that imports linmaps but never calls it keeps OpenBLAS as it was.
  ``LINMAPS_BLAS_THREADS=native`` (read at import) leaves OpenBLAS alone;
  :func:`linmaps.share_blas_threads` switches at run time.
"""

from __future__ import annotations

import contextlib
import os
import warnings

# libgomp's spin before a waiting thread sleeps, in rounds of its wait loop (about 33 ns
# each on the machine of docs/performance.md, so about 70 us): long enough to bridge two
# regions of a call and two calls of a loop, short enough that a thread waiting for a
# descheduled teammate soon gives its core back. Chosen by measurement
# (bench/studies/contention.py, mixed_programs.py; docs/performance.md).
SPINCOUNT = "2000"
_WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")

# What happened at import, for show_config().
wait_policy = "not set"


def _loaded_openmp_runtimes() -> set:
    return {path for path in _mapped_libraries() if os.path.basename(path).startswith("libgomp")}


def _mapped_libraries() -> list:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line and ".so" in line}
    except OSError:
        return []
    return sorted(paths)


@contextlib.contextmanager
def short_spin_while_importing_torch():
    """Import torch (from linmaps.torch) with linmaps' short spin for torch's own libgomp.

    A linmaps wheel bundles its libgomp under another name (``libgomp-<hash>.so.1``) than
    torch's wheel (``libgomp.so.1``): when linmaps loads first, a torch imported afterwards
    starts a second OpenMP pool whose idle threads would spin libgomp's default 10 ms after
    every PyTorch op, on the cores linmaps' threads then need (docs/torch.md, "Threads").
    Only when torch is not loaded yet, and never over the user's own setting.
    """
    global torch_wait_policy
    if any(name in os.environ for name in _WAIT_VARIABLES):
        torch_wait_policy = "the user's"
        yield
        return
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    try:
        yield
    finally:
        del os.environ["GOMP_SPINCOUNT"]
    torch_wait_policy = f"GOMP_SPINCOUNT={SPINCOUNT} (set by linmaps.torch when importing torch)"


# What linmaps.torch found or did for torch's libgomp (show_config); None: not imported.
torch_wait_policy = None


@contextlib.contextmanager
def short_spin_while_loading():
    """Set GOMP_SPINCOUNT while the compiled module (and its libgomp) load, then restore it."""
    global wait_policy
    user = [name for name in _WAIT_VARIABLES if name in os.environ]
    if user:
        wait_policy = "the user's " + ", ".join(f"{n}={os.environ[n]}" for n in user)
        yield
        return
    before = _loaded_openmp_runtimes()
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    try:
        yield
    finally:
        del os.environ["GOMP_SPINCOUNT"]
    loaded = _loaded_openmp_runtimes() - before
    if loaded and before:
        # A libgomp of another name was loaded first (torch's, say). If that library made it
        # global, the dynamic linker binds linmaps' OpenMP calls to it, with its own spin
        # (docs/torch.md, "Threads").
        names = ", ".join(sorted(os.path.basename(p) for p in before))
        wait_policy = (
            f"GOMP_SPINCOUNT={SPINCOUNT} for linmaps' libgomp; but {names} was loaded first and "
            "may serve linmaps' OpenMP calls with its own setting"
        )
    elif loaded:
        wait_policy = f"GOMP_SPINCOUNT={SPINCOUNT} (set by linmaps when loading its libgomp)"
    else:
        # The libgomp linmaps links was already loaded (by another library), with its own
        # setting; linmaps cannot change it any more.
        wait_policy = "libgomp's own (it was loaded before linmaps)"


# ----------------------------------------------------------------------------- BLAS pool

_core = None  # the compiled module whose callback OpenBLAS gets
_shared = False


def _openblas_loaded() -> bool:
    return any("openblas" in os.path.basename(p).lower() for p in _mapped_libraries())


def _env_mode() -> str:
    value = os.environ.get("LINMAPS_BLAS_THREADS", "").strip().lower()
    if value in ("", "shared"):
        return "shared"
    if value == "native":
        return "native"
    warnings.warn(
        f"LINMAPS_BLAS_THREADS={os.environ['LINMAPS_BLAS_THREADS']!r} is neither 'shared' nor "
        "'native'; using 'shared'",
        RuntimeWarning,
        stacklevel=4,
    )
    return "shared"


def setup(core) -> None:
    """At import: share the BLAS pool unless LINMAPS_BLAS_THREADS=native.

    Sharing starts at linmaps' first call that uses threads (the C++ side gives the callback
    to the OpenBLAS libraries then): a program that imports linmaps but never calls it keeps
    OpenBLAS exactly as it was.
    """
    global _core
    _core = core
    set_shared(_env_mode() == "shared", now=False)


def set_shared(enable: bool, now: bool = True) -> None:
    """Give every OpenBLAS loaded now (with ``now``; else from linmaps' next threaded call)
    and later the callback (True), or give them back their own threads (False)."""
    global _shared
    if _core is None:
        return
    _shared = bool(enable)
    _core.blas_set_sharing(_shared)
    if _shared and now:
        _core.blas_refresh()


def shared_libraries() -> list:
    """Paths of the OpenBLAS libraries whose parallel calls run on linmaps' pool."""
    return [path for path, _ in _core.blas_installed()] if _core is not None else []


def describe() -> str:
    if _core is None:
        return "no compiled backend"
    libraries = shared_libraries()
    if libraries:
        names = ", ".join(os.path.basename(path) for path in libraries)
        return f"shared with linmaps' OpenMP pool ({names})"
    if _core.in_forked_child():
        return "OpenBLAS's own threads (forked child of a process with OpenMP threads)"
    if not _shared:
        return "OpenBLAS's own threads (LINMAPS_BLAS_THREADS=native or share_blas_threads(False))"
    if _openblas_loaded() and not _core.blas_looked():
        return "OpenBLAS's own threads until linmaps' first threaded call"
    if _openblas_loaded():
        return "OpenBLAS's own threads (no threads callback in this OpenBLAS; 0.3.27+ has one)"
    return "no OpenBLAS loaded"
