"""The suite's cases: the :class:`CaseKind` interface, the registry of kinds, case selection.

Each kind of case is one module of this package, imported (and so registered) with it:
``ops`` (linear and bilinear maps, per operation and backend) and ``mixed`` (NumPy and
linmaps alternating in one training step). A new size of an existing kind goes into that
module's ``defaults``; a new kind is a new module here that subclasses :class:`CaseKind` (or
:class:`PerBackendKind`, for one result per backend) and calls :func:`register_kind`; nothing
else changes.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import re
import zlib

import numpy as np

from ..backends import BackendError, WorkerFailed


class CaseKind:
    """A kind of suite case: its cases, how one runs, how its record reads.

    The harness calls, for each selected case of the kind (kinds in ``order``): ``run`` once
    (progress: ``progress_steps`` units), ``complete`` right after it and again at the end of
    the run, and ``format`` to print it at once. At the end ``summary`` gives the kind's part
    of the summary and ``chart_panels`` its panels of the chart. The records, JSON-ready dicts
    with ``id`` and ``kind``, go to the run's JSON under ``section`` (a list, empty when no
    case of the kind ran).
    """

    kinds: tuple = ()  # the ``kind`` of its cases: the start of their ids, a --cases token
    section: str = ""  # key of the run's JSON that lists the records
    order: int = 50  # kinds run and print in this order (ops 10, mixed 20, ceiling 40)
    custom_sizes: tuple = ()  # how --cases gives a custom size, e.g. "linear:NxINxOUT"
    defaults: tuple = ()  # the cases of a default run

    def from_dims(self, kind: str, dims: tuple):
        """The case ``kind:D1xD2x...`` of ``--cases``; ValueError for a wrong size."""
        raise ValueError(f"{kind} cases have no custom sizes")

    def progress_steps(self, case, settings, n_backends: int) -> int:
        """How many progress units ``run`` announces for ``case``."""
        return n_backends

    def run(self, case, suite) -> dict:
        """Run ``case`` (a :class:`linmaps_bench.suite.SuiteRun` gives the started backends,
        the settings and the progress display) and return its record."""
        raise NotImplementedError

    def complete(self, record: dict, suite, gemm_gflops: float) -> None:
        """Fill in what needs the whole run (unavailable backends, rates against the
        reference GEMM ``gemm_gflops``); called after the case ran with the start's GEMM rate
        and at the end with the whole run's, so it must overwrite, not accumulate."""

    def has_errors(self, record: dict) -> bool:
        """True when some backend gave a wrong result or failed on this case."""
        return False

    def format(self, records: list, result: dict, intro: bool = True) -> str:
        """The records' table; ``intro``: with the kind's reading guide (the first table)."""
        raise NotImplementedError

    def summary(self, records: list, result: dict) -> str | None:
        """The kind's part of the summary at the end of the report (None: nothing)."""
        return None

    def chart_panels(self, records: list, result: dict) -> list:
        """The kind's chart panels, top to bottom: ``(height, draw)`` or ``(height, draw,
        below)``: ``draw(ax)`` fills a panel ``height`` inches high; ``below``, the inches its
        tick labels need under it (rotated case names)."""
        return []


class PerBackendKind(CaseKind):
    """A kind whose record has one result per backend (``record["results"][name]``, each with a
    ``status``): unavailable backends filled in, in the suite's order, by ``complete``."""

    def complete(self, record, suite, gemm_gflops):
        results = record["results"]
        for backend in suite.backends:
            status = suite.status[backend.name]
            if not status["available"] and backend.name not in results:
                results[backend.name] = {"status": "unavailable", "reason": status["reason"]}
        record["results"] = {b.name: results[b.name] for b in suite.backends if b.name in results}

    def has_errors(self, record):
        return any(r.get("status") == "error" for r in record["results"].values())


@contextlib.contextmanager
def backend_errors(record: dict):
    """Records a backend's failure (its own error, or its worker process dying) in ``record``
    as an error of this case instead of stopping the run."""
    try:
        yield
    except BackendError as exc:
        record.update(status="error", error=str(exc))
    except WorkerFailed as exc:
        record.update(status="error", error=f"worker process failed: {exc}")


