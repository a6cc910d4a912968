"""Fault injection: each test damages one thing (a checkpoint, metrics.jsonl, the workdir, a
save, the input) and checks that the run stops with one clear line or recovers."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import sys
import threading
import time
import types

import flax.struct
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config
from PIL import Image

from mvmae_jax import (
    checkpointing,
    input_pipeline,
    metrics_io,
    optim,
    sharding,
    train,
    workdir_lock,
)
from mvmae_jax import train_step as ts
from mvmae_jax.data import sources


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    extras: dict


def make_state(step: int, width: int = 3) -> State:
    return State(step=jnp.int32(step),
                 params={"dense": {"kernel": jnp.full((4, width), step, jnp.float32),
                                   "bias": jnp.zeros(width)}},
                 extras={})


def save_steps(directory, steps=(1, 2, 3)):
    manager = checkpointing.make_manager(str(directory), keep=5)
    for step in steps:
        checkpointing.save(manager, make_state(step), [[0, step]])
    manager.wait_until_finished()
    manager.close()


def restore(directory, width=3):
    manager = checkpointing.make_manager(str(directory), keep=5)
    try:
        return checkpointing.restore_latest(manager, make_state(0, width))
    finally:
        manager.close()


def truncate_data_files(step_dir: pathlib.Path):
    for path in (step_dir / "state" / "d").iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_metadata(step_dir: pathlib.Path):
    (step_dir / "state" / "_METADATA").unlink()


def test_restoring_an_undamaged_checkpoint_warns_nothing(tmp_path, caplog):
    """Resuming is silent: no warning from us or from orbax (e.g. about a metadata file that
    belongs to the step, not to each item)."""
    save_steps(tmp_path)
    with caplog.at_level(logging.INFO):
        state, position, step = restore(tmp_path)
    assert step == 3 and position == [0, 3]
    warnings = [f"{r.pathname}: {r.getMessage()}" for r in caplog.records
                if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    assert any("Restored checkpoint of step 3" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", [truncate_data_files, delete_metadata])
def test_restore_walks_back_to_the_newest_readable_checkpoint(tmp_path, damage, caplog):
    save_steps(tmp_path)
    damage(tmp_path / "3")
    with caplog.at_level(logging.WARNING):
        state, position, step = restore(tmp_path)
    assert step == 2 and position == [0, 2]
    assert float(state.params["dense"]["kernel"][0, 0]) == 2.0
    skipped = [r.getMessage() for r in caplog.records if "Skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "step 3" in skipped[0]
    # Set aside, so that the resumed run saves step 3 again.
    assert (tmp_path / "3.unreadable").is_dir() and not (tmp_path / "3").exists()
    manager = checkpointing.make_manager(str(tmp_path), keep=5)
    assert manager.all_steps() == [1, 2]
    assert checkpointing.save(manager, make_state(3), [[0, 3]])
    manager.close()


def test_walking_back_drops_only_the_closed_loop_tracebacks(tmp_path, monkeypatch):
    """Orbax closes its event loop at the first unreadable array while the others are still
    read; their "Event loop is closed" errors are dropped, every other one still reported."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    save_steps(tmp_path)
    truncate_data_files(tmp_path / "3")
    assert restore(tmp_path)[2] == 2
    errors = [RuntimeError("Event loop is closed"), RuntimeError("another"),
              ValueError("Event loop is closed")]
    for error in errors:
        sys.unraisablehook(types.SimpleNamespace(exc_value=error))
    assert [u.exc_value for u in reported] == errors[1:]


