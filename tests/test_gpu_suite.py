"""benchmarks/gpu_suite.py: the accelerator measurements in one command inside a time budget.

The plan and the budget are checked with a fake runner and clock; the whole suite runs at tiny
sizes on this CPU with TensorFlow, tensorflow-datasets and clu made unimportable, as on the GPU
machines' image, which has none of them.
"""

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

STEP_NAMES = ["check", "attention_einsum", "attention_fused", "compare", "idle",
              "vit_b_max_batch", "max_batch_compare", "xla_flags", "profile"]


def _flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) <= 1, (name, values)
    return values[0] if values else None


def test_plan_measures_the_issues_settings():
    """ViT-B/16 MAE at batch 256 in bf16 with each attention; compare with torch.compile and
    the faster attention; idle, the flag sweep and the profile at that setting; vit_b and
    both frameworks at their largest batch."""
    steps = {step.name: step for step in gpu_suite.plan(smoke=False, batch=256)}
    assert list(steps) == STEP_NAMES
    assert {step.script for step in steps.values()} == {"step_time.py", "compare.py"}
    for attention in ("einsum", "fused"):
        args = steps[f"attention_{attention}"].args({})
        assert _flag(args, "config.model.attention") == attention
        assert _flag(args, "config.model.variant") == "B/16"
        assert _flag(args, "config.batch_size") == "256"
        assert _flag(args, "config.views.num") == "1"
        assert _flag(args, "config.masking.mask_ratio") == "0.75"
        assert _flag(args, "dtype") == "auto" and _flag(args, "mode") is None
    fused_faster = {"attention_einsum": {"json": {"step_s": 0.20}},
                    "attention_fused": {"json": {"step_s": 0.15}}}
    compare = steps["compare"].args(fused_faster)
    assert steps["compare"].script == "compare.py"
    assert "--torch_compile" in compare and _flag(compare, "model") == "B/16"
    assert _flag(compare, "set") == "model.attention=fused" and _flag(compare, "batch") == "256"
    largest = steps["vit_b_max_batch"].args(fused_faster)
    assert "--find_max_batch" in largest and _flag(largest, "config") == "configs/vit_b.py"
    assert _flag(largest, "config.model.attention") == "fused"
    assert _flag(largest, "config.batch_size") == "256"  # where the memory search starts
    both = steps["max_batch_compare"].args(fused_faster)
    assert steps["max_batch_compare"].script == "compare.py"
    assert {"--find_max_batch", "--torch_compile", "--noamt_throw"} <= set(both)
    assert _flag(both, "set") == "model.attention=fused"
    for name, mode in (("idle", "idle"), ("xla_flags", "xla_flags"), ("profile", "profile")):
        args = steps[name].args(fused_faster)
        assert _flag(args, "mode") == mode, name
        assert _flag(args, "config.model.attention") == "fused", name
        assert _flag(args, "config.model.variant") == "B/16", name
        assert _flag(args, "config.batch_size") == "256", name
    assert _flag(steps["idle"].args({}), "idle_steps") == "20"
    assert int(_flag(steps["xla_flags"].args({}), "pairs")) >= 2
    assert _flag(steps["xla_flags"].args({}), "candidates") is None  # all of them
    assert _flag(steps["profile"].args({}), "compiler_option") == (
        "xla_enable_command_buffers_during_profiling=true")
    # Einsum when the fused step did not run (or failed): the measured default.
    assert _flag(steps["compare"].args({"attention_einsum": {"json": {"step_s": 1.0}}}),
                 "set") == "model.attention=einsum"


