"""linmaps beside a busy process: throughput as a fraction of its speed on an idle machine.

    python bench/studies/contention.py            # one child per setting below
    python bench/studies/contention.py --here     # this process's environment only

For each shape, times the call (forward + backward, float32, all usable threads) on the idle
machine, then with one single-threaded busy process (``while True: pass``) beside it, and
prints t_idle / t_busy. With 2 threads on 2 cores a fair share of the machine gives about
0.67 (three runnable threads share two cores). The idle time is taken IDLE_AFTER_S after the
busy process has gone: linmaps keeps a smaller team for up to 1.6 s after the contention it
saw (threads.cpp, "Sharing the CPUs"), and the idle speed is the speed once that has passed.
The children differ in the team adaptation (on by default, LINMAPS_ADAPTIVE_TEAM=0 off) and
in libgomp's waiting (linmaps' spin, or passive with GOMP_SPINCOUNT=0).
"""

import os
import subprocess
import sys
import time

import numpy as np

SHAPES = [
    ("bilinear", (32, 64, 64, 32)),
    ("bilinear", (256, 64, 64, 64)),
    ("bilinear", (1024, 128, 128, 64)),
    ("linear", (256, 512, 512)),
    ("linear", (4096, 1024, 1024)),
    ("linear", (16384, 128, 128)),
]
SETTINGS = {
    "default (smaller team under contention)": {},
    "LINMAPS_ADAPTIVE_TEAM=0": {"LINMAPS_ADAPTIVE_TEAM": "0"},
    "passive (GOMP_SPINCOUNT=0), adaptation off": {
        "GOMP_SPINCOUNT": "0",
        "LINMAPS_ADAPTIVE_TEAM": "0",
    },
}
IDLE_AFTER_S = 2.0


def make_call(kind, shape):
    import linmaps

    rng = np.random.default_rng(0)
    f32 = np.float32
    if kind == "bilinear":
        n, p, q, out = shape
        x1, x2 = rng.standard_normal((n, p), dtype=f32), rng.standard_normal((n, q), dtype=f32)
        a, g = rng.standard_normal((out, p, q), dtype=f32), rng.standard_normal((n, out), dtype=f32)
        return lambda: (linmaps.bilinear(x1, x2, a), linmaps.bilinear_backward(g, x1, x2, a))
    n, i, o = shape
    x, w = rng.standard_normal((n, i), dtype=f32), rng.standard_normal((o, i), dtype=f32)
    g = rng.standard_normal((n, o), dtype=f32)
    return lambda: (linmaps.linear(x, w), linmaps.linear_backward(g, x, w))


def median_s(fn, seconds=0.6):
    fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def here():
    for kind, shape in SHAPES:
        call = make_call(kind, shape)
        ratios = []
        idles = []
        for _ in range(5):
            time.sleep(IDLE_AFTER_S)
            idles.append(median_s(call, 0.25))
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(0.15)
                loaded = median_s(call, 0.25)
            finally:
                busy.kill()
                busy.wait()
            ratios.append(idles[-1] / loaded)
        print(
            f"  {kind} {shape!s:22s} idle {np.median(idles) * 1e3:9.3f} ms  beside a busy "
            f"process: median {np.median(ratios):4.2f} (range {min(ratios):4.2f}-"
            f"{max(ratios):4.2f}) of idle speed",
            flush=True,
        )


def main():
    if "--here" in sys.argv:
        here()
        return
    for name, settings in SETTINGS.items():
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "LINMAPS_ADAPTIVE_TEAM")
        }
        env.update(settings)
        print(f"{name}:", flush=True)
        subprocess.run([sys.executable, __file__, "--here"], env=env, check=True)


if __name__ == "__main__":
    main()
