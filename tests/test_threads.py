"""linmaps' threads inside real programs: idle CPU after a call, NumPy's BLAS on linmaps' pool,
fork, Ctrl-C, absurd thread counts and what a thread keeps between calls.

Most tests run a short script in a fresh interpreter (a clean process: no pytest threads, its
own environment) with a timeout, so that a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import linmaps

pytestmark = pytest.mark.skipif(
    "cpp" not in linmaps.available_backends(), reason="the compiled backend is not available"
)

TIMEOUT = 120


def run_script(code: str, env: dict | None = None, timeout: float = TIMEOUT):
    """Run `code` in a fresh interpreter; return its stdout (the test fails on error/hang)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GOMP_", "OMP_"))}
    full_env.pop("LINMAPS_BLAS_THREADS", None)
    full_env.update(env or {})
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script hung (no exit within {timeout} s): {exc.stdout!r}")
    assert done.returncode == 0, done.stderr
    return done.stdout


# ----------------------------------------------------------------------------- idle CPU

IDLE_CPU = """
    import resource, time
    import numpy as np
    import linmaps

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    x = np.ones((2000, 1000), np.float32)
    w = np.ones((1000, 1000), np.float32)
    for name, call in (("linmaps", lambda: linmaps.linear(x, w)), ("numpy", lambda: x @ w.T)):
        burnt = []
        for _ in range(3):
            call()
            start = cpu()
            time.sleep(0.1)
            burnt.append(cpu() - start)
        print(name, min(burnt))
"""


def test_no_cpu_burnt_while_sleeping_after_a_call():
    # After a call returns, neither linmaps' OpenMP threads nor NumPy's BLAS threads keep
    # spinning: across a 100 ms sleep the process uses (almost) no CPU. Before linmaps set
    # libgomp's spin and shared NumPy's BLAS pool this was ~10 ms after a linmaps call and
    # ~100 ms after a NumPy product (OpenBLAS spins for about 0.1 s).
    out = run_script(IDLE_CPU)
    burnt = {name: float(value) for name, value in (line.split() for line in out.splitlines())}
    assert burnt["linmaps"] < 0.005, burnt
    assert burnt["numpy"] < 0.005, burnt


def test_idle_cpu_check_fails_with_libgomps_own_spin():
    # The test above can fail: with libgomp's default spin (GOMP_SPINCOUNT=300000, what
    # linmaps ran with before) the threads keep spinning after a call.
    out = run_script(IDLE_CPU, env={"GOMP_SPINCOUNT": "300000", "LINMAPS_BLAS_THREADS": "native"})
    burnt = {name: float(value) for name, value in (line.split() for line in out.splitlines())}
    assert burnt["numpy"] > 0.02, burnt


# ----------------------------------------------------------------------------- BLAS pool

NUMPY_PRODUCTS = """
    import hashlib
    import numpy as np
    import linmaps
    from linmaps import _cpp_backend as cb

    rng = np.random.default_rng(0)
    digest = hashlib.sha256()
    x = np.ones((512, 512), np.float32)
    linmaps.linear(x, x)  # linmaps' first threaded call: NumPy's BLAS joins its pool now
    before = cb._core.blas_calls()
    for dtype in (np.float32, np.float64):
        for n, k, m in ((512, 512, 512), (300, 1000, 200), (2000, 64, 700), (64, 64, 64)):
            a = rng.standard_normal((n, k)).astype(dtype)
            b = rng.standard_normal((k, m)).astype(dtype)
            digest.update((a @ b).tobytes())
            digest.update((a.T @ a).tobytes())
            digest.update((a @ b[:, 0]).tobytes())
    print(digest.hexdigest(), cb._core.blas_calls() - before, len(cb._core.blas_installed()))
"""


def test_numpy_results_unchanged_by_the_shared_pool():
    shared_digest, shared_calls, shared_libs = run_script(NUMPY_PRODUCTS).split()
    native_digest, native_calls, native_libs = run_script(
        NUMPY_PRODUCTS, env={"LINMAPS_BLAS_THREADS": "native"}
    ).split()
    # NumPy's parallel products ran on linmaps' pool in one process and not in the other...
    assert int(shared_libs) >= 1 and int(shared_calls) > 0
    assert int(native_libs) == 0 and int(native_calls) == 0
    # ... and computed the same bits.
    assert shared_digest == native_digest


