"""The bench's bfloat16 cases (bench/linmaps_bench/cases/bf16.py), end to end on tiny sizes."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

from test_bench import run_bench_cli  # noqa: E402

import linmaps_bench as lb  # noqa: E402


def test_case_selection():
    ids = [c.id for c in lb.select_cases("bf16")]
    assert ids and all(i.startswith("bf16-") for i in ids)
    picked = lb.select_cases("bf16:8x6x4,bf16:6x4x5x3")
    assert [c.id for c in picked] == ["bf16-linear-8x6x4", "bf16-bilinear-6x4x5x3"]
    with pytest.raises(ValueError, match="positive sizes"):
        lb.select_cases("bf16:2x0x3")


def test_cli_quick_bf16_run(tmp_path):
    pytest.importorskip("ml_dtypes")
    json_path = tmp_path / "bf16.json"
    proc = run_bench_cli(
        "--no-memory",
        "--no-plot",
        "--cases",
        "bf16:8x6x4,bf16:6x4x5x3",
        "--backends",
        "python,torch",
        "--json",
        str(json_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(json_path.read_text())
    linear, bilinear = result["bf16"]
    assert linear["map"] == "linear" and bilinear["map"] == "bilinear"
    for case in (linear, bilinear):
        assert case["results"]["python"]["status"] == "not applicable"
        record = case["results"]["torch"]
        if not result["backends"]["torch"]["available"]:
            assert record["status"] == "unavailable"
            continue
        assert record["status"] == "ok", record
        assert all(math.isfinite(t) and t > 0 for t in record["t_s"].values())
        errors = {v: e["error"] for v, e in record["errors"].items()}
        # float32 sums of a handful of terms; bfloat16 roundings of the inputs (2**-9 each)
        assert errors["ieee"] < 1e-6 and errors["bf16x3"] < 3e-5
        assert 1e-5 < errors["bf16"] < 2e-2 and errors["bfloat16"] < 2e-2
        assert record["errors"]["bfloat16"]["error_vs_rounded"] < 4e-3  # one final rounding
    assert "bf16 speed-up over linmaps float32 (ieee)" in proc.stdout
