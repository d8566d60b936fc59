"""Concurrent calls from several Python threads give the same results as serial calls."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

import linmaps


def test_concurrent_calls_match_serial_results(backend):
    rng = np.random.default_rng(11)
    jobs = []
    for i in range(16):
        n, m, k, out = 64 + i, 24, 20, 6
        jobs.append(
            (
                rng.standard_normal((n, m)),
                rng.standard_normal((n, k)),
                rng.standard_normal((out, m, k)),
                rng.standard_normal(out),
                rng.standard_normal((n, out)),
            )
        )

    def run(job):
        x1, x2, w, b, g = job
        # use_backend is per thread: each worker selects the backend under test itself
        with linmaps.use_backend(backend):
            z = linmaps.bilinear(x1, x2, w, b)
            grads = linmaps.bilinear_backward(g, x1, x2, w)
            y = linmaps.linear(x1, w[:, :, 0], b)
            lgrads = linmaps.linear_backward(g, x1, w[:, :, 0])
        return [z, *grads, y, *lgrads]

    serial = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, jobs * 3))
    for got, want in zip(concurrent, serial * 3):
        for a, c in zip(got, want):
            np.testing.assert_array_equal(a, c)
