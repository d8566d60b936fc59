"""dtype promotion, memory layouts, zero-sized dimensions, IEEE specials, input immutability."""

import pickle

import numpy as np
import pytest

import linmaps

import reference as ref

rng = np.random.default_rng(7)


def bilinear_args(n=5, m=4, k=3, out=2):
    return (
        rng.standard_normal((n, m)),
        rng.standard_normal((n, k)),
        rng.standard_normal((out, m, k)),
        rng.standard_normal(out),
    )


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((np.float32, np.float32, np.float32, np.float32), np.float32),
        ((np.float64, np.float64, np.float64, np.float64), np.float64),
        ((np.float32, np.float64, np.float32, np.float32), np.float64),
        ((np.float32, np.float32, np.float32, np.float64), np.float64),
        ((np.int64, np.float32, np.float32, np.float32), np.float64),
        ((np.float32, np.bool_, np.float32, np.float32), np.float64),
        ((np.int8, np.uint16, np.int32, np.bool_), np.float64),
        ((np.float16, np.float16, np.float16, np.float16), np.float16),
        ((np.float16, np.float32, np.float16, np.float16), np.float32),
    ],
)
def test_dtype_promotion(backend, dtypes, expected):
    x1, x2, w, b = (a.astype(t) for a, t in zip(bilinear_args(), dtypes))
    z = linmaps.bilinear(x1, x2, w, b)
    assert z.dtype == expected
    compute = np.float32 if expected == np.float16 else expected
    ref.assert_close(z, ref.bilinear(x1, x2, w, b), 13, compute, expected)
    grads = linmaps.bilinear_backward(z, x1, x2, w)
    assert {g.dtype for g in grads} == {np.dtype(expected)}
    exp = ref.bilinear_grads(z, x1, x2, w)
    for got, want, terms in zip(grads, exp, (6, 8, 5, 5)):
        ref.assert_close(got, want, terms, compute, expected)

    x, wl, bl = x1, w[:, :, 0], b
    y = linmaps.linear(x, wl, bl)
    lin_expected = np.result_type(
        *[np.float64 if a.dtype.kind in "biu" else a.dtype for a in (x, wl, bl)]
    )
    assert y.dtype == lin_expected
    assert {g.dtype for g in linmaps.linear_backward(y, x, wl)} == {np.dtype(lin_expected)}


def layouts(a):
    """The same values in other memory layouts: Fortran order, strided, reversed, read-only."""
    fortran = np.asfortranarray(a)
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    strided = wide[..., ::2]
    flipped = np.flip(a, axis=0).copy()[::-1]
    readonly = a.copy()
    readonly.flags.writeable = False
    return {"fortran": fortran, "strided": strided, "negative": flipped, "readonly": readonly}


