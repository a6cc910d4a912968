"""Two-view pretraining examples/s of the host input pipeline against MAE's recipe on the same
JPEGs, at one core and all (docs/benchmarks.md, "Input pipeline"): our tfds and image-folder
paths, MAE's Pillow + torchvision, decoding alone, our stages at one core, the cores one
accelerator needs (STEP_RATES), our views' distance to MAE's filter. Rounds alternate (medians).

  python benchmarks/input_pipeline.py [--tiny] --json=/tmp/input.json   # --tiny: seconds
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

STEP_RATES = {"H200 ViT-B/16 MAE step (batch 256)": 3013}  # images/s of one accelerator
SETS = {"500x375": ((500, 375), 90), "imagenet_bytes": ((880, 660), 90)}  # (w, h), quality
BY_CORES = {  # result key -> job, at one core and at all cores
    "tfds": "tfds:batched", "folder": "folder:batched", "mae": "mae", "decode_tf": "tfds:decode",
    "decode_pil": "decode_pil"}
STAGES = (  # cumulative pipelines at one core: (job, the stage it adds)
    ("tfds:read", "read the bytes"), ("tfds:decode", "decode (whole image)"),
    ("tfds:views_noflip", "crop and resize, two views (decoding the views' union only)"),
    ("tfds:views", "flip"), ("tfds:batched", "batching"), ("tfds:device", "copy to the device"))


def write_jpegs(folder: str, count: int, size: tuple[int, int], quality: int, copies: int) -> float:
    """`count` JPEGs of `size` (w, h) cut from scikit-learn's two photographs, each under
    `copies` names (hard links: an epoch outlasts the timing); returns their mean bytes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng, photos = np.random.default_rng(0), load_sample_images().images
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = rng.integers(200, photo.shape[0]), rng.integers(260, photo.shape[1])
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        image = Image.fromarray(photo[top:top + h, left:left + w]).resize(size, Image.BICUBIC)
        path = os.path.join(folder, f"{i:05d}.jpg")
        image.save(path, quality=quality)
        for copy in range(1, copies):
            os.link(path, os.path.join(folder, f"{i:05d}_{copy}.jpg"))
    return sum(os.path.getsize(f) for f in distinct_jpegs(folder)) / count


def distinct_jpegs(folder: str) -> list[str]:
    """The files `write_jpegs` wrote, without their copies."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if "_" not in f)


def _timed(iterator, count: int, per_item: int) -> float:
    """Items/s of `iterator` over `count` items after one warm-up item."""
    next(iterator)
    started = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count * per_item / (time.perf_counter() - started)


def _ours(kind: str, folder: str, threads: int, batch: int, batches: int, stage: str) -> float:
    """Examples/s of our pipeline up to `stage` (STAGES), from the folder or from memory."""
    import jax
    import tensorflow as tf

    from mvmae_jax import default_config, input_pipeline, sharding
    from mvmae_jax.data import augment, sources

    class BytesSource(sources.ImageFolderSource):
        """The folder's records with their bytes from memory, as `TfdsSource` yields them."""

        data = tf.constant([open(f, "rb").read() for f in distinct_jpegs(folder)])
        decode = staticmethod(augment.decode)

        def elements(self, *, seed, epoch, start=0):
            return tf.data.Dataset.from_tensor_slices({
                "index": self.epoch_order(seed, epoch)[start:].astype(np.int64),
                "position": np.arange(start, self.host_size) + epoch * self.host_size,
            }).map(lambda e: dict(e, encoded=tf.gather(self.data, e["index"] % len(self.data))))

    config = default_config.get_base_config()
    config.input.threads = threads
    source = (BytesSource if kind == "tfds" else sources.ImageFolderSource)(folder)
    if stage in ("batched", "device"):
        stream = input_pipeline.host_train_batches(config, source, batch)
        if stage == "device":
            mesh = sharding.make_mesh(jax.devices()[:1])
            stream = (jax.block_until_ready(input_pipeline.to_global(b, mesh)) for b in stream)
        return _timed(stream, batches, batch)

    def per_example(element):
        encoded = element["encoded"]
        if stage == "read":
            return tf.strings.length(encoded)
        if stage == "decode":
            return tf.shape(source.decode(encoded))
        return augment.make_views(
            encoded, tf.stack([element["index"], element["index"]]), size=config.img_size,
            num_views=2, same_crop=False, scale=tuple(config.input.crop_scale),
            ratio=tuple(config.input.crop_ratio), hflip=stage == "views")["views"]

    ds = source.elements(seed=0, epoch=0).repeat().map(
        per_example, num_parallel_calls=threads, deterministic=True)
    return _timed(iter(ds.with_options(input_pipeline._tf_options(threads))), batches * batch, 1)


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


