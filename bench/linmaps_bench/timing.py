"""Timing loops: samples of one operation (calibrated, GC off), their statistics, the GEMM."""

from __future__ import annotations

import gc
import math
import time

import numpy as np

from .settings import REFERENCE_GEMM_SIZE, Settings


def time_calls(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def summarize(samples) -> dict:
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    return {
        "median_s": float(median),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "min_s": float(min(samples)),
        "max_s": float(max(samples)),
        "n_samples": len(samples),
        "samples_s": [float(s) for s in samples],
    }


def time_operation(fn, context, first_call_s: float, settings: Settings) -> dict:
    """Warm up, calibrate, then take the samples of one operation; seconds per call.

    A sample loops over the call ``calls_per_sample`` times (so that microsecond calls are not
    lost in the timer's resolution) and reports the mean of the loop; the samples' median and
    quartiles are what the tables show.
    """
    threshold = settings.first_call_is_sample_above_s
    if threshold is not None and first_call_s > threshold:
        return {"calls_per_sample": 1, "first_call_only": True, **summarize([first_call_s])}
    with context():
        per_call = first_call_s
        # The first call paid one-time costs (page faults, lazy init). A second, untimed call
        # is skipped only with --quick and only when it would be expensive.
        if settings.extra_warmup or per_call < 0.1:
            per_call = time_calls(fn, 1)
        number = max(1, min(100_000, math.ceil(settings.min_sample_s / max(per_call, 1e-9))))
        if number > 1:  # a single short call is a noisy estimate; refine it on a loop
            per_call = time_calls(fn, number)
            number = max(1, min(100_000, math.ceil(settings.min_sample_s / max(per_call, 1e-9))))
    affordable = int(settings.budget_s // (per_call * number))
    target = max(settings.min_samples, min(settings.repeat, affordable))
    samples = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # like timeit: a collection in the middle of a sample is not the kernel's cost
    try:
        for _ in range(target):
            with context():
                samples.append(time_calls(fn, number))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"calls_per_sample": number, "first_call_only": False, **summarize(samples)}


def measure_gemm(dtype, repeats: int, size: int = REFERENCE_GEMM_SIZE) -> list:
    """Seconds per ``numpy.matmul`` of two ``size x size`` matrices, ``repeats`` samples."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    c = np.empty_like(a)
    np.matmul(a, b, out=c)  # warm-up: BLAS buffers and threads
    return [time_calls(lambda: np.matmul(a, b, out=c), 1) for _ in range(repeats)]