@pytest.mark.parametrize("layout", ["fortran", "strided", "negative", "readonly"])
def test_layouts_give_the_contiguous_result(backend, layout):
    x1, x2, w, b = bilinear_args(6, 5, 4, 3)
    g = rng.standard_normal((6, 3))
    z = linmaps.bilinear(x1, x2, w, b)
    grads = linmaps.bilinear_backward(g, x1, x2, w)
    z2 = linmaps.bilinear(
        layouts(x1)[layout], layouts(x2)[layout], layouts(w)[layout], layouts(b)[layout]
    )
    np.testing.assert_array_equal(z2, z)
    grads2 = linmaps.bilinear_backward(
        layouts(g)[layout], layouts(x1)[layout], layouts(x2)[layout], layouts(w)[layout]
    )
    for a, c in zip(grads2, grads):
        np.testing.assert_array_equal(a, c)

    wl = w[:, :, 0].copy()
    y = linmaps.linear(x1, wl, b)
    np.testing.assert_array_equal(
        linmaps.linear(layouts(x1)[layout], layouts(wl)[layout], layouts(b)[layout]), y
    )
    lg = linmaps.linear_backward(g, x1, wl)
    lg2 = linmaps.linear_backward(layouts(g)[layout], layouts(x1)[layout], layouts(wl)[layout])
    for a, c in zip(lg2, lg):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize(
    ("n", "m", "k", "out"),
    [(0, 3, 4, 2), (5, 0, 4, 2), (5, 3, 0, 2), (5, 3, 4, 0), (0, 0, 0, 0)],
)
def test_zero_sized_dimensions(backend, n, m, k, out):
    x1, x2 = rng.standard_normal((n, m)), rng.standard_normal((n, k))
    w, b, g = rng.standard_normal((out, m, k)), rng.standard_normal(out), np.ones((n, out))
    z = linmaps.bilinear(x1, x2, w, b)
    assert z.shape == (n, out)
    np.testing.assert_array_equal(z, np.broadcast_to(b, (n, out)) if m * k == 0 else z)
    gx1, gx2, gw, gb = linmaps.bilinear_backward(g, x1, x2, w)
    assert (gx1.shape, gx2.shape, gw.shape, gb.shape) == ((n, m), (n, k), (out, m, k), (out,))
    if n == 0:
        np.testing.assert_array_equal(gw, 0)
        np.testing.assert_array_equal(gb, 0)
    if out == 0 or k == 0:
        np.testing.assert_array_equal(gx1, 0)
    if out == 0 or m == 0:
        np.testing.assert_array_equal(gx2, 0)

    wl = rng.standard_normal((out, m))
    y = linmaps.linear(x1, wl, b)
    assert y.shape == (n, out)
    if m == 0:
        np.testing.assert_array_equal(y, np.broadcast_to(b, (n, out)))
    gx, gwl, gbl = linmaps.linear_backward(g, x1, wl)
    assert (gx.shape, gwl.shape, gbl.shape) == ((n, m), (out, m), (out,))
    if n == 0:
        np.testing.assert_array_equal(gwl, 0)
    if out == 0:
        np.testing.assert_array_equal(gx, 0)


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_propagate(backend, special, dtype):
    x1, x2, w, b = (a.astype(dtype) for a in bilinear_args(4, 3, 3, 2))
    g = rng.standard_normal((4, 2)).astype(dtype)
    x1[1, 2] = special
    w[1, 0, 0] = special
    ref.assert_close(linmaps.bilinear(x1, x2, w, b), ref.bilinear(x1, x2, w, b), 10, dtype)
    exp = ref.bilinear_grads(g, x1, x2, w)
    for got, want, terms in zip(linmaps.bilinear_backward(g, x1, x2, w), exp, (6, 6, 4, 4)):
        ref.assert_close(got, want, terms, dtype)

    wl = w[:, :, 0].copy()
    ref.assert_close(linmaps.linear(x1, wl, b), ref.linear(x1, wl, b), 4, dtype)
    exp = ref.linear_grads(g, x1, wl)
    for got, want, terms in zip(linmaps.linear_backward(g, x1, wl), exp, (2, 4, 4)):
        ref.assert_close(got, want, terms, dtype)


def test_inputs_are_never_modified(backend):
    x1, x2, w, b = bilinear_args()
    g = rng.standard_normal((5, 2))
    arrays = [x1, x2, w, b, g]
    before = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = False  # any write attempt would raise
    linmaps.bilinear(x1, x2, w, b)
    linmaps.bilinear_backward(g, x1, x2, w)
    linmaps.linear(x1, w[:, :, 0], b)
    linmaps.linear_backward(g, x1, w[:, :, 0])
    # float32 inputs are used without a copy: check them too
    f32 = [a.astype(np.float32) for a in arrays]
    f32_before = [a.copy() for a in f32]
    linmaps.bilinear(*f32[:4])
    linmaps.bilinear_backward(f32[4], *f32[:3])
    for a, c in zip(arrays + f32, before + f32_before):
        np.testing.assert_array_equal(a, c)


