"""Input-pipeline throughput against what a training step consumes.

Measures (1) two-view pretraining examples per second per host CPU core, decoding JPEGs of
ImageNet-like size (generated from the real photographs scikit-learn ships: ~500x375, quality
90) through the image-folder pipeline with the tf.data thread pool capped at each requested
count, and (2) the examples per second a training step of the chosen model consumes on this
machine's default JAX backend, and so (3) how many host cores keep one such device fed.

  python benchmarks/input_pipeline.py --json=/tmp/input.json            # ViT-B/16 at 224
  python benchmarks/input_pipeline.py --tiny --json=/tmp/input_tiny.json  # seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def write_jpegs(folder: str, count: int, size: tuple[int, int], seed: int = 0) -> float:
    """`count` JPEGs of `size` (w, h) cut and resized from scikit-learn's two photographs;
    returns their mean file size in bytes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    total = 0
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = rng.integers(200, photo.shape[0]), rng.integers(260, photo.shape[1])
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        image = Image.fromarray(photo[top:top + h, left:left + w]).resize(size, Image.BICUBIC)
        path = os.path.join(folder, f"{i:05d}.jpg")
        image.save(path, quality=90)
        total += os.path.getsize(path)
    return total / count


def pipeline_rate(config, folder: str, threads: int, batches: int, local_batch: int) -> float:
    from mvmae_jax import input_pipeline
    from mvmae_jax.data import sources

    config.input.threads = threads
    source = sources.ImageFolderSource(folder)
    stream = input_pipeline.host_train_batches(config, source, local_batch)
    next(stream)  # warm-up: thread pools, autotuning
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * local_batch / (time.perf_counter() - started)


def train_step_rate(config, steps: int) -> dict:
    """Images/s of the trainer's step (benchmarks/step_time.py's `build`) on this machine's
    default JAX backend, on a batch already on the devices."""
    import bench_lib
    import jax
    import step_time

    phase = bench_lib.default_phase(config)
    run = step_time.build(config, phase, 4 * config.batch_size, abstract=False)
    state = run.state
    started = time.perf_counter()
    state, metrics = run.step(state, run.batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = run.step(state, run.batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - started) / steps
    return {"phase": phase, "batch": config.batch_size, "step_s": seconds,
            "first_step_s": compile_s, "images_per_s": config.batch_size / seconds,
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--threads", default="1,2", help="tf.data thread counts to measure")
    parser.add_argument("--step_batch", type=int, default=8, help="global batch of the step")
    args = parser.parse_args()
    from mvmae_jax import xla_flags

    xla_flags.apply_gpu_defaults()
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from mvmae_jax.default_config import get_base_config

    config = get_base_config()
    if args.tiny:
        image_size, count, batches, local_batch, steps = (64, 48), 24, 2, 8, 2
        config.img_size = 32
        config.model.update(variant="", patch_size=8, width=32, depth=1, num_heads=2,
                            mlp_dim=64, decoder_width=32, decoder_depth=1, decoder_heads=2)
        config.contrastive.update(hidden_dim=32, output_dim=16)
    else:
        image_size, count, batches, local_batch, steps = (500, 375), 512, 12, 64, 3
    config.model.dtype = "float32" if args.tiny else config.model.dtype
    config.batch_size = args.step_batch

    with tempfile.TemporaryDirectory() as folder:
        mean_bytes = write_jpegs(folder, count, image_size)
        rates = {int(t): pipeline_rate(config, folder, int(t), batches, local_batch)
                 for t in args.threads.split(",")}
    step = train_step_rate(config, steps)
    best_threads = max(rates)
    per_core = rates[best_threads] / best_threads
    result = {
        "machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "input": {"jpeg_size": list(image_size), "jpeg_mean_bytes": mean_bytes,
                  "img_size": config.img_size, "views": config.views.num,
                  "examples_per_s_by_threads": rates,
                  "examples_per_s_per_core": per_core},
        "train_step": dict(step, model=config.model.variant or "tiny"),
        "cores_to_feed_one_step_stream": step["images_per_s"] / per_core,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
