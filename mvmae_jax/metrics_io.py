"""Where metrics go: TensorBoard and the console (clu), and `workdir/metrics.jsonl`.

metrics.jsonl holds one JSON object per write, `{"step": N, "train/loss": ..., ...}`. Only
process 0 writes. When a run resumes from a checkpoint, the lines of later steps (logged by
the interrupted run after its last checkpoint) are dropped first, so the file reads like one
uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
    """A clu writer that appends scalars as JSON lines (local disk or gs://).

    Object stores cannot append, so there the whole (small) file is rewritten per write.
    """

    def __init__(self, path: str):
        self._path = path
        self._append = "://" not in path
        self._lines: list[str] = []
        if not self._append and tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                self._lines = f.read().splitlines(keepends=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step)}
        record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        line = json.dumps(record) + "\n"
        if self._append:
            with open(self._path, "a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            with tf.io.gfile.GFile(self._path, "w") as f:
                f.write("".join(self._lines))

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def truncate_after(path: str, step: int) -> None:
    """Drops the lines of steps > `step` (a resumed run rewrites them)."""
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(kept))


def read_metrics(workdir: str) -> list[dict[str, float]]:
    with tf.io.gfile.GFile(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


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
