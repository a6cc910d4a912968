"""The table of docs/results.md: kNN, linear-probe and fine-tune top-1 on the bundled digits
after each pretraining of VARIANTS; a run whose workdir holds done.json is not run again.

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
flags.DEFINE_list("variants", ["random", "mae", "mvmae", "mvmae_amt"], "Which pretrainings.")
flags.DEFINE_list("extra", [], "More --config overrides for every run (e.g. the data_dir).")

RANDOM_MASKING = ["--config.masking.strategy=random", "--config.masking.mask_ratio=0.75",
                  "--config.masking.throw_ratio=0.0"]
VARIANTS = {  # label, the quickstart's overrides (one step at learning rate 0: no pretraining)
    "random": ("(a) random initialisation", ["--config.total_steps=1",
                                             "--config.optim.base_lr=0.0"]),
    "mae": ("(b) MAE", ["--config.views.num=1", "--config.contrastive.weight=0.0",
                        *RANDOM_MASKING]),
    "mvmae": ("(c) MV-MAE", RANDOM_MASKING),
    "mvmae_amt": ("(d) MV-MAE + AMT", []),
}


def run(config: str, workdir: pathlib.Path, args: list[str], log: list[str]) -> tuple[float, float]:
    """(seconds, the last eval top-1) of one `mvmae_jax.main` run, unless its workdir is done."""
    command = ["-m", "mvmae_jax.main", f"--config=configs/{config}.py", f"--workdir={workdir}",
               *args, *FLAGS.extra]
    log.append("python " + " ".join(command))
    started, finished = time.time(), workdir / "done.json"
    if finished.exists():  # an earlier invocation's run: its own time
        started -= json.loads(finished.read_text()).get("seconds", float("nan"))
    else:
        done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"failed: {log[-1]}\n{done.stderr[-4000:]}")
    key = "eval/knn_top1" if config == "quickstart" else "eval/top1"
    metrics = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return time.time() - started, [r[key] for r in metrics if key in r][-1]


def main(argv):
    del argv
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    commands, rows = [], {}
    for variant in FLAGS.variants:
        pretrained = out / f"pretrain_{variant}"
        seconds, knn = run("quickstart", pretrained, VARIANTS[variant][1], commands)
        rows[variant] = {"knn_top1": knn, "seconds": {"pretrain": seconds}}
        for task, config in (("probe", "linear_probe"), ("finetune", "finetune")):
            rows[variant]["seconds"][task], rows[variant][f"{task}_top1"] = run(
                config, out / f"{task}_{variant}", [f"--config.init_from={pretrained}"], commands)
    print("| pretraining | kNN top-1 | linear probe top-1 | fine-tune top-1 |\n|---|---|---|---|")
    for variant, row in rows.items():
        print(f"| {VARIANTS[variant][0]} | {100 * row['knn_top1']:.1f} | "
              f"{100 * row['probe_top1']:.1f} | {100 * row['finetune_top1']:.1f} |")
    print("\nCommands:\n" + "\n".join(commands))
    if FLAGS.json:
        pathlib.Path(FLAGS.json).write_text(json.dumps(
            {"results": rows, "commands": commands, "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    app.run(main)
