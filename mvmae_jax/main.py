"""Entry point: `python -m mvmae_jax.main --config=configs/vit_b.py --workdir=DIR`.

Any config field can be overridden with `--config.field=value` (e.g.
`--config.batch_size=1024 --config.model.dtype=float32`); a misspelt field is an error.
A workdir that holds a checkpoint is resumed.
"""

from __future__ import annotations

import logging as logging_std
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mvmae_jax import classify, config_lib, distributed, train
from mvmae_jax.data.sources import DataError
from mvmae_jax.default_config import FINETUNE, PROBE

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (see configs/).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, metrics and "
                    "pictures; a run started in a workdir with a checkpoint resumes it.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs: unset, JAX reads them from the cluster (Cloud TPU, SLURM, Open MPI).
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")


class _QuietLibraries(logging_std.Filter):
    """Drops the INFO chatter of orbax and tfds (warnings and errors still show)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in _NOISY)
        return record.levelno >= logging_std.WARNING or not noisy


_NOISY = ("/orbax/", "/tensorflow_datasets/", "/clu/metric_writers/")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    trainers = {"pretrain": train.train_and_evaluate,
                PROBE: classify.train_and_evaluate, FINETUNE: classify.train_and_evaluate}
    task = FLAGS.config.get("task", "pretrain")
    if task not in trainers:
        sys.exit(f"error: config.task={task!r} must be one of {sorted(trainers)}")
    try:
        trainers[task](FLAGS.config, FLAGS.workdir)
    except (config_lib.ConfigError, DataError) as error:
        logging.error("%s", error)
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
