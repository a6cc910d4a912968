"""Where the pretraining step's time goes: a jax.profiler trace of the compiled step, summed by
XLA operation, printed with each operation's HLO line (shape and source), as JSON.

The step, batch and settings are benchmarks/train_throughput.py's (`--config.field=value`
overrides, `--dtype`, `--phase`, `--tiny`). The trace (perfetto JSON and the TensorBoard
profile) stays in `--trace_dir` for a closer look.

  python benchmarks/profile_step.py --config.model.variant=S/16 --config.img_size=224 \\
      --config.batch_size=32 --config.views.num=1 --config.masking.strategy=random \\
      --config.masking.throw_ratio=0.0 --config.contrastive.weight=0.0 --dtype=auto \\
      --json=/tmp/profile.json                     # the CPU comparison's main run
  python benchmarks/profile_step.py --tiny --json=/tmp/p.json   # CI smoke

Operation times are summed over the traced steps and divided by their number; XLA's CPU
runtime runs independent operations concurrently, so the sum can exceed the step time. On a GPU
or TPU the operations are the kernels on the device's streams (`durations_by_op`).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import shutil
import tempfile
import time
from typing import Any

import bench_lib
import train_throughput
from absl import app, flags

FLAGS = flags.FLAGS

# Trace events that are runtime bookkeeping, not XLA operations.
_NOT_OPS = ("$", "Thunk", "Slinky", "end:", "PjitFunction", "CommonPjRt", "PjRt")


def define_flags() -> None:
    train_throughput.define_step_flags(2, 2, "Traced steps.", "Untraced steps after compiling.")
    flags.DEFINE_integer("top", 40, "Operations listed.")
    flags.DEFINE_integer("num_examples", 1_000, "Rows of the AMT bank.")
    flags.DEFINE_string("trace_dir", "", "Where the trace stays (default: a temporary folder, "
                        "removed).")


def hlo_lines(hlo_text: str) -> dict[str, str]:
    """{instruction name: its HLO line} of a compiled module's text."""
    lines = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if match:
            lines[match.group(1)] = line.strip()
    return lines


def op_durations(trace_dir: str) -> collections.Counter:
    """Microseconds per XLA operation, summed over the perfetto trace in `trace_dir`.

    On an accelerator the operations are the kernels on the device's streams (processes named
    /device:...), each named by the HLO instruction it runs (its `hlo_op` argument, else the
    kernel name); the host's events there are launches and waits. On the CPU the operations
    run on the host's threads: every host event that is not runtime bookkeeping."""
    paths = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
    with gzip.open(paths[0]) as f:
        events = json.load(f)["traceEvents"]
    return durations_by_op(events)


def durations_by_op(events: list[dict]) -> collections.Counter:
    """op_durations of a trace's event list."""
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train_throughput.configure_threads(FLAGS.threads)
    import jax

    config, phase = train_throughput.config_and_phase()
    model, _, state, step, batch = train_throughput.build(config, phase, FLAGS.num_examples,
                                                      abstract=False)
    compiled = step.lower(state, batch).compile()
    for _ in range(FLAGS.warmup):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)

    trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="mvmae_profile_")
    started = time.perf_counter()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(FLAGS.steps):
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
    jax.profiler.stop_trace()
    traced_s = time.perf_counter() - started
    try:
        summary = summarise(op_durations(trace_dir), hlo_lines(compiled.as_text()),
                            FLAGS.steps, FLAGS.top)
    finally:
        if not FLAGS.trace_dir:
            shutil.rmtree(trace_dir, ignore_errors=True)
    result = {"settings": train_throughput.run_settings(config, phase, model),
              "steps_traced": FLAGS.steps, "step_s_while_tracing": traced_s / FLAGS.steps,
              "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
              "trace_dir": FLAGS.trace_dir or None, **summary}
    bench_lib.write_json(result, FLAGS.json)


if __name__ == "__main__":
    define_flags()
    app.run(main)
