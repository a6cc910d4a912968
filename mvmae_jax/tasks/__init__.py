"""What the one training loop trains: pretraining, or the linear probe and fine-tuning.

A task gives the loop its model and state (`init`, `optimizer`), its phases, the gradients of
a step (`gradients`), its batches (`train_batches`), what runs at an epoch's start
(`make_epoch_start`), its pictures (`make_pictures`), and what the evaluators apply
(`eval_params`, `encode`, `logits`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import ml_collections
from jax.sharding import Mesh

from mvmae_jax.default_config import FINETUNE, PROBE
from mvmae_jax.tasks.classify import ClassifyTask
from mvmae_jax.tasks.classify import resolve_config as _resolve_classify_config
from mvmae_jax.tasks.pretrain import PretrainTask

__all__ = ["ClassifyTask", "PretrainTask", "Task", "build", "resolve_config"]


@runtime_checkable
class Task(Protocol):
    """What the training loop trains. `init(rng)` → (params, extras); `optimizer(schedule)`;
    `phases` (each compiled once) and `phase_at_epoch(epoch)`; `gradients(params, extras,
    batch, rng, phase)` → (grads, metrics, extras), traceable; `train_batches(position,
    should_stop)` → (global batch, next position) pairs; `make_epoch_start` and
    `make_pictures` → functions or None; `eval_params(state)`, `encode`, `logits` (or None)
    for the evaluators; `num_classes` (None for pretraining)."""

    phases: tuple[str, ...]
    num_classes: int | None

    def init(self, rng: Any) -> tuple[Any, dict[str, Any]]: ...
    def optimizer(self, schedule: Any) -> Any: ...
    def phase_at_epoch(self, epoch: int) -> str: ...
    def gradients(self, params: Any, extras: dict[str, Any], batch: dict[str, Any],
                  rng: Any, phase: str) -> tuple[Any, dict[str, Any], dict[str, Any]]: ...
    def train_batches(self, start_position: int, should_stop: Any = None) -> Any: ...
    def make_epoch_start(self, state_sharding: Any) -> Any: ...
    def make_pictures(self, state_sharding: Any) -> Any: ...
    def eval_params(self, state: Any) -> Any: ...


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the run trains with: a probe or fine-tuning takes the encoder size and input
    normalisation of its pretraining run (`init_from`)."""
    if config.task in (PROBE, FINETUNE):
        return _resolve_classify_config(config)
    return config


def build(config: ml_collections.ConfigDict, mesh: Mesh,
          train_source: Any) -> Task:
    task = PretrainTask if config.task == "pretrain" else ClassifyTask
    return task(config, mesh, train_source)
