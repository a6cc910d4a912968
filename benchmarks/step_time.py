"""The pretraining step of the trainer, measured: its time, memory, profile and idle device time,
and the XLA flags that change its speed. One JSON per invocation.

The step is the trainer's own (`build`, the one function here that calls
`mvmae_jax.train_step`), on a synthetic batch generated on the devices (no input pipeline),
compiled ahead of time. `--config.field=value` overrides any config field, as in
`mvmae_jax.main`; `--compiler_option=name=value` passes an XLA option to every compile.

  --mode=time       images/s, step time, compile time, FLOPs, MFU and peak memory; with
                    `--amt_throw`, `--amt_overhead`, `--mvmae` also the experiments' runs (AMT
                    mask 0.45 / throw 0.40 against mask 0.75: `amt_throw_speedup`; AMT masking
                    against random masking at the same counts: `amt_masking_overhead`; two views
                    against one: `mvmae_over_mae_cost`); `--find_max_batch` first finds the
                    largest per-device batch from the compiled step's memory, then times it once.
                    `--profile_steps` and `--optimizer_steps` then trace the main run's compiled
                    step (no second compile) and time its optimizer update alone; the JSON is
                    written after each part.
  --mode=versions   the versions of the libraries (cuDNN's, CUDA's, libtpu's among them) and
                    the devices; nothing compiled.
  --mode=attention  one attention layer's forward and backward at ViT-B/16's shapes (batch 256:
                    MAE's encoder and decoder, AMT's), each implementation (fused: cuDNN's
                    kernel on a GPU; einsum): ms, whether it ran, its largest gradient
                    difference to einsum.
  --mode=memory     per-device memory, XLA FLOPs and collectives of the compiled step for each
                    `--remat` setting, nothing run; with `--topology` compiled for a TPU slice
                    (or `--num_slices` of them) without a TPU (libtpu's ahead-of-time compiler);
                    each collective says whether it crosses slices.
  --mode=profile    a jax.profiler trace of the step, summed by XLA operation (on accelerators
                    the kernels on the device's streams), with each operation's HLO line.
  --mode=idle       the step with XLA's command buffers (CUDA graphs) on and off, each timed
                    with one sync per step and with one sync after `--idle_steps` steps; the
                    difference estimates the time per step the device waits for the host.
  --mode=xla_flags  each flag of `--candidates` alone against the default, alternated
                    (`--pairs` A/B pairs, one process, one compile per setting): the median step
                    time ratio and a verdict per flag.

  python benchmarks/step_time.py --json=/tmp/vit_b.json                        # configs/vit_b.py
  python benchmarks/step_time.py --amt_throw --amt_overhead --mvmae --json=F
  python benchmarks/step_time.py --config.batch_size=256 --find_max_batch --json=F
  python benchmarks/step_time.py --mode=memory --topology=v4:2x2x1 --chip_config=megacore \\
      --per_device_batch=128 --remat=off,nothing_saveable --json=F            # TPU, without one
  python benchmarks/step_time.py --mode=memory --config=configs/vit_l.py --topology=v4:2x2x1 \
      --chip_config=megacore --num_slices=2 --config.sharding.fsdp_axis_size=4 --json=F
  python benchmarks/step_time.py --mode=profile --config.batch_size=32 --json=F
  python benchmarks/step_time.py --mode=idle --json=F
  python benchmarks/step_time.py --mode=xla_flags --pairs=2 --json=F
  python benchmarks/step_time.py --tiny --steps=2 --json=/tmp/tiny.json        # CI smoke

The GPU flags of the other modes are ignored by the CPU compiler, so every mode runs (at tiny
sizes) on a CPU.
"""

from __future__ import annotations

import collections
import glob
import gzip
import importlib.metadata
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, NamedTuple

import bench_lib
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mvmae_jax import hardware, utils

FLAGS = flags.FLAGS
STARTED = time.monotonic()  # for --time_limit_s

MODES = ("time", "memory", "profile", "idle", "xla_flags", "versions", "attention")
# The flag sweep's candidates: each is an XLA option name and its value.
XLA_FLAG_CANDIDATES = ("xla_gpu_enable_cublaslt=true", "xla_gpu_enable_cudnn_layer_norm=true",
                       "xla_gpu_enable_triton_gemm=false", "xla_gpu_cudnn_gemm_fusion_level=2")
# --mode=attention: (name, rows, tokens, heads, head dim) of ViT-B/16 at 224, batch 256: MAE
# (mask 0.75) sees 1 + 49 tokens in the encoder and 1 + 196 in the decoder; AMT (mask 0.45 /
# throw 0.40, two views) 1 + 30 and 1 + 118. The fused path pads odd counts by one token.
ATTENTION_SHAPES = (("mae_encoder", 256, 50, 12, 64), ("mae_decoder", 256, 197, 16, 32),
                    ("amt_encoder", 512, 31, 12, 64), ("amt_decoder", 512, 119, 16, 32))
# Largest gradient difference, relative to the einsum gradient's largest value, under which
# the fused attention passes (bfloat16 keeps 8 bits of mantissa).
ATTENTION_GRAD_TOLERANCE = 0.05
# An empty list of command types turns XLA's command buffers (CUDA graphs) off.
COMMAND_BUFFERS_OFF = {"xla_gpu_enable_command_buffer": ""}
# The max-batch search compiles without autotuning: seconds per compile instead of minutes
# of trying kernels on buffers of the probed size; the memory estimate barely changes.
SEARCH_OPTIONS = {"xla_gpu_autotune_level": 0}
# A flag wins the sweep when it is faster than the default by more than this in every pair.
WIN_MARGIN = 0.02
# HBM per TPU chip, GiB, matched in order against `device_kind` (lower case): described TPU
# devices report no memory statistics of their own.
TPU_MEMORY_GIB: tuple[tuple[str, float], ...] = (
    ("tpu v4", 32.0), ("tpu v5 lite", 16.0), ("tpu v5e", 16.0), ("tpu v5p", 95.0),
    ("tpu v5", 95.0), ("tpu v6 lite", 32.0),
)
REMAT_CONFIG, REMAT_OFF = "config", "off"
FLOPS_NOTE = ("flops_analytic: matmul and convolution FLOPs of the step counted from the "
              "architecture (benchmarks/bench_lib.py: backward = 2x forward, patch embedding "
              "1x), used for `mfu`; flops_xla: XLA's cost analysis of the compiled step (every "
              "op, elementwise included; per device, times the device count), used for "
              "`mfu_xla`. MFU is against the dense bf16 peak of the device kind.")


