"""linmaps inside a NumPy program: a training step that alternates NumPy products and linmaps.

    python bench/studies/mixed_programs.py                # this process's environment
    python bench/studies/mixed_programs.py --envs         # one child per environment below

The step is one NumPy Linear layer (``h = relu(x @ W.T)``, and its weight gradient as a NumPy
product) feeding a linmaps bilinear layer (forward and backward). It times, in one process, the
NumPy part alone, the linmaps part alone and the whole step alternating the two, and prints
``(t_numpy + t_linmaps) / t_alternating`` (1.0: mixing costs nothing). It also times one
linmaps call right after a 2048-square ``numpy.matmul`` against the same call alone.

``--envs`` runs the measurement in a child process per environment, so that before/after is
one command: "before" is linmaps as it was before it managed the pools (libgomp's own spin,
``GOMP_SPINCOUNT=300000``, and OpenBLAS on its own threads, ``LINMAPS_BLAS_THREADS=native``),
alone and with each of the two variables users were told to set, and with both; "after" is
the default environment, and the default with OpenBLAS on its own threads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

# (name, batch, NumPy layer in -> hidden, bilinear hidden x in2 -> out)
VARIANTS = {
    "long": (1024, 1024, 128, 64, 32),
    "short": (32, 64, 64, 64, 32),
}
_BEFORE = {"GOMP_SPINCOUNT": "300000", "LINMAPS_BLAS_THREADS": "native"}
ENVIRONMENTS = {
    "before (libgomp's own spin, OpenBLAS's own threads)": _BEFORE,
    "before + OPENBLAS_THREAD_TIMEOUT=4": {**_BEFORE, "OPENBLAS_THREAD_TIMEOUT": "4"},
    "before + GOMP_SPINCOUNT=0": {**_BEFORE, "GOMP_SPINCOUNT": "0"},
    "before + both": {**_BEFORE, "OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "0"},
    "after: default environment": {},
    "after, but LINMAPS_BLAS_THREADS=native": {"LINMAPS_BLAS_THREADS": "native"},
}
_VARIABLES = (
    "GOMP_SPINCOUNT",
    "OMP_WAIT_POLICY",
    "OPENBLAS_THREAD_TIMEOUT",
    "LINMAPS_BLAS_THREADS",
)


def make_step(batch, d_in, hidden, in2, out, seed=0):
    import linmaps

    rng = np.random.default_rng(seed)
    f32 = np.float32
    x = rng.standard_normal((batch, d_in), dtype=f32)
    w1 = rng.standard_normal((hidden, d_in), dtype=f32) / f32(np.sqrt(d_in))
    x2 = rng.standard_normal((batch, in2), dtype=f32)
    a = rng.standard_normal((out, hidden, in2), dtype=f32) / hidden
    bias = np.zeros(out, f32)
    grad_z = rng.standard_normal((batch, out), dtype=f32)
    state = {}

    def numpy_forward():
        pre = x @ w1.T
        state["h"] = np.maximum(pre, 0)
        state["mask"] = pre > 0

    def numpy_backward():
        grad_h = state.get("grad_h")
        if grad_h is None:  # the NumPy part timed alone: a gradient of the right shape
            grad_h = grad_z[:, :1] * np.ones((1, hidden), f32)
        state["grad_w1"] = (grad_h * state["mask"]).T @ x

    def linmaps_forward():
        h = state.get("h")
        if h is None:
            h = np.maximum(x[:, :hidden], 0)
        state["z"] = linmaps.bilinear(h, x2, a, bias)
        state["h_used"] = h

    def linmaps_backward():
        grads = linmaps.bilinear_backward(grad_z, state["h_used"], x2, a, need_x2=False)
        state["grad_h"] = grads.grad_x1

    return numpy_forward, numpy_backward, linmaps_forward, linmaps_backward, state


def per_step_s(fns, reps, warmup=3):
    for _ in range(warmup):
        for f in fns:
            f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for f in fns:
            f()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(variant, reps, rounds):
    import linmaps

    np_fwd, np_bwd, lm_fwd, lm_bwd, state = make_step(*VARIANTS[variant])
    lm_fwd()
    lm_bwd()
    rows = []
    for _ in range(rounds):
        state.pop("grad_h", None)
        state.pop("h", None)
        np_fwd()
        t_np = per_step_s([np_fwd, np_bwd], reps)
        t_lm = per_step_s([lm_fwd, lm_bwd], reps)
        t_mix = per_step_s([np_fwd, lm_fwd, lm_bwd, np_bwd], reps)
        rows.append((t_np, t_lm, t_mix))
    t_np, t_lm, t_mix = (float(np.median(c)) for c in zip(*rows))
    print(
        f"  {variant:5s} step: numpy {t_np * 1e3:8.3f} ms  linmaps {t_lm * 1e3:8.3f} ms  "
        f"alternating {t_mix * 1e3:8.3f} ms  ratio {(t_np + t_lm) / t_mix:5.2f}"
        f"  (threads {linmaps.get_num_threads()})",
        flush=True,
    )


def after_matmul(reps):
    import linmaps

    rng = np.random.default_rng(1)
    big = rng.standard_normal((2048, 2048), dtype=np.float32)
    x1 = rng.standard_normal((256, 64), dtype=np.float32)
    a = rng.standard_normal((64, 64, 64), dtype=np.float32)
    call = lambda: linmaps.bilinear(x1, x1, a)  # noqa: E731
    call()
    time.sleep(0.3)
    alone, after = [], []
    for _ in range(reps):
        time.sleep(0.2)  # let every pool go idle
        start = time.perf_counter()
        call()
        alone.append(time.perf_counter() - start)
        big @ big
        start = time.perf_counter()
        call()
        after.append(time.perf_counter() - start)
    flops = 2 * 256 * 64 * 64 * 64
    a_s, b_s = float(np.median(alone)), float(np.median(after))
    print(
        f"  bilinear (256,64,64,64) alone {flops / a_s / 1e9:6.1f} GFLOP/s, right after a "
        f"2048^2 matmul {flops / b_s / 1e9:6.1f} GFLOP/s ({a_s / b_s:4.2f} of alone)",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--envs", action="store_true", help="one child process per environment")
    parser.add_argument("--variants", default="long,short")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="linmaps' threads (default: all)")
    args = parser.parse_args()
    if args.envs:
        for name, extra in ENVIRONMENTS.items():
            print(f"{name}:", flush=True)
            env = {k: v for k, v in os.environ.items() if k not in _VARIABLES}
            env.update(extra)
            argv = [sys.argv[0], "--variants", args.variants, "--reps", str(args.reps)]
            argv += ["--rounds", str(args.rounds), "--threads", str(args.threads)]
            subprocess.run([sys.executable, *argv], env=env, check=True)
        return
    import linmaps

    if args.threads:
        linmaps.set_num_threads(args.threads)
    print(f"  uptime: {os.getloadavg()[0]:.2f}; linmaps {linmaps.__version__}", flush=True)
    for variant in args.variants.split(","):
        reps = args.reps if variant == "long" else args.reps * 20
        measure(variant, reps, args.rounds)
    after_matmul(10)


if __name__ == "__main__":
    main()
