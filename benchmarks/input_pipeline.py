"""Two-view pretraining examples per second of the host input pipeline against MAE's recipe, on
the same JPEG files, at one core and at all cores (docs/benchmarks.md, "Input pipeline"): our
tfds and image-folder paths, MAE's Pillow + torchvision recipe, decoding alone, our stages at
one core, the cores one accelerator needs at `--step_rates`, and how far our views are from
MAE's filter. Each measurement is a process of its own; rounds alternate (medians).

  python benchmarks/input_pipeline.py --json=/tmp/input.json
  python benchmarks/input_pipeline.py --tiny --json=/tmp/input_tiny.json   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# The step rates measured so far: images/s of one accelerator (docs/benchmarks.md).
STEP_RATES = "H200 ViT-B/16 MAE step (batch 256)=3013"
SETS = {"500x375": ((500, 375), 90), "imagenet_bytes": ((880, 660), 90)}  # (w, h), quality


def write_jpegs(folder: str, count: int, size: tuple[int, int], quality: int,
                seed: int = 0, copies: int = 1) -> float:
    """`count` JPEGs of `size` (w, h) cut from scikit-learn's two photographs, each under
    `copies` names (hard links: an epoch outlasts the timing); returns their mean bytes."""
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
        image.save(path, quality=quality)
        total += os.path.getsize(path)
        for copy in range(1, copies):
            os.link(path, os.path.join(folder, f"{i:05d}_{copy}.jpg"))
    return total / count


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


class _BytesSource:
    """What `TfdsSource` yields (encoded bytes, label, index, position), from memory: a record
    per file of `folder`, each distinct file read once."""

    def __init__(self, folder):
        import tensorflow as tf

        from mvmae_jax.data import augment, sources

        self._data = tf.constant([open(f, "rb").read() for f in distinct_jpegs(folder)])
        self.host_size = self.num_examples = len(os.listdir(folder))
        self.bad_images = sources.BadImageLog()
        self.decode = augment.decode
        self._tf = tf

    def elements(self, *, seed, epoch, start=0):
        tf = self._tf
        order = np.random.default_rng([seed or 0, epoch]).permutation(self.host_size)[start:]
        ds = tf.data.Dataset.from_tensor_slices({
            "label": np.zeros(len(order), np.int64), "index": order.astype(np.int64),
            "position": np.arange(start, self.host_size, dtype=np.int64)
            + epoch * self.host_size})
        distinct = len(self._data)
        return ds.map(lambda e: dict(e, encoded=tf.gather(self._data, e["index"] % distinct)))

    def name_at(self, position, seed):
        return f"record {position}"


def _ours(kind: str, folder: str, threads: int, batch: int, batches: int, stage: str) -> float:
    import tensorflow as tf

    from mvmae_jax import input_pipeline, sharding
    from mvmae_jax.data import augment, sources
    from mvmae_jax.default_config import get_base_config

    tf.config.set_visible_devices([], "GPU")
    config = get_base_config()
    config.input.threads = threads
    source = sources.ImageFolderSource(folder) if kind == "folder" else _BytesSource(folder)
    if stage in ("batched", "device"):
        stream = input_pipeline.host_train_batches(config, source, batch)
        if stage == "device":
            import jax

            mesh = sharding.make_mesh(jax.devices()[:1])
            stream = (jax.block_until_ready(input_pipeline.to_global(b, mesh)) for b in stream)
        return _timed(stream, batches, batch)

    inp = config.input

    def per_example(element):
        encoded = element["encoded"]
        if stage == "read":
            return tf.strings.length(encoded)
        if stage == "decode":
            return tf.shape(source.decode(encoded))
        out = augment.make_views(encoded, tf.stack([element["index"], element["index"]]),
                                 size=config.img_size, num_views=2, same_crop=False,
                                 scale=tuple(inp.crop_scale), ratio=tuple(inp.crop_ratio),
                                 hflip=stage == "views")
        return out["views"]

    ds = source.elements(seed=0, epoch=0).repeat()
    ds = ds.map(per_example, num_parallel_calls=threads, deterministic=True)
    ds = ds.with_options(input_pipeline._tf_options(threads))
    return _timed(iter(ds), batches * batch, 1)


def _mae(folder: str, workers: int, batch: int, batches: int) -> float:
    import torch
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(1)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
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

    loader = torch.utils.data.DataLoader(TwoViews(), batch_size=batch, num_workers=workers,
                                         persistent_workers=workers > 0)
    return _timed(iter(loader), batches, batch)


def _decode_pil(folder: str, count: int) -> float:
    from PIL import Image

    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    items = (np.asarray(Image.open(files[i % len(files)]).convert("RGB")) for i in range(count + 1))
    return _timed(items, count, 1)


def _quality(folder: str, size: int = 224) -> dict:
    """Mean |difference| (grey levels) of our views, decoded at full or DCT scale, to PIL's
    bicubic resize of the same box of the PIL-decoded file; and of TensorFlow's antialiased
    bicubic over TensorFlow's full decode (the decoders' share)."""
    import tensorflow as tf
    from PIL import Image

    from mvmae_jax.data import augment

    by_kind = {"full_scale": [], "dct_scaled": [], "tf_bicubic": []}
    for i, path in enumerate(distinct_jpegs(folder)):
        data = open(path, "rb").read()
        pil = Image.open(path).convert("RGB")
        decoded = tf.io.decode_jpeg(data, channels=3)
        width, height = pil.size
        out = augment.make_views(tf.constant(data), tf.constant([i, 7], tf.int64), size=size,
                                 num_views=2, same_crop=False)
        pixel_boxes = out["boxes"].numpy() * [height, width, height, width]
        dct = min(pixel_boxes[:, 2:].min() // size, 8) >= 2
        for view, (top, left, h, w), flip in zip(out["views"].numpy(), pixel_boxes,
                                                 out["flips"].numpy(), strict=True):
            reference = np.asarray(pil.resize((size, size), Image.BICUBIC,
                                              box=(left, top, left + w, top + h)), np.float32)
            y, x, hh, ww = (int(round(v)) for v in (top, left, h, w))
            tf_bicubic = tf.image.resize(decoded[y:y + hh, x:x + ww], (size, size),
                                         method="bicubic", antialias=True).numpy().round()
            if flip:
                reference, tf_bicubic = reference[:, ::-1], tf_bicubic[:, ::-1]
            by_kind["dct_scaled" if dct else "full_scale"].append(
                float(np.abs(view - reference).mean()))
            if not dct:
                by_kind["tf_bicubic"].append(
                    float(np.abs(np.clip(tf_bicubic, 0, 255) - reference).mean()))
    return {kind: {"views": len(v), "mean_abs_diff": float(np.mean(v)) if v else None,
                   "largest_view_mean_abs_diff": float(np.max(v)) if v else None}
            for kind, v in by_kind.items()}


def worker(args) -> None:
    if args.cores == 1:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cores = len(os.sched_getaffinity(0))
    if args.worker == "quality":
        print(json.dumps({"rate": 0.0, "quality": _quality(args.folder)}))
        return
    if args.worker == "mae":
        rate = _mae(args.folder, 0 if cores == 1 else cores, args.batch, args.batches)
    elif args.worker == "decode_pil":
        rate = _decode_pil(args.folder, args.batch * args.batches)
    else:
        kind, _, stage = args.worker.partition(":")
        rate = _ours(kind, args.folder, cores, args.batch, args.batches, stage or "batched")
    print(json.dumps({"rate": rate}))


def run_worker(name: str, folder: str, cores: int = 0, batch: int = 0, batches: int = 0) -> dict:
    command = [sys.executable, __file__, f"--worker={name}", f"--folder={folder}",
               f"--cores={cores}", f"--batch={batch}", f"--batches={batches}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


STAGES = (  # cumulative pipelines at one core: (worker, stage that it adds)
    ("tfds:read", "read the bytes"),
    ("tfds:decode", "decode (whole image)"),
    ("tfds:views_noflip", "crop and resize, two views (decoding the views' union only)"),
    ("tfds:views", "flip"),
    ("tfds:batched", "batching"),
    ("tfds:device", "copy to the device"),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--tiny", action="store_true", help="small sizes, for the smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds (medians)")
    parser.add_argument("--step_rates", default=STEP_RATES,
                        help="name=images/s of one accelerator, comma-separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    all_cores = len(os.sched_getaffinity(0))
    count, batch, batches = (16, 8, 2) if args.tiny else (192, 32, 12)
    sets = {"500x375": ((100, 75), 90)} if args.tiny else SETS
    results = {"machine": {"cpu_cores": all_cores, "platform": platform.platform(),
                           "processor": platform.processor() or platform.machine()},
               "repeats": args.repeats, "sets": {}}
    with tempfile.TemporaryDirectory() as root:
        for set_name, (size, quality) in sets.items():
            folder = os.path.join(root, set_name)
            os.makedirs(folder)
            mean_bytes = write_jpegs(folder, count, size, quality, copies=4)
            jobs = [(name, cores) for cores in sorted({1, all_cores})
                    for name in ("tfds", "folder", "mae", "tfds:decode", "decode_pil")]
            jobs += [(name, 1) for name, _ in STAGES if name != "tfds:decode"]
            rates = {job: [] for job in jobs}
            for _ in range(args.repeats):
                for job in jobs:  # alternated: every job once per round
                    rates[job].append(run_worker(job[0], folder, job[1], batch, batches)["rate"])
            median = {job: statistics.median(r) for job, r in rates.items()}
            by_cores = {str(cores): {
                "examples_per_s": {key: median[(name, cores)] for key, name in (
                    ("tfds", "tfds"), ("folder", "folder"), ("mae", "mae"),
                    ("decode_tf", "tfds:decode"), ("decode_pil", "decode_pil"))},
                "ratio_to_mae": {name: median[(name, cores)] / median[("mae", cores)]
                                 for name in ("tfds", "folder")},
                "all_rounds": {name: rates[(name, c)] for name, c in jobs if c == cores}}
                for cores in sorted({1, all_cores})}
            stages, previous = [], 0.0
            for name, what in STAGES:
                ms = 1000 / median[(name, 1)]
                stages.append({"stage": what, "ms_per_example": ms - previous,
                               "cumulative_examples_per_s": median[(name, 1)]})
                previous = ms
            per_core = median[("tfds", 1)]
            results["sets"][set_name] = {
                "jpeg_size": list(size), "quality": quality, "mean_bytes": mean_bytes,
                "by_cores": by_cores, "stages_one_core": stages,
                "difference_to_mae_filter": run_worker("quality", folder)["quality"],
                "cores_per_accelerator": {
                    name: float(rate) / per_core for name, rate in
                    (item.split("=") for item in args.step_rates.split(","))}}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
