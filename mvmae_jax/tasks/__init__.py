"""What the one training loop trains: pretraining, or the linear probe and fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import ml_collections
from jax.sharding import Mesh

from mvmae_jax.tasks.classify import ClassifyTask, resolve_config
from mvmae_jax.tasks.pretrain import PretrainTask

__all__ = ["ClassifyTask", "PretrainTask", "Task", "build", "resolve_config"]


@runtime_checkable
class Task(Protocol):
    """What the training loop trains; built as `cls(config, mesh, train_source)`."""

    phases: tuple[str, ...]  # each phase's step is compiled once
    num_classes: int | None  # None for pretraining
    encode: Callable | None  # (eval params, uint8 images) → tokens (B, 1 + N, D)
    logits: Callable | None  # (eval params, uint8 images) → logits (B, num_classes)
    extras_spec: dict[str, Any]  # extra name → train_step.ExtraSpec (sharding, checkpoint item)

    def init(self, rng: Any) -> tuple[Any, dict[str, Any]]:
        """(trained parameters, extras) of a fresh run."""

    def optimizer(self, schedule: Any) -> Any:
        """The optax optimizer of the trained parameters."""

    def phase_at_epoch(self, epoch: int) -> str:
        """The phase whose step trains `epoch`."""

    def gradients(self, params: Any, extras: dict[str, Any], batch: dict[str, Any],
                  rng: Any, phase: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(gradients, scalar metrics with "loss", extras) of one global batch; traceable."""

    def make_epoch_start(self, state_sharding: Any, bank_batches: Iterable[dict]
                         ) -> Callable | None:
        """(state, epoch) → (state, scalars) run at each epoch's start, or None; may read
        `bank_batches` (the training split once, whole images, in order)."""

    def make_pictures(self, state_sharding: Any) -> Callable | None:
        """(state, batch, rng, phase, step) → uint8 RGB picture, or None."""

    def eval_params(self, state: Any) -> Any:
        """What `encode` and `logits` take, from the train state."""


def build(config: ml_collections.ConfigDict, mesh: Mesh, train_source: Any) -> Task:
    task = PretrainTask if config.task == "pretrain" else ClassifyTask
    return task(config, mesh, train_source)
