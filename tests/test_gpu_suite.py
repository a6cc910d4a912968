"""benchmarks/gpu_suite.py: the plan and the budget with a fake runner and clock, and the whole
suite at tiny sizes on this CPU with TensorFlow, tensorflow-datasets and clu unimportable, as on
the GPU machines' image."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402

STEP_NAMES = ["attention", "mae_b16", "xla_flags", "compare", "vit_b_max_batch",
              "mae_b16_max_batch", "max_batch_compare"]


def _flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) <= 1, (name, values)
    return values[0] if values else None


def _attention(fused_ms: float, passed: bool = True) -> dict:
    shapes = {name: {"einsum": {"ok": True, "ms": 1.0}, "fused": {"ok": passed, "ms": fused_ms}}
              for name in ("mae_encoder", "mae_decoder")}
    return {"attention": {"json": {"shapes": shapes, "fused_passed": passed}}}


def test_plan_in_the_order_of_a_short_window():
    """Attention at the real shapes first, ViT-B/16 MAE at batch 256 with its host gap,
    profile and optimizer update, the five flags, PyTorch against mae_b16's JSON, then the
    largest batches; fused attention only where it passed and was faster at every shape;
    every step inside half of the default 480 s budget."""
    steps = {step.name: step for step in gpu_suite.plan(smoke=False, batch=256)}
    assert list(steps) == STEP_NAMES and gpu_suite.FLAGS["budget_s"].default == 480
    assert all(s.min_s <= s.max_s <= 240 for s in steps.values())
    assert _flag(steps["attention"].args({}), "mode") == "attention"
    mae = steps["mae_b16"].args({})
    assert (_flag(mae, "config"), _flag(mae, "config.batch_size"), _flag(mae, "dtype")) == (
        "configs/mae_b.py", "256", "auto")
    assert "--amt_throw" in mae and int(_flag(mae, "profile_steps")) > 0
    assert int(_flag(mae, "optimizer_steps")) > 0 and _flag(mae, "idle_steps") == "20"
    for name, mode in (("mae_b16", None), ("xla_flags", "xla_flags"), ("vit_b_max_batch", None)):
        assert _flag(steps[name].args(_attention(0.5)), "mode") == mode, name
        for done, chosen in ((_attention(0.5), "fused"), (_attention(2.0), "einsum"),
                             (_attention(0.5, passed=False), "einsum"), ({}, "einsum")):
            assert _flag(steps[name].args(done), "config.model.attention") == chosen, name
    assert int(_flag(steps["xla_flags"].args({}), "pairs")) >= 2
    assert _flag(steps["xla_flags"].args({}), "candidates") is None  # all five
    # PyTorch at the setting of our step before it, compared with that step's JSON.
    for name, against in (("compare", "mae_b16"), ("max_batch_compare", "mae_b16_max_batch")):
        args = steps[name].args({against: {"status": "ok", "json_path": f"/out/{against}.json"}})
        assert steps[name].script == "pytorch_reference.py" and "--compile" in args, name
        assert _flag(args, "ours") == f"/out/{against}.json", name
        assert _flag(steps[name].args({against: {"status": "failed"}}), "ours") is None, name
        setting = [a for a in steps[against].args({}) if not a.startswith("--config.model.")]
        extras = {"--profile_steps=2", "--optimizer_steps=10", "--idle_steps=20"}
        assert set(setting) - extras <= set(args), name
    largest = steps["vit_b_max_batch"].args({})
    assert "--find_max_batch" in largest and _flag(largest, "config") == "configs/vit_b.py"
    assert "--find_max_batch" in steps["max_batch_compare"].args({})
    assert _flag(steps["mae_b16_max_batch"].args({}), "config") == "configs/mae_b.py"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_failures_and_timeouts(tmp_path):
    """Each step gets min(max_s, what is left) and is skipped without min_s; a failed or
    timed-out step does not stop the next and keeps the JSON it wrote."""
    clock = FakeClock()
    steps = [gpu_suite.Step(name, "x.py", lambda _: [], min_s=10, max_s=100) for name in "abcde"]
    behaviour = {"a": (0, 30.0), "b": (3, 20.0), "c": (None, 100.0), "d": (0, 5.0)}
    calls = {}

    def runner(script, args, timeout_s):
        name = pathlib.Path(_flag(args, "json")).stem
        calls[name] = timeout_s
        code, seconds = behaviour[name]
        clock.now += seconds
        if code != 3:
            (tmp_path / f"{name}.json").write_text(json.dumps({"step_s": seconds}))
        return code, f"output of {name}"

    results = gpu_suite.run_steps(steps, tmp_path, budget_s=160, runner=runner, clock=clock)
    assert calls == {"a": 100, "b": 100, "c": 100, "d": 10}
    assert [results[n]["status"] for n in "abcde"] == [
        "ok", "failed", "timed out", "ok", "skipped"]
    assert results["a"]["json"] == {"step_s": 30.0} and results["a"]["seconds"] == 30.0
    assert results["b"]["why"] == "output of b" and results["b"]["exit_status"] == 3
    assert results["c"]["why"] == "timed out after 100 s"
    assert results["c"]["json"] == {"step_s": 100.0}  # what a step cut short wrote
    assert "needs 10" in results["e"]["why"]


def test_failure_reason_is_the_exceptions_last_line():
    traceback = ("I1129 compiling\nValueError: an earlier exception\nTraceback (most recent "
                 "call last):\n  File \"step_time.py\", line 3\nNotImplementedError: Unsupported "
                 "sequence length Q 197, KV 197\nW1129 12:00:00.000 cleanup\n")
    assert gpu_suite.failure_reason(traceback, 1, 100) == (
        "NotImplementedError: Unsupported sequence length Q 197, KV 197")
    oom = "jaxlib._jax.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB"
    assert gpu_suite.failure_reason(f"log\n{oom}\n", 1, 100) == oom
    assert gpu_suite.failure_reason("", 0, 100) == "exited 0 without writing its JSON"
    assert gpu_suite.failure_reason("\n", 2, 100) == "no output"
    assert gpu_suite.failure_reason("", None, 42.4) == "timed out after 42 s"


@pytest.mark.slow
def test_suite_smoke_without_tensorflow(tmp_path):
    """Every step at tiny sizes with tensorflow, tensorflow_datasets and clu unimportable and
    the package found through PYTHONPATH only: one JSON per step and summary.json."""
    blocker = tmp_path / "blocked"
    for name in ("tensorflow", "tensorflow_datasets", "clu"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('no {name}')\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(blocker))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke",
                           "--budget_s=1500", f"--out={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [n for n in summary if n != "settings"] == STEP_NAMES
    assert all(summary[n]["status"] == "ok" for n in STEP_NAMES), summary
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.json" for n in STEP_NAMES] + ["summary.json"])
    got = {n: json.loads((out / f"{n}.json").read_text()) for n in STEP_NAMES}
    assert got["attention"]["versions"]["jax"] and not got["attention"].get("partial")
    shapes = got["attention"]["shapes"]
    assert set(shapes) == {"mae_encoder", "mae_decoder", "amt_encoder", "amt_decoder"}
    assert all(shape[impl]["ms"] > 0 for shape in shapes.values() for impl in ("einsum", "fused"))
    chosen = summary["settings"]["attention"]
    mae = got["mae_b16"]["runs"]["main"]
    assert mae["attention"] == chosen and mae["cudnn_attention_calls"] == 0
    assert mae["img_per_s"] > 0 and mae["profile"]["by_kind_ms_per_step"]
    assert mae["optimizer_update"]["step_s"] > 0
    assert got["compare"]["ratio"] > 0 and "--ours=" in " ".join(summary["compare"]["command"])
    assert got["vit_b_max_batch"]["runs"]["main"]["attention"] == chosen
    assert got["vit_b_max_batch"]["batch"] > 8  # found from the compiled step's memory
    largest = got["max_batch_compare"]
    assert largest["ours"]["batch"] == got["mae_b16_max_batch"]["batch"] > 8
    assert largest["batch"] == 8 and largest["ratio"] > 0  # PyTorch: the given batch on a CPU
    assert isinstance(mae["host_gap_ms"], float)
    sweep = got["xla_flags"]["flags"]
    assert set(sweep) == {"default", "xla_gpu_enable_triton_gemm=false",
                          "xla_gpu_enable_command_buffer="}
    for flag in ("xla_gpu_enable_triton_gemm=false", "xla_gpu_enable_command_buffer="):
        assert sweep[flag]["step_s_ratio_median"] > 0 and len(sweep[flag]["step_s_ratios"]) == 2
