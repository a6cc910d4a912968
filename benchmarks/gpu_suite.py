"""Every accelerator measurement in one command, inside a time budget, most important first:
for a GPU lent for a few minutes, or a first look at a new machine.

  python benchmarks/gpu_suite.py --out=/tmp/gpu                 # --budget_s=480: 8 minutes
  python benchmarks/gpu_suite.py --out=/tmp/gpu --only=attention,mae_b16
  python benchmarks/gpu_suite.py --smoke --out=/tmp/suite       # CI: tiny sizes, on the CPU

Each step runs one benchmark script in a subprocess, with the repository on PYTHONPATH (no
install needed) and a timeout of what is left of the budget. A step that fails does not stop
the next, and its summary says why (the last line of its exception); a step that cannot get
its minimum time is skipped, and says so. Scripts write their JSON as each part ends, so a
step cut short still reports what it measured.

  versions         step_time.py --mode=versions: jax, jaxlib, cuDNN, cuBLAS, CUDA, the devices;
                   a broken environment fails here and the other steps are skipped.
  attention        step_time.py --mode=attention: one attention layer forward and backward at
                   ViT-B/16's real shapes (batch 256; MAE's and AMT's token counts), cuDNN's
                   fused kernel against einsum: whether it runs, ms, largest gradient
                   difference. The fused path is used below only if it passed and was faster.
  mae_b16          step_time.py: ViT-B/16 MAE (one view, mask 0.75), batch 256, bfloat16:
                   img/s, MFU, cuDNN calls; AMT's token counts (amt_throw_speedup); then a
                   profile of the same compiled step (not compiled again) and the optimizer
                   update alone.
  idle             step_time.py --mode=idle: command buffers on and off, one sync per step
                   against one per 20 steps (device idle per step).
  xla_flags        step_time.py --mode=xla_flags: cuBLASLt, cuDNN LayerNorm, Triton GEMM off,
                   cuDNN GEMM fusion level 2, each alone against the default, alternated.
  compare          compare.py: PyTorch with torch.compile and bf16 autocast at mae_b16's
                   setting, against mae_b16's numbers: `ratio`, both throw speedups.
  vit_b_max_batch  configs/vit_b.py (MV-MAE + AMT, two views) at the largest per-device batch
                   whose compiled step fits: img/s and MFU.
  max_batch_compare  compare.py --find_max_batch: each framework at its own largest batch.

Writes one JSON per step and summary.json (each step's command, exit status, seconds,
headline numbers, and for a step that failed why and the end of its output) into --out. JAX's
persistent compilation cache is shared by the steps (--cache_dir).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app, flags

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Folder for the steps' JSONs and summary.json.", required=True)
flags.DEFINE_integer("budget_s", 480, "Seconds for all the steps together.")
flags.DEFINE_list("only", [], "Run only these steps (names as in the module docstring).")
flags.DEFINE_bool("smoke", False, "Every step at tiny sizes, for the CI test on a CPU.")
flags.DEFINE_string("cache_dir", "", "JAX's persistent compilation cache; '' is a temporary "
                    "folder of this run.")
flags.DEFINE_integer("batch", 256, "Global batch of the attention and compare steps.")

# compare.py's setting as step_time.py flags: ViT-B/16 MAE, random masking 0.75.
MAE_B16 = ("--config.model.variant=B/16", "--config.img_size=224", "--config.views.num=1",
           "--config.masking.strategy=random", "--config.masking.mask_ratio=0.75",
           "--config.masking.throw_ratio=0.0", "--config.contrastive.weight=0.0")


@dataclasses.dataclass(frozen=True)
class Step:
    """One benchmark run: `script` in benchmarks/ with `args(results so far)`; it needs at
    least `min_s` seconds of the budget and gets at most `max_s`. When a `gate` step does not
    succeed, the steps after it are skipped (they would fail the same way, more slowly)."""

    name: str
    script: str
    args: Callable[[Mapping[str, dict]], list[str]]
    min_s: float
    max_s: float
    gate: bool = False
    # The script takes --time_limit_s and, given the step's timeout, ends with what it has.
    time_limit: bool = False


def chosen_attention(results: Mapping[str, dict]) -> str:
    """"fused" where the attention step found it correct and faster at every shape, else
    "einsum"."""
    data = results.get("attention", {}).get("json") or {}
    shapes = data.get("shapes", {})
    if not shapes or not data.get("fused_passed"):
        return "einsum"
    faster = all(s["fused"]["ms"] < s["einsum"]["ms"] for s in shapes.values())
    return "fused" if faster else "einsum"


def plan(smoke: bool, batch: int) -> list[Step]:
    """The steps in order (see the module docstring); `smoke`: tiny sizes for a CPU."""
    if smoke:
        setting = ["--tiny", *MAE_B16, "--steps=1", "--warmup=1", "--config.batch_size=8",
                   "--num_examples=64"]
        compare = ["--tiny", "--model=B/16", "--batch=8", "--steps=1", "--warmup=1",
                   "--num_examples=64"]
        extras = ["--profile_steps=1", "--optimizer_steps=1"]
        max_batch = [*setting, "--memory_limit_gib=0.005"]
        max_compare = [*compare, "--memory_limit_gib=0.005"]
        sweep = ["--candidates=xla_gpu_enable_triton_gemm=false"]
        idle = ["--idle_steps=2", "--pairs=1"]
    else:
        setting = ["--config=configs/vit_b.py", *MAE_B16, f"--config.batch_size={batch}",
                   "--dtype=auto", "--steps=10"]
        compare = ["--model=B/16", f"--batch={batch}", "--torch_compile"]
        extras = ["--profile_steps=2", "--optimizer_steps=10"]
        # The search starts from the compiled step's memory at this batch (compiled without
        # autotuning), not at vit_b's 4096 per device.
        max_batch = ["--config=configs/vit_b.py", f"--config.batch_size={batch}",
                     "--dtype=auto", "--steps=5"]
        max_compare = [*compare, "--steps=5"]
        sweep = ["--steps=5", "--pairs=2"]
        idle = ["--idle_steps=20", "--pairs=2"]

    def attention(done: Mapping[str, dict]) -> str:
        return f"--config.model.attention={chosen_attention(done)}"

    def against_ours(done: Mapping[str, dict]) -> list[str]:
        ours = done.get("mae_b16", {})
        path = ours.get("json_path") if ours.get("status") == "ok" else None
        return [f"--set=model.attention={chosen_attention(done)}",
                *([f"--ours={path}"] if path else [])]

    return [
        Step("versions", "step_time.py", lambda _: ["--mode=versions"], min_s=10, max_s=60,
             gate=True),
        Step("attention", "step_time.py",
             lambda _: ["--mode=attention", "--dtype=auto", "--steps=10",
                        *(["--tiny", "--steps=1"] if smoke else [])],
             min_s=30, max_s=90),
        Step("mae_b16", "step_time.py",
             lambda done: [*setting, "--amt_throw", *extras, attention(done)],
             min_s=60, max_s=180),
        Step("idle", "step_time.py",
             lambda done: [*setting, "--mode=idle", *idle, attention(done)],
             min_s=40, max_s=100, time_limit=True),
        Step("xla_flags", "step_time.py",
             lambda done: [*setting, "--mode=xla_flags", *sweep, attention(done)],
             min_s=60, max_s=150, time_limit=True),
        Step("compare", "compare.py", lambda done: [*compare, *against_ours(done)],
             min_s=60, max_s=180),
        Step("vit_b_max_batch", "step_time.py",
             lambda done: [*max_batch, "--find_max_batch", attention(done)],
             min_s=60, max_s=180),
        Step("max_batch_compare", "compare.py",
             lambda done: [*max_compare, "--find_max_batch", "--noamt_throw",
                           f"--set=model.attention={chosen_attention(done)}"],
             min_s=90, max_s=240),
    ]


HEADLINES = ("img_per_s", "step_s", "batch", "mfu", "mfu_xla", "compile_s", "versions",
             "backend", "fused_passed", "optimizer_update",
             "peak_memory_bytes", "cudnn_attention_calls", "device_kind", "ratio",
             "jax_img_per_s", "torch_img_per_s", "amt_throw_speedup", "torch_amt_throw_speedup",
             "jax_mfu", "torch_mfu", "winners", "command_buffers_off_over_default",
             "step_s_while_tracing", "ops_ms_per_step", "step_ms_not_in_ops")


def headline(data: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of a step's JSON that the summary shows (the main run's, for step_time.py's
    time mode, whose per-run fields sit under runs.main)."""
    main = data.get("runs", {}).get("main", {}) if isinstance(data.get("runs"), dict) else {}
    found = {key: data[key] for key in HEADLINES if key in data}
    for key in HEADLINES:
        if key not in found and key in main:
            found[key] = main[key]
    if "torch_img_per_s" in data:  # compare.py
        found["batch"] = data["settings"]["batch"]
        found["dtype"] = data["settings"]["dtype"]
        found["torch_mode"] = data["settings"]["torch_mode"]
    elif "attention" in main:
        found["attention"] = main["attention"]
        found["dtype"] = main["dtype"]
    if "settings" in data and "attention" in data["settings"]:  # profile, idle, xla_flags
        found["attention"] = data["settings"]["attention"]
    profile = data.get("profile") or (data if "top_ops" in data else None)
    if profile:  # mae_b16's trace, or --mode=profile
        found["top_kinds_ms"] = dict(list(profile["by_kind_ms_per_step"].items())[:8])
        found["step_ms_not_in_ops"] = profile["step_ms_not_in_ops"]
    if "shapes" in data:  # --mode=attention
        found["attention_ms"] = {
            name: {impl: r[impl].get("ms") if r[impl]["ok"] else r[impl].get("error", "failed")
                   for impl in ("einsum", "fused")} for name, r in data["shapes"].items()}
    if "results" in data:  # --mode=idle
        found["host_gap_ms_per_step"] = {name: round(r["host_gap_ms_per_step"], 3)
                                         for name, r in data["results"].items()}
        found["step_s_sync_once"] = {name: r["step_s_sync_once"]
                                     for name, r in data["results"].items()}
    if "flags" in data:  # --mode=xla_flags
        found["flags"] = {name: {k: f[k] for k in ("step_s_ratio_median", "verdict", "error")
                                 if k in f}
                          for name, f in data["flags"].items()}
    if data.get("max_batch_search"):
        found["max_batch_search_s"] = data["max_batch_search"].get("search_s")
    return found


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt"
                             r"|NotFound|Exhausted)\b.*")


