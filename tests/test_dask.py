"""linmaps.dask: the maps over Dask arrays against the in-memory functions.

Forward results and input gradients are the in-memory function applied per chunk, so they
must equal the concatenated per-chunk in-memory results bit for bit, and the whole-batch
in-memory result to rounding. Weight and bias gradients are per-chunk partial sums added in
a fixed tree: the same bits for a given chunking on every scheduler, and the left-to-right
sum of the in-memory partials when the tree has one node.
"""

import os
import pickle
import re
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

import linmaps  # noqa: E402
import linmaps.dask as ldk  # noqa: E402

N = 103  # rows: 20-row chunks leave an uneven last chunk of 3
CHUNKINGS = {"uneven": 20, "one-chunk": -1, "one-row": 1}
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _data(dtype=np.float64, n=N, in1=7, in2=5, out=4, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, in1)).astype(dtype),
        rng.standard_normal((n, in2)).astype(dtype),
        rng.standard_normal((out, in1, in2)).astype(dtype),
        rng.standard_normal(out).astype(dtype),
        rng.standard_normal((n, out)).astype(dtype),
    )


def _row_slices(chunks):
    start = 0
    for size in chunks:
        yield slice(start, start + size)
        start += size


def _per_chunk(function, row_chunks, *batched, **kwargs):
    """The in-memory ``function`` applied to each row chunk of ``batched`` (the independent
    answer for chunkwise results); list of per-chunk results."""
    return [function(*(a[rows] for a in batched), **kwargs) for rows in _row_slices(row_chunks)]


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _close(got, expected, dtype):
    np.testing.assert_allclose(got, expected, rtol=TOL[dtype], atol=TOL[dtype])


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bilinear_forward_matches_in_memory(chunks, dtype):
    x1, x2, w, b, _ = _data(dtype)
    x1d = da.from_array(x1, chunks=(chunks, -1))
    z = ldk.bilinear(x1d, x2, w, b)
    assert isinstance(z, da.Array)
    assert z.chunks == (x1d.chunks[0], (w.shape[0],))
    got = z.compute(scheduler="threads")
    expected = np.concatenate(_per_chunk(linmaps.bilinear, x1d.chunks[0], x1, x2, weight=w, bias=b))
    _same_bits(got, expected)
    _close(got, linmaps.bilinear(x1, x2, w, b), dtype)


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_forward_matches_in_memory(chunks, dtype):
    x, _, w3, b, _ = _data(dtype)
    w = w3[:, :, 0].copy()  # (4, 7)
    xd = da.from_array(x, chunks=(chunks, -1))
    y = ldk.linear(xd, w, b)
    assert y.chunks == (xd.chunks[0], (w.shape[0],))
    got = y.compute(scheduler="threads")
    expected = np.concatenate(_per_chunk(linmaps.linear, xd.chunks[0], x, weight=w, bias=b))
    _same_bits(got, expected)
    _close(got, linmaps.linear(x, w, b), dtype)


def test_mixed_chunkings_are_aligned_to_the_first_dask_input():
    x1, x2, w, b, _ = _data()
    x1d = da.from_array(x1, chunks=(30, -1))
    x2d = da.from_array(x2, chunks=(17, 2))  # other batch chunks, split feature axis
    z = ldk.bilinear(x1d, x2d, w, b)
    assert z.chunks[0] == x1d.chunks[0]
    _close(z.compute(), linmaps.bilinear(x1, x2, w, b), np.float64)
    # NumPy x1, Dask x2: x2's chunking wins.
    z = ldk.bilinear(x1, x2d, w, b)
    assert z.chunks[0] == x2d.chunks[0]
    _close(z.compute(), linmaps.bilinear(x1, x2, w, b), np.float64)


def test_numpy_inputs_are_wrapped():
    x1, x2, w, b, g = _data()
    z = ldk.bilinear(x1, x2, w, b)
    assert isinstance(z, da.Array)
    _close(z.compute(), linmaps.bilinear(x1, x2, w, b), np.float64)
    grads = dask.compute(*ldk.bilinear_backward(g, x1, x2, w))
    for got, expected in zip(grads, linmaps.bilinear_backward(g, x1, x2, w)):
        _close(got, expected, np.float64)


