"""The benchmark harness (bench/): it runs end to end, records every figure in its JSON, and
reports a backend that gives wrong results as an error instead of timing it."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import linmaps

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import linmaps_bench as lb  # noqa: E402
from linmaps_bench import report  # noqa: E402
from linmaps_bench.cases import mixed  # noqa: E402

# Tiny custom sizes: the harness's logic, not the machine's speed, is under test.
TINY_CASES = "bilinear:3x4x5x2,linear:3x4x2"
TIMING_FIELDS = {
    "status",
    "flops",
    "first_call_s",
    "calls_per_sample",
    "median_s",
    "q1_s",
    "q3_s",
    "min_s",
    "max_s",
    "n_samples",
    "samples_s",
    "gflops",
    "gflops_iqr",
    "roofline_fraction",
    "check",
}


def run_bench_cli(*args):
    """``python bench/run.py --quick --no-progress ARGS`` importing this session's linmaps."""
    env = dict(os.environ)
    linmaps_root = os.path.dirname(os.path.dirname(linmaps.__file__))
    env["PYTHONPATH"] = os.pathsep.join([linmaps_root, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, os.path.join(BENCH, "run.py"), "--quick", "--no-progress", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_cli_quick_run_writes_every_field(tmp_path):
    json_path, png_path = tmp_path / "result.json", tmp_path / "chart.png"
    proc = run_bench_cli("--cases", TINY_CASES, "--json", str(json_path), "--plot", str(png_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"JSON record written to {json_path}" in proc.stdout
    assert "bilinear-3x4x5x2" in proc.stdout and "summary" in proc.stdout

    result = json.loads(json_path.read_text())
    assert result["schema"] == lb.SCHEMA
    assert {
        "started",
        "finished",
        "duration_s",
        "command",
        "machine",
        "versions",
        "settings",
        "threads",
        "backends",
        "reference_gemm",
        "cases",
        "mixed",
        "ceiling",
    } <= set(result)
    assert result["mixed"] == [] and result["ceiling"] == []  # none of those selected
    assert {"cpu_model", "logical_cpus", "usable_cpus", "cpu_simd_flags"} <= set(result["machine"])
    assert {"linmaps", "numpy", "torch", "compiler", "build_simd", "blas"} <= set(
        result["versions"]
    )
    assert result["settings"]["dtype"] == "float32" and result["settings"]["quick"]
    assert result["settings"]["threads"] == result["threads"]["requested"]
    gemm = result["reference_gemm"]
    assert gemm["size"] == 2048 and gemm["gflops"] > 0 and gemm["median_s"] > 0

    available = [name for name, status in result["backends"].items() if status["available"]]
    assert "python" in available  # the oracle's backend always runs
    assert set(result["backends"]) == {"cpp", "python", "torch", "cpp-recompute", "jax"}
    for status in result["backends"].values():
        if not status["available"]:
            assert status["reason"]
    assert [case["id"] for case in result["cases"]] == ["bilinear-3x4x5x2", "linear-3x4x2"]
    for case in result["cases"]:
        assert case["flops"]["backward"] == (6 if case["kind"] == "bilinear" else 4) * np.prod(
            case["dims"]
        )
        for name, per_op in case["results"].items():
            assert set(per_op) == set(lb.OPS)
            for record in per_op.values():
                if name not in available:
                    assert record["status"] == "unavailable"
                    continue
                assert record["status"] == "ok", record
                assert set(record) >= TIMING_FIELDS
                assert record["check"]["passed"]
                assert record["q1_s"] <= record["median_s"] <= record["q3_s"]
                assert len(record["samples_s"]) == record["n_samples"] >= 3  # tiny: all fit
        for name in available:
            memory = case["memory"][name]
            assert memory["status"] in ("ok", "not measured"), memory
            if memory["status"] == "ok":
                assert memory["backward_peak_extra_mib"] >= 0
                assert memory["backward_outputs_mib"] > 0
        assert set(case["speedups"]["forward"]) == {
            f"cpp_vs_{name}" for name in ("python", "torch", "cpp-recompute", "jax")
        }
    if "matplotlib" in result["versions"]:
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "chart skipped" in proc.stdout


def _linear_backward_with_wrong_grad_x(grad_out, x, weight):
    grads = linmaps.linear_backward(grad_out, x, weight)
    return grads._replace(grad_x=grads.grad_x * 1.01)  # 1% off: far outside rounding


def _bilinear_without_bias(x1, x2, weight, bias=None):
    return linmaps.bilinear(x1, x2, weight)  # forgets the bias


def _raises(*args, **kwargs):
    raise RuntimeError("kernel exploded")


class _Missing(lb.Backend):
    name = "missing"

    def unavailable_reason(self):
        return "not built here"


def test_wrong_results_are_errors_and_not_timed():
    wrong = lb.FunctionalBackend(
        "wrong",
        linear=linmaps.linear,
        linear_backward=_linear_backward_with_wrong_grad_x,
        bilinear=_bilinear_without_bias,
        bilinear_backward=_raises,
    )
    cases = lb.select_cases(TINY_CASES)
    settings = lb.Settings.for_mode(
        True, threads=lb.usable_cpus(), measure_memory=False, gemm_size=256
    )
    threads_before = linmaps.get_num_threads()
    result = lb.run_suite(cases, ["python", wrong, _Missing()], settings, progress=False)

    by_id = {case["id"]: case["results"] for case in result["cases"]}
    linear, bilinear = by_id["linear-3x4x2"], by_id["bilinear-3x4x5x2"]
    for per_op in (linear["python"], bilinear["python"]):
        assert all(record["status"] == "ok" for record in per_op.values())

    assert linear["wrong"]["forward"]["status"] == "ok"  # its forward is linmaps' own
    for op in ("backward", "fwd+bwd"):
        record = linear["wrong"][op]
        assert record["status"] == "error"
        assert "wrong result: grad_x" in record["error"]
        assert "median_s" not in record and "gflops" not in record
    assert bilinear["wrong"]["forward"]["status"] == "error"
    assert "wrong result: z" in bilinear["wrong"]["forward"]["error"]
    assert "kernel exploded" in bilinear["wrong"]["backward"]["error"]

    assert result["backends"]["missing"] == {
        "available": False,
        "reason": "not built here",
        "isolated": False,
    }
    assert all(r["status"] == "unavailable" for r in linear["missing"].values())
    assert lb.has_errors(result)
    assert linmaps.get_num_threads() == threads_before  # the run put its settings back


def test_tolerance_accepts_rounding_and_rejects_a_small_error():
    case = lb.Case("bilinear", (64, 32, 48, 8))
    inputs = lb.make_inputs(case, np.float32)
    oracle = lb.Oracle(case, inputs, np.float32)
    with linmaps.use_backend("python"):
        z = linmaps.bilinear(inputs["x1"], inputs["x2"], inputs["weight"], inputs["bias"])
    assert oracle.check("forward", [z]).ok
    off = z.copy()
    off[5, 3] += 1e-3 * np.abs(z).max()
    check = oracle.check("forward", [off])
    assert not check.ok and "(5, 3)" in check.message


MIXED_FIELDS = {
    "status",
    "check",
    "first_step_s",
    "t_numpy_s",
    "t_linmaps_s",
    "t_alternating_s",
    "ratio",
    "ratio_rounds",
    "n_rounds",
    "rounds_s",
    "steps_per_round",
    "environment",
}


def test_cli_quick_mixed_run(tmp_path):
    # The mixed cases end to end: a worker per backend times the NumPy part, the linmaps part
    # and the alternating step; the ratio reaches the table, the summary, the JSON and the chart.
    json_path, png_path = tmp_path / "mixed.json", tmp_path / "mixed.png"
    proc = run_bench_cli(
        "--no-memory", "--cases", "mixed", "--json", str(json_path), "--plot", str(png_path)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1.00 = mixing costs nothing; the target is >= 0.9" in proc.stdout
    assert "mixing ratio" in proc.stdout  # the summary's line

    result = json.loads(json_path.read_text())
    assert result["cases"] == []
    assert [case["id"] for case in result["mixed"]] == ["mixed-long", "mixed-short"]
    assert result["settings"]["mixed_rounds"] >= 1
    available = [name for name, status in result["backends"].items() if status["available"]]
    assert "python" in available
    for case in result["mixed"]:
        assert case["kind"] == "mixed" and case["dtype"] == "float32"
        assert len(case["dims"]) == 5 and set(case["flops"]) == {"numpy", "linmaps"}
        assert case["id"] in proc.stdout
        assert set(case["results"]) == set(result["backends"])
        for name, record in case["results"].items():
            if name not in available:
                assert record["status"] == "unavailable"
                continue
            if name in ("torch", "jax"):  # peers: the mixed cases time linmaps' own calls
                assert record["status"] == "not applicable" and record["reason"]
                continue
            assert record["status"] == "ok", record
            assert set(record) >= MIXED_FIELDS
            assert record["check"]["passed"]
            times = [record[f"t_{part}_s"] for part in ("numpy", "linmaps", "alternating")]
            assert all(math.isfinite(t) and t > 0 for t in times)
            assert math.isfinite(record["ratio"]) and record["ratio"] > 0
            assert record["ratio"] == pytest.approx(sum(times[:2]) / times[2])
            assert len(record["ratio_rounds"]) == record["n_rounds"]
            assert record["n_rounds"] == result["settings"]["mixed_rounds"]
            assert f"{record['ratio']:.2f}" in proc.stdout
            # The harness sets none of the wait-policy variables: the worker's environment is
            # the caller's (the default one unless the caller set some).
            environment = record["environment"]
            inherited = {v: os.environ[v] for v in lb.MIXED_ENV_VARIABLES if v in os.environ}
            assert environment["variables"] == inherited
            assert environment["default"] == (not inherited)
            assert environment["linmaps_threads"] == result["settings"]["threads"]
    if "matplotlib" in result["versions"]:
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "chart skipped" in proc.stdout


class _NotLinmaps(lb.FunctionalBackend):
    def __init__(self):
        super().__init__(
            "other", linmaps.linear, linmaps.linear_backward, linmaps.bilinear, _raises
        )


def test_mixed_case_in_process():
    # A tiny custom mixed case: linmaps' python backend runs it; an implementation that is not
    # linmaps is "not applicable", an unavailable one "unavailable"; none is an error.
    cases = lb.select_cases("mixed:6x8x5x3x2")
    settings = lb.Settings.for_mode(
        True, threads=lb.usable_cpus(), measure_memory=False, gemm_size=128
    )
    result = lb.run_suite(cases, ["python", _NotLinmaps(), _Missing()], settings, progress=False)
    assert result["cases"] == []
    (case,) = result["mixed"]
    assert case["id"] == "mixed-6x8x5x3x2"
    python = case["results"]["python"]
    assert python["status"] == "ok" and python["ratio"] > 0
    assert case["results"]["other"]["status"] == "not applicable"
    assert case["results"]["missing"]["status"] == "unavailable"
    assert not lb.has_errors(result)
    text = report.format_report(result)
    assert "mixed-6x8x5x3x2" in text and mixed.MIXED_GUIDE in text
    assert "not run: other (not applicable)" in text


def test_mixed_step_is_float32_and_checked():
    case = lb.MixedCase((16, 12, 8, 6, 4))
    inputs = lb.make_mixed_inputs(case, np.float32)
    assert all(array.dtype == np.float32 for array in inputs.values())  # NEP 50: no float64
    step = lb.MixedStep(inputs)
    with linmaps.use_backend("python"):
        step.run("alternating")
    outputs = step.outputs()
    assert all(output.dtype == np.float32 for output in outputs)
    assert lb.check_mixed(case, inputs, outputs).ok
    for wrong in ("pre", "z", "grad_h", "grad_weight", "grad_w1"):
        index = lb.MixedStep.output_names.index(wrong)
        off = list(outputs)
        off[index] = off[index] * np.float32(1.01)
        check = lb.check_mixed(case, inputs, off)
        assert not check.ok and f"wrong result: {wrong}" in check.message
    short = list(outputs)
    short[0] = short[0][:-1]
    assert "pre: shape" in lb.check_mixed(case, inputs, short).message


def test_case_selection():
    ids = [c.id for c in lb.select_cases("linear")]
    assert ids == [c.id for c in lb.DEFAULT_CASES if c.kind == "linear"]
    assert all(c.kind == "bilinear" for c in lb.select_cases("bilinear"))
    assert [c.id for c in lb.select_cases("mixed")] == ["mixed-long", "mixed-short"]
    assert [c.id for c in lb.select_cases("mixed-s,mixed:2x3x4x5x6")] == [
        "mixed-short",
        "mixed-2x3x4x5x6",
    ]
    assert {"mixed-long", "mixed-short"} <= {c.id for c in lb.select_cases(None)}  # default run
    with pytest.raises(ValueError, match="5 positive sizes"):
        lb.select_cases("mixed:2x3x4")
    assert [c.id for c in lb.select_cases("1024x,bilinear:2x3x4x5")] == [
        "bilinear-1024x128x128x64",
        "linear-4096x1024x1024",
        "train-step-1024x128x128x64",
        "ceiling-bilinear-1024x128x128x64",
        "ceiling-linear-4096x1024x1024",
        "bilinear-2x3x4x5",
    ]
    ceiling = [c.id for c in lb.select_cases("ceiling")]
    assert ceiling == [
        "ceiling-bilinear-" + "x".join(map(str, c.dims))
        for c in lb.DEFAULT_CASES
        if c.kind == "bilinear"
    ] + [
        "ceiling-linear-4096x1024x1024",
        "ceiling-linear-256x512x512",
        "ceiling-linear-64x4096x4096",
    ]
    assert [c.id for c in lb.select_cases("ceiling-linear,ceiling:2x3x4x5,ceiling:2x3x4")] == [
        "ceiling-linear-4096x1024x1024",
        "ceiling-linear-256x512x512",
        "ceiling-linear-64x4096x4096",
        "ceiling-bilinear-2x3x4x5",
        "ceiling-linear-2x3x4",
    ]
    with pytest.raises(ValueError, match="4 positive sizes"):
        lb.select_cases("ceiling:2x3")
    train_steps = [c.id for c in lb.select_cases("train-step")]
    assert train_steps == [
        "train-step-" + "x".join(map(str, c.dims)) for c in lb.DEFAULT_CASES if c.kind == "bilinear"
    ]
    assert [c.id for c in lb.select_cases("train-step:2x3x4x5")] == ["train-step-2x3x4x5"]
    with pytest.raises(ValueError, match="4 positive sizes"):
        lb.select_cases("train-step:2x3x4")
    assert [c.id for c in lb.select_cases("linear-1x")] == ["linear-1x64x64"]
    with pytest.raises(ValueError, match="matches no case"):
        lb.select_cases("nonsense")


def test_cli_quick_train_step_run(tmp_path):
    # The train-step case end to end in the torch backend's worker: both models' first steps
    # checked against the oracle, both timed; the speed-up reaches the table, the summary and
    # the JSON. Without torch the case is reported unavailable, not an error.
    json_path = tmp_path / "train.json"
    proc = run_bench_cli(
        "--no-memory",
        "--no-plot",
        "--cases",
        "train-step:6x4x5x3",
        "--backends",
        "python,torch",
        "--json",
        str(json_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(json_path.read_text())
    (case,) = result["train_step"]
    assert case["id"] == "train-step-6x4x5x3" and case["kind"] == "train-step"
    assert case["results"]["python"]["status"] == "not applicable"
    torch_record = case["results"]["torch"]
    if not result["backends"]["torch"]["available"]:
        assert torch_record["status"] == "unavailable" and torch_record["reason"]
        return
    assert torch_record["status"] == "ok", torch_record
    assert all(check["passed"] for check in torch_record["check"].values())
    times = torch_record["t_torch_nn_s"], torch_record["t_linmaps_torch_s"]
    assert all(math.isfinite(t) and t > 0 for t in times)
    assert torch_record["speedup"] == pytest.approx(times[0] / times[1])
    assert len(torch_record["speedup_rounds"]) == result["settings"]["mixed_rounds"]
    assert torch_record["torch_threads"] == torch_record["linmaps_threads"]
    assert "train-step speed-up of linmaps.torch over torch.nn" in proc.stdout
    assert f"{torch_record['speedup']:.1f}x" in proc.stdout


def test_train_step_check_rejects_a_wrong_gradient():
    torch = pytest.importorskip("torch")
    from linmaps_bench.cases import train_step

    case = train_step.TrainStepCase((6, 4, 5, 3))
    dtype = np.dtype(np.float32)
    oracle = lb.Oracle(case.bilinear_case, lb.make_inputs(case.bilinear_case, dtype), dtype)
    with torch.enable_grad():
        step = train_step.TrainStep(case, dtype, 0)
        first = {name: (0.0, step.first_step(name)) for name in train_step.VARIANTS}
    assert all(check.ok for check in train_step.check_first_steps(oracle, first).values())
    first["linmaps.torch"][1][3] *= np.float32(1.01)  # grad_weight 1% off
    checks = train_step.check_first_steps(oracle, first)
    assert checks["torch.nn"].ok and not checks["linmaps.torch"].ok
    assert "grad_weight" in checks["linmaps.torch"].message


def test_cpu_level_backends():
    available = "cpp" in linmaps.available_backends()
    baseline = lb.lookup_backend("cpp@baseline")
    assert baseline.name == "cpp@baseline"
    assert baseline.worker_env() == {"LINMAPS_CPU": "baseline"}
    assert (baseline.unavailable_reason() is None) == available
    assert lb.lookup_backend("cpp@sse9").unavailable_reason() is not None
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        lb.lookup_backend("fortran")


def test_thread_count_backends_run_with_their_own_thread_count():
    # "python/1" next to "python": one run measures the thread scaling. Each worker reports the
    # thread count it really ran with (linmaps' setting and the BLAS pool threadpoolctl sees).
    one = lb.lookup_backend("python/1")
    assert one.name == "python/1" and one.threads_for(8) == 1
    assert lb.lookup_backend("python").threads_for(8) == 8
    for bad in ("python/0", "python/x", "fortran/2"):
        with pytest.raises(ValueError, match="unknown backend"):
            lb.lookup_backend(bad)
    if lb.usable_cpus() < 2:
        pytest.skip("needs 2 usable CPUs to tell 1 thread from 2")
    settings = lb.Settings.for_mode(True, threads=2, measure_memory=False, gemm_size=256)
    result = lb.run_suite(lb.select_cases("linear:3x4x2"), ["python", "python/1"], settings, False)
    for name, threads in (("python", 2), ("python/1", 1)):
        status = result["backends"][name]
        assert status["isolated"] is True  # its own worker process, sized from the start
        assert status["info"]["threads"] == threads
        blas = [p for p in status["threads"]["pools"] if p.get("user_api") == "blas"]
        assert blas and all(p["num_threads"] == threads for p in blas)
    case = result["cases"][0]
    assert all(record["status"] == "ok" for record in case["results"]["python/1"].values())
    assert "cpp_vs_python/1" in case["speedups"]["forward"]


def test_cli_quick_dask_case(tmp_path):
    # The dask case end to end on a tiny custom size: in the cpp worker, a table on disk, the
    # in-memory calls, a 2-process LocalCluster, the check and both rates; reported
    # "unavailable" (not an error) where Dask is not installed.
    from linmaps_bench.cases import dask_cluster

    if "cpp" not in linmaps.available_backends():
        pytest.skip("the dask case runs in the cpp backend's worker")
    json_path = tmp_path / "dask.json"
    proc = run_bench_cli(
        "--no-memory",
        "--no-plot",
        "--backends",
        "cpp,python",
        "--cases",
        "dask:16000x8x6x3",
        "--json",
        str(json_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(json_path.read_text())
    (case,) = result["dask"]
    assert case["id"] == "dask-bilinear-16000x8x6x3" and case["dims"] == [16000, 8, 6, 3]
    assert case["results"]["python"]["status"] == "not applicable"
    record = case["results"]["cpp"]
    missing = dask_cluster.dask_missing()
    if missing is not None:
        assert record == {"status": "unavailable", "reason": missing}
        assert "linmaps[dask]" in proc.stdout
        return
    assert record["status"] == "ok", record
    assert record["check"]["passed"] and record["rows"] == 2000  # --quick: an eighth
    assert record["cluster"]["threads_per_task"] == [1, 1]
    for op in ("forward", "backward"):
        rates = record["rows_per_s"]
        assert rates["memory"][op] > 0 and rates["cluster"][op] > 0
        assert record["ratio"][op] == pytest.approx(rates["cluster"][op] / rates["memory"][op])
        assert f"{record['ratio'][op]:.2f}" in proc.stdout
    assert "dask cluster / in memory (target >= 0.8)" in proc.stdout


CEILING_CASES = "ceiling:6x5x4x3,ceiling:5x3x7x2,ceiling:8x6x5"


def test_cli_quick_ceiling_run(tmp_path):
    # The ceiling cases end to end in the cpp worker: OpenBLAS's three products, linmaps'
    # kept-T step and a layer's step (bilinear, both operand layouts), linmaps against NumPy
    # and PyTorch (linear); every first result checked, then all timed in alternating rounds;
    # the ratios reach the table, the summary, the JSON and the chart, under the CPU's name.
    if "cpp" not in linmaps.available_backends():
        pytest.skip("the ceiling cases run in the cpp backend's worker")
    json_path, png_path = tmp_path / "ceiling.json", tmp_path / "ceiling.png"
    proc = run_bench_cli(
        "--no-memory",
        "--backends",
        "cpp,python",
        "--cases",
        CEILING_CASES,
        "--json",
        str(json_path),
        "--plot",
        str(png_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(json_path.read_text())
    assert result["cases"] == [] and result["mixed"] == []
    assert f"CPU: {result['machine']['cpu_model']}; SIMD flags: " in proc.stdout
    assert "step / ceiling" in proc.stdout and "vs best" in proc.stdout
    gemm = result["reference_gemm"]["gflops"]
    rounds = result["settings"]["ceiling_rounds"]
    bilinear, bilinear_swapped, linear = result["ceiling"]
    assert [bilinear["id"], bilinear_swapped["id"], linear["id"]] == [
        "ceiling-bilinear-6x5x4x3",
        "ceiling-bilinear-5x3x7x2",
        "ceiling-linear-8x6x5",
    ]
    for case in result["ceiling"]:
        assert case["kind"] == "ceiling" and case["dtype"] == "float32"
        assert case["results"]["python"]["status"] == "not applicable"
        record = case["results"]["cpp"]
        assert record["status"] == "ok", record
        assert all(check["passed"] for check in record["check"].values())
        assert set(record["first_step_s"]) == set(record["check"]) == set(record["rounds_s"])
        environment = record["environment"]
        assert environment["linmaps_threads"] == result["settings"]["threads"]
        assert environment["blas_pools"] and environment["linmaps_isa"]
        assert all(len(values) == rounds for values in record["rounds_s"].values())
        assert all(
            len(counts) == rounds and min(counts) >= result["settings"]["ceiling_min_steps"]
            for counts in record["steps_per_round"].values()
        )
    for case in (bilinear, bilinear_swapped):
        record = case["results"]["cpp"]
        assert set(record["check"]) == {"openblas", "kept_t_step", "layer"}
        t = record["t_s"]
        assert all(
            math.isfinite(v) and v > 0 for v in [*t.values(), *record["products_s"].values()]
        )
        assert record["kept_bytes"] > 0  # the step kept T
        assert record["ratio"] == pytest.approx(t["openblas"] / t["kept_t_step"])
        assert len(record["ratio_rounds"]) == rounds
        unit = math.prod(case["dims"])
        assert record["of_gemm"]["kept_t_step"] == pytest.approx(
            8 * unit / t["kept_t_step"] / 1e9 / gemm
        )
        assert record["of_gemm"]["dP"] == pytest.approx(
            2 * unit / record["products_s"]["dP"] / 1e9 / gemm
        )
        assert f"{record['ratio']:.2f}" in proc.stdout
    record = linear["results"]["cpp"]
    torch_ran = record["torch"]["status"] == "ok"
    libraries = {"linmaps", "numpy", "torch"} if torch_ran else {"linmaps", "numpy"}
    assert set(record["check"]) == {
        f"{lib} {op}" for lib in libraries for op in ("forward", "fwd+bwd")
    }
    if not torch_ran:
        assert record["torch"]["reason"]
    for op in ("forward", "fwd+bwd"):
        t = record["t_s"][op]
        assert set(t) == libraries
        best = min(libraries - {"linmaps"}, key=t.get)
        assert record["best_peer"][op] == best
        assert record["vs_best"][op] == pytest.approx(t[best] / t["linmaps"])
        assert len(record["vs_best_rounds"][op]) == rounds
        flops = (2 if op == "forward" else 6) * math.prod(linear["dims"])
        assert record["of_gemm"][op]["linmaps"] == pytest.approx(flops / t["linmaps"] / 1e9 / gemm)
        assert f"{record['vs_best'][op]:.2f}x ({best})" in proc.stdout
    assert "ceiling: kept-T step / OpenBLAS's three products (target >= 1.0)" in proc.stdout
    if "matplotlib" in result["versions"]:
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dims", [(6, 5, 4, 3), (5, 3, 7, 2)])
def test_ceiling_products_are_the_kept_t_step_s(dims):
    # The operands the ceiling gives OpenBLAS are those of the kept-T step (docs/kernels.md):
    # T's row dots with Q plus the bias are z, dP is the gradient of the larger input, dA_hat
    # the weight gradient, each against the NumPy backend in float64. The check then accepts
    # OpenBLAS's float32 products and rejects one 1% off.
    from linmaps_bench.cases import ceiling

    case = ceiling.CeilingCase(dims)
    inputs = lb.make_inputs(case.ops_case, np.float32)
    operands = ceiling.bilinear_operands(inputs)
    exact = {name: array.astype(np.float64) for name, array in inputs.items()}
    n, in1, in2, n_out = dims
    q_in, q = (exact["x2"], in2) if in1 >= in2 else (exact["x1"], in1)
    with linmaps.use_backend("python"):
        z = linmaps.bilinear(exact["x1"], exact["x2"], exact["weight"], exact["bias"])
        grads = linmaps.bilinear_backward(
            exact["grad_out"], exact["x1"], exact["x2"], exact["weight"]
        )
    p64, a64, w64 = (operands[k].astype(np.float64) for k in ("P", "A_hat", "W"))
    t = (p64 @ a64).reshape(n, n_out, q)
    np.testing.assert_allclose(np.einsum("nlq,nq->nl", t, q_in) + exact["bias"], z, rtol=1e-5)
    grad_p = grads.grad_x1 if in1 >= in2 else grads.grad_x2
    np.testing.assert_allclose(w64 @ a64.T, grad_p, rtol=1e-5, atol=1e-6)
    grad_a = p64.T @ w64
    expected_a = (
        grads.grad_weight.transpose(1, 0, 2) if in1 >= in2 else grads.grad_weight.transpose(2, 0, 1)
    )
    np.testing.assert_allclose(grad_a, expected_a.reshape(grad_a.shape), rtol=1e-5, atol=1e-6)

    expected = ceiling.products_oracle(operands, np.float32)
    p, a_hat, w = operands["P"], operands["A_hat"], operands["W"]
    products = [p @ a_hat, w @ a_hat.T, p.T @ w]
    assert lb.check_outputs(expected, ceiling.PRODUCTS, products).ok
    products[1] = products[1] * np.float32(1.01)
    check = lb.check_outputs(expected, ceiling.PRODUCTS, products)
    assert not check.ok and "wrong result: dP" in check.message


def test_tables_are_printed_as_each_case_finishes():
    # stdout and stderr into one pipe: the progress line announcing the second case (stderr)
    # must come after the first case's table (stdout), and the summary after the end's GEMM.
    env = dict(os.environ)
    linmaps_root = os.path.dirname(os.path.dirname(linmaps.__file__))
    env["PYTHONPATH"] = os.pathsep.join([linmaps_root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCH, "run.py"),
            "--quick",
            "--no-json",
            "--no-plot",
            "--no-memory",
            "--backends",
            "python",
            "--cases",
            TINY_CASES,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()

    def first(predicate):
        return next(i for i, line in enumerate(lines) if predicate(line))

    bilinear_table = first(lambda line: line.startswith("bilinear-3x4x5x2  (N=3"))
    linear_announced = first(lambda line: line.endswith("linear-3x4x2: inputs and oracle"))
    linear_table = first(lambda line: line.startswith("linear-3x4x2  (N=3"))
    gemm_end = first(lambda line: line.endswith("reference GEMM (end)"))
    summary = first(lambda line: line.startswith("summary: "))
    assert bilinear_table < linear_announced < linear_table < gemm_end < summary


def test_quiet_check_from_readings():
    from linmaps_bench.machine import BACKGROUND_LOAD, own_load, quiet_check

    steady = quiet_check(200.0, 190.0, [0.1, 0.2, 0.3], own_load(5.0))
    assert steady["quiet"] and steady["warnings"] == []
    assert steady["gemm_change"] == pytest.approx(-0.05)

    # A reference GEMM 20% slower at the end: something took the cores during the run.
    noisy = quiet_check(200.0, 160.0, [0.1, 0.2, 0.3], own_load(5.0))
    assert not noisy["quiet"]
    (warning,) = noisy["warnings"]
    assert "reference GEMM went from 200.0 to 160.0 GFLOP/s (-20%" in warning
    assert not quiet_check(160.0, 200.0, None, 1.0)["quiet"]  # +25%: not steady either

    # Busy before the start: a load of 2.5, where the run's own process explains ~0.1.
    assert own_load(0.0) == 0.0 and own_load(None) == 1.0
    assert own_load(6.0) == pytest.approx(1 - math.exp(-0.1))
    busy = quiet_check(200.0, 200.0, [2.5, 1.0, 0.5], own_load(6.0))
    (warning,) = busy["warnings"]
    assert "load average was 2.50 at the start" in warning
    assert busy["load_explained"] == pytest.approx(own_load(6.0) + BACKGROUND_LOAD)
    # A long-running caller (own load up to 1) with load 1.2 is within what the run explains.
    assert quiet_check(200.0, 200.0, [1.2, 1.0, 0.5], own_load(600.0))["quiet"]
    both = quiet_check(200.0, 150.0, [3.0, 3.0, 3.0], 0.0)
    assert len(both["warnings"]) == 2


def _run_main_with_fake_machine(monkeypatch, gemm_end_factor, *args):
    """``bench/run.py``'s main() in this process, its reference GEMM and load average faked:
    the start's samples 10 ms each, the end's ``gemm_end_factor`` times as long; no load."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(BENCH, "run.py"))
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    calls = []

    def fake_gemm(dtype, repeats, size):
        calls.append(size)
        return [0.01 * (gemm_end_factor if len(calls) > 1 else 1.0)] * repeats

    monkeypatch.setattr(lb.suite, "measure_gemm", fake_gemm)
    monkeypatch.setattr(lb.suite, "load_average", lambda: [0.0, 0.0, 0.0])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # main() sets them; put them back
    common = ["--quick", "--no-progress", "--no-json", "--no-plot", "--no-memory"]
    status = run.main([*common, "--backends", "python", "--cases", "linear:3x4x2", *args])
    assert len(calls) == 2  # start and end
    return status


def test_noisy_reference_warns_and_strict_quiet_exits_3(monkeypatch, capsys):
    # End samples 1.25x as long: the rate fell 20% during the run.
    assert _run_main_with_fake_machine(monkeypatch, 1.25) == 0
    out = capsys.readouterr().out
    assert "WARNING: the machine was not quiet: the reference GEMM went from" in out
    assert "(-20%" in out
    assert _run_main_with_fake_machine(monkeypatch, 1.25, "--strict-quiet") == 3
    captured = capsys.readouterr()
    assert "WARNING: the machine was not quiet" in captured.out
    assert "exit status 3" in captured.err
    # A steady reference: no warning, and --strict-quiet exits 0.
    assert _run_main_with_fake_machine(monkeypatch, 1.02, "--strict-quiet") == 0
    assert "WARNING" not in capsys.readouterr().out