def define_flags() -> None:
    """The command line (defined on demand, so that tests can import the module)."""
    config_flags.DEFINE_config_file("config", bench_lib.DEFAULT_CONFIG,
                                    "Pretraining config file (see configs/).", lock_config=True)
    flags.DEFINE_enum("mode", "time", MODES, "What to measure (see the module docstring).")
    flags.DEFINE_string("json", "", "Where to write the results (they are printed too).")
    flags.DEFINE_bool("tiny", False, "A tiny model (16x16 images, width 32), for the smoke test.")
    flags.DEFINE_string("phase", "", "The step's phase; default: the phase the config spends "
                        "most steps in ('amt' for AMT configs).")
    flags.DEFINE_string("dtype", "", "Compute dtype: '' keeps config.model.dtype; 'auto' is "
                        "bfloat16 on accelerators and float32 on the CPU.")
    flags.DEFINE_integer("steps", 10, "Timed (or traced) steps per measurement.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
    flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads of XLA's CPU backend "
                         "(0: all cores).")
    flags.DEFINE_integer("num_examples", 1_281_167, "Rows of the AMT bank (the data set size; "
                         "default ImageNet-1K's).")
    flags.DEFINE_multi_string("compiler_option", [], "name=value: an XLA option for every "
                              "compile (e.g. xla_enable_command_buffers_during_profiling=true).")
    # --mode=time
    flags.DEFINE_bool("amt_throw", False, "Also measure AMT throwing against mask 0.75.")
    flags.DEFINE_bool("amt_overhead", False, "Also measure AMT masking against random masking "
                      "at the same token counts.")
    flags.DEFINE_bool("mvmae", False, "Also measure two views against one view.")
    flags.DEFINE_float("amt_mask_ratio", 0.45, "Mask ratio of the AMT runs.")
    flags.DEFINE_float("amt_throw_ratio", 0.40, "Throw ratio of the AMT runs.")
    flags.DEFINE_float("plain_mask_ratio", 0.75, "Mask ratio of the run without throwing.")
    flags.DEFINE_integer("profile_steps", 0, "Then trace this many steps of the main run.")
    flags.DEFINE_integer("optimizer_steps", 0, "Then time this many optimizer updates alone.")
    flags.DEFINE_bool("find_max_batch", False, "Time the main run at the largest per-device "
                      "batch whose compiled step fits in device memory.")
    flags.DEFINE_float("memory_limit_gib", 0.0, "Device memory for --find_max_batch; 0: the "
                       "device's allocator limit (needed on the CPU, which reports none).")
    flags.DEFINE_integer("batch_granularity", 8, "--find_max_batch: per-device batch multiple.")
    # --mode=memory
    flags.DEFINE_string("topology", "", "A TPU topology to compile for without a TPU, e.g. "
                        "'v4:2x2x1' (needs libtpu); empty: this machine's devices.")
    flags.DEFINE_string("chip_config", "default", "TPU chip configuration: 'default', or "
                        "'megacore' (v4, v5p: one device per chip, as JAX runs them).")
    flags.DEFINE_integer("num_slices", 1, "--topology: slices of it, joined by the data-centre "
                         "network (multi-slice).")
    flags.DEFINE_integer("per_device_batch", 0, "Examples per device; 0 keeps "
                         "config.batch_size.")
    flags.DEFINE_list("remat", [REMAT_CONFIG], "What to compile, in order: 'config', 'off', "
                      "or a remat policy name.")
    # --mode=profile
    flags.DEFINE_integer("top", 40, "Operations listed.")
    flags.DEFINE_string("trace_dir", "", "Where the trace stays (default: a temporary folder, "
                        "removed).")
    # --mode=idle and --mode=xla_flags
    flags.DEFINE_integer("idle_steps", 20, "Steps between the syncs of the one-sync timing.")
    flags.DEFINE_integer("pairs", 2, "Alternated A/B pairs per setting.")
    flags.DEFINE_list("candidates", list(XLA_FLAG_CANDIDATES), "--mode=xla_flags: XLA options "
                      "(name=value) each measured alone against the default.")
    flags.DEFINE_float("time_limit_s", 0.0, "--mode=idle and xla_flags: seconds from the start "
                       "within which to finish; settings and pairs that would not fit are "
                       "reported as skipped (0: no limit).")


# ---------------------------------------------------------------------------------------------
# The run: config, step, batch.


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


def parse_options(items: list[str]) -> dict[str, Any]:
    """['name=value', ...] → XLA compile options: true/false as booleans, integers as ints,
    anything else (the empty string too) as text."""
    options: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise app.UsageError(f"an XLA option is name=value, got {item!r}")
        lowered = value.lower()
        if lowered in ("true", "false"):
            options[name.lstrip("-")] = lowered == "true"
        elif re.fullmatch(r"-?\d+", value):
            options[name.lstrip("-")] = int(value)
        else:
            options[name.lstrip("-")] = value
    return options


def resolve_dtype(config: ml_collections.ConfigDict, dtype: str) -> None:
    import jax

    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype:
        config.model.dtype = dtype


