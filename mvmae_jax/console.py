"""The console (progress to stdout, warnings to stderr, short time prefix, without the
libraries' known-harmless chatter) and the run's full log, WORKDIR/log.txt."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator

from absl import logging as absl_logging

LOG_FILE = "log.txt"

# INFO records of these libraries (warnings and errors still show).
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/clu/metric_writers/")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Whether a record shows: not the chatty libraries' INFO, nor TensorFlow's deprecation notices
    about tfds's own code (TensorFlow's global switch for those races with the input threads)."""
    if (record.pathname.endswith("/tensorflow/python/util/deprecation.py")
            and "/tensorflow_datasets/" in record.getMessage()):
        return False
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
    absl_logging.get_absl_handler().addFilter(_quiet_libraries)


class ShortFormatter(logging.Formatter):
    """`08:31:02 message`; warnings and errors say so (`08:31:02 warning: message`)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        if record.levelno >= logging.ERROR:
            stamp += " error:"
        elif record.levelno >= logging.WARNING:
            stamp += " warning:"
        return f"{stamp} {super().format(record)}"


def short_console() -> None:
    """Replaces absl's console handler (installed as the flags are parsed) by the short console."""
    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (progress, problems):
        handler.setFormatter(ShortFormatter())
        handler.addFilter(_quiet_libraries)
        root.addHandler(handler)


class _WorkdirLogHandler(logging.Handler):
    """Appends records to WORKDIR/log.txt from `start()` on, keeping those before it. Object
    stores (gs://) cannot append: there a local copy is uploaded every `copy_every_s` seconds."""

    def __init__(self, workdir: str, copy_every_s: float = 300.0):
        super().__init__()
        self.setFormatter(absl_logging.PythonFormatter())  # absl's full prefix
        self.path = os.path.join(workdir, LOG_FILE)
        self._remote = "://" in workdir
        self._copy_every_s = copy_every_s
        self._copied = 0.0
        self._local: str | None = None
        self._file = None
        self._early: list[logging.LogRecord] = []

    def start(self) -> None:
        """Opens the log (continuing an existing one) and writes the records kept so far."""
        if self._remote:
            import tensorflow as tf

            handle, self._local = tempfile.mkstemp(suffix=f"_{LOG_FILE}")
            os.close(handle)
            if tf.io.gfile.exists(self.path):
                tf.io.gfile.copy(self.path, self._local, overwrite=True)
            self._copied = time.time()
        with self.lock:  # records of other threads wait until the early ones are written
            self._file = open(self._local or self.path, "a", encoding="utf-8")  # noqa: SIM115
            early, self._early = self._early, []
            for record in early:
                self.emit(record)

    @property
    def started(self) -> bool:
        return self._file is not None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            self._early.append(record)
            return
        try:
            self._file.write(self.format(record) + "\n")
            self._file.flush()
            if self._remote and time.time() - self._copied > self._copy_every_s:
                self._copy()
        except Exception:  # noqa: BLE001 - a failing log file must not stop the run
            self.handleError(record)

    def _copy(self) -> None:
        import tensorflow as tf

        tf.io.gfile.copy(self._local, self.path, overwrite=True)
        self._copied = time.time()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if self._remote:
                self._copy()
                os.remove(self._local)
        super().close()


@contextlib.contextmanager
def workdir_log(workdir: str, enabled: bool = True) -> Iterator[_WorkdirLogHandler | None]:
    """Keeps every log record of the block, and the exception that ends it, for WORKDIR/log.txt;
    the yielded handler writes from its `start()` on. Yields None when not `enabled`."""
    if not enabled:
        yield None
        return
    handler = _WorkdirLogHandler(workdir)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    except BaseException as error:
        if handler.started:  # to the file only: the console reports errors itself
            reason = ": ".join(part for part in (type(error).__name__, str(error)) if part)
            handler.handle(logging.LogRecord(
                "mvmae_jax", logging.ERROR, __file__, 0, "Stopped by %s", (reason,),
                (type(error), error, error.__traceback__)))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
