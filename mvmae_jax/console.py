"""The console shows our progress and our warnings, not the known-harmless chatter of the
libraries underneath: each is silenced where it starts, never by hiding our own records."""

from __future__ import annotations

import logging
import os
import sys
import tempfile

# INFO records of these libraries (warnings and errors still show).
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/clu/metric_writers/")


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        chatty = any(part in record.pathname for part in _CHATTY)
        return record.levelno >= logging.WARNING or not chatty


# Lines TensorFlow's C++ libraries print while they load, before any log level applies.
_TF_LOAD_NOTICES = ("All log messages before absl::InitializeLog()", "oneDNN custom operations",
                    "cpu_feature_guard.cc", "To enable the following instructions:")


def import_tensorflow() -> None:
    """Imports TensorFlow, dropping the notices its C++ libraries print while loading (they
    ignore TF_CPP_MIN_LOG_LEVEL at that point); anything else they print is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(notice in line for notice in _TF_LOAD_NOTICES):
                    sys.stderr.write(line)


def quiet_libraries() -> None:
    """Call before a JAX backend starts."""
    # "Unable to initialize backend 'tpu'" on every machine without a TPU.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
