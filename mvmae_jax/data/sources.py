"""Where examples come from: a tfds data set or a folder of images, each host reading a disjoint
part in an order that depends only on (seed, epoch)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Protocol, runtime_checkable

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow.python.util import deprecation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
BUNDLED_TFDS = ("digits",)  # Builders inside the package, prepared on first use.


class DataError(ValueError):
    """The data set cannot be read as configured; the message says what to do."""


@runtime_checkable
class Source(Protocol):
    """One split of a data set, as one host reads it."""

    num_examples: int  # in the whole split
    num_classes: int | None  # None without labels
    host_size: int  # examples in this host's part
    bad_images: BadImageLog

    def elements(self, *, seed: int | None, epoch: int, start: int = 0) -> tf.data.Dataset:
        """This host's elements from stream position `start` on, shuffled by (seed, epoch)
        unless seed is None: dicts of `encoded` (bytes), `label` (-1 without), `index`
        (stable over the split) and `position` (epoch * host_size + place in the epoch)."""

    def decode(self, encoded: tf.Tensor) -> tf.Tensor:
        """Encoded bytes → uint8 (H, W, 3); an error for an undecodable image."""

    def name_at(self, position: int, seed: int | None) -> str:
        """A name for the element at a stream position, for the bad-image log."""


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class BadImageLog:
    """Counts and names the images that could not be read or decoded."""

    def __init__(self):
        self.names: list[str] = []  # appended to from several threads: atomic in CPython

    def report(self, name: str) -> None:
        self.names.append(name)
        logging.warning("Skipping undecodable image %s; %d skipped so far.", name, self.count)

    @property
    def count(self) -> int:
        return len(self.names)


def _decoded_by_tensorflow(encoded: tf.Tensor) -> tf.Tensor:
    """Whether TensorFlow's decoders read these bytes: JPEG, PNG, GIF, WebP, 24/32-bit BMP."""
    def starts_with(magic: bytes, offset: int = 0) -> tf.Tensor:
        return tf.equal(tf.strings.substr(encoded, offset, len(magic)), magic)

    bmp_bits = tf.strings.substr(encoded, 28, 1)
    return (tf.io.is_jpeg(encoded) | starts_with(b"\x89PNG") | starts_with(b"GIF8")
            | (starts_with(b"RIFF") & starts_with(b"WEBP", 8))
            | (starts_with(b"BM") & ((bmp_bits == b"\x18") | (bmp_bits == b"\x20"))))


