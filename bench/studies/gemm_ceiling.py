"""How fast a kept-T bilinear training step could be if its three products ran at the speed of
NumPy's own BLAS for their shapes: a ceiling for the suite's "of GEMM" rates.

    python bench/studies/gemm_ceiling.py [--repeat 30]

With T kept, a bilinear forward + backward does three products of N*L*p*q multiply-adds each
(p = max(in1, in2), q = min(in1, in2); docs/kernels.md):

    T  = P @ What       (N x p) @ (p x Lq)      the forward
    dP = W @ What.T     (N x Lq) @ (Lq x p)     the backward, dP
    dW = P.T @ W        (p x N) @ (N x Lq)      the backward, weight gradient

This times each with ``numpy.matmul`` into a preallocated output (float32, best of --repeat),
beside a 2048^3 product in the same run, and prints each product's rate as a fraction of the
2048^3 rate, and the step's rate counted the suite's way (8 units), assuming nothing else
costs anything: no row dots, no W = dZ (x) Q, no dQ. linmaps' own step also does those, so
its "of GEMM" rate above this ceiling means its products beat OpenBLAS's for these shapes.
The theoretical ceiling, every product at the 2048^3 rate, is 8/6 = 1.33.
"""

from __future__ import annotations

import argparse
import os
import timeit

import numpy as np
from _timing import suite_bilinear_shapes

import linmaps

SHAPES = suite_bilinear_shapes()


def best(call, repeat):
    call()
    return min(timeit.repeat(call, number=1, repeat=repeat))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    # NumPy's BLAS on linmaps' threads from the start, as in a program that uses linmaps
    # (docs/performance.md, "Mixing").
    linmaps.share_blas_threads()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    c = np.empty_like(a)
    gemm = 2 * 2048**3 / best(lambda: np.matmul(a, a, out=c), 7)
    print(f"load average {os.getloadavg()[0]:.2f}, 2048^3 GEMM {gemm / 1e9:.0f} GFLOP/s")
    print(f"{'(N,in1,in2,L)':>22} {'T':>6} {'dP':>6} {'dW':>6} {'step ceiling (8 units)':>23}")
    for n, in1, in2, out in SHAPES:
        p, q = max(in1, in2), min(in1, in2)
        big = rng.standard_normal((p, out * q), dtype=np.float32)
        x = rng.standard_normal((n, p), dtype=np.float32)
        w = rng.standard_normal((n, out * q), dtype=np.float32)
        t_out = np.empty((n, out * q), np.float32)
        dp_out = np.empty((n, p), np.float32)
        dw_out = np.empty((p, out * q), np.float32)
        unit = 2 * n * p * q * out / gemm  # one product at the 2048^3 rate
        times = [
            best(lambda: np.matmul(x, big, out=t_out), args.repeat),
            best(lambda: np.matmul(w, big.T, out=dp_out), args.repeat),
            best(lambda: np.matmul(x.T, w, out=dw_out), args.repeat),
        ]
        rates = [unit / t for t in times]
        step = 4 * unit / sum(times)
        print(
            f"{(n, in1, in2, out)!s:>22} " + " ".join(f"{r:6.2f}" for r in rates) + f" {step:23.2f}"
        )


if __name__ == "__main__":
    main()