def _quality(folder: str, size: int = 224) -> dict:
    """Mean |difference| (grey levels) of our views (full or DCT scale decode) to PIL's bicubic
    of the same box; and of TF's antialiased bicubic on its full decode (the decoders' share)."""
    import tensorflow as tf
    from PIL import Image

    from mvmae_jax.data import augment

    by_kind = {"full_scale": [], "dct_scaled": [], "tf_bicubic": []}
    for i, path in enumerate(distinct_jpegs(folder)):
        data, pil = open(path, "rb").read(), Image.open(path).convert("RGB")
        width, height = pil.size
        out = augment.make_views(tf.constant(data), tf.constant([i, 7], tf.int64), size=size,
                                 num_views=2, same_crop=False)
        pixel_boxes = out["boxes"].numpy() * [height, width, height, width]
        dct = min(pixel_boxes[:, 2:].min() // size, 8) >= 2
        decoded = None if dct else tf.io.decode_jpeg(data, channels=3)  # once per file
        for view, (top, left, h, w), flip in zip(out["views"].numpy(), pixel_boxes,
                                                 out["flips"].numpy(), strict=True):
            reference = np.asarray(pil.resize((size, size), Image.BICUBIC,
                                              box=(left, top, left + w, top + h)), np.float32)
            if not dct:  # both unflipped: a flip changes no mean difference
                y, x, hh, ww = (int(round(v)) for v in (top, left, h, w))
                tf_bicubic = tf.image.resize(decoded[y:y + hh, x:x + ww], (size, size),
                                             method="bicubic", antialias=True)
                by_kind["tf_bicubic"].append(float(np.abs(
                    np.clip(tf_bicubic.numpy().round(), 0, 255) - reference).mean()))
            by_kind["dct_scaled" if dct else "full_scale"].append(
                float(np.abs(view - (reference[:, ::-1] if flip else reference)).mean()))
    return {kind: {"views": len(v), "mean_abs_diff": float(np.mean(v)) if v else None,
                   "largest_view_mean_abs_diff": float(np.max(v)) if v else None}
            for kind, v in by_kind.items()}


def measure(jobs: list[str], folder: str, cores: int, batch: int, batches: int) -> list:
    """Each job in turn on one core or all (`cores` 0): its examples (or images) per second, or
    for "quality" the views' difference to MAE's filter."""
    if cores == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cores = len(os.sched_getaffinity(0))
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))

    def run(job: str):
        if job == "quality":
            return _quality(folder)
        if job == "mae":
            return _mae(files, 0 if cores == 1 else cores, batch, batches)
        if job == "decode_pil":
            from PIL import Image
            images = (np.asarray(Image.open(files[i % len(files)]).convert("RGB"))
                      for i in range(batch * batches + 1))
            return _timed(images, batch * batches, 1)
        kind, _, stage = job.partition(":")
        return _ours(kind, folder, cores, batch, batches, stage)

    return [run(job) for job in jobs]


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
    count, batch, batches = (16, 8, 2) if args.tiny else (192, 32, 12)
    results = {"machine": {"cpu_cores": all_cores, "platform": platform.platform(),
                           "processor": platform.processor() or platform.machine()},
               "repeats": args.repeats, "sets": {}}
    with tempfile.TemporaryDirectory() as root:
        for set_name, (size, quality) in ({"500x375": ((100, 75), 90)} if args.tiny
                                          else SETS).items():
            folder = os.path.join(root, set_name)
            os.makedirs(folder)
            mean_bytes = write_jpegs(folder, count, size, quality, copies=4)
            core_counts = sorted({1, all_cores})
            jobs = [(job, cores) for cores in core_counts for job in BY_CORES.values()]
            jobs += [(job, 1) for job, _ in STAGES if (job, 1) not in jobs]
            groups = [(cores, [job for job, c in jobs if c == cores and (job == "mae") == torch])
                      for cores in core_counts for torch in (False, True)]  # a process each
            rounds = [{(job, cores): rate for cores, group in groups for job, rate in zip(
                group, in_own_process(group, folder, cores, batch, batches), strict=True)}
                for _ in range(args.repeats)]  # alternated: every job once per round
            rates = {key: [r[key] for r in rounds] for key in jobs}
            median = {job: statistics.median(r) for job, r in rates.items()}
            by_cores = {str(cores): {
                "examples_per_s": {key: median[job, cores] for key, job in BY_CORES.items()},
                "ratio_to_mae": {key: median[BY_CORES[key], cores] / median["mae", cores]
                                 for key in ("tfds", "folder")},
                "all_rounds": {job: rates[job, c] for job, c in jobs if c == cores}}
                for cores in core_counts}
            ms = [1000 / median[job, 1] for job, _ in STAGES]
            stages = [{"stage": what, "ms_per_example": now - before,
                       "cumulative_examples_per_s": median[job, 1]}
                      for (job, what), now, before in zip(STAGES, ms, [0.0, *ms[:-1]], strict=True)]
            results["sets"][set_name] = {
                "jpeg_size": list(size), "quality": quality, "mean_bytes": mean_bytes,
                "by_cores": by_cores, "stages_one_core": stages,
                "difference_to_mae_filter": in_own_process(["quality"], folder, 0, 0, 0)[0],
                "cores_per_accelerator": {
                    name: rate / median["tfds:batched", 1] for name, rate in STEP_RATES.items()}}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