def test_several_batch_axes_and_a_2d_weight():
    rng = np.random.default_rng(3)
    x1 = rng.standard_normal((6, 7, 5))
    x2 = rng.standard_normal((6, 7, 3))
    w2 = rng.standard_normal((5, 3))
    b0 = np.float64(0.25)
    x1d = da.from_array(x1, chunks=(4, 3, -1))
    z = ldk.bilinear(x1d, x2, w2, b0)
    assert z.shape == (6, 7) and z.chunks == x1d.chunks[:2]
    _close(z.compute(), linmaps.bilinear(x1, x2, w2, b0), np.float64)
    g = rng.standard_normal((6, 7))
    got = dask.compute(*ldk.bilinear_backward(g, x1d, x2, w2))
    for a, e in zip(got, linmaps.bilinear_backward(g, x1, x2, w2)):
        assert a.shape == e.shape
        _close(a, e, np.float64)


def test_a_single_sample_and_an_empty_batch():
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    x = rng.standard_normal(5)  # no batch axis: one chunk
    _same_bits(ldk.linear(x, w, b).compute(), linmaps.linear(x, w, b))
    got = dask.compute(*ldk.linear_backward(np.ones(3), x, w))
    for a, e in zip(got, linmaps.linear_backward(np.ones(3), x, w)):
        _same_bits(a, e)
    x1, x2, w3 = np.zeros((0, 4)), np.zeros((0, 6)), rng.standard_normal((2, 4, 6))
    assert ldk.bilinear(da.from_array(x1), x2, w3).compute().shape == (0, 2)
    got = dask.compute(*ldk.bilinear_backward(np.zeros((0, 2)), x1, x2, w3))
    for a, e in zip(got, linmaps.bilinear_backward(np.zeros((0, 2)), x1, x2, w3)):
        _same_bits(a, e)


def test_dask_weight_and_bias_are_one_chunk():
    x, _, w3, b, _ = _data()
    w = w3[:, :, 0].copy()
    wd, bd = da.from_array(w, chunks=(2, 3)), da.from_array(b, chunks=1)
    y = ldk.linear(da.from_array(x, chunks=30), wd, bd)
    _close(y.compute(), linmaps.linear(x, w, b), np.float64)


@pytest.mark.parametrize(
    ("dtypes", "result"),
    [
        ((np.float16, np.float16, np.float16), np.float16),
        ((np.float32, np.float64, np.float32), np.float64),
        ((np.int32, np.float32, np.float32), np.float64),
        ((np.bool_, np.float64, np.float64), np.float64),
    ],
)
def test_dtype_rules_are_the_in_memory_ones(dtypes, result):
    x1, x2, w, _, g = _data()
    x1, x2, w = (a.astype(t) for a, t in zip((x1, x2, w), dtypes))
    z = ldk.bilinear(da.from_array(x1, chunks=25), x2, w)
    expected = linmaps.bilinear(x1, x2, w)
    assert z.dtype == expected.dtype == result
    got = z.compute()
    assert got.dtype == result
    np.testing.assert_allclose(got, expected, rtol=1e-2 if result == np.float16 else 1e-6)
    g = g.astype(dtypes[0])
    grads = ldk.bilinear_backward(g, da.from_array(x1, chunks=25), x2, w)
    for got, expected in zip(dask.compute(*grads), linmaps.bilinear_backward(g, x1, x2, w)):
        assert got.dtype == expected.dtype == result


