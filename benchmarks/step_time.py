"""The trainer's pretraining step, measured; one JSON per invocation (docs/benchmarks.md).

The step is the trainer's own (`build`) on a synthetic batch made on the devices, compiled ahead
of time; `--config.field=value` overrides a config field, `--compiler_option=name=value` passes
an XLA option to every compile. Every mode runs, at tiny sizes, on a CPU too.

  time       img/s, compile time, FLOPs, MFU, peak memory; `--amt_throw`, `--amt_overhead`,
             `--mvmae`: the experiments' runs; `--find_max_batch`: at the largest per-device batch
             that fits; `--profile_steps`, `--optimizer_steps`: then a trace of the same compiled
             step and the optimizer update alone
  versions   library versions (cuDNN, CUDA, libtpu among them) and devices
  attention  one attention layer at ViT-B/16's shapes, fused (cuDNN) against einsum
  memory     per-device memory, XLA FLOPs and collectives of the compiled step per `--remat`
             setting; `--topology`, `--num_slices`: for TPU slices, without a TPU
  profile    a trace of the step summed by XLA operation
  idle       command buffers on and off, one sync per step against one per `--idle_steps`
  xla_flags  each of `--candidates` alone against the default, alternated A/B pairs

  python benchmarks/step_time.py --tiny --steps=2 --json=/tmp/tiny.json
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
import types
from typing import Any, NamedTuple

import bench_lib
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mvmae_jax import hardware, utils

FLAGS = flags.FLAGS
STARTED = time.monotonic()  # for --time_limit_s

MODES = ("time", "memory", "profile", "idle", "xla_flags", "versions", "attention")
XLA_FLAG_CANDIDATES = ("xla_gpu_enable_cublaslt=true", "xla_gpu_enable_cudnn_layer_norm=true",
                       "xla_gpu_enable_triton_gemm=false", "xla_gpu_cudnn_gemm_fusion_level=2")
# (name, rows, tokens, heads, head dim) at ViT-B/16, 224, batch 256: MAE (mask 0.75) and AMT
# (mask 0.45 / throw 0.40, two views) encoder and decoder.
ATTENTION_SHAPES = (("mae_encoder", 256, 50, 12, 64), ("mae_decoder", 256, 197, 16, 32),
                    ("amt_encoder", 512, 31, 12, 64), ("amt_decoder", 512, 119, 16, 32))
ATTENTION_GRAD_TOLERANCE = 0.05  # relative to the largest einsum gradient (bf16: 8 bits)
COMMAND_BUFFERS_OFF = {"xla_gpu_enable_command_buffer": ""}  # no command types: CUDA graphs off
# The max-batch search compiles without autotuning: seconds per compile instead of minutes.
SEARCH_OPTIONS = {"xla_gpu_autotune_level": 0}
WIN_MARGIN = 0.02  # a flag wins when faster than the default by this in every pair
# HBM per TPU chip, GiB, matched in order: described TPU devices report no memory statistics.
TPU_MEMORY_GIB = (("tpu v4", 32.0), ("tpu v5 lite", 16.0), ("tpu v5e", 16.0), ("tpu v5p", 95.0),
                  ("tpu v5", 95.0), ("tpu v6 lite", 32.0))
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_NOT_OPS = ("$", "Thunk", "Slinky", "end:", "PjitFunction", "CommonPjRt", "PjRt")  # bookkeeping


def define_flags() -> None:
    bench_lib.define_flags()
    flags.DEFINE_enum("mode", "time", MODES, "What to measure (see the module docstring).")
    flags.DEFINE_integer("num_examples", 1_281_167, "Rows of the AMT bank (ImageNet-1K's).")
    flags.DEFINE_multi_string("compiler_option", [], "name=value: an XLA option for every "
                              "compile.")
    flags.DEFINE_bool("amt_overhead", False, "Also measure AMT masking against random masking "
                      "at the same token counts.")
    flags.DEFINE_integer("profile_steps", 0, "Then trace this many steps of the main run.")
    flags.DEFINE_integer("optimizer_steps", 0, "Then time this many optimizer updates alone.")
    flags.DEFINE_float("memory_limit_gib", 0.0, "--find_max_batch: device memory; 0: the "
                       "allocator's limit (the CPU reports none).")
    flags.DEFINE_string("topology", "", "A TPU topology to compile for, e.g. 'v4:2x2x1'.")
    flags.DEFINE_string("chip_config", "default", "'default' or 'megacore' (v4, v5p).")
    flags.DEFINE_integer("num_slices", 1, "--topology: slices of it (multi-slice).")
    flags.DEFINE_integer("per_device_batch", 0, "Examples per device; 0 keeps batch_size.")
    flags.DEFINE_list("remat", ["config"], "'config', 'off' or a remat policy, each compiled.")
    flags.DEFINE_integer("idle_steps", 20, "Steps between the syncs of the one-sync timing.")
    flags.DEFINE_integer("pairs", 2, "Alternated rounds per setting.")
    flags.DEFINE_list("candidates", list(XLA_FLAG_CANDIDATES), "XLA options (name=value).")
    flags.DEFINE_float("time_limit_s", 0.0, "idle, xla_flags: seconds from the start to finish "
                       "within; what would not fit is reported as skipped (0: no limit).")


def configure_threads(threads: int) -> None:
    """`threads` intra-op threads for XLA's CPU backend (0: all cores), before JAX starts."""
    now = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in ("--xla_cpu_multi_thread_eigen=true",
                         f"intra_op_parallelism_threads={threads or os.cpu_count()}")
             if f.lstrip("-").split("=")[0] not in now]
    os.environ["XLA_FLAGS"] = " ".join([now, *extra]).strip()


