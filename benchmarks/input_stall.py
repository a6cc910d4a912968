"""Does the input pipeline slow training down? The trainer's step fed by the run's own input
pipeline against the same step fed by batches already on the devices, as JSON.

Three timings on one host, with the config's data set, model and phase:
  - `cached`: the step over a few real batches kept on the devices (no input work at all);
  - `input`: the step fed by `input_pipeline.train_batches` (tf.data and the device
    prefetcher), as the trainer feeds it;
  - `pipeline`: the pipeline alone, batches delivered to the devices one after another, with the
    host CPU time it takes per batch.
`cached` and `input` alternate `--repeats` times (a shared machine's speed drifts); each runs
the trainer's loop: asynchronous dispatch, with the metrics fetched every
`config.log_every_steps` steps. `input_slowdown` is the median `input` step time over the
median `cached` one, minus 1. On an accelerator a slowdown means the devices waited for input
(compare `pipeline.batch_s` with the step time). On the CPU backend the step and tf.data share
the same cores, so the pipeline's CPU time per batch slows the step even when the pipeline
alone is fast enough (docs/benchmarks.md).

  python benchmarks/input_stall.py --config=configs/quickstart.py --json=/tmp/stall_qs.json
  python benchmarks/input_stall.py --config=configs/vit_b.py --config.batch_size=1024 --json=F
  python benchmarks/input_stall.py --config=configs/quickstart.py --tiny --steps=2 --json=F  # CI

On a multi-host slice, run it on one host with `--config.batch_size` set to that host's batch.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import bench_lib
import ml_collections
import train_throughput
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    train_throughput.define_step_flags(30, 3, "Timed steps per timing.",
                                       "Untimed steps (or batches) before each timing.")
    flags.DEFINE_integer("repeats", 2, "Alternations of the cached and the input timing.")
    flags.DEFINE_integer("cached_batches", 4, "Distinct real batches the cached timing cycles.")


def cpu_seconds() -> float:
    """User and kernel CPU time of this process (all its threads: tf.data's included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_loop(step: Callable, state: Any, next_batch: Callable[[], Any], steps: int,
               warmup: int, log_every: int) -> tuple[Any, float]:
    """The trainer's loop shape: dispatch `warmup + steps` steps without waiting, fetch the
    metrics every `log_every` steps and after the last. Returns (state, seconds per timed step).
    """
    import jax

    for _ in range(warmup):
        state, metrics = step(state, next_batch())
    if warmup:
        jax.device_get(metrics)
    started = time.perf_counter()
    for done in range(1, steps + 1):
        state, metrics = step(state, next_batch())
        if done % log_every == 0 or done == steps:
            jax.device_get(metrics)
    return state, (time.perf_counter() - started) / steps


def _global_batch(stream) -> dict:
    """The next global batch of a `train_batches` stream (it yields (batch, position))."""
    return next(stream)[0]


def time_pipeline(config: ml_collections.ConfigDict, mesh, source, batches: int,
                  warmup: int) -> dict[str, float]:
    """The pipeline alone: seconds and host CPU seconds per global batch on the devices."""
    import jax

    from mvmae_jax import input_pipeline

    stream = input_pipeline.train_batches(config, mesh, source)
    try:
        for _ in range(warmup):
            jax.block_until_ready(_global_batch(stream))
        started, cpu_before = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            jax.block_until_ready(_global_batch(stream))
        seconds = (time.perf_counter() - started) / batches
        cpu = (cpu_seconds() - cpu_before) / batches
    finally:
        stream.close()
    return {"batch_s": seconds, "cpu_s_per_batch": cpu,
            "examples_per_s": config.batch_size / seconds}


def measure(config: ml_collections.ConfigDict, phase: str, steps: int, warmup: int,
            repeats: int, cached_batches: int) -> dict[str, Any]:
    """The three timings of the module docstring, on this host's devices, with the step of
    `phase` and the config's training data."""
    import jax
    import tensorflow as tf

    from mvmae_jax import input_pipeline

    tf.config.set_visible_devices([], "GPU")  # tf.data only, as in the trainer
    source = input_pipeline.make_source(config, process_index=0, process_count=1)
    _, mesh, state, step, _ = train_throughput.build(config, phase, source.num_examples,
                                                     abstract=False)
    log_every = max(1, config.log_every_steps)

    # Real batches for the cached timing, drawn before any timing and then kept on the devices.
    stream = input_pipeline.train_batches(config, mesh, source)
    try:
        cache = [_global_batch(stream) for _ in range(max(1, cached_batches))]
    finally:
        stream.close()
    started = time.perf_counter()
    state, metrics = step(state, cache[0])
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - started

    cached_s, input_s = [], []
    for _ in range(repeats):
        state, seconds = timed_loop(step, state, functools.partial(next, itertools.cycle(cache)),
                                    steps, warmup, log_every)
        cached_s.append(seconds)
        # A fresh pipeline per timing, closed after it: none runs during the cached timings.
        stream = input_pipeline.train_batches(config, mesh, source)
        try:
            state, seconds = timed_loop(step, state, functools.partial(_global_batch, stream),
                                        steps, warmup, log_every)
        finally:
            stream.close()
        input_s.append(seconds)
    pipeline = time_pipeline(config, mesh, source, steps, warmup)

    cached_median, input_median = statistics.median(cached_s), statistics.median(input_s)
    return {
        "phase": phase, "batch": config.batch_size, "dataset": config.dataset.name,
        "num_examples": source.num_examples, "steps": steps, "warmup": warmup,
        "repeats": repeats, "log_every_steps": log_every, "first_step_s": first_step_s,
        "step_s_cached": cached_s, "step_s_input": input_s,
        "step_s_cached_median": cached_median, "step_s_input_median": input_median,
        "input_slowdown": input_median / cached_median - 1.0,
        "pipeline": pipeline,
        "pipeline_keeps_up": pipeline["batch_s"] <= cached_median,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train_throughput.configure_threads(FLAGS.threads)
    config, phase = train_throughput.config_and_phase()
    result = {
        "config": str(config_flags.get_config_filename(FLAGS["config"])),
        "tiny": FLAGS.tiny,
        "environment": train_throughput.environment(),
        "input_threads": config.input.get("threads", 0),
        "prefetch": config.input.get("prefetch", 2),
    }
    result.update(measure(config, phase, FLAGS.steps, FLAGS.warmup, FLAGS.repeats,
                          FLAGS.cached_batches))
    bench_lib.write_json(result, FLAGS.json)


if __name__ == "__main__":
    define_flags()
    app.run(main)
