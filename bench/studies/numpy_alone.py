"""Does importing linmaps change how fast a NumPy-only program runs?

    python bench/studies/numpy_alone.py

Times ``a @ b`` (float32, square) in a loop, back to back and with a gap between products
(Python busy for 0.2 ms, or asleep for 2 ms), in child processes: without linmaps; with
linmaps imported only (OpenBLAS untouched until linmaps' first threaded call); after one
linmaps call (NumPy's BLAS then runs on linmaps' OpenMP pool); and after one call with
``LINMAPS_BLAS_THREADS=native`` (OpenBLAS's own threads). Prints medians in microseconds, the smallest of 3 processes.
"""

import os
import subprocess
import sys
import time

import numpy as np

SIZES = (128, 256, 512, 1024)
GAPS = {"none": 0.0, "busy 0.2 ms": 2e-4, "sleep 2 ms": -2e-3}


def child(mode):
    if mode != "no linmaps":
        import linmaps
    if mode.startswith("after"):
        x = np.ones((512, 512), np.float32)
        linmaps.linear(x, x)
    rng = np.random.default_rng(0)
    row = []
    for n in SIZES:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        reps = max(20, int(2e8 / n**3))
        for gap in GAPS.values():
            times = []
            for _ in range(reps):
                if gap > 0:
                    end = time.perf_counter() + gap
                    while time.perf_counter() < end:
                        pass
                elif gap < 0:
                    time.sleep(-gap)
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            row.append(float(np.median(times[2:])) * 1e6)
    print(" ".join(f"{v:9.1f}" for v in row), flush=True)


def main():
    if len(sys.argv) > 1:
        child(sys.argv[1])
        return
    head = [f"{n}:{g.split()[0]}" for n in SIZES for g in GAPS]
    print(f"{'':28s}" + " ".join(f"{h:>9s}" for h in head))
    for mode, extra in (
        ("no linmaps", {}),
        ("imported only", {}),
        ("after a call (shared pool)", {}),
        ("after a call, native", {"LINMAPS_BLAS_THREADS": "native"}),
    ):
        rows = []
        for _ in range(3):  # the machine is shared: the least disturbed of 3 processes
            env = dict(os.environ, **extra)
            out = subprocess.run(
                [sys.executable, __file__, mode], env=env, check=True, capture_output=True
            )
            rows.append([float(v) for v in out.stdout.split()])
        best = [min(column) for column in zip(*rows)]
        print(f"{mode:28s}" + " ".join(f"{v:9.1f}" for v in best), flush=True)


if __name__ == "__main__":
    main()
