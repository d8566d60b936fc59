"""The linmaps benchmark harness: cases, backends, correctness checks, timing, memory, records.

``bench/run.py`` is the command line; this package holds the logic so that it can be imported
and tested. One module per responsibility:

==============  =============================================================================
``settings``    what a run measures and how hard (:class:`Settings`, the ``--quick`` preset)
``cases``       the :class:`CaseKind` interface, the registry of kinds, ``--cases`` selection;
                one module per kind: ``cases/ops.py`` (linear, bilinear), ``cases/mixed.py``,
                ``cases/train_step.py`` (torch.nn vs linmaps.torch), ``cases/dask_cluster.py``,
                ``cases/ceiling.py`` (OpenBLAS, NumPy, PyTorch beside linmaps)
``backends``    the :class:`Backend` interface and the registry (``cpp``, ``python``, ``torch``)
``oracle``      the float64 oracle and the rounding tolerance every result is checked against
``timing``      calibrated samples of one call, their statistics, the reference GEMM
``threads``     one thread count for linmaps, NumPy's BLAS and each backend
``memory``      peak extra RSS of a call
``workers``     one worker process per backend (:class:`BackendSession`)
``machine``     CPU, load, versions
``suite``       :func:`run_suite`: the run and its JSON record
``report``      the printed tables and the PNG chart; ``tables``: their building blocks
==============  =============================================================================

The flow of :func:`run_suite`:

1. Each backend (``--backends``; :data:`DEFAULT_BACKENDS` by default) is started in a worker
   process of its own; one that cannot run there is recorded as unavailable, never as an
   error. Separate processes, used one at a time, matter: NumPy's OpenBLAS threads keep
   spinning for ~0.15 s after a call, and on a 2-core machine torch's calls in that window ran
   2-5x slower; interleaving libraries in one process would bias every comparison.
2. Every backend gets the same thread count (linmaps' OpenMP, NumPy's BLAS pool through
   threadpoolctl, ``torch.set_num_threads``).
3. The reference rate, a 2048x2048 ``numpy.matmul``, is timed at the start and at the end.
4. Case by case (kinds in their order), the case's kind runs it: for linear and bilinear
   cases this process computes the float64 oracle; then, one backend after the other, the
   worker makes the same seeded inputs, runs each operation once and sends the result back;
   a result outside the rounding tolerance is recorded as an error and not timed. A correct
   one is warmed up and timed in the worker. The first (checked) backward call doubles as the
   measurement of the backend's peak extra memory (see :data:`MEMORY_METHOD`). The mixed
   cases time one training step that alternates NumPy products and linmaps calls; the
   ceiling cases time OpenBLAS's products, NumPy and PyTorch beside linmaps in the compiled
   backend's worker.

The result is one JSON-ready dict (:data:`SCHEMA`); :mod:`linmaps_bench.report` turns it into
tables and a chart.
"""

from .backends import (
    BACKENDS,
    DEFAULT_BACKENDS,
    Backend,
    BackendError,
    CpuLevelBackend,
    FunctionalBackend,
    LinmapsBackend,
    ThreadCountBackend,
    TorchBackend,
    WorkerFailed,
    lookup_backend,
    register_backend,
    resolve_backends,
)
from .cases import (
    KIND_REGISTRY,
    CaseKind,
    case_kinds,
    default_cases,
    kind_of,
    register_kind,
    select_cases,
)
from .cases.mixed import (
    MIXED_ENV_VARIABLES,
    MIXED_PARTS,
    MixedCase,
    MixedStep,
    check_mixed,
    make_mixed_inputs,
    mixed_environment,
    mixed_stats,
    time_mixed,
)
from .cases.ops import FLOP_FACTORS, Case, make_inputs
from .machine import load_average, machine_info, usable_cpus, versions
from .memory import MEMORY_METHOD
from .oracle import TOLERANCE_FACTOR, CheckResult, Oracle, check_outputs
from .settings import DTYPES, OPS, REFERENCE_GEMM_SIZE, Settings
from .suite import SCHEMA, Progress, SuiteRun, has_errors, run_suite, write_json
from .threads import apply_threads, thread_pools
from .timing import measure_gemm, summarize, time_operation
from .workers import BackendSession

DEFAULT_CASES = tuple(default_cases())  # every registered kind's defaults
KINDS = tuple(KIND_REGISTRY)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "DEFAULT_CASES",
    "DTYPES",
    "FLOP_FACTORS",
    "KINDS",
    "KIND_REGISTRY",
    "MEMORY_METHOD",
    "MIXED_ENV_VARIABLES",
    "MIXED_PARTS",
    "OPS",
    "REFERENCE_GEMM_SIZE",
    "SCHEMA",
    "TOLERANCE_FACTOR",
    "Backend",
    "BackendError",
    "BackendSession",
    "Case",
    "CaseKind",
    "CheckResult",
    "CpuLevelBackend",
    "FunctionalBackend",
    "LinmapsBackend",
    "MixedCase",
    "MixedStep",
    "Oracle",
    "Progress",
    "Settings",
    "SuiteRun",
    "ThreadCountBackend",
    "TorchBackend",
    "WorkerFailed",
    "apply_threads",
    "case_kinds",
    "check_mixed",
    "check_outputs",
    "default_cases",
    "has_errors",
    "kind_of",
    "load_average",
    "lookup_backend",
    "machine_info",
    "make_inputs",
    "make_mixed_inputs",
    "measure_gemm",
    "mixed_environment",
    "mixed_stats",
    "register_backend",
    "register_kind",
    "resolve_backends",
    "run_suite",
    "select_cases",
    "summarize",
    "thread_pools",
    "time_mixed",
    "time_operation",
    "usable_cpus",
    "versions",
    "write_json",
]
