"""What the training benchmarks of both frameworks share: the runs each experiment measures, the
analytic FLOP count of a pretraining step, the peak-FLOP/s table, timing statistics and the
machine description.

Neither JAX nor torch is imported here, so that the PyTorch reference loads no JAX (and the JAX
side no torch); the configs are the project's `ml_collections` configs on both sides.
"""

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "vit_b.py")

# Phase names of mvmae_jax.masking: a strategy's own phase is named after it; AMT's warm-up
# (random masking at amt.warmup_mask_ratio, nothing thrown) is "warmup".
RANDOM_PHASE = "random"
AMT_PHASE = "amt"
WARMUP_PHASE = "warmup"

# The model of `--tiny`: seconds per compile on a CPU, for the smoke tests.
TINY_OVERRIDES: dict[str, Any] = {
    "img_size": 16,
    "model.variant": "", "model.patch_size": 4, "model.width": 32, "model.depth": 1,
    "model.num_heads": 2, "model.mlp_dim": 64, "model.decoder_width": 32,
    "model.decoder_depth": 1, "model.decoder_heads": 2,
    "contrastive.hidden_dim": 64, "contrastive.output_dim": 32,
}

# Names of the measured runs; each experiment compares two of them.
MAIN = "main"
EXPERIMENT_RUNS = {
    # img/s of AMT (mask/throw) over MAE's mask 0.75 without throwing, same model and views.
    "amt_throw": ("amt", "no_throw"),
    # step time of AMT masking (bank lookup, alignment, Gumbel sort) over random masking and
    # throwing at the same token counts.
    "amt_overhead": ("amt", "random_same_counts"),
    # cost per image of two views + contrastive head over one view, same masking.
    "mvmae": ("mvmae", "mae"),
}


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """config["a.b.c"] = value for a dotted key of an existing field."""
    *parents, leaf = dotted.split(".")
    target = config
    for parent in parents:
        target = target[parent]
    target[leaf] = value


def apply_tiny(config: ml_collections.ConfigDict) -> None:
    """Shrinks the model to `TINY_OVERRIDES` (16x16 images, 4x4 patches, width 32)."""
    for key, value in TINY_OVERRIDES.items():
        set_field(config, key, value)


def default_phase(config: ml_collections.ConfigDict) -> str:
    """The phase a run of `config` spends most of its steps in: AMT for AMT configs."""
    return AMT_PHASE if config.masking.strategy == "amt" else RANDOM_PHASE


def phase_ratios(config: ml_collections.ConfigDict, phase: str) -> tuple[float, float]:
    """(mask_ratio, throw_ratio) of a phase: AMT's warm-up masks at `amt.warmup_mask_ratio`
    and throws nothing."""
    if phase == WARMUP_PHASE:
        return config.amt.warmup_mask_ratio, 0.0
    return config.masking.mask_ratio, config.masking.throw_ratio


