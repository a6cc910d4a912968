"""The trainer's pretraining step on a synthetic batch, compiled ahead of time and measured; one
JSON per run, with the versions and devices. Modes (docs/benchmarks.md): time (with
--profile_steps: then a trace), attention, memory (also for a TPU topology without a TPU),
xla_flags.
Smoke test: step_time.py --tiny --steps=2
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
import statistics
import sys
import tempfile
import time
import types
from typing import Any

import bench_lib
import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from jax.experimental import topologies
from jax.flatten_util import ravel_pytree

from mvmae_jax import hardware, optim, sharding, tasks, utils, xla_flags
from mvmae_jax import train_step as ts
from mvmae_jax.models import vit

FLAGS = flags.FLAGS

MODES = ("time", "memory", "xla_flags", "attention")
XLA_FLAG_CANDIDATES = ("xla_gpu_enable_cublaslt=true", "xla_gpu_enable_cudnn_layer_norm=true",
                       "xla_gpu_enable_triton_gemm=false", "xla_gpu_cudnn_gemm_fusion_level=2",
                       "xla_gpu_enable_command_buffer=")  # the last: CUDA graphs off
# (name, rows, tokens, heads, head dim) at ViT-B/16, 224, batch 256: MAE (mask 0.75) and AMT
# (mask 0.45 / throw 0.40, two views), encoder and decoder.
ATTENTION_SHAPES = (("mae_encoder", 256, 50, 12, 64), ("mae_decoder", 256, 197, 16, 32),
                    ("amt_encoder", 512, 31, 12, 64), ("amt_decoder", 512, 119, 16, 32))
ATTENTION_GRAD_TOLERANCE = 0.05  # relative to the largest einsum gradient (bf16: 8 bits)
SEARCH_OPTIONS = {"xla_gpu_autotune_level": 0}  # seconds per compile of the max-batch search
WIN_MARGIN = 0.02  # a flag wins when faster than the default by this in every pair
# HBM per TPU chip (GiB), the specific kinds first: described TPU devices report no memory.
TPU_MEMORY_GIB = (("tpu v4", 32.0), ("tpu v5 lite", 16.0), ("tpu v5e", 16.0), ("tpu v5p", 95.0),
                  ("tpu v5", 95.0), ("tpu v6 lite", 32.0))
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
CUDNN_ATTENTION = 'custom_call_target="__cudnn$fmha'  # in the compiled HLO text
_NOT_OPS = ("$", "Thunk", "Slinky", "end:", "PjitFunction", "CommonPjRt", "PjRt")  # bookkeeping


def define_flags() -> None:
    bench_lib.define_flags()
    flags.DEFINE_enum("mode", "time", MODES, "What to measure (see the module docstring).")
    flags.DEFINE_integer("num_examples", 1_281_167, "Rows of the AMT bank (ImageNet-1K's).")
    flags.DEFINE_bool("amt_overhead", False, "Also AMT masking against random masking.")
    flags.DEFINE_integer("profile_steps", 0, "Then trace this many steps of the main run.")
    flags.DEFINE_integer("optimizer_steps", 0, "Then time this many optimizer updates alone.")
    flags.DEFINE_float("memory_limit_gib", 0.0, "--find_max_batch: 0: the allocator's limit.")
    flags.DEFINE_string("topology", "", "A TPU topology to compile for, e.g. 'v4:2x2x1'.")
    flags.DEFINE_string("chip_config", "default", "'default' or 'megacore' (v4, v5p).")
    flags.DEFINE_integer("num_slices", 1, "--topology: slices of it.")
    flags.DEFINE_integer("per_device_batch", 0, "Examples per device; 0 keeps batch_size.")
    flags.DEFINE_list("remat", ["config"], "'config', 'off' or a remat policy, each compiled.")
    flags.DEFINE_integer("idle_steps", 0, "Then time this many steps synced once: host_gap_ms.")
    flags.DEFINE_integer("pairs", 2, "Alternated rounds per setting.")
    flags.DEFINE_list("candidates", list(XLA_FLAG_CANDIDATES), "XLA options (name=value).")


def parse_options(items: list[str]) -> dict[str, Any]:
    """['name=value', ...] → XLA options: booleans typed, XLA parses the other values."""
    options: dict[str, Any] = {}
    for name, sep, value in (item.partition("=") for item in items):
        if not sep or not name:
            raise app.UsageError(f"an XLA option is name=value, got {name + sep + value!r}")
        options[name.lstrip("-")] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def synthetic_batch(config, num_examples: int, mesh) -> dict:
    """Random uint8 views, whole-image boxes, no flips and bank indices spread over the bank,
    sharded as the trainer's batches (the step's cost does not depend on the values)."""
    batch, views, size = config.batch_size, config.views.num, config.img_size

    def make(key):
        pixels = jax.random.randint(key, (batch, views, size, size, 3), 0, 256)
        return {"views": pixels.astype(jnp.uint8),
                "boxes": jnp.tile(jnp.array([0.0, 0.0, 1.0, 1.0]), (batch, views, 1)),
                "flips": jnp.zeros((batch, views), jnp.int32),
                "index": (jnp.arange(batch, dtype=jnp.int32) * max(1, num_examples // batch))
                % num_examples}

    return jax.jit(make, out_shardings=sharding.batch_sharding(mesh))(jax.random.key(1))


def build(config, phase: str, num_examples: int, abstract: bool, devices=None):
    """The trainer's step over `devices` (default: all), its state and a batch (or shapes)."""
    mesh = sharding.config_mesh(config.sharding, devices)
    task = tasks.PretrainTask(config, mesh, types.SimpleNamespace(num_examples=num_examples))
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, 100, 100_000)
    optimizer = task.optimizer(schedule)
    made = [lambda: ts.create_train_state(task, optimizer, mesh, config),
            lambda: synthetic_batch(config, num_examples, mesh)]
    state, batch = (jax.eval_shape(f) if abstract else f() for f in made)
    step = ts.make_train_step(task, optimizer, schedule, mesh,
                              ts.state_shardings(state, mesh, config), phase)
    return types.SimpleNamespace(task=task, model=task.model, mesh=mesh, state=state, step=step,
                                 batch=batch, optimizer=optimizer)


