"""Evaluators configured under `config.evals` (see common.py); the built-in types are "knn" and
"classification"."""

import ml_collections

from mvmae_jax.errors import in_range, need, one_of
from mvmae_jax.evaluators import classification, knn  # noqa: F401 — registers the types
from mvmae_jax.evaluators.common import (
    REGISTRY,
    Batches,
    EvalContext,
    Evaluator,
    due,
    make_evaluators,
    register,
)

__all__ = ["REGISTRY", "Batches", "EvalContext", "Evaluator", "check_config", "due",
           "make_evaluators", "register"]


def check_config(path: str, section) -> None:
    """Raises ConfigError for a bad evaluator section `config.<path>`, with the fields its class's
    `check_config(path, section)` checks, if it has one."""
    types = tuple(sorted(REGISTRY))
    need(isinstance(section, ml_collections.ConfigDict) and "type" in section,
         f"config.{path} must be a section with a `type` (one of {types})")
    one_of(f"{path}.type", section.type, types)
    need("every_steps" in section, f"config.{path}.every_steps is missing (> 0: every that many "
         "steps and at the end; 0: only at the end; -1: never)")
    in_range(f"{path}.every_steps", section.every_steps, -1)
    if "batch_size" in section:  # 0: config.batch_size
        in_range(f"{path}.batch_size", section.batch_size, 0)
    check = getattr(REGISTRY[section.type], "check_config", None)
    if check is not None:
        check(path, section)
