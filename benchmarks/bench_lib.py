"""What the benchmark scripts share: flags, the experiments' runs, token counts, the analytic
FLOP count, run records, the largest-batch search, the machine."""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from mvmae_jax import masking, models

FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "vit_b.py")

# The model of `--tiny`: seconds per compile on a CPU, for the smoke tests.
TINY_OVERRIDES: dict[str, Any] = {
    "img_size": 16, "model.variant": "", "model.patch_size": 4, "model.width": 32,
    "model.depth": 1, "model.num_heads": 2, "model.mlp_dim": 64, "model.decoder_width": 32,
    "model.decoder_depth": 1, "model.decoder_heads": 2, "contrastive.hidden_dim": 64,
    "contrastive.output_dim": 32}

MAIN = "main"
# Each experiment: (its result, runs a and b, c): a's time per image over b's, plus c.
# amt_throw: images/s of AMT (mask 0.45 / throw 0.40) over mask 0.75 without throwing;
# amt_overhead: AMT masking over random masking at the same token counts, less 1;
# mvmae: the cost per image of two views + contrastive head over one view.
EXPERIMENTS = {"amt_throw": ("amt_throw_speedup", "no_throw", "amt", 0.0),
               "amt_overhead": ("amt_masking_overhead", "amt", "random_same_counts", -1.0),
               "mvmae": ("mvmae_over_mae_cost", "mvmae", "mae", 0.0)}
BATCH_GRANULARITY = 8  # the largest-batch search's per-device multiple


def define_flags() -> None:
    """The flags both frameworks' scripts share (defined on demand: tests import both)."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Pretraining config file.",
                                    lock_config=True)
    flags.DEFINE_string("json", "", "Where to write the results (they are printed too).")
    flags.DEFINE_bool("tiny", False, "A tiny model (16x16 images, width 32), for smoke tests.")
    flags.DEFINE_string("phase", "", "Masking phase; default: 'amt' for AMT configs.")
    flags.DEFINE_string("dtype", "", "'' keeps config.model.dtype; 'auto': bfloat16 on "
                        "accelerators, float32 on the CPU.")
    flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
    flags.DEFINE_bool("amt_throw", False, "Also measure AMT throwing against mask 0.75.")
    flags.DEFINE_bool("mvmae", False, "Also measure two views against one view.")
    flags.DEFINE_bool("find_max_batch", False, "Time the main run at the largest batch that "
                      "fits in device memory.")


def setup(auto_dtype: str):
    """(config, phase, header) from the shared flags; --dtype=auto means `auto_dtype`."""
    config = FLAGS.config
    if FLAGS.tiny:
        config.update_from_flattened_dict(TINY_OVERRIDES)
    if FLAGS.dtype:
        config.model.dtype = auto_dtype if FLAGS.dtype == "auto" else FLAGS.dtype
    phase = FLAGS.phase or config.masking.strategy  # a strategy's phase is named after it
    return config, phase, {"config": str(config_flags.get_config_filename(FLAGS["config"])),
                           "tiny": FLAGS.tiny, "phase": phase, "dtype": config.model.dtype,
                           "steps": FLAGS.steps, "warmup_steps": FLAGS.warmup}


def phase_ratios(config: ml_collections.ConfigDict, phase: str) -> tuple[float, float]:
    """(mask_ratio, throw_ratio) of a phase; AMT's warm-up throws nothing."""
    if phase == masking.WARMUP_PHASE:
        return config.amt.warmup_mask_ratio, 0.0
    return config.masking.mask_ratio, config.masking.throw_ratio


def config_variant(config: ml_collections.ConfigDict, fields: dict[str, Any]):
    """A copy of `config` with `fields` ({"masking.strategy": ...}) set."""
    out = copy.deepcopy(config)
    out.update_from_flattened_dict(fields)
    return out