def test_the_default_budget_is_eight_minutes():
    """The suite ends inside --budget_s (480 s by default): no step's minimum exceeds it, and
    each step is allowed at most half of it."""
    steps = gpu_suite.plan(smoke=False, batch=256)
    assert gpu_suite.FLAGS["budget_s"].default == 480
    assert all(step.min_s <= step.max_s <= 480 / 2 for step in steps)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_skips_failures_continue_and_timeouts_are_recorded(tmp_path):
    """Each step gets min(max_s, what is left); a step that cannot get min_s is skipped; a
    failed or timed-out step does not stop the next one."""
    clock = FakeClock()
    steps = [gpu_suite.Step(name, "x.py", lambda _: [], min_s=10, max_s=100)
             for name in ("a", "b", "c", "d", "e")]
    behaviour = {"a": (0, 30.0), "b": (3, 20.0), "c": (None, 100.0), "d": (0, 5.0)}
    timeouts = {}

    def runner(command, timeout_s):
        name = pathlib.Path(_flag(command, "json")).stem
        timeouts[name] = timeout_s
        code, seconds = behaviour[name]
        clock.now += seconds
        if code == 0:
            (tmp_path / f"{name}.json").write_text(json.dumps({"step_s": seconds}))
        return code, f"output of {name}"

    results = gpu_suite.run_steps(steps, tmp_path, budget_s=160, runner=runner, clock=clock)
    assert timeouts == {"a": 100, "b": 100, "c": 100, "d": 10}
    assert [results[n]["status"] for n in "abcde"] == [
        "ok", "failed", "timed out", "ok", "skipped"]
    assert results["a"]["json"] == {"step_s": 30.0} and results["a"]["seconds"] == 30.0
    assert results["b"]["output_tail"] == "output of b" and results["b"]["exit_status"] == 3
    assert results["b"]["why"] == "output of b (exit status 3)"
    assert results["c"]["why"] == "timed out after 100 s"
    assert "needs 10" in results["e"]["why"]


def test_failure_reason_is_the_exceptions_last_line():
    """A traceback's last exception line (a shape the kernel refuses, a compile out of
    memory, a usage error), not the log lines printed after it."""
    traceback = """I1129 compiling
ValueError: an earlier exception, the cause of the next
Traceback (most recent call last):
  File "step_time.py", line 3, in <module>
    raise NotImplementedError(...)
NotImplementedError: Unsupported sequence length Q 197, KV 197
W1129 12:00:00.000 cleanup
"""
    assert gpu_suite.failure_reason(traceback, 1, 100) == (
        "NotImplementedError: Unsupported sequence length Q 197, KV 197")
    oom = "jaxlib._jax.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB"
    assert gpu_suite.failure_reason(f"log\n{oom}\n", 1, 100) == oom
    assert gpu_suite.failure_reason("torch.OutOfMemoryError: CUDA out of memory", 1, 1) == (
        "torch.OutOfMemoryError: CUDA out of memory")
    assert gpu_suite.failure_reason("", 0, 100) == "exited 0 without writing its JSON"
    assert gpu_suite.failure_reason("", None, 42.4) == "timed out after 42 s"


def test_a_failed_gate_skips_the_rest(tmp_path):
    steps = [gpu_suite.Step("gate", "x.py", lambda _: [], min_s=1, max_s=10, gate=True),
             gpu_suite.Step("next", "x.py", lambda _: [], min_s=1, max_s=10)]
    ran = []

    def runner(command, timeout_s):
        ran.append(command)
        return 1, "ImportError"

    results = gpu_suite.run_steps(steps, tmp_path, budget_s=100, runner=runner,
                                  clock=FakeClock())
    assert len(ran) == 1 and results["gate"]["status"] == "failed"
    assert results["next"] == {"status": "skipped", "why": "gate did not succeed"}
    assert [s.gate for s in gpu_suite.plan(smoke=False, batch=256)] == [True] + [False] * 8