def test_a_split_feature_axis_is_rechunked_with_a_warning_when_large():
    x, _, w3, b, _ = _data()
    w = w3[:, :, 0].copy()
    xd = da.from_array(x, chunks=(50, 3))
    y = ldk.linear(xd, w, b)  # small chunks: no warning (filterwarnings=error would fail)
    assert y.chunks[0] == xd.chunks[0]
    _close(y.compute(), linmaps.linear(x, w, b), np.float64)
    with (
        dask.config.set({"array.chunk-size": "1KiB"}),
        pytest.warns(da.PerformanceWarning, match=r"feature axis of input .* split"),
    ):
        y = ldk.linear(xd, w, b)
    _close(y.compute(), linmaps.linear(x, w, b), np.float64)


def test_weights_are_one_key_of_the_graph():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 32, 32))  # 128 KiB, far larger than any chunk of x
    x1 = da.random.default_rng(2).standard_normal((400, 32), chunks=(20, -1))
    x2 = da.random.default_rng(3).standard_normal((400, 32), chunks=(20, -1))
    z = ldk.bilinear(x1, x2, w)
    graph = dict(z.__dask_graph__())
    sizes = {key: len(pickle.dumps(task)) for key, task in graph.items()}
    holding_weight = [key for key, size in sizes.items() if size >= w.nbytes]
    assert len(holding_weight) == 1, holding_weight
    assert sum(sizes.values()) < 1.5 * w.nbytes  # 20 tasks refer to it, none copies it
    _close(z.compute(), linmaps.bilinear(x1.compute(), x2.compute(), w), np.float64)


def test_results_are_lazy():
    x1, x2, w, b, _ = _data()
    calls = []

    def counted(*args):
        calls.append(1)
        return args[0]

    x1d = da.from_array(x1, chunks=25).map_blocks(counted, meta=x1[:0])
    z = ldk.bilinear(x1d, x2, w, b)
    grads = ldk.bilinear_backward(np.ones((N, 4)), x1d, x2, w)
    assert calls == [] and isinstance(grads.grad_weight, da.Array)
    z.compute(scheduler="sync")
    assert len(calls) == x1d.numblocks[0]


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bilinear_backward_matches_in_memory(chunks, dtype):
    x1, x2, w, _, g = _data(dtype)
    x1d = da.from_array(x1, chunks=(chunks, -1))
    grads = ldk.bilinear_backward(g, x1d, x2, w)
    assert grads.grad_x1.chunks == x1d.chunks
    got = dask.compute(*grads, scheduler="threads")
    rows = x1d.chunks[0]
    pieces = _per_chunk(linmaps.bilinear_backward, rows, g, x1, x2, weight=w)
    _same_bits(got[0], np.concatenate([p.grad_x1 for p in pieces]))
    _same_bits(got[1], np.concatenate([p.grad_x2 for p in pieces]))
    for a, e in zip(got, linmaps.bilinear_backward(g, x1, x2, w)):
        _close(a, e, dtype)


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_linear_backward_matches_in_memory(chunks):
    x, _, w3, _, g = _data(np.float32)
    w = w3[:, :, 0].copy()
    xd = da.from_array(x, chunks=(chunks, -1))
    got = dask.compute(*ldk.linear_backward(g, xd, w), scheduler="threads")
    pieces = _per_chunk(linmaps.linear_backward, xd.chunks[0], g, x, weight=w)
    _same_bits(got[0], np.concatenate([p.grad_x for p in pieces]))
    for a, e in zip(got, linmaps.linear_backward(g, x, w)):
        _close(a, e, np.float32)


@pytest.mark.parametrize("function", ["linear", "bilinear"])
def test_gradient_sum_is_left_to_right_over_chunks_in_one_node(function):
    """With split_every >= chunks the tree is one node: partials added in chunk order."""
    x1, x2, w, _, g = _data(np.float32)
    chunks = 20  # 6 chunks
    if function == "linear":
        w = w[:, :, 0].copy()
        grads = ldk.linear_backward(g, da.from_array(x1, chunks=chunks), w, split_every=8)
        pieces = _per_chunk(linmaps.linear_backward, (20,) * 5 + (3,), g, x1, weight=w)
    else:
        grads = ldk.bilinear_backward(g, da.from_array(x1, chunks=chunks), x2, w, split_every=8)
        pieces = _per_chunk(linmaps.bilinear_backward, (20,) * 5 + (3,), g, x1, x2, weight=w)
    for name in ("grad_weight", "grad_bias"):
        expected = getattr(pieces[0], name).copy()
        for piece in pieces[1:]:
            expected += getattr(piece, name)
        _same_bits(getattr(grads, name).compute(), expected)


