"""Timing loops shared by the study scripts (run them as ``python bench/studies/NAME.py``:
this folder is then first on ``sys.path``)."""

import sys
import time
from pathlib import Path

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


def suite_bilinear_shapes(min_flops=1e6):
    """The benchmark suite's default bilinear cases (bench/linmaps_bench/cases/ops.py) as
    (N, in1, in2, out), those of at least ``min_flops`` forward flops (the large ones)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from linmaps_bench.cases.ops import DEFAULTS

    return [
        case.dims
        for case in DEFAULTS
        if case.kind == "bilinear" and 2 * np.prod(case.dims) >= min_flops
    ]
