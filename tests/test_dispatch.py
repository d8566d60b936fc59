"""Runtime CPU dispatch: the best supported instruction set is chosen; LINMAPS_CPU forces one."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

import linmaps

import reference as ref

pytestmark = pytest.mark.skipif(
    "cpp" not in linmaps.available_backends(), reason="the compiled backend is not available"
)

RUN_LEVEL = """
import sys
import numpy as np
import linmaps
from linmaps import _cpp_backend
rng = np.random.default_rng(5)
x1, x2 = rng.standard_normal((37, 19)), rng.standard_normal((37, 23))
w, b, g = rng.standard_normal((5, 19, 23)), rng.standard_normal(5), rng.standard_normal((37, 5))
lw = rng.standard_normal((6, 19))
np.savez(sys.argv[1], isa=_cpp_backend.isa, z=linmaps.bilinear(x1, x2, w, b),
         *linmaps.bilinear_backward(g, x1, x2, w), y=linmaps.linear(x1, lw, b[:1].repeat(6)),
         gx=linmaps.linear_backward(np.ones((37, 6)), x1, lw).grad_x,
         x1=x1, x2=x2, w=w, b=b, g=g, lw=lw)
"""


def run_with_level(level, tmp_path=None, code="import linmaps"):
    env = {k: v for k, v in os.environ.items() if k not in ("LINMAPS_CPU", "LINMAPS_BACKEND")}
    if level is not None:
        env["LINMAPS_CPU"] = level
    args = [sys.executable, "-c", code] + ([str(tmp_path)] if tmp_path else [])
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def test_default_is_the_best_available_level():
    from linmaps import _cpp_backend

    forced = os.environ.get("LINMAPS_CPU")
    assert _cpp_backend.isa == (forced or _cpp_backend.available_isas[-1])
    assert _cpp_backend.available_isas[0] == "baseline"
    assert _cpp_backend._core.isa == _cpp_backend.isa


@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512", "native"])
def test_each_level_computes_the_spec(level, tmp_path):
    from linmaps import _cpp_backend

    if level not in _cpp_backend.available_isas:
        pytest.skip(f"{level} is not available here")
    out = tmp_path / "out.npz"
    result = run_with_level(level, out, RUN_LEVEL)
    assert result.returncode == 0, result.stderr
    data = np.load(out)
    assert str(data["isa"]) == level
    x1, x2, w, b, g, lw = (data[k] for k in ("x1", "x2", "w", "b", "g", "lw"))
    f64 = np.float64
    ref.assert_close(data["z"], ref.bilinear(x1, x2, w, b), 19 * 23 + 1, f64, f64)
    expected = ref.bilinear_grads(g, x1, x2, w)
    for name, want, terms in zip(("arr_0", "arr_1", "arr_2", "arr_3"), expected, (115, 95, 37, 37)):
        ref.assert_close(data[name], want, terms, f64, f64)
    ref.assert_close(data["y"], ref.linear(x1, lw, np.repeat(b[:1], 6)), 20, f64, f64)
    ref.assert_close(data["gx"], ref.linear_grads(np.ones((37, 6)), x1, lw)[0], 6, f64, f64)


def test_unknown_level_is_a_clear_error():
    result = run_with_level("sse9")
    assert result.returncode != 0
    assert "LINMAPS_CPU='sse9' is not an instruction-set level; valid levels are 'baseline', " in (
        result.stderr
    )


def fake_core(supported):
    return types.SimpleNamespace(isa="baseline", cpu_supports=lambda level: level in supported)


def test_level_above_the_cpu_is_a_clear_error(monkeypatch):
    from linmaps import _dispatch

    core = fake_core({"baseline"})
    assert "avx512" not in _dispatch.available(core)
    monkeypatch.setenv("LINMAPS_CPU", "avx512")
    with pytest.raises(
        _dispatch.CpuLevelError,
        match="'avx512' cannot be used: this CPU does not support it; available here: baseline",
    ):
        _dispatch.load(core)


def test_without_the_level_the_best_supported_one_is_chosen(monkeypatch):
    from linmaps import _dispatch

    monkeypatch.delenv("LINMAPS_CPU", raising=False)
    module, level = _dispatch.load(fake_core({"baseline", "avx2"}))
    assert level in ("avx2", "native")  # native only in a LINMAPS_NATIVE=ON build
    assert module.isa == level


def test_show_config_names_the_instruction_sets(capsys):
    from linmaps import _cpp_backend

    linmaps.show_config()
    out = capsys.readouterr().out
    assert f"isa: {_cpp_backend.isa}" in out
    assert "available_isas: " in out
    assert "openmp: " in out