def config_and_phase() -> tuple[ml_collections.ConfigDict, str]:
    """The run the flags describe: --config shrunk by --tiny, its dtype set by --dtype, and
    the phase of --phase."""
    config = FLAGS.config
    if FLAGS.tiny:
        bench_lib.apply_tiny(config)
    resolve_dtype(config, FLAGS.dtype)
    return config, FLAGS.phase or bench_lib.default_phase(config)


def synthetic_batch(config: ml_collections.ConfigDict, num_examples: int, mesh) -> dict:
    """A pretraining batch generated on the devices, split like the trainer's: random uint8
    views,
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
        pixels = jax.random.randint(k_views, (batch, views, size, size, 3), 0, 256)
        return {"views": pixels.astype(jnp.uint8),
                "boxes": jnp.concatenate([corner, extent], axis=-1),
                "flips": jax.random.bernoulli(k_flip, 0.5, (batch, views)).astype(jnp.int32),
                "index": (jnp.arange(batch, dtype=jnp.int32) * stride) % num_examples}

    return jax.jit(make, out_shardings=sharding.batch_sharding(mesh))(jax.random.key(1))


class Run(NamedTuple):
    task: Any  # the trainer's pretraining task (model, masking policy, loss)
    model: Any
    mesh: Any
    state: Any
    step: Any  # the jitted step, (state, batch) -> (state, metrics), state donated
    batch: dict
    optimizer: Any


class _Source(NamedTuple):
    num_examples: int


def build(config: ml_collections.ConfigDict, phase: str, num_examples: int, abstract: bool,
          devices: list | None = None) -> Run:
    """The trainer's step of `phase` over `devices` (default: all), its state and a batch; with
    `abstract`, state and batch are shapes (nothing allocated: for memory estimates, and for
    devices that are only described). The only function of the benchmarks that calls
    `mvmae_jax.train_step`."""
    import jax

    from mvmae_jax import config_lib, optim, sharding, tasks
    from mvmae_jax import train_step as ts

    mesh = sharding.config_mesh(config.sharding, devices)
    config_lib.validate(config, mesh.size, jax.process_count())
    task = tasks.PretrainTask(config, mesh, _Source(num_examples))
    # A schedule of a long run (its values do not change the step's cost).
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, 100, 100_000)
    optimizer = task.optimizer(schedule)

    def init():
        return ts.create_train_state(task, optimizer, mesh, config)

    state = jax.eval_shape(init) if abstract else init()
    step = ts.make_train_step(task, optimizer, schedule, mesh,
                              ts.state_shardings(state, mesh, config), phase)
    if abstract:
        batch = jax.eval_shape(lambda: synthetic_batch(config, num_examples, mesh))
    else:
        batch = synthetic_batch(config, num_examples, mesh)
    return Run(task, task.model, mesh, state, step, batch, optimizer)


def compile_step(run: Run, options: dict[str, Any] | None = None):
    """The step compiled for the run's state and batch, with `options` (XLA compile options)
    on top of --compiler_option."""
    merged = {**parse_options(FLAGS.compiler_option), **(options or {})}
    return run.step.lower(run.state, run.batch).compile(compiler_options=merged or None)


# ---------------------------------------------------------------------------------------------
# What a compiled step reports.


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
    """cuDNN fused-attention kernels (forward and backward) in the compiled step: whether
    config.model.attention="fused" got cuDNN's kernel rather than XLA's attention."""
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


def token_counts(config: ml_collections.ConfigDict, phase: str) -> dict[str, int]:
    """Patches per view of a run: all, masked, thrown, visible."""
    from mvmae_jax import masking, models

    num_patches = (config.img_size // models.encoder_dims(config.model)["patch_size"]) ** 2
    n_mask, n_throw, n_vis = masking.mask_counts(num_patches,
                                                 *bench_lib.phase_ratios(config, phase))
    return {"num_patches": num_patches, "masked": n_mask, "thrown": n_throw, "visible": n_vis}


def analytic_flops(config: ml_collections.ConfigDict, phase: str) -> dict[str, int]:
    """`bench_lib.analytic_train_flops` of the run (the model's sizes from the config)."""
    from mvmae_jax import models

    tokens = token_counts(config, phase)
    online = phase == bench_lib.AMT_PHASE and config.amt.source == "online"
    return bench_lib.analytic_train_flops(config, models.encoder_dims(config.model),
                                          tokens["masked"], tokens["thrown"],
                                          online_maps=online)


def run_settings(config: ml_collections.ConfigDict, phase: str) -> dict[str, Any]:
    from mvmae_jax import models

    contrastive = config.views.num == 2 and config.contrastive.weight > 0
    return {"encoder": models.encoder_dims(config.model), "variant": config.model.variant,
            "decoder": {"width": config.model.decoder_width,
                        "depth": config.model.decoder_depth,
                        "heads": config.model.decoder_heads},
            "img_size": config.img_size, "batch": config.batch_size,
            "views": config.views.num, "contrastive": contrastive,
            "strategy": config.masking.strategy, "amt_source": config.amt.source,
            "phase": phase, "mask_ratio_throw_ratio": list(bench_lib.phase_ratios(config, phase)),
            "tokens": token_counts(config, phase), "dtype": config.model.dtype,
            "remat": config.model.remat, "attention": config.model.attention,
            "grad_accum_steps": config.grad_accum_steps,
            "sharding": config.sharding.strategy}


def last_line(error: BaseException) -> str:
    """An exception as one line: its type and the last line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


# ---------------------------------------------------------------------------------------------
# --mode=time


def timed_steps(compiled, state, batch, steps: int, sync_every_step: bool = True):
    """(state, last metrics, seconds per step): each step timed to its own sync, or `steps`
    steps dispatched back to back with one sync at the end (their mean)."""
    import jax

    seconds = []
    begin = time.perf_counter()
    for _ in range(steps):
        if sync_every_step:
            begin = time.perf_counter()
        state, metrics = compiled(state, batch)
        if sync_every_step:
            jax.block_until_ready((state, metrics))
            seconds.append(time.perf_counter() - begin)
    if not sync_every_step:
        jax.block_until_ready((state, metrics))
        seconds.append((time.perf_counter() - begin) / steps)
    return state, metrics, seconds


def measure(config: ml_collections.ConfigDict, phase: str, steps: int, warmup: int,
            num_examples: int, then=None) -> dict[str, Any]:
    """Compiles and times one run; see the module docstring. `then(result, run, compiled,
    state)`, when given, runs after the timing with the compiled step (e.g. to trace it)."""
    import jax

    run = build(config, phase, num_examples, abstract=False)
    started = time.perf_counter()
    compiled = compile_step(run)
    compiled_at = time.perf_counter()
    state = run.state
    for _ in range(warmup):
        state, _ = compiled(state, run.batch)
    jax.block_until_ready(state)
    host_before = bench_lib.host_usage()
    state, metrics, seconds = timed_steps(compiled, state, run.batch, steps)
    host = bench_lib.host_usage_per_step(host_before, steps)
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss}: the timed steps are not meaningful")

    devices = jax.device_count()
    timing = bench_lib.timing_stats(seconds, config.batch_size)
    flops = analytic_flops(config, phase)
    per_device = utils.xla_flops(compiled)
    xla_step = None if per_device is None else per_device * devices
    peak = hardware.peak_flops(jax.devices()[0].device_kind)
    memory, memory_source = peak_memory()
    result = dict(run_settings(config, phase), **timing, **host)
    result.update({
        "compile_s": compiled_at - started,
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
    if then is not None:
        then(result, run, compiled, state)
    return result


def compile_abstract_step(config: ml_collections.ConfigDict, phase: str, num_examples: int,
                          devices: list | None = None, options: dict | None = None,
                          ) -> tuple[Any, dict[str, int], Any]:
    """(compiled step, its per-device `compiled_memory`, mesh), compiled on abstract state and
    batch over `devices` (nothing allocated)."""
    run = build(config, phase, num_examples, abstract=True, devices=devices)
    compiled = compile_step(run, options)
    memory = compiled_memory(compiled)
    if memory is None:
        raise RuntimeError("this backend gives no memory analysis of a compiled program; "
                           "set --config.batch_size")
    return compiled, memory, run.mesh


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error).lower()
    return "resource_exhausted" in text or "out of memory" in text


def largest_batch(config: ml_collections.ConfigDict, phase: str, steps: int, warmup: int,
                  num_examples: int, limit_bytes: float, granularity: int,
                  ) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """The main run at the largest per-device batch whose compiled step (without autotuning)
    fits in `limit_bytes`, found by `bench_lib.search_largest_batch` from config.batch_size,
    then timed once (10% lower per out-of-memory failure, should the estimate be short).

    Returns (config at that batch, its measurement, how it was found).
    """
    import jax

    devices = jax.device_count()

    def at(per_device: int) -> ml_collections.ConfigDict:
        return bench_lib.config_variant(config, batch_size=per_device * devices)

    def memory_at(per_device: int) -> float:
        try:
            return compile_abstract_step(at(per_device), phase, num_examples,
                                         options=SEARCH_OPTIONS)[1]["estimated_peak_bytes"]
        except Exception as error:  # noqa: BLE001 - a compile out of memory does not fit
            if _is_out_of_memory(error):
                return math.inf
            raise

    started = time.perf_counter()
    start = max(granularity, config.batch_size // devices)
    per_device, search = bench_lib.search_largest_batch(memory_at, start, limit_bytes,
                                                        granularity)
    search.update(search_s=time.perf_counter() - started, compile_options=SEARCH_OPTIONS,
                  failed_batches=[])
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


def with_compiled_step(result: dict, run: Run, compiled, state, progress) -> None:
    """--profile_steps and --optimizer_steps on the main run's compiled step, each part
    written (`progress`) as it ends."""
    progress(result)
    if FLAGS.profile_steps:
        state, result["profile"] = profile_compiled(compiled, state, run.batch,
                                                    FLAGS.profile_steps)
        progress(result)
    if FLAGS.optimizer_steps:
        result["optimizer_update"] = optimizer_update_time(run, state, FLAGS.optimizer_steps)
        progress(result)


def optimizer_update_time(run: Run, state, steps: int) -> dict[str, Any]:
    """The step's optimizer update and its application alone, on stand-in gradients (the
    parameters): compile and median seconds."""
    import jax
    import optax

    def update(params, opt_state, grads):
        updates, opt_state = run.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    started = time.perf_counter()
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
        state.params, state.opt_state, state.params).compile()
    compile_s = time.perf_counter() - started
    grads = jax.tree.map(lambda x: x * 1e-3, state.params)
    params, opt_state = jax.tree.map(lambda x: x.copy(), (state.params, state.opt_state))
    seconds = []
    for _ in range(steps + 1):
        begin = time.perf_counter()
        params, opt_state = compiled(params, opt_state, grads)
        jax.block_until_ready(params)
        seconds.append(time.perf_counter() - begin)
    return {"compile_s": compile_s, "step_s": statistics.median(seconds[1:]),
            "parameters": sum(x.size for x in jax.tree.leaves(state.params))}


def time_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    experiments = [name for name in bench_lib.EXPERIMENT_RUNS if getattr(FLAGS, name)]
    ratios = (FLAGS.amt_mask_ratio, FLAGS.amt_throw_ratio)

    def measure_run(run_config, run_phase, then=None):
        return measure(run_config, run_phase, FLAGS.steps, FLAGS.warmup, FLAGS.num_examples,
                       then)

    search, done = None, None
    if FLAGS.profile_steps or FLAGS.optimizer_steps:
        def then(result, run, compiled, state):
            with_compiled_step(result, run, compiled, state,
                               lambda main: progress({"runs": {bench_lib.MAIN: main}}))

        done = {bench_lib.MAIN: measure_run(config, phase, then)}
    if FLAGS.find_max_batch:
        limit = FLAGS.memory_limit_gib * 2**30 or device_memory_limit()
        if not limit:
            raise app.UsageError("--find_max_batch: this device reports no memory limit; "
                                 "give --memory_limit_gib")
        config, main_run, search = largest_batch(
            config, phase, FLAGS.steps, FLAGS.warmup, FLAGS.num_examples, limit,
            FLAGS.batch_granularity)
        done = {bench_lib.MAIN: main_run}  # the experiments run at the batch found
    runs = bench_lib.experiment_runs(config, phase, experiments, ratios, FLAGS.plain_mask_ratio)
    measured = bench_lib.measure_runs(runs, measure_run,
                                      lambda c, p: (c.to_json(), p), done)
    main_run = measured[bench_lib.MAIN]
    result = {
        "experiments": experiments,
        "img_per_s": main_run["img_per_s"], "step_s": main_run["step_s"],
        "compile_s": main_run["compile_s"], "batch": main_run["batch"],
        "flops_per_image_analytic": main_run["flops_analytic_per_image"],
        "flops_per_image_xla": main_run["flops_xla_per_image"],
        "mfu": main_run["mfu"], "mfu_xla": main_run["mfu_xla"],
        "peak_memory_bytes": main_run["peak_memory_bytes"],
        "peak_memory_source": main_run["peak_memory_source"],
        "flops_note": FLOPS_NOTE, "max_batch_search": search,
        "profile": main_run.get("profile"), "optimizer_update": main_run.get("optimizer_update"),
    }
    result.update(bench_lib.experiment_summary(measured))
    result["runs"] = measured
    return result


# ---------------------------------------------------------------------------------------------
# --mode=memory


def topology_devices(topology: str, chip_config: str, num_slices: int = 1) -> list:
    """The devices of `num_slices` slices of a TPU topology 'v4:2x2x1' (kind:bounds),
    described by libtpu for ahead-of-time compilation; hosts of at most 2x2x1 chips, as TPU
    VMs have."""
    from jax.experimental import topologies

    _, _, bounds = topology.partition(":")
    chips = tuple(int(n) for n in bounds.split("x"))
    per_host = (tuple(min(n, 2) for n in chips[:2]) + (1,) * 3)[:3]
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name=chip_config,
        chips_per_host_bounds=per_host, num_slices=num_slices)
    return list(description.devices)


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def array_bytes(type_text: str) -> list[int]:
    """The size of each array in an HLO type ("(bf16[8,4]{1,0}, u32[])")."""
    return [_DTYPE_BYTES[t] * math.prod(int(n) for n in dims.split(",") if n)
            for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_text)
            if t in _DTYPE_BYTES]


def collectives(hlo_text: str) -> list[dict[str, Any]]:
    """The collectives of a compiled module: kind, bytes per device, and whether they cross
    slices. XLA's collectives stay within a slice (a multi-slice program is one slice's, its
    device ids local); what crosses slices is a send to the multi-slice (megascale) runtime,
    with its transfer type ("all-reduce", "one-to-one", ...). Bytes: an all-reduce's (or
    all-to-all's) results summed, else the largest array of the result (an all-gather's whole
    array, a reduce-scatter's shard, a send's data). Each instruction counts once, also in a
    loop body."""
    found = []
    kinds = "|".join(COLLECTIVES)
    for line in hlo_text.splitlines():
        local = re.search(rf"= (.+?) ({kinds})(?:-start)?\(", line)
        remote = re.search(r"= \((.+?)\) send\(.*_xla_megascale_transfer_type=\"(\w+)\"", line)
        if local:
            sizes = array_bytes(local.group(1))
            total = local.group(2) in ("all-reduce", "all-to-all")
            found.append({"kind": local.group(2), "crosses_slices": False,
                          "bytes": sum(sizes) if total else max(sizes, default=0)})
        elif remote:
            rendezvous = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', line)
            found.append({"kind": remote.group(2).lower().replace("_", "-"),
                          "crosses_slices": True, "bytes": array_bytes(remote.group(1))[0],
                          "shape": remote.group(1).split("{")[0],
                          "hlo": rendezvous.group(1) if rendezvous else ""})
    return found


def collective_totals(found: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{"kind, within/across slices": {count, mib}} of `collectives`."""
    totals: dict[str, dict[str, float]] = {}
    for item in found:
        key = f"{item['kind']}, {'across' if item['crosses_slices'] else 'within'} slices"
        entry = totals.setdefault(key, {"count": 0, "mib": 0.0})
        entry["count"] += 1
        entry["mib"] += item["bytes"] / 2**20
    return totals


