"""Training throughput of the pretraining step: images/s, step time, compile time, FLOPs, MFU
and peak memory, as JSON.

The step is the trainer's own (`train_step.make_train_step`), on a synthetic batch that stays on
the devices (no input pipeline), compiled ahead of time (`.lower().compile()`, timed); warm-up
steps are excluded and each timed step ends with `jax.block_until_ready`.

  python benchmarks/train_throughput.py --json=/tmp/vit_b.json                 # configs/vit_b.py
  python benchmarks/train_throughput.py --config=configs/quickstart.py --json=/tmp/qs.json
  python benchmarks/train_throughput.py --config.batch_size=256 --find_max_batch --json=F
  python benchmarks/train_throughput.py --amt_throw --amt_overhead --mvmae --json=F
  python benchmarks/train_throughput.py --tiny --steps=2 --json=/tmp/tiny.json   # CI smoke

`--config.field=value` overrides any config field, as in `mvmae_jax.main`. The experiments add
runs of the same model: `--amt_throw` (AMT mask 0.45 / throw 0.40 against mask 0.75 without
throwing: `amt_throw_speedup`), `--amt_overhead` (AMT masking against random masking and
throwing at the same token counts: `amt_masking_overhead`), `--mvmae` (two views and the
contrastive head against one view: `mvmae_over_mae_cost`, per image).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import bench_lib
import ml_collections
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_config_flags() -> None:
    """The flags that say which step to build (read by `config_and_phase`): --config, --json,
    --tiny, --phase, --dtype. Defined on demand, so that tests can import the benchmark modules
    side by side."""
    config_flags.DEFINE_config_file("config", bench_lib.DEFAULT_CONFIG,
                                    "Pretraining config file (see configs/).", lock_config=True)
    flags.DEFINE_string("json", "", "Where to write the results (they are printed too).")
    flags.DEFINE_bool("tiny", False, "A tiny model (16x16 images, width 32), for the smoke test.")
    flags.DEFINE_string("phase", "", "'random' or 'amt'; default: 'amt' for AMT configs.")
    flags.DEFINE_string("dtype", "", "Compute dtype: '' keeps config.model.dtype; 'auto' is "
                        "bfloat16 on accelerators and float32 on the CPU.")


def define_step_flags(steps: int, warmup: int, steps_help: str, warmup_help: str) -> None:
    """The flags of every benchmark that runs the trainer's step (this script,
    profile_step.py, input_stall.py): define_config_flags, then --steps, --warmup, --threads."""
    define_config_flags()
    flags.DEFINE_integer("steps", steps, steps_help)
    flags.DEFINE_integer("warmup", warmup, warmup_help)
    flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads of XLA's CPU backend "
                         "(0: all cores).")


def config_and_phase() -> tuple[ml_collections.ConfigDict, str]:
    """The run the step flags describe: --config shrunk by --tiny, its dtype set by --dtype,
    and the phase of --phase (default: the phase the config spends most steps in)."""
    config = FLAGS.config
    if FLAGS.tiny:
        bench_lib.apply_tiny(config)
    resolve_dtype(config, FLAGS.dtype)
    return config, FLAGS.phase or bench_lib.default_phase(config)


def define_flags() -> None:
    """The command line (defined on demand, as define_step_flags)."""
    define_step_flags(10, 2, "Timed steps per run.", "Untimed steps per run after compiling.")
    flags.DEFINE_bool("amt_throw", False, "Also measure AMT throwing against mask 0.75.")
    flags.DEFINE_bool("amt_overhead", False, "Also measure AMT masking against random masking "
                      "at the same token counts.")
    flags.DEFINE_bool("mvmae", False, "Also measure two views against one view.")
    flags.DEFINE_float("amt_mask_ratio", 0.45, "Mask ratio of the AMT runs.")
    flags.DEFINE_float("amt_throw_ratio", 0.40, "Throw ratio of the AMT runs.")
    flags.DEFINE_float("plain_mask_ratio", 0.75, "Mask ratio of the run without throwing.")
    flags.DEFINE_integer("num_examples", 1_281_167, "Rows of the AMT bank (the data set size; "
                         "default ImageNet-1K's).")
    flags.DEFINE_bool("find_max_batch", False, "Measure the main run at the largest per-device "
                      "batch that fits in device memory (found from the compiled step's memory).")
    flags.DEFINE_float("memory_limit_gib", 0.0, "Device memory for --find_max_batch; 0: the "
                       "device's allocator limit (needed on the CPU, which reports none).")
    flags.DEFINE_integer("batch_granularity", 8, "--find_max_batch: per-device batch multiple.")


FLOPS_NOTE = ("flops_analytic: matmul and convolution FLOPs of the step counted from the "
              "architecture (benchmarks/bench_lib.py: backward = 2x forward, patch embedding "
              "1x), used for `mfu`; flops_xla: XLA's cost analysis of the compiled step (every "
              "op, elementwise included; per device, times the device count), used for "
              "`mfu_xla`. MFU is against the dense bf16 peak of the device kind.")


def configure_threads(threads: int) -> None:
    """Gives XLA's CPU backend `threads` intra-op threads (0: all cores; the PyTorch side uses
    as many); before JAX starts its backends."""
    threads = threads or os.cpu_count()
    flags_now = os.environ.get("XLA_FLAGS", "")
    extra = []
    if "xla_cpu_multi_thread_eigen" not in flags_now:
        extra.append("--xla_cpu_multi_thread_eigen=true")
    if "intra_op_parallelism_threads" not in flags_now:
        extra.append(f"intra_op_parallelism_threads={threads}")
    os.environ["XLA_FLAGS"] = " ".join([flags_now, *extra]).strip()


def resolve_dtype(config: ml_collections.ConfigDict, dtype: str) -> None:
    import jax

    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype:
        config.model.dtype = dtype


def synthetic_batch(config: ml_collections.ConfigDict, num_examples: int, mesh) -> dict:
    """A pretraining batch generated on the devices, split like the trainer's: random views,
    random crop boxes and flips (AMT aligns the bank maps with them), distinct indices spread
    over the whole bank."""
    import jax
    import jax.numpy as jnp

    from mvmae_jax import sharding

    batch, views, size = config.batch_size, config.views.num, config.img_size

    def make(key):
        k_views, k_size, k_pos, k_flip = jax.random.split(key, 4)
        extent = jax.random.uniform(k_size, (batch, views, 2), minval=0.45, maxval=1.0)
        corner = jax.random.uniform(k_pos, (batch, views, 2)) * (1.0 - extent)
        stride = max(1, num_examples // batch)
        return {"views": jax.random.normal(k_views, (batch, views, size, size, 3)),
                "boxes": jnp.concatenate([corner, extent], axis=-1),
                "flips": jax.random.bernoulli(k_flip, 0.5, (batch, views)).astype(jnp.int32),
                "index": (jnp.arange(batch, dtype=jnp.int32) * stride) % num_examples}

    return jax.jit(make, out_shardings=sharding.batch_sharding(mesh))(jax.random.key(1))


def build(config: ml_collections.ConfigDict, phase: str, num_examples: int, abstract: bool,
          devices: list | None = None):
    """(model, mesh, state, step, batch) of a run over `devices` (default: all of them); with
    `abstract`, state and batch are shapes (nothing allocated: for memory estimates, and for
    devices that are only described, as a TPU topology compiled for ahead of time)."""
    import jax

    from mvmae_jax import config_lib, models, optim, sharding
    from mvmae_jax import train_step as ts

    mesh = sharding.make_mesh(devices)
    config_lib.validate(config, mesh.size, jax.process_count())
    model = models.build_model(config)
    # A schedule of a long run (its values do not change the step's cost).
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, 100, 100_000)
    optimizer = optim.make_optimizer(config.optim, schedule)

    def init():
        return ts.create_train_state(config, model, optimizer, mesh, num_examples)

    state = jax.eval_shape(init) if abstract else init()
    step = ts.make_train_step(config, model, optimizer, schedule, mesh,
                              ts.state_shardings(state, mesh, config), phase)
    if abstract:
        batch = jax.eval_shape(lambda: synthetic_batch(config, num_examples, mesh))
    else:
        batch = synthetic_batch(config, num_examples, mesh)
    return model, mesh, state, step, batch


def xla_flops(compiled) -> float | None:
    """FLOPs of one device's program from XLA's cost analysis (a dict, or a list of one dict
    per program in older JAX), or None when the backend gives none."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or cost.get("flops", -1) < 0:
        return None
    return float(cost["flops"])