def experiment_runs(config: ml_collections.ConfigDict, phase: str, experiments: Sequence[str],
                    ) -> dict[str, tuple[ml_collections.ConfigDict, str]]:
    """The (config, phase) of every run that `experiments` need, `main` first."""
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; known: {sorted(EXPERIMENTS)}")
    # The MV-MAE pair masks as the main run; AMT's warm-up as a random-masking run.
    strategy, same_phase = config.masking.strategy, phase
    if phase in ("random", masking.WARMUP_PHASE):
        strategy, same_phase = "random", "random"
    as_main = (strategy, *phase_ratios(config, phase), same_phase)
    weight = config.contrastive.weight if config.contrastive.weight > 0 else 1.0

    def variant(strategy: str, mask: float, throw: float, run_phase: str, fields: dict):
        return config_variant(config, {"masking.strategy": strategy, "masking.mask_ratio": mask,
                                       "masking.throw_ratio": throw, **fields}), run_phase

    variants = {  # (strategy, mask ratio, throw ratio, phase, other fields), built when needed
        "amt": ("amt", 0.45, 0.40, "amt", {}),
        "no_throw": ("random", 0.75, 0.0, "random", {}),
        "random_same_counts": ("random", 0.45, 0.40, "random", {}),
        "mvmae": (*as_main, {"views.num": 2, "contrastive.weight": weight}),
        "mae": (*as_main, {"views.num": 1, "contrastive.weight": 0.0})}
    needed = {run for name in experiments for run in EXPERIMENTS[name][1:3]}
    return {MAIN: (config, phase),
            **{name: variant(*spec) for name, spec in variants.items() if name in needed}}


def last_line(error: BaseException) -> str:
    """An exception as one line: its type and the last line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def measure_experiments(config, phase: str, experiments: Sequence[str], measure: Callable,
                        measure_main: Callable) -> dict[str, Any]:
    """The main run, measure_main(config) -> (its config, its result, its batch search or None),
    then each other run at its config, measure(config, phase) once per distinct run (a repeat is
    marked `same_as`, a failed run is {"error": its last line}): the main run's numbers, each
    experiment's result where both its runs were measured, and every run."""
    config, main_run, search = measure_main(config)
    runs, first = {}, {}  # first: (config, phase) -> the run that measured it
    for name, (run_config, run_phase) in experiment_runs(config, phase, experiments).items():
        key = first.setdefault((run_config.to_json(), run_phase), name)
        if name == MAIN:
            runs[name] = main_run
        elif key != name:
            runs[name] = dict(runs[key], same_as=key)
        else:
            print(f"[bench] measuring run {name!r}", file=sys.stderr, flush=True)
            try:
                runs[name] = measure(run_config, run_phase)
            except Exception as error:  # noqa: BLE001 - one failed experiment spoils no other
                runs[name] = {"error": last_line(error)}
                print(f"[bench] run {name!r} failed: {runs[name]['error']}", file=sys.stderr)
    per_image = {name: run["step_s"] / run["batch"] for name, run in runs.items()
                 if "error" not in run}
    keys = ("img_per_s", "step_s", "compile_s", "batch", "mfu", "mfu_xla", "peak_memory_bytes",
            "peak_memory_source", "host_gap_ms", "profile", "optimizer_update")
    return {"experiments": list(experiments), **{k: main_run[k] for k in keys if k in main_run},
            "flops_per_image_analytic": main_run["flops_analytic_per_image"],
            "max_batch_search": search,
            **{result: per_image[a] / per_image[b] + c for result, a, b, c in EXPERIMENTS.values()
               if a in per_image and b in per_image}, "runs": runs}


def _blocks_flops(tokens: int, width: int, mlp_dim: int, depth: int) -> int:
    """Matmul FLOPs of `depth` blocks: q, k, v, out projections, the MLP, attention's two
    token-by-token products."""
    return depth * (2 * tokens * (4 * width * width + 2 * width * mlp_dim)
                    + 4 * tokens * tokens * width)