def failure_reason(output: str, code: int | None, timeout_s: float) -> str:
    """Why a step failed, in one line: a timeout, else the last exception line of its output
    (a traceback's last line), else its last line."""
    if code is None:
        return f"timed out after {timeout_s:.0f} s"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line[:500]
    if code == 0:
        return "exited 0 without writing its JSON"
    return (lines[-1][:500] if lines else "no output") + f" (exit status {code})"


def environment(cache_dir: str) -> dict[str, str]:
    """The steps' environment: the repository importable without an install, one compilation
    cache for all of them."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_steps(steps: Sequence[Step], out: pathlib.Path, budget_s: float,
              runner: Callable[[list[str], float], tuple[int | None, str]],
              clock: Callable[[], float] = time.monotonic) -> dict[str, dict]:
    """Runs `steps` in order inside `budget_s`; `runner(command, timeout_s)` returns (exit
    status, None on a timeout; output) and writes the JSON the command names. Returns each
    step's record."""
    deadline = clock() + budget_s
    results: dict[str, dict] = {}
    failed_gate = None
    for step in steps:
        left = deadline - clock()
        if failed_gate:
            results[step.name] = {"status": "skipped", "why": f"{failed_gate} did not succeed"}
            continue
        if left < step.min_s:
            results[step.name] = {"status": "skipped",
                                  "why": f"{left:.0f} s of the budget left, needs {step.min_s}"}
            continue
        json_path = out / f"{step.name}.json"
        timeout = min(step.max_s, left)
        command = [sys.executable, str(HERE / step.script), f"--json={json_path}",
                   *step.args(results)]
        if step.time_limit:  # a margin to write the JSON and exit
            command.append(f"--time_limit_s={max(timeout - 15, 1):.0f}")
        print(f"[suite] {step.name} (at most {timeout:.0f} s): {' '.join(command)}",
              file=sys.stderr, flush=True)
        started = clock()
        code, output = runner(command, timeout)
        record: dict[str, Any] = {"command": command, "exit_status": code,
                                  "seconds": round(clock() - started, 1)}
        if json_path.exists():  # whole, or the parts a step cut short had written
            record["json"] = json.loads(json_path.read_text())
            record["json_path"] = str(json_path)
        if code == 0 and "json" in record:
            record["status"] = "ok"
        else:
            record["status"] = "timed out" if code is None else "failed"
            record["why"] = failure_reason(output, code, timeout)
            record["output_tail"] = output[-3000:]
        results[step.name] = record
        if step.gate and record["status"] != "ok":
            failed_gate = step.name
        print(f"[suite] {step.name}: {record['status']} in {record['seconds']} s"
              + (f": {record['why']}" if "why" in record else ""), file=sys.stderr, flush=True)
    return results


def subprocess_runner(env: Mapping[str, str],
                      ) -> Callable[[list[str], float], tuple[int | None, str]]:
    def run(command: list[str], timeout_s: float) -> tuple[int | None, str]:
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            output = error.stderr or b""
            return None, output.decode(errors="replace") if isinstance(output, bytes) else output
        return done.returncode, done.stdout + done.stderr
    return run


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    steps = plan(FLAGS.smoke, FLAGS.batch)
    unknown = set(FLAGS.only) - {step.name for step in steps}
    if unknown:
        raise app.UsageError(f"--only: unknown steps {sorted(unknown)}")
    if FLAGS.only:
        steps = [step for step in steps if step.name in FLAGS.only]
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = environment(FLAGS.cache_dir or tmp)
        results = run_steps(steps, out, FLAGS.budget_s, subprocess_runner(env))
    summary = {name: {k: v for k, v in record.items() if k != "json"}
               | ({"headline": headline(record["json"])} if "json" in record else {})
               for name, record in results.items()}
    summary["settings"] = {"budget_s": FLAGS.budget_s, "smoke": FLAGS.smoke,
                           "batch": FLAGS.batch, "attention": chosen_attention(results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if any(record["status"] == "failed" for record in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
