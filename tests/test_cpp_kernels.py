"""Tests of the compiled kernels through linmaps._cpp_backend (the internal backend contract).

The kernels are checked against two NumPy references written here from the spec
(docs/spec.md, sections 2 and 4):
  * the elementwise sums evaluated literally with numpy.einsum (optimize=False), in long
    double so that the reference's own rounding is negligible, and
  * the "reformulation as matrix products" processed in row blocks (float64 BLAS), cheap
    enough for shapes that cross every block size of the kernels.
Tolerances follow from the dtype and the length K of each sum: |got - exact| <= C eps
sqrt(K + 1) sum|terms|, where sum|terms| is the same sum over absolute values (computed
with the same reference) and C = 8 leaves room for the two-stage products (T = P What, then
a row dot) without being tuned to pass.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import linmaps
from linmaps import _cpp_backend as cb
from linmaps._cpp_backend import _core

DTYPES = [np.float32, np.float64]
TOL_FACTOR = 8.0
EXACT = np.longdouble

hyp_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ----------------------------------------------------------------------------------------
# References


def einsum_linear(x, w, b, g):
    """Spec section 2, elementwise: y[k,i] = sum_j x[k,j] w[i,j] + b[i], and gradients."""
    x, w, g = (a.astype(EXACT) for a in (x, w, g))
    y = np.einsum("kj,ij->ki", x, w, optimize=False)
    if b is not None:
        y = y + b.astype(EXACT)
    return {
        "y": y,
        "grad_x": np.einsum("ki,ij->kj", g, w, optimize=False),
        "grad_weight": np.einsum("ki,kj->ij", g, x, optimize=False),
        "grad_bias": np.einsum("ki->i", g, optimize=False),
    }


def einsum_bilinear(x1, x2, a, b, g):
    """Spec section 4, elementwise sums, literally."""
    x1, x2, a, g = (v.astype(EXACT) for v in (x1, x2, a, g))
    z = np.einsum("ki,lij,kj->kl", x1, a, x2, optimize=False)
    if b is not None:
        z = z + b.astype(EXACT)
    return {
        "z": z,
        "grad_x1": np.einsum("kl,lij,kj->ki", g, a, x2, optimize=False),
        "grad_x2": np.einsum("kl,ki,lij->kj", g, x1, a, optimize=False),
        "grad_weight": np.einsum("kl,ki,kj->lij", g, x1, x2, optimize=False),
        "grad_bias": np.einsum("kl->l", g, optimize=False),
    }


def blocked_bilinear(x1, x2, a, b, g, block=37):
    """Spec section 4 "reformulation as matrix products", row block by row block (float64).

    a_hat[i, l*n + j] = a[l, i, j];  T = X a_hat;  z[k,l] = sum_j T[k, l*n+j] y[k,j] + b[l];
    W[k, l*n+j] = dz[k,l] y[k,j];  d a_hat = X^T W;  dX = W a_hat^T;  dY = sum_l dz[k,l] T.
    """
    x1, x2, a, g = (v.astype(np.float64) for v in (x1, x2, a, g))
    n_batch, m = x1.shape
    L, _, n = a.shape
    a_hat = a.transpose(1, 0, 2).reshape(m, L * n)
    z = np.empty((n_batch, L))
    dx1 = np.empty((n_batch, m))
    dx2 = np.empty((n_batch, n))
    da_hat = np.zeros((m, L * n))
    for k0 in range(0, n_batch, block):
        rows = slice(k0, k0 + block)
        t = (x1[rows] @ a_hat).reshape(-1, L, n)
        z[rows] = np.einsum("kln,kn->kl", t, x2[rows])
        w = (g[rows][:, :, None] * x2[rows][:, None, :]).reshape(-1, L * n)
        da_hat += x1[rows].T @ w
        dx1[rows] = w @ a_hat.T
        dx2[rows] = np.einsum("kl,kln->kn", g[rows], t)
    if b is not None:
        z += b
    return {
        "z": z,
        "grad_x1": dx1,
        "grad_x2": dx2,
        "grad_weight": da_hat.reshape(m, L, n).transpose(1, 0, 2),
        "grad_bias": g.sum(axis=0),
    }


def blocked_linear(x, w, b, g, block=37):
    x, w, g = (v.astype(np.float64) for v in (x, w, g))
    y = np.empty((x.shape[0], w.shape[0]))
    gx = np.empty(x.shape)
    gw = np.zeros(w.shape)
    for k0 in range(0, x.shape[0], block):
        rows = slice(k0, k0 + block)
        y[rows] = x[rows] @ w.T
        gx[rows] = g[rows] @ w
        gw += g[rows].T @ x[rows]
    if b is not None:
        y += b
    return {"y": y, "grad_x": gx, "grad_weight": gw, "grad_bias": g.sum(axis=0)}


def absolute(arrays):
    return [None if v is None else np.abs(v) for v in arrays]


def assert_close(got, ref, scale, terms, dtype, name):
    """|got - ref| <= C eps sqrt(terms + 1) scale, elementwise; also dtype/shape/layout."""
    assert got is not None, name
    assert got.dtype == dtype, name
    assert got.shape == ref.shape, name
    assert got.flags.c_contiguous, name
    eps = np.finfo(dtype).eps
    tol = TOL_FACTOR * eps * math.sqrt(terms + 1) * np.asarray(scale, dtype=np.float64)
    err = np.abs(got.astype(EXACT) - ref.astype(EXACT)).astype(np.float64)
    bad = err > tol
    assert not bad.any(), (
        f"{name}: {bad.sum()} of {bad.size} entries out of tolerance; "
        f"worst err {err[bad].max()} vs tol {tol[bad].min()}"
    )


def make_linear(rng, n_batch, n_in, n_out, dtype, with_bias=True):
    x = rng.standard_normal((n_batch, n_in)).astype(dtype)
    w = rng.standard_normal((n_out, n_in)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype) if with_bias else None
    g = rng.standard_normal((n_batch, n_out)).astype(dtype)
    return x, w, b, g


def make_bilinear(rng, n_batch, m, n, L, dtype, with_bias=True):
    x1 = rng.standard_normal((n_batch, m)).astype(dtype)
    x2 = rng.standard_normal((n_batch, n)).astype(dtype)
    a = rng.standard_normal((L, m, n)).astype(dtype)
    b = rng.standard_normal(L).astype(dtype) if with_bias else None
    g = rng.standard_normal((n_batch, L)).astype(dtype)
    return x1, x2, a, b, g


def check_linear(x, w, b, g, dtype, reference, need=(True, True, True)):
    n_batch, n_in = x.shape
    n_out = w.shape[0]
    ref = reference(x, w, b, g)
    scale = reference(*absolute((x, w, b, g)))
    y = cb.linear_forward(x, w, b)
    assert_close(y, ref["y"], scale["y"], n_in, dtype, "y")
    grads = cb.linear_backward(g, x, w, *need)
    assert isinstance(grads, tuple) and len(grads) == 3
    lengths = {"grad_x": n_out, "grad_weight": n_batch, "grad_bias": n_batch}
    for wanted, name, got in zip(need, ("grad_x", "grad_weight", "grad_bias"), grads):
        if wanted:
            assert_close(got, ref[name], scale[name], lengths[name], dtype, name)
        else:
            assert got is None, name


def check_bilinear(x1, x2, a, b, g, dtype, reference, need=(True, True, True, True)):
    n_batch, m = x1.shape
    L, _, n = a.shape
    ref = reference(x1, x2, a, b, g)
    scale = reference(*absolute((x1, x2, a, b, g)))
    z = cb.bilinear_forward(x1, x2, a, b)
    assert_close(z, ref["z"], scale["z"], m * n, dtype, "z")
    grads = cb.bilinear_backward(g, x1, x2, a, *need)
    assert isinstance(grads, tuple) and len(grads) == 4
    names = ("grad_x1", "grad_x2", "grad_weight", "grad_bias")
    lengths = {"grad_x1": L * n, "grad_x2": L * m, "grad_weight": n_batch, "grad_bias": n_batch}
    for wanted, name, got in zip(need, names, grads):
        if wanted:
            assert_close(got, ref[name], scale[name], lengths[name], dtype, name)
        else:
            assert got is None, name


@pytest.fixture
def restore_threads():
    setting = _core.get_thread_setting()
    yield
    cb.set_num_threads(setting)


# ----------------------------------------------------------------------------------------
# Hypothesis: small and odd shapes, 0/1-sized dimensions, one dimension past a block size


def capped_dims(draw, count, budget):
    small = st.sampled_from([0, 1, 1, 2, 3, 5, 7])
    medium = st.integers(8, 40)
    big = st.sampled_from([47, 49, 97, 127, 129, 255, 257, 300, 513, 700])
    dims = [draw(st.one_of(small, medium)) for _ in range(count)]
    if draw(st.booleans()):
        dims[draw(st.integers(0, count - 1))] = draw(big)
    # Keep the literal (long double) reference cheap: shrink the largest dimension.
    while math.prod(dims) > budget:
        i = int(np.argmax(dims))
        dims[i] //= 2
    return dims


@st.composite
def linear_cases(draw):
    n_batch, n_in, n_out = capped_dims(draw, 3, 150_000)
    return dict(
        shape=(n_batch, n_in, n_out),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**32 - 1)),
        bias=draw(st.booleans()),
        need=tuple(draw(st.booleans()) for _ in range(3)),
    )


@st.composite
def bilinear_cases(draw):
    n_batch, m, n, L = capped_dims(draw, 4, 150_000)
    return dict(
        shape=(n_batch, m, n, L),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**32 - 1)),
        bias=draw(st.booleans()),
        need=tuple(draw(st.booleans()) for _ in range(4)),
    )


@hyp_settings
@given(linear_cases())
def test_linear_matches_einsum(case):
    rng = np.random.default_rng(case["seed"])
    x, w, b, g = make_linear(rng, *case["shape"], case["dtype"], case["bias"])
    check_linear(x, w, b, g, case["dtype"], einsum_linear, case["need"])


@hyp_settings
@given(bilinear_cases())
def test_bilinear_matches_einsum(case):
    rng = np.random.default_rng(case["seed"])
    x1, x2, a, b, g = make_bilinear(rng, *case["shape"], case["dtype"], case["bias"])
    check_bilinear(x1, x2, a, b, g, case["dtype"], einsum_bilinear, case["need"])


def test_references_agree():
    """The row-blocked reformulation equals the literal sums (so either may be trusted)."""
    rng = np.random.default_rng(1)
    for shape in [(9, 3, 5, 4), (40, 7, 2, 3), (1, 1, 1, 1), (0, 2, 3, 2), (5, 0, 3, 2)]:
        x1, x2, a, b, g = make_bilinear(rng, *shape, np.float64)
        lit, blk = einsum_bilinear(x1, x2, a, b, g), blocked_bilinear(x1, x2, a, b, g)
        for key in lit:
            np.testing.assert_allclose(
                blk[key], lit[key].astype(np.float64), rtol=1e-12, atol=1e-12
            )
        x, w, b, g = make_linear(rng, shape[0], shape[1], shape[2], np.float64)
        lit, blk = einsum_linear(x, w, b, g), blocked_linear(x, w, b, g)
        for key in lit:
            np.testing.assert_allclose(
                blk[key], lit[key].astype(np.float64), rtol=1e-12, atol=1e-12
            )


# ----------------------------------------------------------------------------------------
# Shapes that cross the kernels' block sizes (rows per block 128, What chunks of 512 float /
# 256 double columns, weight tiles of 96-480 columns, output groups with partial sums,
# in2 > in1 "swapped" orientation, linear tiles of 256 x 240 and batch chunks of >= 1024,
# and the linear products with >= 256 output rows, whose other operand is packed once: tasks
# of 32-128 rows, depth blocks of ~520 (float) / ~260 (double), packing chunks of 8 panels,
# passes of at most 8 MiB).

BILINEAR_STRUCTURAL = [
    (300, 40, 50, 20),  # 3 row blocks (last partial), swapped, several chunks
    (64, 70, 30, 9),  # one row block: output groups with partial sums
    (130, 17, 600, 2),  # q > chunk: an output's row dot split over chunks (swapped: q = 17)
    (129, 600, 300, 2),  # q = 300 > 256 double chunk columns, 2 row blocks
    (2000, 17, 5, 33),  # many row blocks, narrow q
    (5, 3, 200, 40),  # weight tiles cutting across outputs
    (260, 1, 1, 1),
    (70, 300, 260, 3),  # q >= 64: What read in place from the weight, q > 256 double chunk
    (40, 70, 90, 5),  # in place, swapped (A[l] transposed), several outputs per task
]
LINEAR_STRUCTURAL = [
    (300, 50, 70),
    (5000, 20, 30),  # batch chunks for the weight gradient
    (200, 530, 250),  # output tiles (fewer than 256 rows), partial edge tiles
    (600, 530, 250),  # packed weight (80-row tasks); grad_weight in tiles
    (3, 1000, 7),  # forward tiles computed column-major (a short batch)
    (100, 1100, 600),  # forward tiles column-major: a weight over 2 MiB
    (2100, 1, 600),
    # Packed weight: several depth blocks, pack chunks with a partial panel, last task partial
    # (grad_x: the weight's transpose, 1030 rows in 3-6 chunks, depth 401).
    (1100, 1030, 401),
    # Packed weight of 1500 rows and depth 7; grad_x: 7 rows (less than one panel) over a
    # depth of 1500 (several depth blocks).
    (1030, 7, 1500),
    # grad_weight packed (1030 rows of output: 9 tasks), depth = batch 300, x^T packed.
    (300, 37, 1030),
    # Packed operands over 8 MiB, packed in passes (float32: 2, float64: 3-4).
    (1024, 1100, 2000),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BILINEAR_STRUCTURAL)
def test_bilinear_structural_shapes(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x1, x2, a, b, g = make_bilinear(rng, *shape, dtype)
    check_bilinear(x1, x2, a, b, g, dtype, blocked_bilinear)
    check_bilinear(x1, x2, a, None, g, dtype, blocked_bilinear, need=(True, False, False, True))
    check_bilinear(x1, x2, a, b, g, dtype, blocked_bilinear, need=(False, True, True, False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_STRUCTURAL)
def test_linear_structural_shapes(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x, w, b, g = make_linear(rng, *shape, dtype)
    check_linear(x, w, b, g, dtype, blocked_linear)
    check_linear(x, w, None, g, dtype, blocked_linear, need=(False, True, False))


def test_empty_sums_are_zero():
    rng = np.random.default_rng(2)
    for dtype in DTYPES:
        # n == 0: bilinear forward is the bias (or zeros); m == 0 likewise.
        x1, x2, a, b, g = make_bilinear(rng, 4, 3, 0, 2, dtype)
        np.testing.assert_array_equal(cb.bilinear_forward(x1, x2, a, b), np.tile(b, (4, 1)))
        np.testing.assert_array_equal(cb.bilinear_forward(x1, x2, a, None), np.zeros((4, 2)))
        gx1, gx2, ga, gb = cb.bilinear_backward(g, x1, x2, a, True, True, True, True)
        np.testing.assert_array_equal(gx1, np.zeros((4, 3)))
        assert gx2.shape == (4, 0) and ga.shape == (2, 3, 0)
        # N == 0: weight and bias gradients are zeros.
        x1, x2, a, b, g = make_bilinear(rng, 0, 3, 4, 2, dtype)
        assert cb.bilinear_forward(x1, x2, a, b).shape == (0, 2)
        _, _, ga, gb = cb.bilinear_backward(g, x1, x2, a, True, True, True, True)
        np.testing.assert_array_equal(ga, np.zeros((2, 3, 4)))
        np.testing.assert_array_equal(gb, np.zeros(2))
        # L == 0: input gradients are zeros.
        x1, x2, a, b, g = make_bilinear(rng, 5, 3, 4, 0, dtype)
        gx1, gx2, _, _ = cb.bilinear_backward(g, x1, x2, a, True, True, True, True)
        np.testing.assert_array_equal(gx1, np.zeros((5, 3)))
        np.testing.assert_array_equal(gx2, np.zeros((5, 4)))
        # Linear: n == 0 -> y = bias; N == 0 -> zero weight/bias gradients; m == 0.
        x, w, b, g = make_linear(rng, 3, 0, 4, dtype)
        np.testing.assert_array_equal(cb.linear_forward(x, w, b), np.tile(b, (3, 1)))
        x, w, b, g = make_linear(rng, 0, 5, 4, dtype)
        _, gw, gb = cb.linear_backward(g, x, w, True, True, True)
        np.testing.assert_array_equal(gw, np.zeros((4, 5)))
        np.testing.assert_array_equal(gb, np.zeros(4))
        x, w, b, g = make_linear(rng, 3, 5, 0, dtype)
        gx, _, _ = cb.linear_backward(g, x, w, True, True, True)
        np.testing.assert_array_equal(gx, np.zeros((3, 5)))


# ----------------------------------------------------------------------------------------
# Determinism and threads

# Large enough to run in parallel (> 1 MFLOP) and to exercise every task grid.
DETERMINISM_BILINEAR = [
    (300, 40, 50, 20),
    (64, 70, 30, 9),
    (700, 33, 31, 17),
    (130, 17, 600, 2),
    (150, 300, 280, 4),
    (100, 64, 96, 12),
]
DETERMINISM_LINEAR = [
    (600, 530, 250),
    (5000, 20, 30),
    (64, 300, 1000),
    (1100, 1030, 401),
    (300, 37, 1030),
]


def run_all(rng_seed, dtype):
    rng = np.random.default_rng(rng_seed)
    out = []
    for shape in DETERMINISM_BILINEAR:
        x1, x2, a, b, g = make_bilinear(rng, *shape, dtype)
        out.append(cb.bilinear_forward(x1, x2, a, b))
        out.extend(cb.bilinear_backward(g, x1, x2, a, True, True, True, True))
    for shape in DETERMINISM_LINEAR:
        x, w, b, g = make_linear(rng, *shape, dtype)
        out.append(cb.linear_forward(x, w, b))
        out.extend(cb.linear_backward(g, x, w, True, True, True))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_identical_for_1_2_3_threads(dtype, restore_threads):
    results = {}
    for threads in (1, 2, 3):
        cb.set_num_threads(threads)
        assert cb.get_num_threads() == threads
        assert _core.team_size() == threads
        results[threads] = run_all(7, dtype)
    for threads in (2, 3):
        for got, ref in zip(results[threads], results[1]):
            assert got.tobytes() == ref.tobytes()


def test_set_num_threads_is_process_wide(restore_threads):
    seen = {}

    def probe(key):
        seen[key] = (cb.get_num_threads(), _core.team_size())

    for threads in (1, 3):
        cb.set_num_threads(threads)
        worker = threading.Thread(target=probe, args=(threads,))
        worker.start()
        worker.join()
        assert seen[threads] == (threads, threads)
    assert _core.get_thread_setting() == 3


@pytest.mark.parametrize("omp_num_threads", [None, "3", "1"])
def test_default_follows_openmp(omp_num_threads):
    # Until set_num_threads is called the setting is OpenMP's process default:
    # OMP_NUM_THREADS, else the number of processors available.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    code = (
        "from linmaps import _cpp_backend as cb, _core; "
        "print(cb.get_num_threads(), _core.team_size(), _core.get_thread_setting())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = int(omp_num_threads) if omp_num_threads else len(os.sched_getaffinity(0))
    assert out.stdout.split() == [str(expected)] * 3


def test_threadpoolctl_sees_and_limits(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    openmp = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "openmp"]
    assert openmp, "threadpoolctl does not see the OpenMP runtime linmaps._core uses"

    cb.set_num_threads(2)
    rng = np.random.default_rng(3)
    x1, x2, a, _, g = make_bilinear(rng, 300, 40, 50, 20, np.float32)
    reference = cb.bilinear_backward(g, x1, x2, a, True, True, True, True)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert cb.get_num_threads() == 1
        assert _core.team_size() == 1
        limited = cb.bilinear_backward(g, x1, x2, a, True, True, True, True)
        # The limit belongs to this thread only (OpenMP semantics); others keep the setting.
        seen = []
        worker = threading.Thread(target=lambda: seen.append(_core.team_size()))
        worker.start()
        worker.join()
        assert seen == [2]
    assert cb.get_num_threads() == 2
    assert _core.team_size() == 2
    for got, ref in zip(limited, reference):
        assert got.tobytes() == ref.tobytes()
    # Also a cap on a larger setting.
    cb.set_num_threads(3)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert _core.team_size() == 1
    assert _core.team_size() == 3


def test_concurrent_calls_from_python_threads(restore_threads):
    cb.set_num_threads(2)
    expected = {seed: run_all(seed, np.float32) for seed in range(4)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {seed: pool.submit(run_all, seed, np.float32) for seed in list(expected) * 2}
        for seed, future in futures.items():
            for got, ref in zip(future.result(), expected[seed]):
                assert got.tobytes() == ref.tobytes()


# ----------------------------------------------------------------------------------------
# IEEE special values, inputs untouched, fresh outputs, defensive checks


def same_specials(got, ref, name):
    ref = ref.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=name)
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref), err_msg=name)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref), err_msg=name)


BILINEAR_NAMES = ("grad_x1", "grad_x2", "grad_weight", "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(150, 9, 11, 7), (150, 11, 9, 7)])  # both orientations
def test_nan_propagates(shape, dtype):
    # A NaN makes every sum it enters NaN, in any order or association: exact masks.
    rng = np.random.default_rng(4)
    x1, x2, a, b, g = make_bilinear(rng, *shape, dtype)
    x1[3, 2] = np.nan
    x2[7, 1] = np.nan
    a[2, 4, 5] = np.nan
    g[11, 3] = np.nan
    b[5] = np.nan
    with np.errstate(invalid="ignore"):  # the reference's own inf - inf
        ref = einsum_bilinear(x1, x2, a, b, g)
    same_specials(cb.bilinear_forward(x1, x2, a, b), ref["z"], "z")
    for name, got in zip(
        BILINEAR_NAMES, cb.bilinear_backward(g, x1, x2, a, True, True, True, True)
    ):
        same_specials(got, ref[name], name)
        assert np.isnan(got).any(), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(150, 9, 11, 7), (150, 11, 9, 7)])
def test_inf_propagates_bilinear(shape, dtype):
    # z = sum_ij x_i A_ij y_j is evaluated as sum_j (sum_i x_i A_ij) y_j (spec section 4):
    # with one infinite x_i the inner sums are +-inf and the outer one may be +-inf where the
    # literal double sum of +-inf terms is nan, both correct IEEE evaluations of the same
    # formula. What must hold exactly: finite where every term is finite, not finite where
    # some term is not; and infinities from a single source keep their sign (bias).
    rng = np.random.default_rng(4)
    x1, x2, a, b, g = make_bilinear(rng, *shape, dtype)
    x1[9, 0] = np.inf
    x2[7, :] = -np.inf
    a[2, 4, 5] = np.inf
    g[11, 3] = -np.inf
    b[1] = np.inf
    with np.errstate(invalid="ignore"):  # the reference's own inf - inf
        ref = einsum_bilinear(x1, x2, a, b, g)
    z = cb.bilinear_forward(x1, x2, a, b)
    np.testing.assert_array_equal(np.isfinite(z), np.isfinite(ref["z"].astype(np.float64)))
    assert np.isposinf(z[[0, 1, 2], 1]).all()
    grads = cb.bilinear_backward(g, x1, x2, a, True, True, True, True)
    for name, got in zip(BILINEAR_NAMES, grads):
        np.testing.assert_array_equal(
            np.isfinite(got), np.isfinite(ref[name].astype(np.float64)), err_msg=name
        )
    # Weight and bias gradients are sums of products of data, no nested sums: exact.
    same_specials(grads[2], ref["grad_weight"], "grad_weight")
    same_specials(grads[3], ref["grad_bias"], "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate_linear(dtype):
    # Every linear output is one sum of products: the multiset of terms, hence nan / +-inf,
    # does not depend on the order of summation. Exact masks.
    rng = np.random.default_rng(4)
    x, w, b, g = make_linear(rng, 300, 13, 17, dtype)
    x[5, 1] = np.nan
    x[6, 2] = np.inf
    w[3, 4] = -np.inf
    g[8, 0] = np.inf
    g[9, 3] = np.nan
    b[2] = -np.inf
    with np.errstate(invalid="ignore"):
        ref = einsum_linear(x, w, b, g)
    same_specials(cb.linear_forward(x, w, b), ref["y"], "y")
    grads = cb.linear_backward(g, x, w, True, True, True)
    for name, got in zip(("grad_x", "grad_weight", "grad_bias"), grads):
        same_specials(got, ref[name], name)
        assert not np.isfinite(got).all(), name


def test_inputs_not_modified_and_outputs_fresh():
    rng = np.random.default_rng(5)
    inputs = make_bilinear(rng, 140, 20, 30, 9, np.float32)
    copies = [v.copy() for v in inputs]
    x1, x2, a, b, g = inputs
    outputs = [cb.bilinear_forward(x1, x2, a, b)]
    outputs += cb.bilinear_backward(g, x1, x2, a, True, True, True, True)
    linear_inputs = make_linear(rng, 140, 20, 30, np.float64)
    linear_copies = [v.copy() for v in linear_inputs]
    x, w, lb, lg = linear_inputs
    outputs.append(cb.linear_forward(x, w, lb))
    outputs += cb.linear_backward(lg, x, w, True, True, True)
    for original, copy in zip(inputs + linear_inputs, copies + linear_copies):
        assert original.tobytes() == copy.tobytes()
    for out in outputs:
        assert out.flags.c_contiguous and out.flags.writeable and out.flags.owndata
        for arg in inputs + linear_inputs:
            assert not np.shares_memory(out, arg)


def test_core_rejects_what_it_cannot_use_without_copying():
    x = np.ones((4, 3), np.float32)
    w = np.ones((5, 3), np.float32)
    with pytest.raises(TypeError):  # mixed dtypes: no overload, no silent cast
        _core.linear_forward(x, w.astype(np.float64), None)
    with pytest.raises(TypeError):  # not C-contiguous: no silent copy
        _core.linear_forward(np.asfortranarray(np.ones((4, 3), np.float32)), w, None)
    with pytest.raises(TypeError):
        _core.linear_forward(x.astype(np.float16), w.astype(np.float16), None)
    with pytest.raises(ValueError, match="weight"):
        _core.linear_forward(x, np.ones((5, 4), np.float32), None)
    with pytest.raises(ValueError, match="bias"):
        _core.linear_forward(x, w, np.ones(4, np.float32))
    a = np.ones((2, 3, 6), np.float64)
    x1, x2 = np.ones((4, 3)), np.ones((4, 6))
    with pytest.raises(ValueError, match="x2"):
        _core.bilinear_forward(x1, np.ones((4, 5)), a, None)
    with pytest.raises(ValueError, match="grad"):
        _core.bilinear_backward(np.ones((4, 3)), x1, x2, a, None, True, True, True, True)
    with pytest.raises(ValueError):
        _core.set_num_threads(0)


# ----------------------------------------------------------------------------------------
# The large case: N = 65536, m = n = L = 64, with bounded extra memory


def rss_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_large_batch_forward_backward_bounded_memory():
    n_batch, m, n, L = 65536, 64, 64, 64
    rng = np.random.default_rng(6)
    x1, x2, a, b, g = make_bilinear(rng, n_batch, m, n, L, np.float32)

    can_measure = reset_peak_rss()
    before = rss_bytes("VmRSS")
    z = cb.bilinear_forward(x1, x2, a, b)
    grads = cb.bilinear_backward(g, x1, x2, a, True, True, True, True)
    if can_measure:
        outputs = z.nbytes + sum(v.nbytes for v in grads)
        extra = rss_bytes("VmHWM") - before - outputs
        assert extra <= 64 * 2**20, f"extra peak memory {extra / 2**20:.1f} MiB"

    rows = np.unique(np.concatenate([[0, 1, n_batch - 1], rng.integers(0, n_batch, 40)]))
    sub = (x1[rows], x2[rows], a, b, g[rows])
    ref = einsum_bilinear(*sub)
    scale = einsum_bilinear(*absolute(sub))
    assert_close(z[rows], ref["z"], scale["z"], m * n, np.float32, "z")
    assert_close(grads[0][rows], ref["grad_x1"], scale["grad_x1"], L * n, np.float32, "grad_x1")
    assert_close(grads[1][rows], ref["grad_x2"], scale["grad_x2"], L * m, np.float32, "grad_x2")
    # Weight gradients sum over the whole batch: check some outputs l in float64.
    x1d, x2d, gd = (v.astype(np.float64) for v in (x1, x2, g))
    for l in (0, 17, L - 1):
        ref_l = (x1d * gd[:, l : l + 1]).T @ x2d
        scale_l = (np.abs(x1d) * np.abs(gd[:, l : l + 1])).T @ np.abs(x2d)
        assert_close(grads[2][l], ref_l, scale_l, n_batch, np.float32, f"grad_weight[{l}]")
    assert_close(grads[3], gd.sum(0), np.abs(gd).sum(0), n_batch, np.float32, "grad_bias")


@pytest.mark.slow
def test_above_the_budget_nothing_is_kept_and_memory_stays_bounded():
    """(65536, 64, 64, 64) float32: T would take 1 GiB, above the default 256 MiB budget."""
    n_batch, m, n, L = 65536, 64, 64, 64
    x1, x2, w, _, g = make_bilinear(np.random.default_rng(6), n_batch, m, n, L, np.float32)
    layer = linmaps.Bilinear(m, n, L, seed=0)
    can_measure = reset_peak_rss()
    before = rss_bytes("VmRSS")
    z = layer(x1, x2)
    grad_x1, grad_x2 = layer.backward(g)
    assert layer.kept_bytes == 0
    if can_measure:
        # The layer's own copies of the inputs, the outputs and the accumulators are expected.
        held = x1.nbytes + x2.nbytes + z.nbytes + grad_x1.nbytes + grad_x2.nbytes + w.nbytes
        extra = rss_bytes("VmHWM") - before - held
        assert extra <= 64 * 2**20, f"extra peak memory {extra / 2**20:.1f} MiB"
    rows = [0, 12345, n_batch - 1]
    expected = linmaps.bilinear(x1[rows], x2[rows], layer.weight, layer.bias)
    np.testing.assert_allclose(z[rows], expected, rtol=1e-5, atol=1e-4)
