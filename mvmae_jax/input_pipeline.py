"""Per-host tf.data streams of a `sources.Source` as global `jax.Array`s: `train_batches`
resumable at any stream position, and `EvalBatches`."""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh

from mvmae_jax import sharding
from mvmae_jax.data import augment, randaugment, sources

AUTOTUNE = tf.data.AUTOTUNE


def make_source(config: ml_collections.ConfigDict, *, train: bool = True) -> sources.Source:
    """This host's part of the config's training (or evaluation) split."""
    dataset = config.dataset
    split = dataset.split if train else dataset.eval_split
    path = dataset.path if train else (dataset.eval_path or dataset.path)
    return sources.make_source(dataset, split=split, path=path,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(),
                               shuffle_buffer=config.input.shuffle_buffer)


def _tf_options(threads: int = 0) -> tf.data.Options:
    """Deterministic, autotuned; `threads` > 0 caps the pipeline's thread pool."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    # Parallelism comes from the parallel maps, one element per thread.
    options.threading.max_intra_op_parallelism = 1
    if threads > 0:
        options.threading.private_threadpool_size = threads
    return options


class TrainBatch(dict):
    """A host-local batch of numpy arrays; `next_position` resumes the stream after it."""

    next_position: int


def _example_seed(config: ml_collections.ConfigDict, epoch, index: tf.Tensor) -> tf.Tensor:
    # Per-example seed: (run seed, epoch) and the example's index, nothing order-dependent.
    return tf.stack([config.seed * 1_000_003 + tf.cast(epoch, tf.int64), index])


class _SkipReport:
    """Names the elements a stream dropped as unreadable: the gaps in its positions."""

    def __init__(self, source, seed: int | None, first_position: int):
        self._source, self._seed, self._expected = source, seed, first_position
        self.count = 0

    def seen(self, positions: np.ndarray, stop: int | None = None) -> None:
        """The ascending positions that came through; `stop`: all before it were due."""
        stop = int(positions[-1]) + 1 if stop is None else stop
        for position in np.setdiff1d(np.arange(self._expected, stop), positions):
            self._source.bad_images.report(self._source.name_at(position, self._seed))
            self.count += 1
        self._expected = stop


def _epoch_stream(config: ml_collections.ConfigDict, source, local_batch: int,
                  start_position: int, preprocess) -> Iterator[TrainBatch]:
    """Batches of `preprocess(element, epoch)`, epoch after epoch, from a stream position."""
    epoch, start = divmod(int(start_position), source.host_size)

    # One traced graph for all epochs (the epoch is a tensor): tf.data would otherwise trace
    # the augmentations again at every epoch, which takes seconds with RandAugment.
    @tf.function(reduce_retracing=True)
    def with_position(element, epoch):
        return dict(preprocess(element, epoch), position=element["position"])

    while True:
        yielded = False
        skipped = _SkipReport(source, config.seed, epoch * source.host_size + start)
        ds = source.elements(seed=config.seed, epoch=epoch, start=start)
        ds = ds.map(functools.partial(with_position, epoch=tf.constant(epoch, tf.int64)),
                    num_parallel_calls=AUTOTUNE, deterministic=True)
        # The last, partial batch comes through too: its positions tell which images were
        # skipped at the epoch's end; it is not yielded.
        ds = ds.ignore_errors().batch(local_batch).prefetch(AUTOTUNE)
        ds = ds.with_options(_tf_options(config.input.threads))
        for batch in ds.as_numpy_iterator():
            positions = batch.pop("position")
            skipped.seen(positions)
            if len(positions) < local_batch:
                continue
            out = TrainBatch(batch)
            out.next_position = int(positions[-1]) + 1
            yielded = True
            yield out
        skipped.seen(np.zeros(0, np.int64), stop=(epoch + 1) * source.host_size)
        if not yielded and start == 0:
            # Otherwise the next epochs would fail the same way, forever.
            raise sources.DataError(
                f"a whole epoch of the training data gave no batch: {source.host_size} examples "
                f"on this host, {skipped.count} of them unreadable, {local_batch} needed per "
                "host batch")
        epoch += 1
        start = 0


def host_train_batches(config: ml_collections.ConfigDict, source, local_batch: int,
                       start_position: int = 0) -> Iterator[TrainBatch]:
    """This host's pretraining batches (numpy), forever, from a stream position: uint8 `views`
    (b, V, H, W, 3), their `boxes` and `flips`, and each example's `index`."""
    inp = config.input

    def preprocess(element, epoch):
        out = augment.make_views(
            element["encoded"], _example_seed(config, epoch, element["index"]),
            size=config.img_size, num_views=config.views.num, same_crop=config.views.same_crop,
            scale=tuple(inp.crop_scale), ratio=tuple(inp.crop_ratio), hflip=inp.hflip,
            decode_fn=source.decode)
        return dict(out, index=tf.cast(element["index"], tf.int32))

    return _epoch_stream(config, source, local_batch, start_position, preprocess)