def test_every_checkpoint_unreadable_refuses_to_start_over(tmp_path):
    save_steps(tmp_path, (1, 2))
    for step in (1, 2):
        delete_metadata(tmp_path / str(step))
    with pytest.raises(checkpointing.CheckpointError) as error:
        restore(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "tried steps 2, 1" in message and str(tmp_path) in message
    assert "refusing to start from scratch" in message
    assert (tmp_path / "2").is_dir()  # Nothing moved when nothing restores.


def test_resume_with_other_shapes_names_the_parameter(tmp_path):
    save_steps(tmp_path, (1,))
    with pytest.raises(checkpointing.CheckpointError) as error:
        restore(tmp_path, width=5)
    message = str(error.value)
    assert "\n" not in message
    assert "params.dense.bias has shape (3,) in the checkpoint and (5,) in the config" in message


def old_path_name(path) -> str:
    """The array names the shape check used before it used `jax.tree_util.keystr`."""
    def key_name(key):
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return ".".join(key_name(k) for k in path)


def test_shape_check_names_arrays_as_before(tmp_path):
    """The names of the state's arrays, and of their entries in orbax's metadata, are the
    dotted paths the messages have always used (dicts, dataclasses, optax's tuples)."""
    params = make_state(1).params
    state = ts.TrainState(step=jnp.int32(1), params=params, opt_state=optax.adamw(0.1).init(params),
                          rng=jax.random.PRNGKey(0), extras={"stats": [jnp.ones(2)]})
    manager = checkpointing.make_manager(str(tmp_path), keep=5, async_save=False)
    checkpointing.save(manager, state, [[0, 1]])
    metadata = manager.metadata(1).item_metadata[checkpointing.STATE]
    for tree in (state, getattr(metadata, "tree", metadata)):
        names = checkpointing._shapes_by_path(tree)
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        assert list(names) == [old_path_name(p) for p, leaf in leaves if hasattr(leaf, "shape")]
    assert "opt_state.0.mu.dense.kernel" in names and "extras.stats.0" in names
    manager.close()


def test_extras_saved_apart_keep_the_layout_and_restore_into_other_row_counts(tmp_path,
                                                                              caplog):
    """An extra whose spec names an item of its own (the AMT bank) is saved there as
    {name: value}, not in the state item, and restores silently with rows cut or padded; the
    restored state keeps its extras' specs."""
    def state_with_bank(rows: int, step: int = 0) -> ts.TrainState:
        return ts.TrainState(
            step=jnp.int32(step), params=make_state(step).params, opt_state=(),
            rng=jax.random.PRNGKey(0), extras={"bank": jnp.arange(rows * 2.0).reshape(rows, 2),
                                               "stats": jnp.ones(3)},
            extras_spec=(("bank", ts.ExtraSpec(item="bank")),))

    manager = checkpointing.make_manager(str(tmp_path), keep=5, async_save=False)
    checkpointing.save(manager, state_with_bank(8, step=1), [[0, 1]])
    items = manager.metadata(1).item_metadata
    assert set(getattr(items["bank"], "tree", items["bank"])) == {"bank"}
    state_tree = getattr(items[checkpointing.STATE], "tree", items[checkpointing.STATE])
    assert set(state_tree["extras"]) == {"stats"}
    for rows in (6, 8, 10):
        with caplog.at_level(logging.INFO):
            restored, _, step = checkpointing.restore_latest(manager, state_with_bank(rows))
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert step == 1 and restored.extras_spec == state_with_bank(rows).extras_spec
        bank = np.asarray(restored.extras["bank"])
        assert bank.shape == (rows, 2)
        np.testing.assert_array_equal(bank[:8], np.arange(16.0).reshape(8, 2)[:rows])
    manager.close()


def test_keep_checkpoints_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints=0"):
        checkpointing.make_manager(str(tmp_path), keep=0)


# --- metrics.jsonl


def write_metrics(path, lines):
    path.write_text("".join(lines))


GOOD = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]


def test_torn_last_metrics_line_is_dropped(tmp_path, caplog):
    path = tmp_path / metrics_io.METRICS_FILE
    write_metrics(path, GOOD + ['{"step": 4, "train/lo'])
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in metrics_io.read_metrics(str(tmp_path))] == [1, 2, 3]
        metrics_io.truncate_after(str(path), 2)
    assert "torn last line 4" in caplog.text
    assert [r["step"] for r in metrics_io.read_metrics(str(tmp_path))] == [1, 2]
    # The writer repairs the file before appending, so no record merges into a torn line.
    write_metrics(path, GOOD + ['{"step": 4, "train/lo'])
    writer = metrics_io.JsonlWriter(str(path))
    writer.write_scalars(4, {"train/loss": 0.25})
    assert [r["step"] for r in metrics_io.read_metrics(str(tmp_path))] == [1, 2, 3, 4]


