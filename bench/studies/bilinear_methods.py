# Method 1 (per output, notes 11.3) vs method 2 (all outputs at once, spec 4 What) in NumPy.

import numpy as np
import threadpoolctl
from _timing import best_s

rng = np.random.default_rng(0)


def best(f, reps=25):
    return best_s(f, reps)


def fwd1(X, Y, A):
    Z = np.empty((X.shape[0], A.shape[0]), X.dtype)
    for l in range(A.shape[0]):
        T = X @ A[l]
        Z[:, l] = np.einsum("kj,kj->k", T, Y)
    return Z


def fwd2(X, Y, Ah, L, n):
    T = (X @ Ah).reshape(X.shape[0], L, n)
    return np.einsum("klj,kj->kl", T, Y)


def bwd1(G, X, Y, A):
    dX = np.zeros_like(X)
    dY = np.zeros_like(Y)
    dA = np.empty_like(A)
    for l in range(A.shape[0]):
        g = G[:, l : l + 1]
        gY = g * Y
        dX += gY @ A[l].T
        dY += g * (X @ A[l])
        dA[l] = X.T @ gY
    return dX, dY, dA


def bwd2(G, X, Y, Ah, L, n):
    N = X.shape[0]
    T = (X @ Ah).reshape(N, L, n)
    W = (G[:, :, None] * Y[:, None, :]).reshape(N, L * n)
    dX = W @ Ah.T
    dY = np.einsum("kl,klj->kj", G, T)
    dAh = X.T @ W
    return dX, dY, dAh


with threadpoolctl.threadpool_limits(2):
    print(threadpoolctl.threadpool_info()[0]["internal_api"], "threads=2, float32")
    print(
        f"{'(N,m,n,L)':>20} {'fwd m1':>8} {'fwd m2':>8} {'bwd m1':>8} {'bwd m2':>8}   GFLOP/s (fwd 2NLmn, bwd 6NLmn)"
    )
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
        assert np.allclose(fwd1(X, Y, A), fwd2(X, Y, Ah, L, n), rtol=1e-3, atol=1e-2)
        f = 2.0 * N * L * m * n
        t = [
            best(lambda: fwd1(X, Y, A)),
            best(lambda: fwd2(X, Y, Ah, L, n)),
            best(lambda: bwd1(G, X, Y, A)),
            best(lambda: bwd2(G, X, Y, Ah, L, n)),
        ]
        print(
            f"{(N, m, n, L)!s:>20} {f / t[0] / 1e9:8.1f} {f / t[1] / 1e9:8.1f} {3 * f / t[2] / 1e9:8.1f} {3 * f / t[3] / 1e9:8.1f}",
            flush=True,
        )
