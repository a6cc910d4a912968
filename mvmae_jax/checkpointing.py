"""Orbax checkpoints of the whole training state, written asynchronously by every host.

A checkpoint holds the `TrainState` (step, parameters, optimizer state, base PRNG key), the AMT
bank as an item of its own, and each host's input-stream position. The bank's rows are padded
to a multiple of the device count; its own item restores with padding or truncation of those
rows, so a checkpoint restores onto a mesh of any size, while the state must match exactly.
Orbax writes into a temporary directory and commits it
atomically, so a process killed during a save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

STATE = "state"
BANK = "bank"
INPUT = "input"


class CheckpointError(ValueError):
    """A checkpoint cannot be restored or saved as asked; the message says what to do."""


def make_manager(directory: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The run's checkpoint manager, keeping the newest `keep` (>= 1) checkpoints."""
    if keep < 1:
        # orbax reads max_to_keep=0 as "keep none": a run would finish with no checkpoint.
        raise CheckpointError(f"keep_checkpoints={keep} must be at least 1")
    _quiet_orbax_failures()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    # Each item's handler is known before the first save or restore, so that the manager reads
    # an existing checkpoint's metadata (`_check_shapes`) without reading it as a checkpoint.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, save_args, restore_args in (
            (STATE, ocp.args.StandardSave, ocp.args.StandardRestore),
            (BANK, ocp.args.StandardSave, ocp.args.StandardRestore),
            (INPUT, ocp.args.JsonSave, ocp.args.JsonRestore)):
        registry.add(item, save_args)
        registry.add(item, restore_args)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


class _OneLineOrbaxErrors(logging.Filter):
    """Shortens orbax's error records to their first line and drops their tracebacks: a failed
    save is reported once, in one line, by `SaveMonitor`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname or record.levelno < logging.WARNING:
            return True
        message = record.getMessage().strip().splitlines()
        message = message[0][:300] if message else ""
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({_first_line(record.exc_info[1])})"
        record.msg, record.args = message, None
        record.exc_info, record.exc_text = None, None
        return True


def _count_closed_loop_errors(previous_hook):
    """An unraisable-exception hook that counts, instead of printing, tensorstore's
    "Event loop is closed" callbacks: a failed asynchronous save raises one per array."""
    state = {"count": 0}

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            state["count"] += 1
            if state["count"] == 1:
                logging.warning("A checkpoint write was cut short (\"Event loop is closed\" in "
                                "its callbacks); further such messages are not shown.")
            return
        previous_hook(unraisable)

    hook.mvmae_jax_quiet = True
    return hook


def _quiet_orbax_failures() -> None:
    """Installs the filter and hook above once per process."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OneLineOrbaxErrors) for f in absl_logger.filters):
        absl_logger.addFilter(_OneLineOrbaxErrors())
    if not getattr(sys.unraisablehook, "mvmae_jax_quiet", False):
        sys.unraisablehook = _count_closed_loop_errors(sys.unraisablehook)


def gather_positions(position: int, host_size: int) -> list[list[int]]:
    """Every host's stream position as (epoch, offset) rows, in process order (collective).

    (epoch, offset) rather than one integer: a position can pass 2**31 in long runs.
    """
    epoch, offset = divmod(int(position), host_size)
    local = np.array([epoch, offset], np.int32)
    if jax.process_count() == 1:
        return [local.tolist()]
    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).tolist()


def _without_bank(state: Any) -> Any:
    """The state item: the state without its AMT bank (saved apart)."""
    return state.replace(extras={k: v for k, v in state.extras.items() if k != BANK})


def _bank(state: Any) -> Any:
    return state.extras.get(BANK)


def _with_bank(state: Any, bank: Any) -> Any:
    return state.replace(extras=dict(state.extras, **{BANK: bank}))


