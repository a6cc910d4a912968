"""One transformer block and one matrix product, forward and backward, in JAX (our
`Encoder1DBlock`) and in PyTorch eager (timm's `Block`), on the same CPU threads: the pieces
that benchmarks/profile_step.py shows the step is made of.

  python benchmarks/block_bench.py --json=/tmp/block.json    # MAE decoder block, batch 32
  python benchmarks/block_bench.py --batch=2 --tokens=5 --width=32 --heads=2 --runs=1 \\
      --json=/tmp/b.json                                     # CI smoke

The block gets a random cotangent (a sum would let XLA simplify the backward pass). Each side's
block pass also reports its minor page faults and kernel CPU seconds: buffers that the allocator
maps afresh on every pass show there (docs/benchmarks.md, "Host memory").
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch  # isort: skip  # before anything that may load TensorFlow
import timm  # isort: skip  # noqa: F401

import bench_lib
import train_throughput
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("json", "", "Where to write the results (they are printed too).")
flags.DEFINE_integer("batch", 32, "Sequences.")
flags.DEFINE_integer("tokens", 197, "Tokens per sequence (MAE's decoder: 1 + 196).")
flags.DEFINE_integer("width", 512, "Width (MAE's decoder: 512).")
flags.DEFINE_integer("heads", 16, "Attention heads.")
flags.DEFINE_integer("runs", 5, "Timed runs (after one untimed).")
flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads of both frameworks.")


def time_runs(run: Callable[[], None], runs: int) -> tuple[float, dict[str, float]]:
    """Seconds per run after one untimed run, and the timed runs' page faults and kernel CPU
    seconds per run (bench_lib.host_usage_per_step)."""
    run()
    host_before = bench_lib.host_usage()
    started = time.perf_counter()
    for _ in range(runs):
        run()
    seconds = (time.perf_counter() - started) / runs
    return seconds, bench_lib.host_usage_per_step(host_before, runs)


def block_timing(run: Callable[[], None], runs: int) -> dict:
    """Seconds, minor page faults and kernel CPU seconds per forward + backward pass."""
    seconds, host = time_runs(run, runs)
    return {"block_s": seconds, "block_page_faults": host["host_page_faults_per_step"],
            "block_system_cpu_s": host["host_system_cpu_s_per_step"]}


def torch_times(batch: int, tokens: int, width: int, heads: int, runs: int) -> dict:
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(width, heads, 4.0, qkv_bias=True)
    x = torch.randn(batch, tokens, width, requires_grad=True)
    cotangent = torch.randn(batch, tokens, width)
    a, b = torch.randn(batch * tokens, width), torch.randn(width, 4 * width)
    return {**block_timing(lambda: block(x).backward(cotangent), runs),
            "matmul_s": time_runs(lambda: a @ b, runs)[0]}


def jax_times(batch: int, tokens: int, width: int, heads: int, runs: int) -> dict:
    import jax

    from mvmae_jax.models.vit import Encoder1DBlock

    block = Encoder1DBlock(heads, 4 * width)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (batch, tokens, width))
    cotangent = jax.random.normal(keys[1], (batch, tokens, width))
    params = block.init(keys[2], x)
    a = jax.random.normal(keys[3], (batch * tokens, width))
    b = jax.random.normal(keys[4], (width, 4 * width))

    @jax.jit
    def gradients(params, x, cotangent):
        _, pullback = jax.vjp(lambda p, x: block.apply(p, x)[0], params, x)
        return pullback(cotangent)

    matmul = jax.jit(lambda a, b: a @ b)
    return {**block_timing(lambda: jax.block_until_ready(gradients(params, x, cotangent)), runs),
            "matmul_s": time_runs(lambda: jax.block_until_ready(matmul(a, b)), runs)[0]}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train_throughput.configure_threads(FLAGS.threads)
    torch.set_num_threads(FLAGS.threads)
    sizes = (FLAGS.batch, FLAGS.tokens, FLAGS.width, FLAGS.heads, FLAGS.runs)
    matmul_flops = 2 * FLAGS.batch * FLAGS.tokens * FLAGS.width * 4 * FLAGS.width
    result = {"batch": FLAGS.batch, "tokens": FLAGS.tokens, "width": FLAGS.width,
              "heads": FLAGS.heads, "runs": FLAGS.runs, "threads": FLAGS.threads,
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "matmul": f"({FLAGS.batch * FLAGS.tokens} x {FLAGS.width}) by "
                        f"({FLAGS.width} x {4 * FLAGS.width}), float32",
              "jax": jax_times(*sizes), "torch": torch_times(*sizes),
              "machine": bench_lib.machine_info()}
    for side in ("jax", "torch"):
        result[side]["matmul_gflop_per_s"] = matmul_flops / result[side]["matmul_s"] / 1e9
    result["block_ratio_jax_over_torch_time"] = (result["jax"]["block_s"]
                                                 / result["torch"]["block_s"])
    bench_lib.write_json(result, FLAGS.json)


if __name__ == "__main__":
    app.run(main)