def config_variant(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """A copy of `config` with `fields` set; "__" in a name stands for "." (model__remat)."""
    out = copy.deepcopy(config)
    for key, value in fields.items():
        set_field(out, key.replace("__", "."), value)
    return out


def experiment_runs(config: ml_collections.ConfigDict, phase: str, experiments: Sequence[str],
                    amt_ratios: tuple[float, float] = (0.45, 0.40),
                    plain_mask_ratio: float = 0.75,
                    ) -> dict[str, tuple[ml_collections.ConfigDict, str]]:
    """The (config, phase) of every run that `experiments` (keys of EXPERIMENT_RUNS) need,
    `main` first. Runs keep the main run's model, batch and views unless the experiment
    varies them; two names may denote the same run (the caller measures it once)."""
    unknown = set(experiments) - set(EXPERIMENT_RUNS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; known: {sorted(EXPERIMENT_RUNS)}")
    amt_mask, amt_throw = amt_ratios
    runs = {MAIN: (config, phase)}
    if "amt_throw" in experiments or "amt_overhead" in experiments:
        runs["amt"] = (config_variant(config, masking__strategy="amt",
                                      masking__mask_ratio=amt_mask,
                                      masking__throw_ratio=amt_throw), AMT_PHASE)
    if "amt_throw" in experiments:
        runs["no_throw"] = (config_variant(config, masking__strategy="random",
                                           masking__mask_ratio=plain_mask_ratio,
                                           masking__throw_ratio=0.0), RANDOM_PHASE)
    if "amt_overhead" in experiments:
        runs["random_same_counts"] = (config_variant(
            config, masking__strategy="random", masking__mask_ratio=amt_mask,
            masking__throw_ratio=amt_throw), RANDOM_PHASE)
    if "mvmae" in experiments:
        mask_ratio, throw_ratio = phase_ratios(config, phase)
        weight = config.contrastive.weight if config.contrastive.weight > 0 else 1.0
        same_masking = dict(masking__strategy=config.masking.strategy,
                            masking__mask_ratio=mask_ratio, masking__throw_ratio=throw_ratio)
        if phase in (RANDOM_PHASE, WARMUP_PHASE):  # the warm-up as a random-masking run
            same_masking["masking__strategy"], phase = "random", RANDOM_PHASE
        runs["mvmae"] = (config_variant(config, views__num=2, contrastive__weight=weight,
                                        **same_masking), phase)
        runs["mae"] = (config_variant(config, views__num=1, contrastive__weight=0.0,
                                      **same_masking), phase)
    return runs


def measure_runs(runs: Mapping[str, tuple[ml_collections.ConfigDict, str]],
                 measure: Callable[[ml_collections.ConfigDict, str], dict],
                 key: Callable[[ml_collections.ConfigDict, str], Any],
                 done: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """measure(config, phase) for each run, once per distinct key(config, phase); a repeated
    run is reported with `same_as` naming the run that measured it. `done` holds runs already
    measured (by name). An experiment's run that raises is reported as {"error": its last
    line} and the others go on; the main run's error is raised."""
    results: dict[str, dict] = dict(done or {})
    measured: dict[Any, str] = {key(*runs[name]): name for name in results}
    for name, (config, phase) in runs.items():
        if name in results:
            continue
        run_key = key(config, phase)
        if run_key in measured:
            results[name] = dict(results[measured[run_key]], same_as=measured[run_key])
            continue
        print(f"[bench] measuring run {name!r}", file=sys.stderr, flush=True)
        try:
            results[name] = measure(config, phase)
        except Exception as error:  # noqa: BLE001 - one failed experiment spoils no other
            if name == MAIN:
                raise
            lines = str(error).strip().splitlines() or [""]
            results[name] = {"error": f"{type(error).__name__}: {lines[-1]}"}
            print(f"[bench] run {name!r} failed: {results[name]['error']}", file=sys.stderr,
                  flush=True)
        measured[run_key] = name
    return results


def experiment_summary(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The ratios of the experiments whose two runs were measured.

    amt_throw_speedup: images/s of `amt` over `no_throw`.
    amt_masking_overhead: step time of `amt` over `random_same_counts`, minus 1.
    mvmae_over_mae_cost: seconds per image of `mvmae` over `mae`.
    """
    runs = {name: run for name, run in runs.items() if "error" not in run}
    out = {}
    if "amt" in runs and "no_throw" in runs:
        out["amt_throw_speedup"] = runs["amt"]["img_per_s"] / runs["no_throw"]["img_per_s"]
    if "amt" in runs and "random_same_counts" in runs:
        out["amt_masking_overhead"] = (runs["amt"]["step_s"]
                                       / runs["random_same_counts"]["step_s"] - 1.0)
    if "mvmae" in runs and "mae" in runs:
        out["mvmae_over_mae_cost"] = (runs["mvmae"]["step_s"] / runs["mvmae"]["batch"]) / (
            runs["mae"]["step_s"] / runs["mae"]["batch"])
    return out


def _transformer_forward_flops(tokens: int, width: int, mlp_dim: int, depth: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of `depth` pre-norm blocks over `tokens` tokens:
    q, k, v, out projections, the MLP, and attention's two token-by-token products."""
    projections = 2 * tokens * (4 * width * width + 2 * width * mlp_dim)
    attention = 2 * 2 * tokens * tokens * width
    return depth * (projections + attention)


def analytic_train_flops(config: ml_collections.ConfigDict, encoder: Mapping[str, int],
                         num_masked: int, num_thrown: int, online_maps: bool = False,
                         ) -> dict[str, int]:
    """Matmul and convolution FLOPs of one training step (the global batch) of the model the
    config builds, counted from the architecture, as the implementations compute them.

    Forward: the patch embedding of the visible patches (ours gathers their pixels first; the
    PyTorch reference embeds all N and keeps the visible ones, work this count leaves out as
    not needed), the encoder on [CLS] + visible tokens, the decoder on
    [CLS] + visible + masked tokens, the prediction head on the masked tokens only, and with two
    views the projection head and the InfoNCE similarity matrix. The backward pass costs twice
    the forward, except the patch embedding's (no gradient flows into the images: once).
    `online_maps` adds AMT's no-gradient encoder pass over all tokens (`amt.source="online"`).
    `gradient_cache_forward` is the step's extra no-gradient forward with gradient accumulation
    and two views (not in `model`).
    Elementwise work (norms, softmax, GELU, the optimizer) is not counted, nor the blocks'
    recomputation under `model.remat` (model FLOPs, as MFU counts them).

    Args:
      config: a pretraining config (img_size, batch_size, views, model, contrastive).
      encoder: width, depth, mlp_dim, patch_size of the encoder.
      num_masked, num_thrown: patches per view.
      online_maps: whether the step computes AMT maps with an extra encoder pass.
    Returns:
      dict of int FLOPs: `model` (the step's model FLOPs, used for MFU), `forward` (one
      forward of the global batch) and the parts.
    """
    width, depth, mlp_dim, patch = (encoder[k] for k in ("width", "depth", "mlp_dim",
                                                         "patch_size"))
    channels = 3
    num_patches = (config.img_size // patch) ** 2
    num_visible = num_patches - num_masked - num_thrown
    dec_width, dec_depth = config.model.decoder_width, config.model.decoder_depth
    rows = config.batch_size * config.views.num
    contrastive = config.views.num == 2 and config.contrastive.weight > 0

    embed_one = 2 * patch * patch * channels * width  # one patch's embedding
    embed = num_visible * embed_one
    enc_tokens = 1 + num_visible
    dec_tokens = enc_tokens + num_masked
    encoder_blocks = _transformer_forward_flops(enc_tokens, width, mlp_dim, depth)
    decoder_blocks = _transformer_forward_flops(dec_tokens, dec_width, 4 * dec_width, dec_depth)
    decoder = (2 * enc_tokens * width * dec_width + decoder_blocks
               + 2 * num_masked * dec_width * patch * patch * channels)
    per_row = encoder_blocks + decoder
    similarity = cached = 0
    if contrastive:
        hidden, out, layers = (config.contrastive.hidden_dim, config.contrastive.output_dim,
                               config.contrastive.num_layers)
        dims = [width] + [hidden] * (layers - 1) + [out]
        projection = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
        per_row += projection
        # InfoNCE compares all views of the global batch, also with gradient accumulation,
        # whose gradient cache first embeds every microbatch without gradient: an extra
        # forward of the encoder and head, recomputation (as remat's) outside the model FLOPs.
        similarity = 2 * rows * rows * out
        if config.grad_accum_steps > 1:
            cached = rows * (embed + encoder_blocks + projection)
    differentiated = rows * per_row + similarity
    forward = differentiated + rows * embed
    model = 3 * differentiated + 2 * rows * embed
    maps = 0
    if online_maps:
        maps = rows * (num_patches * embed_one
                       + _transformer_forward_flops(1 + num_patches, width, mlp_dim, depth))
        model += maps
    return {"model": model, "forward": forward, "embedding_forward": rows * embed,
            "encoder_blocks_forward": rows * encoder_blocks, "decoder_forward": rows * decoder,
            "online_maps": maps, "gradient_cache_forward": cached}


def timing_stats(seconds: Sequence[float], batch: int) -> dict[str, Any]:
    """Per-step times → step_s (the median, robust to a noisy machine), img_per_s from it,
    and the mean, min and max."""
    median = statistics.median(seconds)
    return {"step_s": median, "img_per_s": batch / median,
            "step_s_mean": statistics.fmean(seconds), "step_s_min": min(seconds),
            "step_s_max": max(seconds), "steps_timed": len(seconds),
            "step_s_all": list(seconds)}


def host_usage() -> tuple[int, float]:
    """(minor page faults, kernel CPU seconds) of this process so far. A CPU step that maps
    fresh memory for its buffers shows in both (docs/benchmarks.md)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def host_usage_per_step(before: tuple[int, float], steps: int) -> dict[str, float]:
    """Page faults and kernel CPU seconds per step since `before` (a `host_usage()`)."""
    faults, system_s = host_usage()
    return {"host_page_faults_per_step": (faults - before[0]) / steps,
            "host_system_cpu_s_per_step": (system_s - before[1]) / steps}


def max_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor(), "python": platform.python_version(),
            "load_average_1_5_15min": load}


def round_down(value: float, granularity: int) -> int:
    return max(granularity, int(value) // granularity * granularity)


def search_largest_batch(memory_at: Callable[[int], float], start: int, limit_bytes: float,
                         granularity: int = 8, max_probes: int = 16,
                         ) -> tuple[int, dict[str, Any]]:
    """The largest multiple of `granularity` whose `memory_at(batch)` stays under `limit_bytes`
    (memory_at may return math.inf for "does not fit").

    Doubling from `start` (halving while `start` does not fit) until a batch does not fit, each
    new probe aimed where the straight line through the last two probes meets the limit (step
    memory is a fixed part plus a part nearly proportional to the batch, so the line is close),
    then bisection of the bracket, aimed the same way, until it is one `granularity` wide. The
    growth stops early when the line through the two largest fitting probes puts the next
    multiple over the limit, so a linear memory needs three probes. Returns (batch, details);
    the caller times that batch.
    """
    probes: dict[int, float] = {}

    def probe(batch: int) -> bool:
        if batch not in probes:
            if len(probes) >= max_probes:
                raise RuntimeError(f"no answer after {max_probes} probes: {probes}")
            probes[batch] = float(memory_at(batch))
        return probes[batch] <= limit_bytes

    def aim(a: int, b: int) -> int | None:
        """Where the line through the probes at a and b reaches the limit, or None."""
        slope = (probes[b] - probes[a]) / (b - a)
        if not math.isfinite(slope) or slope <= 0:
            return None
        return round_down(a + (limit_bytes - probes[a]) / slope, granularity)

    low = max(granularity, start // granularity * granularity)
    while not probe(low):
        if low == granularity:
            raise RuntimeError(f"even a batch of {granularity} needs {probes[low]:.4g} bytes, "
                               f"over the limit of {limit_bytes:.4g}")
        low = round_down(low // 2, granularity)
    high, previous = None, None
    while high is None:  # grow: at most 8x per probe, at least one granularity
        aimed = aim(previous, low) if previous is not None else None
        if aimed is not None and aimed < low + granularity:
            # The line through the two largest fitting batches puts the next one over the
            # limit: memory that grows faster than linearly is over it too.
            return low, _search_details(probes, limit_bytes, low, None)
        target = 2 * low if aimed is None else min(aimed, 8 * low)
        if probe(target):
            previous, low = low, target
        else:
            high = target
    last_fitted, streak = None, 0  # the same end moved twice in a row: bisect plainly
    while high - low > granularity:
        aimed = None
        if streak < 2:
            aimed = (aim(low, high) if math.isfinite(probes[high])
                     else aim(previous, low) if previous is not None else None)
            if aimed is not None and aimed >= high:  # the line says nothing inside
                aimed = None
        middle = round_down((low + high) // 2, granularity)
        target = min(max(aimed if aimed is not None else middle, low + granularity),
                     high - granularity)
        fitted = probe(target)
        streak = streak + 1 if fitted == last_fitted else 1
        last_fitted = fitted
        if fitted:
            previous, low = low, target
        else:
            high = target
    return low, _search_details(probes, limit_bytes, low, high)


def _search_details(probes: Mapping[int, float], limit_bytes: float, low: int,
                    high: int | None) -> dict[str, Any]:
    return {"probe_batches": list(probes), "probe_bytes": list(probes.values()),
            "limit_bytes": limit_bytes, "largest_fitting": low, "smallest_over": high}


def finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def write_json(result: Mapping[str, Any], path: str) -> None:
    """Prints a benchmark's result as JSON and writes it to `path` too, when one is given."""
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text)
    print(text)
