"""Evaluators: plug-ins, one per `config.evals.<name>` section, scoring the parameters on their
own schedules; their sums stay on the devices, changed only inside compiled functions."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sized
from typing import Any, Protocol, runtime_checkable

import jax
import ml_collections


class Batches(Sized, Iterable, Protocol):
    """Global batches with `image` (uint8), `label` and `valid` (False on padding rows)."""


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator may use, built once by the loop. `num_classes` is None unless both
    splits have labels; `batches(split, global_batch, max_examples)` gives a split once, padded;
    `encode` and `logits` map (params, uint8 images) to final-norm tokens and class logits."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    num_classes: int | None  # None unless both splits have labels
    # (split "train" or "eval", global batch size, max_examples; 0: all) → the split once, padded.
    batches: Callable[[str, int, int], Batches] | None = None
    encode: Callable | None = None  # (params, uint8 images) → final-norm tokens (B, 1 + N, D)
    logits: Callable | None = None  # (params, uint8 images) → class logits (B, num_classes)


@runtime_checkable
class Evaluator(Protocol):
    """Built as `cls(name, section, ctx)` from its `config.evals` section and the context."""

    name: str
    every_steps: int  # > 0: every that many steps and at the end; 0: at the end; -1: never
    needs_labels: bool  # False: it runs on unlabelled data too

    def run(self, params: Any) -> dict[str, float]:
        """Scalars for `params` (global arrays); called by every process."""


REGISTRY: dict[str, type[Evaluator]] = {}


def register(type_name: str) -> Callable[[type], type]:
    """Class decorator: `config.evals.<name>.type = type_name` builds this evaluator."""
    def add(cls: type) -> type:
        REGISTRY[type_name] = cls
        return cls
    return add


def due(evaluator: Evaluator, step: int, total_steps: int) -> bool:
    """Whether `evaluator` runs after `step` of `total_steps` training steps."""
    every = evaluator.every_steps
    return every >= 0 and (step == total_steps or (every > 0 and step % every == 0))


def batch_size(section: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> int:
    """The section's global batch size; 0 (or none given) means config.batch_size."""
    return int(section.get("batch_size", 0) or config.batch_size)


def make_evaluators(ctx: EvalContext) -> list[Evaluator]:
    """One evaluator per `config.evals` section with every_steps >= 0, in name order; those that
    need labels are skipped, with one warning, when the data has none."""
    evaluators, unlabelled = [], []
    for name, section in ctx.config.evals.items():
        if section.every_steps < 0:
            continue
        cls = REGISTRY[section.type]
        if cls.needs_labels and not ctx.num_classes:
            unlabelled.append(name)
            continue
        evaluators.append(cls(name, section, ctx))
    if unlabelled:
        logging.warning("Not running the evaluators %s: they need class labels in the train and "
                        "eval data (set config.evals.<name>.every_steps=-1 to silence this).",
                        ", ".join(unlabelled))
    return evaluators
