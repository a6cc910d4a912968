"""Our training throughput against the PyTorch reference at one setting (default: ViT-S/16 MAE
at 224, mask 0.75, batch 32, with AMT's token counts too), each side in its own subprocess;
one JSON with both and their ratios. `--find_max_batch`: each at its own largest batch.

  python benchmarks/compare.py --amt_overhead --mvmae --json=/tmp/compare.json
  python benchmarks/compare.py --tiny --batch=8 --steps=2 --json=/tmp/c.json
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import bench_lib
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("json", None, "Where to write the results.", required=True)
flags.DEFINE_string("config", bench_lib.DEFAULT_CONFIG, "Base config; the setting overrides it.")
flags.DEFINE_string("model", "S/16", "ViT variant of the encoder.")
flags.DEFINE_integer("batch", 32, "Global batch (images).")
flags.DEFINE_multi_string("set", [], "More config overrides for both sides, field=value.")
flags.DEFINE_string("dtype", "auto", "auto (float32 on a CPU, else bfloat16), float32, bfloat16.")
flags.DEFINE_bool("tiny", False, "A tiny model, for the smoke test.")
flags.DEFINE_integer("steps", 10, "Timed steps per run.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per run.")
flags.DEFINE_bool("torch_compile", False, "torch.compile the PyTorch side.")
flags.DEFINE_bool("amt_throw", True, "Also measure AMT's token counts against mask 0.75.")
flags.DEFINE_bool("amt_overhead", False, "Also measure our AMT masking overhead.")
flags.DEFINE_bool("mvmae", False, "Also measure two views against one, on both sides.")
flags.DEFINE_bool("find_max_batch", False, "Each side at its largest batch that fits.")
flags.DEFINE_float("memory_limit_gib", 0.0, "--find_max_batch: our device memory; 0: the "
                   "allocator's limit.")
flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads for both sides.")
flags.DEFINE_integer("num_examples", 1_281_167, "Rows of our AMT bank.")
flags.DEFINE_string("ours", "", "Our side's step_time.py JSON at this setting, already "
                    "measured; '': measure it.")


def setting_overrides() -> list[str]:
    fields = [f"model.variant={FLAGS.model}", "img_size=224", f"batch_size={FLAGS.batch}",
              "views.num=1", "contrastive.weight=0.0", "masking.strategy=random",
              "masking.mask_ratio=0.75", "masking.throw_ratio=0.0", *FLAGS.set]
    if any("=" not in item for item in FLAGS.set):
        raise app.UsageError(f"--set wants field=value, got {FLAGS.set}")
    return [f"--config.{item}" for item in fields]


def run_side(script: str, args: list[str], out: pathlib.Path) -> dict:
    """Both sides on one GPU: the reference trains on one device, JAX would take them all."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    code, output, command = bench_lib.run_script(script, [f"--json={out}", *args], 7200, env)
    if code != 0:
        raise RuntimeError(f"{script} failed ({code}):\n{output[-4000:]}")
    return dict(json.loads(out.read_text()), command=command)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common = [f"--config={FLAGS.config}", *setting_overrides(), f"--dtype={FLAGS.dtype}",
              f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}", f"--threads={FLAGS.threads}",
              *[f"--{name}" for name in ("amt_throw", "tiny", "mvmae") if getattr(FLAGS, name)]]
    jax_args = [*common, f"--num_examples={FLAGS.num_examples}",
                *(["--amt_overhead"] if FLAGS.amt_overhead else [])]
    torch_args = [*common, *(["--compile"] if FLAGS.torch_compile else [])]
    with tempfile.TemporaryDirectory() as tmp:
        if FLAGS.find_max_batch:
            jax_args += ["--find_max_batch", f"--memory_limit_gib={FLAGS.memory_limit_gib}"]
        if FLAGS.ours and not FLAGS.find_max_batch:
            ours = json.loads(pathlib.Path(FLAGS.ours).read_text())
        else:
            ours = run_side("step_time.py", jax_args, pathlib.Path(tmp, "jax.json"))
        if FLAGS.find_max_batch:  # PyTorch's search starts from our batch; a CPU: --batch
            torch_args.append("--find_max_batch")
            if ours["backend"] != "cpu":
                torch_args.append(f"--config.batch_size={ours['batch']}")
        theirs = run_side("pytorch_reference.py", torch_args, pathlib.Path(tmp, "torch.json"))

    by_run = {}
    for name in sorted(set(ours["runs"]) & set(theirs["runs"])):
        a, b = ours["runs"][name], theirs["runs"][name]
        if "error" in a or "error" in b:
            continue
        for field in ("encoder", "img_size", "views", "contrastive", "tokens"):
            if a[field] != b[field]:
                raise RuntimeError(f"run {name!r}: {field} differs between the sides: "
                                   f"{a[field]} (ours) vs {b[field]} (PyTorch)")
        by_run[name] = {"jax_img_per_s": a["img_per_s"], "torch_img_per_s": b["img_per_s"],
                        "ratio": a["img_per_s"] / b["img_per_s"], "batch": [a["batch"], b["batch"]]}
    main_run = ours["runs"]["main"]
    result = {
        "jax_img_per_s": ours["img_per_s"], "torch_img_per_s": theirs["img_per_s"],
        "ratio": ours["img_per_s"] / theirs["img_per_s"],
        "amt_throw_speedup": ours.get("amt_throw_speedup"),
        "torch_amt_throw_speedup": theirs.get("amt_throw_speedup"),
        "amt_masking_overhead": ours.get("amt_masking_overhead"),
        "mvmae_over_mae_cost": ours.get("mvmae_over_mae_cost"),
        "torch_mvmae_over_mae_cost": theirs.get("mvmae_over_mae_cost"),
        "jax_mfu": ours.get("mfu"), "torch_mfu": theirs.get("mfu"), "ratio_by_run": by_run,
        "settings": {
            "overrides": setting_overrides(), "encoder": main_run["encoder"],
            "tokens": main_run["tokens"], "amt_run_tokens": ours["runs"].get("amt", {}).get(
                "tokens"), "steps_timed": FLAGS.steps, "torch_mode": theirs["mode"],
            **{key: {"jax": ours[key], "torch": theirs[key]} for key in (
                "batch", "dtype", "device_kind", "cpu_threads")},
            "versions": {**ours["versions"], **theirs["versions"]}},
        "machine": ours["machine"], "jax": ours, "torch": theirs}
    pathlib.Path(FLAGS.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("jax", "torch")}, indent=2))


if __name__ == "__main__":
    app.run(main)
