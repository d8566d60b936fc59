"""Timing loops shared by the study scripts (run them as ``python bench/studies/NAME.py``:
this folder is then first on ``sys.path``)."""

import time

import numpy as np


def samples_s(f, reps, warmup=1):
    """Seconds per call of ``reps`` timed calls of ``f``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return times


def best_s(f, reps):
    """Fastest of ``reps`` calls, in seconds (one warm-up call)."""
    return min(samples_s(f, reps))


def median_ms(f, reps, warmup=5):
    """Median of ``reps`` calls, in milliseconds."""
    return float(np.median(samples_s(f, reps, warmup))) * 1e3
