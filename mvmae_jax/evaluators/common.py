"""Evaluators: plug-ins that score the parameters during training, each on its own schedule.

Every section `config.evals.<name>` builds one evaluator: its `type` picks a registered class,
its `every_steps` says when it runs (> 0: every that many steps and at the end; 0: only at the
end; -1: never), and the other fields are the evaluator's own settings (`batch_size` 0 means
`config.batch_size`). A new kind of evaluation is a subclass of `Evaluator` decorated with
`@register("its_type")` whose `run(params)` returns a dict of scalars; the training loop
needs no change.

Every process calls `run` with the same global parameters. Evaluators keep their running sums
on the devices, replicated, and update them only inside compiled functions (totals in, totals
out); the host fetches the totals once, at the end. Eager jnp operations on global arrays
outside jit are avoided: each is a program of its own that every process must join, and in a
multi-process run they hung the evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

REGISTRY: dict[str, type[Evaluator]] = {}


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator may use, built once by the training loop.

    Attributes:
      config: the whole run config.
      mesh: the device mesh.
      train_source, eval_source: this host's sources of the train and eval splits
        (`input_pipeline.make_source`).
      num_classes: the number of labelled classes; None when the data has no labels.
      encode: (params, uint8 images) -> the encoder's final-norm tokens (B, 1 + N, D);
        traceable.
      logits: (params, uint8 images) -> class logits (B, num_classes); traceable.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    train_source: Any
    eval_source: Any
    num_classes: int | None
    encode: Callable | None = None
    logits: Callable | None = None


class Evaluator:
    """The base of every evaluator: a name, a schedule and `run(params) -> {name: scalar}`.

    Subclasses are built as `cls(name, section, ctx)` with their `config.evals` section and
    the `EvalContext`; `needs_labels` False lets one run on unlabelled data.
    """

    needs_labels: bool = True

    def __init__(self, name: str, section: ml_collections.ConfigDict, ctx: EvalContext):
        self.name = name
        self.every_steps = int(section.every_steps)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to run after `step` of `total_steps` training steps."""
        if self.every_steps < 0:
            return False
        if step == total_steps:
            return True
        return self.every_steps > 0 and step % self.every_steps == 0

    def run(self, params) -> dict[str, float]:
        """Scalars for `params` (global arrays); called by every process."""
        raise NotImplementedError


def register(type_name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Class decorator: `config.evals.<name>.type = type_name` builds this evaluator."""
    def add(cls: type[Evaluator]) -> type[Evaluator]:
        REGISTRY[type_name] = cls
        return cls
    return add


def batch_size(section: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> int:
    """The section's global batch size; 0 (or none given) means config.batch_size."""
    return int(section.get("batch_size", 0) or config.batch_size)


def has_labels(ctx: EvalContext) -> bool:
    """Whether both splits have class labels."""
    return bool(ctx.num_classes) and bool(getattr(ctx.eval_source, "num_classes", None))


def make_evaluators(ctx: EvalContext) -> list[Evaluator]:
    """One evaluator per `config.evals` section, in the order of their names.

    Sections with every_steps -1 build nothing. Evaluators that need labels are skipped, with
    one warning line, when the data has none.
    """
    evaluators, unlabelled = [], []
    for name, section in ctx.config.evals.items():
        if section.every_steps < 0:
            continue
        cls = REGISTRY[section.type]
        if cls.needs_labels and not has_labels(ctx):
            unlabelled.append(name)
            continue
        evaluators.append(cls(name, section, ctx))
    if unlabelled:
        logging.warning("Not running the evaluators %s: they need class labels in the train and "
                        "eval data (set config.evals.<name>.every_steps=-1 to silence this).",
                        ", ".join(unlabelled))
    return evaluators
