"""linmaps' linear kernels against NumPy's own products, interleaved call by call.

    python bench/studies/linear_interleaved.py [NxINxOUT ...]

Prints NumPy time / linmaps time (above 1: linmaps is faster) and both GFLOP/s for the
forward (``x @ w.T + b``), grad_x alone (``g @ w``), grad_weight alone (``g.T @ x``) and the
whole backward (plus ``g.sum(0)``), float32, medians over alternating calls. Alternating in
one process cancels most machine noise. Since NumPy's BLAS runs on linmaps' threads
(docs/kernels.md, section 5) the two no longer fight; before, this needed
OPENBLAS_THREAD_TIMEOUT=4.
"""

import sys
import time

import numpy as np

import linmaps

rng = np.random.default_rng(0)
med = np.median


def bench(pairs, reps):
    for f in pairs.values():
        f()
    res = {k: [] for k in pairs}
    for _i in range(reps):
        for k, f in pairs.items():
            t0 = time.perf_counter()
            f()
            res[k].append(time.perf_counter() - t0)
    return {k: med(v) for k, v in res.items()}


shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1:]] or [
    (256, 512, 512),
    (4096, 1024, 1024),
    (64, 4096, 4096),
    (16384, 128, 128),
]
for N, n, m in shapes:
    x = rng.standard_normal((N, n), dtype=np.float32)
    w = rng.standard_normal((m, n), dtype=np.float32)
    b = rng.standard_normal(m, dtype=np.float32)
    g = rng.standard_normal((N, m), dtype=np.float32)
    reps = 30 if N * n * m < 1e9 else 10
    r = bench(
        dict(
            fwd_c=lambda: linmaps.linear(x, w, b),
            fwd_p=lambda: x @ w.T + b,
            gx_c=lambda: linmaps.linear_backward(g, x, w, need_weight=False),
            gx_p=lambda: g @ w,
            gw_c=lambda: linmaps.linear_backward(g, x, w, need_x=False),
            gw_p=lambda: g.T @ x,
            bwd_c=lambda: linmaps.linear_backward(g, x, w, bias=True),
            bwd_p=lambda: (g @ w, g.T @ x, g.sum(0)),
        ),
        reps,
    )
    print(
        f"{N}x{n}x{m}: "
        + "  ".join(
            f"{k} {r[k + '_p'] / r[k + '_c']:.3f} ({2 * N * n * m / r[k + '_c'] / 1e9:.0f}/{2 * N * n * m / r[k + '_p'] / 1e9:.0f})"
            for k in ("fwd", "gx", "gw", "bwd")
        ),
        flush=True,
    )
