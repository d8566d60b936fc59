"""Backend selection: get/set/use_backend, LINMAPS_BACKEND, the fallback without _core, threads."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import linmaps


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter (import-time behaviour) and return the result."""
    full_env = {k: v for k, v in os.environ.items() if k != "LINMAPS_BACKEND"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_default_backend_is_compiled_when_present():
    expected = "cpp" if "cpp" in linmaps.available_backends() else "python"
    result = run_python("import linmaps; print(linmaps.get_backend())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.skipif(
    os.environ.get("LINMAPS_REQUIRE_CPP") != "1",
    reason="LINMAPS_REQUIRE_CPP is not 1: only builds that must have the compiled core "
    "(CI's wheel tests) set it",
)
def test_compiled_backend_is_present():
    assert "cpp" in linmaps.available_backends(), linmaps._config.config()["compiled"]


def test_set_backend_and_unknown_names():
    before = linmaps.get_backend()
    try:
        linmaps.set_backend("python")
        assert linmaps.get_backend() == "python"
        with pytest.raises(
            ValueError,
            match=r"unknown backend 'fortran'; valid backends are "
            r"'cpp', 'python'",
        ):
            linmaps.set_backend("fortran")
        with pytest.raises(ValueError, match="unknown backend"):
            linmaps.set_backend(None)
        assert linmaps.get_backend() == "python"
    finally:
        linmaps.set_backend(before)


def test_use_backend_restores_and_is_per_thread():
    before = linmaps.get_backend()
    seen = {}
    with linmaps.use_backend("python"):
        assert linmaps.get_backend() == "python"
        worker = threading.Thread(target=lambda: seen.setdefault("other", linmaps.get_backend()))
        worker.start()
        worker.join()
    assert linmaps.get_backend() == before
    assert seen["other"] == before  # the override did not leak into another thread
    with pytest.raises(ValueError, match="valid backends"), linmaps.use_backend("gpu"):
        pass


def test_use_backend_restores_after_an_exception():
    before = linmaps.get_backend()
    with pytest.raises(KeyError), linmaps.use_backend("python"):
        raise KeyError("boom")
    assert linmaps.get_backend() == before


def test_environment_variable_selects_backend():
    result = run_python("import linmaps; print(linmaps.get_backend())", LINMAPS_BACKEND="python")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "python"


def test_environment_variable_unknown_name():
    result = run_python("import linmaps", LINMAPS_BACKEND="cuda")
    assert result.returncode != 0
    assert "LINMAPS_BACKEND='cuda' is not a backend; valid backends are 'cpp', 'python'" in (
        result.stderr
    )


BLOCK_CORE = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "linmaps._core":
            raise ImportError("simulated: _core was not built")
sys.meta_path.insert(0, Blocker())
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import linmaps
    import numpy as np
    y = linmaps.bilinear(np.ones((2, 3)), np.ones((2, 4)), np.ones((5, 3, 4)))
print(linmaps.get_backend(), linmaps.available_backends(), y.shape)
print(len(caught), caught[0].category.__name__ if caught else "-")
print(caught[0].message if caught else "-")
"""


def test_missing_compiled_module_falls_back_with_one_warning():
    result = run_python(BLOCK_CORE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "python ('python',) (2, 5)"
    assert lines[1] == "1 RuntimeWarning"
    assert "compiled backend could not be loaded" in lines[2]
    assert "simulated: _core was not built" in lines[2]


def test_missing_compiled_module_is_silent_when_python_is_chosen():
    result = run_python(
        BLOCK_CORE.replace("caught[0].category.__name__ if caught", "'x' if 0"),
        LINMAPS_BACKEND="python",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("0 ")


def test_requesting_cpp_without_core_is_an_error():
    code = BLOCK_CORE.split("print(")[0] + (
        "\ntry:\n    linmaps.set_backend('cpp')\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    result = run_python(code, LINMAPS_BACKEND="python")
    assert result.returncode == 0, result.stderr
    assert "ERR the 'cpp' backend is not available" in result.stdout


def test_num_threads_validation():
    before = linmaps.get_num_threads()
    assert before >= 1
    with pytest.raises(ValueError, match="at least 1, got 0"):
        linmaps.set_num_threads(0)
    with pytest.raises(TypeError, match="must be an int, got float"):
        linmaps.set_num_threads(1.5)
    with pytest.raises(TypeError, match="must be an int, got bool"):
        linmaps.set_num_threads(True)
    try:
        linmaps.set_num_threads(1)
        assert linmaps.get_num_threads() == 1
    finally:
        linmaps.set_num_threads(before)
    assert linmaps.get_num_threads() == before


def test_show_config_prints_versions(capsys):
    linmaps.show_config()
    out = capsys.readouterr().out
    for key in ("linmaps", "numpy", "backend", "num_threads", "compiled"):
        assert f" {key}: " in out
    assert np.__version__ in out


def test_public_names():
    expected = {
        "linear",
        "linear_backward",
        "bilinear",
        "bilinear_backward",
        "bilinear_with_context",
        "BilinearContext",
        "KEEP_BYTES_DEFAULT",
        "get_backend",
        "set_backend",
        "use_backend",
        "get_num_threads",
        "set_num_threads",
        "LinearGrads",
        "BilinearGrads",
        "show_config",
        "available_backends",
        "Linear",
        "Bilinear",
        "LoadError",
        "share_blas_threads",
        "bilinear_pairs",
        "bilinear_pairs_backward",
        "BilinearPairs",
        "fp32_precision",
        "get_fp32_precision",
        "set_fp32_precision",
    }
    assert expected == set(linmaps.__all__) - {"__version__"}
    for name in linmaps.__all__:
        assert hasattr(linmaps, name), name