def token_counts(config: ml_collections.ConfigDict, phase: str) -> dict[str, int]:
    """Patches per view, and how many a phase masks, throws and leaves visible."""
    patches = (config.img_size // models.encoder_dims(config.model)["patch_size"]) ** 2
    masked, thrown, visible = masking.mask_counts(patches, *phase_ratios(config, phase))
    return {"num_patches": patches, "masked": masked, "thrown": thrown, "visible": visible}


def computes_online_maps(config: ml_collections.ConfigDict, phase: str) -> bool:
    """Whether our step runs AMT's extra no-gradient encoder pass for its attention maps."""
    return phase == "amt" and config.amt.source == "online"


def analytic_train_flops(config: ml_collections.ConfigDict, phase: str,
                         online_maps: bool = False) -> dict[str, int]:
    """Matmul and convolution FLOPs of one step of the global batch from the architecture
    (backward twice the forward, the patch embedding's once): `model` (MFU's), with
    `online_maps` AMT's no-gradient encoder pass; the gradient cache's extra work apart."""
    encoder, tokens = models.encoder_dims(config.model), token_counts(config, phase)
    width, depth, mlp_dim, patch = (encoder[k] for k in ("width", "depth", "mlp_dim", "patch_size"))
    num_patches, num_masked, num_visible = (tokens[k] for k in ("num_patches", "masked", "visible"))
    dec_width, dec_depth = config.model.decoder_width, config.model.decoder_depth
    rows = config.batch_size * config.views.num
    embed_one = 2 * patch * patch * 3 * width
    embed = num_visible * embed_one
    enc_tokens = 1 + num_visible
    encoder_blocks = _blocks_flops(enc_tokens, width, mlp_dim, depth)
    decoder = (2 * enc_tokens * width * dec_width
               + _blocks_flops(enc_tokens + num_masked, dec_width, 4 * dec_width, dec_depth)
               + 2 * num_masked * dec_width * patch * patch * 3)
    per_row = encoder_blocks + decoder
    similarity = cached = 0
    if config.views.num == 2 and config.contrastive.weight > 0:
        con = config.contrastive
        dims = [width] + [con.hidden_dim] * (con.num_layers - 1) + [con.output_dim]
        projection = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
        per_row += projection
        similarity = 2 * rows * rows * con.output_dim  # the global batch's, also accumulating
        if config.grad_accum_steps > 1:  # each microbatch takes InfoNCE over the whole batch
            cached = (rows * (embed + encoder_blocks + projection)
                      + 3 * (config.grad_accum_steps - 1) * similarity)
    maps = 0
    if online_maps:
        maps = rows * (num_patches * embed_one
                       + _blocks_flops(1 + num_patches, width, mlp_dim, depth))
    differentiated = rows * per_row + similarity
    model = 3 * differentiated + 2 * rows * embed + maps
    return {"model": model, "online_maps": maps, "gradient_cache_forward": cached}


def run_record(config: ml_collections.ConfigDict, phase: str, seconds: Sequence[float],
               peak_flops: float | None, devices: int, memory: tuple[int, str], loss: float,
               online_maps: bool = False) -> dict[str, Any]:
    """One measured run as both frameworks report it; step time is the median."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss}: the timed steps are not meaningful")
    step_s, batch = statistics.median(seconds), config.batch_size
    flops = analytic_train_flops(config, phase, online_maps)
    return {
        "encoder": models.encoder_dims(config.model), "variant": config.model.variant,
        "decoder": {"width": config.model.decoder_width, "depth": config.model.decoder_depth,
                    "heads": config.model.decoder_heads},
        "img_size": config.img_size, "batch": batch, "views": config.views.num,
        "contrastive": config.views.num == 2 and config.contrastive.weight > 0, "phase": phase,
        "tokens": token_counts(config, phase), "step_s": step_s, "img_per_s": batch / step_s,
        "step_s_all": list(seconds), "flops_analytic_per_image": flops["model"] / batch,
        "flops_analytic_parts": flops,
        "mfu": None if peak_flops is None else flops["model"] / step_s / (peak_flops * devices),
        "peak_memory_bytes": memory[0], "peak_memory_source": memory[1], "final_loss": loss}


def max_rss() -> tuple[int, str]:
    """The process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (int(rss if sys.platform == "darwin" else rss * 1024),
            "process max RSS (ru_maxrss): no device memory statistics")


def machine_info() -> dict[str, Any]:
    return {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor(), "python": platform.python_version(),
            "load_average_1_5_15min": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def round_down(value: float, granularity: int) -> int:
    return max(granularity, int(value) // granularity * granularity)


def search_largest_batch(memory_at: Callable[[int], float], start: int, limit_bytes: float,
                         granularity: int = BATCH_GRANULARITY, max_probes: int = 16,
                         ) -> tuple[int, dict[str, Any]]:
    """The largest multiple of `granularity` whose memory_at(batch) (inf: does not fit) is
    under `limit_bytes`, and the probes; each probe aimed by the line through the two nearest
    the limit, else doubling, halving or bisecting (docs/benchmarks.md, "The suite")."""
    probes: dict[int, float] = {}
    low, high, streak = 0, math.inf, []  # largest fitting, smallest over, the last two sides
    batch = max(granularity, start // granularity * granularity)
    while high - low > granularity:
        if len(probes) >= max_probes:
            raise RuntimeError(f"no answer after {max_probes} probes: {probes}")
        probes[batch] = float(memory_at(batch))
        fits = probes[batch] <= limit_bytes
        low, high = (batch, high) if fits else (low, batch)
        streak = streak[-1:] + [fits]
        if not low and batch == granularity:
            raise RuntimeError(f"even a batch of {granularity} needs {probes[batch]:.4g} bytes, "
                               f"over the limit of {limit_bytes:.4g}")
        near = sorted((b for b in probes if math.isfinite(probes[b])),
                      key=lambda b: abs(probes[b] - limit_bytes))[:2]
        slope = (probes[near[1]] - probes[near[0]]) / (near[1] - near[0]) if near[1:] else 0
        aimed = (round_down(near[0] + (limit_bytes - probes[near[0]]) / slope, granularity)
                 if slope > 0 else None)
        if high == math.inf:  # every probe fitted so far
            if aimed is not None and aimed < low + granularity:
                break
            batch = 2 * low if aimed is None else min(aimed, 8 * low)
        else:  # bisects while nothing fits: one probe gives no line, two give a streak
            if aimed is None or aimed >= high or streak in ([True, True], [False, False]):
                aimed = round_down((low + high) // 2, granularity)
            batch = min(max(aimed, low + granularity), high - granularity)
    return low, {"probe_batches": list(probes), "probe_bytes": list(probes.values()),
                 "limit_bytes": limit_bytes, "largest_fitting": low,
                 "smallest_over": None if high == math.inf else high}


def largest_batch(config: ml_collections.ConfigDict, memory_at: Callable, measure_at: Callable,
                  is_out_of_memory: Callable[[Exception], bool], limit_bytes: float,
                  devices: int = 1) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(config, measure_at(config), the search) at the largest per-device batch whose
    memory_at(config) is under `limit_bytes` (out of memory: it is not), searched from
    config's; the timed run goes 10% lower per out-of-memory failure."""
    def at(per_device: int) -> ml_collections.ConfigDict:
        return config_variant(config, {"batch_size": per_device * devices})

    def memory(per_device: int) -> float:
        try:
            return memory_at(at(per_device))
        except Exception as error:  # noqa: BLE001 - only out-of-memory means "does not fit"
            if is_out_of_memory(error):
                return math.inf
            raise

    started = time.perf_counter()
    batch, search = search_largest_batch(memory, config.batch_size // devices, limit_bytes)
    search.update(search_s=time.perf_counter() - started, failed_batches=[])
    while True:
        run_config = at(batch)
        try:
            return run_config, measure_at(run_config), dict(search, per_device_batch=batch)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(error) or batch <= BATCH_GRANULARITY:
                raise
            search["failed_batches"].append(batch)
            batch = round_down(batch * 0.9, BATCH_GRANULARITY)


def write_json(result: Mapping[str, Any], path: str, echo: bool = True) -> None:
    """Writes a result as JSON to `path` when one is given, replacing the file whole (a process
    killed while writing leaves the previous one), and prints it when `echo`."""
    text = json.dumps(result, indent=2)
    if path:
        pathlib.Path(path + ".part").write_text(text)
        os.replace(path + ".part", path)
    if echo:
        print(text)
