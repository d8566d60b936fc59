"""The run: start the backends' workers, time the GEMM, run every case kind, build the record."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np

from .backends import resolve_backends
from .cases import case_kinds, kind_of
from .machine import (
    load_average,
    machine_info,
    own_load,
    process_age_s,
    quiet_check,
    usable_cpus,
    versions,
)
from .memory import MEMORY_METHOD
from .oracle import TOLERANCE_FACTOR
from .settings import DTYPES, OPS, Settings
from .threads import apply_threads
from .timing import measure_gemm, summarize
from .workers import Runners

SCHEMA = "linmaps-bench/1"


class Progress:
    """A one-line progress bar on stderr when it is a terminal.

    When stderr is a file or a pipe (CI logs) a bar redrawn with carriage returns is noise, so
    only the major steps (each case, the GEMM) get a plain line.
    """

    width = 28

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done = max(1, total), 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label: str, count: int = 1, major: bool = False) -> None:
        """Announce ``label`` (about to run); it accounts for ``count`` units of the total."""
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            if self.tty:
                filled = int(self.width * self.done / self.total)
                line = (
                    f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/"
                    f"{self.total} {elapsed:4.0f} s  {label}"
                )
                self.stream.write("\r" + line[:118].ljust(118))
                self.stream.flush()
            elif major:
                self.stream.write(f"[{self.done}/{self.total}, {elapsed:.0f} s] {label}\n")
                self.stream.flush()
        self.done += count

    def clear(self) -> None:
        """Erase the bar, so that a line printed to the terminal now is not mixed with it."""
        if self.tty:
            self.stream.write("\r" + " " * 118 + "\r")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 118 + "\r")
            self.stream.flush()


class SuiteRun:
    """What a case kind's ``run`` and ``complete`` get: the settings, the started backends
    (``runners``; ``backends`` in the order listed, ``status`` of each), the progress."""

    def __init__(self, settings: Settings, backends: list, runners: Runners, progress: Progress):
        self.settings = settings
        self.backends = backends
        self.runners = runners
        self.progress = progress
        self.status = runners.status


def _gemm_record(settings: Settings, start: list, end: list) -> dict:
    """The reference GEMM's record from its samples at the start and (when taken) the end."""
    flops = 2 * settings.gemm_size**3
    gemm = summarize(start + end)
    gemm.update(
        size=settings.gemm_size,
        dtype=settings.dtype,
        flops=flops,
        gflops=flops / gemm["median_s"] / 1e9,
        gflops_start=flops / float(np.median(start)) / 1e9,
        gflops_end=flops / float(np.median(end)) / 1e9 if end else None,
    )
    return gemm


def _settings_record(settings: Settings) -> dict:
    return {
        "dtype": settings.dtype,
        "threads": settings.threads,
        "ops": list(settings.ops),
        "quick": settings.quick,
        "repeat": settings.repeat,
        "min_samples": settings.min_samples,
        "budget_s": settings.budget_s,
        "min_sample_s": settings.min_sample_s,
        "extra_warmup": settings.extra_warmup,
        "first_call_is_sample_above_s": settings.first_call_is_sample_above_s,
        "settle_s": settings.settle_s,
        "mixed_rounds": settings.mixed_rounds,
        "mixed_measure_s": settings.mixed_measure_s,
        "mixed_min_steps": settings.mixed_min_steps,
        "mixed_warmup_steps": settings.mixed_warmup_steps,
        "ceiling_rounds": settings.ceiling_rounds,
        "ceiling_measure_s": settings.ceiling_measure_s,
        "ceiling_min_steps": settings.ceiling_min_steps,
        "isolate": settings.isolate,
        "seed": settings.seed,
        "measure_memory": settings.measure_memory,
        "tolerance": f"|result - oracle| <= {TOLERANCE_FACTOR} * (sqrt(K) + 2) * eps * "
        "sum|terms| + eps * |oracle|, oracle = NumPy backend in float64",
        "memory_method": MEMORY_METHOD if settings.measure_memory else None,
    }