def parse_options(items: list[str]) -> dict[str, Any]:
    """['name=value', ...] → XLA options: booleans and integers typed, the rest as text."""
    options: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise app.UsageError(f"an XLA option is name=value, got {item!r}")
        if value.lower() in ("true", "false"):
            options[name.lstrip("-")] = value.lower() == "true"
        else:
            options[name.lstrip("-")] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return options


def synthetic_batch(config: ml_collections.ConfigDict, num_examples: int, mesh) -> dict:
    """A pretraining batch made on the devices, sharded as the trainer's: random uint8 views,
    crop boxes and flips (AMT aligns its bank maps with them), indices spread over the bank."""
    import jax
    import jax.numpy as jnp

    from mvmae_jax import sharding

    batch, views, size = config.batch_size, config.views.num, config.img_size

    def make(key):
        k_views, k_size, k_pos, k_flip = jax.random.split(key, 4)
        extent = jax.random.uniform(k_size, (batch, views, 2), minval=0.45, maxval=1.0)
        corner = jax.random.uniform(k_pos, (batch, views, 2)) * (1.0 - extent)
        pixels = jax.random.randint(k_views, (batch, views, size, size, 3), 0, 256)
        return {"views": pixels.astype(jnp.uint8),
                "boxes": jnp.concatenate([corner, extent], axis=-1),
                "flips": jax.random.bernoulli(k_flip, 0.5, (batch, views)).astype(jnp.int32),
                "index": (jnp.arange(batch, dtype=jnp.int32) * max(1, num_examples // batch))
                % num_examples}

    return jax.jit(make, out_shardings=sharding.batch_sharding(mesh))(jax.random.key(1))


class Run(NamedTuple):
    task: Any
    model: Any
    mesh: Any
    state: Any
    step: Any  # the jitted step, (state, batch) -> (state, metrics), state donated
    batch: dict
    optimizer: Any


def build(config: ml_collections.ConfigDict, phase: str, num_examples: int, abstract: bool,
          devices: list | None = None) -> Run:
    """The trainer's step of `phase` over `devices` (default: all), its state and a batch;
    `abstract`: shapes only (memory estimates, described devices). The one function here that
    calls `mvmae_jax.train_step`."""
    import jax

    from mvmae_jax import config_lib, optim, sharding, tasks
    from mvmae_jax import train_step as ts

    mesh = sharding.config_mesh(config.sharding, devices)
    config_lib.validate(config, mesh.size, jax.process_count())
    task = tasks.PretrainTask(config, mesh, types.SimpleNamespace(num_examples=num_examples))
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, 100, 100_000)
    optimizer = task.optimizer(schedule)

    def init():
        return ts.create_train_state(task, optimizer, mesh, config)

    state = jax.eval_shape(init) if abstract else init()
    step = ts.make_train_step(task, optimizer, schedule, mesh,
                              ts.state_shardings(state, mesh, config), phase)
    def make_batch():
        return synthetic_batch(config, num_examples, mesh)

    batch = jax.eval_shape(make_batch) if abstract else make_batch()
    return Run(task, task.model, mesh, state, step, batch, optimizer)


def compile_step(run: Run, options: dict[str, Any] | None = None):
    merged = {**parse_options(FLAGS.compiler_option), **(options or {})}
    return run.step.lower(run.state, run.batch).compile(compiler_options=merged or None)


def compiled_memory(compiled) -> dict[str, int] | None:
    """XLA's per-device buffers; estimated_peak = arguments + outputs - aliases + temporaries
    + code."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if stats is None:
        return None
    out = {f"{f}_size_in_bytes": int(getattr(stats, f"{f}_size_in_bytes"))
           for f in ("argument", "output", "alias", "temp", "generated_code")}
    out["estimated_peak_bytes"] = sum(out.values()) - 2 * out["alias_size_in_bytes"]
    return out


def cudnn_attention_calls(compiled) -> int:
    return compiled.as_text().count('custom_call_target="__cudnn$fmha')


def device_memory_bytes(device) -> float | None:
    """The allocator's limit, else the HBM of a described TPU chip's kind, else None."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - described devices have no statistics
        stats = None
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    gib = hardware.match_device_kind(TPU_MEMORY_GIB, device.device_kind)
    return gib * 2**30 if gib else None


def token_counts(config: ml_collections.ConfigDict, phase: str) -> dict[str, int]:
    from mvmae_jax import masking, models

    num_patches = (config.img_size // models.encoder_dims(config.model)["patch_size"]) ** 2
    masked, thrown, visible = masking.mask_counts(num_patches,
                                                  *bench_lib.phase_ratios(config, phase))
    return {"num_patches": num_patches, "masked": masked, "thrown": thrown, "visible": visible}


def analytic_flops(config: ml_collections.ConfigDict, phase: str) -> dict[str, int]:
    from mvmae_jax import models

    tokens = token_counts(config, phase)
    online = phase == bench_lib.AMT_PHASE and config.amt.source == "online"
    return bench_lib.analytic_train_flops(config, models.encoder_dims(config.model),
                                          tokens["masked"], tokens["thrown"], online_maps=online)


def run_settings(config: ml_collections.ConfigDict, phase: str) -> dict[str, Any]:
    return {"variant": config.model.variant, "batch": config.batch_size, "phase": phase,
            "tokens": token_counts(config, phase), "strategy": config.masking.strategy,
            "amt_source": config.amt.source, "dtype": config.model.dtype,
            "remat": config.model.remat, "attention": config.model.attention,
            "grad_accum_steps": config.grad_accum_steps, "sharding": config.sharding.strategy}


def timed_steps(compiled, state, batch, steps: int, sync_every_step: bool = True):
    """(state, last metrics, seconds per step): each step timed to its own sync, or all
    dispatched back to back and synced once (their mean)."""
    import jax

    seconds, begin = [], time.perf_counter()
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


def warm_up(compiled: dict, state, batch, steps: int):
    import jax

    for executable in compiled.values():
        for _ in range(steps):
            state, _ = executable(state, batch)
    return jax.block_until_ready(state)


# --- --mode=time


def measure(config: ml_collections.ConfigDict, phase: str, then=None) -> dict[str, Any]:
    """Compiles and times one run; then(result, run, compiled, state) after the timing."""
    import jax

    from mvmae_jax import models

    run = build(config, phase, FLAGS.num_examples, abstract=False)
    started = time.perf_counter()
    compiled = compile_step(run)
    compile_s = time.perf_counter() - started
    state = warm_up({"": compiled}, run.state, run.batch, FLAGS.warmup)
    host_before = bench_lib.host_usage()
    state, metrics, seconds = timed_steps(compiled, state, run.batch, FLAGS.steps)
    host = bench_lib.host_usage_per_step(host_before, FLAGS.steps)
    devices = jax.device_count()
    stats = [d.memory_stats() for d in jax.local_devices()]
    memory = ((max(int(s["peak_bytes_in_use"]) for s in stats), "device peak_bytes_in_use")
              if all(s and "peak_bytes_in_use" in s for s in stats) else bench_lib.max_rss())
    peak_flops = hardware.peak_flops(jax.devices()[0].device_kind)
    result = bench_lib.run_record(
        config, phase, models.encoder_dims(config.model), token_counts(config, phase), seconds,
        analytic_flops(config, phase), peak_flops, devices, memory,
        float(jax.device_get(metrics["loss"])))
    xla_step = utils.xla_flops(compiled)
    xla_step = None if xla_step is None else xla_step * devices  # per device, times devices
    result.update(run_settings(config, phase), **host, compile_s=compile_s,
                  flops_xla_per_step=xla_step,
                  flops_xla_per_image=None if xla_step is None else xla_step / config.batch_size,
                  mfu_xla=(None if peak_flops is None or xla_step is None
                           else xla_step / result["step_s"] / (peak_flops * devices)),
                  compiled_memory_per_device=compiled_memory(compiled),
                  cudnn_attention_calls=cudnn_attention_calls(compiled))
    if then is not None:
        then(result, run, compiled, state)
    return result


def compile_abstract_step(config: ml_collections.ConfigDict, phase: str,
                          devices: list | None = None, options: dict | None = None):
    """(compiled step, its `compiled_memory`, mesh), on abstract state and batch."""
    run = build(config, phase, FLAGS.num_examples, abstract=True, devices=devices)
    compiled = compile_step(run, options)
    memory = compiled_memory(compiled)
    if memory is None:
        raise RuntimeError("this backend gives no memory analysis; set --config.batch_size")
    return compiled, memory, run.mesh


def is_out_of_memory(error: Exception) -> bool:
    return any(s in str(error).lower() for s in ("resource_exhausted", "out of memory"))


def largest_batch(config: ml_collections.ConfigDict, phase: str, then=None):
    """(config, run, search) at the largest per-device batch whose compiled step (without
    autotuning) fits, the search starting from config.batch_size."""
    import jax

    devices = jax.device_count()
    limit = FLAGS.memory_limit_gib * 2**30 or device_memory_bytes(jax.local_devices()[0])
    if not limit:
        raise app.UsageError("--find_max_batch: this device reports no memory limit; give "
                             "--memory_limit_gib")

    def at(per_device: int) -> ml_collections.ConfigDict:
        return bench_lib.config_variant(config, batch_size=per_device * devices)

    def memory_at(per_device: int) -> float:
        try:
            return compile_abstract_step(at(per_device), phase, options=SEARCH_OPTIONS)[1][
                "estimated_peak_bytes"]
        except Exception as error:  # noqa: BLE001 - a compile out of memory does not fit
            if is_out_of_memory(error):
                return math.inf
            raise

    per_device, result, search = bench_lib.largest_batch(
        memory_at, lambda b: measure(at(b), phase, then), is_out_of_memory,
        max(bench_lib.BATCH_GRANULARITY, config.batch_size // devices), limit)
    search.update(compile_options=SEARCH_OPTIONS, per_device_batch=per_device)
    return at(per_device), result, search


def optimizer_update_time(run: Run, state, steps: int) -> dict[str, Any]:
    """The optimizer update and its application alone, on stand-in gradients."""
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
        params, opt_state = jax.block_until_ready(compiled(params, opt_state, grads))
        seconds.append(time.perf_counter() - begin)
    return {"compile_s": compile_s, "step_s": statistics.median(seconds[1:]),
            "parameters": sum(x.size for x in jax.tree.leaves(state.params))}


def time_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    experiments = [name for name in bench_lib.EXPERIMENT_RUNS if getattr(FLAGS, name)]
    then, done = None, None
    if FLAGS.profile_steps or FLAGS.optimizer_steps:
        def then(result, run, compiled, state):  # each part written as it ends
            progress({"runs": {bench_lib.MAIN: result}})
            if FLAGS.profile_steps:
                state, result["profile"] = profile_compiled(compiled, state, run.batch,
                                                            FLAGS.profile_steps)
                progress({"runs": {bench_lib.MAIN: result}})
            if FLAGS.optimizer_steps:
                result["optimizer_update"] = optimizer_update_time(run, state,
                                                                   FLAGS.optimizer_steps)
                progress({"runs": {bench_lib.MAIN: result}})

        if not FLAGS.find_max_batch:
            done = {bench_lib.MAIN: measure(config, phase, then)}
    return bench_lib.measure_experiments(
        config, phase, experiments, measure, lambda c, p: (c.to_json(), p),
        (lambda c: largest_batch(c, phase, then)) if FLAGS.find_max_batch else None, done)


# --- --mode=memory


def topology_devices(topology: str, chip_config: str, num_slices: int = 1) -> list:
    """The devices of `num_slices` slices of a TPU topology 'v4:2x2x1', described by libtpu
    for ahead-of-time compilation; hosts of at most 2x2x1 chips, as TPU VMs have."""
    from jax.experimental import topologies

    chips = tuple(int(n) for n in topology.partition(":")[2].split("x"))
    per_host = (tuple(min(n, 2) for n in chips[:2]) + (1,) * 3)[:3]
    return list(topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name=chip_config,
        chips_per_host_bounds=per_host, num_slices=num_slices).devices)


def array_bytes(type_text: str) -> list[int]:
    """The size of each array in an HLO type ("(bf16[8,4]{1,0}, u32[])")."""
    return [_DTYPE_BYTES[t] * math.prod(int(n) for n in dims.split(",") if n)
            for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_text)
            if t in _DTYPE_BYTES]


def collectives(hlo_text: str) -> list[dict[str, Any]]:
    """The collectives of a compiled module: kind, bytes per device, whether they cross
    slices. XLA's collectives stay within a slice; what crosses is a send to the multi-slice
    runtime, named by its transfer type. Bytes: an all-reduce's (all-to-all's) results summed,
    else the largest array of the result. Each instruction counts once, also in a loop."""
    found = []
    for line in hlo_text.splitlines():
        local = re.search(rf"= (.+?) ({'|'.join(COLLECTIVES)})(?:-start)?\(", line)
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
    """{"kind, within/across slices": {count, mib}}."""
    totals: dict[str, dict[str, float]] = {}
    for item in found:
        key = f"{item['kind']}, {'across' if item['crosses_slices'] else 'within'} slices"
        entry = totals.setdefault(key, {"count": 0, "mib": 0.0})
        entry["count"] += 1
        entry["mib"] += item["bytes"] / 2**20
    return totals


def with_remat(config: ml_collections.ConfigDict, setting: str) -> ml_collections.ConfigDict:
    if setting == "config":
        return bench_lib.config_variant(config)
    if setting == "off":
        return bench_lib.config_variant(config, model__remat=False)
    return bench_lib.config_variant(config, model__remat=True, model__remat_policy=setting)


def memory_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    import jax

    if FLAGS.topology and FLAGS.dtype == "auto":
        config.model.dtype = "bfloat16"  # 'auto' read this machine's backend, not the TPU's
    devices = (topology_devices(FLAGS.topology, FLAGS.chip_config, FLAGS.num_slices)
               if FLAGS.topology else None)
    device_list = devices or jax.devices()
    if FLAGS.per_device_batch:
        config.batch_size = FLAGS.per_device_batch * len(device_list)
    memory_gib = (device_memory_bytes(device_list[0]) or 0) / 2**30 or None
    runs = []
    for setting in FLAGS.remat:
        run_config = with_remat(config, setting)
        started = time.perf_counter()
        compiled, memory, mesh = compile_abstract_step(run_config, phase, devices)
        per_device = config.batch_size // mesh.size
        flops = utils.xla_flops(compiled)
        found = collectives(compiled.as_text())
        run = {"setting": setting, "remat": run_config.model.remat,
               "remat_policy": run_config.model.remat_policy if run_config.model.remat else None,
               "per_device_batch": per_device, "compile_s": time.perf_counter() - started,
               **{k.replace("_in_bytes", "_gib").replace("_bytes", "_gib"): v / 2**30
                  for k, v in memory.items()},
               "xla_gflop_per_example": flops / per_device / 1e9 if flops else None,
               "mesh": dict(mesh.shape),
               "mesh_slices": [[getattr(d, "slice_index", 0) for d in row]
                               for row in mesh.devices],
               "collectives": collective_totals(found),
               "across_slices": sorted((c for c in found if c["crosses_slices"]),
                                       key=lambda c: -c["bytes"])}
        run["fits"] = (run["estimated_peak_gib"] <= memory_gib) if memory_gib else None
        print(f"[step_time] {setting}: {run['estimated_peak_gib']:.2f} GiB per device",
              file=sys.stderr, flush=True)
        runs.append(run)
    return {"model": config.model.variant or f"width {config.model.width}",
            "global_batch": config.batch_size, "devices": len(device_list),
            "platform": device_list[0].platform, "device_kind": device_list[0].device_kind,
            "topology": FLAGS.topology or None, "chip_config": FLAGS.chip_config,
            "num_slices": FLAGS.num_slices, "device_memory_gib": memory_gib, "runs": runs}


# --- --mode=profile


def durations_by_op(events: list[dict]) -> collections.Counter:
    """Microseconds per XLA operation in a perfetto trace: on an accelerator the kernels on
    the /device: streams, by their `hlo_op` (else the kernel name); on the CPU every host
    event that is not runtime bookkeeping."""
    device_pids = {e["pid"] for e in events
                   if e.get("ph") == "M" and e.get("name") == "process_name"
                   and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    spans = [e for e in events if e.get("ph") == "X"]
    on_device = [e for e in spans if e.get("pid") in device_pids]
    totals = collections.Counter()
    for e in on_device or [e for e in spans if not e["name"].startswith(_NOT_OPS)]:
        name = ((e.get("args") or {}).get("hlo_op") if on_device else None) or e["name"]
        totals[name] += e.get("dur", 0)
    return totals


def profile_compiled(compiled, state, batch, steps: int, top: int = 40):
    """(state, summary): a trace of `steps` steps, milliseconds per step by XLA operation
    (with its HLO line) and by kind (the name without its number)."""
    import jax

    trace_dir = tempfile.mkdtemp(prefix="mvmae_profile_")
    try:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        started = time.perf_counter()
        for _ in range(steps):
            state = jax.block_until_ready(compiled(state, batch)[0])
        traced_s = time.perf_counter() - started
        jax.profiler.stop_trace()
        paths = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        if not paths:
            raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
        with gzip.open(paths[0]) as f:
            totals = durations_by_op(json.load(f)["traceEvents"])
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    lines = {m.group(1): line.strip() for line in compiled.as_text().splitlines()
             if (m := re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line))}
    by_kind = collections.Counter()
    for name, micros in totals.items():
        by_kind[re.sub(r"\.\d+$", "", name)] += micros
    ops_ms = round(sum(totals.values()) / steps / 1e3, 3)
    return state, {
        "steps_traced": steps, "step_s_while_tracing": traced_s / steps,
        "ops_ms_per_step": ops_ms,
        # On an accelerator: the part of the step in which the device's streams ran no kernel.
        "step_ms_not_in_ops": round(traced_s / steps * 1e3 - ops_ms, 3),
        "by_kind_ms_per_step": {k: round(v / steps / 1e3, 3) for k, v in by_kind.most_common()},
        "top_ops": [{"name": name, "ms_per_step": round(micros / steps / 1e3, 3),
                     "hlo": lines.get(name, "")[:400]} for name, micros in totals.most_common(top)]}


def profile_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    run = build(config, phase, FLAGS.num_examples, abstract=False)
    compiled = compile_step(run)
    state = warm_up({"": compiled}, run.state, run.batch, FLAGS.warmup)
    return {"settings": run_settings(config, phase),
            **profile_compiled(compiled, state, run.batch, FLAGS.steps)[1]}


# --- --mode=attention and --mode=versions


def attention_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    """Each implementation at each of ATTENTION_SHAPES (--tiny: 4 rows), forward and backward
    in the config's dtype; the fused path passes when its largest gradient difference to
    einsum's, over einsum's largest gradient, is under ATTENTION_GRAD_TOLERANCE."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mvmae_jax.models import vit

    dtype = jnp.dtype(config.model.dtype)
    shapes = {}
    for name, rows, tokens, heads, head_dim in ATTENTION_SHAPES:
        x = jax.random.normal(jax.random.key(0), (4 if FLAGS.tiny else rows, tokens,
                                                  heads * head_dim), dtype)
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
                compile_s, seconds = time.perf_counter() - started, []
                for _ in range(FLAGS.steps + 1):
                    begin = time.perf_counter()
                    grads[implementation] = jax.block_until_ready(fn(params, x))
                    seconds.append(time.perf_counter() - begin)
                runs[implementation] = {"ok": True, "ms": statistics.median(seconds[1:]) * 1e3,
                                        "compile_s": compile_s,
                                        "cudnn_calls": cudnn_attention_calls(fn)}
            except Exception as error:  # noqa: BLE001 - a refused shape is the finding
                runs[implementation] = {"ok": False, "error": bench_lib.last_line(error)}
        if runs["einsum"]["ok"] and runs["fused"]["ok"]:
            as_np = [[np.asarray(g, np.float32) for g in jax.tree.leaves(grads[i])]
                     for i in ("einsum", "fused")]
            scale = max(float(np.abs(g).max()) for g in as_np[0])
            difference = max(float(np.abs(a - b).max()) for a, b in zip(*as_np, strict=True))
            runs["fused"]["max_grad_difference"] = difference / scale
            runs["fused"]["ok"] = difference / scale < ATTENTION_GRAD_TOLERANCE
            runs["fused_over_einsum"] = runs["fused"]["ms"] / runs["einsum"]["ms"]
        shapes[name] = {"rows": x.shape[0], "tokens": tokens, "heads": heads,
                        "head_dim": head_dim, **runs}
        progress({"shapes": shapes})
    return {"shapes": shapes, "dtype": str(dtype),
            "fused_passed": all(r["fused"]["ok"] for r in shapes.values()),
            "fused_backend": vit.fused_attention_backend(dtype)}


def versions_mode(config, phase, progress) -> dict[str, Any]:
    return {}  # every JSON carries the versions and devices


# --- --mode=idle and --mode=xla_flags: settings of one step, alternated in one process


def seconds_left() -> float:
    if not FLAGS.time_limit_s:
        return math.inf
    return FLAGS.time_limit_s - (time.monotonic() - STARTED)


def alternate(config, phase: str, settings: dict[str, dict], sync_once_steps: int = 0,
              against_default: bool = False):
    """Compiles the step with each setting's XLA options (a refused option, or no time left
    for a compile, is reported in `errors`), then per round (--pairs, within --time_limit_s)
    times each setting, after the "default" each time with `against_default`: [(name, median
    of --steps synced steps, mean of `sync_once_steps` dispatched back to back)]."""
    run = build(config, phase, FLAGS.num_examples, abstract=False)
    compiled, errors, longest = {}, {}, 0.0
    for name, options in settings.items():
        if compiled and seconds_left() < 2 * longest:
            errors[name] = f"skipped: {seconds_left():.0f} s left, a compile took {longest:.0f} s"
            continue
        started = time.perf_counter()
        try:
            compiled[name] = compile_step(run, options)
        except Exception as error:  # noqa: BLE001 - a flag this XLA rejects is a finding
            errors[name] = bench_lib.last_line(error)
        longest = max(longest, time.perf_counter() - started)
        print(f"[step_time] {name}: {errors.get(name, 'compiled')}", file=sys.stderr, flush=True)
    state = warm_up(compiled, run.state, run.batch, max(FLAGS.warmup, 1))
    order = ([n for name in compiled if name != "default" for n in ("default", name)]
             if against_default else list(compiled))
    timings, round_s = [], 0.0
    for _ in range(FLAGS.pairs):  # alternated: the machine's drift falls on every setting
        if seconds_left() <= 1.2 * round_s:
            break
        started = time.perf_counter()
        for name in order:
            state, _, each = timed_steps(compiled[name], state, run.batch, FLAGS.steps)
            once = [None]
            if sync_once_steps:
                state, _, once = timed_steps(compiled[name], state, run.batch, sync_once_steps,
                                             sync_every_step=False)
            timings.append((name, statistics.median(each), once[0]))
        round_s = time.perf_counter() - started
    return compiled, errors, timings


def idle_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    """host_gap_ms_per_step: a step timed to its own sync minus the mean of --idle_steps
    dispatched back to back, with command buffers as they are and off."""
    settings = {"command_buffers_default": {}, "command_buffers_off": COMMAND_BUFFERS_OFF}
    compiled, errors, timings = alternate(config, phase, settings, FLAGS.idle_steps)
    if not compiled:
        raise RuntimeError(f"no setting compiled: {errors}")
    results = {}
    for name in compiled:
        each = [t[1] for t in timings if t[0] == name]
        once = [t[2] for t in timings if t[0] == name]
        results[name] = {"step_s_sync_each": statistics.median(each),
                         "step_s_sync_once": statistics.median(once),
                         "host_gap_ms_per_step": (statistics.median(each)
                                                  - statistics.median(once)) * 1e3,
                         "img_per_s_sync_once": config.batch_size / statistics.median(once),
                         "sync_each": each, "sync_once": once}
    out = {"settings": run_settings(config, phase), "steps_per_sync_once": FLAGS.idle_steps,
           "pairs": FLAGS.pairs, "results": results, "compile_errors": errors}
    if len(results) == 2:
        out["command_buffers_off_over_default"] = (
            results["command_buffers_off"]["step_s_sync_once"]
            / results["command_buffers_default"]["step_s_sync_once"])
    return out


def flag_verdict(ratios: list[float], margin: float = WIN_MARGIN, min_pairs: int = 2) -> str:
    """'winner' (loser) when the flag's step took less (more) than the default's by `margin`
    in every pair; else 'no clear difference'."""
    if len(ratios) < min_pairs:
        return "too few pairs"
    if all(r < 1 - margin for r in ratios):
        return "winner"
    if all(r > 1 + margin for r in ratios):
        return "loser"
    return "no clear difference"


def xla_flags_mode(config: ml_collections.ConfigDict, phase: str, progress) -> dict[str, Any]:
    """Per flag its step time over the default's in each A/B pair (the default, then the
    flag). The default includes mvmae_jax.xla_flags.GPU_DEFAULTS on a GPU."""
    settings = {"default": {}, **{item: parse_options([item]) for item in FLAGS.candidates}}
    compiled, errors, timings = alternate(config, phase, settings, against_default=True)
    if "default" not in compiled:
        raise RuntimeError(f"the default step did not compile: {errors['default']}")
    out = {name: {"step_s_ratios": [], "step_s_medians": []} for name in compiled}
    for (_, default_s, _), (name, step_s, _) in zip(timings, timings[1:], strict=False):
        if name != "default":
            out[name]["step_s_ratios"].append(step_s / default_s)
            out[name]["step_s_medians"].append(step_s)
    default_s = [t[1] for t in timings if t[0] == "default"]
    del out["default"]
    for result in out.values():
        result.update(step_s_ratio_median=statistics.median(result["step_s_ratios"]),
                      verdict=flag_verdict(result["step_s_ratios"]))
    out.update({name: {"verdict": "skipped" if why.startswith("skipped") else "error",
                       "error": why} for name, why in errors.items()})
    return {"settings": run_settings(config, phase), "pairs": FLAGS.pairs,
            "steps_per_timing": FLAGS.steps, "default_step_s": default_s, "flags": out,
            "winners": [n for n, f in out.items() if f["verdict"] == "winner"]}


# ---


def environment() -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import optax

    prefixes = ("nvidia-cudnn", "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-nccl",
                "jax-cuda", "jax_cuda", "libtpu")
    accelerator = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                   if (d.metadata["Name"] or "").lower().startswith(prefixes)}
    return {"framework": "jax", "mode": FLAGS.mode,
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                         "flax": flax.__version__, "optax": optax.__version__, **accelerator},
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "process_count": jax.process_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compiler_options": parse_options(FLAGS.compiler_option),
            "cpu_threads": FLAGS.threads, "machine": bench_lib.machine_info(),
            **{k.lower(): os.environ.get(k, "") for k in (
                "JAX_DISABLE_MOST_OPTIMIZATIONS", "XLA_PYTHON_CLIENT_MEM_FRACTION")}}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mvmae_jax import xla_flags

    xla_flags.apply_gpu_defaults()
    configure_threads(FLAGS.threads)
    if FLAGS.find_max_batch:  # JAX's allocator takes 75% of GPU memory by default
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS"):
        print("[bench] warning: JAX_DISABLE_MOST_OPTIMIZATIONS is set: not an optimised step",
              file=sys.stderr)
    import jax

    config = FLAGS.config
    if FLAGS.tiny:
        bench_lib.apply_tiny(config)
    if FLAGS.dtype == "auto":
        config.model.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    elif FLAGS.dtype:
        config.model.dtype = FLAGS.dtype
    phase = FLAGS.phase or bench_lib.default_phase(config)
    header = {**environment(), "config": str(config_flags.get_config_filename(FLAGS["config"])),
              "tiny": FLAGS.tiny, "phase": phase, "dtype": config.model.dtype,
              "steps": FLAGS.steps, "warmup_steps": FLAGS.warmup,
              "num_examples": FLAGS.num_examples}

    def progress(partial: dict[str, Any]) -> None:
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump({**header, **partial, "partial": True}, f, indent=2)

    mode = globals()[f"{FLAGS.mode}_mode"]
    bench_lib.write_json({**header, **mode(config, phase, progress)}, FLAGS.json)


if __name__ == "__main__":
    define_flags()
    app.run(main)
