"""Per-call cost of linmaps.torch on a tiny bilinear map: the registered operator against the
eager path (an autograd.Function), and PyTorch's own ``F.bilinear``.

    python bench/studies/torch_overhead.py

Tiny shapes ((4, 3) inputs, 2 outputs), so that the figures are the Python and dispatch cost
of a call: forward under ``torch.no_grad()``, and forward + backward (all four gradients).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import linmaps.torch as lt


def median_us(f, reps=3000, rounds=5):
    for _ in range(200):
        f()
    medians = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            f()
        medians.append((time.perf_counter() - start) / reps * 1e6)
    return float(np.median(medians))


def main():
    torch.manual_seed(0)
    x1 = torch.randn(4, 3, requires_grad=True)
    x2 = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(2, 3, 3, requires_grad=True)
    bias = torch.randn(2, requires_grad=True)
    args = (x1, x2, weight, bias)
    grad = torch.ones(4, 2)
    op = torch.ops.linmaps.bilinear
    rows = {
        "registered operator": op,
        "eager path (lt.bilinear)": lt.bilinear,
        "PyTorch F.bilinear": F.bilinear,
    }
    print(
        f"load {os.getloadavg()[0]:.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for name, function in rows.items():
        with torch.no_grad():
            forward = median_us(lambda f=function: f(*args))
        both = median_us(lambda f=function: torch.autograd.grad(f(*args), args, grad), reps=1000)
        print(f"  {name:26s} forward {forward:7.1f} us   forward + backward {both:7.1f} us")


if __name__ == "__main__":
    main()
