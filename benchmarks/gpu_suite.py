"""Every accelerator measurement in one command inside a time budget, most important first
(docs/benchmarks.md): each step a script in a subprocess writing its JSON into --out; a failed
step does not stop the next, and summary.json says why.

  python benchmarks/gpu_suite.py --out=/tmp/gpu                 # --budget_s=480: 8 minutes
  python benchmarks/gpu_suite.py --smoke --out=/tmp/suite       # tiny sizes, on a CPU
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import bench_lib
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Folder for the steps' JSONs and summary.json.", required=True)
flags.DEFINE_integer("budget_s", 480, "Seconds for all the steps together.")
flags.DEFINE_list("only", [], "Run only these steps.")
flags.DEFINE_bool("smoke", False, "Every step at tiny sizes, for the CI test on a CPU.")
flags.DEFINE_integer("batch", 256, "Global batch of the ViT-B/16 MAE steps.")

MAE_B16 = "--config=configs/mae_b.py"  # compare.py's setting at ViT-B/16


@dataclasses.dataclass(frozen=True)
class Step:
    """benchmarks/`script` with args(results so far), given `min_s` to `max_s` of the budget.
    A failed `gate` skips the rest; `time_limit`: the script is told its timeout."""

    name: str
    script: str
    args: Callable[[Mapping[str, dict]], list[str]]
    min_s: float
    max_s: float
    gate: bool = False
    time_limit: bool = False


def chosen_attention(results: Mapping[str, dict]) -> str:
    """"fused" where the attention step found it correct and faster at every shape."""
    data = results.get("attention", {}).get("json") or {}
    shapes = data.get("shapes", {}).values()
    faster = all(s["fused"]["ms"] < s["einsum"]["ms"] for s in shapes)
    return "fused" if shapes and data.get("fused_passed") and faster else "einsum"


def plan(smoke: bool, batch: int) -> list[Step]:
    if smoke:
        short = ["--tiny", "--steps=1", "--warmup=1", "--num_examples=64"]
        setting = [*short, MAE_B16, "--config.batch_size=8"]
        compare = [*short, "--model=B/16", "--batch=8"]
        extras, limit = ["--profile_steps=1", "--optimizer_steps=1"], ["--memory_limit_gib=0.005"]
        max_batch, max_compare = [*setting, *limit], [*compare, *limit]
        sweep, idle = ["--candidates=xla_gpu_enable_triton_gemm=false"], ["--idle_steps=2"]
        attention_args = ["--tiny", "--steps=1"]
    else:
        setting = [MAE_B16, f"--config.batch_size={batch}", "--dtype=auto", "--steps=10"]
        compare = ["--model=B/16", f"--batch={batch}", "--torch_compile"]
        extras = ["--profile_steps=2", "--optimizer_steps=10"]
        # The search starts from the compiled step's memory at this batch.
        max_batch = ["--config=configs/vit_b.py", f"--config.batch_size={batch}",
                     "--dtype=auto", "--steps=5"]
        max_compare = [*compare, "--steps=5"]
        sweep, idle, attention_args = ["--steps=5", "--pairs=2"], ["--idle_steps=20"], []

    def ours(*args: str) -> Callable[[Mapping[str, dict]], list[str]]:
        return lambda done: [*args, f"--config.model.attention={chosen_attention(done)}"]

    def against_ours(done: Mapping[str, dict]) -> list[str]:
        mae = done.get("mae_b16", {})
        path = mae.get("json_path") if mae.get("status") == "ok" else None
        return [*compare, f"--set=model.attention={chosen_attention(done)}",
                *([f"--ours={path}"] if path else [])]

    steps = [
        Step("versions", "step_time.py", lambda _: ["--mode=versions"], 10, 60, gate=True),
        Step("attention", "step_time.py",
             lambda _: ["--mode=attention", "--dtype=auto", "--steps=10", *attention_args], 30, 90),
        Step("mae_b16", "step_time.py", ours(*setting, "--amt_throw", *extras), 60, 180),
        Step("idle", "step_time.py", ours(*setting, "--mode=xla_flags", *idle,  # buffers on/off
                                          "--candidates=xla_gpu_enable_command_buffer="), 40, 100,
             time_limit=True),
        Step("xla_flags", "step_time.py", ours(*setting, "--mode=xla_flags", *sweep), 60, 150,
             time_limit=True),
        Step("compare", "compare.py", against_ours, 60, 180),
        Step("vit_b_max_batch", "step_time.py", ours(*max_batch, "--find_max_batch"), 60, 180),
        Step("max_batch_compare", "compare.py",
             lambda done: [*max_compare, "--find_max_batch", "--noamt_throw",
                           f"--set=model.attention={chosen_attention(done)}"], 90, 240),
    ]  # a CPU's compiles take longer than a GPU's: the smoke run's steps get more time
    return [dataclasses.replace(s, max_s=5 * s.max_s) for s in steps] if smoke else steps


HEADLINES = ("img_per_s", "step_s", "batch", "mfu", "mfu_xla", "compile_s", "versions",
             "backend", "device_kind", "fused_passed", "optimizer_update", "peak_memory_bytes",
             "cudnn_attention_calls", "attention", "dtype", "ratio", "jax_img_per_s",
             "torch_img_per_s", "amt_throw_speedup", "torch_amt_throw_speedup", "jax_mfu",
             "torch_mfu", "torch_mode", "winners", "step_s_while_tracing", "ops_ms_per_step",
             "step_ms_not_in_ops")


def headline(data: Mapping[str, Any]) -> dict[str, Any]:
    """A step's HEADLINES (its own over its main run's over its settings') and digests of the
    profile, attention shapes and flags."""
    main = (data.get("runs") or {}).get("main", {})
    found = {k: source[k] for source in (data.get("settings") or {}, main, data)
             for k in HEADLINES if k in source}
    profile = data.get("profile") or main.get("profile") or (data if "top_ops" in data else None)
    if profile:
        found["top_kinds_ms"] = dict(list(profile["by_kind_ms_per_step"].items())[:8])
        found["step_ms_not_in_ops"] = profile["step_ms_not_in_ops"]
    if "shapes" in data:
        found["attention_ms"] = {
            name: {impl: r[impl].get("ms") if r[impl]["ok"] else r[impl].get("error", "failed")
                   for impl in ("einsum", "fused")} for name, r in data["shapes"].items()}
    if "flags" in data:
        found["flags"] = {n: {k: f[k] for k in ("step_s_ratio_median", "verdict", "error",
                                                "host_gap_ms", "sync_once_ratio") if k in f}
                          for n, f in data["flags"].items()}
    return found


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt"
                             r"|NotFound|Exhausted)\b.*")


def failure_reason(output: str, code: int | None, timeout_s: float) -> str:
    """A timeout, else the last exception line of the output, else its last line."""
    if code is None:
        return f"timed out after {timeout_s:.0f} s"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if exceptions:
        return exceptions[-1][:500]
    if code == 0:
        return "exited 0 without writing its JSON"
    return (lines[-1][:500] if lines else "no output") + f" (exit status {code})"


def run_steps(steps: Sequence[Step], out: pathlib.Path, budget_s: float,
              runner: Callable[[str, list[str], float], tuple[int | None, str]],
              clock: Callable[[], float] = time.monotonic) -> dict[str, dict]:
    """Runs `steps` in order inside `budget_s`; runner(script, args, timeout_s) returns (exit
    status or None on a timeout, output). Returns each step's record."""
    deadline = clock() + budget_s
    results: dict[str, dict] = {}
    failed_gate = None
    for step in steps:
        left = deadline - clock()
        if failed_gate or left < step.min_s:
            why = f"{failed_gate} did not succeed" if failed_gate else (
                f"{left:.0f} s of the budget left, needs {step.min_s}")
            results[step.name] = {"status": "skipped", "why": why}
            continue
        json_path = out / f"{step.name}.json"
        timeout = min(step.max_s, left)
        args = [f"--json={json_path}", *step.args(results)]
        if step.time_limit:  # a margin to write the JSON and exit
            args.append(f"--time_limit_s={max(timeout - 15, 1):.0f}")
        started = clock()
        code, output = runner(step.script, args, timeout)
        record: dict[str, Any] = {"command": [step.script, *args], "exit_status": code,
                                  "seconds": round(clock() - started, 1)}
        if json_path.exists():
            record.update(json=json.loads(json_path.read_text()), json_path=str(json_path))
        record["status"] = ("ok" if code == 0 and "json" in record
                            else "timed out" if code is None else "failed")
        if record["status"] != "ok":
            record.update(why=failure_reason(output, code, timeout), output_tail=output[-3000:])
        results[step.name] = record
        if step.gate and record["status"] != "ok":
            failed_gate = step.name
        print(f"[suite] {step.name}: {record['status']} in {record['seconds']} s "
              f"{record.get('why', '')}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    steps = plan(FLAGS.smoke, FLAGS.batch)
    unknown = set(FLAGS.only) - {step.name for step in steps}
    if unknown:
        raise app.UsageError(f"--only: unknown steps {sorted(unknown)}")
    steps = [step for step in steps if not FLAGS.only or step.name in FLAGS.only]
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:  # one compilation cache for all the steps
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
        results = run_steps(steps, out, FLAGS.budget_s,
                            lambda script, args, timeout: bench_lib.run_script(
                                script, args, timeout, env)[:2])
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
