"""The console (short time prefix; progress on stdout, problems on stderr) and WORKDIR/log.txt
(every record with absl's prefix)."""

from __future__ import annotations

import logging
import re

import pytest

from mvmae_jax import console

TIME = r"\d\d:\d\d:\d\d"
ABSL_PREFIX = r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\] "


@pytest.fixture
def root_at_info():
    """The root logger at INFO with its handlers as they were after the test."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.INFO)
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_console_lines_have_a_short_prefix_progress_on_stdout(root_at_info, capsys):
    """INFO to stdout as `08:31:02 message`, warnings and errors to stderr, marked as such;
    a library's INFO chatter is left out, its warnings are not, except TensorFlow's deprecation
    notices about tfds's code."""
    console.short_console()
    logging.info("step 1/2 loss 1.000")
    logging.warning("a checkpoint was skipped")
    logging.error("a save failed")
    chatty = logging.LogRecord("absl", logging.INFO, "/site-packages/orbax/x.py", 1,
                               "Saving item", None, None)
    root_at_info.handle(chatty)
    root_at_info.handle(logging.LogRecord("absl", logging.WARNING, "/site-packages/orbax/x.py",
                                          1, "orbax warns", None, None))
    root_at_info.handle(logging.LogRecord(  # tfds's deprecated op, when the silencing is raced
        "tensorflow", logging.WARNING, "/site-packages/tensorflow/python/util/deprecation.py", 50,
        "From /site-packages/tensorflow_datasets/core/reader.py:102: CounterV2 (from "
        "tensorflow.python.data.experimental.ops.counter) is deprecated", None, None))
    out, err = capsys.readouterr()
    assert re.fullmatch(f"{TIME} step 1/2 loss 1.000\n", out), out
    assert re.fullmatch(f"{TIME} warning: a checkpoint was skipped\n{TIME} error: a save failed\n"
                        f"{TIME} warning: orbax warns\n", err), err


def test_workdir_log_keeps_every_record_from_before_start_and_the_error(root_at_info,
                                                                        tmp_path):
    """Records before `start()` are written when it comes, with absl's prefix; the exception
    that ends the block is the last record, with its traceback; the log continues on the next
    run."""
    with pytest.raises(ValueError, match="boom"):
        with console.workdir_log(str(tmp_path)) as log:
            logging.info("before the lock")
            assert not (tmp_path / console.LOG_FILE).exists()
            log.start()
            logging.warning("after it")
            raise ValueError("boom")
    with console.workdir_log(str(tmp_path)) as log:
        log.start()
        logging.info("resumed")
    lines = (tmp_path / console.LOG_FILE).read_text().splitlines()
    assert re.fullmatch(f"I{ABSL_PREFIX[6:]}before the lock", lines[0]), lines[0]
    assert re.fullmatch(f"W{ABSL_PREFIX[6:]}after it", lines[1]), lines[1]
    assert re.fullmatch(f"E{ABSL_PREFIX[6:]}Stopped by ValueError: boom", lines[2]), lines[2]
    assert lines[3] == "Traceback (most recent call last):"
    assert lines[-1].endswith("] resumed")
    assert len(logging.getLogger().handlers) == len(root_at_info.handlers)


def test_workdir_log_writes_nothing_without_start(root_at_info, tmp_path):
    with console.workdir_log(str(tmp_path)):
        logging.info("a failed start")
    assert not any(tmp_path.iterdir())
    with console.workdir_log(str(tmp_path), enabled=False) as log:
        assert log is None


def test_workdir_log_on_an_object_store_is_copied_there(root_at_info, tmp_path):
    """A workdir named by a URL (gs://...; here file://, which TensorFlow reads alike) cannot
    be appended to: the log is written locally, continues the workdir's log.txt and is copied
    there at the end."""
    workdir = f"file://{tmp_path}"
    (tmp_path / console.LOG_FILE).write_text("the first run's line\n")
    with console.workdir_log(workdir) as log:
        log.start()
        logging.info("the second run's line")
        assert (tmp_path / console.LOG_FILE).read_text() == "the first run's line\n"
    lines = (tmp_path / console.LOG_FILE).read_text().splitlines()
    assert lines[0] == "the first run's line"
    assert lines[1].endswith("] the second run's line") and len(lines) == 2


@pytest.mark.parametrize("step, total, per_epoch, phase, img_per_s, seconds_left", [
    (176, 352, 22, "warmup", 128.4, 80),  # the quickstart
    (176, 352, 22, "amt", 9876.5, 3599),  # the quickstart on a GPU
    (12_500, 250_000, 312, "warmup", 12_345.6, 99 * 3600),  # ViT-B, 800 epochs
    (250_000, 250_000, 312, "amt", 12_345.6, 0),
])
def test_progress_lines_fit_in_120_characters(step, total, per_epoch, phase, img_per_s,
                                              seconds_left):
    """With the time prefix, a pretraining line of the quickstart or of an 800-epoch ViT-B run
    fits in 120 characters; the MFU, the input wait, the gradient norm and the learning rate
    are left to metrics.jsonl."""
    from mvmae_jax import utils

    metrics = {"loss": 4.2171, "rec_loss": 0.71634, "con_loss": 13.5012, "con_top1": 0.0078125,
               "grad_norm": 1.93, "lr": 1.5e-4, "finite": 1.0}
    perf = {"perf/img_per_s": img_per_s, "perf/input_wait": 0.3, "perf/mfu": 0.4512}
    line = "08:31:02 " + utils.progress_line(step, total, per_epoch, phase, metrics, perf,
                                             seconds_left)
    assert len(line) <= 120, line
    assert line.startswith(f"08:31:02 step {step}/{total} (epoch {step / per_epoch:.1f}, "
                           f"{phase}) loss 4.217 con 13.5 con_top1 0.008 rec 0.716 | "
                           f"{img_per_s:.0f} img/s, ETA "), line


def test_throughput_meter_measures_each_interval(monkeypatch):
    """Images per second (in all and per device), the input wait's share of the interval and,
    where the device's peak is known, the MFU; each `measure` starts the next interval."""
    import jax

    from mvmae_jax import utils

    clock = iter([100.0, 104.0, 105.0])
    monkeypatch.setattr(utils.time, "time", lambda: next(clock))
    monkeypatch.setattr(utils, "peak_flops", lambda kind: 1e12)
    meter = utils.Throughput(batch_size=32, start_step=10)
    meter.add_step(0.5, 1e12)
    meter.add_step(0.5, None)
    assert meter.measure(12) == {
        "perf/img_per_s": 16.0, "perf/img_per_s_per_device": 16.0 / jax.device_count(),
        "perf/input_wait": 0.25, "perf/mfu": 0.25}
    meter.add_step(0.0, None)
    assert meter.measure(13) == {"perf/img_per_s": 32.0,
                                 "perf/img_per_s_per_device": 32.0 / jax.device_count(),
                                 "perf/input_wait": 0.0}