def compiled_memory(compiled) -> dict[str, int] | None:
    """XLA's buffer assignment of the compiled step, per device; `estimated_peak_bytes` is
    arguments + outputs - donated aliases + temporaries + code."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if stats is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {f: int(getattr(stats, f)) for f in fields}
    out["estimated_peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                   - out["alias_size_in_bytes"] + out["temp_size_in_bytes"]
                                   + out["generated_code_size_in_bytes"])
    return out


def cudnn_attention_calls(compiled) -> int:
    """cuDNN fused-attention kernels (forward and backward) in the compiled step: how to tell
    that config.model.attention="fused" got cuDNN's kernel rather than XLA's fallback."""
    return compiled.as_text().count('custom_call_target="__cudnn$fmha')


def peak_memory() -> tuple[int, str]:
    """(bytes, how measured): the devices' allocator peak where they report one, else the
    process's peak RSS (the CPU backend has no device memory statistics)."""
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return (max(int(s["peak_bytes_in_use"]) for s in stats),
                "device peak_bytes_in_use, max over local devices, since the process started")
    return (bench_lib.max_rss_bytes(),
            "process max RSS (ru_maxrss): this backend reports no device memory statistics")


def device_memory_limit(device=None) -> float | None:
    """The allocator's limit in bytes of `device` (default: the first local one), or None where
    it reports none (the CPU; TPU devices that a topology only describes)."""
    import jax

    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - described devices and some backends have no statistics
        stats = None
    return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def token_counts(config: ml_collections.ConfigDict, model, phase: str) -> dict[str, int]:
    from mvmae_jax import train_step as ts

    n_mask, n_throw, n_vis = ts.phase_counts(config, model.num_patches, phase)
    return {"num_patches": model.num_patches, "masked": n_mask, "thrown": n_throw,
            "visible": n_vis}


