"""Backend registry: which implementation runs the arithmetic behind the public functions.

``"cpp"`` is the compiled ``linmaps._core`` (Eigen + OpenMP); ``"python"`` is the pure-NumPy
backend, always available. The choice is a process-wide default (``set_backend``, or the
``LINMAPS_BACKEND`` environment variable read at import) that ``use_backend`` overrides for
the current thread or async task only.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import numbers
import os
import threading
import warnings

import numpy as np

from . import _dispatch, _numpy_backend, _threads

BACKENDS = ("cpp", "python")

_cpp_backend = None
_cpp_error: str | None = None
try:
    # _core first, so that a missing or broken build is reported as such. Its libgomp is
    # loaded with a short spin (_threads).
    with _threads.short_spin_while_loading():
        importlib.import_module(f"{__package__}._core")
        _cpp_backend = importlib.import_module(f"{__package__}._cpp_backend")
except _dispatch.CpuLevelError:
    raise  # LINMAPS_CPU asked for something impossible: say so rather than fall back
except Exception as exc:  # any failure to load the compiled module means "use NumPy"
    _cpp_error = f"{type(exc).__name__}: {exc}"

if _cpp_backend is not None:
    _threads.setup(_cpp_backend._core)

# The dispatched kernel module when it has the front end's fast paths (None otherwise).
fast_core = None
if _cpp_backend is not None and all(
    hasattr(_cpp_backend._core, f)
    for f in (
        "bilinear_forward_fast",
        "bilinear_backward_fast",
        "linear_forward_fast",
        "linear_backward_fast",
    )
):
    fast_core = _cpp_backend._core

_env_choice = os.environ.get("LINMAPS_BACKEND", "").strip().lower() or None
if _env_choice is not None and _env_choice not in BACKENDS:
    raise ValueError(
        f"LINMAPS_BACKEND={os.environ['LINMAPS_BACKEND']!r} is not a backend; "
        f"valid backends are {', '.join(map(repr, BACKENDS))}"
    )
if _cpp_backend is None and _env_choice != "python":
    warnings.warn(
        f"linmaps: the compiled backend could not be loaded ({_cpp_error}); "
        "using the NumPy backend",
        RuntimeWarning,
        stacklevel=2,
    )

_default = "cpp" if _cpp_backend is not None and _env_choice != "python" else "python"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "linmaps_backend", default=None
)
_lock = threading.Lock()
_python_threads = os.cpu_count() or 1  # only reported: the NumPy backend uses NumPy's pool


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; valid backends are {', '.join(map(repr, BACKENDS))}"
        )
    if name == "cpp" and _cpp_backend is None:
        raise RuntimeError(f"the 'cpp' backend is not available: {_cpp_error}")
    return name


def available_backends() -> tuple[str, ...]:
    """The backends that can run in this process, the compiled one first when present."""
    return BACKENDS if _cpp_backend is not None else ("python",)


def get_backend() -> str:
    """The backend that calls from this thread use now: ``"cpp"`` or ``"python"``."""
    return _override.get() or _default


def set_backend(name: str) -> None:
    """Make ``name`` (``"cpp"`` or ``"python"``) the process-wide default backend.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` if ``"cpp"`` is requested
    but the compiled module could not be loaded.
    """
    global _default
    name = _check_name(name)
    with _lock:
        _default = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: use backend ``name`` inside the ``with`` block (this thread only)."""
    token = _override.set(_check_name(name))
    try:
        yield name
    finally:
        _override.reset(token)


def current():
    """The module implementing the active backend."""
    return _cpp_backend if get_backend() == "cpp" else _numpy_backend


def get_num_threads() -> int:
    """Number of threads the compiled kernels use (OpenMP); follows ``OMP_NUM_THREADS``."""
    if _cpp_backend is not None:
        return int(_cpp_backend.get_num_threads())
    return _python_threads


def set_num_threads(n: int) -> None:
    """Set the number of threads of the compiled kernels, for every Python thread.

    The NumPy backend's speed is governed by NumPy's BLAS pool instead (use threadpoolctl).
    """
    global _python_threads, _user_threads
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads(): n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"set_num_threads(): n must be at least 1, got {n}")
    n = min(int(n), thread_cap())
    if _cpp_backend is not None:
        _cpp_backend.set_num_threads(n)
    _python_threads = n
    _user_threads = True


# Whether set_num_threads was called: then linmaps.torch leaves the count alone.
_user_threads = False
_followed = 0


def follow_num_threads(n: int) -> None:
    """Use ``n`` threads (linmaps.torch passes ``torch.get_num_threads()`` at every call),
    unless the user chose linmaps' own count with :func:`set_num_threads`."""
    global _followed
    if _user_threads or n == _followed or _cpp_backend is None:
        return
    _cpp_backend.set_num_threads(max(1, min(int(n), thread_cap())))
    _followed = n


def share_blas_threads(enable: bool = True) -> None:
    """Run NumPy's BLAS on linmaps' threads (``True``, the default) or on its own (``False``).

    With ``True``, every OpenBLAS in the process that supports it (0.3.27 and later: NumPy's
    and SciPy's wheels) runs its parallel calls on linmaps' OpenMP threads, one job per
    thread, so that NumPy products and linmaps calls do not fight over the cores. OpenBLAS
    still chooses how many jobs and how to split the work: NumPy's results and thread count
    are unchanged. ``False`` gives OpenBLAS its own threads back; call it when no other
    thread is inside a NumPy product. ``LINMAPS_BLAS_THREADS=native`` in the environment
    makes ``False`` the setting at import. ``show_config()`` tells which is in effect.
    """
    if not isinstance(enable, (bool, np.bool_)):
        raise TypeError(f"share_blas_threads(): enable must be a bool, got {type(enable).__name__}")
    _threads.set_shared(bool(enable))


def thread_cap() -> int:
    """The most threads linmaps ever uses: 4 per CPU this process may run on.

    ``set_num_threads`` and ``OMP_NUM_THREADS`` above it are lowered to it: more threads than
    that only add switching to compute-bound kernels, and thousands of them can exhaust the
    process's thread limit.
    """
    if _cpp_backend is not None:
        return int(_cpp_backend._core.thread_cap())
    return _THREADS_PER_CPU * _usable_cpus()


_THREADS_PER_CPU = 4


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_openmp_env() -> None:
    """Warn once, at import, about an OMP_NUM_THREADS linmaps cannot follow."""
    raw = os.environ.get("OMP_NUM_THREADS")
    if raw is None:
        return
    first = raw.split(",")[0].strip()  # OpenMP allows a list, one count per nesting level
    value = int(first) if first.isdigit() else 0
    if value < 1:
        why = "is not a positive integer"
    elif value > thread_cap():
        why = f"asks for more than the {thread_cap()} threads linmaps ever uses (4 per CPU)"
    else:
        return
    warnings.warn(
        f"linmaps: OMP_NUM_THREADS={raw!r} {why}; linmaps uses {get_num_threads()} threads",
        RuntimeWarning,
        stacklevel=4,
    )


_check_openmp_env()