def test_torn_metrics_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / metrics_io.METRICS_FILE
    write_metrics(path, GOOD[:1] + ['{"step": 2, "tr\n'] + GOOD[2:])
    with pytest.raises(metrics_io.MetricsError, match="line 2 is not JSON"):
        metrics_io.read_metrics(str(tmp_path))


# --- The workdir lock


def test_second_run_on_a_live_workdir_names_the_holder(tmp_path):
    with workdir_lock.hold(str(tmp_path)):
        with pytest.raises(workdir_lock.WorkdirLockedError) as error:
            workdir_lock.acquire(str(tmp_path))
    message = str(error.value)
    assert f"process {os.getpid()}" in message and socket.gethostname() in message
    assert "\n" not in message
    assert not (tmp_path / "lock").exists()  # Released on exit.


def write_lock(workdir, **fields):
    record = {"pid": 4_000_000, "host": socket.gethostname(), "start_time": time.time(),
              "heartbeat": time.time(), "token": "old"}
    record.update(fields)
    (workdir / "lock").write_text(json.dumps(record))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    write_lock(tmp_path)  # No process has pid 4,000,000 (above Linux's pid limit).
    with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)) as lock:
        assert json.loads((tmp_path / "lock").read_text())["token"] == lock.record["token"]
    assert "stale workdir lock" in caplog.text and "has exited" in caplog.text


def test_lock_from_another_host_counts_until_its_heartbeat_is_old(tmp_path):
    write_lock(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(workdir_lock.WorkdirLockedError, match="host elsewhere"):
        workdir_lock.acquire(str(tmp_path))
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 3600)
    with workdir_lock.hold(str(tmp_path)) as lock:
        assert lock is not None


# --- Failed asynchronous saves


def fail_background_writes(monkeypatch):
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", fail)


