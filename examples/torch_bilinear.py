"""Swap ``torch.nn.Bilinear`` for ``linmaps.torch.Bilinear`` in a PyTorch model and train both.

    python examples/torch_bilinear.py                   # default sizes, a few seconds
    python examples/torch_bilinear.py --steps 20 --batch 64 --compile

The model is a ``Linear`` + ReLU feeding a ``Bilinear`` layer, fitted by SGD to a fixed random
teacher of the same form. It is built twice from one initialisation: once with PyTorch's
layers, once with ``linmaps.torch``'s (the only change is the class). Both are trained on the
same batches; the script prints both losses and the time per step, and exits with status 1
unless the two loss curves agree to float32 rounding and the loss on a held-out batch fell.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import linmaps.torch as lt


class Model(torch.nn.Module):
    def __init__(self, linear_cls, bilinear_cls, in1, in2, hidden, out):
        super().__init__()
        self.encode = linear_cls(in1, hidden)
        self.combine = bilinear_cls(hidden, in2, out)

    def forward(self, x1, x2):
        return self.combine(torch.relu(self.encode(x1)), x2)


def train(model, batches, targets, lr, compile_model):
    step_model = torch.compile(model, fullgraph=True) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, start = [], time.perf_counter()
    for (x1, x2), target in zip(batches, targets):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(step_model(x1, x2), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - start) / len(losses)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--in1", type=int, default=64)
    parser.add_argument("--in2", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--out", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args(argv)
    sizes = (args.in1, args.in2, args.hidden, args.out)

    torch.manual_seed(0)
    teacher = Model(torch.nn.Linear, torch.nn.Bilinear, *sizes)
    batches = [
        (torch.randn(args.batch, args.in1), torch.randn(args.batch, args.in2))
        for _ in range(args.steps)
    ]
    held_out = (torch.randn(256, args.in1), torch.randn(256, args.in2))
    with torch.no_grad():
        targets = [teacher(x1, x2) for x1, x2 in batches]
        held_out_target = teacher(*held_out)

    ours = Model(torch.nn.Linear, lt.Bilinear, *sizes)  # the one-line change
    theirs = Model(torch.nn.Linear, torch.nn.Bilinear, *sizes)
    theirs.load_state_dict(ours.state_dict())  # same keys: one initialisation for both

    def held_out_loss(model):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(*held_out), held_out_target).item()

    start_loss = held_out_loss(ours)
    losses, seconds, end_loss = {}, {}, {}
    for name, model in (("linmaps.torch", ours), ("torch.nn", theirs)):
        losses[name], seconds[name] = train(model, batches, targets, args.lr, args.compile)
        end_loss[name] = held_out_loss(model)
    for step in range(0, args.steps, max(1, args.steps // 5)):
        print(
            f"step {step:4d}  loss linmaps.torch {losses['linmaps.torch'][step]:.6f}  "
            f"torch.nn {losses['torch.nn'][step]:.6f}"
        )
    difference = max(
        abs(a - b) / max(abs(a), abs(b))
        for a, b in zip(losses["linmaps.torch"], losses["torch.nn"])
    )
    print(
        f"held-out loss {start_loss:.6f} -> linmaps.torch {end_loss['linmaps.torch']:.6f}, "
        f"torch.nn {end_loss['torch.nn']:.6f}; largest relative difference of the training "
        f"losses {difference:.1e}"
    )
    print(
        f"per step: linmaps.torch {seconds['linmaps.torch'] * 1e3:.2f} ms, "
        f"torch.nn {seconds['torch.nn'] * 1e3:.2f} ms ({torch.get_num_threads()} threads)"
    )
    # float32 rounding, compounded over the steps, stays far below this
    if difference > 1e-4 or not end_loss["linmaps.torch"] < start_loss:
        print("FAILED: the loss curves differ, or the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