def test_gradients_have_the_same_bits_for_a_chunking_on_every_scheduler(dask_client):
    x1, x2, w, _, g = _data(np.float32, n=2000, in1=16, in2=12, out=6)
    x1d = da.from_array(x1, chunks=(130, -1))
    grads = ldk.bilinear_backward(g, x1d, x2, w, split_every=3)
    runs = [
        dask.compute(*grads, scheduler="sync"),
        dask.compute(*grads, scheduler="threads"),
        dask.compute(*grads, scheduler="threads", num_workers=4),
        dask.compute(*grads, scheduler="threads", num_workers=1),
        dask_client.compute(list(grads), sync=True),
    ]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            _same_bits(a, b)
    with linmaps.use_backend("python"):  # a different kernel: close, not the same bits
        for a, e in zip(runs[0], dask.compute(*grads, scheduler="sync")):
            _close(a, e, np.float32)


def test_one_backward_task_per_chunk_computes_every_gradient(monkeypatch):
    x1, x2, w, _, g = _data()
    calls = []
    original = linmaps._api.bilinear_backward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(linmaps._api, "bilinear_backward", counted)
    x1d = da.from_array(x1, chunks=10)
    grads = ldk.bilinear_backward(g, x1d, x2, w)
    dask.compute(*grads, scheduler="threads")
    assert len(calls) == x1d.numblocks[0]


@pytest.mark.parametrize("need", ["need_x1", "need_x2", "need_weight", "bias"])
def test_gradients_not_asked_for_are_none(need):
    x1, x2, w, _, g = _data()
    grads = ldk.bilinear_backward(g, da.from_array(x1, chunks=50), x2, w, **{need: False})
    expected = linmaps.bilinear_backward(g, x1, x2, w, **{need: False})
    for got, want in zip(grads, expected):
        assert (got is None) == (want is None)
        if got is not None:
            _close(got.compute(), want, np.float64)


# ----------------------------------------------------------------------------- errors


def _message(exc_info):
    return str(exc_info.value)


@pytest.mark.parametrize(
    ("case", "x1_shape", "x2_shape", "w_shape"),
    [
        ("wrong in1", (N, 6), (N, 5), (4, 7, 5)),
        ("wrong in2", (N, 7), (N, 4), (4, 7, 5)),
        ("batch mismatch", (N, 7), (N + 1, 5), (4, 7, 5)),
        ("weight ndim", (N, 7), (N, 5), (7,)),
    ],
)
def test_shape_errors_are_the_in_memory_ones(case, x1_shape, x2_shape, w_shape):
    x1, x2, w = np.ones(x1_shape), np.ones(x2_shape), np.ones(w_shape)
    with pytest.raises(ValueError) as in_memory:
        linmaps.bilinear(x1, x2, w)
    with pytest.raises(ValueError) as chunked:
        ldk.bilinear(da.from_array(x1, chunks=10), da.from_array(x2, chunks=7), w)
    assert _message(chunked) == _message(in_memory)


def test_linear_feature_and_grad_out_errors_are_the_in_memory_ones():
    x, w = np.ones((N, 6)), np.ones((4, 7))
    with pytest.raises(ValueError) as in_memory:
        linmaps.linear(x, w)
    with pytest.raises(ValueError) as chunked:
        ldk.linear(da.from_array(x, chunks=10), w)
    assert _message(chunked) == _message(in_memory)
    x, g = np.ones((N, 7)), np.ones((N, 5))
    with pytest.raises(ValueError) as in_memory:
        linmaps.linear_backward(g, x, w)
    with pytest.raises(ValueError) as chunked:
        ldk.linear_backward(da.from_array(g, chunks=10), x, w)
    assert _message(chunked) == _message(in_memory)


