"""Dask cases: a bilinear forward and backward over a table on disk, on a local Dask cluster
(``linmaps.dask``), against linmaps' in-memory call on the same rows."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from ..backends import linmaps
from ..tables import render_table
from . import PerBackendKind, on_backend, register_kind


@dataclass(frozen=True)
class DaskCase:
    """``dims`` is ``(N, in1, in2, out)``: a bilinear map over N rows read from ``.npy``
    files, on a ``LocalCluster`` of ``workers`` processes of one thread each, ``chunk`` rows
    per task; and the in-memory call on the same rows (the arrays in RAM, every thread).
    ``--quick`` runs an eighth of the rows."""

    dims: tuple
    workers: int = 2
    chunk: int = 250_000

    kind = "dask"
    names = ("N", "in1", "in2", "out")

    def __post_init__(self):
        if len(self.dims) != 4 or any(int(d) < 1 for d in self.dims):
            raise ValueError(f"a dask case needs 4 positive sizes, got {self.dims}")

    @property
    def id(self) -> str:
        return "dask-bilinear-" + "x".join(map(str, self.dims))

    def describe(self) -> str:
        n, in1, in2, out = self.dims
        return (
            f"bilinear {in1}x{in2}->{out} over N={n} rows of .npy files: "
            f"linmaps.dask on a {self.workers}-process LocalCluster (1 thread each, "
            f"{self.chunk} rows per task) vs linmaps in memory"
        )

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "dims": list(self.dims),
            "dim_names": list(self.names),
            "workers": self.workers,
            "chunk": self.chunk,
            "description": self.describe(),
        }


DEFAULTS = (DaskCase((4_000_000, 64, 64, 16)),)
TARGET = 0.8  # the cluster's rows/s as a fraction of the in-memory rows/s
OPERATIONS = ("forward", "backward")


def dask_missing() -> str | None:
    """Why the dask cases cannot run here (None: they can)."""
    missing = [m for m in ("dask", "distributed") if importlib.util.find_spec(m) is None]
    if missing:
        return f'{" and ".join(missing)} not installed (pip install "linmaps[dask]")'
    return None


def _write_npy(path, rows, features, dtype, seed, block=500_000) -> None:
    """A ``.npy`` file of normal samples, written block by block (never held whole)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, features))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        out[start:stop] = rng.standard_normal((stop - start, features)).astype(dtype)
    out.flush()
    del out


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _mismatch(name, got, expected, relative) -> str | None:
    """None when ``got`` equals ``expected`` (``relative=None``: bit for bit) or is within
    ``relative`` of its largest magnitude; else what differs."""
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"{name}: {got.dtype}{got.shape}, expected {expected.dtype}{expected.shape}"
    if relative is None:
        return None if np.array_equal(got, expected) else f"{name}: not the in-memory bits"
    error = float(np.max(np.abs(got.astype(np.float64) - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    return None if error <= relative * scale else f"{name}: off by {error:.3g} (of {scale:.3g})"


# ----------------------------------------------------------------------------- in the worker


def worker_run(session, case: DaskCase, settings) -> dict:
    """Write the table; time the in-memory calls and the cluster's, alternating; check.

    Runs in the ``cpp`` backend's worker (``BackendSession.run``). Forward: ``z`` written to
    an ``.npy`` file chunk by chunk (``to_npy``); backward: ``grad_x1`` and ``grad_x2``
    written the same way and ``grad_weight``, ``grad_bias`` computed, in one graph. In
    memory: ``linmaps.bilinear`` and ``linmaps.bilinear_backward`` on arrays in RAM.
    """
    import dask
    import distributed

    import linmaps.dask as ldk

    session.end_case()
    dtype = session.dtype
    n, in1, in2, out = case.dims
    rows = max(1, n // 8) if settings.quick else n
    reps = 1 if settings.quick else 2
    chunk = min(case.chunk, rows)
    record = {"rows": rows, "chunk": chunk, "repeats": reps}
    directory = tempfile.mkdtemp(prefix="linmaps-bench-dask-")
    environ = dict(os.environ)  # Dask's nanny writes its workers' variables into it
    try:
        paths = {
            name: os.path.join(directory, f"{name}.npy")
            for name in ("x1", "x2", "grad_z", "z", "grad_x1", "grad_x2")
        }
        start = time.perf_counter()
        for (name, features), seed in zip((("x1", in1), ("x2", in2), ("grad_z", out)), (1, 2, 3)):
            _write_npy(paths[name], rows, features, dtype, session.seed * 10 + seed)
        record["write_s"] = time.perf_counter() - start
        rng = np.random.default_rng(session.seed)
        weight = (rng.standard_normal((out, in1, in2)) / math.sqrt(in1 * in2)).astype(dtype)
        bias = rng.standard_normal(out).astype(dtype)

        # In memory: the whole arrays in RAM, linmaps' threads (the suite's --threads).
        table = {name: np.load(paths[name]) for name in ("x1", "x2", "grad_z")}
        x1, x2, grad_z = table["x1"], table["x2"], table["grad_z"]
        linmaps.bilinear(x1[:1000], x2[:1000], weight, bias)
        linmaps.bilinear_backward(grad_z[:1000], x1[:1000], x2[:1000], weight)
        in_memory = {
            "forward": lambda: linmaps.bilinear(x1, x2, weight, bias),
            "backward": lambda: linmaps.bilinear_backward(grad_z, x1, x2, weight),
        }

        start = time.perf_counter()
        with (
            distributed.LocalCluster(
                n_workers=case.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.CRITICAL,
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            record["cluster_start_s"] = time.perf_counter() - start
            x1d = ldk.from_npy(paths["x1"], chunks=(chunk, -1))
            x2d = ldk.from_npy(paths["x2"], chunks=(chunk, -1))
            grad_zd = ldk.from_npy(paths["grad_z"], chunks=(chunk, -1))
            ldk.bilinear(x1d[:1000], x2d[:1000], weight, bias).compute()  # workers import linmaps
            z = ldk.bilinear(x1d, x2d, weight, bias)
            grads = ldk.bilinear_backward(grad_zd, x1d, x2d, weight)
            sums = {}

            def cluster_backward():
                sums["grad_weight"], sums["grad_bias"] = dask.compute(
                    ldk.to_npy(grads.grad_x1, paths["grad_x1"], compute=False),
                    ldk.to_npy(grads.grad_x2, paths["grad_x2"], compute=False),
                    grads.grad_weight,
                    grads.grad_bias,
                )[2:]

            on_cluster = {
                "forward": lambda: ldk.to_npy(z, paths["z"]),
                "backward": cluster_backward,
            }
            # The two alternate, in memory then cluster, so that a machine that gets busier
            # or quieter during the case weighs on both alike; the best of each counts.
            times = {
                "memory": {op: [] for op in OPERATIONS},
                "cluster": {op: [] for op in OPERATIONS},
            }
            for op in OPERATIONS:
                for _ in range(reps):
                    result = None
                    start = time.perf_counter()
                    result = in_memory[op]()
                    times["memory"][op].append(time.perf_counter() - start)
                    if op == "backward":
                        full_grad_weight, full_grad_bias = result.grad_weight, result.grad_bias
                    result = None  # the in-memory outputs are freed before the cluster runs
                    times["cluster"][op].append(_timed(on_cluster[op]))
            workers = sorted(client.scheduler_info()["workers"])
            shares = [
                client.submit(
                    ldk._threads_for_task, x1d.numblocks[0], None, workers=[w], pure=False
                )
                for w in workers
            ]
            record["memory"] = {
                **{f"{op}_s": min(times["memory"][op]) for op in OPERATIONS},
                "samples_s": times["memory"],
                "threads": linmaps.get_num_threads(),
            }
            record["cluster"] = {
                **{f"{op}_s": min(times["cluster"][op]) for op in OPERATIONS},
                "samples_s": times["cluster"],
                "workers": case.workers,
                # linmaps' thread count in each worker (OMP_NUM_THREADS, which Dask's nanny
                # sets to 1 unless the parent's environment has one) and the share a task
                # of this graph uses there (linmaps.dask: at most the worker's nthreads).
                "worker_linmaps_threads": sorted(client.run(linmaps.get_num_threads).values()),
                "threads_per_task": sorted(client.gather(shares)),
                "tasks": x1d.numblocks[0],
            }
        grad_weight, grad_bias = sums["grad_weight"], sums["grad_bias"]
        table = x1 = x2 = grad_z = in_memory = None  # 4 GB of arrays: freed before the check

        # The check: a first and a last chunk bit for bit against the in-memory functions
        # on those rows; weight and bias gradients (sums over every chunk) to rounding.
        table = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
        relative = 1e-4 if dtype == np.float32 else 1e-10
        problems = [
            _mismatch("grad_weight", grad_weight, full_grad_weight, relative),
            _mismatch("grad_bias", grad_bias, full_grad_bias, relative),
        ]
        for rows_slice in (slice(0, chunk), slice(rows - x1d.chunks[0][-1], rows)):
            a, b, g = (np.asarray(table[k][rows_slice]) for k in ("x1", "x2", "grad_z"))
            expected = linmaps.bilinear_backward(g, a, b, weight, need_weight=False, bias=False)
            problems += [
                _mismatch(
                    "z",
                    table["z"][rows_slice],
                    linmaps.bilinear(a, b, weight, bias),
                    None,
                ),
                _mismatch("grad_x1", table["grad_x1"][rows_slice], expected.grad_x1, None),
                _mismatch("grad_x2", table["grad_x2"][rows_slice], expected.grad_x2, None),
            ]
        del table
        problems = [p for p in problems if p]
        record["check"] = {"passed": not problems, "message": "; ".join(problems)}
        return record
    finally:
        os.environ.clear()
        os.environ.update(environ)
        shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------- in the harness


class DaskKind(PerBackendKind):
    """The dask cases, run in the ``cpp`` backend's worker; "unavailable" without Dask."""

    kinds = ("dask",)
    section = "dask"
    order = 30
    custom_sizes = ("dask:NxIN1xIN2xOUT",)
    defaults = DEFAULTS
    runner = "cpp"

    def from_dims(self, kind, dims):
        return DaskCase(dims)

    def run(self, case, suite):
        settings, runners, progress = suite.settings, suite.runners, suite.progress
        progress.step(f"{case.id}", 0, major=True)
        results = {}
        missing = dask_missing()
        for backend in suite.backends:
            name = backend.name
            if name != self.runner:
                results[name] = {
                    "status": "not applicable",
                    "reason": "the dask cases time linmaps' compiled backend",
                }
                continue
            progress.step(f"{case.id} {name}")
            if missing is not None:
                results[name] = {"status": "unavailable", "reason": missing}
                continue
            if name not in runners.proxies:
                continue  # unavailable: complete() says why
            record = results[name] = {}
            time.sleep(settings.settle_s)
            with on_backend(runners, name, record):
                measured = runners.call(name, "run", worker_run, case, settings)
                record.update(measured)
                if not measured["check"]["passed"]:
                    record.update(status="error", error=measured["check"]["message"])
                    continue
                rows = measured["rows"]
                rates = {}
                for where in ("memory", "cluster"):
                    for op in OPERATIONS:
                        rates.setdefault(where, {})[op] = rows / measured[where][f"{op}_s"]
                record.update(
                    status="ok",
                    rows_per_s=rates,
                    ratio={op: rates["cluster"][op] / rates["memory"][op] for op in OPERATIONS},
                )
        return {
            **case.to_json(),
            "dtype": settings.dtype,
            "target": TARGET,
            "results": results,
        }

    def format(self, records, result, intro=True):
        headers = ["case", "rows", "op", "in memory", "cluster", "cluster / in memory"]
        rows, notes = [], []
        for case in records:
            for name, record in case["results"].items():
                if record["status"] == "not applicable":
                    continue
                if record["status"] != "ok":
                    rows.append([case["id"], "", "", record["status"].upper(), "", ""])
                    rows.append(f"  {name}: {record.get('error') or record.get('reason')}")
                    continue
                for op in OPERATIONS:
                    ratio = record["ratio"][op]
                    rows.append(
                        [
                            case["id"],
                            f"{record['rows']:,}",
                            op,
                            f"{record['rows_per_s']['memory'][op] / 1e6:.3f} M rows/s",
                            f"{record['rows_per_s']['cluster'][op] / 1e6:.3f} M rows/s",
                            f"{ratio:.2f}{'' if ratio >= case['target'] else '  (< target)'}",
                        ]
                    )
                notes.append(
                    f"{case['id']}: in memory {record['memory']['threads']} threads; cluster "
                    f"{record['cluster']['workers']} workers x 1 thread (linmaps threads per "
                    f"task {record['cluster']['threads_per_task']}), {record['cluster']['tasks']} "
                    f"tasks of {record['chunk']:,} rows; table written in "
                    f"{record['write_s']:.1f} s, cluster started in "
                    f"{record['cluster_start_s']:.1f} s (neither timed)"
                )
        lines = []
        if intro:
            lines += [
                f"dask: linmaps.dask on a local cluster, from .npy files on disk, vs the "
                f"in-memory call (best of the repeats; target cluster / in memory >= {TARGET})",
            ]
        lines += [f"  {case['id']}: {case['description']}" for case in records]
        text = "\n".join(lines) + "\n" + render_table(headers, rows, right_aligned={1, 3, 4, 5})
        if notes:
            text += "\n" + "\n".join(f"  ({note})" for note in notes)
        return text

    def summary(self, records, result):
        parts = []
        for case in records:
            for record in case["results"].values():
                if record["status"] == "ok":
                    parts.append(
                        f"{case['id']}: fwd {record['ratio']['forward']:.2f}, "
                        f"bwd {record['ratio']['backward']:.2f}"
                    )
                elif record["status"] in ("error", "unavailable"):
                    parts.append(f"{case['id']}: {record['status']}")
        if not parts:
            return None
        return f"dask cluster / in memory (target >= {TARGET}): " + "; ".join(parts)


register_kind(DaskKind())
