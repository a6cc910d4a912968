"""Our training throughput against the PyTorch reference, measured in one invocation on the same
machine, at the same setting; JSON with both sides' results and their ratios.

Each side runs in its own subprocess (benchmarks/step_time.py, then
benchmarks/pytorch_reference.py): neither framework's threads or memory disturb the other's, and
torchvision never loads after TensorFlow. Default setting (the CPU comparison): ViT-S/16 at 224,
MAE (one view, random masking 0.75, nothing thrown), global batch 32, float32 on the CPU and
bfloat16 on accelerators; both sides also measure AMT's token counts (mask 0.45 / throw 0.40)
for `amt_throw_speedup` (`--noamt_throw`: not). With `--find_max_batch` each side runs at its
own largest batch: ours from the compiled step's memory, PyTorch's from eager steps' peak
memory (on a CPU, PyTorch runs at the given batch).

  python benchmarks/compare.py --json=/tmp/compare.json
  python benchmarks/compare.py --model=B/16 --find_max_batch --torch_compile --json=F  # GPU
  python benchmarks/compare.py --amt_overhead --mvmae --json=F     # all experiments
  python benchmarks/compare.py --tiny --batch=8 --steps=2 --json=/tmp/c.json  # CI smoke
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

FLAGS = flags.FLAGS
flags.DEFINE_string("json", None, "Where to write the results.", required=True)
flags.DEFINE_string("config", str(ROOT / "configs" / "vit_b.py"),
                    "Base config file; the setting flags below override its fields.")
flags.DEFINE_string("model", "S/16", "ViT variant of the encoder.")
flags.DEFINE_integer("img_size", 224, "Image size.")
flags.DEFINE_integer("batch", 32, "Global batch (images).")
flags.DEFINE_integer("views", 1, "1 (MAE) or 2 (MV-MAE: with the contrastive head).")
flags.DEFINE_enum("strategy", "random", ["random", "amt"], "Masking of the main run "
                  "(PyTorch: random order at the same token counts).")
flags.DEFINE_float("mask_ratio", 0.75, "Mask ratio of the main run.")
flags.DEFINE_float("throw_ratio", 0.0, "Throw ratio of the main run.")
flags.DEFINE_multi_string("set", [], "More config overrides, field=value (e.g. "
                          "--set=model.decoder_depth=4), for both sides.")
flags.DEFINE_string("dtype", "auto", "auto (float32 on CPU, bfloat16 on accelerators), "
                    "float32 or bfloat16.")
flags.DEFINE_bool("tiny", False, "A tiny model, for the smoke test.")
flags.DEFINE_integer("steps", 10, "Timed steps per run.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per run.")
flags.DEFINE_bool("torch_compile", False, "torch.compile the PyTorch side.")
flags.DEFINE_bool("amt_overhead", False, "Also measure our AMT masking overhead.")
flags.DEFINE_bool("mvmae", False, "Also measure two views against one, on both sides.")
flags.DEFINE_bool("find_max_batch", False, "Each side at the largest batch that fits on the "
                  "accelerator (ours first; PyTorch's search starts from ours).")
flags.DEFINE_float("memory_limit_gib", 0.0, "--find_max_batch: our side's device memory; 0: "
                   "the device's allocator limit (the CPU reports none).")
flags.DEFINE_bool("amt_throw", True, "Also measure AMT's token counts against mask 0.75.")
flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads for both sides.")
flags.DEFINE_integer("num_examples", 1_281_167, "Rows of our AMT bank.")
flags.DEFINE_integer("timeout_s", 7200, "Limit per side.")
flags.DEFINE_string("ours", "", "Our side's step_time.py JSON, already measured at this "
                    "setting (with --amt_throw as here); '': measure it.")


def setting_overrides() -> list[str]:
    """The setting as `--config.field=value` flags, understood by both scripts."""
    fields = {"model.variant": FLAGS.model, "img_size": FLAGS.img_size,
              "batch_size": FLAGS.batch, "views.num": FLAGS.views,
              "masking.strategy": FLAGS.strategy, "masking.mask_ratio": FLAGS.mask_ratio,
              "masking.throw_ratio": FLAGS.throw_ratio}
    if FLAGS.views == 1:
        fields["contrastive.weight"] = 0.0
    args = [f"--config.{key}={value}" for key, value in fields.items()]
    for item in FLAGS.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set wants field=value, got {item!r}")
        args.append(f"--config.{key}={value}")
    return args


def side_environment() -> dict[str, str]:
    """Both sides on the same single GPU: the reference trains on one device, and JAX would
    otherwise take every visible GPU."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def run_side(script: str, args: list[str], out: pathlib.Path) -> dict[str, Any]:
    """Runs one benchmark script in a fresh interpreter and reads its JSON."""
    command = [sys.executable, str(HERE / script), f"--json={out}", *args]
    print("[compare] " + " ".join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=FLAGS.timeout_s, env=side_environment())
    if done.returncode:
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    result["command"] = command
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def check_same_runs(ours: dict, theirs: dict) -> dict[str, dict]:
    """Both sides' runs of the same name must have the same sizes, views and token counts;
    returns {name: {ours, torch, ratio}} of their images/s."""
    by_run = {}
    for name in sorted(set(ours["runs"]) & set(theirs["runs"])):
        a, b = ours["runs"][name], theirs["runs"][name]
        if "error" in a or "error" in b:  # reported in the sides' runs
            continue
        for field in ("encoder", "img_size", "views", "contrastive", "tokens"):
            if a[field] != b[field]:
                raise RuntimeError(f"run {name!r}: {field} differs between the sides: "
                                   f"{a[field]} (ours) vs {b[field]} (PyTorch)")
        by_run[name] = {"jax_img_per_s": a["img_per_s"], "torch_img_per_s": b["img_per_s"],
                        "ratio": a["img_per_s"] / b["img_per_s"],
                        "batch": [a["batch"], b["batch"]]}
    return by_run


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common = [f"--config={FLAGS.config}", *setting_overrides(), f"--dtype={FLAGS.dtype}",
              f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}", f"--threads={FLAGS.threads}"]
    if FLAGS.amt_throw:
        common.append("--amt_throw")
    if FLAGS.tiny:
        common.append("--tiny")
    if FLAGS.mvmae:
        common.append("--mvmae")
    jax_args = [*common, f"--num_examples={FLAGS.num_examples}"]
    if FLAGS.amt_overhead:
        jax_args.append("--amt_overhead")
    torch_args = list(common)
    if FLAGS.torch_compile:
        torch_args.append("--compile")

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        if FLAGS.find_max_batch:
            jax_args += ["--find_max_batch", f"--memory_limit_gib={FLAGS.memory_limit_gib}"]
        if FLAGS.ours and not FLAGS.find_max_batch:
            ours = json.loads(pathlib.Path(FLAGS.ours).read_text())
        else:
            ours = run_side("step_time.py", jax_args, folder / "jax.json")
        if FLAGS.find_max_batch:
            # PyTorch's search starts from our batch and may end lower or higher; without an
            # accelerator it runs at --batch.
            torch_args.append("--find_max_batch")
            if ours["backend"] != "cpu":
                torch_args.append(f"--config.batch_size={ours['batch']}")
        theirs = run_side("pytorch_reference.py", torch_args, folder / "torch.json")

    by_run = check_same_runs(ours, theirs)
    main_run = ours["runs"]["main"]
    result = {
        "jax_img_per_s": ours["img_per_s"],
        "torch_img_per_s": theirs["img_per_s"],
        "ratio": ours["img_per_s"] / theirs["img_per_s"],
        "amt_throw_speedup": ours.get("amt_throw_speedup"),
        "torch_amt_throw_speedup": theirs.get("amt_throw_speedup"),
        "amt_masking_overhead": ours.get("amt_masking_overhead"),
        "mvmae_over_mae_cost": ours.get("mvmae_over_mae_cost"),
        "torch_mvmae_over_mae_cost": theirs.get("mvmae_over_mae_cost"),
        "jax_mfu": ours.get("mfu"), "torch_mfu": theirs.get("mfu"),
        "ratio_by_run": by_run,
        "settings": {
            "model": FLAGS.model if not FLAGS.tiny else "tiny", "encoder": main_run["encoder"],
            "decoder": main_run["decoder"], "img_size": main_run["img_size"],
            "batch": {"jax": ours["batch"], "torch": theirs["batch"]},
            "views": main_run["views"], "strategy": main_run["strategy"],
            "mask_ratio_throw_ratio": main_run["mask_ratio_throw_ratio"],
            "tokens": main_run["tokens"],
            "amt_run_tokens": ours["runs"].get("amt", {}).get("tokens"),
            "dtype": {"jax": main_run["dtype"], "torch": theirs["dtype"]},
            "torch_mode": theirs["mode"], "torch_optimizer": theirs["optimizer"],
            "device_kind": {"jax": ours["device_kind"], "torch": theirs["device_kind"]},
            "backend": ours["backend"], "device_count": ours["device_count"],
            "versions": {**ours["versions"], **theirs["versions"]},
            "steps_timed": FLAGS.steps, "warmup_steps": FLAGS.warmup,
            "cpu_threads": {"jax": ours["cpu_threads"], "torch": theirs["cpu_threads"],
                            "note": "both sides use the same number of CPU threads: XLA's "
                                    "intra-op pool and torch.set_num_threads"},
            "cuda_visible_devices": side_environment()["CUDA_VISIBLE_DEVICES"],
            "find_max_batch": FLAGS.find_max_batch, "tiny": FLAGS.tiny,
            "config": FLAGS.config, "overrides": setting_overrides(),
        },
        "machine": ours["machine"],
        "jax": ours,
        "torch": theirs,
    }
    with open(FLAGS.json, "w") as f:
        json.dump(result, f, indent=2)
    summary = {k: v for k, v in result.items() if k not in ("jax", "torch", "ratio_by_run")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