def save(manager: ocp.CheckpointManager, state: Any, positions: list[list[int]],
         force: bool = False) -> bool:
    """Starts an asynchronous save (every host calls it); returns whether one was started."""
    step = int(jax.device_get(state.step))
    bank = _bank(state)
    items = {STATE: ocp.args.StandardSave(_without_bank(state)),
             INPUT: ocp.args.JsonSave({"process_count": len(positions),
                                       "positions": positions})}
    if bank is not None:
        items[BANK] = ocp.args.StandardSave({"bank": bank})
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
        logging.info("Saving checkpoint of step %d.", step)
    return saved


def _failed_background_save(manager: ocp.CheckpointManager) -> tuple[Any, int, BaseException]:
    """(thread, step, error) of a finished background save that failed, else (None, -1, None).

    Non-blocking. Reads the manager's finalize thread: orbax has no public call that reports
    a background failure without waiting (and `check_for_errors` would take the error away
    from the finalize thread, which then deletes old checkpoints as if the save had worked).
    """
    ref = getattr(manager, "_finalize_thread", None)
    thread = ref.get() if ref is not None else None
    error = getattr(thread, "exception", None)
    if thread is None or error is None or thread.is_alive():
        return None, -1, None
    return thread, thread.step(), error


class SaveMonitor:
    """Saves through a manager and reports failed asynchronous saves.

    `poll()` (every step, non-blocking) logs a failed background save once, in one line. The
    run goes on; `save()` of the next checkpoint then waits for it and raises CheckpointError if
    it fails too. `finish()` waits for the last save and raises CheckpointError if it failed.
    Every host calls `save` and `finish` (collective on multi-process runs); `poll` is local.
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self.failure: str | None = None  # The failed save not yet followed by a good one.
        self._reported: Any = None

    def poll(self) -> str | None:
        """The one-line report of a background save that failed since the last call, or None."""
        thread, step, error = _failed_background_save(self.manager)
        if thread is None or thread is self._reported:
            return None
        self._reported = thread
        return self._record(step, error)

    def _record(self, step: int, error: BaseException) -> str:
        self.failure = (f"the checkpoint of step {step} in {self.manager.directory} failed to "
                        f"save ({_first_line(error)})")
        line = (f"{self.failure[0].upper()}{self.failure[1:]}; training goes on and stops "
                "unless the next one saves.")
        logging.error("%s", line)
        return line

    def _wait(self) -> None:
        """Waits for the running save; records (and reports, if not done yet) its failure."""
        thread, step, error = _failed_background_save(self.manager)
        try:
            self.manager.wait_until_finished()
        except Exception as caught:  # noqa: BLE001 — reported in one line
            thread, step, error = _failed_background_save(self.manager)
            if thread is None:
                thread, step, error = object(), -1, caught
        if thread is not None and thread is not self._reported:
            self._reported = thread
            self._record(step, error)

    def _newest(self) -> str:
        self.manager.reload()
        step = self.manager.latest_step()
        return f"the newest saved checkpoint is step {step}" if step is not None else (
            "no checkpoint is saved")

    def save(self, state: Any, positions: list[list[int]], force: bool = False) -> bool:
        """`save`; after a failed save, waits for this one and raises CheckpointError if it
        fails too (a run that cannot checkpoint stops rather than train on unsaved)."""
        step = int(jax.device_get(state.step))
        self._wait()
        retry = not _on_every_process(self.failure is None)
        try:
            started = save(self.manager, state, positions, force)
            if retry and started:
                self.manager.wait_until_finished()
            error = None
        except Exception as caught:  # noqa: BLE001 — reported in one line
            started, error = False, caught
        if _on_every_process(error is None):
            if retry and started:
                logging.warning("The checkpoint of step %d saved; the earlier failure is over.",
                                step)
                self.failure = None
            return started
        if retry:
            raise CheckpointError(
                f"{self.failure}, and the checkpoint of step {step} failed too "
                f"({_first_line(error) if error else 'on another process'}); stopping: "
                f"{self._newest()}. Free space or fix the directory, then resume")
        if error is not None:
            self._reported = object()
            self._record(step, error)
        else:
            self.failure = f"the checkpoint of step {step} failed to save on another process"
        return False

    def finish(self) -> None:
        """Waits for the last save; CheckpointError if it (or the one before) failed."""
        self._wait()
        if not _on_every_process(self.failure is None):
            raise CheckpointError(
                f"{self.failure or 'a checkpoint failed to save on another process'}; "
                f"{self._newest()}. Free space or fix the directory, then resume")


def restore_latest(manager: ocp.CheckpointManager, state: Any,
                   step: int | None = None) -> tuple[Any, int | None, int] | None:
    """(state, this host's input position or None, step) of the newest checkpoint that restores
    (or of `step`), or None if there is none.

    Unreadable checkpoints (truncated or missing files) are skipped, newest first, with one
    warning each, and renamed to `<step>.unreadable` once an older one restores. CheckpointError
    when none restores, or when the config's shapes differ from the checkpoint's.

    `state` gives the structure, shapes and shardings to restore into, so a checkpoint restores
    onto any mesh. The input position is None when the process count changed: the hosts' parts
    of the data differ then, and the stream cannot continue exactly.
    """
    candidates = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not candidates:
        return None
    tried = []
    for candidate in candidates:
        tried.append(candidate)
        try:
            _check_shapes(manager, candidate, _without_bank(state))
            result = _restore_step(manager, state, candidate)
            error = None
        except CheckpointError:
            raise
        except Exception as caught:  # noqa: BLE001 — any unreadable checkpoint is skipped
            result, error = None, caught
        if _on_every_process(error is None):
            _set_aside(manager, tried[:-1])
            logging.info("Restored checkpoint of step %d from %s.", candidate, manager.directory)
            return result
        logging.warning("Skipping checkpoint of step %d in %s: it does not restore (%s).",
                        candidate, manager.directory,
                        _first_line(error) if error else "it fails on another process")
    raise CheckpointError(
        f"no checkpoint in {manager.directory} restores (tried steps "
        f"{', '.join(map(str, tried))}); refusing to start from scratch; move the checkpoints "
        "away to start over")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def _on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process (collective on multi-process runs)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
    return bool(np.asarray(flags).all())


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"params.encoder.kernel": shape} for every array leaf of a pytree (orbax's naming)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): tuple(leaf.shape)
            for path, leaf in leaves if hasattr(leaf, "shape")}


def _check_shapes(manager: ocp.CheckpointManager, step: int, target: Any) -> None:
    """Raises CheckpointError naming the first array whose shape differs between the checkpoint
    of `step` and `target` (the config's state); other failures mean an unreadable checkpoint."""
    items = manager.metadata(step).item_metadata
    metadata = items[STATE] if items is not None and STATE in items else None
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, dict):
        raise ValueError(f"the {STATE} item has no readable metadata")
    saved = _shapes_by_path(tree)
    wanted = _shapes_by_path(target)
    for path, shape in wanted.items():
        if path not in saved:
            raise CheckpointError(
                f"the checkpoint of step {step} in {manager.directory} does not match the "
                f"config: {path} (shape {shape}) is not in the checkpoint; resume with the "
                "config the run started with (its config.json) or use a new workdir")
        if saved[path] != shape:
            raise CheckpointError(
                f"the checkpoint of step {step} in {manager.directory} does not match the "
                f"config: {path} has shape {saved[path]} in the checkpoint and {shape} in the "
                "config; resume with the config the run started with (its config.json) or use "
                "a new workdir")
    extra = [path for path in saved if path not in wanted]
    if extra:
        raise CheckpointError(
            f"the checkpoint of step {step} in {manager.directory} does not match the config: "
            f"{extra[0]} (shape {saved[extra[0]]}) is in the checkpoint but not in the config; "
            "resume with the config the run started with (its config.json) or use a new workdir")


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames unreadable checkpoints to `<step>.unreadable` (kept for inspection, no longer
    listed), so that the resumed run saves those steps again."""
    if not steps:
        return
    if jax.process_index() == 0:
        for step in steps:
            source = epath.Path(manager.directory) / str(step)
            target = source.parent / f"{step}.unreadable"
            suffix = 1
            while target.exists():
                suffix += 1
                target = source.parent / f"{step}.unreadable-{suffix}"
            if source.exists():
                source.rename(target)
                logging.warning("Moved the unreadable checkpoint of step %d to %s.", step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mvmae_jax_checkpoints_set_aside")
    manager.reload()


def _restore_step(manager: ocp.CheckpointManager, state: Any,
                  step: int) -> tuple[Any, int | None, int]:
    """(state, this host's input position or None, step) of the checkpoint of `step`."""

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    bank = _bank(state)
    items = {STATE: ocp.args.StandardRestore(jax.tree.map(abstract, _without_bank(state))),
             INPUT: ocp.args.JsonRestore()}
    if bank is not None:
        # Only padding rows beyond the example count can differ between device counts.
        items[BANK] = ocp.args.StandardRestore({"bank": abstract(bank)}, strict=False)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    restored_state = restored[STATE]
    if bank is not None:
        restored_state = _with_bank(restored_state, restored[BANK]["bank"])
    saved = restored[INPUT]
    if saved["process_count"] != jax.process_count():
        logging.warning("The checkpoint was written by %d processes and is restored by %d: the "
                        "input stream restarts at the beginning of the current epoch.",
                        saved["process_count"], jax.process_count())
        return restored_state, None, step
    return restored_state, saved["positions"][jax.process_index()], step


def position_from_row(row: list[int], host_size: int) -> int:
    epoch, offset = row
    return int(epoch) * host_size + int(offset)


def resolve_checkpoint(path: str, step: int | None = None) -> tuple[epath.Path, int]:
    """(checkpoint directory, step) from a workdir (latest or `step`) or a checkpoint directory
    (`WORKDIR/checkpoints/<step>`)."""
    path = epath.Path(path)
    if (path / STATE).exists():
        if not path.name.isdigit():
            raise FileNotFoundError(f"{path} holds a checkpoint but is not named by its step")
        if step is not None and int(path.name) != step:
            raise ValueError(f"{path} is the checkpoint of step {path.name}, not of step {step}")
        return path, int(path.name)
    directory = path / "checkpoints"
    steps = sorted(int(child.name) for child in (directory.iterdir() if directory.is_dir() else [])
                   if child.name.isdigit() and (child / STATE).exists())
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; there are {steps}")
    return directory / str(step), step


def load_config(path: str, step: int | None = None,
                ) -> tuple[ml_collections.ConfigDict, epath.Path, int]:
    """(config, checkpoint directory, step) of a run's checkpoint (see `load_params`)."""
    checkpoint, step = resolve_checkpoint(path, step)
    config = ml_collections.ConfigDict(
        json.loads((checkpoint.parent.parent / "config.json").read_text()))
    return config, checkpoint, step


def load_params(path: str, step: int | None = None,
                ) -> tuple[ml_collections.ConfigDict, Any, int]:
    """(config, parameters as host numpy arrays, step) of a run's checkpoint.

    `path` is a workdir (its latest checkpoint, or `step`) or one checkpoint directory. Only
    the parameters are read: the optimizer state and the bank stay on disk, and nothing needs
    the mesh or the device count that wrote them. (No TensorFlow here: users load encoders next
    to PyTorch, whose torchvision must be imported before TensorFlow.)
    """
    config, checkpoint, step = load_config(path, step)
    # The item's own handler: a Checkpointer would also look for the step's metadata file
    # inside the item directory and warn that it is missing there.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(checkpoint / STATE)
        tree = getattr(metadata, "tree", metadata)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                tree["params"])
        restored = handler.restore(checkpoint / STATE, args=ocp.args.PyTreeRestore(
            item={"params": as_numpy}, restore_args={"params": as_numpy},
            partial_restore=True))
    finally:
        handler.close()
    return config, restored["params"], step
