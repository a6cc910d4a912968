"""Evaluators configured under `config.evals` (see common.py); importing this package
registers the built-in types: "knn" and "classification"."""

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

__all__ = ["REGISTRY", "Batches", "EvalContext", "Evaluator", "due", "make_evaluators",
           "register"]
