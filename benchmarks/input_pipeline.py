"""Two-view pretraining examples/s of the host input pipeline against MAE's recipe on the same
JPEGs, at one core and all (docs/benchmarks.md, "Input pipeline"): our tfds and image-folder
paths, MAE's Pillow + torchvision, and the cores one accelerator needs (STEP_RATES). Rounds
alternate (medians).

  python benchmarks/input_pipeline.py [--tiny] --json=/tmp/input.json   # --tiny: seconds
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import bench_lib
import numpy as np

STEP_RATES = {"H200 ViT-B/16 MAE step (batch 256)": 3013}  # images/s of one accelerator
SETS = {"500x375": ((500, 375), 90), "imagenet_bytes": ((880, 660), 90)}  # (w, h), quality
JOBS = ("tfds", "folder", "mae")  # each at one core and at all cores


def write_jpegs(folder: str, count: int, size: tuple[int, int], quality: int) -> float:
    """`count` JPEGs of `size` (w, h) cut from scikit-learn's two photographs; their mean bytes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng, photos = np.random.default_rng(0), load_sample_images().images
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = rng.integers(200, photo.shape[0]), rng.integers(260, photo.shape[1])
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        image = Image.fromarray(photo[top:top + h, left:left + w]).resize(size, Image.BICUBIC)
        image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=quality)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / count


def _timed(iterator, count: int, per_item: int) -> float:
    """Items/s of `iterator` over `count` items after one warm-up item."""
    next(iterator)
    started = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count * per_item / (time.perf_counter() - started)


def _ours(kind: str, files: list[str], threads: int, batch: int, batches: int) -> float:
    """Examples/s of our training batches, from the folder or ("tfds") from memory."""
    import tensorflow as tf

    from mvmae_jax import default_config, input_pipeline
    from mvmae_jax.data import augment, sources

    class BytesSource(sources.ImageFolderSource):
        """The folder's records with their bytes from memory, as `TfdsSource` yields them."""

        data = tf.constant([open(f, "rb").read() for f in files])
        decode = staticmethod(augment.decode)

        def elements(self, *, seed, epoch, start=0):
            return tf.data.Dataset.from_tensor_slices({
                "index": self.epoch_order(seed, epoch)[start:].astype(np.int64),
                "position": np.arange(start, self.host_size) + epoch * self.host_size,
            }).map(lambda e: dict(e, encoded=tf.gather(self.data, e["index"])))

    config = default_config.get_base_config()
    config.input.threads = threads
    source = (BytesSource if kind == "tfds" else sources.ImageFolderSource)(
        os.path.dirname(files[0]))
    return _timed(input_pipeline.host_train_batches(config, source, batch), batches, batch)


def _mae(files: list[str], workers: int, batch: int, batches: int) -> float:
    import torch
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(1)
    view = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])

    class TwoViews(torch.utils.data.Dataset):
        def __len__(self):
            return 10**9

        def __getitem__(self, i):
            with open(files[i % len(files)], "rb") as f:
                image = Image.open(f).convert("RGB")
            return torch.stack([view(image), view(image)])

    return _timed(iter(torch.utils.data.DataLoader(
        TwoViews(), batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
        multiprocessing_context="fork" if workers else None)), batches, batch)


def measure(jobs: list[str], folder: str, cores: int, batch: int, batches: int) -> list:
    """Each job in turn on one core or all (`cores` 0): its examples per second."""
    if cores == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cores = len(os.sched_getaffinity(0))
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    return [_mae(files, 0 if cores == 1 else cores, batch, batches) if job == "mae"
            else _ours(job, files, cores, batch, batches) for job in jobs]


def in_own_process(*args) -> list:
    """`measure(*args)` in a fresh interpreter (TensorFlow and torch never share one)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--tiny", action="store_true", help="small sizes, for the smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds (medians)")
    args = parser.parse_args()
    os.environ.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    all_cores = len(os.sched_getaffinity(0))
    count, batch, batches = (64, 8, 2) if args.tiny else (768, 32, 12)  # an epoch outlasts it
    results = {"machine": bench_lib.machine_info(), "repeats": args.repeats, "sets": {}}
    with tempfile.TemporaryDirectory() as root:
        for set_name, (size, quality) in ({"500x375": ((100, 75), 90)} if args.tiny
                                          else SETS).items():
            folder = os.path.join(root, set_name)
            os.makedirs(folder)
            mean_bytes = write_jpegs(folder, count, size, quality)
            core_counts = sorted({1, all_cores})
            groups = [(cores, [job for job in JOBS if (job == "mae") == torch])
                      for cores in core_counts for torch in (False, True)]  # a process each
            rounds = [{(job, cores): rate for cores, group in groups for job, rate in zip(
                group, in_own_process(group, folder, cores, batch, batches), strict=True)}
                for _ in range(args.repeats)]  # alternated: every job once per round
            rates = {key: [r[key] for r in rounds] for key in rounds[0]}
            median = {key: statistics.median(r) for key, r in rates.items()}
            results["sets"][set_name] = {
                "jpeg_size": list(size), "quality": quality, "mean_bytes": mean_bytes,
                "by_cores": {str(cores): {
                    "examples_per_s": {job: median[job, cores] for job in JOBS},
                    "ratio_to_mae": {job: median[job, cores] / median["mae", cores]
                                     for job in ("tfds", "folder")},
                    "all_rounds": {job: rates[job, cores] for job in JOBS}}
                    for cores in core_counts},
                "cores_per_accelerator": {
                    name: rate / median["tfds", 1] for name, rate in STEP_RATES.items()}}
    bench_lib.write_json(results, args.json)


if __name__ == "__main__":
    main()