def host_classify_batches(config: ml_collections.ConfigDict, source, local_batch: int,
                          start_position: int = 0) -> Iterator[TrainBatch]:
    """This host's labelled training batches, forever: random resized crop and flip,
    RandAugment, normalisation and random erasing, as `config.augment` asks."""
    aug = config.augment
    inp = config.input

    def preprocess(element, epoch):
        crop_seed, rand_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(
            _example_seed(config, epoch, element["index"]), 3))
        image = augment.make_views(
            element["encoded"], crop_seed, size=config.img_size, num_views=1, same_crop=False,
            scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio), hflip=aug.hflip,
            decode_fn=source.decode)["views"][0]
        if aug.randaugment_layers > 0:
            # Geometric ops fill with the mean colour, as timm's transform does for MAE.
            image = randaugment.rand_augment(
                image, rand_seed, num_layers=aug.randaugment_layers,
                magnitude=aug.randaugment_magnitude, magnitude_std=aug.randaugment_std,
                fill=tuple(round(255 * m) for m in inp.mean))
        image = augment.normalise(image, inp.mean, inp.std)
        if aug.random_erasing > 0:
            image = randaugment.random_erasing(image, erase_seed, probability=aug.random_erasing)
        return {"image": image, "label": tf.cast(element["label"], tf.int32)}

    return _epoch_stream(config, source, local_batch, start_position, preprocess)


