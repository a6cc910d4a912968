"""The kNN evaluator: the vote against hand-computed values and a numpy loop, and the sharded
evaluation on 8 devices against numpy."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mvmae_jax import sharding
from mvmae_jax.evaluators import common, knn


def numpy_knn_scores(queries, keys, key_labels, *, num_classes, k, temperature):
    """One query at a time: sort the cosine similarities, add exp(s / T) to the k labels."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    m = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    scores = np.zeros((len(q), num_classes))
    for i, query in enumerate(q):
        sims = m @ query
        for j in np.argsort(-sims, kind="stable")[:k]:
            scores[i, key_labels[j]] += np.exp(sims[j] / temperature)
    return scores


def test_vote_by_hand():
    # Query (1, 0). Keys: (2, 0) class 0 (cos 1), (0, 3) class 1 (cos 0), (1, 1) class 1
    # (cos 1/sqrt 2), (-1, 0) class 0 (cos -1). Temperature 0.5.
    keys = jnp.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = jnp.array([0, 1, 1, 0])
    query = jnp.array([[1.0, 0.0]])
    top3 = knn.knn_scores(query, keys, labels, num_classes=2, k=3, temperature=0.5)
    # The three nearest: class 0 with e^(1/0.5); class 1 with e^(0.7071/0.5) + e^(0/0.5).
    np.testing.assert_allclose(top3[0], [np.exp(2.0), np.exp(np.sqrt(2.0)) + 1.0], rtol=1e-6)
    top2 = knn.knn_scores(query, keys, labels, num_classes=2, k=2, temperature=0.5)
    np.testing.assert_allclose(top2[0], [np.exp(2.0), np.exp(np.sqrt(2.0))], rtol=1e-6)
    # With the class-0 neighbour marked as padding, class 1 wins; the padding row never votes.
    valid = jnp.array([False, True, True, True])
    masked = knn.knn_scores(query, keys, labels, valid, num_classes=2, k=3, temperature=0.5)
    np.testing.assert_allclose(masked[0], [np.exp(-2.0), np.exp(np.sqrt(2.0)) + 1.0],
                               rtol=1e-6)
    assert int(jnp.argmax(masked[0])) == 1


def test_k_larger_than_the_valid_keys_ignores_padding():
    keys = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    labels = jnp.array([0, 1, 2])
    valid = jnp.array([True, False, False])
    scores = knn.knn_scores(jnp.array([[0.0, 1.0]]), keys, labels, valid, num_classes=3, k=3,
                            temperature=0.07)
    np.testing.assert_allclose(scores[0], [np.exp(0.0), 0.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 1.0)])
def test_scores_match_a_numpy_loop(k, temperature):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 16)).astype(np.float32)
    labels = rng.integers(0, 7, 200)
    queries = rng.normal(size=(30, 16)).astype(np.float32)
    got = knn.knn_scores(jnp.asarray(queries), jnp.asarray(keys), jnp.asarray(labels),
                         num_classes=7, k=k, temperature=temperature)
    want = numpy_knn_scores(queries, keys, labels, num_classes=7, k=k, temperature=temperature)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)


def test_evaluator_on_8_devices_counts_like_numpy():
    """Padded batches split over 8 devices: top-1 equals the numpy vote over the valid rows."""
    mesh = sharding.make_mesh()
    assert mesh.size == 8
    rng = np.random.default_rng(1)
    num_classes, width = 5, 6
    centres = rng.normal(size=(num_classes, width)).astype(np.float32)

    def make_batches(count, batch, seed):
        r = np.random.default_rng(seed)
        labels = r.integers(0, num_classes, count)
        feats = centres[labels] + 0.9 * r.normal(size=(count, width)).astype(np.float32)
        # "images" are (1 + 2 tokens, width): the [CLS] slot holds the feature.
        images = np.concatenate([feats[:, None], r.normal(size=(count, 2, width))], axis=1)
        batches, padded = [], -(-count // batch) * batch
        images = np.concatenate([images, np.zeros((padded - count, 3, width))]).astype(np.float32)
        labels_p = np.concatenate([labels, -np.ones(padded - count, int)]).astype(np.int32)
        valid = np.arange(padded) < count
        for start in range(0, padded, batch):
            part = slice(start, start + batch)
            batches.append({name: sharding.shard_batch(value[part], mesh) for name, value in
                            (("image", images), ("label", labels_p), ("valid", valid))})
        return batches, feats, labels

    train, train_feats, train_labels = make_batches(100, 16, 2)  # 12 padding rows
    evals, eval_feats, eval_labels = make_batches(43, 16, 3)  # 5 padding rows
    scale = 2.0

    def encode(params, images):  # a linear "encoder": the tokens scaled by a parameter
        return images * params

    section = ml_collections.ConfigDict(dict(type="knn", every_steps=0, train_examples=0, k=20,
                                             temperature=0.07, feature="cls", batch_size=16))
    ctx = common.EvalContext(config=ml_collections.ConfigDict(dict(batch_size=16)), mesh=mesh,
                             num_classes=num_classes, encode=encode)
    evaluator = knn.KnnEvaluator("knn", section, ctx)
    result = evaluator.evaluate(jnp.float32(scale), train, len(train), evals)
    # Again, with the buffer one batch larger than needed: the spare rows never vote.
    again = evaluator.evaluate(jnp.float32(scale), train, len(train) + 1, evals)
    scores = numpy_knn_scores(eval_feats, train_feats, train_labels, num_classes=num_classes,
                              k=20, temperature=0.07)
    want = np.mean(np.argmax(scores, axis=1) == eval_labels)
    assert result["eval/knn_top1"] == pytest.approx(want, abs=1e-9)
    assert result["eval/knn_train_examples"] == again["eval/knn_train_examples"] == 100
    assert again["eval/knn_top1"] == result["eval/knn_top1"]
    assert 0.3 < want < 1.0  # the toy set is neither trivial nor hopeless
    with pytest.raises(ValueError, match="more than the 6 train batches"):
        evaluator.evaluate(jnp.float32(scale), train, len(train) - 1, evals)
