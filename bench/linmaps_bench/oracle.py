"""Correctness before timing: the float64 oracle of a case, the rounding tolerance, the check."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .backends import FunctionalBackend, linmaps

if TYPE_CHECKING:
    from .cases.ops import Case

# A correct result differs from the float64 oracle by rounding only. For a sum of K terms the
# worst-case bound is ~K*eps*magnitude, too loose to catch anything at K = 512*512 in float32;
# the usual probabilistic bound (Higham, "Accuracy and Stability", 3.1) replaces K by sqrt(K).
# TOLERANCE_FACTOR is its safety margin: a wrong transpose or a missing term is off by O(1)
# relative to the values, hundreds of times beyond this.
TOLERANCE_FACTOR = 4.0


@dataclass
class CheckResult:
    ok: bool
    message: str
    worst_error_vs_tolerance: float | None

    def to_json(self) -> dict:
        return {"passed": self.ok, "worst_error_vs_tolerance": self.worst_error_vs_tolerance}


class Oracle:
    """The right answer for one case, and the check of a backend's outputs against it.

    Every output (forward and backward) is computed once, in float64, by the NumPy backend,
    together with its magnitude: the same map applied to the absolute values of the inputs.
    Every output is a sum of products of inputs, so the magnitude is the sum of the absolute
    values of its terms, the scale of its rounding error. An entry passes when

        |result - oracle| <= TOLERANCE_FACTOR * (sqrt(K) + 2) * eps * magnitude
                             + eps * |oracle| + (K + 2) * tiny

    with ``K`` the number of terms of the entry (``Case.sum_lengths``), ``eps`` and ``tiny``
    those of the benchmark's dtype. The tolerances are computed once and shared by every
    backend and operation.
    """

    def __init__(self, case: Case, inputs: dict, dtype):
        self.case = case
        exact = {name: a.astype(np.float64) for name, a in inputs.items()}
        absolute = {name: np.abs(a) for name, a in exact.items()}
        python = FunctionalBackend(
            "oracle",
            linmaps.linear,
            linmaps.linear_backward,
            linmaps.bilinear,
            linmaps.bilinear_backward,
        )
        with linmaps.use_backend("python"):
            values = python.operation(case, "fwd+bwd", exact)()
            magnitudes = python.operation(case, "fwd+bwd", absolute)()
        lengths = case.sum_lengths()
        self.expected = {
            name: expected_with_tolerance(value, magnitude, lengths[name], dtype)
            for name, value, magnitude in zip(case.output_names("fwd+bwd"), values, magnitudes)
        }

    def check(self, op: str, outputs) -> CheckResult:
        """Compare a backend's outputs for ``op`` (in ``Case.output_names(op)`` order)."""
        return check_outputs(self.expected, self.case.output_names(op), outputs)


def expected_with_tolerance(value, magnitude, k: int, dtype) -> tuple:
    """``(value, tolerance)`` of an output whose entries are sums of ``k`` terms (Oracle)."""
    finfo = np.finfo(dtype)
    tolerance = magnitude * (TOLERANCE_FACTOR * (math.sqrt(k) + 2) * finfo.eps)
    tolerance += finfo.eps * np.abs(value)
    tolerance += (k + 2) * finfo.tiny
    return value, tolerance


def check_outputs(expected: dict, names, outputs) -> CheckResult:
    """Compare ``outputs`` (in ``names`` order) with ``expected[name] = (value, tolerance)``."""
    if len(outputs) != len(names):
        return CheckResult(
            False,
            f"expected {len(names)} outputs ({', '.join(names)}), got {len(outputs)}",
            None,
        )
    worst = 0.0
    for name, actual in zip(names, outputs):
        if actual is None:
            return CheckResult(False, f"{name}: missing (None)", None)
        value, tolerance = expected[name]
        if actual.shape != value.shape:
            return CheckResult(False, f"{name}: shape {actual.shape}, expected {value.shape}", None)
        ratio = actual.astype(np.float64)  # in place from here: outputs reach 16M entries
        ratio -= value
        np.abs(ratio, out=ratio)
        ratio /= tolerance
        if not np.isfinite(ratio).all():  # NaN or inf where the oracle is finite
            bad = int(np.count_nonzero(~np.isfinite(ratio)))
            return CheckResult(False, f"wrong result: {name}: {bad} non-finite entries", None)
        if ratio.size == 0:
            continue
        index = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        worst_here = float(ratio[index])
        worst = max(worst, worst_here)
        if worst_here > 1:
            bad = int(np.count_nonzero(ratio > 1))
            return CheckResult(
                False,
                f"wrong result: {name}: {bad} of {ratio.size} entries outside the "
                f"tolerance; worst at {tuple(map(int, index))}: got {actual[index]:.6g}, "
                f"expected {value[index]:.6g} ({worst_here:.3g}x the tolerance)",
                worst_here,
            )
    return CheckResult(True, "", worst)