def test_blas_pool_shared_from_the_first_threaded_call_only():
    # Importing linmaps leaves OpenBLAS as it was; linmaps' first call that uses threads
    # gives it the callback.
    out = run_script(
        """
        import numpy as np
        import linmaps
        from linmaps import _cpp_backend as cb
        a = np.ones((600, 600), np.float32)
        a @ a
        print(len(cb._core.blas_installed()), cb._core.blas_calls())
        print(linmaps._config.config()["blas_threads"])
        linmaps.linear(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32))  # serial
        print(len(cb._core.blas_installed()))
        linmaps.linear(a, a)
        a @ a
        print(len(cb._core.blas_installed()), cb._core.blas_calls())
        """
    )
    lines = out.splitlines()
    assert lines[0] == "0 0"
    assert lines[1] == "OpenBLAS's own threads until linmaps' first threaded call"
    assert lines[2] == "0"
    installed, calls = map(int, lines[3].split())
    assert installed >= 1 and calls >= 1


def test_share_blas_threads_switches_and_shows_in_config():
    out = run_script(
        """
        import numpy as np
        import linmaps
        from linmaps import _cpp_backend as cb
        a = np.ones((600, 600), np.float32)
        counts = []
        for enable in (True, False, True):
            linmaps.share_blas_threads(enable)
            before = cb._core.blas_calls()
            assert ((a @ a) == 600).all()
            counts.append(cb._core.blas_calls() - before)
            print(linmaps._config.config()["blas_threads"].split(" (")[0])
        print(*counts)
        try:
            linmaps.share_blas_threads("yes")
        except TypeError as exc:
            print("TypeError", exc)
        """
    )
    lines = out.splitlines()
    assert lines[0].startswith("shared with linmaps")
    assert lines[1] == "OpenBLAS's own threads"
    assert lines[2].startswith("shared with linmaps")
    on, off, on_again = map(int, lines[3].split())
    assert on > 0 and off == 0 and on_again > 0
    assert lines[4].startswith("TypeError share_blas_threads(): enable must be a bool")


