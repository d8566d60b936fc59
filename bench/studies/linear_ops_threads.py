"""Median ms of linmaps' linear kernels per output, with 1 and 2 threads.

    python bench/studies/linear_ops_threads.py NxINxOUT [NxINxOUT ...]

grad_weight alone, grad_x alone (both without grad_bias) and the forward without bias,
float32, 100 calls each after 5 warm-up calls. Used to compare two builds of the kernels
installed side by side (run it with each environment's python, alternately).
"""

import sys

import numpy as np
from _timing import median_ms

import linmaps

rng = np.random.default_rng(0)


def t(f, reps=100):
    return median_ms(f, reps)


for s in sys.argv[1:]:
    N, n, m = map(int, s.split("x"))
    x = rng.standard_normal((N, n), dtype=np.float32)
    w = rng.standard_normal((m, n), dtype=np.float32)
    g = rng.standard_normal((N, m), dtype=np.float32)
    r = {}
    for th in (1, 2):
        linmaps.set_num_threads(th)
        r[th] = (
            t(lambda: linmaps.linear_backward(g, x, w, bias=False, need_x=False)),
            t(lambda: linmaps.linear_backward(g, x, w, bias=False, need_weight=False)),
            t(lambda: linmaps.linear(x, w)),
        )
    print(
        s,
        f"gw 1t {r[1][0]:.3f} 2t {r[2][0]:.3f} | gx 1t {r[1][1]:.3f} 2t {r[2][1]:.3f} | fwd 1t {r[1][2]:.3f} 2t {r[2][2]:.3f}",
    )