def test_headline_reads_the_main_run_and_compare():
    ours = {"img_per_s": 1000.0, "batch": 256, "device_kind": "NVIDIA H100 80GB HBM3",
            "runs": {"main": {"step_s": 0.256, "mfu": 0.5, "attention": "fused",
                              "dtype": "bfloat16", "cudnn_attention_calls": 40}}}
    assert gpu_suite.headline(ours) == {
        "img_per_s": 1000.0, "batch": 256, "device_kind": "NVIDIA H100 80GB HBM3",
        "step_s": 0.256, "mfu": 0.5, "cudnn_attention_calls": 40, "attention": "fused",
        "dtype": "bfloat16"}
    compare = {"ratio": 1.4, "jax_img_per_s": 1400.0, "torch_img_per_s": 1000.0,
               "settings": {"batch": {"jax": 256, "torch": 256},
                            "dtype": {"jax": "bfloat16", "torch": "bfloat16 autocast"},
                            "torch_mode": "torch.compile"}}
    assert gpu_suite.headline(compare)["ratio"] == 1.4
    assert gpu_suite.headline(compare)["torch_mode"] == "torch.compile"
    sweep = {"settings": {"attention": "fused"}, "winners": ["a=1"],
             "flags": {"a=1": {"step_s_ratio_median": 0.9, "verdict": "winner",
                               "step_s_ratios": [0.9, 0.9]},
                       "b=1": {"verdict": "error", "error": "INVALID_ARGUMENT: No such option"}}}
    assert gpu_suite.headline(sweep) == {
        "winners": ["a=1"], "attention": "fused",
        "flags": {"a=1": {"step_s_ratio_median": 0.9, "verdict": "winner"},
                  "b=1": {"verdict": "error", "error": "INVALID_ARGUMENT: No such option"}}}


@pytest.mark.slow
def test_suite_smoke_without_tensorflow(tmp_path):
    """Every step at tiny sizes, with tensorflow, tensorflow_datasets and clu unimportable and
    the package found through PYTHONPATH only: summary.json and one JSON per step."""
    blocker = tmp_path / "blocked"
    for name in ("tensorflow", "tensorflow_datasets", "clu"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not on the GPU image')\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(blocker))
    out = tmp_path / "out"
    # A budget for a slow CI machine; on a GPU the suite keeps to its 480 s.
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke",
                           "--budget_s=1500", f"--out={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [n for n in summary if n != "settings"] == STEP_NAMES
    assert all(summary[n]["status"] == "ok" for n in STEP_NAMES), summary
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.json" for n in STEP_NAMES] + ["summary.json"])
    for attention in ("einsum", "fused"):
        head = summary[f"attention_{attention}"]["headline"]
        assert head["attention"] == attention and head["cudnn_attention_calls"] == 0
        assert head["img_per_s"] > 0
    faster = summary["settings"]["faster_attention"]
    assert summary["compare"]["headline"]["ratio"] > 0
    largest = summary["vit_b_max_batch"]["headline"]
    assert largest["attention"] == faster
    assert largest["batch"] > 8  # found from the compiled step's memory
    both = summary["max_batch_compare"]["headline"]
    assert both["ratio"] > 0 and both["batch"]["jax"] > 8  # PyTorch: the given batch on a CPU
    idle = summary["idle"]["headline"]
    assert set(idle["host_gap_ms_per_step"]) == {"command_buffers_default",
                                                 "command_buffers_off"}
    assert idle["command_buffers_off_over_default"] > 0 and idle["attention"] == faster
    flags = summary["xla_flags"]["headline"]["flags"]
    assert flags["xla_gpu_enable_triton_gemm=false"]["step_s_ratio_median"] > 0
    profile = summary["profile"]["headline"]
    assert profile["ops_ms_per_step"] > 0 and profile["top_kinds_ms"]
    assert profile["attention"] == faster


def test_steps_with_a_time_limit_are_told_their_timeout(tmp_path):
    """The idle and flag-sweep steps get --time_limit_s, 15 s under their timeout, so that
    they write what they measured instead of being killed."""
    steps = {step.name: step for step in gpu_suite.plan(smoke=False, batch=256)}
    assert {name for name, step in steps.items() if step.time_limit} == {"idle", "xla_flags"}
    commands = {}

    def runner(command, timeout_s):
        commands[pathlib.Path(_flag(command, "json")).stem] = command
        return 1, ""

    gpu_suite.run_steps([steps["idle"], steps["compare"]], tmp_path, budget_s=100,
                        runner=runner, clock=FakeClock())
    assert _flag(commands["idle"], "time_limit_s") == "85"  # min(max_s 120, budget 100) - 15
    assert _flag(commands["compare"], "time_limit_s") is None