def compile_timed(fn, *args, options: dict[str, Any] | None = None):
    """(jitted `fn` compiled for `args` with XLA `options`, the seconds that took)."""
    started = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options=options or None)
    return compiled, time.perf_counter() - started


def device_memory_bytes(device) -> float | None:
    """The allocator's limit, else the HBM of a described TPU chip's kind."""
    try:
        return float(device.memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001 - described devices have no statistics, the CPU no limit
        gib = hardware.match_device_kind(TPU_MEMORY_GIB, device.device_kind)
        return gib * 2**30 if gib else None


def run_settings(config, phase: str) -> dict[str, Any]:
    return {"variant": config.model.variant, "batch": config.batch_size, "phase": phase,
            "tokens": bench_lib.token_counts(config, phase), "strategy": config.masking.strategy,
            "amt_source": config.amt.source, "dtype": config.model.dtype,
            "remat": config.model.remat, "attention": config.model.attention,
            "grad_accum_steps": config.grad_accum_steps, "sharding": config.sharding.strategy}


def timed_steps(compiled, state, batch, syncs: int, steps_per_sync: int = 1):
    """(state, metrics, seconds per step of each sync of `steps_per_sync` steps)."""
    seconds, metrics = [], None
    for _ in range(syncs):
        begin = time.perf_counter()
        for _ in range(steps_per_sync):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        seconds.append((time.perf_counter() - begin) / steps_per_sync)
    return state, metrics, seconds


def measure(config, phase: str, then=None) -> dict[str, Any]:
    """Compiles and times one run; then(result, run, compiled, state) after the timing."""
    run = build(config, phase, FLAGS.num_examples, abstract=False)
    compiled, compile_s = compile_timed(run.step, run.state, run.batch)
    state, metrics, seconds = timed_steps(compiled, run.state, run.batch,
                                          FLAGS.warmup + FLAGS.steps)
    devices, stats = jax.device_count(), [d.memory_stats() for d in jax.local_devices()]
    memory = ((max(int(s["peak_bytes_in_use"]) for s in stats), "device peak_bytes_in_use")
              if all(s and "peak_bytes_in_use" in s for s in stats) else bench_lib.max_rss())
    peak = hardware.peak_flops(jax.devices()[0].device_kind)
    result = bench_lib.run_record(
        config, phase, seconds[FLAGS.warmup:], peak, devices, memory, float(metrics["loss"]),
        online_maps=bench_lib.computes_online_maps(config, phase))
    xla = utils.xla_flops(compiled)  # one device's program
    result.update(run_settings(config, phase), compile_s=compile_s,
                  flops_xla_per_image=None if xla is None else xla * devices / config.batch_size,
                  mfu_xla=None if None in (peak, xla) else xla / result["step_s"] / peak,
                  cudnn_attention_calls=compiled.as_text().count(CUDNN_ATTENTION))
    if then is not None:
        then(result, run, compiled, state)
    return result


def compile_abstract(config, phase: str, devices=None, options=None):
    """(compiled step, XLA's per-device buffer bytes and their estimated peak, mesh), abstractly."""
    run = build(config, phase, FLAGS.num_examples, abstract=True, devices=devices)
    compiled = compile_timed(run.step, run.state, run.batch, options=options)[0]
    if (stats := compiled.memory_analysis()) is None:
        raise RuntimeError("this backend gives no memory analysis; set --config.batch_size")
    memory = {f"{f}_size": int(getattr(stats, f"{f}_size_in_bytes"))
              for f in ("argument", "output", "alias", "temp", "generated_code")}
    memory["estimated_peak"] = sum(memory.values()) - 2 * memory["alias_size"]
    return compiled, memory, run.mesh


def optimizer_update_time(run, state, steps: int) -> dict[str, Any]:
    """The optimizer update and its application alone, on stand-in gradients."""
    def update(params_and_opt_state, grads):
        params, opt_state = params_and_opt_state
        updates, opt_state = run.optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    carry = jax.tree.map(lambda x: x.copy(), (state.params, state.opt_state))
    grads = jax.tree.map(lambda x: x * 1e-3, state.params)
    compiled, compile_s = compile_timed(jax.jit(update, donate_argnums=0), carry, grads)
    seconds = timed_steps(compiled, carry, grads, steps + 1)[2][1:]  # the first untimed
    return {"compile_s": compile_s, "step_s": statistics.median(seconds),
            "parameters": sum(x.size for x in jax.tree.leaves(state.params))}


def time_mode(config, phase: str, progress) -> dict[str, Any]:
    def then(result, run, step, state):  # the JSON is written after each part
        progress({"runs": {bench_lib.MAIN: result}})
        if FLAGS.idle_steps:  # how long the device waits for the host when every step syncs
            state, _, once = timed_steps(step, state, run.batch, 1, FLAGS.idle_steps)
            result["host_gap_ms"] = 1e3 * (result["step_s"] - once[0])
        if FLAGS.profile_steps:
            state, result["profile"] = profile_compiled(step, state, run.batch, FLAGS.profile_steps)
            progress({"runs": {bench_lib.MAIN: result}})
        if FLAGS.optimizer_steps:
            result["optimizer_update"] = optimizer_update_time(run, state, FLAGS.optimizer_steps)
            progress({"runs": {bench_lib.MAIN: result}})

    def main(config):  # --find_max_batch: at the largest batch whose untuned step fits
        if not FLAGS.find_max_batch:
            return config, measure(config, phase, then), None
        limit = FLAGS.memory_limit_gib * 2**30 or device_memory_bytes(jax.local_devices()[0])
        if not limit:
            raise app.UsageError("--find_max_batch: no memory limit known; give --memory_limit_gib")
        config, result, search = bench_lib.largest_batch(
            config, lambda c: compile_abstract(c, phase, options=SEARCH_OPTIONS)[1][
                "estimated_peak"], lambda c: measure(c, phase, then),
            lambda e: "resource_exhausted" in str(e).lower() or "out of memory" in str(e).lower(),
            limit, jax.device_count())
        return config, result, dict(search, compile_options=SEARCH_OPTIONS)

    experiments = [name for name in bench_lib.EXPERIMENTS if FLAGS[name].value]
    return bench_lib.measure_experiments(config, phase, experiments, measure, main)


def array_bytes(type_text: str) -> list[int]:
    """The size of each array in an HLO type ("(bf16[8,4]{1,0}, u32[], pred[2])")."""
    return [int(bits or 8) // 8 * math.prod(int(n) for n in dims.split(",") if n)
            for bits, dims in re.findall(r"\b(?:pred|[a-z]+(\d+))\[([\d,]*)\]", type_text)]


def collectives(hlo_text: str) -> list[dict[str, Any]]:
    """The HLO's collectives: kind, bytes per device (all-reduce, all-to-all: results summed,
    else the largest) and whether they cross slices (a send to the multi-slice runtime)."""
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
    totals = collections.defaultdict(collections.Counter)
    for item in found:
        where = "across" if item["crosses_slices"] else "within"
        totals[f"{item['kind']}, {where} slices"].update(count=1, mib=item["bytes"] / 2**20)
    return {key: dict(counts) for key, counts in totals.items()}


def with_remat(config, setting: str):
    return bench_lib.config_variant(config, {"config": {}, "off": {"model.remat": False}}.get(
        setting, {"model.remat": True, "model.remat_policy": setting}))


def memory_mode(config, phase: str, progress) -> dict[str, Any]:
    device_list = jax.devices()
    if FLAGS.topology:  # described by libtpu; hosts of at most 2x2x1 chips, as TPU VMs have
        if FLAGS.dtype == "auto":
            config.model.dtype = "bfloat16"  # 'auto' read this machine's backend, not the TPU's
        x, y = (int(n) for n in FLAGS.topology.partition(":")[2].split("x")[:2])
        device_list = list(topologies.get_topology_desc(
            platform="tpu", topology_name=FLAGS.topology, chip_config_name=FLAGS.chip_config,
            chips_per_host_bounds=(min(x, 2), min(y, 2), 1), num_slices=FLAGS.num_slices).devices)
    if FLAGS.per_device_batch:
        config.batch_size = FLAGS.per_device_batch * len(device_list)
    memory_gib = (device_memory_bytes(device_list[0]) or 0) / 2**30 or None
    runs = []
    for setting in FLAGS.remat:
        run_config, started = with_remat(config, setting), time.perf_counter()
        compiled, memory, mesh = compile_abstract(run_config, phase, device_list)
        per_device, flops = config.batch_size // mesh.size, utils.xla_flops(compiled)
        gib = {f"{k}_gib": v / 2**30 for k, v in memory.items()}
        found = collectives(compiled.as_text())
        runs.append({
            "setting": setting, "remat": run_config.model.remat,
            "remat_policy": run_config.model.remat_policy if run_config.model.remat else None,
            "per_device_batch": per_device, "compile_s": time.perf_counter() - started, **gib,
            "fits": gib["estimated_peak_gib"] <= memory_gib if memory_gib else None,
            "xla_gflop_per_example": flops / per_device / 1e9 if flops else None,
            "mesh": dict(mesh.shape), "collectives": collective_totals(found),
            "mesh_slices": [[getattr(d, "slice_index", 0) for d in row] for row in mesh.devices],
            "across_slices": sorted((c for c in found if c["crosses_slices"]),
                                    key=lambda c: -c["bytes"])})
        print(f"[step_time] {setting}: {gib['estimated_peak_gib']:.2f} GiB per device",
              file=sys.stderr, flush=True)
    return {"model": config.model.variant or f"width {config.model.width}",
            "global_batch": config.batch_size, "devices": len(device_list),
            "platform": device_list[0].platform, "device_kind": device_list[0].device_kind,
            "topology": FLAGS.topology or None, "chip_config": FLAGS.chip_config,
            "num_slices": FLAGS.num_slices, "device_memory_gib": memory_gib, "runs": runs}


def durations_by_op(events: list[dict]) -> collections.Counter:
    """Microseconds per XLA operation of a perfetto trace: on an accelerator the kernels on
    the /device: streams by `hlo_op` (else kernel name); on the CPU the host's operations."""
    device_pids = {e["pid"] for e in events if e.get("name") == "process_name"  # metadata
                   and e["args"]["name"].startswith("/device:")}
    spans = [e for e in events if e.get("ph") == "X"]
    on_device = [e for e in spans if e.get("pid") in device_pids]
    totals = collections.Counter()
    for e in on_device or [e for e in spans if not e["name"].startswith(_NOT_OPS)]:
        name = ((e.get("args") or {}).get("hlo_op") if on_device else None) or e["name"]
        totals[name] += e.get("dur", 0)
    return totals


def profile_compiled(compiled, state, batch, steps: int, top: int = 40):
    """(state, summary): ms per step by XLA operation (with its HLO line) and by kind."""
    with tempfile.TemporaryDirectory(prefix="mvmae_profile_", ignore_cleanup_errors=True) as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            state, _, seconds = timed_steps(compiled, state, batch, steps)
        with gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]) as f:
            totals = durations_by_op(json.load(f)["traceEvents"])
    lines = {m.group(1): line.strip() for line in compiled.as_text().splitlines()
             if (m := re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line))}
    by_kind = collections.Counter()
    for name, micros in totals.items():
        by_kind[re.sub(r"\.\d+$", "", name)] += micros
    ops_ms, step_s = round(sum(totals.values()) / steps / 1e3, 3), statistics.mean(seconds)
    return state, {
        "steps_traced": steps, "step_s_while_tracing": step_s, "ops_ms_per_step": ops_ms,
        "step_ms_not_in_ops": round(step_s * 1e3 - ops_ms, 3),  # GPU idle
        "by_kind_ms_per_step": {k: round(v / steps / 1e3, 3) for k, v in by_kind.most_common()},
        "top_ops": [{"name": name, "ms_per_step": round(micros / steps / 1e3, 3),
                     "hlo": lines.get(name, "")[:400]} for name, micros in totals.most_common(top)]}