@pytest.mark.parametrize("bad", [np.complex128, np.object_, "U3"])
def test_dtype_errors_are_the_in_memory_ones(bad):
    x1, x2, w, _, _ = _data()
    bad_x1 = x1.astype(bad)
    with pytest.raises(TypeError) as in_memory:
        linmaps.bilinear(bad_x1, x2, w)
    with pytest.raises(TypeError) as chunked:
        ldk.bilinear(da.from_array(bad_x1, chunks=10), x2, w)
    assert _message(chunked) == _message(in_memory)
    with pytest.raises(TypeError) as in_memory:
        linmaps.bilinear(x1, x2, w.astype(bad))
    with pytest.raises(TypeError) as chunked:
        ldk.bilinear(da.from_array(x1, chunks=10), x2, w.astype(bad))
    assert _message(chunked) == _message(in_memory)


def test_flag_errors_are_the_in_memory_ones():
    x1, x2, w, _, g = _data()
    with pytest.raises(TypeError) as in_memory:
        linmaps.bilinear_backward(g, x1, x2, w, need_x1=1)
    with pytest.raises(TypeError) as chunked:
        ldk.bilinear_backward(g, da.from_array(x1, chunks=10), x2, w, need_x1=1)
    assert _message(chunked) == _message(in_memory)


def test_unknown_batch_chunks_cannot_be_aligned():
    x1, x2, w, _, _ = _data()
    x1d = da.from_array(x1, chunks=10)
    masked = x1d[x1d[:, 0] > 0]  # row count known only after computing
    with pytest.raises(ValueError, match=re.escape("input1 has unknown chunk sizes")):
        ldk.bilinear(masked, x2[:50], w)
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        ldk.linear(masked, w[:, :, 0])


def test_option_errors():
    x1, x2, w, _, g = _data()
    with pytest.raises(ValueError, match="split_every must be at least 2"):
        ldk.bilinear_backward(g, x1, x2, w, split_every=1)
    with pytest.raises(TypeError, match="threads_per_task must be an int"):
        ldk.bilinear(x1, x2, w, threads_per_task=1.5)
    with pytest.raises(ValueError, match="threads_per_task must be at least 1"):
        ldk.linear(x1, w[:, :, 0], threads_per_task=0)


