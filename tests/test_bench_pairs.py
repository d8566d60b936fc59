"""The bench harness's pairs cases: selection, the oracle (it accepts the right answer and
rejects a wrong one) and a quick end-to-end run of a tiny case in the cpp worker."""

import json
import os
import sys

import numpy as np
import pytest
from test_bench import run_bench_cli

import linmaps

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import linmaps_bench as lb  # noqa: E402
from linmaps_bench.cases import pairs  # noqa: E402


def test_pairs_cases_selected():
    assert [c.id for c in lb.select_cases("pairs")] == [
        "pairs-32x40x500x1",
        "pairs-32x40x100x50",
        "pairs-8x128x256x1",
        "pairs-4x512x64x8",
    ]
    assert [c.id for c in lb.select_cases("pairs:2x3x4x5")] == ["pairs-2x3x4x5"]
    with pytest.raises(ValueError, match="4 positive sizes"):
        lb.select_cases("pairs:2x3")


def test_pairs_oracle_accepts_linmaps_and_rejects_a_transpose():
    case = pairs.PairsCase((3, 5, 4, 2))
    inputs = pairs.make_pairs_inputs(case, np.float32, 0)
    expected = pairs.pairs_oracle(case, inputs, np.float32)
    x1, x2, w, b, g = (inputs[k] for k in ("x1", "x2", "weight", "bias", "grad_out"))
    outputs = [linmaps.bilinear_pairs(x1, x2, w, b), *linmaps.bilinear_pairs_backward(g, x1, x2, w)]
    assert pairs.check_outputs(expected, pairs.OUTPUTS, outputs).ok
    outputs[0] = np.ascontiguousarray(outputs[0].transpose(0, 2, 1, 3))
    assert not pairs.check_outputs(expected, pairs.OUTPUTS, outputs).ok
    assert pairs.check_outputs(expected, pairs.OUTPUTS, pairs._numpy_step(x1, x2, w, b, g)).ok


def test_cli_quick_pairs_run(tmp_path):
    if "cpp" not in linmaps.available_backends():
        pytest.skip("the pairs cases run in the cpp backend's worker")
    json_path = tmp_path / "pairs.json"
    proc = run_bench_cli(
        "--no-memory",
        "--backends",
        "cpp,python",
        "--cases",
        "pairs:2x3x4x2",
        "--json",
        str(json_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(json_path.read_text())
    (case,) = result["pairs"]
    assert case["id"] == "pairs-2x3x4x2" and case["kind"] == "pairs"
    assert case["results"]["python"]["status"] == "not applicable"
    record = case["results"]["cpp"]
    assert record["status"] == "ok", record
    assert {"linmaps", "numpy"} <= set(record["check"])
    assert all(check["passed"] for check in record["check"].values())
    assert set(record["vs"]) == set(record["t_s"]) - {"linmaps"}
    assert "pairs: linmaps fwd+bwd vs" in proc.stdout
