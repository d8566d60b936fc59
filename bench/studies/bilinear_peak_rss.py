# Peak RSS beyond inputs+outputs, bilinear float32, N=65536, m=n=L=64, 2 threads.
import resource
import sys

import numpy as np

N, m, n, L = 65536, 64, 64, 64
MiB = 1 << 20


def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


which = sys.argv[1]
rng = np.random.default_rng(0)
X = rng.standard_normal((N, m), dtype=np.float32)
Y = rng.standard_normal((N, n), dtype=np.float32)
A = rng.standard_normal((L, m, n), dtype=np.float32)
b = rng.standard_normal(L, dtype=np.float32)
G = rng.standard_normal((N, L), dtype=np.float32)
out_bytes = {
    "bwd": (N * m + N * n + L * m * n + L) * 4,
    "fwdbwd": (N * L + N * m + N * n + L * m * n + L) * 4,
}[which.split("_")[1]]
if which.startswith("linmaps"):
    import linmaps
    from linmaps import _cpp_backend as cb

    linmaps.set_num_threads(2)
    s = 8
    cb.bilinear_backward(G[:s], X[:s], Y[:s], A, True, True, True, True)  # load, warm up
    base = peak()
    if which == "linmaps_bwd":
        r = cb.bilinear_backward(G, X, Y, A, True, True, True, True)
    else:
        z = cb.bilinear_forward(X, Y, A, b)
        r = cb.bilinear_backward(G, X, Y, A, True, True, True, True)
else:
    import torch

    torch.set_num_threads(2)
    tX, tY, tA, tb, tG = (torch.from_numpy(a) for a in (X, Y, A, b, G))
    for t in (tX, tY, tA, tb):
        t.requires_grad_(True)
    s = 8
    torch.nn.functional.bilinear(tX[:s], tY[:s], tA, tb).backward(tG[:s])
    for t in (tX, tY, tA, tb):
        t.grad = None
    base = peak()
    z = torch.nn.functional.bilinear(tX, tY, tA, tb)
    z.backward(tG)
print(
    f"{which}: inputs {(X.nbytes + Y.nbytes + A.nbytes + b.nbytes + G.nbytes) / MiB:.1f} MiB, outputs {out_bytes / MiB:.1f} MiB, "
    f"peak growth {(peak() - base) / MiB:.1f} MiB, extra beyond outputs {(peak() - base - out_bytes) / MiB:.1f} MiB"
)
