"""All-pairs (biaffine) cases: ``linmaps.bilinear_pairs`` forward + backward against NumPy's
``einsum(optimize=True)``, PyTorch's einsum in supar's form (forward and autograd backward) and
JAX's jitted ``vjp`` of the einsum when JAX is installed, in one process (the compiled
backend's worker), in alternating rounds as the ceiling cases are timed.

A case is a parser's shape ``(batch, L, d, out)``: ``x1, x2 (batch, L, d)``, ``W (out, d, d)``,
a bias ``(out,)`` and ``dS (batch, L, L, out)``; every variant's outputs (``S`` and the four
gradients) are checked against the float64 einsum of the definition before anything is
timed.
"""

from __future__ import annotations

import functools
import math
import textwrap
from dataclasses import dataclass

import numpy as np

from ..backends import JaxBackend, linmaps
from ..oracle import check_outputs, expected_with_tolerance
from ..tables import format_seconds, render_table
from . import PerBackendKind, on_backend, register_kind, seeded_rng
from .ceiling import CeilingRun, Variant, _runs_ceiling, _torch_info, time_rounds

OUTPUTS = ("S", "grad_x1", "grad_x2", "grad_weight", "grad_bias")
PEERS = ("numpy", "torch", "jax")
# The targets: fwd+bwd at least this many times the peer's rate.
TARGETS = {"numpy": 5.0, "torch": 1.3, "jax": 1.2}
SPEC = "bia,oac,bjc->bijo"


@dataclass(frozen=True)
class PairsCase:
    """``dims`` is ``(batch, L, d, out)``: sentences of ``L`` words with ``d`` features."""

    dims: tuple

    kind = "pairs"

    def __post_init__(self):
        if len(self.dims) != 4 or any(int(d) < 1 for d in self.dims):
            raise ValueError(
                f"a pairs case needs 4 positive sizes (B x L x d x out), got {self.dims}"
            )

    @property
    def id(self) -> str:
        return "pairs-" + "x".join(map(str, self.dims))

    def describe(self) -> str:
        batch, length, d, out = self.dims
        return f"batch={batch} L={length} d={d} out={out}: S (batch, L, L, out) fwd+bwd"

    def flops(self) -> dict:
        """Forward ``2 B L out d (d + L)`` (V = X2 W^T, then S = X1 V^T); fwd+bwd counted as
        three times that (the backward's four products cost twice the forward's two)."""
        batch, length, d, out = self.dims
        forward = 2 * batch * length * out * d * (d + length)
        return {"fwd+bwd": 3 * forward}

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "dims": list(self.dims),
            "dim_names": ["batch", "L", "d", "out"],
            "description": self.describe(),
            "flops": self.flops(),
        }


DEFAULTS = tuple(
    PairsCase(dims)
    for dims in ((32, 40, 500, 1), (32, 40, 100, 50), (8, 128, 256, 1), (4, 512, 64, 8))
)


def make_pairs_inputs(case: PairsCase, dtype, seed: int) -> dict:
    rng = seeded_rng(case, seed)
    batch, length, d, out = case.dims
    scale = 1.0 / math.sqrt(d)
    return {
        "x1": rng.standard_normal((batch, length, d)).astype(dtype),
        "x2": rng.standard_normal((batch, length, d)).astype(dtype),
        "weight": (scale * rng.standard_normal((out, d, d))).astype(dtype),
        "bias": rng.standard_normal(out).astype(dtype),
        "grad_out": rng.standard_normal((batch, length, length, out)).astype(dtype),
    }


def pairs_oracle(case: PairsCase, inputs: dict, dtype) -> dict:
    """``(value, tolerance)`` of every output, from the float64 einsum of the definition."""
    exact = {k: a.astype(np.float64) for k, a in inputs.items()}
    absolute = {k: np.abs(a) for k, a in exact.items()}
    batch, length, d, out = case.dims

    def outputs(a):
        x1, x2, w, b, g = (a[k] for k in ("x1", "x2", "weight", "bias", "grad_out"))
        return (
            np.einsum(SPEC, x1, w, x2, optimize=True) + b,
            np.einsum("bijo,oac,bjc->bia", g, w, x2, optimize=True),
            np.einsum("bijo,bia,oac->bjc", g, x1, w, optimize=True),
            np.einsum("bijo,bia,bjc->oac", g, x1, x2, optimize=True),
            g.sum(axis=(0, 1, 2)),
        )

    lengths = (d * d + 1, length * out * d, length * out * d, batch * length * length)
    lengths += (batch * length * length,)
    return {
        name: expected_with_tolerance(value, magnitude, k, dtype)
        for name, value, magnitude, k in zip(OUTPUTS, outputs(exact), outputs(absolute), lengths)
    }


