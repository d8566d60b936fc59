"""Fit a student (a ``Bilinear`` layer followed by a ``Linear`` head) to a fixed random
``Bilinear`` teacher by plain SGD on the mean-squared error.

    python examples/train_bilinear.py                 # default sizes, well under a second
    python examples/train_bilinear.py --steps 100 --batch 32 --in1 6 --in2 5 --backend python

Every step draws a fresh batch ``(x1, x2)`` of standard normal inputs, asks the teacher for the
targets and takes one SGD step on the student. A Linear head after a Bilinear layer is again a
bilinear map, so the student can match the teacher exactly and the loss can fall to rounding
level. The loss on a fixed held-out batch is printed every ``--print-every`` steps; the script
exits with status 1 unless it ends at least ``--min-reduction`` (default 100) times smaller
than it started. Much larger sizes need more steps (and, for large ``--in2``, a smaller
``--lr``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import linmaps


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to the help of options that have a default value, not to those
    whose help already says what happens without them (default None)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=_HelpWithDefaults
    )
    parser.add_argument("--steps", type=positive_int, default=300, help="SGD steps")
    parser.add_argument("--batch", type=positive_int, default=128, help="samples per step")
    parser.add_argument(
        "--in1", type=positive_int, default=32, help="in1_features of the Bilinear layer"
    )
    parser.add_argument(
        "--in2", type=positive_int, default=16, help="in2_features of the Bilinear layer"
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        default=8,
        help="out_features of the Bilinear layer = in_features of the head",
    )
    parser.add_argument(
        "--out", type=positive_int, default=4, help="out_features of the Linear head"
    )
    parser.add_argument("--lr", type=float, default=0.2, help="SGD learning rate")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="floating-point type of the weights, the data and every computation",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument(
        "--backend",
        choices=["cpp", "python"],
        default=None,
        help="linmaps backend (default: the active one, linmaps.get_backend())",
    )
    parser.add_argument(
        "--print-every", type=positive_int, default=25, help="steps between reports"
    )
    parser.add_argument(
        "--min-reduction",
        type=float,
        default=100.0,
        help="fail unless the held-out loss falls by this factor",
    )
    return parser.parse_args(argv)


class Model:
    """``y = head(bilinear(x1, x2))``: a Bilinear layer followed by a Linear head."""

    def __init__(self, args, rng: np.random.Generator):
        # One generator for both layers: each layer draws its own, different, numbers.
        self.bilinear = linmaps.Bilinear(args.in1, args.in2, args.hidden, dtype=args.dtype, rng=rng)
        self.head = linmaps.Linear(args.hidden, args.out, dtype=args.dtype, rng=rng)
        self.layers = (self.bilinear, self.head)

    def __call__(self, x1, x2, *, save_for_backward=True):
        hidden = self.bilinear(x1, x2, save_for_backward=save_for_backward)
        return self.head(hidden, save_for_backward=save_for_backward)

    def backward(self, grad_y):
        grad_hidden = self.head.backward(grad_y)
        # The inputs are data, not parameters: skip their gradients.
        self.bilinear.backward(grad_hidden, need_x1=False, need_x2=False)

    def zero_grad(self):
        for layer in self.layers:
            layer.zero_grad()

    def sgd_step(self, lr: float):
        for layer in self.layers:
            for param, grad in zip(
                layer.parameters(trainable_only=True), layer.gradients(trainable_only=True)
            ):
                param -= lr * grad  # in place: these are the layer's own arrays


def mse(prediction, target) -> tuple[float, np.ndarray]:
    """Mean-squared error over batch and outputs, and its gradient with respect to
    ``prediction``."""
    diff = prediction - target
    return float(np.mean(diff * diff)), (2.0 / diff.size) * diff


def batch(rng: np.random.Generator, args, size: int):
    x1 = rng.standard_normal((size, args.in1))
    x2 = rng.standard_normal((size, args.in2))
    return x1.astype(args.dtype), x2.astype(args.dtype)


def train(args) -> tuple[float, float]:
    """Run the training; returns the held-out loss before and after."""
    # A Bilinear teacher with the head's output size: exactly representable by the student.
    teacher = linmaps.Bilinear(
        args.in1, args.in2, args.out, dtype=args.dtype, rng=np.random.default_rng([args.seed, 1])
    )
    student = Model(args, np.random.default_rng([args.seed, 2]))
    data_rng = np.random.default_rng([args.seed, 3])
    # Teacher outputs and held-out evaluations are never back-propagated: save_for_backward=False
    # keeps nothing.
    heldout_x1, heldout_x2 = batch(data_rng, args, 1024)
    heldout_y = teacher(heldout_x1, heldout_x2, save_for_backward=False)

    def heldout_loss():
        return mse(student(heldout_x1, heldout_x2, save_for_backward=False), heldout_y)[0]

    print(f"backend {linmaps.get_backend()}; student {student.bilinear} -> {student.head}")
    initial = heldout_loss()
    print(f"step {0:5d}  held-out loss {initial:.3e}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x1, x2 = batch(data_rng, args, args.batch)
        target = teacher(x1, x2, save_for_backward=False)
        loss, grad_y = mse(student(x1, x2), target)
        student.zero_grad()
        student.backward(grad_y)
        student.sgd_step(args.lr)
        if step % args.print_every == 0 or step == args.steps:
            print(f"step {step:5d}  batch loss {loss:.3e}  held-out loss {heldout_loss():.3e}")
    final = heldout_loss()
    with np.errstate(divide="ignore", invalid="ignore"):  # a diverged run has final = nan
        reduction = np.float64(initial) / final
    print(
        f"{args.steps} steps in {time.perf_counter() - start:.2f} s; held-out loss fell "
        f"{reduction:.3g}x ({initial:.3e} -> {final:.3e})"
    )
    return initial, final


def main(argv=None) -> int:
    args = parse_args(argv)
    # use_backend, not set_backend: main() may run inside another program (the tests do).
    with linmaps.use_backend(args.backend or linmaps.get_backend()):
        initial, final = train(args)
    if not final * args.min_reduction <= initial:
        print(f"FAILED: the loss fell less than {args.min_reduction:g}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
