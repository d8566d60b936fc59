"""The forward's intermediate T kept for the backward (``bilinear_with_context``, ``Bilinear``
layers) and the backward fast paths: same bits as computing T again, and the same errors as
the validated path. (Memory above the budget: tests/test_cpp_kernels.py.)"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import linmaps
from linmaps import Bilinear, Linear

from reference import assert_identical

DTYPES = [np.float32, np.float64]
hyp = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def normal(shape, seed, dtype):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def bilinear_args(n, in1, in2, out, dtype, seed=0):
    return (
        normal((n, in1), seed, dtype),
        normal((n, in2), seed + 1, dtype),
        normal((out, in1, in2), seed + 2, dtype),
        normal((out,), seed + 3, dtype),
        normal((n, out), seed + 4, dtype),
    )


shapes = st.tuples(
    st.integers(0, 300),  # batch: several row blocks of the compiled kernels at the top
    st.integers(0, 70),  # in1
    st.integers(0, 70),  # in2 (in2 > in1 takes the "swapped" grouping)
    st.integers(0, 12),  # out
)
needs = st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans())


@pytest.mark.parametrize("dtype", DTYPES)
@hyp
@given(shape=shapes, need=needs)
def test_kept_and_recomputed_give_the_same_bits(backend, dtype, shape, need):
    x1, x2, w, b, g = bilinear_args(*shape, dtype)
    z, ctx = linmaps.bilinear_with_context(x1, x2, w, b)
    assert_identical([z], [linmaps.bilinear(x1, x2, w, b)])
    if 0 not in shape:
        assert ctx.kept_bytes > 0
    flags = dict(bias=need[0], need_x1=need[1], need_x2=need[2], need_weight=need[3])
    kept = linmaps.bilinear_backward(g, context=ctx, **flags)
    recomputed = linmaps.bilinear_backward(g, x1, x2, w, **flags)
    assert_identical(kept, recomputed)
    ctx.release()
    assert ctx.kept_bytes == 0
    assert_identical(linmaps.bilinear_backward(g, context=ctx, **flags), recomputed)


@pytest.mark.parametrize(
    "shape",
    # whole outputs per chunk, several chunks per output (q > 512), one sample, swapped
    [(257, 64, 64, 64), (130, 600, 700, 3), (1, 16, 16, 8), (2048, 128, 16, 64), (40, 9, 50, 33)],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_bits_do_not_depend_on_threads(shape, dtype):
    if "cpp" not in linmaps.available_backends():
        pytest.skip("the compiled backend is not available")
    x1, x2, w, b, g = bilinear_args(*shape, dtype, seed=3)
    before = linmaps.get_num_threads()
    results = []
    try:
        with linmaps.use_backend("cpp"):
            for threads in (1, 2, 3):
                linmaps.set_num_threads(threads)
                z, ctx = linmaps.bilinear_with_context(x1, x2, w, b)
                results.append((z, *linmaps.bilinear_backward(g, context=ctx)))
            linmaps.set_num_threads(2)
            results.append(
                (linmaps.bilinear(x1, x2, w, b), *linmaps.bilinear_backward(g, x1, x2, w))
            )
    finally:
        linmaps.set_num_threads(before)
    for other in results[1:]:
        assert_identical(other, results[0])


def test_kept_matches_the_oracle_with_leading_dims_and_promotion(backend):
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal((2, 3, 4)).astype(np.float16)
    x2 = rng.standard_normal((2, 3, 5)).astype(np.float32)
    w = rng.standard_normal((6, 4, 5)).astype(np.float32)
    g = rng.standard_normal((2, 3, 6))  # float64: the backward computes in float64
    z, ctx = linmaps.bilinear_with_context(x1, x2, w)
    assert z.dtype == np.float32 and z.shape == (2, 3, 6)
    assert_identical([z], [linmaps.bilinear(x1, x2, w)])
    assert_identical(
        linmaps.bilinear_backward(g, context=ctx), linmaps.bilinear_backward(g, x1, x2, w)
    )
    # A single bilinear form (2-D weight) and 1-D inputs.
    z, ctx = linmaps.bilinear_with_context(x1[0, 0], x2[0, 0], w[0], np.float32(0.5))
    assert z.shape == ()
    grads = linmaps.bilinear_backward(np.float32(1.5), context=ctx)
    expected = linmaps.bilinear_backward(np.float32(1.5), x1[0, 0], x2[0, 0], w[0])
    assert_identical(grads, expected)
    assert grads.grad_bias.shape == ()


def test_the_budget_decides_what_is_kept(backend):
    x1, x2, w, b, g = bilinear_args(50, 8, 6, 7, np.float32)
    full = linmaps.bilinear_with_context(x1, x2, w, b)[1].kept_bytes
    # T is batch * out * min(in1, in2) numbers (the compiled layout adds alignment padding).
    assert full >= 50 * 7 * 6 * 4
    assert full <= 50 * 7 * 6 * 4 + 64 * (1 + 7 + 1)
    assert linmaps.bilinear_with_context(x1, x2, w, b, keep_bytes=full)[1].kept_bytes == full
    assert linmaps.bilinear_with_context(x1, x2, w, b, keep_bytes=full - 1)[1].kept_bytes == 0
    _, ctx = linmaps.bilinear_with_context(x1, x2, w, b, keep_bytes=0)
    assert ctx.kept_bytes == 0
    assert_identical(
        linmaps.bilinear_backward(g, context=ctx), linmaps.bilinear_backward(g, x1, x2, w)
    )


def test_reuse_recycles_the_buffer_and_the_old_context_still_works(backend):
    x1, x2, w, b, g = bilinear_args(40, 5, 7, 3, np.float64)
    _, first = linmaps.bilinear_with_context(x1, x2, w, b)
    buffer = first._kept
    y1, y2, _, _, h = bilinear_args(40, 5, 7, 3, np.float64, seed=9)
    _, second = linmaps.bilinear_with_context(y1, y2, w, b, reuse=first)
    assert second._kept is buffer and first.kept_bytes == 0
    assert_identical(
        linmaps.bilinear_backward(g, context=first), linmaps.bilinear_backward(g, x1, x2, w)
    )
    assert_identical(
        linmaps.bilinear_backward(h, context=second), linmaps.bilinear_backward(h, y1, y2, w)
    )


CONTEXT_ERRORS = {
    "context and arrays": (
        lambda ctx, g, a: linmaps.bilinear_backward(g, a[0], a[1], a[2], context=ctx),
        TypeError,
        "bilinear_backward(): give either x1, x2 and weight, or context, not both",
    ),
    "no arrays": (
        lambda ctx, g, a: linmaps.bilinear_backward(g),
        TypeError,
        "bilinear_backward(): give x1, x2 and weight, or context",
    ),
    "not a context": (
        lambda ctx, g, a: linmaps.bilinear_backward(g, context=(1, 2)),
        TypeError,
        "bilinear_backward(): context must be a BilinearContext (from bilinear_with_context), "
        "got tuple",
    ),
    "grad_out shape": (
        lambda ctx, g, a: linmaps.bilinear_backward(g[:, :2], context=ctx),
        ValueError,
        "bilinear_backward(): grad_out shape does not match the output shape: got (4, 2) but "
        "expected (4, 3) (input1 shape (4, 5), input2 shape (4, 6), weight shape (3, 5, 6))",
    ),
    "keep_bytes type": (
        lambda ctx, g, a: linmaps.bilinear_with_context(*a, keep_bytes=1.5),
        TypeError,
        "bilinear_with_context(): keep_bytes must be an int (bytes) or None, got float",
    ),
    "keep_bytes bool": (
        lambda ctx, g, a: linmaps.bilinear_with_context(*a, keep_bytes=True),
        TypeError,
        "bilinear_with_context(): keep_bytes must be an int (bytes) or None, got bool",
    ),
    "keep_bytes negative": (
        lambda ctx, g, a: linmaps.bilinear_with_context(*a, keep_bytes=-1),
        ValueError,
        "bilinear_with_context(): keep_bytes must be >= 0, got -1",
    ),
    "reuse type": (
        lambda ctx, g, a: linmaps.bilinear_with_context(*a, reuse=object()),
        TypeError,
        "bilinear_with_context(): reuse must be a BilinearContext or None, got object",
    ),
    "forward shapes": (
        lambda ctx, g, a: linmaps.bilinear_with_context(a[0], a[1][:, :5], a[2]),
        ValueError,
        "bilinear_with_context(): input2 size does not match weight size: got 5 but expected 6",
    ),
}


@pytest.mark.parametrize("case", list(CONTEXT_ERRORS))
def test_context_errors_are_clear_and_the_same_from_both_backends(case):
    call, exc_type, message = CONTEXT_ERRORS[case]
    x1, x2, w, _, g = bilinear_args(4, 5, 6, 3, np.float32)
    seen = set()
    for name in linmaps.available_backends():
        with linmaps.use_backend(name):
            _, ctx = linmaps.bilinear_with_context(x1, x2, w)
            with pytest.raises(exc_type) as info:
                call(ctx, g, (x1, x2, w))
        assert str(info.value).startswith(message), str(info.value)
        seen.add((type(info.value), str(info.value)))
    assert len(seen) == 1


def test_a_context_from_another_backend_is_recomputed():
    if "cpp" not in linmaps.available_backends():
        pytest.skip("the compiled backend is not available")
    x1, x2, w, b, g = bilinear_args(30, 6, 5, 4, np.float64)
    with linmaps.use_backend("python"):
        _, ctx = linmaps.bilinear_with_context(x1, x2, w, b)
    with linmaps.use_backend("cpp"):
        assert_identical(
            linmaps.bilinear_backward(g, context=ctx), linmaps.bilinear_backward(g, x1, x2, w)
        )


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (7,), (2, 3)])
def test_layer_keeps_T_and_gives_the_gradients_of_recomputing(backend, dtype, lead):
    kept = Bilinear(5, 9, 4, dtype=dtype, seed=1)
    recomputing = Bilinear(5, 9, 4, dtype=dtype, seed=1, keep_bytes=0)
    x1 = normal((*lead, 5), 1, dtype)
    x2 = normal((*lead, 9), 2, dtype)
    g = normal((*lead, 4), 3, dtype)
    for step in range(3):  # the buffer is reused from step to step
        z = kept(x1 + step, x2)
        assert_identical([z], [recomputing(x1 + step, x2)])
        assert kept.kept_bytes > 0 and recomputing.kept_bytes == 0
        assert_identical(kept.backward(g), recomputing.backward(g))
        assert_identical(
            [kept.grad_weight, kept.grad_bias], [recomputing.grad_weight, recomputing.grad_bias]
        )
    kept(x1, x2, save_for_backward=False)  # inference keeps nothing, and frees T
    assert kept.kept_bytes == 0
    with pytest.raises(RuntimeError, match="no saved inputs"):
        kept.backward(g)


def test_layer_keep_bytes_per_layer_and_per_call(backend):
    layer = Bilinear(4, 3, 2, seed=0)
    assert layer.keep_bytes == linmaps.KEEP_BYTES_DEFAULT == 256 * 2**20
    x1, x2 = normal((10, 4), 1, np.float32), normal((10, 3), 2, np.float32)
    layer(x1, x2, keep_bytes=0)
    assert layer.kept_bytes == 0
    layer(x1, x2)
    assert layer.kept_bytes > 0
    layer.keep_bytes = 0
    layer(x1, x2)
    assert layer.kept_bytes == 0
    with pytest.raises(TypeError, match=r"Bilinear.keep_bytes\(\): keep_bytes must be an int"):
        layer.keep_bytes = "1"
    with pytest.raises(ValueError, match=r"Bilinear\(\): keep_bytes must be >= 0, got -5"):
        Bilinear(4, 3, 2, keep_bytes=-5)
    with pytest.raises(TypeError, match=r"Bilinear.forward\(\): keep_bytes must be an int"):
        layer(x1, x2, keep_bytes=2.0)


def test_layer_forward_interrupted_leaves_nothing_stale(backend):
    layer = Bilinear(4, 3, 2, seed=0)
    x1, x2 = normal((10, 4), 1, np.float32), normal((10, 3), 2, np.float32)
    layer(x1, x2)
    with pytest.raises(ValueError):
        layer(x1, x2[:, :2])  # a failed forward releases the last batch
    assert layer.kept_bytes == 0
    with pytest.raises(RuntimeError, match="no saved inputs"):
        layer.backward(np.ones((10, 2), np.float32))


# ----------------------------------------------------------------------------- fast paths


def slow(flag):
    """The same flag as an np.bool_: the fast paths take only True/False, so this forces the
    validated path with the same meaning."""
    return np.bool_(flag)


@pytest.mark.parametrize("dtype", DTYPES)
@hyp
@given(shape=shapes, need=needs)
def test_backward_fast_paths_give_the_validated_bits(dtype, shape, need):
    x1, x2, w, _, g = bilinear_args(*shape, dtype)
    fast = linmaps.bilinear_backward(
        g, x1, x2, w, bias=need[0], need_x1=need[1], need_x2=need[2], need_weight=need[3]
    )
    validated = linmaps.bilinear_backward(
        g,
        x1,
        x2,
        w,
        bias=slow(need[0]),
        need_x1=slow(need[1]),
        need_x2=need[2],
        need_weight=need[3],
    )
    assert_identical(fast, validated)
    n, in1, _, out = shape
    x, wl, gl = x1, normal((out, in1), 7, dtype), normal((n, out), 8, dtype)
    fast = linmaps.linear_backward(gl, x, wl, bias=need[0], need_x=need[1], need_weight=need[3])
    validated = linmaps.linear_backward(
        gl, x, wl, bias=slow(need[0]), need_x=need[1], need_weight=need[3]
    )
    assert_identical(fast, validated)


@pytest.mark.parametrize("layer_type", [Linear, Bilinear])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_fast_paths_give_the_validated_bits(layer_type, dtype):
    """Exact 2-D inputs take the layers' fast paths; the same values as a Fortran-ordered
    array (converted, so validated) must give the same bits, frozen parameters included."""
    if layer_type is Linear:
        make = lambda: Linear(6, 4, dtype=dtype, seed=2)  # noqa: E731
        inputs = [normal((9, 6), 1, dtype)]
    else:
        make = lambda: Bilinear(6, 5, 4, dtype=dtype, seed=2)  # noqa: E731
        inputs = [normal((9, 6), 1, dtype), normal((9, 5), 2, dtype)]
    g = normal((9, 4), 3, dtype)
    for frozen in [(), ("weight",), ("bias",)]:
        fast, validated = make(), make()
        if frozen:
            fast.freeze(*frozen)
            validated.freeze(*frozen)
        for _ in range(2):
            out_fast = fast(*inputs)
            out_validated = validated(*(np.asfortranarray(x) for x in inputs))
            assert_identical([out_fast], [out_validated])
            grads_fast = fast.backward(g)
            grads_validated = validated.backward(np.asfortranarray(g))
            if layer_type is Linear:
                grads_fast, grads_validated = [grads_fast], [grads_validated]
            assert_identical(grads_fast, grads_validated)
            assert_identical(
                [fast.grad_weight, fast.grad_bias], [validated.grad_weight, validated.grad_bias]
            )
        for name in frozen:
            assert not getattr(fast, "grad_" + name).any()
        out = fast(*inputs, save_for_backward=False)
        assert_identical([out], [validated(*inputs, save_for_backward=False)])


@pytest.mark.parametrize(
    "call",
    [
        lambda g, x1, x2, w: linmaps.bilinear_backward(g[:, :2], x1, x2, w),
        lambda g, x1, x2, w: linmaps.bilinear_backward(g, x1, x2[:, :3], w),
        lambda g, x1, x2, w: linmaps.bilinear_backward(g, x1, x2, w, need_x1=1),
        lambda g, x1, x2, w: linmaps.bilinear_backward(g.astype(np.float64), x1, x2, w[:, :, :3]),
        lambda g, x1, x2, w: linmaps.linear_backward(g, x1, w[:, 0, :]),
        lambda g, x1, x2, w: linmaps.linear_backward(g[:, :1], x1, w[:, :, 0]),
        lambda g, x1, x2, w: linmaps.linear_backward(g, x1, w[:, :, 0], need_weight=None),
    ],
)
def test_backward_fast_paths_raise_what_the_validated_path_raises(call):
    x1, x2, w, _, g = bilinear_args(4, 5, 6, 3, np.float32)
    seen = set()
    for name in linmaps.available_backends():
        with linmaps.use_backend(name), pytest.raises((TypeError, ValueError)) as info:
            call(g, x1, x2, w)
        seen.add((type(info.value), str(info.value)))
    assert len(seen) == 1, seen


@pytest.mark.parametrize("dtype", DTYPES)
def test_context_fast_paths_give_the_validated_bits(backend, dtype):
    x1, x2, w, b, g = bilinear_args(300, 20, 70, 9, dtype, seed=4)
    z_fast, ctx_fast = linmaps.bilinear_with_context(x1, x2, w, b)
    # An np.int64 budget and an np.bool_ flag take the validated paths, with the same meaning.
    z_validated, ctx_validated = linmaps.bilinear_with_context(
        x1, x2, w, b, keep_bytes=np.int64(linmaps.KEEP_BYTES_DEFAULT)
    )
    assert_identical([z_fast], [z_validated])
    assert ctx_fast.kept_bytes == ctx_validated.kept_bytes > 0
    fast = linmaps.bilinear_backward(g, context=ctx_fast)
    validated = linmaps.bilinear_backward(g, context=ctx_validated, bias=np.bool_(True))
    assert_identical(fast, validated)
