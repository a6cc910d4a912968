"""The kNN evaluator (DINO's weighted vote on frozen features), sharded over the mesh; its
config fields and layout are in docs/implementation.md."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from mvmae_jax import sharding
from mvmae_jax.errors import in_range, one_of
from mvmae_jax.evaluators import common
from mvmae_jax.losses import l2_normalise
from mvmae_jax.models.vit import pool_tokens


def knn_scores(queries: jax.Array, keys: jax.Array, key_labels: jax.Array,
               key_valid: jax.Array | None = None, *, num_classes: int, k: int = 20,
               temperature: float = 0.07) -> jax.Array:
    """Class scores (Q, C): each of the k nearest keys by cosine similarity s votes for its
    label with weight exp(s / temperature); keys with `key_valid` False (padding) never vote."""
    sims = l2_normalise(queries) @ l2_normalise(keys).T
    if key_valid is not None:
        sims = jnp.where(key_valid[None, :], sims, -jnp.inf)
    k = min(k, keys.shape[0])
    top_sims, top_index = jax.lax.top_k(sims, k)
    weights = jnp.where(jnp.isfinite(top_sims), jnp.exp(top_sims / temperature), 0.0)
    votes = jax.nn.one_hot(key_labels[top_index], num_classes, dtype=jnp.float32)
    return jnp.sum(votes * weights[..., None], axis=1)


@common.register("knn")
class KnnEvaluator:
    """eval/knn_top1, eval/knn_seconds and eval/knn_train_examples of the encoder: features
    of a train subset vote for each eval image."""

    needs_labels = True

    def __init__(self, name: str, section, ctx: common.EvalContext):
        self.name, self.every_steps = name, int(section.every_steps)
        if ctx.encode is None:
            raise ValueError(f"config.evals.{name} (knn) needs the encoder: EvalContext.encode")
        self.batch_size = common.batch_size(section, ctx.config)
        self.train_examples = int(section.train_examples)
        self._ctx = ctx
        k, temperature, feature = int(section.k), float(section.temperature), section.feature
        batch = sharding.batch_sharding(ctx.mesh)
        replicated = sharding.replicated(ctx.mesh)

        def features(params, images):
            images = jax.lax.with_sharding_constraint(images, batch)
            out = pool_tokens(ctx.encode(params, images), feature).astype(jnp.float32)
            return jax.lax.with_sharding_constraint(out, batch)

        def empty_keys(num_rows: int, dim: int) -> dict[str, jax.Array]:
            return {"keys": jnp.zeros((num_rows, dim), jnp.float32),
                    "labels": jnp.full((num_rows,), -1, jnp.int32),
                    "valid": jnp.zeros((num_rows,), bool),
                    "filled": jnp.zeros((), jnp.int32)}

        def add_keys(store, params, batch):
            # Rows [filled, filled + B) of the buffer; its size is a multiple of B.
            start = store["filled"]
            rows = {"keys": features(params, batch["image"]), "labels": batch["label"],
                    "valid": batch["valid"]}
            out = {name: jax.lax.dynamic_update_slice_in_dim(store[name], value, start, axis=0)
                   for name, value in rows.items()}
            out["filled"] = start + batch["image"].shape[0]
            return out

        def start_totals(store):
            return {"correct": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32),
                    "keys": jnp.sum(store["valid"].astype(jnp.int32))}

        def score(totals, params, store, batch):
            queries = features(params, batch["image"])
            scores = knn_scores(queries, store["keys"], store["labels"], store["valid"],
                                num_classes=ctx.num_classes, k=k, temperature=temperature)
            hits = (jnp.argmax(scores, axis=-1) == batch["label"]) & batch["valid"]
            return dict(totals, correct=totals["correct"] + jnp.sum(hits.astype(jnp.int32)),
                        count=totals["count"] + jnp.sum(batch["valid"].astype(jnp.int32)))

        self._features = features
        self._empty_keys = jax.jit(empty_keys, static_argnums=(0, 1), out_shardings=replicated)
        self._add_keys = jax.jit(add_keys, donate_argnums=0, out_shardings=replicated)
        self._start_totals = jax.jit(start_totals, out_shardings=replicated)
        self._score = jax.jit(score, donate_argnums=0, out_shardings=replicated)

    def evaluate(self, params, train_batches: Iterable[dict], num_train_batches: int,
                 eval_batches: Iterable[dict]) -> dict[str, float]:
        """The metrics of `params`: `train_batches` (at most `num_train_batches`) and
        `eval_batches` are global batches of one size with `image`, `label`, `valid`; every
        process passes the same number."""
        started = time.time()
        store = None
        for index, batch in enumerate(train_batches):
            if index >= num_train_batches:
                raise ValueError(f"more than the {num_train_batches} train batches announced")
            batch = {name: batch[name] for name in ("image", "label", "valid")}
            if store is None:  # the buffer's shape needs the feature width: trace, not run
                dim = jax.eval_shape(self._features, params, batch["image"]).shape[-1]
                store = self._empty_keys(num_train_batches * batch["image"].shape[0], dim)
            store = self._add_keys(store, params, batch)
        if store is None:
            raise ValueError("the kNN evaluation got no train batches")
        totals = self._start_totals(store)
        for batch in eval_batches:
            batch = {name: batch[name] for name in ("image", "label", "valid")}
            totals = self._score(totals, params, store, batch)
        totals = jax.device_get(totals)
        correct, count, num_keys = (int(totals[n]) for n in ("correct", "count", "keys"))
        seconds = time.time() - started
        top1 = correct / max(count, 1)
        logging.info("kNN top-1 %.4f (%d of %d eval images; %d train features) in %.1fs.", top1,
                     correct, count, num_keys, seconds)
        return {"eval/knn_top1": top1, "eval/knn_seconds": seconds,
                "eval/knn_train_examples": float(num_keys)}

    def run(self, params) -> dict[str, float]:
        train = self._ctx.batches("train", self.batch_size, self.train_examples)
        evals = self._ctx.batches("eval", self.batch_size, 0)
        return self.evaluate(params, train, len(train), evals)

    @staticmethod
    def check_config(path: str, section) -> None:
        """Raises ConfigError for bad kNN fields in the section `config.<path>`."""
        in_range(f"{path}.k", section.k, 1)
        in_range(f"{path}.train_examples", section.train_examples, 0)
        in_range(f"{path}.temperature", section.temperature, 0, low_open=True)
        one_of(f"{path}.feature", section.feature, ("cls", "mean"))
