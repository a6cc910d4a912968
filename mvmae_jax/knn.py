"""The kNN monitor (DINO's weighted vote on frozen features), sharded over the mesh.

Features of a labelled train subset are computed once per evaluation and kept on every device
(M x D floats: 50,000 ViT-B features are 150 MB); the evaluation batches stay split over the
mesh, so each device scores its own queries against all of them and only the counts of
correct predictions are reduced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mvmae_jax import sharding


def pool_tokens(tokens: jax.Array, pool: str) -> jax.Array:
    """Final-norm tokens (B, 1 + N, D) → one feature per image: [CLS] or the patch mean."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(axis=1)
    raise ValueError(f"feature pool must be 'cls' or 'mean', got {pool!r}")


def l2_normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def knn_scores(queries: jax.Array, keys: jax.Array, key_labels: jax.Array,
               key_valid: jax.Array | None = None, *, num_classes: int, k: int = 20,
               temperature: float = 0.07) -> jax.Array:
    """Class scores (Q, C) of a weighted kNN vote with cosine similarity.

    Each of the k nearest keys (by cosine similarity s) votes for its label with weight
    exp(s / temperature). Keys with `key_valid` False (padding) never vote. Features need not
    be normalised.
    """
    sims = l2_normalise(queries) @ l2_normalise(keys).T
    if key_valid is not None:
        sims = jnp.where(key_valid[None, :], sims, -jnp.inf)
    k = min(k, keys.shape[0])
    top_sims, top_index = jax.lax.top_k(sims, k)
    weights = jnp.where(jnp.isfinite(top_sims), jnp.exp(top_sims / temperature), 0.0)
    votes = jax.nn.one_hot(key_labels[top_index], num_classes, dtype=jnp.float32)
    return jnp.sum(votes * weights[..., None], axis=1)


def make_feature_fn(encode: Callable[[Any, jax.Array], jax.Array], mesh: Mesh,
                    pool: str) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted (params, images) → pooled float32 features, split over the mesh like the images.

    `encode(params, images)` returns the encoder's final-norm tokens (B, 1 + N, D).
    """
    batch = sharding.batch_sharding(mesh)

    @jax.jit
    def features(params, images):
        images = jax.lax.with_sharding_constraint(images, batch)
        out = pool_tokens(encode(params, images), pool).astype(jnp.float32)
        return jax.lax.with_sharding_constraint(out, batch)

    return features


def make_knn_eval_fn(mesh: Mesh, *, num_classes: int, k: int, temperature: float):
    """Jitted (queries, labels, valid, keys, key_labels, key_valid) → number correct (int32)."""
    batch = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)

    @jax.jit
    def correct(queries, labels, valid, keys, key_labels, key_valid):
        queries = jax.lax.with_sharding_constraint(queries, batch)
        keys, key_labels, key_valid = (jax.lax.with_sharding_constraint(x, replicated)
                                       for x in (keys, key_labels, key_valid))
        scores = knn_scores(queries, keys, key_labels, key_valid, num_classes=num_classes, k=k,
                            temperature=temperature)
        hits = (jnp.argmax(scores, axis=-1) == labels) & valid
        return jnp.sum(hits.astype(jnp.int32))

    return correct


def _concatenate(mesh: Mesh):
    return jax.jit(lambda *parts: jnp.concatenate(parts, axis=0),
                   out_shardings=sharding.replicated(mesh))


class KnnEvaluator:
    """Computes `eval/knn_top1` of an encoder: train-subset features as keys, eval split as queries.

    Args:
      encode: (params, images) → final-norm tokens (B, 1 + N, D) of the encoder.
      mesh: the device mesh.
      train_batches, eval_batches: callables returning iterables of global batches with
        `image`, `label`, `valid` (padding rows invalid); called at every evaluation.
      num_classes, k, temperature, pool: the vote (METHOD.md section 7: k 20, temperature 0.07).
    """

    def __init__(self, encode: Callable, mesh: Mesh, train_batches: Callable[[], Iterable],
                 eval_batches: Callable[[], Iterable], *, num_classes: int, k: int = 20,
                 temperature: float = 0.07, pool: str = "cls"):
        self._features = make_feature_fn(encode, mesh, pool)
        self._correct = make_knn_eval_fn(mesh, num_classes=num_classes, k=k,
                                         temperature=temperature)
        self._concatenate = _concatenate(mesh)
        self._train_batches = train_batches
        self._eval_batches = eval_batches

    def __call__(self, params) -> dict[str, float]:
        """{'eval/knn_top1', 'eval/knn_seconds', 'eval/knn_train_examples'} for `params`."""
        started = time.time()
        keys, key_labels, key_valid = [], [], []
        for batch in self._train_batches():
            keys.append(self._features(params, batch["image"]))
            key_labels.append(batch["label"])
            key_valid.append(batch["valid"])
        keys = self._concatenate(*keys)
        key_labels = self._concatenate(*key_labels)
        key_valid = self._concatenate(*key_valid)
        correct = jnp.zeros((), jnp.int32)
        count = jnp.zeros((), jnp.int32)
        for batch in self._eval_batches():
            queries = self._features(params, batch["image"])
            correct = correct + self._correct(queries, batch["label"], batch["valid"], keys,
                                              key_labels, key_valid)
            count = count + jnp.sum(batch["valid"].astype(jnp.int32))
        correct, count, num_keys = jax.device_get(
            (correct, count, jnp.sum(key_valid.astype(jnp.int32))))
        seconds = time.time() - started
        top1 = float(correct) / max(int(count), 1)
        logging.info("kNN top-1 %.4f (%d of %d eval images; %d train features) in %.1fs.", top1,
                     correct, count, num_keys, seconds)
        return {"eval/knn_top1": top1, "eval/knn_seconds": seconds,
                "eval/knn_train_examples": float(num_keys)}


def encoder_tokens(model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """(params, images) → final-norm tokens of an `MVMAE`'s encoder, all patches visible."""
    def encode(params, images):
        return model.apply({"params": params}, images,
                           method=lambda module, x: module.encoder(x)["tokens"])
    return encode