def wait_for_report(monitor, seconds=20.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        line = monitor.poll()
        if line is not None:
            return line
        time.sleep(0.05)
    return None


def test_failed_save_is_reported_once_then_stops_unless_the_next_saves(tmp_path, monkeypatch):
    manager = checkpointing.make_manager(str(tmp_path), keep=5)
    monitor = checkpointing.SaveMonitor(manager)
    assert monitor.save(make_state(1), [[0, 1]])
    fail_background_writes(monkeypatch)
    monitor.save(make_state(2), [[0, 2]])
    line = wait_for_report(monitor)
    assert line is not None and "\n" not in line
    assert "step 2" in line and "No space left on device" in line
    assert monitor.poll() is None  # Once.
    # The next save fails too: the run stops, naming the newest saved checkpoint.
    with pytest.raises(checkpointing.CheckpointError, match="newest saved checkpoint is step 1"):
        monitor.save(make_state(3), [[0, 3]])
    monkeypatch.undo()
    manager.close()


def test_failed_save_followed_by_a_good_one_goes_on(tmp_path, monkeypatch):
    manager = checkpointing.make_manager(str(tmp_path), keep=5)
    monitor = checkpointing.SaveMonitor(manager)
    fail_background_writes(monkeypatch)
    monitor.save(make_state(1), [[0, 1]])
    assert wait_for_report(monitor) is not None
    monkeypatch.undo()
    assert monitor.save(make_state(2), [[0, 2]])
    assert monitor.failure is None
    monitor.finish()
    assert manager.all_steps() == [2]
    manager.close()


# --- Input that cannot fill a batch, and a starved pipeline


def broken_folder(path: pathlib.Path, good: int, broken: int) -> pathlib.Path:
    for i in range(good):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(path / f"good_{i}.png")
    for i in range(broken):
        (path / f"broken_{i}.jpg").write_bytes(b"not an image")
    return path


@pytest.mark.parametrize("good", [0, 3])
def test_too_few_readable_images_is_one_line_before_training(tmp_path, good):
    source = sources.ImageFolderSource(str(broken_folder(tmp_path, good, 10)))
    config = tiny_config(batch_size=8)
    mesh = sharding.make_mesh()
    with pytest.raises(sources.DataError, match=f"only {good} of the {good + 10} image files"):
        input_pipeline.train_batches(config, mesh, source)


@pytest.mark.parametrize("good, broken, local_batch, processes, multiple, message", [
    (10, 1, 64, 1, 1, "only 10 of the 11 image files in {path!r} can be decoded, fewer than one "
     "batch of 64; set --config.batch_size=10 (the largest they fill) or add data"),
    (10, 1, 64, 1, 4, "only 10 of the 11 image files in {path!r} can be decoded, fewer than one "
     "batch of 64; set --config.batch_size=8 (the largest multiple of 4 they fill) or add data"),
    (11, 0, 64, 1, 1, "the 11 images in {path!r} are fewer than one batch of 64; set "
     "--config.batch_size=11 (the largest they fill) or add data"),
    (10, 1, 32, 2, 4, "only 10 of the 11 image files on this host in {path!r} can be decoded, "
     "fewer than one host batch of 32; set --config.batch_size=20 (the largest multiple of 4 "
     "they fill) or add data"),
    (3, 2, 8, 1, 8, "only 3 of the 5 image files in {path!r} can be decoded, fewer than one "
     "batch of 8; add data (the smallest batch, 8, needs 8 examples)"),
])
def test_too_small_data_names_readable_images_and_a_batch_size_that_fits(
        tmp_path, good, broken, local_batch, processes, multiple, message):
    """The message counts the readable images, not the files, and names the largest
    --config.batch_size that they fill and that splits over the devices (`multiple`)."""
    source = sources.ImageFolderSource(str(broken_folder(tmp_path, good, broken)))
    with pytest.raises(sources.DataError) as error:
        sources.check_fills_batch(source, local_batch, processes, multiple)
    assert str(error.value) == message.format(path=str(tmp_path))


def test_an_epoch_without_a_batch_is_an_error(tmp_path):
    source = sources.ImageFolderSource(str(broken_folder(tmp_path, 3, 10)))
    stream = input_pipeline.host_train_batches(tiny_config(batch_size=8), source, 8)
    with pytest.raises(sources.DataError, match="gave no batch: 13 examples.*10 of them"):
        next(stream)


def test_a_starved_pipeline_stops_when_asked():
    def never_yields():
        threading.Event().wait()
        yield

    stop = threading.Event()
    prefetcher = input_pipeline.Prefetcher(never_yields(), mesh=None, should_stop=stop.is_set)
    outcome = []

    def consume():
        try:
            next(prefetcher)
        except input_pipeline.InputStopped as error:
            outcome.append(error)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    time.sleep(0.3)
    stop.set()  # What the SIGTERM handler sets.
    consumer.join(timeout=5)
    assert outcome and not consumer.is_alive()


# --- Through `python -m mvmae_jax.main` (slow): the loop's own guards.

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The quickstart at 16x16 with a 1-block model: seconds per step on the CPU.
TINY_RUN = ["--config=configs/quickstart.py", "--config.img_size=16", "--config.batch_size=64",
            "--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
            "--config.model.mlp_dim=64", "--config.model.decoder_width=32",
            "--config.model.decoder_depth=1", "--config.model.decoder_heads=2",
            "--config.contrastive.hidden_dim=64", "--config.contrastive.output_dim=32",
            "--config.image_every_steps=0", "--config.evals.knn.every_steps=-1",
            "--config.log_every_steps=1", "--config.optim.warmup_epochs=0"]


def run_main(workdir, data_dir, *flags, timeout=600):
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run(
        [sys.executable, "-m", "mvmae_jax.main", *TINY_RUN, f"--workdir={workdir}",
         f"--config.dataset.data_dir={data_dir}", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_every_checkpoint_is_finite(workdir):
    for step in sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                       if p.name.isdigit()):
        _, params, _ = checkpointing.load_params(str(workdir), step)
        for leaf in jax.tree.leaves(params):
            assert np.all(np.isfinite(leaf)), f"checkpoint {step} holds non-finite values"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.slow
def test_exploding_run_stops_in_one_line_and_never_saves_nan(tmp_path, data_dir):
    """base_lr=1e4 with a checkpoint every step: the run stops with one line naming the step
    and the last good checkpoint; no checkpoint holds a non-finite value, so a resume does not
    restore a broken model."""
    workdir = tmp_path / "nan"
    result = run_main(workdir, data_dir, "--config.optim.base_lr=1e4",
                      "--config.checkpoint_every_steps=1", "--config.total_steps=12")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "not finite" in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert_every_checkpoint_is_finite(workdir)


def nan_updates_from(step: int) -> optax.GradientTransformation:
    """Updates turned to NaN from the `step`-th update on, whatever the gradient."""
    def update(updates, count, params=None):
        poison = jnp.where(count + 1 >= step, jnp.nan, 0.0)
        return jax.tree.map(lambda u: u + poison, updates), count + 1

    return optax.GradientTransformation(lambda params: jnp.zeros([], jnp.int32), update)


@pytest.mark.slow
def test_nonfinite_parameters_after_a_finite_step_are_never_saved(tmp_path, data_dir,
                                                                 monkeypatch):
    """An optimizer that makes the parameters NaN at step 3 while that step's loss and
    gradient norm stay finite (what the step itself checks): the check before the step-3
    checkpoint stops the run, and every checkpoint on disk is finite."""
    make_optimizer = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer", lambda *args: optax.chain(
        make_optimizer(*args), nan_updates_from(3)))
    config = helpers.set_dotted(helpers.load_config(ROOT / "configs" / "quickstart.py"), {
        "img_size": 16, "batch_size": 64, "model.width": 32, "model.depth": 1,
        "model.num_heads": 2, "model.mlp_dim": 64, "model.decoder_width": 32,
        "model.decoder_depth": 1, "model.decoder_heads": 2, "contrastive.hidden_dim": 64,
        "contrastive.output_dim": 32, "image_every_steps": 0, "evals.knn.every_steps": -1,
        "log_every_steps": 100, "checkpoint_every_steps": 1, "total_steps": 6,
        "dataset.data_dir": data_dir})
    with pytest.raises(train.NonFiniteError, match="step 3: .*not finite"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert_every_checkpoint_is_finite(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} == {"1", "2"}


@pytest.mark.slow
def test_rollback_policy_restores_the_last_good_checkpoint(tmp_path, data_dir):
    """policy rollback: each non-finite step goes back to the last good checkpoint, logged,
    at most max_rollbacks times, then stops in one line; nothing non-finite is saved."""
    workdir = tmp_path / "rollback"
    result = run_main(workdir, data_dir, "--config.optim.base_lr=1e4",
                      "--config.checkpoint_every_steps=1", "--config.total_steps=12",
                      "--config.nonfinite.policy=rollback", "--config.nonfinite.max_rollbacks=2")
    assert result.returncode != 0
    assert result.stderr.count("rolled back to step") == 2, result.stderr[-3000:]
    assert "after 2 rollbacks" in result.stderr.strip().splitlines()[-1]
    assert_every_checkpoint_is_finite(workdir)


@pytest.mark.slow
def test_a_folder_smaller_than_a_batch_stops_in_one_line_and_leaves_no_workdir(
        tmp_path, data_dir):
    """10 images and a broken file with batch 64 on 2 devices: one line that counts the 10
    readable images and names --config.batch_size=10; the workdir it would have created is
    not left behind, and one that existed before is kept."""
    (tmp_path / "images").mkdir()
    folder = broken_folder(tmp_path / "images", 10, 1)
    flags = ("--config.dataset.name=imagefolder", f"--config.dataset.path={folder}",
             "--config.batch_size=64")
    result = run_main(tmp_path / "new", data_dir, *flags, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: only 10 of the 11 image files in {str(folder)!r} can be decoded, fewer than "
        "one batch of 64; set --config.batch_size=10 (the largest multiple of 2 they fill) or "
        "add data"), result.stderr[-3000:]
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert run_main(tmp_path / "mine", data_dir, *flags, timeout=300).returncode == 1
    assert (tmp_path / "mine").is_dir()


@pytest.mark.slow
def test_second_run_on_a_held_workdir_stops_in_one_line(tmp_path, data_dir):
    """While this process holds a workdir, `python -m mvmae_jax.main` on it stops with one
    line naming the holder, and leaves the holder's lock in place."""
    workdir = tmp_path / "held"
    with workdir_lock.hold(str(workdir)):
        result = run_main(workdir, data_dir, "--config.total_steps=2", timeout=300)
        assert (workdir / "lock").exists()
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"process {os.getpid()}" in last, result.stderr[-2000:]
    assert socket.gethostname() in last
    assert "Traceback" not in result.stderr
    assert not (workdir / "checkpoints").exists()
