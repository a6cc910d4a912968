"""What the one training loop trains: pretraining, or the linear probe and fine-tuning.

A task gives the loop its model and state (`init`, `optimizer`), its phases, the gradients of
a step (`gradients`), its batches (`train_batches`), what runs at an epoch's start
(`make_epoch_start`), its pictures (`make_pictures`), and what the evaluators apply
(`eval_params`, `encode`, `logits`).
"""

from __future__ import annotations

from typing import Any

import ml_collections
from jax.sharding import Mesh

from mvmae_jax.default_config import FINETUNE, PROBE
from mvmae_jax.tasks.classify import ClassifyTask
from mvmae_jax.tasks.classify import resolve_config as _resolve_classify_config
from mvmae_jax.tasks.pretrain import PretrainTask

__all__ = ["ClassifyTask", "PretrainTask", "build", "resolve_config"]


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the run trains with: a probe or fine-tuning takes the encoder size and input
    normalisation of its pretraining run (`init_from`)."""
    if config.task in (PROBE, FINETUNE):
        return _resolve_classify_config(config)
    return config


def build(config: ml_collections.ConfigDict, mesh: Mesh,
          train_source: Any) -> PretrainTask | ClassifyTask:
    task = PretrainTask if config.task == "pretrain" else ClassifyTask
    return task(config, mesh, train_source)