def test_missing_dask_names_the_extra():
    code = (
        "import sys; sys.modules['dask'] = None\n"
        "try:\n    import linmaps.dask\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert 'pip install "linmaps[dask]"' in out


# ----------------------------------------------------------------------------- threads


@pytest.mark.skipif("cpp" not in linmaps.available_backends(), reason="no compiled backend")
def test_a_task_limits_only_its_own_threads():
    core = linmaps._backend._cpp_backend._core
    seen = {}

    def in_a_task():
        before = core.get_max_threads()
        with ldk._task_threads(8, 1):
            seen["inside"] = core.team_size()
        seen["restored"] = core.get_max_threads() == before

    thread = threading.Thread(target=in_a_task)
    thread.start()
    thread.join()
    assert seen == {"inside": 1, "restored": True}
    assert linmaps.get_num_threads() == core.get_num_threads()  # this thread untouched


def test_thread_share_on_the_threaded_scheduler():
    total = linmaps.get_num_threads()
    cores = dask.system.CPU_COUNT
    share = dask.delayed(ldk._threads_for_task)
    assert share(8, None).compute(scheduler="threads") == max(1, total // min(8, cores))
    assert share(1, None).compute(scheduler="threads") == total  # one chunk: every thread
    assert share(8, None).compute(scheduler="sync") == total  # one task at a time
    with dask.config.set(num_workers=1):
        assert share(8, None).compute(scheduler="threads") == total
    assert share(8, 3).compute(scheduler="threads") == 3


def test_distributed_workers_use_one_thread_per_task(dask_client):
    assert set(dask_client.run(linmaps.get_num_threads).values()) == {1}  # OMP_NUM_THREADS=1
    for n_blocks in (8, 1):
        share = dask_client.submit(ldk._threads_for_task, n_blocks, None, pure=False)
        assert share.result() == 1


def test_a_worker_share_is_its_nthreads_whatever_openmp_allows(monkeypatch):
    # A worker that inherited OMP_NUM_THREADS=2 (from its parent's environment) but has
    # nthreads=1 runs one thread per task; with 4 threads and one chunk, the chunk gets
    # them all, up to linmaps' own thread count.
    monkeypatch.setattr(ldk, "_scheduler_threads", lambda: (1, 1))
    assert ldk._threads_for_task(1, None) == 1
    monkeypatch.setattr(ldk, "_scheduler_threads", lambda: (4, 4))
    assert ldk._threads_for_task(1, None) == min(4, linmaps.get_num_threads())
    assert ldk._threads_for_task(8, None) == 1


# ----------------------------------------------------------------------------- distributed


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    # Dask's nanny writes its workers' environment (OMP_NUM_THREADS=1, ...) into this
    # process's os.environ and leaves it there: every subprocess a later test starts would
    # inherit it. Restored when the cluster closes.
    environ = dict(os.environ)
    try:
        # dashboard_address=None would still serve HTTP on port 8787, and warn when that
        # port is taken (another cluster, a parallel run); ":0" takes a free port, silently.
        with (
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            yield client
    finally:
        os.environ.clear()
        os.environ.update(environ)


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_local_cluster_matches_in_memory(dask_client, chunks):
    x1, x2, w, b, g = _data(np.float32)
    x1d = da.from_array(x1, chunks=(chunks, -1))
    z = ldk.bilinear(x1d, x2, w, b)
    got = dask_client.compute(z, sync=True)
    _same_bits(
        got, np.concatenate(_per_chunk(linmaps.bilinear, x1d.chunks[0], x1, x2, weight=w, bias=b))
    )
    grads = dask_client.compute(list(ldk.bilinear_backward(g, x1d, x2, w)), sync=True)
    for a, e in zip(grads, linmaps.bilinear_backward(g, x1, x2, w)):
        _close(a, e, np.float32)
    y = dask_client.compute(ldk.linear(x1d, w[:, :, 0], b), sync=True)
    _close(y, linmaps.linear(x1, w[:, :, 0], b), np.float32)


# ----------------------------------------------------------------------------- streaming


def _write_npy(path, rows, features, seed, block=100_000):
    """A float32 .npy file of normal samples, written block by block (never held whole)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, features))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        out[start:stop] = rng.standard_normal((stop - start, features), dtype=np.float32)
    out.flush()
    del out


def test_streaming_forward_never_holds_the_input(tmp_path):
    rows, features, chunk = 600_000, 16, 20_000
    path1, path2, path_z = tmp_path / "x1.npy", tmp_path / "x2.npy", tmp_path / "z.npy"
    _write_npy(path1, rows, features, seed=1)
    _write_npy(path2, rows, features, seed=2)
    input_bytes = 2 * rows * features * 4  # 76.8 MB
    allowed = input_bytes // 8  # what this test lets the computation allocate at once
    w = np.random.default_rng(3).standard_normal((4, features, features)).astype(np.float32)

    x1 = ldk.from_npy(path1, chunks=(chunk, -1))
    x2 = ldk.from_npy(path2, chunks=(chunk, -1))
    z = ldk.bilinear(x1, x2, w)
    # The same path once on a few rows first: the first run imports modules and sets up
    # Dask's pools, one-time allocations that are not chunks.
    with dask.config.set(num_workers=2):
        ldk.to_npy(ldk.bilinear(x1[:100], x2[:100], w), tmp_path / "warm.npy", scheduler="threads")
    tracemalloc.start()
    try:
        with dask.config.set(num_workers=2):  # 2 chunks at a time, whatever the machine
            ldk.to_npy(z, path_z, scheduler="threads")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak traced allocation {peak / 1e6:.1f} MB for {input_bytes / 1e6:.1f} MB of input")
    assert peak < allowed, (peak, allowed)

    # The result on disk is right: whole chunks (the first, one in the middle, the last)
    # against the in-memory function, after the measurement.
    written = np.load(path_z, mmap_mode="r")
    inputs = np.load(path1, mmap_mode="r"), np.load(path2, mmap_mode="r")
    for start in (0, rows // 2, rows - chunk):
        block = slice(start, start + chunk)
        expected = linmaps.bilinear(*(np.asarray(a[block]) for a in inputs), w)
        _same_bits(np.asarray(written[block]), expected)
    del written, inputs


def test_blocks_read_from_a_store_are_read_inside_the_chunk_tasks(tmp_path, dask_client):
    # Each task reads its own rows of x1 and x2: no read is a task of its own whose chunk
    # another worker would have to fetch.
    x1, x2, w, b, g = _data(np.float32, n=4000, in1=8, in2=6, out=3)
    np.save(tmp_path / "x1.npy", x1)
    np.save(tmp_path / "x2.npy", x2)
    x1d = ldk.from_npy(tmp_path / "x1.npy", chunks=(500, -1))
    x2d = ldk.from_npy(tmp_path / "x2.npy", chunks=(500, -1))
    z = ldk.bilinear(x1d, x2d, w, b)
    grads = ldk.bilinear_backward(g, x1d, x2d, w)
    for result in (z, grads.grad_x1):
        graph = result.__dask_optimize__(result.__dask_graph__(), result.__dask_keys__())
        read_tasks = [
            k for k in dict(graph) if isinstance(k, tuple) and k[0] in (x1d.name, x2d.name)
        ]
        assert read_tasks == []

    def incoming(dask_worker):
        return sum(entry["total"] for entry in dask_worker.transfer_incoming_log)

    before = sum(dask_client.run(incoming).values())
    got = dask_client.compute(z, sync=True)
    moved = sum(dask_client.run(incoming).values()) - before
    assert moved < 2 * 500 * 8 * 4  # less than one chunk pair: the weight, the readers
    expected = np.concatenate(_per_chunk(linmaps.bilinear, x1d.chunks[0], x1, x2, weight=w, bias=b))
    _same_bits(got, expected)


def test_npy_round_trip(tmp_path):
    data = np.arange(60, dtype=np.float64).reshape(20, 3)
    np.save(tmp_path / "a.npy", data)
    x = ldk.from_npy(tmp_path / "a.npy", chunks=(7, -1))
    assert x.chunks == ((7, 7, 6), (3,))
    ldk.to_npy(x * 2, tmp_path / "b.npy")
    _same_bits(np.load(tmp_path / "b.npy"), data * 2)
    assert os.path.getsize(tmp_path / "b.npy") >= data.nbytes


@pytest.mark.parametrize("name", ["same path", "symlink", "hard link"])
def test_to_npy_refuses_the_file_it_reads(tmp_path, name):
    data = np.arange(60, dtype=np.float64).reshape(20, 3)
    source = tmp_path / "a.npy"
    np.save(source, data)
    target = source
    if name == "symlink":
        target = tmp_path / "link.npy"
        os.symlink(source, target)
    elif name == "hard link":
        target = tmp_path / "hard.npy"
        os.link(source, target)
    x = ldk.from_npy(source, chunks=(7, -1))
    weight = np.ones((2, 3))
    for array in (x * 2, ldk.linear(x, weight)):
        with pytest.raises(ValueError, match=r"to_npy\(\): cannot write to .* computed from"):
            ldk.to_npy(array, target)
        _same_bits(np.load(source), data)  # nothing was written
    # The same graph written elsewhere is right.
    ldk.to_npy(ldk.linear(x, weight), tmp_path / "out.npy")
    expected = np.concatenate(_per_chunk(linmaps.linear, x.chunks[0], data, weight=weight))
    _same_bits(np.load(tmp_path / "out.npy"), expected)
