"""linmaps on Dask arrays: linear and bilinear maps over batches larger than one machine.

``linear``, ``bilinear``, ``linear_backward`` and ``bilinear_backward`` take the arguments of
the in-memory functions (:mod:`linmaps`) but accept Dask arrays chunked along the batch axes,
and return lazy Dask arrays. Each chunk is computed by the in-memory function itself, so
the arithmetic, the dtype rules and the error messages are those of the in-memory API; the
checks run on the arguments' shapes and dtypes before any graph is built.

* **Chunks.** The batch axes keep their chunking; a feature axis split over several chunks
  is rechunked into one (with a ``PerformanceWarning`` when the resulting chunks are
  large). NumPy inputs are wrapped; inputs chunked differently along the batch axes are
  rechunked to the chunking of the first Dask input (``x1``, then ``x2``, then
  ``grad_out``), which the results have.
* **Weights** are one key of the graph (one chunk), which every task refers to: a worker
  receives them once, not once per chunk.
* **Weight and bias gradients** are sums of per-chunk partial sums, added in a fixed tree
  (``split_every`` chunks per node, in chunk order), so a given chunking gives the same bits
  on any scheduler and any number of workers or threads.
* **Threads.** A task's linmaps call uses its share of the scheduler's threads, ``threads //
  min(chunks, tasks run at once)`` (at least 1, at most ``linmaps.get_num_threads()``), so
  that tasks x threads stay within the cores: on a ``dask.distributed`` worker ``threads``
  and ``tasks`` are its ``nthreads`` (one thread per task when there are enough chunks); on
  the threaded scheduler ``threads`` is ``linmaps.get_num_threads()`` and ``tasks`` its pool
  size. ``threads_per_task=`` overrides it. See ``docs/dask.md``.

Needs Dask: ``pip install "linmaps[dask]"``.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import numbers
import os
import sys
import threading
import warnings
from typing import Any

try:
    import dask
    import dask.array as da
    from dask.array.core import PerformanceWarning
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
except ImportError as _exc:
    raise ImportError(
        f"linmaps.dask needs Dask, which is not installed ({_exc}); "
        'install it with: pip install "linmaps[dask]"'
    ) from _exc

try:
    from dask.task_spec import DataNode, List, Task, TaskRef
except ImportError:  # Dask releases before the public module
    from dask._task_spec import DataNode, List, Task, TaskRef

import numpy as np
from numpy.typing import ArrayLike

from . import _api, _backend
from . import _validation as v
from ._api import BilinearGrads, LinearGrads

__all__ = [
    "bilinear",
    "bilinear_backward",
    "from_npy",
    "linear",
    "linear_backward",
    "to_npy",
]

# ----------------------------------------------------------------------------- threads


def _omp_icv():
    """``(omp_get_max_threads, omp_set_num_threads)`` of the OpenMP runtime linmaps' kernels
    use (None without the compiled backend or OpenMP).

    Looked up through the kernel module itself, so a process with several OpenMP runtimes
    (another library's libgomp or libomp) sets the right one.
    """
    global _icv
    if _icv is None:
        functions = ()
        if _backend._cpp_backend is not None:
            try:
                library = ctypes.CDLL(_backend._cpp_backend._core.__file__)
                get, set_ = library.omp_get_max_threads, library.omp_set_num_threads
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                functions = (get, set_)
            except (OSError, AttributeError):
                pass
        _icv = functions
    return _icv or None


_icv = None


def _scheduler_threads() -> tuple:
    """``(threads, tasks)``: how many threads the scheduler running this task may use in
    this process, and how many tasks it runs at once there."""
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker

            nthreads = max(1, int(get_worker().state.nthreads))
            return nthreads, nthreads  # a worker's nthreads is its share of the cores
        except (ImportError, ValueError, AttributeError):
            pass  # not inside a distributed worker
    threads = _backend.get_num_threads()
    if threading.current_thread() is threading.main_thread():
        return threads, 1  # the synchronous scheduler runs tasks on the calling thread
    num_workers = dask.config.get("num_workers", None)
    if isinstance(num_workers, numbers.Integral) and num_workers >= 1:
        return threads, int(num_workers)
    return threads, dask.system.CPU_COUNT


def _threads_for_task(n_blocks: int, threads_per_task) -> int:
    """The threads one task's linmaps call uses: its share of the scheduler's threads, and
    never more than ``linmaps.get_num_threads()`` (``OMP_NUM_THREADS``)."""
    if threads_per_task is not None:
        return threads_per_task
    threads, tasks = _scheduler_threads()
    share = threads // max(1, min(n_blocks, tasks))
    return max(1, min(_backend.get_num_threads(), share))


@contextlib.contextmanager
def _task_threads(n_blocks: int, threads_per_task):
    """Limit linmaps calls from this thread to the task's share of threads, then restore.

    Uses the calling thread's OpenMP limit (``omp_set_num_threads``), which caps linmaps'
    calls from this thread only (docs/kernels.md section 5), so tasks running at once in
    other threads are unaffected. Results do not depend on it: the kernels give the same
    bits for any thread count.
    """
    icv = _omp_icv() if _backend.get_backend() == "cpp" else None
    if icv is None:
        yield
        return
    get, set_ = icv
    threads = _threads_for_task(n_blocks, threads_per_task)
    before = get()
    if threads == before:
        yield
        return
    set_(threads)
    try:
        yield
    finally:
        set_(before)


def _check_threads_per_task(fname, threads_per_task):
    if threads_per_task is None:
        return None
    if isinstance(threads_per_task, bool) or not isinstance(threads_per_task, numbers.Integral):
        raise TypeError(
            f"{fname}(): threads_per_task must be an int or None, "
            f"got {type(threads_per_task).__name__}"
        )
    if threads_per_task < 1:
        raise ValueError(f"{fname}(): threads_per_task must be at least 1, got {threads_per_task}")
    return int(threads_per_task)


def _check_split_every(fname, split_every):
    if split_every is None:
        split_every = dask.config.get("split_every", 4)
        if not isinstance(split_every, numbers.Integral) or split_every < 2:
            split_every = 4  # a per-axis dict or a bad setting: Dask's own default
    elif isinstance(split_every, bool) or not isinstance(split_every, numbers.Integral):
        raise TypeError(
            f"{fname}(): split_every must be an int or None, got {type(split_every).__name__}"
        )
    elif split_every < 2:
        raise ValueError(f"{fname}(): split_every must be at least 2, got {split_every}")
    return int(split_every)


# ----------------------------------------------------------------------------- arguments


def _stand_in(fname: str, name: str, value) -> np.ndarray:
    """What the in-memory checks see of an argument: the array itself for NumPy input, and
    for a Dask array an ndarray of its shape and dtype that takes no memory (a broadcast
    scalar), so the checks and messages are exactly those of the in-memory functions."""
    if isinstance(value, da.Array):
        if any(math.isnan(size) for size in value.shape):
            raise ValueError(
                f"{fname}(): {name} has unknown chunk sizes (shape {value.shape}), so its "
                f"batch chunks cannot be aligned; call {name}.compute_chunk_sizes() first"
            )
        value = np.broadcast_to(np.empty((), dtype=value.dtype), value.shape)
    return v.as_array(fname, name, value)


def _chunk_limit_bytes() -> int:
    return dask.utils.parse_bytes(dask.config.get("array.chunk-size", "128MiB"))


class _Batch:
    """The batch chunking of a call: every batch-chunked argument is brought to it."""

    def __init__(self, fname: str, arguments):
        # arguments: (name, value, stand-in, feature_ndim), in order of precedence.
        self.fname = fname
        reference = next(
            ((value, feat) for _, value, _, feat in arguments if isinstance(value, da.Array)),
            None,
        )
        if reference is None:  # all NumPy: Dask's automatic chunks for the first argument
            _, _, stand_in, feat = arguments[0]
            chunks = da.core.normalize_chunks(
                ("auto",) * (stand_in.ndim - feat) + (-1,) * feat,
                stand_in.shape,
                dtype=stand_in.dtype,
            )
            self.chunks = chunks[: stand_in.ndim - feat]
        else:
            value, feat = reference
            self.chunks = value.chunks[: value.ndim - feat]
        self.grid = tuple(len(c) for c in self.chunks)
        self.n_blocks = math.prod(self.grid)

    def indices(self):
        """Block indices of the batch axes, in C order (the order of the partial sums)."""
        return itertools.product(*(range(n) for n in self.grid))

    def bring(self, name: str, value, stand_in: np.ndarray, feature_ndim: int):
        """``value`` as a Dask array with this batch chunking and one chunk per feature axis."""
        feature_shape = stand_in.shape[stand_in.ndim - feature_ndim :]
        chunks = self.chunks + tuple((size,) for size in feature_shape)
        if not isinstance(value, da.Array):
            return da.from_array(stand_in, chunks=chunks)
        split = [len(c) for c in value.chunks[value.ndim - feature_ndim :] if len(c) > 1]
        if split:
            block_rows = math.prod(max(c, default=0) for c in self.chunks)
            block_bytes = block_rows * math.prod(feature_shape) * value.dtype.itemsize
            if block_bytes > _chunk_limit_bytes():
                warnings.warn(
                    f"{self.fname}(): the feature axis of {name} (shape {value.shape}) is split "
                    f"into {math.prod(split)} chunks; linmaps rechunks it into one, which makes "
                    f"chunks of {dask.utils.format_bytes(block_bytes)}, more than Dask's "
                    f"array.chunk-size ({dask.config.get('array.chunk-size')}). Chunk the "
                    f"batch axes smaller, e.g. {name}.rechunk({{0: 'auto', -1: -1}})",
                    PerformanceWarning,
                    stacklevel=4,
                )
        return value.rechunk(chunks) if value.chunks != chunks else value


def _one_chunk(name: str, value, stand_in: np.ndarray, work: np.dtype):
    """A weight or bias as a one-chunk Dask array in the compute dtype: one graph key."""
    if isinstance(value, da.Array):
        one = value.rechunk(value.shape) if value.npartitions != 1 else value
        return one.map_blocks(v.contiguous, work, dtype=work)
    array = v.contiguous(stand_in, work)
    return da.from_array(array, chunks=array.shape, name=f"linmaps-{name}-{tokenize(array)}")


def _key(array, index: tuple) -> tuple:
    """The key of ``array``'s block at batch block ``index`` (one chunk on the other axes)."""
    return (array.name, *index, *(0,) * (array.ndim - len(index)))


def _ref(array, index=()):
    return None if array is None else TaskRef(_key(array, index))


_READERS = tuple(
    f
    for f in (getattr(da.core, n, None) for n in ("getter", "getter_nofancy", "getter_inline"))
    if f
)


class _Blocks:
    """How a chunk's task gets its block of a batch-chunked input.

    A block that is only read (a literal chunk, or a ``da.from_array`` read: ``from_npy``,
    Zarr, HDF5, a wrapped NumPy array) goes *into* the task: the task reads it itself, where
    it runs. Referenced by key instead, the blocks of ``x1``, ``x2`` and ``grad_out`` would
    be read as tasks of their own, often on different workers, and half of them copied
    between workers to meet (measured: 8 of the 16 input chunks of an 8-chunk forward on 2
    workers). Any other block (a computation's result) is referenced by key.
    """

    def __init__(self, array):
        self.array = array
        self.graph = dict(array.__dask_graph__())

    def __call__(self, index):
        key = _key(self.array, index)
        node = self.graph.get(key)
        if isinstance(node, np.ndarray):
            return node
        if isinstance(node, DataNode) and isinstance(node.value, np.ndarray):
            return node.value
        if isinstance(node, Task) and node.func in _READERS:
            return node
        return TaskRef(key)


def _array(name, layer, dependencies, chunks, dtype):
    graph = HighLevelGraph.from_collections(
        name, layer, dependencies=[d for d in dependencies if d is not None]
    )
    return da.Array(graph, name, chunks, meta=np.empty((0,) * len(chunks), dtype=dtype))


def _tree_sum(name, parts_name, batch, position, shape, dtype, split_every):
    """Sum element ``position`` of every block's tuple of gradients in a fixed tree.

    Leaves are the blocks in C order; each node adds ``split_every`` consecutive children
    left to right. Returns a one-chunk Dask array layer dict and its key.
    """
    layer = {}
    level = [TaskRef((parts_name, *index)) for index in batch.indices()]
    depth = 0
    pick = position
    while True:
        groups = [level[i : i + split_every] for i in range(0, len(level), split_every)]
        nodes = []
        for j, group in enumerate(groups):
            key = (f"{name}-tree", depth, j)
            layer[key] = Task(key, _sum_in_order, List(*group), pick)
            nodes.append(TaskRef(key))
        level, pick, depth = nodes, None, depth + 1
        if len(level) == 1:
            break
    out_key = (name, *(0,) * len(shape))
    layer[out_key] = Task(out_key, _finish_sum, level[0], shape, dtype)
    return layer


def _sum_in_order(parts, position):
    """``parts[0] + parts[1] + ...`` added left to right (element ``position`` of each part
    when they are tuples of gradients), in a new array."""
    if position is not None:
        parts = [part[position] for part in parts]
    total = np.array(parts[0], copy=True)
    for part in parts[1:]:
        np.add(total, part, out=total)
    return total


def _finish_sum(total, shape, dtype):
    return v.contiguous(total.reshape(shape), dtype)


def _pick(parts, position):
    return parts[position]


# ----------------------------------------------------------------------------- chunk tasks


def _linear_block(x, weight, bias, work, dtype, n_blocks, threads_per_task):
    with _task_threads(n_blocks, threads_per_task):
        y = _api.linear(v.contiguous(x, work), weight, bias)
    return v.contiguous(y, dtype)


def _bilinear_block(x1, x2, weight, bias, work, dtype, n_blocks, threads_per_task):
    with _task_threads(n_blocks, threads_per_task):
        z = _api.bilinear(v.contiguous(x1, work), v.contiguous(x2, work), weight, bias)
    return v.contiguous(z, dtype)


def _linear_backward_block(grad_out, x, weight, flags, work, dtype, n_blocks, threads_per_task):
    need_bias, need_x, need_weight = flags
    with _task_threads(n_blocks, threads_per_task):
        grad_x, grad_weight, grad_bias = _api.linear_backward(
            v.contiguous(grad_out, work),
            v.contiguous(x, work),
            weight,
            bias=need_bias,
            need_x=need_x,
            need_weight=need_weight,
        )
    # Input gradients in the result dtype now; weight and bias partial sums stay in the
    # compute dtype until the whole sum is done (float16 results are rounded once).
    return (None if grad_x is None else v.contiguous(grad_x, dtype), grad_weight, grad_bias)


def _bilinear_backward_block(
    grad_out, x1, x2, weight, flags, work, dtype, n_blocks, threads_per_task
):
    need_bias, need_x1, need_x2, need_weight = flags
    with _task_threads(n_blocks, threads_per_task):
        grad_x1, grad_x2, grad_weight, grad_bias = _api.bilinear_backward(
            v.contiguous(grad_out, work),
            v.contiguous(x1, work),
            v.contiguous(x2, work),
            weight,
            bias=need_bias,
            need_x1=need_x1,
            need_x2=need_x2,
            need_weight=need_weight,
        )
    return (
        None if grad_x1 is None else v.contiguous(grad_x1, dtype),
        None if grad_x2 is None else v.contiguous(grad_x2, dtype),
        grad_weight,
        grad_bias,
    )


# ----------------------------------------------------------------------------- forward


def linear(
    x: da.Array | ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    threads_per_task: int | None = None,
) -> da.Array:
    """Lazy ``y = x @ weight.T + bias`` over a Dask array (:func:`linmaps.linear` per chunk).

    Parameters
    ----------
    x : dask.array.Array or array_like, shape (..., in_features)
        Chunked along the batch axes (a chunked feature axis is rechunked into one chunk);
        NumPy input is wrapped with Dask's automatic chunks.
    weight : array_like, shape (out_features, in_features)
        One key of the graph, sent to each worker once.
    bias : array_like, shape (out_features,), optional
    threads_per_task : int, optional
        linmaps threads per task; by default the task's share of the cores (module doc).

    Returns
    -------
    y : dask.array.Array, shape (..., out_features)
        ``x``'s batch chunking, one chunk on the last axis; the dtype of :func:`linmaps.linear`.

    Raises
    ------
    ValueError, TypeError
        Those of :func:`linmaps.linear`, raised now, before anything is computed; and a
        ValueError for a Dask array of unknown chunk sizes.
    """
    fname = "linear"
    threads_per_task = _check_threads_per_task(fname, threads_per_task)
    x_in = _stand_in(fname, "input", x)
    w_in = _stand_in(fname, "weight", weight)
    _api._check_linear(fname, x_in, w_in)
    out_features = w_in.shape[0]
    arrays = [x_in, w_in]
    if bias is not None:
        b_in = _stand_in(fname, "bias", bias)
        v.check_bias(fname, b_in, (out_features,), w_in.shape)
        arrays.append(b_in)
    dtype = v.result_dtype(*arrays)
    work = v.compute_dtype(dtype)

    batch = _Batch(fname, [("input", x, x_in, 1)])
    xd = batch.bring("input", x, x_in, 1)
    wd = _one_chunk("weight", weight, w_in, work)
    bd = None if bias is None else _one_chunk("bias", bias, b_in, work)
    name = "linmaps-linear-" + tokenize(
        xd.name, wd.name, None if bd is None else bd.name, dtype, threads_per_task
    )
    layer, x_block = {}, _Blocks(xd)
    for index in batch.indices():
        key = (name, *index, 0)
        layer[key] = Task(
            key,
            _linear_block,
            x_block(index),
            _ref(wd),
            _ref(bd),
            work,
            dtype,
            batch.n_blocks,
            threads_per_task,
        )
    return _array(name, layer, [xd, wd, bd], batch.chunks + ((out_features,),), dtype)


def bilinear(
    x1: da.Array | ArrayLike,
    x2: da.Array | ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    threads_per_task: int | None = None,
) -> da.Array:
    """Lazy ``z[..., l] = x1 @ weight[l] @ x2 + bias[l]`` over Dask arrays
    (:func:`linmaps.bilinear` per chunk).

    Parameters
    ----------
    x1 : dask.array.Array or array_like, shape (..., in1_features)
    x2 : dask.array.Array or array_like, shape (..., in2_features)
        Same batch shape as ``x1``. Batch chunks are aligned to those of the first Dask
        array of ``x1``, ``x2`` (the other is rechunked; NumPy input is wrapped).
    weight : array_like, shape (out_features, in1_features, in2_features) or (in1, in2)
        One key of the graph, sent to each worker once.
    bias : array_like, shape (out_features,) (or () for a 2-D weight), optional
    threads_per_task : int, optional
        linmaps threads per task; by default the task's share of the cores (module doc).

    Returns
    -------
    z : dask.array.Array, shape (..., out_features), or (...) for a 2-D weight
        The batch chunking of the inputs; the dtype of :func:`linmaps.bilinear`.

    Raises
    ------
    ValueError, TypeError
        Those of :func:`linmaps.bilinear`, raised now; and a ValueError for a Dask array of
        unknown chunk sizes.
    """
    fname = "bilinear"
    threads_per_task = _check_threads_per_task(fname, threads_per_task)
    x1_in = _stand_in(fname, "input1", x1)
    x2_in = _stand_in(fname, "input2", x2)
    w_in = _stand_in(fname, "weight", weight)
    _api._check_bilinear(fname, x1_in, x2_in, w_in)
    out_shape = w_in.shape[:-2]
    arrays = [x1_in, x2_in, w_in]
    if bias is not None:
        b_in = _stand_in(fname, "bias", bias)
        v.check_bias(fname, b_in, out_shape, w_in.shape)
        arrays.append(b_in)
    dtype = v.result_dtype(*arrays)
    work = v.compute_dtype(dtype)

    batch = _Batch(fname, [("input1", x1, x1_in, 1), ("input2", x2, x2_in, 1)])
    x1d = batch.bring("input1", x1, x1_in, 1)
    x2d = batch.bring("input2", x2, x2_in, 1)
    wd = _one_chunk("weight", weight, w_in, work)
    bd = None if bias is None else _one_chunk("bias", bias, b_in, work)
    name = "linmaps-bilinear-" + tokenize(
        x1d.name, x2d.name, wd.name, None if bd is None else bd.name, dtype, threads_per_task
    )
    layer, x1_block, x2_block = {}, _Blocks(x1d), _Blocks(x2d)
    for index in batch.indices():
        key = (name, *index, *(0,) * len(out_shape))
        layer[key] = Task(
            key,
            _bilinear_block,
            x1_block(index),
            x2_block(index),
            _ref(wd),
            _ref(bd),
            work,
            dtype,
            batch.n_blocks,
            threads_per_task,
        )
    chunks = batch.chunks + tuple((size,) for size in out_shape)
    return _array(name, layer, [x1d, x2d, wd, bd], chunks, dtype)


# ----------------------------------------------------------------------------- backward


def linear_backward(
    grad_out: da.Array | ArrayLike,
    x: da.Array | ArrayLike,
    weight: ArrayLike,
    *,
    bias: bool = True,
    need_x: bool = True,
    need_weight: bool = True,
    split_every: int | None = None,
    threads_per_task: int | None = None,
) -> LinearGrads:
    """Lazy gradients of ``y = x @ weight.T + bias`` (:func:`linmaps.linear_backward`).

    ``grad_x`` is computed chunk by chunk; ``grad_weight`` and ``grad_bias`` are the per-chunk
    partial sums added in a fixed tree (module doc). One task per chunk computes all three:
    compute the gradients together (``dask.compute(*grads)``) so each chunk is read once.

    Parameters
    ----------
    grad_out : dask.array.Array or array_like, shape (..., out_features)
    x : dask.array.Array or array_like, shape (..., in_features)
        Batch chunks are aligned to those of the first Dask array of ``x``, ``grad_out``.
    weight : array_like, shape (out_features, in_features)
    bias : bool, default True
        Whether to compute ``grad_bias``.
    need_x, need_weight : bool, default True
        Whether to compute ``grad_x`` / ``grad_weight`` (None when not).
    split_every : int, optional
        Children per node of the sum tree (default: Dask's ``split_every`` setting, else 4).
    threads_per_task : int, optional
        linmaps threads per task; by default the task's share of the cores.

    Returns
    -------
    LinearGrads
        Dask arrays ``(grad_x (..., in_features), grad_weight (out_features, in_features),
        grad_bias (out_features,))``, each None when not requested. ``grad_x`` has the
        batch chunking; the others are one chunk.
    """
    fname = "linear_backward"
    need_bias = v.check_flag(fname, "bias", bias)
    need_x = v.check_flag(fname, "need_x", need_x)
    need_weight = v.check_flag(fname, "need_weight", need_weight)
    split_every = _check_split_every(fname, split_every)
    threads_per_task = _check_threads_per_task(fname, threads_per_task)
    g_in = _stand_in(fname, "grad_out", grad_out)
    x_in = _stand_in(fname, "input", x)
    w_in = _stand_in(fname, "weight", weight)
    _api._check_linear(fname, x_in, w_in)
    out_features, in_features = w_in.shape
    v.check_grad_out(
        fname, g_in, x_in.shape[:-1] + (out_features,), _api._shapes(input=x_in, weight=w_in)
    )
    dtype = v.result_dtype(g_in, x_in, w_in)
    work = v.compute_dtype(dtype)

    batch = _Batch(fname, [("input", x, x_in, 1), ("grad_out", grad_out, g_in, 1)])
    xd = batch.bring("input", x, x_in, 1)
    gd = batch.bring("grad_out", grad_out, g_in, 1)
    wd = _one_chunk("weight", weight, w_in, work)
    flags = (need_bias, need_x, need_weight)
    token = tokenize(gd.name, xd.name, wd.name, flags, dtype, split_every, threads_per_task)
    parts_name = "linmaps-linear-backward-" + token
    layer, g_block, x_block = {}, _Blocks(gd), _Blocks(xd)
    for index in batch.indices():
        key = (parts_name, *index)
        layer[key] = Task(
            key,
            _linear_backward_block,
            g_block(index),
            x_block(index),
            _ref(wd),
            flags,
            work,
            dtype,
            batch.n_blocks,
            threads_per_task,
        )
    parts_graph = HighLevelGraph.from_collections(parts_name, layer, dependencies=[gd, xd, wd])
    grads = _gradients(
        parts_graph,
        parts_name,
        token,
        batch,
        dtype,
        split_every,
        [
            (need_x, "grad-x", (in_features,), False),
            (need_weight, "grad-weight", w_in.shape, True),
            (need_bias, "grad-bias", (out_features,), True),
        ],
    )
    return LinearGrads(*grads)


def bilinear_backward(
    grad_out: da.Array | ArrayLike,
    x1: da.Array | ArrayLike,
    x2: da.Array | ArrayLike,
    weight: ArrayLike,
    *,
    bias: bool = True,
    need_x1: bool = True,
    need_x2: bool = True,
    need_weight: bool = True,
    split_every: int | None = None,
    threads_per_task: int | None = None,
) -> BilinearGrads:
    """Lazy gradients of a bilinear map (:func:`linmaps.bilinear_backward`).

    ``grad_x1`` and ``grad_x2`` are computed chunk by chunk; ``grad_weight`` and ``grad_bias``
    are the per-chunk partial sums added in a fixed tree (module doc). One task per chunk
    computes them all: compute them together (``dask.compute(*grads)``).

    Parameters
    ----------
    grad_out : dask.array.Array or array_like, shape (..., out_features), or (...) for a 2-D
        weight
    x1 : dask.array.Array or array_like, shape (..., in1_features)
    x2 : dask.array.Array or array_like, shape (..., in2_features)
        Batch chunks are aligned to those of the first Dask array of ``x1``, ``x2``,
        ``grad_out``.
    weight : array_like, shape (out_features, in1_features, in2_features) or (in1, in2)
    bias : bool, default True
        Whether to compute ``grad_bias``.
    need_x1, need_x2, need_weight : bool, default True
        Whether to compute each gradient (None when not).
    split_every : int, optional
        Children per node of the sum tree (default: Dask's ``split_every`` setting, else 4).
    threads_per_task : int, optional
        linmaps threads per task; by default the task's share of the cores.

    Returns
    -------
    BilinearGrads
        Dask arrays ``(grad_x1, grad_x2, grad_weight, grad_bias)`` shaped like ``x1``, ``x2``,
        ``weight`` and ``weight.shape[:-2]``, each None when not requested.
    """
    fname = "bilinear_backward"
    need_bias = v.check_flag(fname, "bias", bias)
    need_x1 = v.check_flag(fname, "need_x1", need_x1)
    need_x2 = v.check_flag(fname, "need_x2", need_x2)
    need_weight = v.check_flag(fname, "need_weight", need_weight)
    split_every = _check_split_every(fname, split_every)
    threads_per_task = _check_threads_per_task(fname, threads_per_task)
    g_in = _stand_in(fname, "grad_out", grad_out)
    x1_in = _stand_in(fname, "input1", x1)
    x2_in = _stand_in(fname, "input2", x2)
    w_in = _stand_in(fname, "weight", weight)
    _api._check_bilinear(fname, x1_in, x2_in, w_in)
    out_shape = w_in.shape[:-2]
    v.check_grad_out(
        fname,
        g_in,
        x1_in.shape[:-1] + out_shape,
        _api._shapes(input1=x1_in, input2=x2_in, weight=w_in),
    )
    dtype = v.result_dtype(g_in, x1_in, x2_in, w_in)
    work = v.compute_dtype(dtype)

    out_ndim = len(out_shape)
    batch = _Batch(
        fname,
        [
            ("input1", x1, x1_in, 1),
            ("input2", x2, x2_in, 1),
            ("grad_out", grad_out, g_in, out_ndim),
        ],
    )
    x1d = batch.bring("input1", x1, x1_in, 1)
    x2d = batch.bring("input2", x2, x2_in, 1)
    gd = batch.bring("grad_out", grad_out, g_in, out_ndim)
    wd = _one_chunk("weight", weight, w_in, work)
    flags = (need_bias, need_x1, need_x2, need_weight)
    token = tokenize(
        gd.name, x1d.name, x2d.name, wd.name, flags, dtype, split_every, threads_per_task
    )
    parts_name = "linmaps-bilinear-backward-" + token
    layer, g_block, x1_block, x2_block = {}, _Blocks(gd), _Blocks(x1d), _Blocks(x2d)
    for index in batch.indices():
        key = (parts_name, *index)
        layer[key] = Task(
            key,
            _bilinear_backward_block,
            g_block(index),
            x1_block(index),
            x2_block(index),
            _ref(wd),
            flags,
            work,
            dtype,
            batch.n_blocks,
            threads_per_task,
        )
    parts_graph = HighLevelGraph.from_collections(
        parts_name, layer, dependencies=[gd, x1d, x2d, wd]
    )
    grads = _gradients(
        parts_graph,
        parts_name,
        token,
        batch,
        dtype,
        split_every,
        [
            (need_x1, "grad-x1", x1_in.shape[-1:], False),
            (need_x2, "grad-x2", x2_in.shape[-1:], False),
            (need_weight, "grad-weight", w_in.shape, True),
            (need_bias, "grad-bias", out_shape, True),
        ],
    )
    return BilinearGrads(*grads)


def _gradients(parts_graph, parts_name, token, batch, dtype, split_every, specs):
    """The lazy gradients read from the per-chunk tasks' tuples: ``specs`` has one
    ``(wanted, name, shape, summed)`` per element of the tuple, in order; an input gradient
    (``summed`` False) is batch-chunked, a parameter gradient the tree sum of the chunks'
    parts. None where not wanted."""
    grads = []
    for position, (wanted, name, shape, summed) in enumerate(specs):
        key = f"linmaps-{name}-{token}"
        if not wanted:
            grads.append(None)
        elif summed:
            grads.append(
                _summed(key, parts_graph, parts_name, batch, position, shape, dtype, split_every)
            )
        else:
            grads.append(_pick_blocks(key, parts_graph, parts_name, batch, position, shape, dtype))
    return grads


def _pick_blocks(name, parts_graph, parts_name, batch, position, feature_shape, dtype):
    """The input gradient: element ``position`` of every block's tuple, batch-chunked."""
    layer = {}
    for index in batch.indices():
        key = (name, *index, *(0,) * len(feature_shape))
        layer[key] = Task(key, _pick, TaskRef((parts_name, *index)), position)
    graph = _with_layer(parts_graph, name, layer, parts_name)
    chunks = batch.chunks + tuple((size,) for size in feature_shape)
    return da.Array(graph, name, chunks, meta=np.empty((0,) * len(chunks), dtype=dtype))


def _summed(name, parts_graph, parts_name, batch, position, shape, dtype, split_every):
    """A weight or bias gradient: the fixed-order tree sum of the per-block partials."""
    layer = _tree_sum(name, parts_name, batch, position, shape, dtype, split_every)
    graph = _with_layer(parts_graph, name, layer, parts_name)
    chunks = tuple((size,) for size in shape)
    return da.Array(graph, name, chunks, meta=np.empty((0,) * len(shape), dtype=dtype))


def _with_layer(graph, name, layer, dependency):
    layers = dict(graph.layers)
    dependencies = dict(graph.dependencies)
    layers[name] = layer
    dependencies[name] = {dependency}
    return HighLevelGraph(layers, dependencies)


# ----------------------------------------------------------------------------- .npy files


class _NpyRows:
    """A read-only array-like over an ``.npy`` file whose slices are read from disk when
    asked for: each is a view of a fresh read-only memory map of the file, so the pages are
    read (from the page cache or the disk) as the computation touches them, without a copy,
    and the mapping goes when the chunk does.

    ``da.from_array`` copies an ``np.memmap`` (an ndarray) into memory whole; this object
    is not an ndarray, so Dask calls ``__getitem__`` per chunk instead.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        mapped = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = mapped.shape, mapped.dtype, mapped.ndim

    def __getitem__(self, index):
        return np.asarray(np.load(self.path, mmap_mode="r")[index])


def from_npy(path: str | os.PathLike, chunks: Any = "auto") -> da.Array:
    """A Dask array reading an ``.npy`` file chunk by chunk, never whole.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npy`` file (``np.save``, ``np.lib.format.open_memmap``).
    chunks : Dask chunks, default "auto"
        As for ``dask.array.from_array``; for linmaps, chunk only the batch axes, e.g.
        ``(100_000, -1)``.

    Returns
    -------
    dask.array.Array
        Each task maps the file and reads only its slice, so a worker holds only its
        chunks; every worker must see the file at ``path`` (one machine or a shared file
        system).
    """
    reader = _NpyRows(path)
    status = os.stat(reader.path)
    chunks = da.core.normalize_chunks(chunks, reader.shape, dtype=reader.dtype)
    name = "linmaps-npy-" + tokenize(reader.path, status.st_mtime_ns, status.st_size, chunks)
    meta = np.empty((0,) * reader.ndim, dtype=reader.dtype)
    return da.from_array(reader, chunks=chunks, name=name, meta=meta)


class _NpyWriter:
    """``target[index] = block`` for ``da.store``: opens the ``.npy`` file per block."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __setitem__(self, index, block):
        mapped = np.load(self.path, mmap_mode="r+")
        mapped[index] = block
        mapped.flush()
        del mapped


def _files_read(array) -> set:
    """The files that computing ``array`` reads while it runs: those of the ``from_npy``
    readers in its graph, and of any memory map still backed by its file."""
    files = set()
    for value in array.__dask_graph__().values():
        value = getattr(value, "value", value)  # a literal wrapped in a task-spec node
        if isinstance(value, _NpyRows):
            files.add(value.path)
        elif isinstance(value, np.memmap) and value.filename is not None:
            files.add(value.filename)
    return files


def to_npy(
    array: da.Array, path: str | os.PathLike, *, compute: bool = True, **store_kwargs: Any
) -> Any:
    """Write a Dask array to an ``.npy`` file chunk by chunk, never holding it whole.

    The file is created with the array's shape and dtype, then each task writes its chunk
    into it through a memory map. Every worker must see the same file (one machine or a
    shared file system with coherent memory maps; on a cluster prefer ``da.to_zarr``).

    Parameters
    ----------
    array : dask.array.Array
    path : str or os.PathLike
    compute : bool, default True
        As for ``dask.array.store``: False returns a Delayed to compute later.
    **store_kwargs
        Passed on to ``dask.array.store`` (e.g. ``scheduler=``).

    Returns
    -------
    None, or the Delayed of ``dask.array.store`` when ``compute=False``.
    """
    if any(math.isnan(size) for size in array.shape):
        raise ValueError(
            f"to_npy(): the array has unknown chunk sizes (shape {array.shape}); call "
            "array.compute_chunk_sizes() first"
        )
    path = os.fspath(path)
    for source in _files_read(array):
        if os.path.exists(path) and os.path.samefile(source, path):
            raise ValueError(
                f"to_npy(): cannot write to {path!r}: the array is computed from that file "
                f"(read from {source!r}), which writing would overwrite before it is read; "
                "write to another file (and rename it afterwards)"
            )
    created = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    del created  # the header is written; the data is a sparse file until the tasks fill it
    return da.store(array, _NpyWriter(path), lock=False, compute=compute, **store_kwargs)
