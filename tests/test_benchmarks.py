"""Smoke tests: each benchmark script runs at a tiny size and writes the JSON it promises."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_input_pipeline_benchmark(tmp_path):
    """benchmarks/input_pipeline.py --tiny: rates per thread count, the step rate, the ratio."""
    out = tmp_path / "input.json"
    subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--tiny", "--threads=1,2",
                    f"--json={out}"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    rates = result["input"]["examples_per_s_by_threads"]
    assert set(rates) == {"1", "2"} and all(r > 0 for r in rates.values())
    assert result["input"]["examples_per_s_per_core"] > 0
    assert result["train_step"]["images_per_s"] > 0 and result["train_step"]["phase"] == "amt"
    assert result["cores_to_feed_one_step_stream"] > 0
