"""linmaps.torch inside a PyTorch training step: do PyTorch's OpenMP pool and linmaps' get along?

    python bench/studies/torch_mixed.py                  # both import orders, one child each
    python bench/studies/torch_mixed.py --order linmaps-first --variants long

The step is a ``torch.nn.Linear`` + ReLU (PyTorch's kernels, PyTorch's threads) feeding a
``linmaps.torch.Bilinear`` (linmaps' kernels), forward and backward, the two parts alternating
as in a model: PyTorch forward, linmaps forward and backward, PyTorch backward. It times, in one
process, the PyTorch part alone, the linmaps part alone and the alternating step, and prints
``(t_torch + t_linmaps) / t_alternating`` (1.0: mixing costs nothing).

Which OpenMP runtimes run is decided by how linmaps was built and by the import order
(docs/torch.md, "Threads"): run it once with a source build of linmaps (which links the
system's ``libgomp.so.1``) and once with the wheel (which bundles ``libgomp-<hash>.so.1``) on
``PYTHONPATH``. Each order runs in its own child process, so each loads the libraries afresh.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time

# (batch, PyTorch layer in -> hidden, bilinear hidden x in2 -> out): mixed_programs.py's steps
VARIANTS = {
    "long": (1024, 1024, 128, 64, 32),
    "short": (32, 64, 64, 64, 32),
}
# torch-first: `import torch` first; linmaps.torch-first: `import linmaps.torch` before torch
# (what isort's order gives); linmaps-first: `import linmaps` (the NumPy API), then torch, then
# linmaps.torch.
IMPORTS = {
    "torch-first": ("torch", "linmaps.torch"),
    "linmaps.torch-first": ("linmaps.torch", "torch"),
    "linmaps-first": ("linmaps", "torch", "linmaps.torch"),
}
ORDERS = tuple(IMPORTS)


def make_step(batch, d_in, hidden, in2, out):
    import torch

    import linmaps.torch as lt

    torch.manual_seed(0)
    layer = torch.nn.Linear(d_in, hidden)
    bilinear = lt.Bilinear(hidden, in2, out)
    x, x2 = torch.randn(batch, d_in), torch.randn(batch, in2)
    grad_z = torch.randn(batch, out)
    fixed_h = torch.relu(torch.randn(batch, hidden))
    state = {}

    def torch_forward():
        state["h"] = torch.relu(layer(x))

    def torch_backward():
        grad_h = state.get("grad_h", fixed_h)
        torch.autograd.grad(state["h"], [layer.weight, layer.bias], grad_h)

    def linmaps_step():
        h = state.get("h", fixed_h).detach().requires_grad_(True)
        z = bilinear(h, x2)
        grads = torch.autograd.grad(z, [h, bilinear.weight, bilinear.bias], grad_z)
        state["grad_h"] = grads[0]

    return torch_forward, torch_backward, linmaps_step, state


def per_step_s(fns, reps, warmup=3):
    import numpy as np

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
    import numpy as np

    torch_fwd, torch_bwd, lm_step, state = make_step(*VARIANTS[variant])
    rows = []
    for _ in range(rounds):
        state.clear()
        t_torch = per_step_s([torch_fwd, torch_bwd], reps)
        state.clear()
        t_lm = per_step_s([lm_step], reps)
        t_mix = per_step_s([torch_fwd, lm_step, torch_bwd], reps)
        rows.append((t_torch, t_lm, t_mix))
    t_torch, t_lm, t_mix = (float(np.median(c)) for c in zip(*rows))
    ratios = ", ".join(f"{(a + b) / c:.2f}" for a, b, c in rows)
    print(
        f"  {variant:5s} step: torch {t_torch * 1e3:7.3f} ms  linmaps {t_lm * 1e3:7.3f} ms  "
        f"alternating {t_mix * 1e3:7.3f} ms  ratio {(t_torch + t_lm) / t_mix:5.2f} "
        f"(rounds: {ratios})",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--order", choices=ORDERS, help="run this order in this process")
    parser.add_argument("--variants", default="long,short")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.order is None:
        for order in ORDERS:
            argv = [sys.argv[0], "--order", order, "--variants", args.variants]
            argv += ["--reps", str(args.reps), "--rounds", str(args.rounds)]
            subprocess.run([sys.executable, *argv], check=True)
        return
    # importlib, so that the order is the one named (an import sorter would reorder statements)
    for name in IMPORTS[args.order]:
        importlib.import_module(name)
    import torch

    import linmaps

    with open("/proc/self/maps") as maps:
        runtimes = sorted({os.path.basename(ln.split()[-1]) for ln in maps if "gomp" in ln})
    print(
        f"{args.order}: torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"linmaps from {os.path.dirname(linmaps.__file__)}; libgomp loaded: {runtimes}; "
        f"torch's spin: {linmaps._threads.torch_wait_policy}; "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for variant in args.variants.split(","):
        reps = args.reps if variant == "long" else args.reps * 20
        measure(variant, reps, args.rounds)


if __name__ == "__main__":
    main()