def num_eval_batches(num_examples: int, local_batch: int, process_count: int) -> int:
    """Batches per host that cover the largest host part (parts differ by at most one)."""
    largest_part = -(-num_examples // process_count)
    return -(-largest_part // local_batch)


def host_eval_batches(config: ml_collections.ConfigDict, source, local_batch: int,
                      process_count: int, mode: str = "eval",
                      max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This host's evaluation (`eval`) or bank-refresh (`bank`) batches, padded, in order:
    uint8 `image`, `label`, `index` and `valid` (False, label and index -1 on padding rows);
    `max_batches` > 0 stops after that many (the same number on every host)."""
    size = config.img_size

    def preprocess(element):
        image = source.decode(element["encoded"])
        if mode == "eval":
            image = augment.centre_crop(image, size, config.input.eval_crop_fraction)
        else:
            image = augment.whole_image(image, size)
        return {"image": image, "label": tf.cast(element["label"], tf.int32),
                "index": tf.cast(element["index"], tf.int32), "valid": tf.constant(True),
                "position": element["position"]}

    padding = {"image": tf.zeros((size, size, 3), tf.uint8), "label": tf.constant(-1),
               "index": tf.constant(-1), "valid": tf.constant(False),
               "position": tf.constant(-1, tf.int64)}
    ds = source.elements(seed=None, epoch=0)
    ds = ds.map(preprocess, num_parallel_calls=AUTOTUNE, deterministic=True).ignore_errors()
    num_batches = num_eval_batches(source.num_examples, local_batch, process_count)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    pad = tf.data.Dataset.from_tensors(padding).repeat(num_batches * local_batch)
    ds = ds.concatenate(pad).batch(local_batch, drop_remainder=True).take(num_batches)
    skipped = _SkipReport(source, None, 0)
    for batch in ds.prefetch(AUTOTUNE).with_options(
            _tf_options(config.input.threads)).as_numpy_iterator():
        valid = batch["valid"]
        # Padding means the data ran out: every position was due.
        skipped.seen(batch.pop("position")[valid], None if valid.all() else source.host_size)
        yield batch


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local batch → global arrays split over the mesh along the batch."""
    target = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(target, np.asarray(v))
            for k, v in batch.items()}


class InputStopped(Exception):
    """The prefetcher's `should_stop` became true while waiting for a batch."""


class Prefetcher:
    """Runs a host iterator in a thread, `depth` global batches ahead; yields (global batch,
    `extra_fn(host batch)`), and raises InputStopped while waiting once `should_stop()`."""

    def __init__(self, host_iterator: Iterator, mesh: Mesh, depth: int = 2,
                 extra_fn=lambda batch: None, should_stop: Callable[[], bool] | None = None):
        self._should_stop = should_stop
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._mesh = mesh
        self._extra_fn = extra_fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(host_iterator,), daemon=True)
        self._thread.start()

    def _fill(self, host_iterator):
        try:
            for batch in host_iterator:
                if not self._put((to_global(batch, self._mesh), self._extra_fn(batch))):
                    return
            end = StopIteration()
        except BaseException as error:  # noqa: BLE001 — re-raised in the consumer thread
            end = error
        finally:
            if hasattr(host_iterator, "close"):
                host_iterator.close()  # tears tf.data down in this thread
        self._put(end)

    def _put(self, item) -> bool:
        """Blocks until the item is queued (True) or the prefetcher is closed (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, jax.Array], Any]:
        started, warn_after = time.monotonic(), 60.0
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._should_stop is not None and self._should_stop():
                    raise InputStopped("stopped while waiting for an input batch") from None
                waited = time.monotonic() - started
                if waited > warn_after:
                    logging.warning("Waiting %.0f s for an input batch.", waited)
                    warn_after *= 2
        if isinstance(item, BaseException):  # the end of the stream, or its error
            raise item
        return item

    def close(self, timeout: float = 60.0):
        """Stops and joins the thread, so that tf.data is torn down before the interpreter."""
        self._stop.set()  # a blocked `_put` sees it within 0.1 s
        self._thread.join(timeout)
        if self._thread.is_alive():
            logging.warning("The input thread did not stop in time.")


def train_batches(config: ml_collections.ConfigDict, mesh: Mesh, source, start_position: int = 0,
                  should_stop: Callable[[], bool] | None = None) -> Prefetcher:
    """The task's global training batches with their host stream positions, prefetched;
    DataError first if this host's data cannot fill one batch."""
    local = config.batch_size // jax.process_count()  # config_lib checks that it divides
    sources.check_fills_batch(source, local)
    logging.info("Training on %d examples (%d on this host), %d per host batch.",
                 source.num_examples, source.host_size, local)
    host = host_train_batches if config.task == "pretrain" else host_classify_batches
    return Prefetcher(host(config, source, local, start_position), mesh,
                      depth=config.input.prefetch,
                      extra_fn=lambda batch: batch.next_position, should_stop=should_stop)


class EvalBatches:
    """Global evaluation (or bank-refresh) batches covering `source` once; re-iterable, `len`
    counts them. `max_examples` > 0 keeps the first batches that hold that many."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, source,
                 global_batch: int, mode: str = "eval", max_examples: int = 0):
        self._args = config, mesh, source, mode
        self._local = global_batch // jax.process_count()
        self._count = num_eval_batches(source.num_examples, self._local, jax.process_count())
        if max_examples > 0:
            self._count = min(self._count, -(-max_examples // global_batch))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        config, mesh, source, mode = self._args
        prefetcher = Prefetcher(host_eval_batches(config, source, self._local,
                                                  jax.process_count(), mode, self._count), mesh)
        try:
            for batch, _ in prefetcher:
                yield batch
        finally:
            prefetcher.close()
