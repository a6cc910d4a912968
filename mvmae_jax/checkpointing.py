"""Orbax checkpoints of the train state, its extras and the input position, written
asynchronously."""

from __future__ import annotations

import contextlib
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
INPUT = "input"


class CheckpointError(ValueError):
    """A checkpoint cannot be restored or saved as asked; the message says what to do."""


def make_manager(directory: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The run's checkpoint manager, keeping the newest `keep` (>= 1) checkpoints."""
    if keep < 1:
        # orbax reads max_to_keep=0 as "keep none": a run would finish with no checkpoint.
        raise CheckpointError(f"keep_checkpoints={keep} must be at least 1")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    _drop_closed_loop_errors()
    return ocp.CheckpointManager(directory, options=options)


def gather_positions(position: int, host_size: int) -> list[list[int]]:
    """Every host's stream position as (epoch, offset) rows, in process order (collective);
    not one integer, which can pass 2**31 in long runs."""
    local = np.array(divmod(int(position), host_size), np.int32)
    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).tolist()


def position_from_row(row: list[int], host_size: int) -> int:
    epoch, offset = row
    return int(epoch) * host_size + int(offset)


def _split(state: Any) -> tuple[Any, dict[str, dict[str, Any]]]:
    """(the state item: the state less the extras saved apart, {item: {name: extra}})."""
    kept, apart = {}, {}
    for name, value in state.extras.items():
        item = state.extra_spec(name).item
        (kept if item is None else apart.setdefault(item, {}))[name] = value
    return state.replace(extras=kept), apart


def save(manager: ocp.CheckpointManager, state: Any, positions: list[list[int]],
         force: bool = False) -> bool:
    """Starts an asynchronous save (every host calls it); returns whether one was started."""
    step = int(jax.device_get(state.step))
    state_item, apart = _split(state)
    items = {item: ocp.args.StandardSave(values) for item, values in apart.items()}
    items[STATE] = ocp.args.StandardSave(state_item)
    items[INPUT] = ocp.args.JsonSave({"process_count": len(positions), "positions": positions})
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
        logging.info("Saving checkpoint of step %d.", step)
    return saved


class SaveMonitor:
    """Saves through a manager and reports a failed asynchronous save in one line; the run goes
    on unless the next save fails too. `save` and `finish` are collective, `poll` is local."""

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self.failure: str | None = None  # The failed save not yet followed by a good one.
        self._unchecked: int | None = None  # The step of a started save not yet waited for.

    def poll(self) -> str | None:
        """Non-blocking: the report of a background save that failed since the last call."""
        if self._unchecked is None or self.manager.is_saving_in_progress():
            return None
        return self._wait()

    def _wait(self) -> str | None:
        step, self._unchecked = self._unchecked, None
        try:
            self.manager.wait_until_finished()  # Raises a background failure once.
        except Exception as error:  # noqa: BLE001 — reported in one line
            return self._record(step, error)

    def _record(self, step: int | None, error: BaseException) -> str:
        self.failure = (f"the checkpoint of step {step} in {self.manager.directory} failed to "
                        f"save ({_first_line(error)})")
        line = (f"{self.failure[0].upper()}{self.failure[1:]}; training goes on and stops "
                "unless the next one saves.")
        logging.error("%s", line)
        return line

    def _stop(self, failure: str) -> CheckpointError:
        self.manager.reload()
        step = self.manager.latest_step()
        newest = ("no checkpoint is saved" if step is None else
                  f"the newest saved checkpoint is step {step}")
        return CheckpointError(f"{failure}{newest}. Free space or fix the directory, then resume")

    def save(self, state: Any, positions: list[list[int]], force: bool = False) -> bool:
        """`save`; after a failed save, waits for this one and raises CheckpointError if it
        fails too: a run that cannot checkpoint stops rather than train on unsaved."""
        step = int(jax.device_get(state.step))
        self._wait()
        retry = not _on_every_process(self.failure is None)
        error = None
        try:
            started = save(self.manager, state, positions, force)
            if retry and started:
                self.manager.wait_until_finished()
            elif started:
                self._unchecked = step
        except Exception as caught:  # noqa: BLE001 — reported in one line
            started, error = False, caught
        if _on_every_process(error is None):
            if retry and started:
                logging.warning("The checkpoint of step %d saved; the earlier failure is over.",
                                step)
                self.failure = None
            return started
        if retry:
            raise self._stop(f"{self.failure}, and the checkpoint of step {step} failed too "
                             f"({_first_line(error) if error else 'on another process'}); "
                             "stopping: ")
        if error is not None:
            self._record(step, error)
        else:
            self.failure = f"the checkpoint of step {step} failed to save on another process"
        return False

    def finish(self) -> None:
        """Waits for the last save; CheckpointError if it (or the one before) failed."""
        self._wait()
        if not _on_every_process(self.failure is None):
            raise self._stop(
                f"{self.failure or 'a checkpoint failed to save on another process'}; ")