def device_memory_gib(device) -> float | None:
    """Memory of one device: its allocator limit where it reports one, else the HBM of its TPU
    chip kind (`TPU_MEMORY_GIB`), else None."""
    limit = device_memory_limit(device)
    if limit:
        return limit / 2**30
    return hardware.match_device_kind(TPU_MEMORY_GIB, device.device_kind)


def with_remat(config: ml_collections.ConfigDict, setting: str) -> ml_collections.ConfigDict:
    """`config` with remat as `setting` says ('config', 'off' or a policy name)."""
    if setting == REMAT_CONFIG:
        return bench_lib.config_variant(config)
    if setting == REMAT_OFF:
        return bench_lib.config_variant(config, model__remat=False)
    return bench_lib.config_variant(config, model__remat=True, model__remat_policy=setting)


def memory_mode(config: ml_collections.ConfigDict, phase: str, progress
                ) -> dict[str, Any]:
    import jax

    if FLAGS.topology and FLAGS.dtype == "auto":
        config.model.dtype = "bfloat16"  # 'auto' read this machine's backend, not the TPU's
    devices = (topology_devices(FLAGS.topology, FLAGS.chip_config, FLAGS.num_slices)
               if FLAGS.topology else None)
    device_list = devices or jax.devices()
    if FLAGS.per_device_batch:
        config.batch_size = FLAGS.per_device_batch * len(device_list)
    memory_gib = device_memory_gib(device_list[0])
    runs = []
    for setting in FLAGS.remat:
        run_config = with_remat(config, setting)
        started = time.perf_counter()
        compiled, memory, mesh = compile_abstract_step(run_config, phase, FLAGS.num_examples,
                                                       devices)
        per_device = config.batch_size // mesh.size
        flops = utils.xla_flops(compiled)
        run = {"setting": setting, "remat": run_config.model.remat,
               "remat_policy": (run_config.model.remat_policy if run_config.model.remat
                                else None),
               "per_device_batch": per_device, "compile_s": time.perf_counter() - started,
               **{key.replace("_in_bytes", "_gib").replace("_bytes", "_gib"): value / 2**30
                  for key, value in memory.items()},
               "xla_gflop_per_example": flops / per_device / 1e9 if flops else None}
        run["fits"] = (run["estimated_peak_gib"] <= memory_gib) if memory_gib else None
        found = collectives(compiled.as_text())
        run.update(mesh=dict(mesh.shape),
                   mesh_slices=[[getattr(d, "slice_index", 0) for d in row]
                                for row in mesh.devices],
                   collectives=collective_totals(found),
                   across_slices=sorted((c for c in found if c["crosses_slices"]),
                                        key=lambda c: -c["bytes"]))
        print(f"[step_time] {setting}: {run['estimated_peak_gib']:.2f} GiB per device",
              file=sys.stderr, flush=True)
        runs.append(run)
    return {"model": config.model.variant or f"width {config.model.width}",
            "global_batch": config.batch_size, "devices": len(device_list),
            "platform": device_list[0].platform, "device_kind": device_list[0].device_kind,
            "topology": FLAGS.topology or None, "chip_config": FLAGS.chip_config,
            "num_slices": FLAGS.num_slices,
            "device_memory_gib": memory_gib,
            "libtpu": importlib.metadata.version("libtpu") if FLAGS.topology else None,
            "runs": runs}