def attention_mode(config, phase: str, progress) -> dict[str, Any]:
    """Each implementation at ATTENTION_SHAPES (--tiny: 4 rows), forward and backward; fused
    passes when its largest gradient difference to einsum's is under the tolerance."""
    dtype, shapes = jnp.dtype(config.model.dtype), {}
    for name, rows, tokens, heads, head_dim in ATTENTION_SHAPES:
        x = jax.random.normal(jax.random.key(0), (4 if FLAGS.tiny else rows, tokens,
                                                  heads * head_dim), dtype)
        cotangent = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
        runs, grads = {}, {}
        for impl in ("einsum", "fused"):
            layer = vit.MultiHeadDotProductAttention(heads, dtype=dtype, implementation=impl)

            def loss(params, x, layer=layer, cotangent=cotangent):
                return jnp.sum(layer.apply(params, x)[0].astype(jnp.float32) * cotangent)

            try:
                params = jax.jit(layer.init)(jax.random.key(2), x)
                fn, compile_s = compile_timed(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x)
                _, grads[impl], seconds = timed_steps(  # params as the state, grads as metrics
                    lambda p, x, fn=fn: (p, fn(p, x)), params, x, FLAGS.steps + 1)
                runs[impl] = {"ok": True, "ms": statistics.median(seconds[1:]) * 1e3,
                              "compile_s": compile_s,
                              "cudnn_calls": fn.as_text().count(CUDNN_ATTENTION)}
            except Exception as error:  # noqa: BLE001 - a refused shape is the finding
                runs[impl] = {"ok": False, "error": bench_lib.last_line(error)}
        if runs["einsum"]["ok"] and runs["fused"]["ok"]:
            einsum, fused = (ravel_pytree(grads[impl])[0] for impl in ("einsum", "fused"))
            difference = float(jnp.abs(einsum - fused).max() / jnp.abs(einsum).max())
            runs["fused"].update(max_grad_difference=difference,
                                 ok=difference < ATTENTION_GRAD_TOLERANCE)
        shapes[name] = {"rows": x.shape[0], "tokens": tokens, "heads": heads,
                        "head_dim": head_dim, **runs}
        progress({"shapes": shapes})
    return {"shapes": shapes, "dtype": str(dtype),
            "fused_passed": all(r["fused"]["ok"] for r in shapes.values()),
            "fused_backend": vit.fused_attention_backend(dtype)}