def test_leading_batch_dimensions(backend):
    x1, x2 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 5))
    w, b = rng.standard_normal((6, 4, 5)), rng.standard_normal(6)
    z = linmaps.bilinear(x1, x2, w, b)
    assert z.shape == (2, 3, 6)
    flat = linmaps.bilinear(x1.reshape(6, 4), x2.reshape(6, 5), w, b)
    np.testing.assert_array_equal(z.reshape(6, 6), flat)
    g = rng.standard_normal((2, 3, 6))
    grads = linmaps.bilinear_backward(g, x1, x2, w)
    assert [a.shape for a in grads] == [(2, 3, 4), (2, 3, 5), (6, 4, 5), (6,)]
    flat_grads = linmaps.bilinear_backward(g.reshape(6, 6), x1.reshape(6, 4), x2.reshape(6, 5), w)
    for a, c in zip(grads, flat_grads):
        np.testing.assert_array_equal(a.reshape(c.shape), c)


def test_lists_are_accepted(backend):
    y = linmaps.linear([[1.0, 2.0]], [[3.0, 4.0]], [0.5])
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, [[11.5]])


def at_offset(a, offset):
    """A copy of ``a`` starting ``offset`` elements past a 64-byte boundary."""
    buffer = np.empty(a.size + 64, a.dtype)
    start = (-buffer.ctypes.data % 64) // a.itemsize + offset
    view = buffer[start : start + a.size].reshape(a.shape)
    view[...] = a
    return view


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 4, 3), (3, 2, 2), (1, 5, 7), (37, 19, 11)])
def test_results_do_not_depend_on_memory_alignment(backend, dtype, shape):
    # Vectorised code that peels elements until an aligned address would make the bits of a
    # result depend on where NumPy happened to allocate the arrays: inputs and outputs. The
    # inputs are placed at every offset; the outputs, which NumPy allocates inside the call,
    # land elsewhere on each trial because arrays of varying sizes are kept alive in between.
    n, m, k = shape
    x1, x2, w, b = (a.astype(dtype) for a in bilinear_args(n, m, k, 3))
    g = rng.standard_normal((n, 3)).astype(dtype)
    wl, bl = rng.standard_normal((k, m)).astype(dtype), rng.standard_normal(k).astype(dtype)
    gl = rng.standard_normal((n, k)).astype(dtype)

    def results(offset):
        a = [at_offset(v, offset) for v in (x1, x2, w, b, g, wl, bl, gl)]
        return [
            linmaps.bilinear(a[0], a[1], a[2], a[3]),
            *linmaps.bilinear_backward(a[4], a[0], a[1], a[2]),
            linmaps.linear(a[0], a[5], a[6]),
            *linmaps.linear_backward(a[7], a[0], a[5]),
        ]

    aligned = results(0)
    keep_alive = []
    for trial in range(1, 33):
        keep_alive.append(np.empty(trial % 7 + 1, dtype))
        for got, want in zip(results(trial % 8), aligned):
            np.testing.assert_array_equal(got, want)


def all_four(x1, x2, w, b, g, wl, gl):
    """Every public function's results on one set of arguments, as a flat list."""
    return [
        linmaps.bilinear(x1, x2, w, b),
        *linmaps.bilinear_backward(g, x1, x2, w),
        linmaps.linear(x1, wl, b),
        *linmaps.linear_backward(gl, x1, wl),
    ]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_any_byte_order_gives_native_results(backend, dtype):
    # Arrays in the other byte order (big-endian on x86, e.g. read from a file written on
    # another machine) are computed in native order: the same values as native arrays, bit
    # for bit, in the native dtype.
    x1, x2, w, b = (a.astype(dtype) for a in bilinear_args(5, 4, 3, 2))
    g = rng.standard_normal((5, 2)).astype(dtype)
    wl, gl = w[:, :, 0].copy(), g.copy()
    native = [x1, x2, w, b, g, wl, gl]
    swapped = [a.astype(a.dtype.newbyteorder("S")) for a in native]
    assert all(not a.dtype.isnative for a in swapped)
    expected = all_four(*native)
    assert all(e.dtype == np.dtype(dtype) for e in expected)
    # All swapped, and swapped mixed with native arguments.
    mixed = [s if i % 2 else a for i, (a, s) in enumerate(zip(native, swapped))]
    for args in (swapped, mixed):
        for got, want in zip(all_four(*args), expected):
            assert got.dtype == np.dtype(dtype) and got.dtype.isnative, got.dtype
            np.testing.assert_array_equal(got, want)
    for a, s in zip(native, swapped):  # the inputs were not byte-swapped in place
        np.testing.assert_array_equal(s, a)