# ---------------------------------------------------------------------------------------------
# --mode=profile

# Trace events that are runtime bookkeeping, not XLA operations.
_NOT_OPS = ("$", "Thunk", "Slinky", "end:", "PjitFunction", "CommonPjRt", "PjRt")


def hlo_lines(hlo_text: str) -> dict[str, str]:
    """{instruction name: its HLO line} of a compiled module's text."""
    lines = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if match:
            lines[match.group(1)] = line.strip()
    return lines


def durations_by_op(events: list[dict]) -> collections.Counter:
    """Microseconds per XLA operation, summed over a perfetto trace's events.

    On an accelerator the operations are the kernels on the device's streams (processes named
    /device:...), each named by the HLO instruction it runs (its `hlo_op` argument, else the
    kernel name); the host's events there are launches and waits. On the CPU the operations
    run on the host's threads: every host event that is not runtime bookkeeping."""
    device_pids = {event["pid"] for event in events
                   if event.get("ph") == "M" and event.get("name") == "process_name"
                   and str(event.get("args", {}).get("name", "")).startswith("/device:")}
    spans = [event for event in events if event.get("ph") == "X"]
    on_device = [event for event in spans if event.get("pid") in device_pids]
    totals = collections.Counter()
    if on_device:
        for event in on_device:
            name = (event.get("args") or {}).get("hlo_op") or event["name"]
            totals[name] += event.get("dur", 0)
        return totals
    for event in spans:
        if not event["name"].startswith(_NOT_OPS):
            totals[event["name"]] += event.get("dur", 0)
    return totals