def run_suite(
    cases,
    backends=None,
    settings: Settings | None = None,
    progress: bool = True,
    command=None,
    on_start=None,
    on_case=None,
) -> dict:
    """Run the benchmark and return the record (the JSON document, see docs/benchmarks.md).

    ``backends``: names or :class:`~linmaps_bench.backends.Backend` objects (default:
    :data:`~linmaps_bench.backends.DEFAULT_BACKENDS`). ``on_start(record)`` is called once the
    backends are up and the start's GEMM is timed, with the record so far (no cases yet);
    ``on_case(case_kind, case_record, record)`` after each case, its record completed against
    the start's GEMM rate. Both serve to print as the run goes.
    """
    from .backends import DEFAULT_BACKENDS

    settings = settings or Settings(threads=usable_cpus())
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {settings.dtype!r}")
    unknown_ops = set(settings.ops) - set(OPS)
    if unknown_ops:
        raise ValueError(f"unknown operations {sorted(unknown_ops)}; expected some of {OPS}")
    kinds = case_kinds()
    cases = list(cases)
    # Kind by kind (in their order), each kind's cases in the order given.
    cases = [case for case_kind in kinds for case in cases if kind_of(case) is case_kind]
    backends = resolve_backends(DEFAULT_BACKENDS if backends is None else backends)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    own_load_start = own_load(process_age_s())
    threads, restore_threads = apply_threads(settings.threads)  # for the oracle and the GEMM

    runners = Runners(backends, settings)
    n_ready = len(runners.proxies)
    total = sum(kind_of(c).progress_steps(c, settings, n_ready) for c in cases) + 2
    bar = Progress(total, enabled=progress)
    suite = SuiteRun(settings, backends, runners, bar)
    head = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": {**machine_info(), "load_average_start": load_start},
        "versions": versions(runners.status),
        "settings": _settings_record(settings),
        "threads": threads,
        "backends": runners.status,
    }
    records = {case_kind.section: [] for case_kind in kinds}
    try:
        bar.step("reference GEMM (start)", major=True)
        time.sleep(settings.settle_s)
        gemm_start = measure_gemm(settings.dtype, settings.gemm_repeats, settings.gemm_size)
        head["reference_gemm"] = _gemm_record(settings, gemm_start, [])
        start_gflops = head["reference_gemm"]["gflops"]
        if on_start is not None:
            on_start({**head, **records})
        for case in cases:
            case_kind = kind_of(case)
            record = case_kind.run(case, suite)
            case_kind.complete(record, suite, start_gflops)
            records[case_kind.section].append(record)
            if on_case is not None:
                bar.clear()
                on_case(case_kind, record, {**head, **records})
        bar.step("reference GEMM (end)", major=True)
        time.sleep(settings.settle_s)
        gemm_end = measure_gemm(settings.dtype, settings.gemm_repeats, settings.gemm_size)
    finally:
        bar.close()
        runners.close()
        restore_threads()

    gemm = _gemm_record(settings, gemm_start, gemm_end)
    for case_kind in kinds:
        for record in records[case_kind.section]:
            case_kind.complete(record, suite, gemm["gflops"])

    finished = datetime.datetime.now(datetime.timezone.utc)
    head["machine"]["load_average_end"] = load_average()
    return {
        "schema": SCHEMA,
        "started": head["started"],
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round((finished - started).total_seconds(), 2),
        "command": command,
        "machine": head["machine"],
        "versions": head["versions"],
        "settings": head["settings"],
        "threads": threads,
        "backends": runners.status,
        "reference_gemm": gemm,
        # Was the machine quiet (the GEMM rate steady, no other load at the start)?
        "quiet": quiet_check(gemm["gflops_start"], gemm["gflops_end"], load_start, own_load_start),
        **records,
    }


def has_errors(result: dict) -> bool:
    """True when some backend gave a wrong result or failed, in any case of the record."""
    return any(
        case_kind.has_errors(record)
        for case_kind in case_kinds()
        for record in result.get(case_kind.section, [])
    )


def write_json(result: dict, path) -> str:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path