@pytest.mark.parametrize("errors", ["default", "raise"])
def test_float16_results_out_of_range_are_inf_without_a_warning(backend, errors):
    # float16 is computed in float32 and rounded once; that rounding overflows to inf (and
    # underflows to zero) silently, as float32 and float64 arithmetic does, under any
    # numpy.errstate. (pytest turns a warning into an error here: pyproject.toml.)
    big, tiny = 256.0, 2.0**-13  # 256**2 = 65536 rounds to inf; (2**-13)**2 = 2**-26 to 0
    x1 = np.array([[big, 0.0], [tiny, 0.0]], np.float16)
    x2 = np.array([[1.0, 0.0], [1.0, 0.0]], np.float16)
    wl = np.array([[big, 0.0], [-big, 0.0]], np.float16)
    args = [x1, x2, np.stack([wl, wl]), np.zeros(2, np.float16), x1, wl, x1]
    with np.errstate(all="raise") if errors == "raise" else np.errstate():
        results = all_four(*args)
        y_tiny = linmaps.linear(x1, wl * np.float16(tiny / big))
    np.testing.assert_array_equal(results[5][0], [np.inf, -np.inf])  # linear: x1[0] @ wl.T
    np.testing.assert_array_equal(y_tiny[1], [0.0, -0.0])
    # Every result is the float32 computation rounded to float16: inf of the right sign
    # beyond float16's range, the rounded float32 value elsewhere.
    with np.errstate(all="ignore"):
        expected = [r.astype(np.float16) for r in all_four(*[a.astype(np.float32) for a in args])]
    for got, want in zip(results, expected):
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, want)
    # Each function overflowed somewhere (only the bias gradients are in range).
    overflowed = [bool(np.isinf(r).any()) for r in results]
    assert overflowed == [True, True, True, True, False, True, True, True, False]


# ----------------------------------------------------------------------------- unaligned data


def through_pickle_unaligned(obj):
    """``obj`` pickled with its arrays' data out of band and unpickled from buffers that start
    one byte past an aligned address: arrays whose data is not aligned to their element size,
    as a dask.distributed worker gets them from the network (or ``np.frombuffer`` at an odd
    offset gives them)."""
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    moved = []
    for buffer in buffers:
        raw = buffer.raw()
        shifted = bytearray(raw.nbytes + 1)
        shifted[1:] = raw
        moved.append(memoryview(shifted)[1:])
    return pickle.loads(data, buffers=moved)


def unaligned(a):
    u = through_pickle_unaligned(a)
    assert not u.flags.aligned and u.flags.c_contiguous and u.flags.writeable
    np.testing.assert_array_equal(u, a)
    return u