# ----------------------------------------------------------------------------- in the worker


def _numpy_step(x1, x2, weight, bias, grad_out):
    s = np.einsum(SPEC, x1, weight, x2, optimize=True) + bias
    return (
        s,
        np.einsum("bijo,oac,bjc->bia", grad_out, weight, x2, optimize=True),
        np.einsum("bijo,bia,oac->bjc", grad_out, x1, weight, optimize=True),
        np.einsum("bijo,bia,bjc->oac", grad_out, x1, x2, optimize=True),
        grad_out.sum(axis=(0, 1, 2)),
    )


def _torch_variant(torch, inputs):
    """supar's form: ``einsum('bxi,oij,byj->boxy')`` plus the bias, backward by autograd;
    ``dS`` given in supar's layout ``(batch, out, L, L)``."""
    tensors = {k: torch.from_numpy(a).requires_grad_(k != "grad_out") for k, a in inputs.items()}
    grad = tensors["grad_out"].detach().permute(0, 3, 1, 2).contiguous()
    wanted = [tensors[k] for k in ("x1", "x2", "weight", "bias")]

    def step():
        s = torch.einsum("bxi,oij,byj->boxy", tensors["x1"], tensors["weight"], tensors["x2"])
        s = s + tensors["bias"][:, None, None]
        return s, torch.autograd.grad(s, wanted, grad)

    def first():
        s, (g1, g2, gw, gb) = step()
        return [
            s.detach().permute(0, 2, 3, 1).numpy(),
            g1.numpy(),
            g2.numpy(),
            gw.numpy(),
            gb.numpy(),
        ]

    return Variant("torch", (step,), first, pool="torch")


def _jax_variant(inputs):
    import jax
    import jax.numpy as jnp

    def forward(x1, x2, weight, bias):
        return jnp.einsum(SPEC, x1, weight, x2) + bias

    @jax.jit
    def forward_backward(grad, x1, x2, weight, bias):
        s, vjp = jax.vjp(forward, x1, x2, weight, bias)
        return (s, *vjp(grad))

    args = [jnp.asarray(inputs[k]) for k in ("grad_out", "x1", "x2", "weight", "bias")]
    jax.block_until_ready(forward_backward(*args))  # compile now, outside every timing

    def step():
        return jax.block_until_ready(forward_backward(*args))

    def first():
        s, g1, g2, gw, gb = step()
        return [np.asarray(a) for a in (s, g1, g2, gw, gb)]

    return Variant("jax", (step,), first, pool="jax")


def _pairs_run(case: PairsCase, session) -> CeilingRun:
    inputs = make_pairs_inputs(case, session.dtype, session.seed)
    x1, x2, weight, bias, grad_out = (inputs[k] for k in ("x1", "x2", "weight", "bias", "grad_out"))

    def linmaps_step():
        s = linmaps.bilinear_pairs(x1, x2, weight, bias)
        return (s, *linmaps.bilinear_pairs_backward(grad_out, x1, x2, weight))

    numpy_step = functools.partial(_numpy_step, x1, x2, weight, bias, grad_out)
    groups = [
        [Variant("linmaps", (linmaps_step,), lambda: list(linmaps_step()))],
        [Variant("numpy", (numpy_step,), lambda: list(numpy_step()))],
    ]
    torch, torch_info = _torch_info()
    if torch is not None:
        groups.append([_torch_variant(torch, inputs)])
    jax_reason = JaxBackend().unavailable_reason()
    if jax_reason is None:
        groups.append([_jax_variant(inputs)])
    jax_info = (
        {"status": "ok"} if jax_reason is None else {"status": "unavailable", "reason": jax_reason}
    )
    return CeilingRun(groups, {"torch": torch_info, "jax": jax_info})


def worker_first_calls(session, case: PairsCase) -> dict:
    """Make the case's variants and run one step of each: their outputs, for the check."""
    import time

    session.end_case()
    linmaps.share_blas_threads()
    run = _pairs_run(case, session)
    outputs = {}
    for variant in run.variants:
        start = time.perf_counter()
        first = variant.first()
        run.first_s[variant.name] = time.perf_counter() - start
        outputs[variant.name] = [np.asarray(o) for o in first]
    session.case, session.state = case, run
    return {"outputs": outputs, "info": run.info}