def _pillow_rgb(encoded: bytes) -> tuple[np.ndarray, np.bool_]:
    """(uint8 RGB image, True), or a 1x1 placeholder and False where Pillow cannot read it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded)) as img:
            img.seek(0)  # animated images: the first frame
            rgb = np.asarray(img.convert("RGB"), np.uint8)
        if rgb.ndim == 3 and min(rgb.shape[:2]) >= 1:
            return rgb, np.bool_(True)
    except Exception:  # noqa: BLE001 — an unreadable file is skipped and named, not fatal
        pass
    return np.zeros((1, 1, 3), np.uint8), np.bool_(False)


def decode_any(encoded: tf.Tensor) -> tf.Tensor:
    """Image bytes → uint8 RGB (H, W, 3): TensorFlow's decoders where they apply, else Pillow;
    InvalidArgumentError for an undecodable image."""
    def with_pillow():
        image, ok = tf.numpy_function(_pillow_rgb, [encoded], (tf.uint8, tf.bool), stateful=False)
        with tf.control_dependencies([tf.debugging.assert_equal(ok, True, "undecodable")]):
            return tf.identity(image)

    def with_tensorflow():
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    image = tf.cond(_decoded_by_tensorflow(encoded), with_tensorflow, with_pillow)
    image.set_shape([None, None, 3])
    return image


class ImageFolderSource:
    """A folder of images (IMAGE_EXTENSIONS, any case): one sub-folder per class, or flat
    (label -1). The example index is the file's place in the sorted list of paths."""

    def __init__(self, path: str, process_index: int = 0, process_count: int = 1):
        if not path:
            raise DataError("dataset.path is empty; set --config.dataset.path=/path/to/images")
        if not tf.io.gfile.isdir(path):
            raise DataError(f"image folder {path!r} does not exist or is not a directory; "
                            "set --config.dataset.path to a folder of images")
        self.path = path
        files, labels, self.class_names = _scan_image_folder(path)
        if not files:
            raise DataError(f"no images found in {path!r} (looked for "
                            f"{', '.join(IMAGE_EXTENSIONS)} in it and its sub-folders)")
        self.files = np.asarray(files)
        self.labels = np.asarray(labels, np.int64)
        self.num_examples = len(files)
        self.num_classes = len(self.class_names) or None
        self.host_indices = np.array_split(np.arange(self.num_examples),
                                           process_count)[process_index]
        self.bad_images = BadImageLog()

    @property
    def host_size(self) -> int:
        return len(self.host_indices)

    def epoch_order(self, seed: int | None, epoch: int) -> np.ndarray:
        """This host's example indices in the order `epoch` reads them (seed None: sorted)."""
        if seed is None:
            return self.host_indices
        return np.random.default_rng(_epoch_seed(seed, epoch)).permutation(self.host_indices)

    def elements(self, *, seed: int | None, epoch: int, start: int = 0) -> tf.data.Dataset:
        order = self.epoch_order(seed, epoch)
        positions = np.arange(len(order), dtype=np.int64) + epoch * self.host_size
        ds = tf.data.Dataset.from_tensor_slices({
            "encoded": self.files[order[start:]],
            "label": self.labels[order[start:]],
            "index": order[start:].astype(np.int64),
            "position": positions[start:],
        })
        return ds.map(lambda e: dict(e, encoded=tf.io.read_file(e["encoded"])),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def name_at(self, position: int, seed: int | None) -> str:
        epoch, offset = divmod(int(position), self.host_size)
        return str(self.files[self.epoch_order(seed, epoch)[offset]])

    decode = staticmethod(decode_any)

    def count_readable(self, needed: int) -> int:
        """How many of this host's files decode, counting up to `needed` (reads no further)."""
        ds = tf.data.Dataset.from_tensor_slices(self.files[self.host_indices])
        ds = ds.map(lambda name: tf.shape(decode_any(tf.io.read_file(name)))[0],
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return sum(1 for _ in ds.ignore_errors().take(needed))


def batch_size_advice(available: int, process_count: int, batch_multiple: int) -> str:
    """What to do when `available` examples per host do not fill a batch: the largest
    --config.batch_size they fill that is a multiple of `batch_multiple`, or more data."""
    largest = available * process_count // batch_multiple * batch_multiple
    if largest < 1:
        per_host = " per host" if process_count > 1 else ""
        return (f"add data (the smallest batch, {batch_multiple}, needs "
                f"{-(-batch_multiple // process_count)} examples{per_host})")
    which = f"multiple of {batch_multiple} " if batch_multiple > 1 else ""
    return f"set --config.batch_size={largest} (the largest {which}they fill) or add data"


def check_fills_batch(source, local_batch: int, process_count: int | None = None,
                      batch_multiple: int | None = None) -> None:
    """DataError unless this host's part of `source` holds one batch of readable examples, naming
    the --config.batch_size they fill (a multiple of `batch_multiple`, default the device count)."""
    readable = (source.count_readable(local_batch) if hasattr(source, "count_readable")
                else source.host_size)
    if readable >= local_batch:
        return
    process_count = jax.process_count() if process_count is None else process_count
    batch_multiple = jax.device_count() if batch_multiple is None else batch_multiple
    here = " on this host" if process_count > 1 else ""
    batch = f"one {'host ' if process_count > 1 else ''}batch of {local_batch}"
    if not hasattr(source, "path"):
        found = f"the training data has {readable} examples{here}, fewer than {batch}"
    elif readable < source.host_size:
        found = (f"only {readable} of the {source.host_size} image files{here} in "
                 f"{source.path!r} can be decoded, fewer than {batch}")
    else:
        found = f"the {readable} images{here} in {source.path!r} are fewer than {batch}"
    raise DataError(f"{found}; {batch_size_advice(readable, process_count, batch_multiple)}")


def _scan_image_folder(path: str) -> tuple[list[str], list[int], list[str]]:
    """(sorted files, their labels, class names): one class per sub-folder, or none (-1)."""
    class_names = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                         if tf.io.gfile.isdir(os.path.join(path, d)))
    files, labels = [], []
    for label, folder in enumerate([os.path.join(path, n) for n in class_names] or [path]):
        found = sorted(os.path.join(root, n) for root, _, names in tf.io.gfile.walk(folder)
                       for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        files += found
        labels += [label if class_names else -1] * len(found)
    return files, labels, class_names


@contextlib.contextmanager
def _quiet_first_preparation(name: str):
    """Silences tfds's download notices, progress bars and "no dataset_info.json" warning
    while a bundled data set is prepared (offline, in seconds)."""
    if name not in BUNDLED_TFDS:
        yield
        return
    def quiet(record: logging.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(True)
        absl_logger.removeFilter(quiet)


class TfdsSource:
    """A tfds data set prepared in `data_dir` (local or gs://). The example index is the
    record's place in the split, from its tfds id and the shard lengths."""

    def __init__(self, name: str, data_dir: str | None, split: str, process_index: int = 0,
                 process_count: int = 1, shuffle_buffer: int = 10_000):
        self.name = name
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        self.bad_images = BadImageLog()
        if name in BUNDLED_TFDS:
            from mvmae_jax.data import digits  # noqa: F401 — registers the builder

        with _quiet_first_preparation(name):
            try:
                self.builder = tfds.builder(name, data_dir=data_dir or None)
            except Exception as error:
                raise DataError(f"unknown tfds data set {name!r} ({error}); set "
                                "--config.dataset.name to a tfds builder, 'imagefolder' or "
                                "'digits'") from error
            if name in BUNDLED_TFDS and not self.builder.is_prepared():
                logging.info("Preparing the bundled %r data set in %s.", name,
                             self.builder.data_dir)
                try:
                    self.builder.download_and_prepare()
                except FileExistsError:
                    # Another process of a multi-process run prepared it at the same time.
                    self.builder = tfds.builder(name, data_dir=data_dir or None)
            elif not self.builder.is_prepared():
                where = data_dir or "~/tensorflow_datasets"
                raise DataError(
                    f"tfds data set {name!r} is not prepared in {where!r}. Prepare it once, e.g. "
                    f"`tfds build {name} --data_dir={where}` (for imagenet2012 also "
                    "--manual_dir=DIR holding ILSVRC2012_img_train.tar and "
                    "ILSVRC2012_img_val.tar), or set --config.dataset.data_dir to where it is.")
        splits = self.builder.info.splits
        if split not in splits:
            raise DataError(f"tfds data set {name!r} has no split {split!r}; it has "
                            f"{sorted(splits.keys())}")
        self.host_split = tfds.split_for_jax_process(
            split, process_index=process_index, process_count=process_count)
        self.num_examples = splits[split].num_examples
        self.host_size = splits[self.host_split].num_examples
        features = self.builder.info.features
        self.num_classes = getattr(features["label"], "num_classes", None) if (
            "label" in features) else None
        info = splits[split]
        offsets = np.concatenate([[0], np.cumsum(info.shard_lengths)[:-1]]).astype(np.int64)
        self._shard_offsets = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant([os.path.basename(f) for f in info.filenames]),
                tf.constant(offsets)), default_value=-1)

    def elements(self, *, seed: int | None, epoch: int, start: int = 0) -> tf.data.Dataset:
        # Restarting inside an epoch replays its file and buffer shuffle, then skips `start`
        # records before any decoding.
        shuffle = seed is not None
        epoch_seed = _epoch_seed(seed, epoch) if shuffle else None
        options = tf.data.Options()
        options.deterministic = True
        read_config = tfds.ReadConfig(options=options, add_tfds_id=True, shuffle_seed=epoch_seed,
                                      try_autocache=False, shuffle_reshuffle_each_iteration=False)
        # tfds reads through a deprecated tf.data op; the warning is tfds's to act on.
        with deprecation.silence():
            ds = self.builder.as_dataset(
                split=self.host_split, shuffle_files=shuffle, read_config=read_config,
                decoders={"image": tfds.decode.SkipDecoding()})
        if shuffle:
            ds = ds.shuffle(self.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        first = epoch * self.host_size
        ds = ds.enumerate(start=first).skip(start)
        return ds.map(self._element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _element(self, position, example):
        parts = tf.strings.split(example["tfds_id"], "__", maxsplit=1)
        file_name, offset = parts[0], parts[1]
        index = self._shard_offsets.lookup(file_name) + tf.strings.to_number(offset, tf.int64)
        label = tf.cast(example["label"], tf.int64) if "label" in example else tf.constant(
            -1, tf.int64)
        return {"encoded": example["image"], "label": label, "index": index, "position": position}

    decode = staticmethod(decode_any)

    def name_at(self, position: int, seed: int | None) -> str:
        del seed  # tfds records have no file name
        return f"{self.name}/{self.host_split} record at stream position {int(position)}"


def make_source(dataset_config, split: str | None = None, path: str | None = None,
                process_index: int = 0, process_count: int = 1,
                shuffle_buffer: int = 10_000) -> Source:
    """The source of `dataset_config` (name, path, data_dir, split), for one host."""
    if dataset_config.name == "imagefolder":
        return ImageFolderSource(path if path is not None else dataset_config.path,
                                 process_index, process_count)
    return TfdsSource(dataset_config.name, dataset_config.get("data_dir"),
                      split or dataset_config.split, process_index, process_count, shuffle_buffer)
