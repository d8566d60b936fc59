"""linmaps threads inside Dask tasks on the threaded scheduler (docs/dask.md, "Threads").

Rows/s of a bilinear forward and backward (N x 64 x 64 -> 16, float32, in memory) through
``linmaps.dask`` on the threaded scheduler, for the thread settings a task could use:

* ``share``: the default, ``get_num_threads() // min(chunks, tasks at once)`` per task;
* ``full``: every task a full team (``threads_per_task=get_num_threads()``), so tasks x
  threads exceeds the cores when several tasks run at once;
* ``one``: one thread per task;

for many chunks and for one chunk, each timed alternately with the in-memory call on the whole
batch (the ratio is dask / in-memory rows/s).

    python bench/studies/dask_threads.py [N] [reps]
"""

import sys

import dask
import dask.array as da
import numpy as np
from _timing import samples_s

import linmaps
import linmaps.dask as ldk

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
IN1 = IN2 = 64
L = 16


def interleaved_best(f_memory, f_dask, reps):
    """Best seconds of each, the two calls alternating (a busy machine drifts; alternating
    exposes both to the same drift). One untimed call of each first."""
    f_memory()
    f_dask()
    memory, chunked = [], []
    for _ in range(reps):
        memory.append(samples_s(f_memory, 1, warmup=0)[0])
        chunked.append(samples_s(f_dask, 1, warmup=0)[0])
    return min(memory), min(chunked)


def main():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((N, IN1), dtype=np.float32)
    x2 = rng.standard_normal((N, IN2), dtype=np.float32)
    w = rng.standard_normal((L, IN1, IN2), dtype=np.float32) / 64
    g = rng.standard_normal((N, L), dtype=np.float32)
    total = linmaps.get_num_threads()
    print(
        f"N={N} {IN1}x{IN2}->{L} float32, linmaps threads {total}, "
        f"Dask threaded pool {dask.system.CPU_COUNT}, best of {REPS}, "
        "each against the in-memory call on the whole batch, alternating"
    )
    fwd_memory = lambda: linmaps.bilinear(x1, x2, w)  # noqa: E731
    bwd_memory = lambda: linmaps.bilinear_backward(g, x1, x2, w, bias=False)  # noqa: E731
    for n_chunks in (16, 1):
        rows = -(-N // n_chunks)
        x1d = da.from_array(x1, chunks=(rows, -1))
        x2d = da.from_array(x2, chunks=(rows, -1))
        gd = da.from_array(g, chunks=(rows, -1))
        for policy, per_task in (("share", None), ("full", total), ("one", 1)):
            z = ldk.bilinear(x1d, x2d, w, threads_per_task=per_task)
            grads = ldk.bilinear_backward(gd, x1d, x2d, w, bias=False, threads_per_task=per_task)
            fm, fd = interleaved_best(fwd_memory, lambda: z.compute(scheduler="threads"), REPS)
            bm, bd = interleaved_best(
                bwd_memory, lambda: dask.compute(*grads, scheduler="threads"), REPS
            )
            label = f"{n_chunks} chunks, {policy}"
            print(
                f"{label:>18}: fwd {N / fd / 1e6:5.2f} M rows/s ({fm / fd:4.2f} of "
                f"{N / fm / 1e6:5.2f})   bwd {N / bd / 1e6:5.2f} M rows/s ({bm / bd:4.2f} of "
                f"{N / bm / 1e6:5.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