def every_function(x1, x2, w, b, g, x, wl, bl, gl):
    """The results of every public function, the context ones included, as a flat list."""
    z, ctx = linmaps.bilinear_with_context(x1, x2, w, b)
    return [
        linmaps.bilinear(x1, x2, w, b),
        *linmaps.bilinear_backward(g, x1, x2, w),
        z,
        *linmaps.bilinear_backward(g, context=ctx),
        linmaps.linear(x, wl, bl),
        *linmaps.linear_backward(gl, x, wl),
    ]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_unaligned_arrays_give_the_aligned_result(backend, dtype):
    # The compiled kernels never see unaligned data (reading it is undefined behaviour): such
    # arrays are copied, and the result is bit for bit that of aligned arrays. Every argument
    # unaligned at once, then each alone (the compiled fast paths check the arguments in turn).
    # Shapes large enough for threads and for the linear map's shared packed operand; the
    # linear input has a leading batch dimension.
    x1, x2, w, b = (a.astype(dtype) for a in bilinear_args(300, 12, 10, 6))
    g = rng.standard_normal((300, 6)).astype(dtype)
    x = rng.standard_normal((2, 150, 40)).astype(dtype)
    wl, bl = rng.standard_normal((60, 40)).astype(dtype), rng.standard_normal(60).astype(dtype)
    gl = rng.standard_normal((2, 150, 60)).astype(dtype)
    args = [x1, x2, w, b, g, x, wl, bl, gl]
    expected = every_function(*args)
    variants = [[unaligned(a) for a in args]]
    variants += [[*args[:i], unaligned(args[i]), *args[i + 1 :]] for i in range(len(args))]
    for variant in variants:
        got = every_function(*variant)
        for result, want in zip(got, expected):
            assert result.dtype == np.dtype(dtype) and result.flags.aligned
            np.testing.assert_array_equal(result, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_unaligned_kept_intermediate_is_not_used(backend, dtype):
    # Where a context keeps T depends on its buffer's address; a buffer that is not aligned
    # (as an unpickled one would be) is neither read nor reused: T is computed again, with the
    # same bits.
    x1, x2, w, _ = (a.astype(dtype) for a in bilinear_args(300, 12, 10, 6))
    g = rng.standard_normal((300, 6)).astype(dtype)
    z, ctx = linmaps.bilinear_with_context(x1, x2, w)
    assert ctx.kept_bytes > 0
    expected = linmaps.bilinear_backward(g, context=ctx)
    ctx._kept = unaligned(ctx._kept)
    for got, want in zip(linmaps.bilinear_backward(g, context=ctx), expected):
        np.testing.assert_array_equal(got, want)
    z2, ctx2 = linmaps.bilinear_with_context(x1, x2, w, reuse=ctx)
    assert ctx2._kept.flags.aligned
    np.testing.assert_array_equal(z2, z)
    for got, want in zip(linmaps.bilinear_backward(g, context=ctx2), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("copy_inputs", [True, False])
@pytest.mark.parametrize("kind", ["Linear", "Bilinear"])
def test_layers_with_unaligned_arrays_match_aligned_ones(backend, kind, copy_inputs, dtype):
    # A layer unpickled from a byte stream has unaligned parameters and gradient accumulators,
    # which its backward adds to; its inputs and gradients may be unaligned too. Two training
    # steps on such a layer match those of the same layer with aligned arrays, bit for bit:
    # outputs, input gradients and accumulated parameter gradients.
    if kind == "Linear":
        fresh = linmaps.Linear(40, 60, dtype=dtype, seed=0, copy_inputs=copy_inputs)
        inputs = [rng.standard_normal((2, 150, 40)).astype(dtype)]
        grad_out = rng.standard_normal((2, 150, 60)).astype(dtype)
    else:
        fresh = linmaps.Bilinear(12, 10, 6, dtype=dtype, seed=0, copy_inputs=copy_inputs)
        inputs = [rng.standard_normal((300, n)).astype(dtype) for n in (12, 10)]
        grad_out = rng.standard_normal((300, 6)).astype(dtype)
    for grad in fresh.gradients():
        grad[...] = 0.25
    layer = through_pickle_unaligned(fresh)
    assert not any(a.flags.aligned for a in layer.parameters() + layer.gradients())
    for _ in range(2):
        expected_out = fresh(*inputs)
        expected_grads = fresh.backward(grad_out)
        out = layer(*(unaligned(a) for a in inputs))
        if getattr(layer, "_kept", None) is not None:
            layer._kept = unaligned(layer._kept)  # and a kept T, read by backward, reused next
        grads = layer.backward(unaligned(grad_out))
        np.testing.assert_array_equal(out, expected_out)
        if kind == "Linear":  # one input gradient, not a tuple
            grads, expected_grads = (grads,), (expected_grads,)
        got, want = [*grads, *layer.gradients()], [*expected_grads, *fresh.gradients()]
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
