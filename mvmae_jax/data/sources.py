"""Where examples come from: a tfds data set prepared in `data_dir`, or a folder of images.

A source yields, for one host, a deterministic stream of undecoded elements
  {"encoded": bytes or file path, "label": int64, "index": int64 (stable over the whole split),
   "position": int64 (the element's place in this host's stream)}
and knows how to decode them. Each host reads a disjoint part of the split; the union of the
parts is the split. The training stream visits the host's part once per epoch in an order
that depends only on (seed, epoch), so that a run can restart at any position.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow.python.util import deprecation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
BUNDLED_TFDS = ("digits",)  # Builders inside the package, prepared on first use.


class DataError(ValueError):
    """The data set cannot be read as configured; the message says what to do."""


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class BadImageLog:
    """Counts and names the image files that could not be decoded (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.names: list[str] = []

    def report(self, name: str, error: Exception) -> None:
        with self._lock:
            self.names.append(name)
            count = len(self.names)
        logging.warning("Skipping undecodable image %s (%s: %s); %d skipped so far.", name,
                        type(error).__name__, error, count)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.names)


class ImageFolderSource:
    """A folder of images: one sub-folder per class (labels), or a flat folder (label -1).

    Files ending in .jpg/.jpeg/.png/.bmp/.gif/.webp (any case) count; they are decoded with
    Pillow in any colour mode and converted to RGB. Undecodable files are skipped and logged.
    The example index is the file's place in the sorted list of relative paths.
    """

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

    def elements(self, *, seed: int | None, epoch: int, start: int = 0) -> tf.data.Dataset:
        """This host's elements from `start` on; shuffled by (seed, epoch) unless seed is None."""
        order = self.host_indices
        if seed is not None:
            order = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(order)
        positions = np.arange(len(order), dtype=np.int64) + epoch * self.host_size
        return tf.data.Dataset.from_tensor_slices({
            "encoded": self.files[order[start:]],
            "label": self.labels[order[start:]],
            "index": order[start:].astype(np.int64),
            "position": positions[start:],
        })

    def decode(self, element: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """(uint8 RGB image (H, W, 3), whether decoding worked)."""
        image, ok = tf.numpy_function(self._decode_file, [element["encoded"]],
                                      (tf.uint8, tf.bool), stateful=False)
        image.set_shape([None, None, 3])
        ok.set_shape([])
        return image, ok

    def count_readable(self, needed: int) -> int:
        """How many of this host's files decode, counting up to `needed` (reads no further)."""
        from concurrent.futures import ThreadPoolExecutor

        readable, start = 0, 0
        names = [str(name) for name in self.files[self.host_indices]]
        with ThreadPoolExecutor(8) as pool:
            while readable < needed and start < len(names):
                chunk = names[start:start + needed - readable]
                start += len(chunk)
                readable += sum(pool.map(_readable, chunk))
        return readable

    def _decode_file(self, path: bytes):
        name = np.asarray(path).item().decode()
        try:
            return _read_rgb(name), np.bool_(True)
        except Exception as error:  # noqa: BLE001 — any unreadable file is skipped, not fatal
            self.bad_images.report(name, error)
            return np.zeros((1, 1, 3), np.uint8), np.bool_(False)


def _read_rgb(name: str) -> np.ndarray:
    from PIL import Image

    with tf.io.gfile.GFile(name, "rb") as f, Image.open(f) as img:
        # Animated GIF/WebP: the first frame. Palette, greyscale, CMYK, alpha → RGB.
        img.seek(0)
        rgb = np.asarray(img.convert("RGB"), np.uint8)
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"decoded to shape {rgb.shape}")
    return rgb


def _readable(name: str) -> bool:
    try:
        _read_rgb(name)
        return True
    except Exception:  # noqa: BLE001 — counted, and named later by the stream that skips it
        return False


def batch_size_advice(available: int, process_count: int, batch_multiple: int) -> str:
    """What to do when `available` examples per host do not fill a batch: set the largest
    --config.batch_size that they fill and that is a multiple of `batch_multiple` (the device
    count, times the microbatches), or add data when there are too few for any."""
    largest = available * process_count // batch_multiple * batch_multiple
    if largest < 1:
        per_host = " per host" if process_count > 1 else ""
        return (f"add data (the smallest batch, {batch_multiple}, needs "
                f"{-(-batch_multiple // process_count)} examples{per_host})")
    which = f"multiple of {batch_multiple} " if batch_multiple > 1 else ""
    return f"set --config.batch_size={largest} (the largest {which}they fill) or add data"


