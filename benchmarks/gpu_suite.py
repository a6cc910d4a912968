"""Every accelerator measurement in one command inside a time budget, most important first
(docs/benchmarks.md): each step a script in a subprocess writing its JSON into --out; a failed
step does not stop the next, and summary.json says why.

  python benchmarks/gpu_suite.py --out=/tmp/gpu                 # --budget_s=480: 8 minutes
  python benchmarks/gpu_suite.py --smoke --out=/tmp/suite       # tiny sizes, on a CPU
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from absl import app, flags

FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]
flags.DEFINE_string("out", None, "Folder for the steps' JSONs and summary.json.", required=True)
flags.DEFINE_integer("budget_s", 480, "Seconds for all the steps together.")
flags.DEFINE_list("only", [], "Run only these steps.")
flags.DEFINE_bool("smoke", False, "Every step at tiny sizes, for the CI test on a CPU.")
flags.DEFINE_integer("batch", 256, "Global batch of the ViT-B/16 MAE steps.")

MAE_B16 = "--config=configs/mae_b.py"  # ViT-B/16 MAE, one view, mask 0.75


class Step(NamedTuple):
    """benchmarks/`script` with args(results so far), given `min_s` to `max_s` of the budget."""
    name: str
    script: str
    args: Callable[[Mapping[str, dict]], list[str]]
    min_s: float
    max_s: float


def chosen_attention(results: Mapping[str, dict]) -> str:
    """"fused" where the attention step found it correct and faster at every shape."""
    data = results.get("attention", {}).get("json") or {}
    shapes = data.get("shapes", {}).values()
    faster = all(s["fused"]["ms"] < s["einsum"]["ms"] for s in shapes)
    return "fused" if shapes and data.get("fused_passed") and faster else "einsum"


def plan(smoke: bool, batch: int) -> list[Step]:
    if smoke:
        setting = ["--tiny", "--steps=1", "--warmup=1", MAE_B16, "--config.batch_size=8"]
        ours_only = ["--num_examples=64", "--memory_limit_gib=0.005"]
        extras, torch_compile = ["--profile_steps=1", "--optimizer_steps=1", "--idle_steps=2"], []
        max_batch = setting
        sweep = ["--candidates=xla_gpu_enable_triton_gemm=false,xla_gpu_enable_command_buffer="]
        attention_args = ["--tiny", "--steps=1"]
    else:
        setting = [MAE_B16, f"--config.batch_size={batch}", "--dtype=auto", "--steps=10"]
        ours_only, torch_compile = [], ["--compile"]
        extras = ["--profile_steps=2", "--optimizer_steps=10", "--idle_steps=20"]
        # The search starts from the compiled step's memory at this batch.
        max_batch = ["--config=configs/vit_b.py", f"--config.batch_size={batch}",
                     "--dtype=auto", "--steps=5"]
        sweep, attention_args = ["--steps=5", "--pairs=2"], []

    def ours(*args: str) -> Callable[[Mapping[str, dict]], list[str]]:
        return lambda done: [*args, *ours_only,
                             f"--config.model.attention={chosen_attention(done)}"]

    def pytorch(against: str, *args: str) -> Callable[[Mapping[str, dict]], list[str]]:
        """The reference at `against`'s setting, compared with its JSON where it ran."""
        def args_after(done: Mapping[str, dict]) -> list[str]:
            record = done.get(against, {})
            ran = record.get("status") == "ok"
            return [*args, *torch_compile, *([f"--ours={record['json_path']}"] if ran else [])]
        return args_after

    steps = [
        Step("attention", "step_time.py",
             lambda _: ["--mode=attention", "--dtype=auto", "--steps=10", *attention_args], 30, 90),
        Step("mae_b16", "step_time.py", ours(*setting, "--amt_throw", *extras), 60, 180),
        Step("xla_flags", "step_time.py", ours(*setting, "--mode=xla_flags", *sweep), 60, 150),
        Step("compare", "pytorch_reference.py", pytorch("mae_b16", *setting, "--amt_throw"),
             60, 180),
        Step("vit_b_max_batch", "step_time.py", ours(*max_batch, "--find_max_batch"), 60, 180),
        Step("mae_b16_max_batch", "step_time.py",
             ours(*setting, "--steps=5", "--find_max_batch"), 60, 150),
        Step("max_batch_compare", "pytorch_reference.py",
             pytorch("mae_b16_max_batch", *setting, "--steps=5", "--find_max_batch"), 60, 150),
    ]  # a CPU's compiles take longer than a GPU's: the smoke run's steps get more time
    return [s._replace(max_s=5 * s.max_s) for s in steps] if smoke else steps


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt"
                             r"|NotFound|Exhausted)\b.*")


def failure_reason(output: str, code: int | None, timeout_s: float) -> str:
    """A timeout, else the last exception line of the output, else its last line."""
    if code is None:
        return f"timed out after {timeout_s:.0f} s"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if code == 0 and not exceptions:
        return "exited 0 without writing its JSON"
    return (exceptions or lines or ["no output"])[-1][:500]


def run_steps(steps: Sequence[Step], out: pathlib.Path, budget_s: float,
              runner: Callable[[str, list[str], float], tuple[int | None, str]],
              clock: Callable[[], float] = time.monotonic) -> dict[str, dict]:
    """Runs `steps` in order inside `budget_s`; runner(script, args, timeout_s) returns (exit
    status or None on a timeout, output). Returns each step's record."""
    deadline = clock() + budget_s
    results: dict[str, dict] = {}
    for step in steps:
        left = deadline - clock()
        if left < step.min_s:
            results[step.name] = {"status": "skipped",
                                  "why": f"{left:.0f} s of the budget left, needs {step.min_s}"}
            continue
        json_path = out / f"{step.name}.json"
        timeout = min(step.max_s, left)
        args = [f"--json={json_path}", *step.args(results)]
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
        print(f"[suite] {step.name}: {record['status']} in {record['seconds']} s "
              f"{record.get('why', '')}", file=sys.stderr, flush=True)
    return results


def run_script(script: str, args: list[str], timeout_s: float, env: Mapping[str, str],
               ) -> tuple[int | None, str]:
    """(exit status, None on a timeout; output) of benchmarks/`script` in a fresh interpreter."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    print("[suite] " + " ".join(command), file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        return None, (error.output or b"").decode(errors="replace")
    return done.returncode, done.stdout.decode(errors="replace")


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
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        results = run_steps(steps, out, FLAGS.budget_s, functools.partial(run_script, env=env))
    summary = {name: {k: v for k, v in record.items() if k != "json"}
               for name, record in results.items()}
    summary["settings"] = {"budget_s": FLAGS.budget_s, "smoke": FLAGS.smoke,
                           "batch": FLAGS.batch, "attention": chosen_attention(results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if any(record["status"] == "failed" for record in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