def summarise(totals: collections.Counter, lines: dict[str, str], steps: int,
              top: int) -> dict[str, Any]:
    """Per-step milliseconds by operation and by kind (the name without its number)."""
    by_kind = collections.Counter()
    for name, micros in totals.items():
        by_kind[re.sub(r"\.\d+$", "", name)] += micros
    return {
        "ops_ms_per_step": round(sum(totals.values()) / steps / 1e3, 3),
        "by_kind_ms_per_step": {k: round(v / steps / 1e3, 3) for k, v in by_kind.most_common()},
        "top_ops": [{"name": name, "ms_per_step": round(micros / steps / 1e3, 3),
                     "hlo": lines.get(name, "")[:400]}
                    for name, micros in totals.most_common(top)],
    }


def profile_compiled(compiled, state, batch, steps: int) -> tuple[Any, dict[str, Any]]:
    """(state, summary): a jax.profiler trace of `steps` steps of a compiled step, summed by
    XLA operation. (XLA runs without command buffers while the profiler runs.)"""
    import jax

    trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="mvmae_profile_")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    started = time.perf_counter()
    for _ in range(steps):
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
    traced_s = time.perf_counter() - started
    jax.profiler.stop_trace()
    try:
        paths = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        if not paths:
            raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
        with gzip.open(paths[0]) as f:
            events = json.load(f)["traceEvents"]
        summary = summarise(durations_by_op(events), hlo_lines(compiled.as_text()), steps,
                            FLAGS.top)
    finally:
        if not FLAGS.trace_dir:
            shutil.rmtree(trace_dir, ignore_errors=True)
    step_ms = traced_s / steps * 1e3
    return state, {"steps_traced": steps, "step_s_while_tracing": traced_s / steps,
                   # On an accelerator: the step's time the device's streams ran no kernel.
                   "step_ms_not_in_ops": round(step_ms - summary["ops_ms_per_step"], 3),
                   "trace_dir": FLAGS.trace_dir or None, **summary}


def profile_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    import jax

    run = build(config, phase, FLAGS.num_examples, abstract=False)
    compiled = compile_step(run)
    state = run.state
    for _ in range(FLAGS.warmup):
        state, _ = compiled(state, run.batch)
    jax.block_until_ready(state)
    _, summary = profile_compiled(compiled, state, run.batch, FLAGS.steps)
    return {"settings": run_settings(config, phase), **summary}


