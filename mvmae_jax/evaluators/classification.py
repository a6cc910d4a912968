"""The classification evaluator: top-1, top-5 and loss of a classifier over the eval split."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mvmae_jax import sharding
from mvmae_jax.evaluators import common


def make_accumulate(logits_fn: Callable[[Any, jax.Array], jax.Array], mesh: Mesh):
    """Jitted () → totals and (totals, params, batch) → totals: top1, top5, count and summed
    cross-entropy over the valid rows."""
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)

    def zeros():
        return {"top1": jnp.zeros((), jnp.int32), "top5": jnp.zeros((), jnp.int32),
                "loss": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.int32)}

    def accumulate(totals, params, batch):
        images = jax.lax.with_sharding_constraint(batch["image"], batch_sharding)
        logits = logits_fn(params, images).astype(jnp.float32)
        labels, valid = batch["label"], batch["valid"]
        top_k = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        top1 = (top_k[:, 0] == labels) & valid
        top5 = jnp.any(top_k == labels[:, None], axis=-1) & valid
        # Padding rows carry label -1: any class will do, their loss is dropped.
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        return {"top1": totals["top1"] + jnp.sum(top1.astype(jnp.int32)),
                "top5": totals["top5"] + jnp.sum(top5.astype(jnp.int32)),
                "loss": totals["loss"] + jnp.sum(jnp.where(valid, loss, 0.0)),
                "count": totals["count"] + jnp.sum(valid.astype(jnp.int32))}

    return (jax.jit(zeros, out_shardings=replicated),
            jax.jit(accumulate, donate_argnums=0, out_shardings=replicated))


@common.register("classification")
class ClassificationEvaluator:
    """eval/top1, eval/top5, eval/loss and eval/seconds of `ctx.logits` on the eval split."""

    needs_labels = True

    def __init__(self, name: str, section, ctx: common.EvalContext):
        self.name, self.every_steps = name, int(section.every_steps)
        if ctx.logits is None:
            raise ValueError(f"config.evals.{name} (classification) needs the classifier: "
                             "EvalContext.logits")
        self.batch_size = common.batch_size(section, ctx.config)
        self._ctx = ctx
        self._zeros, self._accumulate = make_accumulate(ctx.logits, ctx.mesh)

    def evaluate(self, params, batches: Iterable[dict]) -> dict[str, float]:
        """The metrics of `params` over global batches with `image`, `label`, `valid`."""
        started = time.time()
        totals = self._zeros()
        for batch in batches:
            batch = {name: batch[name] for name in ("image", "label", "valid")}
            totals = self._accumulate(totals, params, batch)
        totals = jax.device_get(totals)
        count = max(int(totals["count"]), 1)
        result = {f"eval/{name}": float(totals[name]) / count for name in ("top1", "top5", "loss")}
        result["eval/seconds"] = time.time() - started
        logging.info("Eval top-1 %.4f, top-5 %.4f, loss %.4f (%d images) in %.1fs.",
                     result["eval/top1"], result["eval/top5"], result["eval/loss"],
                     int(totals["count"]), result["eval/seconds"])
        return result

    def run(self, params) -> dict[str, float]:
        return self.evaluate(params, self._ctx.batches("eval", self.batch_size, 0))
