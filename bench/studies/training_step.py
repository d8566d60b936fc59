"""A Bilinear layer's training step (forward + backward) with the forward's T kept, against the
same step computing T again, and the per-call costs of a one-sample step.

    python bench/studies/training_step.py [--rounds 15] [--threads N]

Prints, per suite shape (float32): the best step time of each way, measured in alternating
rounds of a few steps in one process, the speed-up, and each way's rate as a fraction of the same run's
2048^3 GEMM rate (counting a step as 8 units of N*L*in1*in2 multiply-adds, the suite's way,
so a kept-T rate above 1.0 is work saved). Then the one-sample (1, 16, 16, 8) calls in
microseconds. Check ``uptime`` first: the numbers mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import time
import timeit

import numpy as np
from _timing import suite_bilinear_shapes

import linmaps

STEPS_PER_ROUND = 4

SHAPES = suite_bilinear_shapes()


def gemm_rate(rounds):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    b = rng.standard_normal((2048, 2048), dtype=np.float32)
    a @ b
    best = min(timeit.repeat(lambda: a @ b, number=1, repeat=rounds))
    return 2 * 2048**3 / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        linmaps.set_num_threads(args.threads)
    # Hand NumPy's BLAS to linmaps' threads before the first GEMM: otherwise OpenBLAS's own
    # threads, used by that GEMM, spin for about 90 ms after it and the first shape's steps
    # run at half speed (docs/performance.md, "Mixing").
    linmaps.share_blas_threads()
    print(f"load average {os.getloadavg()[0]:.2f}, linmaps threads {linmaps.get_num_threads()}")
    gemm_before = gemm_rate(args.rounds)
    rng = np.random.default_rng(1)
    print(
        f"{'(N,in1,in2,L)':>22} {'recompute':>10} {'kept T':>10} {'speed-up':>9} "
        f"{'recompute/GEMM':>15} {'kept/GEMM':>10}"
    )
    rows = []
    for n, in1, in2, out in SHAPES:
        x1 = rng.standard_normal((n, in1), dtype=np.float32)
        x2 = rng.standard_normal((n, in2), dtype=np.float32)
        g = rng.standard_normal((n, out), dtype=np.float32)
        kept = linmaps.Bilinear(in1, in2, out, seed=0)
        recompute = linmaps.Bilinear(in1, in2, out, seed=0, keep_bytes=0)
        times = {"recompute": [], "kept": []}
        # Rounds of STEPS_PER_ROUND steps of one layer, then of the other: a training loop runs
        # one layer step after step, with its weight and kept T warm in the caches; the first
        # step of each round, after the other layer's, is not counted.
        for _ in range(args.rounds):
            for name, layer in (("recompute", recompute), ("kept", kept)):
                for step in range(STEPS_PER_ROUND):
                    start = time.perf_counter()
                    layer(x1, x2)
                    layer.backward(g)
                    if step > 0:
                        times[name].append(time.perf_counter() - start)
        best = {name: min(values) for name, values in times.items()}
        rows.append(((n, in1, in2, out), best))
    # The best GEMM rate of the run, as the steps are their best times (the conservative choice).
    gemm = max(gemm_before, gemm_rate(args.rounds))
    for shape, best in rows:
        flops = 8 * np.prod(shape)
        print(
            f"{shape!s:>22} {best['recompute'] * 1e3:9.2f}ms {best['kept'] * 1e3:9.2f}ms "
            f"{best['recompute'] / best['kept']:9.2f} {flops / best['recompute'] / gemm:15.2f} "
            f"{flops / best['kept'] / gemm:10.2f}"
        )
    print(
        f"GEMM {gemm / 1e9:.0f} GFLOP/s (the higher of before and after: "
        f"{gemm_before / 1e9:.0f} before)"
    )

    x1 = rng.standard_normal((1, 16), dtype=np.float32)
    x2 = rng.standard_normal((1, 16), dtype=np.float32)
    g = np.ones((1, 8), np.float32)
    layer = linmaps.Bilinear(16, 16, 8, seed=0)
    w = layer.weight

    def step():
        layer(x1, x2)
        layer.backward(g)

    calls = {
        "bilinear": lambda: linmaps.bilinear(x1, x2, w),
        "bilinear_backward": lambda: linmaps.bilinear_backward(g, x1, x2, w),
        "Bilinear layer step (forward + backward)": step,
        "Bilinear layer forward, inference": lambda: layer(x1, x2, save_for_backward=False),
    }
    print("one sample, (1, 16, 16, 8) float32, best of 7 x 3000 calls:")
    for name, call in calls.items():
        best = min(timeit.repeat(call, number=3000, repeat=7)) / 3000
        print(f"  {name:45} {best * 1e6:6.2f} us")


if __name__ == "__main__":
    main()