def end_case(runners, name: str) -> None:
    """Lets backend ``name``'s worker drop the case's state, whatever state it is in."""
    with contextlib.suppress(WorkerFailed, BackendError):
        runners.call(name, "end_case")


@contextlib.contextmanager
def on_backend(runners, name: str, record: dict):
    """One backend's part of a case: :func:`backend_errors`, then :func:`end_case`."""
    try:
        with backend_errors(record):
            yield
    finally:
        end_case(runners, name)


KIND_REGISTRY: dict = {}  # kind name ("linear", "mixed", ...) -> its CaseKind


def register_kind(case_kind: CaseKind) -> None:
    """Add a :class:`CaseKind` (every name of ``case_kind.kinds``) to the registry."""
    for name in case_kind.kinds:
        KIND_REGISTRY[name] = case_kind


def case_kinds() -> list:
    """Every registered :class:`CaseKind`, once each, in ``order``."""
    unique = {id(k): k for k in KIND_REGISTRY.values()}
    return sorted(unique.values(), key=lambda k: k.order)


def kind_of(case) -> CaseKind:
    return KIND_REGISTRY[case.kind]


def default_cases(on_request: bool = False) -> list:
    """The cases of a run that names none: each kind's defaults, kinds in ``order``; with
    ``on_request``, also those of the kinds that run only when named (``on_request = True``,
    whose peers take minutes)."""
    return [
        case
        for case_kind in case_kinds()
        if on_request or not getattr(case_kind, "on_request", False)
        for case in case_kind.defaults
    ]


def seeded_rng(case, seed: int) -> np.random.Generator:
    """The generator of a case's inputs: the same numbers in every process for a case."""
    # The case id feeds the seed so that every process (the oracle's, each backend's worker)
    # sees the same numbers for a case whatever the selection.
    return np.random.default_rng([seed, zlib.crc32(case.id.encode())])


_CUSTOM_CASE = re.compile(r"^([a-z][a-z0-9_-]*):(\d+(?:x\d+)*)$")


def _case_matches(case, token: str) -> bool:
    names = tuple(KIND_REGISTRY)
    if token in names:
        return case.kind == token
    if token.startswith(names):  # "linear-1x" must not pick "bilinear-1x..."
        return case.id.startswith(token)
    return token in case.id


def select_cases(spec: str | None, cases=None) -> list:
    """The cases named by ``spec``, a comma-separated list of tokens, in ``cases`` order.

    ``cases`` defaults to :func:`default_cases` (with the on-request kinds when ``spec``
    names something). A token is a kind (``linear``, ``bilinear``,
    ``mixed``, ...: every case of that kind), a custom size (``bilinear:8x4x4x2``,
    ``linear:8x16x4``, ``mixed:8x16x8x4x2``, added after the others) or any part of a case id
    (``1024x``; a part that starts with a kind, ``linear-1x``, must start the id). ``None`` or
    an empty spec selects every case.
    """
    if not spec or not spec.strip():
        return default_cases() if cases is None else list(cases)
    cases = default_cases(on_request=True) if cases is None else list(cases)
    chosen, custom = [], []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        match = _CUSTOM_CASE.match(token)
        if match and match.group(1) in KIND_REGISTRY:
            kind, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
            custom.append(KIND_REGISTRY[kind].from_dims(kind, dims))
            continue
        hits = [c for c in cases if _case_matches(c, token)]
        if not hits:
            sizes = " / ".join(f"'{s}'" for k in case_kinds() for s in k.custom_sizes)
            raise ValueError(
                f"--cases: {token!r} matches no case; the cases are "
                f"{', '.join(c.id for c in cases)} (or give one as {sizes})"
            )
        chosen.extend(hits)
    picked = [c for c in cases if c in chosen] + custom
    return list(dict.fromkeys(picked))  # drop repeats, keep order


# Every module of this package is a kind of case: importing it registers the kind.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module
