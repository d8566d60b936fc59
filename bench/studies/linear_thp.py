"""linmaps' (64,4096,4096) linear forward vs NumPy, with or without transparent huge pages.

    python bench/studies/linear_thp.py on|off

"off" disables transparent huge pages for this process (prctl PR_SET_THP_DISABLE) before
NumPy allocates the 64 MiB weight; the last line is the process's AnonHugePages.
"""

import ctypes
import sys
import time

import numpy as np
from _timing import median_ms

if sys.argv[1] == "off":
    libc = ctypes.CDLL("libc.so.6")
    print("prctl", libc.prctl(41, 1, 0, 0, 0))  # PR_SET_THP_DISABLE
import linmaps

rng = np.random.default_rng(0)
x = rng.standard_normal((64, 4096), dtype=np.float32)
w = rng.standard_normal((4096, 4096), dtype=np.float32)


def med(f):
    return median_ms(f, 20, warmup=1)


for _ in range(3):
    time.sleep(0.3)
    a = med(lambda: linmaps.linear(x, w))
    time.sleep(0.3)
    b = med(lambda: x @ w.T)
    print(sys.argv[1], f"linmaps {a:.2f} numpy {b:.2f}")
with open("/proc/self/smaps_rollup") as f:
    print(f.read().split("AnonHugePages:")[1].split("\n")[0])
