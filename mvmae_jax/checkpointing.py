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


def make_manager(directory: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options, item_names=(STATE, BANK, INPUT))


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
    """The state item: the pretraining state without its bank (saved apart); other states whole."""
    return state.replace(bank=None) if hasattr(state, "bank") else state


def save(manager: ocp.CheckpointManager, state: Any, positions: list[list[int]],
         force: bool = False) -> bool:
    """Starts an asynchronous save (every host calls it); returns whether one was started."""
    step = int(jax.device_get(state.step))
    bank = getattr(state, "bank", None)
    items = {STATE: ocp.args.StandardSave(_without_bank(state)),
             INPUT: ocp.args.JsonSave({"process_count": len(positions),
                                       "positions": positions})}
    if bank is not None:
        items[BANK] = ocp.args.StandardSave({"bank": bank})
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
        logging.info("Saving checkpoint of step %d.", step)
    return saved


def restore_latest(manager: ocp.CheckpointManager, state: Any,
                   step: int | None = None) -> tuple[Any, int | None, int] | None:
    """(state, this host's input position or None, step) of the latest (or given) complete
    checkpoint, or None if there is none.

    `state` gives the structure, shapes and shardings to restore into, so a checkpoint restores
    onto any mesh. The input position is None when the process count changed: the hosts' parts
    of the data differ then, and the stream cannot continue exactly.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    bank = getattr(state, "bank", None)
    items = {STATE: ocp.args.StandardRestore(jax.tree.map(abstract, _without_bank(state))),
             INPUT: ocp.args.JsonRestore()}
    if bank is not None:
        # Only padding rows beyond the example count can differ between device counts.
        items[BANK] = ocp.args.StandardRestore({"bank": abstract(bank)}, strict=False)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint of step %d from %s.", step, manager.directory)
    restored_state = restored[STATE]
    if bank is not None:
        restored_state = restored_state.replace(bank=restored[BANK]["bank"])
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


def load_params(path: str, step: int | None = None,
                ) -> tuple[ml_collections.ConfigDict, Any, int]:
    """(config, parameters as host numpy arrays, step) of a run's checkpoint.

    `path` is a workdir (its latest checkpoint, or `step`) or one checkpoint directory. Only
    the parameters are read: the optimizer state and the bank stay on disk, and nothing needs
    the mesh or the device count that wrote them. (No TensorFlow here: users load encoders next
    to PyTorch, whose torchvision must be imported before TensorFlow.)
    """
    checkpoint, step = resolve_checkpoint(path, step)
    config = ml_collections.ConfigDict(
        json.loads((checkpoint.parent.parent / "config.json").read_text()))
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(checkpoint / STATE)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    restored = checkpointer.restore(
        checkpoint / STATE, args=ocp.args.PyTreeRestore(
            item={"params": as_numpy}, restore_args={"params": as_numpy}, partial_restore=True))
    return config, restored["params"], step