# ---------------------------------------------------------------------------------------------
# --mode=attention


def attention_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    """Each attention implementation at each of ATTENTION_SHAPES (a row per example and view;
    --tiny: 4 rows), forward and backward in the config's dtype, against einsum."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mvmae_jax.models import vit

    dtype = jnp.dtype(config.model.dtype)
    shapes = {}
    for name, rows, tokens, heads, head_dim in ATTENTION_SHAPES:
        rows = 4 if FLAGS.tiny else rows
        x = jax.random.normal(jax.random.key(0), (rows, tokens, heads * head_dim), dtype)
        cotangent = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
        runs, grads = {}, {}
        for implementation in ("einsum", "fused"):
            layer = vit.MultiHeadDotProductAttention(heads, dtype=dtype,
                                                     implementation=implementation)

            def loss(params, x, layer=layer, cotangent=cotangent):
                return jnp.sum(layer.apply(params, x)[0].astype(jnp.float32) * cotangent)

            try:
                params = jax.jit(layer.init)(jax.random.key(2), x)
                started = time.perf_counter()
                fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
                compile_s = time.perf_counter() - started
                seconds = []
                for _ in range(FLAGS.steps + 1):
                    begin = time.perf_counter()
                    grads[implementation] = jax.block_until_ready(fn(params, x))
                    seconds.append(time.perf_counter() - begin)
                runs[implementation] = {
                    "ok": True, "ms": statistics.median(seconds[1:]) * 1e3,
                    "compile_s": compile_s, "cudnn_calls": cudnn_attention_calls(fn)}
            except Exception as error:  # noqa: BLE001 - a refused shape is the finding
                runs[implementation] = {"ok": False, "error": last_line(error)}
        if runs["einsum"]["ok"] and runs["fused"]["ok"]:
            reference = jax.tree.leaves(grads["einsum"])
            scale = max(float(np.abs(np.asarray(g, np.float32)).max()) for g in reference)
            difference = max(
                float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
                for a, b in zip(jax.tree.leaves(grads["fused"]), reference, strict=True))
            runs["fused"]["max_grad_difference"] = difference / scale
            runs["fused"]["ok"] = difference / scale < ATTENTION_GRAD_TOLERANCE
            runs["fused_over_einsum"] = runs["fused"]["ms"] / runs["einsum"]["ms"]
        shapes[name] = {"rows": x.shape[0], "tokens": tokens, "heads": heads,
                        "head_dim": head_dim, **runs}
        progress({"shapes": shapes})
    return {"shapes": shapes, "dtype": str(dtype),
            "fused_passed": all(r["fused"]["ok"] for r in shapes.values()),
            "fused_backend": vit.fused_attention_backend(dtype),
            "note": ("max_grad_difference: largest |fused - einsum| over the gradients to the "
                     "parameters and the input, over the einsum gradients' largest value; the "
                     f"fused path passes under {ATTENTION_GRAD_TOLERANCE}.")}


def versions_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    """Nothing measured: the versions and devices that every mode's JSON carries."""
    del config, phase, progress
    return {}


# ---------------------------------------------------------------------------------------------
# --mode=idle and --mode=xla_flags: settings of one step, alternated in one process.


def seconds_left() -> float:
    """Seconds left of --time_limit_s since the process started (inf without a limit)."""
    if not FLAGS.time_limit_s:
        return math.inf
    return FLAGS.time_limit_s - (time.monotonic() - STARTED)


