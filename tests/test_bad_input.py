"""Every kind of bad input gets a clear error before any work, the same from every backend."""

import numpy as np
import pytest

import linmaps

ok1, ok2 = np.ones((3, 4)), np.ones((3, 5))
w3, b3 = np.ones((2, 4, 5)), np.ones(2)
wl, bl = np.ones((2, 4)), np.ones(2)

CASES = {
    "linear in features": (
        lambda: linmaps.linear(np.ones((3, 5)), wl),
        ValueError,
        "linear(): input size does not match weight size: got 5 but expected 4 "
        "(input shape (3, 5), weight shape (2, 4))",
    ),
    "linear weight ndim": (
        lambda: linmaps.linear(ok1, np.ones(4)),
        ValueError,
        "linear(): weight must be 2-D (out_features, in_features), got shape (4,)",
    ),
    "linear 0-d input": (
        lambda: linmaps.linear(np.float64(1.0), wl),
        ValueError,
        "linear(): input must have at least 1 dimension, got a 0-d array",
    ),
    "linear bias length": (
        lambda: linmaps.linear(ok1, wl, np.ones(3)),
        ValueError,
        "linear(): bias size does not match weight size: got shape (3,) but expected (2,) "
        "(weight shape (2, 4))",
    ),
    "linear_backward grad_out": (
        lambda: linmaps.linear_backward(np.ones((3, 3)), ok1, wl),
        ValueError,
        "linear_backward(): grad_out shape does not match the output shape: got (3, 3) but "
        "expected (3, 2) (input shape (3, 4), weight shape (2, 4))",
    ),
    "linear_backward grad_out batch": (
        lambda: linmaps.linear_backward(np.ones((4, 2)), ok1, wl),
        ValueError,
        "linear_backward(): grad_out shape does not match the output shape: got (4, 2) but "
        "expected (3, 2)",
    ),
    "linear_backward in features": (
        lambda: linmaps.linear_backward(np.ones((3, 2)), np.ones((3, 5)), wl),
        ValueError,
        "linear_backward(): input size does not match weight size: got 5 but expected 4",
    ),
    "linear_backward flag type": (
        lambda: linmaps.linear_backward(np.ones((3, 2)), ok1, wl, need_x="no"),
        TypeError,
        "linear_backward(): need_x must be a bool, got str",
    ),
    "bilinear input1 features": (
        lambda: linmaps.bilinear(np.ones((3, 5)), ok2, w3),
        ValueError,
        "bilinear(): input1 size does not match weight size: got 5 but expected 4 "
        "(input1 shape (3, 5), input2 shape (3, 5), weight shape (2, 4, 5))",
    ),
    "bilinear input2 features": (
        lambda: linmaps.bilinear(ok1, np.ones((3, 6)), w3),
        ValueError,
        "bilinear(): input2 size does not match weight size: got 6 but expected 5",
    ),
    "bilinear batch dims": (
        lambda: linmaps.bilinear(ok1, np.ones((4, 5)), w3),
        ValueError,
        "bilinear(): input batch dimensions do not match: got (3,) and (4,)",
    ),
    "bilinear batch ndim": (
        lambda: linmaps.bilinear(np.ones((2, 3, 4)), ok2, w3),
        ValueError,
        "bilinear(): input batch dimensions do not match: got (2, 3) and (3,)",
    ),
    "bilinear weight ndim": (
        lambda: linmaps.bilinear(ok1, ok2, np.ones((1, 2, 4, 5))),
        ValueError,
        "bilinear(): weight must be 3-D (out_features, in1_features, in2_features) or 2-D "
        "(in1_features, in2_features), got shape (1, 2, 4, 5)",
    ),
    "bilinear 0-d input2": (
        lambda: linmaps.bilinear(ok1, np.float64(2.0), w3),
        ValueError,
        "bilinear(): input2 must have at least 1 dimension, got a 0-d array",
    ),
    "bilinear bias length": (
        lambda: linmaps.bilinear(ok1, ok2, w3, np.ones(3)),
        ValueError,
        "bilinear(): bias size does not match weight size: got shape (3,) but expected (2,) "
        "(weight shape (2, 4, 5))",
    ),
    "bilinear form bias": (
        lambda: linmaps.bilinear(ok1, ok2, np.ones((4, 5)), np.ones(1)),
        ValueError,
        "bilinear(): bias size does not match weight size: got shape (1,) but expected ()",
    ),
    "bilinear_backward grad_out": (
        lambda: linmaps.bilinear_backward(np.ones((3, 3)), ok1, ok2, w3),
        ValueError,
        "bilinear_backward(): grad_out shape does not match the output shape: got (3, 3) but "
        "expected (3, 2) (input1 shape (3, 4), input2 shape (3, 5), weight shape (2, 4, 5))",
    ),
    "bilinear_backward form grad_out": (
        lambda: linmaps.bilinear_backward(np.ones((3, 1)), ok1, ok2, np.ones((4, 5))),
        ValueError,
        "bilinear_backward(): grad_out shape does not match the output shape: got (3, 1) but "
        "expected (3,)",
    ),
    "bilinear_backward input2": (
        lambda: linmaps.bilinear_backward(np.ones((3, 2)), ok1, np.ones((3, 7)), w3),
        ValueError,
        "bilinear_backward(): input2 size does not match weight size: got 7 but expected 5",
    ),
    "bilinear_backward flag type": (
        lambda: linmaps.bilinear_backward(np.ones((3, 2)), ok1, ok2, w3, bias=None),
        TypeError,
        "bilinear_backward(): bias must be a bool, got NoneType",
    ),
    "complex input": (
        lambda: linmaps.linear(ok1.astype(complex), wl),
        TypeError,
        "linear(): input has dtype complex128, which is not supported",
    ),
    "object weight": (
        lambda: linmaps.bilinear(ok1, ok2, w3.astype(object)),
        TypeError,
        "bilinear(): weight has dtype object, which is not supported",
    ),
    "string bias": (
        lambda: linmaps.linear(ok1, wl, np.array(["a", "b"])),
        TypeError,
        "linear(): bias has dtype <U1, which is not supported",
    ),
    "complex grad_out": (
        lambda: linmaps.bilinear_backward(np.ones((3, 2), complex), ok1, ok2, w3),
        TypeError,
        "bilinear_backward(): grad_out has dtype complex128, which is not supported",
    ),
    "longdouble input": (
        lambda: linmaps.linear(ok1.astype(np.longdouble), wl),
        TypeError,
        "linear(): input has dtype float128, which is not supported",
    ),
    "ragged list": (
        lambda: linmaps.linear([[1.0, 2.0], [3.0]], wl),
        TypeError,
        "linear(): input cannot be converted to an array",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_clear_error(backend, case):
    call, exc_type, message = CASES[case]
    with pytest.raises(exc_type) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("case", list(CASES))
def test_same_error_from_every_backend(case):
    call, _, _ = CASES[case]
    seen = set()
    for name in linmaps.available_backends():
        with linmaps.use_backend(name), pytest.raises(Exception) as info:
            call()
        seen.add((type(info.value), str(info.value)))
    assert len(seen) == 1, seen


def test_errors_are_raised_before_any_work(monkeypatch):
    """A backend is never reached with bad input: validation is in front of it."""
    from linmaps import _backend

    def unreachable():
        raise AssertionError("the backend was called with invalid input")

    monkeypatch.setattr(_backend, "current", unreachable)
    for call, exc_type, _ in CASES.values():
        with pytest.raises(exc_type):
            call()
