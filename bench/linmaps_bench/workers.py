"""Worker processes: one per backend, each serving a :class:`BackendSession` over a socket."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time

import numpy as np

from . import memory
from .backends import Backend, BackendError, WorkerFailed, lookup_backend
from .cases.ops import Case, make_inputs
from .settings import Settings
from .threads import apply_threads
from .timing import time_operation


class BackendSession:
    """One backend's side of the run: makes inputs, calls, times, measures memory.

    It runs in a worker process of its own (:func:`_worker_main`) so that no other library's
    thread pool shares the cores while it is timed, or in the harness's process for backends
    that a worker cannot rebuild (those registered at run time, e.g. a test's broken backend).
    Inputs are remade from the seed, so every session sees the numbers the oracle saw.
    """

    def __init__(
        self,
        backend: Backend,
        threads: int,
        dtype: str,
        seed: int,
        memory_problem: str | None = None,
    ):
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.reason = backend.unavailable_reason()
        self.threads = None
        self.memory_problem = memory_problem
        # The case being run, and what a case kind keeps between calls (see :meth:`run`).
        self.case, self.state = None, None
        self._prepared, self._fns = None, {}
        if self.reason is None:
            self.threads = apply_threads(threads, [backend])[0]
            self._warm_up()
            self.memory_problem = memory_problem or memory.rss_accounting_problem()

    def _warm_up(self) -> None:
        """Start thread pools, BLAS buffers and lazy state on tiny problems, so that the first
        case's first call neither pays for them nor counts their memory."""
        for case in (Case("linear", (8, 8, 8)), Case("bilinear", (8, 8, 8, 2))):
            with contextlib.suppress(Exception):  # a failing backend is reported per case
                prepared = self.backend.prepare(case, make_inputs(case, self.dtype, self.seed))
                for op in ("forward", "backward"):
                    with self.backend.context(op):
                        self.backend.operation(case, op, prepared)()

    def describe(self) -> dict:
        if self.reason is not None:
            return {"available": False, "reason": self.reason}
        return {
            "available": True,
            "info": self.backend.info(),
            "threads": self.threads,
            "pid": os.getpid(),
        }

    def first_call(self, case: Case, op: str):
        """The first call of ``op`` on ``case``: ``(seconds, outputs, memory)``.

        The outputs go back for the check. For the backward operation the call is also the
        peak-memory measurement (``memory``, see :data:`MEMORY_METHOD`); None otherwise.
        """
        if self.case != case:
            self.end_case()
            self._prepared = self.backend.prepare(case, make_inputs(case, self.dtype, self.seed))
            self.case = case
        fn = self._fns[op] = self.backend.operation(case, op, self._prepared)
        measure = op == "backward" and self.memory_problem is None
        if measure:
            baseline_kib = memory.start_peak_measurement()
        with self.backend.context(op):
            start = time.perf_counter()
            outputs = fn()
            elapsed = time.perf_counter() - start
        usage = None
        if measure:
            peak_kib = memory.peak_rss_kib()
            usage = {
                "status": "ok",
                "backward_peak_extra_mib": max(0, peak_kib - baseline_kib) / 1024,
                "baseline_rss_mib": baseline_kib / 1024,
            }
        elif op == "backward":
            usage = {"status": "not measured", "reason": self.memory_problem}
        outputs = self.backend.to_numpy(outputs)
        if usage is not None:
            usage["backward_outputs_mib"] = sum(a.nbytes for a in outputs if a is not None) / 2**20
        return elapsed, outputs, usage

    def time_op(self, case: Case, op: str, first_call_s: float, settings: Settings) -> dict:
        if self.case != case or op not in self._fns:
            raise RuntimeError("time_op() needs first_call() on the same case and operation")
        return time_operation(
            self._fns[op], lambda: self.backend.context(op), first_call_s, settings
        )

    def run(self, function, *args):
        """``function(self, *args)``: how a case kind runs its own code in the worker.

        ``function`` must be a module-level function of a ``linmaps_bench`` module (the worker
        process imports it by name). It may keep what later calls need in ``self.state``
        after setting ``self.case``; :meth:`end_case` drops both.
        """
        return function(self, *args)

    def end_case(self) -> None:
        self.case, self.state, self._prepared, self._fns = None, None, None, {}
        gc.collect()


def _worker_main(connection_fd: int) -> None:
    """Worker process: serve ``(method, args)`` requests with a :class:`BackendSession`.

    The first message says which backend to run and how; the socket is the process's only
    channel (stdout stays free for whatever the libraries print).
    """
    import signal
    from multiprocessing.connection import Connection

    # Ctrl-C reaches the whole process group; the harness handles it and closes the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(connection_fd)
    try:
        backend_name, threads, dtype, seed, memory_problem = conn.recv()
        session = BackendSession(lookup_backend(backend_name), threads, dtype, seed, memory_problem)
        conn.send(("ok", session.describe()))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            method, args = conn.recv()
        except EOFError:  # the harness went away
            return
        if method == "close":
            return
        try:
            conn.send(("ok", getattr(session, method)(*args)))
        except Exception as exc:  # reported by the harness for this case; keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _WorkerProxy:
    """The harness's handle on a worker process running one builtin backend.

    A plain ``python -c`` subprocess rather than ``multiprocessing``: a fresh interpreter with
    none of this process's threads or libraries, and no re-import of the caller's main module
    (which multiprocessing's "spawn" needs, and which fails for an unguarded script).
    """

    isolated = True

    def __init__(self, backend: Backend, settings: Settings):
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        self.name = backend.name
        self.timeout_s = settings.worker_timeout_s
        ours, theirs = socket.socketpair()
        # The folder that holds the linmaps_bench package, whatever the caller's sys.path.
        bench_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (
            f"import sys; sys.path.insert(0, {bench_dir!r}); "
            f"from linmaps_bench import workers; workers._worker_main({theirs.fileno()})"
        )
        env = dict(os.environ)
        # The same linmaps (and torch) as this process, found the same way.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(backend.threads_for(settings.threads))  # pools sized from the start
        env.update(backend.worker_env())
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(
            (
                backend.name,
                backend.threads_for(settings.threads),
                settings.dtype,
                settings.seed,
                None if settings.measure_memory else "not requested (--no-memory)",
            )
        )
        self.description = None

    def wait_ready(self) -> dict:
        self.description = self._receive()
        return self.description

    def call(self, method: str, *args):
        try:
            self._conn.send((method, args))
        except OSError as exc:
            raise WorkerFailed(f"worker process is gone ({exc})") from None
        return self._receive()

    def _receive(self):
        if not self._conn.poll(self.timeout_s):
            self._process.kill()
            raise WorkerFailed(f"no answer from the worker within {self.timeout_s:.0f} s")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            code = self._process.wait(5)
            raise WorkerFailed(f"the worker process died (exit code {code})") from None
        if status == "error":
            raise BackendError(value)
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("close", ()))
        try:
            self._process.wait(10)
        except Exception:  # still busy in a long call: stop it
            self._process.kill()
            self._process.wait(5)
        self._conn.close()