def restore_latest(manager: ocp.CheckpointManager, state: Any,
                   step: int | None = None) -> tuple[Any, int | None, int] | None:
    """(state like `state`, this host's input position or None if the process count changed, step)
    of the newest checkpoint that restores (or of `step`), or None without one. Unreadable ones
    are renamed `<step>.unreadable`; CheckpointError when none restores or the shapes differ."""
    candidates = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not candidates:
        return None
    for tried, candidate in enumerate(candidates, 1):
        try:
            _check_shapes(manager, candidate, _split(state)[0])
            result, error = _restore_step(manager, state, candidate), None
        except CheckpointError:
            raise
        except Exception as caught:  # noqa: BLE001 — any unreadable checkpoint is skipped
            result, error = None, caught
        if _on_every_process(error is None):
            _set_aside(manager, candidates[:tried - 1])
            logging.info("Restored checkpoint of step %d from %s.", candidate, manager.directory)
            return result
        logging.warning("Skipping checkpoint of step %d in %s: it does not restore (%s).",
                        candidate, manager.directory,
                        _first_line(error) if error else "it fails on another process")
    raise CheckpointError(
        f"no checkpoint in {manager.directory} restores (tried steps "
        f"{', '.join(map(str, candidates))}); refusing to start from scratch; move the "
        "checkpoints away to start over")


def _drop_closed_loop_errors() -> None:
    """From now on, drops the "Event loop is closed" unraisable exceptions; any other still
    reaches the previous hook. Orbax has no public way to avoid them: at the first array of a
    checkpoint that fails to read or write, it closes its event loop while tensorstore still
    reads or writes the others, and each of those prints a traceback as it ends (Orbax
    0.12.4-0.12.8, the versions setup.py allows)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_errors", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def _on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process (collective)."""
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"params.encoder.kernel": shape} for every array leaf of a pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
            for path, leaf in leaves if hasattr(leaf, "shape")}


def _check_shapes(manager: ocp.CheckpointManager, step: int, target: Any) -> None:
    """CheckpointError naming the first array whose shape differs between the checkpoint of
    `step` and `target` (the config's state item)."""
    saved = _shapes_by_path(_state_metadata(epath.Path(manager.directory) / str(step)))
    wanted = _shapes_by_path(target)
    differences = [f"{path} (shape {shape}) is not in the checkpoint" if path not in saved else
                   f"{path} has shape {saved[path]} in the checkpoint and {shape} in the config"
                   for path, shape in wanted.items() if saved.get(path) != shape]
    differences += [f"{path} (shape {shape}) is in the checkpoint but not in the config"
                    for path, shape in saved.items() if path not in wanted]
    if differences:
        raise CheckpointError(
            f"the checkpoint of step {step} in {manager.directory} does not match the config: "
            f"{differences[0]}; resume with the config the run started with (its config.json) "
            "or use a new workdir")


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames unreadable checkpoints to `<step>.unreadable`, so that the run saves them again."""
    if not steps:
        return
    if jax.process_index() == 0:
        for step in steps:
            source = epath.Path(manager.directory) / str(step)
            earlier = len(list(source.parent.glob(f"{step}.unreadable*")))
            target = source.parent / f"{step}.unreadable{f'-{earlier + 1}' if earlier else ''}"
            if source.exists():
                source.rename(target)
                logging.warning("Moved the unreadable checkpoint of step %d to %s.", step, target)
    multihost_utils.sync_global_devices("mvmae_jax_checkpoints_set_aside")
    manager.reload()


def _restore_step(manager: ocp.CheckpointManager, state: Any,
                  step: int) -> tuple[Any, int | None, int]:
    state_item, apart = _split(state)
    # Items saved apart restore leniently: only padding rows differ between meshes.
    items = {item: ocp.args.StandardRestore(values, strict=False) for item, values in apart.items()}
    items[STATE] = ocp.args.StandardRestore(state_item)
    items[INPUT] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    extras = dict(restored[STATE].extras)
    for item in apart:
        extras.update(restored[item])
    restored_state = restored[STATE].replace(extras=extras)
    saved = restored[INPUT]
    if saved["process_count"] != jax.process_count():
        logging.warning("The checkpoint was written by %d processes and is restored by %d: the "
                        "input stream restarts at the beginning of the current epoch.",
                        saved["process_count"], jax.process_count())
        return restored_state, None, step
    return restored_state, saved["positions"][jax.process_index()], step


def resolve_checkpoint(path: str, step: int | None = None) -> tuple[epath.Path, int]:
    """(checkpoint directory, step) of a workdir (latest or `step`) or of a checkpoint directory."""
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


def load_params(path: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any, int]:
    """(config, parameters as host numpy arrays, step) of a workdir's checkpoint (latest or `step`)
    or of a checkpoint directory, without the mesh that wrote it (and without TensorFlow)."""
    config, checkpoint, step = load_config(path, step)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            _state_metadata(checkpoint)["params"])
    with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
        restored = handler.restore(checkpoint / STATE, args=ocp.args.PyTreeRestore(
            item={"params": as_numpy}, restore_args={"params": as_numpy},
            partial_restore=True))
    return config, restored["params"], step


def _state_metadata(checkpoint: epath.Path) -> dict[str, Any]:
    """The array metadata tree of a checkpoint's state item, read by the item's own handler
    (the manager would also read, and warn about, the other items)."""
    with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
        return handler.metadata(checkpoint / STATE).tree
