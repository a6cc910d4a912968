"""The table of docs/results.md: kNN, linear-probe and fine-tune top-1 on the bundled digits,
after pretraining the quickstart model (a) not at all (one step at learning rate 0), (b) MAE,
(c) MV-MAE, (d) MV-MAE + AMT (the quickstart). A run whose workdir holds done.json is skipped,
so an interrupted invocation resumes.

  python benchmarks/digits_results.py --out=/tmp/digits_results --json=/tmp/digits_results.json
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/digits_results", "Directory for the workdirs.")
flags.DEFINE_string("json", "", "Also write the results here.")
flags.DEFINE_string("data_dir", "", "tfds data_dir for the digits (default: tfds's).")
flags.DEFINE_list("variants", ["random", "mae", "mvmae", "mvmae_amt"], "Which pretrainings.")
flags.DEFINE_list("extra", [], "More --config overrides for every run (e.g. for a smoke test).")

# The quickstart's overrides that make each variant (the quickstart is MV-MAE + AMT).
VARIANTS = {
    "random": ["--config.total_steps=1", "--config.optim.base_lr=0.0"],
    "mae": ["--config.views.num=1", "--config.contrastive.weight=0.0",
            "--config.masking.strategy=random", "--config.masking.mask_ratio=0.75",
            "--config.masking.throw_ratio=0.0"],
    "mvmae": ["--config.masking.strategy=random", "--config.masking.mask_ratio=0.75",
              "--config.masking.throw_ratio=0.0"],
    "mvmae_amt": [],
}
LABELS = {"random": "(a) random initialisation", "mae": "(b) MAE", "mvmae": "(c) MV-MAE",
          "mvmae_amt": "(d) MV-MAE + AMT"}


def run(command: list[str], workdir: pathlib.Path, log: list[str]) -> float:
    """Runs one `mvmae_jax.main` command unless its workdir is done; returns seconds taken."""
    printable = " ".join(command[1:])
    log.append(f"python {printable}")
    if (workdir / "done.json").exists():
        return json.loads((workdir / "done.json").read_text()).get("seconds", float("nan"))
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {printable}\n{result.stderr[-4000:]}")
    return time.time() - started


def last_metric(workdir: pathlib.Path, key: str) -> float:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r][-1]


def main(argv):
    del argv
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    common = list(FLAGS.extra)
    if FLAGS.data_dir:
        common.append(f"--config.dataset.data_dir={FLAGS.data_dir}")
    main_module = [sys.executable, "-m", "mvmae_jax.main"]
    commands: list[str] = []
    rows = {}
    for variant in FLAGS.variants:
        pretrain_dir = out / f"pretrain_{variant}"
        seconds = {"pretrain": run(
            [*main_module, "--config=configs/quickstart.py", f"--workdir={pretrain_dir}",
             *VARIANTS[variant], *common], pretrain_dir, commands)}
        row = {"knn_top1": last_metric(pretrain_dir, "eval/knn_top1")}
        for task, config in (("probe", "linear_probe"), ("finetune", "finetune")):
            workdir = out / f"{task}_{variant}"
            seconds[task] = run(
                [*main_module, f"--config=configs/{config}.py", f"--workdir={workdir}",
                 f"--config.init_from={pretrain_dir}", *common], workdir, commands)
            row[f"{task}_top1"] = last_metric(workdir, "eval/top1")
        row["seconds"] = seconds
        rows[variant] = row

    print("| pretraining | kNN top-1 | linear probe top-1 | fine-tune top-1 |")
    print("|---|---|---|---|")
    for variant, row in rows.items():
        print(f"| {LABELS[variant]} | {100 * row['knn_top1']:.1f} | "
              f"{100 * row['probe_top1']:.1f} | {100 * row['finetune_top1']:.1f} |")
    print("\nCommands:\n" + "\n".join(commands))
    if FLAGS.json:
        pathlib.Path(FLAGS.json).write_text(json.dumps(
            {"results": rows, "commands": commands, "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    app.run(main)