def test_bad_blas_threads_variable_warns():
    out = run_script(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import linmaps
        print([str(w.message) for w in caught])
        print(linmaps._config.config()["blas_threads"])
        """,
        env={"LINMAPS_BLAS_THREADS": "sometimes"},
    )
    assert "LINMAPS_BLAS_THREADS='sometimes' is neither 'shared' nor 'native'" in out
    assert "until linmaps' first threaded call" in out


def test_concurrent_numpy_and_linmaps_calls_from_threads():
    # NumPy products from several Python threads at once, each on a team of linmaps' pool,
    # beside linmaps calls: every result equals the one computed alone.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    jobs = [
        (rng.standard_normal((400, 300), dtype=np.float32), rng.standard_normal((300, 500)))
        for _ in range(6)
    ]

    def work(job):
        a, b = job
        b32 = b.astype(np.float32)
        bilinear = linmaps.bilinear(a, a, b32[None, :, :300])
        return a @ b32, (a.T @ a), linmaps.linear(a, b32.T), bilinear

    serial = [work(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(work, jobs * 3))
    for got, want in zip(concurrent, serial * 3):
        for g, w in zip(got, want):
            assert g.tobytes() == w.tobytes()


def test_results_bitwise_identical_with_numpy_products_between_calls():
    from linmaps import _cpp_backend as cb

    rng = np.random.default_rng(9)
    x1 = rng.standard_normal((300, 48), dtype=np.float32)
    x2 = rng.standard_normal((300, 40), dtype=np.float32)
    w = rng.standard_normal((24, 48, 40), dtype=np.float32)
    g = rng.standard_normal((300, 24), dtype=np.float32)
    big = rng.standard_normal((700, 700), dtype=np.float32)
    setting = cb._core.get_thread_setting()
    results = {}
    try:
        for threads in (1, 2, 3):
            cb.set_num_threads(threads)
            out = []
            for _ in range(3):
                big @ big  # a parallel NumPy product on the same pool, between linmaps calls
                out.append(linmaps.bilinear(x1, x2, w))
                big @ big.T
                out.extend(linmaps.bilinear_backward(g, x1, x2, w))
                out.append(linmaps.linear(x1, w[:, :, 0]))
            results[threads] = out
    finally:
        cb.set_num_threads(setting)
    for threads in (2, 3):
        for got, ref in zip(results[threads], results[1]):
            assert got.tobytes() == ref.tobytes()


# ----------------------------------------------------------------------------- fork

FORK_SETUP = """
    import os, threading, multiprocessing as mp
    import numpy as np
    import linmaps as lm

    x = np.ones((2000, 1000), np.float32)
    w = np.ones((1000, 1000), np.float32)
    expected = float(1000)

    def child_work(_=None):
        y = lm.linear(x, w)
        z = x @ w.T  # NumPy's BLAS in the child too
        return float(y[0, 0]), float(y[-1, -1]), float(z[5, 5]), lm.get_num_threads()

    lm.linear(x, w)  # the parent's OpenMP threads start
"""


def test_fork_child_computes_and_does_not_hang():
    out = run_script(
        FORK_SETUP
        + """
    pid = os.fork()
    if pid == 0:
        print("child", *child_work(), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    print("parent", *child_work())
    """,
        timeout=60,
    )
    child = out.splitlines()[0].split()
    assert child[:4] == ["child", "1000.0", "1000.0", "1000.0"]
    assert child[4] == "1"  # a forked child of a process with OpenMP threads runs serially
    parent = out.splitlines()[1].split()
    assert parent[:4] == ["parent", "1000.0", "1000.0", "1000.0"]


def test_multiprocessing_fork_pool_and_process():
    out = run_script(
        FORK_SETUP
        + """
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        print(pool.map(child_work, range(4)))
    queue = ctx.Queue()
    proc = ctx.Process(target=lambda: queue.put(child_work()))
    proc.start()
    print(queue.get(timeout=50))
    proc.join(50)
    print("exitcode", proc.exitcode)
    """,
        timeout=90,
    )
    lines = out.splitlines()
    assert lines[0].count("(1000.0, 1000.0, 1000.0, 1)") == 4
    assert lines[1] == "(1000.0, 1000.0, 1000.0, 1)"
    assert lines[2] == "exitcode 0"


def test_fork_child_runs_other_openmp_regions_on_one_thread():
    # The pool is libgomp's, shared by every library that uses the same libgomp (PyTorch's
    # parallel regions after a linmaps call, tests/test_torch.py): the forking thread's
    # OpenMP thread count is 1 in the child, so that their regions do not wait for threads
    # that were not forked. The parent keeps its count.
    out = run_script(
        FORK_SETUP
        + """
    import ctypes
    from linmaps import _threads
    (runtime,) = _threads._loaded_openmp_runtimes()
    omp = ctypes.CDLL(runtime)
    pid = os.fork()
    if pid == 0:
        print("child", omp.omp_get_max_threads(), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print("parent", omp.omp_get_max_threads())
    """,
        env={"OMP_NUM_THREADS": "2"},
        timeout=60,
    )
    assert out.split() == ["child", "1", "parent", "2"]


def test_fork_while_another_thread_is_inside_a_call():
    out = run_script(
        FORK_SETUP
        + """
    big = np.ones((20000, 1000), np.float32)
    started = threading.Event()

    def busy():
        started.set()
        for _ in range(5):
            lm.linear(big, w)

    thread = threading.Thread(target=busy)
    thread.start()
    started.wait()
    import time; time.sleep(0.05)
    pid = os.fork()
    if pid == 0:
        print("child", *child_work(), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    thread.join()
    print("status", status)
    """,
        timeout=90,
    )
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["child", "1000.0", "1000.0", "1000.0"]
    assert lines[1] == "status 0"


def test_fork_before_any_threads_keeps_the_child_parallel():
    out = run_script(
        """
        import os
        import linmaps as lm
        from linmaps import _cpp_backend as cb
        cb.set_num_threads(2)
        pid = os.fork()
        if pid == 0:
            print(lm.get_num_threads(), cb._core.team_size(), cb._core.in_forked_child())
            os._exit(0)
        os.waitpid(pid, 0)
        """,
        timeout=60,
    )
    assert out.split() == ["2", "2", "False"]


# ----------------------------------------------------------------------------- Ctrl-C

CTRL_C = """
    import os, signal, threading, time
    import numpy as np
    import linmaps

    rng = np.random.default_rng(0)
    {setup}

    def timed():
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    # Grow the problem until one call takes at least 1.5 s, measured at that size: a size
    # chosen from one timing taken while the machine was busy can run in less than the
    # delay below once it is quiet again, and then finish before the signal comes.
    long_call = timed()
    while long_call < 1.5:
        scale = min(16, int(2.0 / long_call) + 1)
        {scale}
        long_call = timed()
    delay = 0.3
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    start = time.perf_counter()
    try:
        call()
        print("finished", long_call)
    except KeyboardInterrupt:
        print("interrupted", long_call, time.perf_counter() - start - delay)
    {check}
"""

CTRL_C_CASES = {
    "linear": (
        "x = rng.standard_normal((2000, 1024), dtype=np.float32); "
        "w = rng.standard_normal((1024, 1024), dtype=np.float32); "
        "call = lambda: linmaps.linear(x, w)",
        "x = np.tile(x, (scale, 1))",
        "np.testing.assert_allclose(linmaps.linear(x[:50], w), x[:50] @ w.T, rtol=1e-4, atol=1e-3)",
    ),
    "linear_backward": (
        "x = rng.standard_normal((2000, 512), dtype=np.float32); "
        "w = rng.standard_normal((384, 512), dtype=np.float32); "
        "g = rng.standard_normal((2000, 384), dtype=np.float32); "
        "call = lambda: linmaps.linear_backward(g, x, w)",
        "x = np.tile(x, (scale, 1)); g = np.tile(g, (scale, 1))",
        "np.testing.assert_allclose(linmaps.linear_backward(g[:9], x[:9], w).grad_x, "
        "g[:9] @ w, rtol=1e-4, atol=1e-3)",
    ),
    "bilinear_backward": (
        "x1 = rng.standard_normal((512, 96), dtype=np.float32); "
        "x2 = rng.standard_normal((512, 80), dtype=np.float32); "
        "a = rng.standard_normal((64, 96, 80), dtype=np.float32); "
        "g = rng.standard_normal((512, 64), dtype=np.float32); "
        "call = lambda: linmaps.bilinear_backward(g, x1, x2, a)",
        "x1 = np.tile(x1, (scale, 1)); x2 = np.tile(x2, (scale, 1)); g = np.tile(g, (scale, 1))",
        "z = linmaps.bilinear(x1[:5], x2[:5], a); "
        "np.testing.assert_allclose(z, np.einsum('ki,lij,kj->kl', x1[:5], a, x2[:5]), "
        "rtol=1e-4, atol=1e-3)",
    ),
    "bilinear_pairs_backward": (
        "x1 = rng.standard_normal((8, 64, 256), dtype=np.float32); "
        "x2 = rng.standard_normal((8, 64, 256), dtype=np.float32); "
        "a = rng.standard_normal((8, 256, 256), dtype=np.float32); "
        "g = rng.standard_normal((8, 64, 64, 8), dtype=np.float32); "
        "call = lambda: linmaps.bilinear_pairs_backward(g, x1, x2, a)",
        "x1 = np.tile(x1, (scale, 1, 1)); x2 = np.tile(x2, (scale, 1, 1)); "
        "g = np.tile(g, (scale, 1, 1, 1))",
        "s = linmaps.bilinear_pairs(x1[:1], x2[:1], a); "
        "np.testing.assert_allclose(s, np.einsum('bia,oac,bjc->bijo', x1[:1], a, x2[:1]), "
        "rtol=1e-3, atol=1e-2)",
    ),
}


@pytest.mark.parametrize("name", sorted(CTRL_C_CASES))
def test_ctrl_c_stops_a_long_call(name):
    setup, scale, check = CTRL_C_CASES[name]
    out = run_script(CTRL_C.format(setup=setup, scale=scale, check=check), timeout=180)
    words = out.split()
    assert words[0] == "interrupted", out
    long_call, latency = float(words[1]), float(words[2])
    assert long_call > 0.8
    # KeyboardInterrupt within about 0.1 s of the signal (0.25 s allows for a loaded machine),
    # far sooner than the call would have taken.
    assert latency < 0.25, out


LAYER_CTRL_C = """
    import os, signal, threading, time
    import numpy as np
    import linmaps

    rng = np.random.default_rng(0)
    need_inputs = {need_inputs}
    layer = linmaps.Bilinear(64, 64, 64, seed=0, keep_bytes=0)
    n = 20000
    while True:
        x1 = rng.standard_normal((n, 64), dtype=np.float32)
        x2 = rng.standard_normal((n, 64), dtype=np.float32)
        g = rng.standard_normal((n, 64), dtype=np.float32)
        layer(x1, x2)
        start = time.perf_counter()
        layer.backward(g, need_x1=need_inputs, need_x2=need_inputs)
        long_call = time.perf_counter() - start
        if long_call >= 1.5:
            break
        n = int(n * min(16, 2.0 / long_call + 1))
    layer(x1, x2)
    layer.grad_weight[...] = rng.standard_normal(layer.grad_weight.shape, dtype=np.float32)
    layer.grad_bias[...] = rng.standard_normal(layer.grad_bias.shape, dtype=np.float32)
    before = (layer.grad_weight.copy(), layer.grad_bias.copy())
    grads = linmaps.bilinear_backward(g, x1, x2, layer.weight, need_x1=False, need_x2=False)
    after = (before[0] + grads.grad_weight, before[1] + grads.grad_bias)

    delay = {delay_share} * long_call
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    start = time.perf_counter()
    try:
        layer.backward(g, need_x1=need_inputs, need_x2=need_inputs)
        time.sleep(1.0)  # a Ctrl-C left pending by the call is raised here at the latest
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
    took = time.perf_counter() - start - delay
    acc = (layer.grad_weight, layer.grad_bias)
    state = [
        name
        for name, value in (("untouched", before), ("added", after))
        if all(np.array_equal(a, b) for a, b in zip(acc, value))
    ]
    print(outcome, state, round(long_call, 2), round(took, 2))
"""


@pytest.mark.parametrize(
    "need_inputs, delay_share, expected_state",
    [
        # The input gradients come first and take most of the call: interrupted there,
        # nothing has been added yet, and nothing is.
        (True, 0.2, "untouched"),
        # Weight gradient only: the first tile is added within the first sixth of the call,
        # after which the call runs to its end and the Ctrl-C comes right after it.
        (False, 0.5, "added"),
    ],
)
def test_ctrl_c_in_a_layer_backward_adds_to_the_gradients_all_or_nothing(
    need_inputs, delay_share, expected_state
):
    out = run_script(
        LAYER_CTRL_C.format(need_inputs=need_inputs, delay_share=delay_share), timeout=240
    )
    outcome, rest = out.split(" ", 1)
    state, numbers = rest.rsplit("]", 1)
    long_call, took = (float(word) for word in numbers.split())
    assert outcome == "interrupted", out
    assert state.strip("[' ") == expected_state, out
    if expected_state == "untouched":
        assert took < 0.25 * long_call, out  # stopped early, as any long call
    # "added" is itself the proof that the call ran to its end: every tile was added.


def test_ctrl_c_leaves_the_process_usable_and_leaks_nothing():
    out = run_script(
        """
        import os, signal, threading, time
        import numpy as np
        import linmaps

        def rss_mib():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024

        x = np.ones((40000, 1024), np.float32)
        w = np.ones((1024, 1024), np.float32)
        linmaps.linear(x[:4000], w)
        base = rss_mib()
        for _ in range(5):
            threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            try:
                linmaps.linear(x, w)
            except KeyboardInterrupt:
                pass
            time.sleep(0.1)
        print(rss_mib() - base)
        y = linmaps.linear(x[:3000], w)
        print(bool((y == 1024).all()))
        """,
        timeout=180,
    )
    growth, ok = out.split()
    assert ok == "True"
    assert float(growth) < 40  # no output or scratch left behind per interrupted call


# A Python signal handler runs on the main thread in the middle of a call (the Ctrl-C poll runs
# it), and may call linmaps itself: on the same thread, possibly while it is thread 0 of the
# interrupted call's team. The handler's calls here cover a threaded linear (a shared packed
# operand, as the outer linear's), a bilinear backward, a tiny call (under the poll threshold)
# and a layer backward adding to its accumulators; every handler run is checked bitwise against
# the same calls made quietly, and the interrupted call's own result too (results do not depend
# on the number of threads, and a nested call runs on one).
SIGNAL_HANDLER = """
    import os, signal, threading, time
    import numpy as np
    import linmaps

    rng = np.random.default_rng(0)
    {setup}

    def timed():
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    # Sized as in the Ctrl-C tests: one call takes at least 1.5 s.
    long_call = timed()
    while long_call < 1.5:
        scale = min(16, int(2.0 / long_call) + 1)
        {scale}
        long_call = timed()

    h = rng.standard_normal((256, 512), dtype=np.float32)
    hw = rng.standard_normal((1024, 512), dtype=np.float32)
    b1 = rng.standard_normal((256, 64), dtype=np.float32)
    b2 = rng.standard_normal((256, 48), dtype=np.float32)
    bw = rng.standard_normal((32, 64, 48), dtype=np.float32)
    bg = rng.standard_normal((256, 32), dtype=np.float32)
    s1, s2, sw = b1[:2, :8], b2[:2, :8], bw[:3, :8, :8]

    def inner(layer):
        grads = linmaps.bilinear_backward(bg, b1, b2, bw)
        layer(b1, b2)
        return (linmaps.linear(h, hw), *grads, linmaps.bilinear(s1, s2, sw), *layer.backward(bg))

    handler_layer = linmaps.Bilinear(64, 48, 32, seed=1)
    handler_layer.grad_weight[...] = 1.0
    handler_results = []
    busy = False

    def handler(signum, frame):
        global busy
        if busy:  # a signal during the handler's own calls: no deeper nesting than that
            return
        busy = True
        try:
            handler_results.append(inner(handler_layer))
        finally:
            busy = False

    expected = call()
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.1, 0.2)
    got = call()
    signal.setitimer(signal.ITIMER_REAL, 0)
    runs = len(handler_results)

    quiet_layer = linmaps.Bilinear(64, 48, 32, seed=1)
    quiet_layer.grad_weight[...] = 1.0
    quiet = [inner(quiet_layer) for _ in range(runs)]
    same_inner = all(
        all(np.array_equal(a, b) for a, b in zip(run, quiet_run))
        for run, quiet_run in zip(handler_results, quiet)
    ) and all(
        np.array_equal(a, b) for a, b in zip(handler_layer.gradients(), quiet_layer.gradients())
    )
    same_outer = all(np.array_equal(a, b) for a, b in zip(got, expected))
    {check}

    # Then Ctrl-C after a handler's calls have run in the middle of a call: the call must still
    # poll, and stop.
    sent = []

    def handler_then_ctrl_c(signum, frame):
        handler(signum, frame)
        sent.append(time.perf_counter() + 0.05)
        threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT)).start()

    signal.signal(signal.SIGALRM, handler_then_ctrl_c)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        call()
        time.sleep(2.0)  # a Ctrl-C left pending by the call is raised here at the latest
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
    took = time.perf_counter() - sent[0]
    print(runs, same_outer, same_inner, outcome, round(long_call, 2), round(took, 2))
"""

SIGNAL_HANDLER_CASES = {
    "linear": (
        "x = rng.standard_normal((2000, 1024), dtype=np.float32); "
        "w = rng.standard_normal((1024, 1024), dtype=np.float32); "
        "call = lambda: (linmaps.linear(x, w),)",
        "x = np.tile(x, (scale, 1))",
        "np.testing.assert_allclose(got[0][:50], x[:50] @ w.T, rtol=1e-4, atol=1e-3)",
    ),
    "linear_backward": (
        "x = rng.standard_normal((2000, 512), dtype=np.float32); "
        "w = rng.standard_normal((384, 512), dtype=np.float32); "
        "g = rng.standard_normal((2000, 384), dtype=np.float32); "
        "call = lambda: linmaps.linear_backward(g, x, w)",
        "x = np.tile(x, (scale, 1)); g = np.tile(g, (scale, 1))",
        "np.testing.assert_allclose(got[0][:50], g[:50] @ w, rtol=1e-4, atol=1e-3)",
    ),
    "bilinear": (
        "x1 = rng.standard_normal((512, 96), dtype=np.float32); "
        "x2 = rng.standard_normal((512, 80), dtype=np.float32); "
        "a = rng.standard_normal((64, 96, 80), dtype=np.float32); "
        "call = lambda: (linmaps.bilinear(x1, x2, a),)",
        "x1 = np.tile(x1, (scale, 1)); x2 = np.tile(x2, (scale, 1))",
        "np.testing.assert_allclose(got[0][:5], np.einsum('ki,lij,kj->kl', x1[:5], a, x2[:5]), "
        "rtol=1e-4, atol=1e-3)",
    ),
    "bilinear_backward": (
        "x1 = rng.standard_normal((512, 96), dtype=np.float32); "
        "x2 = rng.standard_normal((512, 80), dtype=np.float32); "
        "a = rng.standard_normal((64, 96, 80), dtype=np.float32); "
        "g = rng.standard_normal((512, 64), dtype=np.float32); "
        "call = lambda: linmaps.bilinear_backward(g, x1, x2, a)",
        "x1 = np.tile(x1, (scale, 1)); x2 = np.tile(x2, (scale, 1)); g = np.tile(g, (scale, 1))",
        "np.testing.assert_allclose(got[1][:5], np.einsum('kl,ki,lij->kj', g[:5], x1[:5], a), "
        "rtol=1e-4, atol=1e-3)",
    ),
    # A layer backward adding to its accumulators, T kept by the forward.
    "layer_backward": (
        "layer = linmaps.Bilinear(64, 64, 64, seed=0); "
        "acc = rng.standard_normal(layer.grad_weight.shape, dtype=np.float32); "
        "x1 = rng.standard_normal((20000, 64), dtype=np.float32); "
        "x2 = rng.standard_normal((20000, 64), dtype=np.float32); "
        "g = rng.standard_normal((20000, 64), dtype=np.float32); "
        "layer(x1, x2)\n"
        "    def call():\n"
        "        layer.grad_weight[...] = acc\n"
        "        layer.grad_bias[...] = 0.5\n"
        "        return (*layer.backward(g), layer.grad_weight.copy(), layer.grad_bias.copy())",
        "x1 = np.tile(x1, (scale, 1)); x2 = np.tile(x2, (scale, 1)); g = np.tile(g, (scale, 1)); "
        "layer(x1, x2)",
        "grads = linmaps.bilinear_backward(g, x1, x2, layer.weight); "
        "np.testing.assert_allclose(got[2], acc + grads.grad_weight, rtol=1e-4, atol=1e-2)",
    ),
}


@pytest.mark.parametrize("name", sorted(SIGNAL_HANDLER_CASES))
def test_linmaps_calls_in_a_signal_handler_leave_the_interrupted_call_intact(name):
    setup, scale, check = SIGNAL_HANDLER_CASES[name]
    out = run_script(SIGNAL_HANDLER.format(setup=setup, scale=scale, check=check), timeout=300)
    runs, same_outer, same_inner, outcome, long_call, took = out.split()
    # At most one handler run can come after the call returned (Python runs a pending
    # handler once): more than one ran in the middle of it.
    assert int(runs) >= 2, out
    assert same_outer == "True", out
    assert same_inner == "True", out
    assert outcome == "interrupted", out
    # Stopped soon after the Ctrl-C, as any long call (the layer test's bound), not at its end.
    assert float(took) < 0.25 * float(long_call), out


# ----------------------------------------------------------------------------- sharing the CPUs

# Calls in a loop beside one busy process per usable CPU, until linmaps has engaged a smaller
# team (or SECONDS have passed); every result compared bitwise with the same call made before.
CONTENTION = """
    import os, subprocess, sys, time
    import numpy as np
    import linmaps
    from linmaps import _cpp_backend as cb

    rng = np.random.default_rng(7)
    x1 = rng.standard_normal((32, 64), dtype=np.float32)
    x2 = rng.standard_normal((32, 64), dtype=np.float32)
    a = rng.standard_normal((32, 64, 64), dtype=np.float32)
    g = rng.standard_normal((32, 32), dtype=np.float32)

    def step():
        return (linmaps.bilinear(x1, x2, a),) + tuple(linmaps.bilinear_backward(g, x1, x2, a))

    linmaps.set_num_threads(2)
    quiet = step()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(len(os.sched_getaffinity(0)))]
    try:
        time.sleep(0.2)
        end = time.monotonic() + float(os.environ["SECONDS"])
        calls = 0
        while time.monotonic() < end and (calls < 200 or cb._core.contention_engaged() == 0):
            for got, want in zip(step(), quiet):
                assert got.tobytes() == want.tobytes()
            calls += 1
    finally:
        for process in busy:
            process.kill()
            process.wait()
    print(cb._core.contention_engaged())