def check_fills_batch(source, local_batch: int, process_count: int | None = None,
                      batch_multiple: int | None = None) -> None:
    """DataError unless this host's part of `source` holds one batch of readable examples; the
    message counts the readable ones and names the --config.batch_size they fill (a multiple
    of `batch_multiple`, by default the device count)."""
    readable = (source.count_readable(local_batch) if hasattr(source, "count_readable")
                else source.host_size)
    if readable >= local_batch:
        return
    if process_count is None or batch_multiple is None:
        import jax

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
    def images_in(folder):
        found = []
        for root, _, names in tf.io.gfile.walk(folder):
            found += [os.path.join(root, n) for n in names
                      if n.lower().endswith(IMAGE_EXTENSIONS)]
        return sorted(found)

    class_names = sorted(
        d.rstrip("/") for d in tf.io.gfile.listdir(path)
        if tf.io.gfile.isdir(os.path.join(path, d)))
    if not class_names:
        files = images_in(path)
        return files, [-1] * len(files), []
    files, labels = [], []
    for label, name in enumerate(class_names):
        in_class = images_in(os.path.join(path, name))
        files += in_class
        labels += [label] * len(in_class)
    return files, labels, class_names


class _NotYetPrepared(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def _quiet_first_preparation(name: str):
    """For the bundled data sets (prepared offline, in seconds, announced in one line): tfds's
    download notices, progress bars and "no dataset_info.json yet" warning are for downloads
    of real data sets and would be the newcomer's first screen."""
    if name not in BUNDLED_TFDS:
        yield
        return
    quiet = _NotYetPrepared()
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
    """A tfds data set prepared in `data_dir` (local or gs://), read with tf.data.

    The example index is the record's place in the split, from its tfds id (file shard and
    offset) and the shard lengths recorded by tfds.
    """

    def __init__(self, name: str, data_dir: str | None, split: str, process_index: int = 0,
                 process_count: int = 1, shuffle_buffer: int = 10_000):
        self.name = name
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        if name in BUNDLED_TFDS:
            from mvmae_jax.data import digits  # noqa: F401 — registers the builder

        try:
            with _quiet_first_preparation(name):
                self.builder = tfds.builder(name, data_dir=data_dir or None)
        except Exception as error:
            raise DataError(f"unknown tfds data set {name!r} ({error}); set "
                            "--config.dataset.name to a tfds builder, 'imagefolder' or "
                            "'digits'") from error
        with _quiet_first_preparation(name):
            prepared = self.builder.is_prepared()
        if not prepared:
            if name in BUNDLED_TFDS:
                logging.info("Preparing the bundled %r data set in %s.", name,
                             self.builder.data_dir)
                try:
                    with _quiet_first_preparation(name):
                        self.builder.download_and_prepare()
                except FileExistsError:
                    # Another process of a multi-process run prepared it at the same time.
                    self.builder = tfds.builder(name, data_dir=data_dir or None)
            else:
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
        """This host's elements from `start` on; shuffled by (seed, epoch) unless seed is None.

        Restarting inside an epoch replays its deterministic file and buffer shuffle and skips
        `start` records before any decoding.
        """
        shuffle = seed is not None
        epoch_seed = _epoch_seed(seed, epoch) if shuffle else None
        options = tf.data.Options()
        options.deterministic = True
        read_config = tfds.ReadConfig(
            options=options, add_tfds_id=True, shuffle_seed=epoch_seed, try_autocache=False,
            shuffle_reshuffle_each_iteration=False)
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
        return {"encoded": example["image"], "label": label, "index": index,
                "position": position}

    def decode(self, element: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(element["encoded"], channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return image, tf.constant(True)


def make_source(dataset_config, split: str | None = None, path: str | None = None,
                process_index: int = 0, process_count: int = 1,
                shuffle_buffer: int = 10_000):
    """The source of `dataset_config` (name, path, data_dir, split), for one host."""
    if dataset_config.name == "imagefolder":
        return ImageFolderSource(path if path is not None else dataset_config.path,
                                 process_index, process_count)
    return TfdsSource(dataset_config.name, dataset_config.get("data_dir"),
                      split or dataset_config.split, process_index, process_count,
                      shuffle_buffer)
