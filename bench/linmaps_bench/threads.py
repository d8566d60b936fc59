"""Thread counts: one setting for linmaps, NumPy's BLAS and a backend; the pools as seen."""

from __future__ import annotations

from .backends import linmaps


def apply_threads(threads: int, backends=()):
    """Give linmaps, NumPy's BLAS and every backend ``threads`` threads.

    Returns ``(report, restore)``: what each library now reports, and a function that puts
    linmaps' and the native pools' previous sizes back (for in-process callers such as tests).
    """
    report = {"requested": threads}
    previous_linmaps = linmaps.get_num_threads()
    limiter = None
    try:
        import threadpoolctl
    except ImportError:
        report["threadpoolctl"] = (
            "not installed: NumPy's BLAS pool follows the environment "
            "(bench/run.py sets OPENBLAS_NUM_THREADS and friends)"
        )
    else:
        limiter = threadpoolctl.threadpool_limits(limits=threads)
        report["threadpoolctl"] = threadpoolctl.__version__
    linmaps.set_num_threads(threads)
    for backend in backends:
        backend.set_num_threads(threads)
    report["linmaps"] = linmaps.get_num_threads()
    report["pools"] = thread_pools()

    def restore():
        if limiter is not None:
            limiter.restore_original_limits()
        linmaps.set_num_threads(previous_linmaps)

    return report, restore


def thread_pools() -> list:
    """The native thread pools threadpoolctl sees (BLAS, OpenMP), with their sizes."""
    try:
        import threadpoolctl
    except ImportError:
        return []
    keep = (
        "user_api",
        "internal_api",
        "version",
        "num_threads",
        "threading_layer",
        "architecture",
        "prefix",
    )
    return [{k: pool.get(k) for k in keep if k in pool} for pool in threadpoolctl.threadpool_info()]
