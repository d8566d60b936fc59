"""Score a large on-disk table of (user, item) pairs with a bilinear map on Dask, chunk by
chunk, and write the scores back to disk.

    python examples/dask_score_pairs.py                        # 2M pairs, threaded scheduler
    python examples/dask_score_pairs.py --rows 20000000 --cluster 2   # a 2-process LocalCluster
    python examples/dask_score_pairs.py --scheduler tcp://10.0.0.5:8786  # a running cluster

The table is two ``.npy`` files of feature rows, ``users.npy (rows, in1)`` and
``items.npy (rows, in2)``, row ``k`` being the ``k``-th pair; they are created first (block by
block) if absent. ``scores.npy (rows, out)`` gets ``z[k, l] = users[k] @ A_l @ items[k] + b_l``.
No process ever holds a whole file: each task reads its rows, scores them and writes them.
The script checks a few chunks against the in-memory ``linmaps.bilinear`` and exits with
status 1 if they differ. With ``--scheduler ADDRESS``, every worker must see ``--dir``.
Needs ``pip install "linmaps[dask]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import linmaps
import linmaps.dask as ldk


def write_table(path, rows, features, seed, block=1_000_000):
    """A float32 .npy file of normal samples, written block by block."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, features))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        out[start:stop] = rng.standard_normal((stop - start, features), dtype=np.float32)
    out.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--in1", type=int, default=64)
    parser.add_argument("--in2", type=int, default=64)
    parser.add_argument("--out", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=250_000, help="rows per task")
    parser.add_argument("--dir", default="pairs-data", help="where the .npy files live")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cluster", type=int, metavar="WORKERS", help="start a LocalCluster")
    group.add_argument("--scheduler", metavar="ADDRESS", help="connect to a running cluster")
    args = parser.parse_args(argv)

    os.makedirs(args.dir, exist_ok=True)
    users_path = os.path.join(args.dir, "users.npy")
    items_path = os.path.join(args.dir, "items.npy")
    scores_path = os.path.join(args.dir, "scores.npy")
    for path, features, seed in ((users_path, args.in1, 1), (items_path, args.in2, 2)):
        if not os.path.exists(path) or np.load(path, mmap_mode="r").shape != (args.rows, features):
            write_table(path, args.rows, features, seed)

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((args.out, args.in1, args.in2)).astype(np.float32)
    weight /= np.sqrt(args.in1 * args.in2)
    bias = rng.standard_normal(args.out).astype(np.float32)

    client = cluster = None
    if args.cluster or args.scheduler:
        from distributed import Client, LocalCluster

        if args.cluster:
            cluster = LocalCluster(
                n_workers=args.cluster, threads_per_worker=1, dashboard_address=":0"
            )
        client = Client(cluster if cluster is not None else args.scheduler)
    try:
        users = ldk.from_npy(users_path, chunks=(args.chunk, -1))
        items = ldk.from_npy(items_path, chunks=(args.chunk, -1))
        scores = ldk.bilinear(users, items, weight, bias)  # lazy, chunked like users
        start = time.perf_counter()
        ldk.to_npy(scores, scores_path)  # runs on the client's cluster, if any
        seconds = time.perf_counter() - start
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    where = (
        "threaded scheduler"
        if client is None
        else f"{args.cluster}-worker LocalCluster"
        if args.cluster
        else f"cluster at {args.scheduler}"
    )
    print(
        f"scored {args.rows:,} pairs ({args.in1}x{args.in2} -> {args.out}) in {seconds:.2f} s "
        f"({args.rows / seconds / 1e6:.2f} M rows/s) on the {where}; "
        f"{users.numblocks[0]} chunks -> {scores_path}"
    )

    # Check the first, a middle and the last chunk against the in-memory function.
    written = np.load(scores_path, mmap_mode="r")
    table = np.load(users_path, mmap_mode="r"), np.load(items_path, mmap_mode="r")
    last = args.rows - users.chunks[0][-1]
    for start in sorted({0, (args.rows // 2) // args.chunk * args.chunk, last}):
        block = slice(start, min(args.rows, start + args.chunk))
        expected = linmaps.bilinear(table[0][block], table[1][block], weight, bias)
        if not np.array_equal(written[block], expected):
            print(f"rows {block.start}:{block.stop} differ from linmaps.bilinear", file=sys.stderr)
            return 1
    print("checked the first, a middle and the last chunk against linmaps.bilinear: equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
