"""Entry point: `python -m mvmae_jax.main --config=configs/vit_b.py --workdir=DIR`."""

from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from mvmae_jax import console, distributed
from mvmae_jax.errors import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (see configs/).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, metrics and "
                    "pictures; a run started in a workdir with a checkpoint resumes it.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs: unset, JAX reads them from the cluster (Cloud TPU, SLURM, Open MPI).
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mvmae_jax.xla_flags import apply_gpu_defaults  # before any JAX backend starts
    apply_gpu_defaults()
    console.quiet_libraries()
    console.short_console()
    console.import_tensorflow()
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    # Imported once the flags are parsed: TensorFlow writes to stderr as it loads, and a bad
    # flag is one line.
    from mvmae_jax import checkpointing, metrics_io, train, workdir_lock
    from mvmae_jax.data.sources import DataError
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataError, train.NonFiniteError, checkpointing.CheckpointError,
            metrics_io.MetricsError, workdir_lock.WorkdirLockedError) as error:
        sys.exit(f"error: {error}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a bad flag, config file or override stops with one `error:` line."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.evals.lock()  # all of it locked now; raises if the config file failed
        return remaining
    except Exception as error:  # absl's flags.Error, or what loading the config raised
        sys.exit(f"error: {_flag_error_line(argv, error)}")


def _flag_error_line(argv: list[str], error: Exception) -> str:
    """One line for a flag parsing failure: an unknown config field with ml_collections'
    closest match, or the error's last line, with the config file's line number."""
    files = [arg.split("=", 1)[1].split(":", 1)[0] for arg in argv if arg.startswith("--config=")]
    config_file = files[-1] if files else ""  # the last one counts
    text = str(error).replace("\\n", "\n").replace("\\'", "'")  # ml_collections escapes them
    quotes = "'\" " if isinstance(error, (KeyError, AttributeError)) else " "  # str(): a repr
    lines = [line.strip(quotes) for line in text.splitlines() if line.strip(quotes)]
    line = lines[-1] if lines else type(error).__name__
    key = re.search(r'^(\w+)$|Key "(\w+)" does not exist', "\n".join(lines), re.MULTILINE)
    if isinstance(error, (KeyError, AttributeError)) and key:  # an unknown config field
        key = key.group(1) or key.group(2)
        paths = [arg[2:].split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
        path = next((path for path in paths if key in path.split(".")), key)
        hint = [line for line in lines if line.startswith("Did you mean")]
        line = "; ".join([f"{path} is not a field"] + hint)
    in_config = [frame for frame in traceback.extract_tb(error.__traceback__)
                 if config_file and os.path.abspath(frame.filename)
                 == os.path.abspath(config_file)]
    if in_config:
        line = f"{config_file}:{in_config[-1].lineno}: {type(error).__name__}: {line}"
    elif config_file and not os.path.isfile(config_file):
        line = f"--config={config_file}: no such file"
    return line


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
