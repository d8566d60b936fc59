"""Median ms of linmaps' bilinear kernels by stage, with 1 and 2 threads.

    python bench/studies/bilinear_stages.py [NxIN1xIN2xOUT]     (default 256x64x64x64)

The whole backward, stage 1 alone (input gradients), each input gradient alone, stage 2
alone (weight gradient) and the forward, float32, 200 calls each after 5 warm-up calls.
"""

import sys

import numpy as np
from _timing import median_ms

import linmaps

rng = np.random.default_rng(0)
N, m, n, L = map(int, (sys.argv[1] if len(sys.argv) > 1 else "256x64x64x64").split("x"))
x1 = rng.standard_normal((N, m), dtype=np.float32)
x2 = rng.standard_normal((N, n), dtype=np.float32)
W = rng.standard_normal((L, m, n), dtype=np.float32)
g = rng.standard_normal((N, L), dtype=np.float32)


def t(f, reps=200):
    return median_ms(f, reps)


ops = {
    "all": lambda: linmaps.bilinear_backward(g, x1, x2, W),
    "stage1 (dx1,dx2)": lambda: linmaps.bilinear_backward(
        g, x1, x2, W, bias=False, need_weight=False
    ),
    "dx1 only": lambda: linmaps.bilinear_backward(
        g, x1, x2, W, bias=False, need_weight=False, need_x2=False
    ),
    "dx2 only": lambda: linmaps.bilinear_backward(
        g, x1, x2, W, bias=False, need_weight=False, need_x1=False
    ),
    "stage2 (dW)": lambda: linmaps.bilinear_backward(
        g, x1, x2, W, bias=False, need_x1=False, need_x2=False
    ),
    "fwd": lambda: linmaps.bilinear(x1, x2, W),
}
for k, f in ops.items():
    r = []
    for th in (1, 2):
        linmaps.set_num_threads(th)
        r.append(t(f))
    print(f"{k:18} 1t {r[0]:.3f} ms  2t {r[1]:.3f} ms  scaling {r[0] / r[1]:.2f}")
