"""Peak extra memory of a call: RSS accounting through /proc (Linux, glibc)."""

from __future__ import annotations

import gc

MEMORY_METHOD = (
    "peak RSS (VmHWM, reset through /proc/self/clear_refs) during the first, "
    "checked backward call of each case in the backend's own worker process, "
    "minus the RSS just before it (inputs made, pools warmed on tiny problems, "
    "torch's forward graph built, glibc's free heap pages handed back with "
    "malloc_trim so that memory freed earlier is not silently reused)"
)

_malloc_trim = None


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_accounting_problem() -> str | None:
    """None if this process can measure the peak RSS of a call, else why not."""
    global _malloc_trim
    try:
        _status_kib("VmRSS")
    except (OSError, ValueError):
        return "needs Linux's /proc/self/status"
    if not _reset_peak_rss():
        return "needs a writable /proc/self/clear_refs (Linux >= 4.0)"
    try:
        import ctypes

        _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return "needs glibc (malloc_trim)"
    return None


def start_peak_measurement() -> int:
    """Hand glibc's free heap pages back and reset the peak RSS; the RSS now, in KiB.

    Needs :func:`_rss_accounting_problem` to have returned None in this process."""
    gc.collect()
    _malloc_trim(0)
    baseline_kib = _status_kib("VmRSS")
    _reset_peak_rss()
    return baseline_kib


def peak_rss_kib() -> int:
    """The peak RSS since :func:`start_peak_measurement`, in KiB."""
    return _status_kib("VmHWM")


def rss_accounting_problem() -> str | None:
    """None if this process can measure the peak RSS of a call, else why not."""
    return _rss_accounting_problem()
