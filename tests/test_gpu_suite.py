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
import step_time  # noqa: E402

STEP_NAMES = ["versions", "attention", "mae_b16", "idle", "xla_flags", "compare",
              "vit_b_max_batch", "max_batch_compare"]


def _flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) <= 1, (name, values)
    return values[0] if values else None


def _attention_result(fused_ms: float, passed: bool = True) -> dict:
    shapes = {name: {"einsum": {"ok": True, "ms": 1.0},
                     "fused": {"ok": passed, "ms": fused_ms}}
              for name in ("mae_encoder", "mae_decoder")}
    return {"attention": {"json": {"shapes": shapes, "fused_passed": passed}}}


def test_plan_measures_in_the_order_of_a_short_window():
    """Versions first, then the attention micro-benchmark at the real shapes, ViT-B/16 MAE at
    batch 256 in bf16 with its profile and optimizer update, idle time, the four flags, and
    PyTorch last (against mae_b16's own JSON); the fused attention only where it passed and
    was faster at every shape."""
    steps = {step.name: step for step in gpu_suite.plan(smoke=False, batch=256)}
    assert list(steps) == STEP_NAMES
    assert _flag(steps["versions"].args({}), "mode") == "versions" and steps["versions"].gate
    attention = steps["attention"].args({})
    assert _flag(attention, "mode") == "attention" and "--tiny" not in attention
    mae = steps["mae_b16"].args({})
    assert _flag(mae, "config.model.variant") == "B/16"
    assert _flag(mae, "config.batch_size") == "256"
    assert _flag(mae, "config.views.num") == "1"
    assert _flag(mae, "config.masking.mask_ratio") == "0.75"
    assert _flag(mae, "dtype") == "auto" and _flag(mae, "mode") is None
    assert "--amt_throw" in mae and int(_flag(mae, "profile_steps")) > 0
    assert int(_flag(mae, "optimizer_steps")) > 0
    fused_faster = _attention_result(0.5)
    for name, mode in (("mae_b16", None), ("idle", "idle"), ("xla_flags", "xla_flags"),
                       ("vit_b_max_batch", None)):
        args = steps[name].args(fused_faster)
        assert _flag(args, "mode") == mode, name
        assert _flag(args, "config.model.attention") == "fused", name
        assert _flag(steps[name].args(_attention_result(2.0)),
                     "config.model.attention") == "einsum", name
        assert _flag(steps[name].args(_attention_result(0.5, passed=False)),
                     "config.model.attention") == "einsum", name
        assert _flag(steps[name].args({}), "config.model.attention") == "einsum", name
    assert _flag(steps["idle"].args({}), "idle_steps") == "20"
    assert int(_flag(steps["xla_flags"].args({}), "pairs")) >= 2
    assert _flag(steps["xla_flags"].args({}), "candidates") is None  # all four
    assert step_time.XLA_FLAG_CANDIDATES == (  # cuBLASLt, cuDNN LayerNorm, no Triton GEMM
        "xla_gpu_enable_cublaslt=true", "xla_gpu_enable_cudnn_layer_norm=true",
        "xla_gpu_enable_triton_gemm=false", "xla_gpu_cudnn_gemm_fusion_level=2")
    compare = steps["compare"].args({**fused_faster, "mae_b16": {
        "status": "ok", "json_path": "/out/mae_b16.json"}})
    assert steps["compare"].script == "compare.py"
    assert "--torch_compile" in compare and _flag(compare, "model") == "B/16"
    assert _flag(compare, "set") == "model.attention=fused" and _flag(compare, "batch") == "256"
    assert _flag(compare, "ours") == "/out/mae_b16.json"
    assert _flag(steps["compare"].args({}), "ours") is None  # mae_b16 did not run: measure
    largest = steps["vit_b_max_batch"].args(fused_faster)
    assert "--find_max_batch" in largest and _flag(largest, "config") == "configs/vit_b.py"
    assert _flag(largest, "config.batch_size") == "256"  # where the memory search starts
    both = steps["max_batch_compare"].args(fused_faster)
    assert {"--find_max_batch", "--torch_compile", "--noamt_throw"} <= set(both)


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
    assert [s.gate for s in gpu_suite.plan(smoke=False, batch=256)] == [True] + [False] * 7


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
    assert summary["versions"]["headline"]["versions"]["jax"]
    shapes = summary["attention"]["headline"]["attention_ms"]
    assert set(shapes) == {"mae_encoder", "mae_decoder", "amt_encoder", "amt_decoder"}
    assert all(ms > 0 for shape in shapes.values() for ms in shape.values())
    chosen = summary["settings"]["attention"]
    mae = summary["mae_b16"]["headline"]
    assert mae["attention"] == chosen and mae["cudnn_attention_calls"] == 0
    assert mae["img_per_s"] > 0 and mae["top_kinds_ms"]
    assert mae["optimizer_update"]["step_s"] > 0
    assert summary["compare"]["headline"]["ratio"] > 0
    assert "--ours=" in " ".join(summary["compare"]["command"])
    largest = summary["vit_b_max_batch"]["headline"]
    assert largest["attention"] == chosen
    assert largest["batch"] > 8  # found from the compiled step's memory
    both = summary["max_batch_compare"]["headline"]
    assert both["ratio"] > 0 and both["batch"]["jax"] > 8  # PyTorch: the given batch on a CPU
    idle = summary["idle"]["headline"]
    assert set(idle["host_gap_ms_per_step"]) == {"command_buffers_default",
                                                 "command_buffers_off"}
    assert idle["command_buffers_off_over_default"] > 0 and idle["attention"] == chosen
    flags = summary["xla_flags"]["headline"]["flags"]
    assert flags["xla_gpu_enable_triton_gemm=false"]["step_s_ratio_median"] > 0


def test_a_step_cut_short_reports_what_it_wrote(tmp_path):
    """A step that times out after writing part of its JSON: its record keeps those parts."""
    steps = [gpu_suite.Step("a", "x.py", lambda _: [], min_s=1, max_s=10)]

    def runner(command, timeout_s):
        pathlib.Path(_flag(command, "json")).write_text(json.dumps({"img_per_s": 5.0}))
        return None, ""

    results = gpu_suite.run_steps(steps, tmp_path, budget_s=100, runner=runner,
                                  clock=FakeClock())
    assert results["a"]["status"] == "timed out" and results["a"]["json"] == {"img_per_s": 5.0}


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
    assert _flag(commands["idle"], "time_limit_s") == "85"  # min(max_s, budget 100) - 15
    assert _flag(commands["compare"], "time_limit_s") is None