class _LocalProxy:
    """A backend run in the harness's own process (same interface as :class:`_WorkerProxy`)."""

    isolated = False

    def __init__(self, backend: Backend, settings: Settings):
        self.name = backend.name
        self._session = BackendSession(
            backend,
            backend.threads_for(settings.threads),
            settings.dtype,
            settings.seed,
            memory_problem="runs in the harness's own process (a backend registered at run "
            "time), not a clean one",
        )
        self.description = None

    def wait_ready(self) -> dict:
        self.description = self._session.describe()
        return self.description

    def call(self, method: str, *args):
        try:
            return getattr(self._session, method)(*args)
        except Exception as exc:  # same contract as the worker: an error for this case only
            raise BackendError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._session.end_case()


def start_backend(backend: Backend, settings: Settings):
    proxy_class = _WorkerProxy if settings.isolate and backend.builtin else _LocalProxy
    return proxy_class(backend, settings)


class Runners:
    """The started backends, restarting a worker that died so the next case still runs."""

    def __init__(self, backends: list, settings: Settings):
        self.settings = settings
        self.backends = {b.name: b for b in backends}
        self.status, self.proxies = {}, {}
        started = {b.name: start_backend(b, settings) for b in backends}  # imports run in parallel
        for name, proxy in started.items():
            try:
                description = proxy.wait_ready()
            except (WorkerFailed, BackendError) as exc:
                description = {"available": False, "reason": f"worker did not start: {exc}"}
            description["isolated"] = proxy.isolated
            self.status[name] = description
            if description["available"]:
                self.proxies[name] = proxy
            else:
                proxy.close()

    def call(self, name: str, method: str, *args):
        proxy = self.proxies.get(name)
        if proxy is None:
            raise WorkerFailed("the worker could not be restarted after an earlier failure")
        try:
            return proxy.call(method, *args)
        except WorkerFailed:
            proxy.close()
            self.proxies.pop(name)
            with contextlib.suppress(WorkerFailed, BackendError):
                replacement = start_backend(self.backends[name], self.settings)
                if replacement.wait_ready()["available"]:
                    self.proxies[name] = replacement
            self.status[name]["restarts"] = self.status[name].get("restarts", 0) + 1
            raise

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()