def analytic_flops(config: ml_collections.ConfigDict, phase: str) -> dict[str, int]:
    """`bench_lib.analytic_train_flops` of the run (the model's sizes from the config)."""
    from mvmae_jax import models
    from mvmae_jax import train_step as ts

    dims = models.encoder_dims(config.model)
    num_patches = (config.img_size // dims["patch_size"]) ** 2
    n_mask, n_throw, _ = ts.phase_counts(config, num_patches, phase)
    online = phase == ts.AMT_PHASE and config.amt.source == "online"
    return bench_lib.analytic_train_flops(config, dims, n_mask, n_throw, online_maps=online)


def run_settings(config: ml_collections.ConfigDict, phase: str, model) -> dict[str, Any]:
    from mvmae_jax import models

    return {"encoder": models.encoder_dims(config.model), "variant": config.model.variant,
            "decoder": {"width": config.model.decoder_width,
                        "depth": config.model.decoder_depth,
                        "heads": config.model.decoder_heads},
            "img_size": config.img_size, "batch": config.batch_size,
            "views": config.views.num, "contrastive": bool(model.contrastive),
            "strategy": config.masking.strategy, "amt_source": config.amt.source,
            "phase": phase, "mask_ratio_throw_ratio": list(bench_lib.phase_ratios(config, phase)),
            "tokens": token_counts(config, model, phase), "dtype": config.model.dtype,
            "remat": config.model.remat, "attention": config.model.attention,
            "grad_accum_steps": config.grad_accum_steps,
            "sharding": config.sharding.strategy}


def measure(config: ml_collections.ConfigDict, phase: str, steps: int, warmup: int,
            num_examples: int) -> dict[str, Any]:
    """Compiles and times one run; see the module docstring."""
    import jax

    model, _, state, step, batch = build(config, phase, num_examples, abstract=False)
    started = time.perf_counter()
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()

    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics) if warmup else state)
    seconds = []
    host_before = bench_lib.host_usage()
    for _ in range(steps):
        begin = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - begin)
    host = bench_lib.host_usage_per_step(host_before, steps)
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss}: the timed steps are not meaningful")

    devices = jax.device_count()
    timing = bench_lib.timing_stats(seconds, config.batch_size)
    flops = analytic_flops(config, phase)
    per_device = xla_flops(compiled)
    xla_step = None if per_device is None else per_device * devices
    peak = bench_lib.peak_flops(jax.devices()[0].device_kind)
    memory, memory_source = peak_memory()
    result = dict(run_settings(config, phase, model), **timing, **host)
    result.update({
        "lower_s": lowered_at - started, "compile_s": compiled_at - lowered_at,
        "flops_analytic_per_step": flops["model"],
        "flops_analytic_per_image": flops["model"] / config.batch_size,
        "flops_analytic_parts": flops,
        "flops_xla_per_step": xla_step,
        "flops_xla_per_image": None if xla_step is None else xla_step / config.batch_size,
        "achieved_tflops_per_device": flops["model"] / timing["step_s"] / devices / 1e12,
        "peak_flops_per_device": peak,
        "mfu": None if peak is None else flops["model"] / timing["step_s"] / (peak * devices),
        "mfu_xla": (None if peak is None or xla_step is None
                    else xla_step / timing["step_s"] / (peak * devices)),
        "peak_memory_bytes": memory, "peak_memory_source": memory_source,
        "compiled_memory_per_device": compiled_memory(compiled),
        "cudnn_attention_calls": cudnn_attention_calls(compiled),
        "final_loss": loss,
    })
    return result


