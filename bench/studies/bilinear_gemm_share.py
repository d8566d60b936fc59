# GEMM part only: L products (N x m)(m x n) vs one (N x m)(m x L*n); plus linmaps' C++ kernels.

import numpy as np
import threadpoolctl
from _timing import best_s

import linmaps

rng = np.random.default_rng(0)


def best(f, reps=30):
    return best_s(f, reps)


linmaps.set_num_threads(2)
from linmaps import _cpp_backend as cb

print("isa", cb.isa, "linmaps threads", linmaps.get_num_threads())
with threadpoolctl.threadpool_limits(2, user_api="blas"):
    print(f"{'(N,m,n,L)':>20} {'L GEMMs':>8} {'1 GEMM':>8} {'cpp fwd':>8} {'cpp bwd':>8}  GFLOP/s")
    for N, m, n, L in [
        (1024, 128, 128, 64),
        (256, 64, 64, 64),
        (64, 512, 512, 8),
        (4096, 64, 64, 32),
    ]:
        X = rng.standard_normal((N, m), np.float32)
        Y = rng.standard_normal((N, n), np.float32)
        A = rng.standard_normal((L, m, n), np.float32)
        G = rng.standard_normal((N, L), np.float32)
        Ah = np.ascontiguousarray(A.transpose(1, 0, 2).reshape(m, L * n))
        T = np.empty((N, L * n), np.float32)

        def many():
            for l in range(L):
                np.matmul(X, A[l], out=T[:, l * n : (l + 1) * n])

        f = 2.0 * N * L * m * n
        t = [
            best(many),
            best(lambda: np.matmul(X, Ah, out=T)),
            best(lambda: cb.bilinear_forward(X, Y, A, None)),
            best(lambda: cb.bilinear_backward(G, X, Y, A, True, True, True, True)),
        ]
        print(
            f"{(N, m, n, L)!s:>20} {f / t[0] / 1e9:8.1f} {f / t[1] / 1e9:8.1f} {f / t[2] / 1e9:8.1f} {3 * f / t[3] / 1e9:8.1f}",
            flush=True,
        )