def flag_verdict(ratios: list[float], margin: float = WIN_MARGIN, min_pairs: int = 2) -> str:
    """'winner' ('loser') when the flag's step was faster (slower) by `margin` in every pair."""
    if len(ratios) < min_pairs:
        return "too few pairs"
    if all(r < 1 - margin for r in ratios):
        return "winner"
    return "loser" if all(r > 1 + margin for r in ratios) else "no clear difference"


def xla_flags_mode(config, phase: str, progress) -> dict[str, Any]:
    """Each candidate's step time over the default's, alternated in pairs. The JSON is written
    after the compiles and after each round, so a step cut short keeps what it measured."""
    run = build(config, phase, FLAGS.num_examples, abstract=False)
    compiled = {"default": compile_timed(run.step, run.state, run.batch)[0]}
    out, state = {"default": {"step_s": []}}, run.state
    for name in FLAGS.candidates:
        try:
            options = parse_options([name])
            compiled[name] = compile_timed(run.step, run.state, run.batch, options=options)[0]
            out[name] = {"step_s": []}
        except Exception as error:  # noqa: BLE001 - a flag this XLA rejects is a finding
            out[name] = {"verdict": "error", "error": bench_lib.last_line(error)}
        print(f"[step_time] {name}: {out[name].get('error', 'compiled')}", file=sys.stderr)
    candidates = list(compiled)[1:]

    def summary() -> dict[str, Any]:
        for k, name in enumerate(candidates):  # each against the default's timing just before
            ratios = [a / b for a, b in zip(out[name]["step_s"], out["default"]["step_s"][
                k::len(candidates)], strict=True)]
            out[name].update(step_s_ratios=ratios, verdict=flag_verdict(ratios),
                             step_s_ratio_median=statistics.median(ratios) if ratios else None)
        return {"settings": run_settings(config, phase), "pairs": FLAGS.pairs,
                "steps_per_timing": FLAGS.steps, "flags": out,
                "winners": [n for n, f in out.items() if f.get("verdict") == "winner"]}

    progress(summary())
    for executable in compiled.values():
        state = timed_steps(executable, state, run.batch, max(FLAGS.warmup, 1))[0]
    for _ in range(FLAGS.pairs):  # alternated: the machine's drift falls on every setting
        for name in (n for flag in candidates for n in ("default", flag)):
            state, _, seconds = timed_steps(compiled[name], state, run.batch, FLAGS.steps)
            out[name]["step_s"].append(statistics.median(seconds))
        progress(summary())
    return summary()


def environment() -> dict[str, Any]:
    packages = ("jax", "flax", "optax", "libtpu", "nvidia-cudnn", "nvidia-cublas",
                "nvidia-cuda-runtime", "nvidia-nccl")  # jax: also jaxlib and the CUDA plugins
    versions = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                if (d.metadata["Name"] or "").lower().startswith(packages)}
    return {"framework": "jax", "mode": FLAGS.mode, "versions": versions,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "process_count": jax.process_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "machine": bench_lib.machine_info(), "num_examples": FLAGS.num_examples}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    xla_flags.apply_gpu_defaults()
    if FLAGS.find_max_batch:  # JAX's allocator takes 75% of GPU memory by default
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    config, phase, header = bench_lib.setup(
        "float32" if jax.default_backend() == "cpu" else "bfloat16")
    header.update(environment())

    def progress(partial: dict[str, Any]) -> None:
        bench_lib.write_json({**header, **partial, "partial": True}, FLAGS.json, echo=False)

    mode = globals()[f"{FLAGS.mode}_mode"]
    bench_lib.write_json({**header, **mode(config, phase, progress)}, FLAGS.json)


if __name__ == "__main__":
    define_flags()
    app.run(main)