def compile_settings(run: Run, settings: dict[str, dict]) -> tuple[dict, dict]:
    """({name: compiled step}, {name: why not}) for each setting's options: an XLA that
    refuses the options, or too little time left for another compile (--time_limit_s)."""
    compiled, errors = {}, {}
    longest = 0.0
    for name, options in settings.items():
        if compiled and seconds_left() < 2 * longest:
            errors[name] = f"skipped: {seconds_left():.0f} s left, a compile took {longest:.0f} s"
            continue
        started = time.perf_counter()
        try:
            compiled[name] = compile_step(run, options)
        except Exception as error:  # noqa: BLE001 - a flag this XLA rejects is a finding
            errors[name] = last_line(error)
        longest = max(longest, time.perf_counter() - started)
        print(f"[step_time] {name}: {errors.get(name, 'compiled')} "
              f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    return compiled, errors


def enough_time_for(pair_s: float) -> bool:
    """Whether another alternated pair taking `pair_s` fits in --time_limit_s."""
    return seconds_left() > 1.2 * pair_s


def warm_up(compiled: dict, state, batch, steps: int):
    import jax

    for executable in compiled.values():
        for _ in range(steps):
            state, _ = executable(state, batch)
    jax.block_until_ready(state)
    return state


def idle_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    run = build(config, phase, FLAGS.num_examples, abstract=False)
    settings = {"command_buffers_default": {}, "command_buffers_off": COMMAND_BUFFERS_OFF}
    compiled, errors = compile_settings(run, settings)
    if not compiled:
        raise RuntimeError(f"no setting compiled: {errors}")
    state = warm_up(compiled, run.state, run.batch, max(FLAGS.warmup, 1))
    timings = {name: {"sync_each": [], "sync_once": []} for name in compiled}
    pair_s = 0.0
    for _ in range(FLAGS.pairs):  # alternated: the machine's drift falls on every setting
        if not enough_time_for(pair_s):
            break
        started = time.perf_counter()
        for name, executable in compiled.items():
            state, _, seconds = timed_steps(executable, state, run.batch, FLAGS.steps)
            timings[name]["sync_each"].append(statistics.median(seconds))
            state, _, seconds = timed_steps(executable, state, run.batch, FLAGS.idle_steps,
                                         sync_every_step=False)
            timings[name]["sync_once"].extend(seconds)
        pair_s = time.perf_counter() - started
    results = {}
    for name, timing in timings.items():
        each, once = statistics.median(timing["sync_each"]), statistics.median(timing["sync_once"])
        results[name] = {"step_s_sync_each": each, "step_s_sync_once": once,
                         "host_gap_ms_per_step": (each - once) * 1e3,
                         "img_per_s_sync_once": config.batch_size / once, **timing}
    out = {"settings": run_settings(config, phase), "steps_per_sync_once": FLAGS.idle_steps,
           "pairs": FLAGS.pairs, "results": results, "compile_errors": errors,
           "note": ("host_gap_ms_per_step: a step timed to its own sync minus the mean step of "
                    f"{FLAGS.idle_steps} dispatched back to back; the time per step the device "
                    "waits for the host (launch, dispatch, sync) when the loop syncs every step. "
                    "command_buffers_off compiles with xla_gpu_enable_command_buffer='' (no "
                    "CUDA graphs); the CPU compiler ignores it.")}
    if len(results) == 2:
        out["command_buffers_off_over_default"] = (
            results["command_buffers_off"]["step_s_sync_once"]
            / results["command_buffers_default"]["step_s_sync_once"])
    return out


def flag_verdict(ratios: list[float], margin: float = WIN_MARGIN, min_pairs: int = 2) -> str:
    """'winner' when the flag's step took less than (1 - margin) of the default's in every
    pair, 'loser' when more than (1 + margin) in every pair, else 'no clear difference';
    'too few pairs' under `min_pairs`."""
    if len(ratios) < min_pairs:
        return "too few pairs"
    if all(r < 1 - margin for r in ratios):
        return "winner"
    if all(r > 1 + margin for r in ratios):
        return "loser"
    return "no clear difference"


def xla_flags_mode(config: ml_collections.ConfigDict, phase: str, progress
                   ) -> dict[str, Any]:
    run = build(config, phase, FLAGS.num_examples, abstract=False)
    candidates = {item: parse_options([item]) for item in FLAGS.candidates}
    compiled, errors = compile_settings(run, {"default": {}, **candidates})
    if "default" not in compiled:
        raise RuntimeError(f"the default step did not compile: {errors['default']}")
    state = warm_up(compiled, run.state, run.batch, max(FLAGS.warmup, 1))
    ratios: dict[str, list[float]] = {name: [] for name in compiled if name != "default"}
    medians: dict[str, list[float]] = {name: [] for name in compiled}
    pair_s = 0.0
    for _ in range(FLAGS.pairs):
        if not enough_time_for(pair_s):
            break
        started = time.perf_counter()
        for name in ratios:  # A/B: the default, then the flag, once per pair
            pair = {}
            for side in ("default", name):
                state, _, seconds = timed_steps(compiled[side], state, run.batch, FLAGS.steps)
                pair[side] = statistics.median(seconds)
                medians[side].append(pair[side])
            ratios[name].append(pair[name] / pair["default"])
        pair_s = time.perf_counter() - started
    flags_out = {name: {"step_s_ratio_median": statistics.median(values),
                        "step_s_ratios": values, "verdict": flag_verdict(values),
                        "step_s_medians": medians[name]}
                 for name, values in ratios.items()}
    flags_out.update({name: {"verdict": "skipped" if why.startswith("skipped") else "error",
                             "error": why} for name, why in errors.items()})
    return {"settings": run_settings(config, phase), "pairs": FLAGS.pairs,
            "steps_per_timing": FLAGS.steps, "default_step_s": medians["default"],
            "flags": flags_out, "winners": [n for n, f in flags_out.items()
                                            if f["verdict"] == "winner"],
            "note": (f"step time with the flag over the default's, per A/B pair; winner: faster "
                     f"by more than {WIN_MARGIN:.0%} in every pair. The default includes "
                     "mvmae_jax.xla_flags.GPU_DEFAULTS where the platform is a GPU.")}


# ---------------------------------------------------------------------------------------------


def accelerator_libraries() -> dict[str, str]:
    """Installed versions of the accelerator libraries JAX runs on (cuDNN, cuBLAS, the CUDA
    runtime, NCCL, JAX's CUDA plugin, libtpu), from the installed packages."""
    prefixes = ("nvidia-cudnn", "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-nccl",
                "jax-cuda", "jax_cuda", "libtpu")
    return {dist.metadata["Name"]: dist.version
            for dist in importlib.metadata.distributions()
            if (dist.metadata["Name"] or "").lower().startswith(prefixes)}


def environment() -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import optax

    return {
        "framework": "jax", "mode": FLAGS.mode,
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "optax": optax.__version__,
                     **accelerator_libraries()},
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": parse_options(FLAGS.compiler_option),
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
    from mvmae_jax import xla_flags

    xla_flags.apply_gpu_defaults()
    configure_threads(FLAGS.threads)
    if FLAGS.find_max_batch:
        # JAX's allocator takes 75% of GPU memory by default; the largest batch may use more.
        # Read when the backend starts (config_and_phase's --dtype=auto starts it).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS"):
        print("[bench] warning: JAX_DISABLE_MOST_OPTIMIZATIONS is set: timings are not those "
              "of an optimised step", file=sys.stderr)
    modes = {"time": time_mode, "memory": memory_mode, "profile": profile_mode,
             "idle": idle_mode, "xla_flags": xla_flags_mode, "versions": versions_mode,
             "attention": attention_mode}
    config, phase = config_and_phase()
    header = environment()
    header.update({"config": str(config_flags.get_config_filename(FLAGS["config"])),
                   "tiny": FLAGS.tiny, "phase": phase, "dtype": config.model.dtype,
                   "steps": FLAGS.steps, "warmup_steps": FLAGS.warmup,
                   "num_examples": FLAGS.num_examples})

    def progress(partial: dict[str, Any]) -> None:
        """What is measured so far, written where the final result goes."""
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump({**header, **partial, "partial": True}, f, indent=2)

    bench_lib.write_json({**header, **modes[FLAGS.mode](config, phase, progress)}, FLAGS.json)


if __name__ == "__main__":
    define_flags()
    app.run(main)