def worker_time(session, case: PairsCase, settings) -> dict:
    if session.case != case or not isinstance(session.state, CeilingRun):
        raise RuntimeError("worker_time() needs worker_first_calls() on the same case")
    return time_rounds(session.state, settings)


# ----------------------------------------------------------------------------- in the harness


class PairsKind(PerBackendKind):
    """The pairs cases, in the worker of the compiled backend; the others are "not applicable"."""

    kinds = ("pairs",)
    section = "pairs"
    order = 45
    custom_sizes = ("pairs:BxLxDxOUT",)
    defaults = DEFAULTS
    # Only with --cases pairs: NumPy's einsum(optimize=True), a peer, takes about 100 s per
    # call at (32, 40, 100, 50) on 2 Zen 4 cores, so these cases take many minutes.
    on_request = True

    def from_dims(self, kind, dims):
        return PairsCase(dims)

    def run(self, case, suite):
        settings, runners, progress = suite.settings, suite.runners, suite.progress
        dtype = np.dtype(settings.dtype)
        progress.step(f"{case.id}: oracle", 0, major=True)
        expected = pairs_oracle(case, make_pairs_inputs(case, dtype, settings.seed), dtype)
        results = {}
        for name in list(runners.proxies):
            if not _runs_ceiling(runners.backends[name]):
                results[name] = {
                    "status": "not applicable",
                    "reason": "the pairs cases time linmaps' compiled backend (cpp)",
                }
                progress.step(f"{case.id} {name} (not applicable)")
                continue
            progress.step(f"{case.id} {name}")
            record = results[name] = {}
            with on_backend(runners, name, record):
                first = runners.call(name, "run", worker_first_calls, case)
                checks = {
                    variant: check_outputs(expected, OUTPUTS, got)
                    for variant, got in first["outputs"].items()
                }
                record.update(first["info"])
                record["check"] = {variant: c.to_json() for variant, c in checks.items()}
                wrong = {variant: c for variant, c in checks.items() if not c.ok}
                if wrong:  # reported as an error, never timed
                    record.update(
                        status="error",
                        error="; ".join(f"{v}: {c.message}" for v, c in wrong.items()),
                    )
                    continue
                stats = runners.call(name, "run", worker_time, case, settings)
                t = stats["t_s"]
                record.update(
                    status="ok",
                    t_s=t,
                    vs={peer: t[peer] / t["linmaps"] for peer in PEERS if peer in t},
                    rounds_s=stats["rounds_s"],
                    n_rounds=stats["n_rounds"],
                )
        return {**case.to_json(), "dtype": settings.dtype, "results": results}

    def format(self, records, result, intro=True):
        lines = []
        if intro:
            guide = (
                "pairs: linmaps.bilinear_pairs + bilinear_pairs_backward against NumPy's "
                "einsum(optimize=True), PyTorch's einsum in supar's form (autograd backward) "
                "and JAX's jit(vjp) of the einsum, median time per fwd+bwd step; x = the "
                "peer's time / linmaps' (targets: "
                + ", ".join(f"{p} >= {v}" for p, v in TARGETS.items())
                + ")"
            )
            lines += textwrap.wrap(guide, 100)
        headers = ["pairs", "backend", "linmaps", "numpy", "x", "torch", "x", "jax", "x"]
        rows = []
        for case in records:
            short = "x".join(map(str, case["dims"]))
            for name, record in case["results"].items():
                if record["status"] == "error":
                    rows.append([short, name, "ERROR", "", "", "", "", "", ""])
                    rows.append(f"  {record['error']}")
                if record["status"] != "ok":
                    continue
                t, vs = record["t_s"], record["vs"]
                cells = [short, name, format_seconds(t["linmaps"])]
                for peer in PEERS:
                    if peer in t:
                        cells += [format_seconds(t[peer]), f"{vs[peer]:.2f}"]
                    else:
                        cells += ["-", ""]
                rows.append(cells)
        lines.append(render_table(headers, rows, right_aligned=set(range(2, 9))))
        return "\n".join(lines)

    def summary(self, records, result):
        if not records:
            return None
        parts = []
        for case in records:
            short = "x".join(map(str, case["dims"]))
            for name, record in case["results"].items():
                if record["status"] == "error":
                    parts.append(f"{short} {name} ERROR")
                elif record["status"] == "ok":
                    vs = ", ".join(f"{p} {v:.2f}x" for p, v in record["vs"].items())
                    parts.append(f"{short} {vs}")
        return "pairs: linmaps fwd+bwd vs " + "; ".join(parts) if parts else "pairs: -"


register_kind(PairsKind())
