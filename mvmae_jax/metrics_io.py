"""Where metrics go: TensorBoard and the console (clu), and `workdir/metrics.jsonl` (one JSON
object per write, from process 0)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class MetricsError(ValueError):
    """metrics.jsonl is damaged beyond its last line; the message says where."""


def _read(path: str) -> tuple[list[dict], bool]:
    """(records, whether the last line is torn) of metrics.jsonl. A crash can tear the last
    line: an unparsable one is dropped with a warning; an earlier bad line is an error."""
    with tf.io.gfile.GFile(path) as f:
        lines = f.read().splitlines(keepends=True)
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records = []
    for place, (number, line) in enumerate(numbered):
        try:
            records.append(json.loads(line))
        except ValueError as error:
            if place < len(numbered) - 1:
                raise MetricsError(f"{path} line {number} is not JSON ({error}); fix or delete "
                                   "that line") from error
            logging.warning("Dropping the torn last line %d of %s (%s).", number, path, error)
            return records, True
    return records, bool(lines) and not lines[-1].endswith("\n")


def _write_records(path: str, records: list[dict]) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))


class JsonlWriter(metric_writers.MetricWriter):
    """A clu writer that appends scalars as JSON lines; on object stores (gs://), which
    cannot append, it rewrites the whole (small) file per write. Other kinds are ignored."""

    def __init__(self, path: str):
        self._path = path
        self._append = "://" not in path
        self._records: list[dict] = []
        if tf.io.gfile.exists(path):
            records, torn = _read(path)
            if torn:  # appending after a torn line would merge the next record into it
                _write_records(path, records)
            if not self._append:
                self._records = records

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
        if self._append:
            with open(self._path, "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self._records.append(record)
            _write_records(self._path, self._records)

    def _ignore(self, *args, **kwargs):
        pass

    write_summaries = write_images = write_videos = write_audios = write_texts = _ignore
    write_histograms = write_pointcloud = write_hparams = flush = close = _ignore


def truncate_after(path: str, step: int) -> None:
    """Drops the lines of steps > `step` (a resumed run rewrites them)."""
    if not tf.io.gfile.exists(path):
        return
    records, _ = _read(path)
    _write_records(path, [record for record in records if record["step"] <= step])


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The records of WORKDIR/metrics.jsonl (a torn last line dropped, with a warning)."""
    return _read(os.path.join(workdir, METRICS_FILE))[0]


def create_writer(workdir: str, resumed_step: int | None) -> metric_writers.MetricWriter:
    """TensorBoard + logging + metrics.jsonl on process 0; nothing on the others."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    tf.io.gfile.makedirs(workdir)
    path = os.path.join(workdir, METRICS_FILE)
    if resumed_step is not None:
        truncate_after(path, resumed_step)
    default = metric_writers.create_default_writer(workdir, asynchronous=False)
    return metric_writers.MultiWriter([default, JsonlWriter(path)])