def compile_abstract_step(config: ml_collections.ConfigDict, phase: str, num_examples: int,
                          devices: list | None = None) -> tuple[Any, dict[str, int], Any]:
    """(compiled step, its per-device `compiled_memory`, mesh), compiled on abstract state and
    batch over `devices` (nothing allocated)."""
    _, mesh, state, step, batch = build(config, phase, num_examples, abstract=True,
                                        devices=devices)
    compiled = step.lower(state, batch).compile()
    memory = compiled_memory(compiled)
    if memory is None:
        raise RuntimeError("this backend gives no memory analysis of a compiled program; "
                           "set --config.batch_size")
    return compiled, memory, mesh


def compiled_step_bytes(config: ml_collections.ConfigDict, phase: str,
                        num_examples: int) -> int:
    """Per-device memory of the compiled step (nothing allocated)."""
    return compile_abstract_step(config, phase, num_examples)[1]["estimated_peak_bytes"]


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error).lower()
    return "resource_exhausted" in text or "out of memory" in text


def largest_batch(config: ml_collections.ConfigDict, phase: str, steps: int, warmup: int,
                  num_examples: int, limit_bytes: float, granularity: int,
                  ) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """Measures the main run at the largest per-device batch that fits: predicted from the
    compiled step's memory at two batches, then lowered by 10% per out-of-memory failure.

    Returns (config at that batch, its measurement, how it was found).
    """
    import copy

    import jax

    devices = jax.device_count()

    def at(per_device: int) -> ml_collections.ConfigDict:
        out = copy.deepcopy(config)
        out.batch_size = per_device * devices
        return out

    start = max(granularity, config.batch_size // devices // granularity * granularity)
    per_device, search = bench_lib.predict_largest_batch(
        lambda b: compiled_step_bytes(at(b), phase, num_examples), start, limit_bytes,
        granularity)
    search["failed_batches"] = []
    while True:
        try:
            result = measure(at(per_device), phase, steps, warmup, num_examples)
            break
        except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
            if not _is_out_of_memory(error) or per_device <= granularity:
                raise
            search["failed_batches"].append(per_device)
            per_device = bench_lib.round_down(per_device * 0.9, granularity)
    search["per_device_batch"] = per_device
    return at(per_device), result, search


def environment() -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import optax

    return {
        "framework": "jax",
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "optax": optax.__version__},
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "cpu_threads": FLAGS.threads,
        "cpu_threads_note": ("XLA CPU backend: Eigen intra-op pool of `cpu_threads` threads "
                             "(XLA_FLAGS intra_op_parallelism_threads); unused on accelerators"),
        "jax_disable_most_optimizations": os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", ""),
        "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
        "machine": bench_lib.machine_info(),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    configure_threads(FLAGS.threads)
    if FLAGS.find_max_batch:
        # JAX's allocator takes 75% of GPU memory by default; the largest batch may use more.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS"):
        print("[bench] warning: JAX_DISABLE_MOST_OPTIMIZATIONS is set: timings are not those "
              "of an optimised step", file=sys.stderr)

    config, phase = config_and_phase()
    experiments = [name for name in bench_lib.EXPERIMENT_RUNS if getattr(FLAGS, name)]
    runs = bench_lib.experiment_runs(
        config, phase, experiments, (FLAGS.amt_mask_ratio, FLAGS.amt_throw_ratio),
        FLAGS.plain_mask_ratio)

    def measure_run(run_config, run_phase):
        return measure(run_config, run_phase, FLAGS.steps, FLAGS.warmup, FLAGS.num_examples)

    def key(run_config, run_phase):
        return (run_config.to_json(), run_phase)

    search, done = None, None
    if FLAGS.find_max_batch:
        limit = FLAGS.memory_limit_gib * 2**30 or device_memory_limit()
        if not limit:
            raise app.UsageError("--find_max_batch: this device reports no memory limit; "
                                 "give --memory_limit_gib")
        config, main_run, search = largest_batch(
            config, phase, FLAGS.steps, FLAGS.warmup, FLAGS.num_examples, limit,
            FLAGS.batch_granularity)
        # The experiments run at the batch found for the main run.
        runs = bench_lib.experiment_runs(
            config, phase, experiments, (FLAGS.amt_mask_ratio, FLAGS.amt_throw_ratio),
            FLAGS.plain_mask_ratio)
        done = {bench_lib.MAIN: main_run}
    measured = bench_lib.measure_runs(runs, measure_run, key, done)

    main_run = measured[bench_lib.MAIN]
    result = environment()
    result.update({
        "config": str(config_flags.get_config_filename(FLAGS["config"])),
        "tiny": FLAGS.tiny, "experiments": experiments, "warmup_steps": FLAGS.warmup,
        "num_examples": FLAGS.num_examples,
        "img_per_s": main_run["img_per_s"], "step_s": main_run["step_s"],
        "compile_s": main_run["compile_s"], "batch": main_run["batch"],
        "flops_per_image_analytic": main_run["flops_analytic_per_image"],
        "flops_per_image_xla": main_run["flops_xla_per_image"],
        "mfu": main_run["mfu"], "mfu_xla": main_run["mfu_xla"],
        "peak_memory_bytes": main_run["peak_memory_bytes"],
        "peak_memory_source": main_run["peak_memory_source"],
        "flops_note": FLOPS_NOTE,
        "max_batch_search": search,
    })
    result.update(bench_lib.experiment_summary(measured))
    result["runs"] = measured
    bench_lib.write_json(result, FLAGS.json)


if __name__ == "__main__":
    define_flags()
    app.run(main)