"""


@pytest.mark.skipif(
    not os.path.exists(f"/proc/self/task/{os.getpid()}/schedstat"),
    reason="the kernel keeps no per-thread scheduler statistics",
)
def test_busy_cpus_engage_a_smaller_team_with_the_same_results():
    assert int(run_script(CONTENTION, env={"SECONDS": "20"})) > 0
    assert int(run_script(CONTENTION, env={"SECONDS": "3", "LINMAPS_ADAPTIVE_TEAM": "0"})) == 0


# ----------------------------------------------------------------------------- thread counts


def test_set_num_threads_is_capped_and_validated():
    from linmaps import _cpp_backend as cb

    setting = cb._core.get_thread_setting()
    cap = linmaps._backend.thread_cap()
    try:
        assert cap == 4 * len(os.sched_getaffinity(0))
        for n in (100_000, 2**31, 2**70):
            linmaps.set_num_threads(n)
            assert linmaps.get_num_threads() == cap
        assert cb._core.team_size() <= cap
    finally:
        cb.set_num_threads(setting)
    with pytest.raises(ValueError, match="at least 1"):
        linmaps.set_num_threads(0)
    with pytest.raises(ValueError, match="at least 1"):
        linmaps.set_num_threads(-3)
    with pytest.raises(TypeError, match="must be an int"):
        linmaps.set_num_threads(2.0)
    with pytest.raises(TypeError, match="must be an int"):
        linmaps.set_num_threads("4")


@pytest.mark.parametrize(
    ("value", "message"),
    [("999999", "asks for more than the"), ("abc", "is not a positive integer"), ("0", "is not")],
)
def test_absurd_omp_num_threads_warns_and_falls_back(value, message):
    out = run_script(
        """
        import os, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import linmaps
        import numpy as np
        from linmaps import _cpp_backend as cb
        print(len(caught), "|", caught[0].message if caught else "")
        x = np.ones((4096, 512), np.float32)
        linmaps.linear(x, np.ones((512, 512), np.float32))
        print(linmaps.get_num_threads(), cb._core.team_size(), len(os.listdir("/proc/self/task")))
        """,
        env={"OMP_NUM_THREADS": value},
    )
    first, second = out.splitlines()[-2:]
    count, text = first.split(" | ")
    assert count == "1" and message in text
    threads, team, tasks = map(int, second.split())
    cap = 4 * len(os.sched_getaffinity(0))
    assert 1 <= threads <= cap and team <= cap
    assert tasks <= cap + 70  # linmaps' team plus the interpreter's and OpenBLAS's own threads


# ----------------------------------------------------------------------------- kept memory

KEPT_MEMORY = """
    import threading
    import numpy as np
    import linmaps

    def rss_mib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

    rng = np.random.default_rng(0)
    {setup}
    call()  # the first call: libraries, NumPy's caches
    base = rss_mib()
    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
        t.join()
    call()
    print(rss_mib() - base)
"""

KEPT_CASES = {
    "linear_float32": "x = np.ones((256, 1024), np.float32); w = np.ones((100000, 1024), "
    "np.float32); call = lambda: linmaps.linear(x, w)",
    "linear_float64": "x = np.ones((256, 1024)); w = np.ones((60000, 1024)); "
    "call = lambda: linmaps.linear(x, w)",
    "linear_backward": "x = np.ones((300, 100000), np.float32); w = np.ones((512, 100000), "
    "np.float32); g = np.ones((300, 512), np.float32); "
    "call = lambda: linmaps.linear_backward(g, x, w)",
}


@pytest.mark.parametrize("name", sorted(KEPT_CASES))
def test_memory_kept_after_calls_is_bounded(name):
    # Calls from four Python threads each; once their outputs are freed, the process keeps no
    # more than the kept scratch (16 MiB per slot of a calling thread), whatever the shapes:
    # not the packed copy of a 400 MB weight per thread.
    growth = float(run_script(KEPT_MEMORY.format(setup=KEPT_CASES[name]), timeout=180))
    assert growth < 64, growth
