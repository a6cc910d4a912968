"""Mixup / CutMix against timm's Mixup (mode "batch") and a numpy reference.

The box of a given λ and centre against timm's rand_bbox; the targets against timm's
mixup_target; the images against a numpy loop given λ and box; the draws' law (Beta mean and
CDF, switch probability, corrected λ equal to the box area); the alphas that disable a mode;
jit; mixing within parts of the batch (one per device), and a batch sharded over 8 devices
giving the unsharded result.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats
from timm.data import mixup as timm_mixup

from mvmae_jax import mixup

NUM_CLASSES = 7


def _batch(size: int = 6, height: int = 10, width: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(size, height, width, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size).astype(np.int32)
    return images, labels


def _reference(images, labels, lam, box, use_cutmix, smoothing):
    """numpy, from the definition: example i with example B-1-i."""
    size = len(images)
    out = images.copy()
    top, bottom, left, right = box
    for i in range(size):
        j = size - 1 - i
        if use_cutmix:
            out[i, top:bottom, left:right] = images[j, top:bottom, left:right]
        else:
            out[i] = lam * images[i] + (1 - lam) * images[j]
    smooth = np.full((size, NUM_CLASSES), smoothing / NUM_CLASSES)
    smooth[np.arange(size), labels] += 1 - smoothing
    return out, lam * smooth + (1 - lam) * smooth[::-1]


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_mix_with_matches_reference_and_timm_targets(use_cutmix):
    images, labels = _batch()
    box = np.array([2, 7, 3, 12])
    lam = 1 - (5 * 9) / (10 * 12) if use_cutmix else 0.37
    mixed, targets = mixup.mix_with(jnp.asarray(images), jnp.asarray(labels), lam, box,
                                    use_cutmix, num_classes=NUM_CLASSES, label_smoothing=0.1)
    ref_images, ref_targets = _reference(images, labels, lam, box, use_cutmix, 0.1)
    np.testing.assert_allclose(mixed, ref_images, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, ref_targets, rtol=1e-6, atol=1e-7)
    timm_targets = timm_mixup.mixup_target(torch.as_tensor(labels, dtype=torch.long), NUM_CLASSES,
                                           lam=lam, smoothing=0.1)
    np.testing.assert_allclose(targets, timm_targets.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
    if use_cutmix:  # pixels are copied, not blended
        assert set(np.unique(np.asarray(mixed) == images)) == {True, False}


def test_cutmix_box_matches_timm():
    """Given λ and the centre timm draws (np.random.randint after the same seed), the same box."""
    height, width = 14, 11
    lams = np.random.default_rng(1).uniform(0, 1, 40).astype(np.float32)
    for k, lam in enumerate(lams):
        # timm draws from numpy's global generator.
        np.random.seed(k)  # noqa: NPY002
        expected = timm_mixup.rand_bbox((3, height, width), float(lam))
        np.random.seed(k)  # noqa: NPY002
        centre_y = np.random.randint(0, height)  # noqa: NPY002
        centre_x = np.random.randint(0, width)  # noqa: NPY002
        box = mixup.cutmix_box(lam, centre_y, centre_x, height, width)
        np.testing.assert_array_equal(box, np.asarray(expected))


@functools.partial(jax.jit, static_argnames=("height", "width"))
def _draws(keys, height, width):
    return jax.vmap(lambda k: mixup.sample_mix_params(k, height, width))(keys)


def test_draws_law():
    """4,000 draws: half CutMix; mixup λ ~ Beta(0.8, 0.8) (mean, variance, KS distance);
    CutMix λ = 1 - box area exactly, with the law of timm's corrected λ."""
    n, height, width = 4000, 16, 20
    params = jax.device_get(_draws(jax.random.split(jax.random.key(0), n), height, width))
    cut = params.use_cutmix
    assert abs(cut.mean() - 0.5) < 5 * math.sqrt(0.25 / n)

    lam_mix = params.lam[~cut]
    beta = stats.beta(0.8, 0.8)
    assert abs(lam_mix.mean() - beta.mean()) < 5 * beta.std() / math.sqrt(len(lam_mix))
    assert abs(lam_mix.var() - beta.var()) < 0.01
    assert stats.kstest(lam_mix, beta.cdf).pvalue > 1e-3

    top, bottom, left, right = params.box[cut].T
    box_pixels = (bottom - top) * (right - left)
    lam_pixels = (1 - params.lam[cut].astype(np.float64)) * height * width  # λ in pixels
    np.testing.assert_array_equal(np.rint(lam_pixels), box_pixels)
    np.testing.assert_allclose(lam_pixels, box_pixels, atol=1e-4)  # float32 rounding only
    assert (0 <= top).all() and (top <= bottom).all() and (bottom <= height).all()
    assert (0 <= left).all() and (left <= right).all() and (right <= width).all()
    # Corrected λ has the law of timm's (clipping shrinks boxes: its mean is about 0.7).
    np.random.seed(0)  # noqa: NPY002 (timm draws from numpy's global generator)
    beta_draws = np.random.default_rng(0).beta(1, 1, n)
    ref = np.array([timm_mixup.cutmix_bbox_and_lam((3, height, width), lam)[1]
                    for lam in beta_draws])
    ours = params.lam[cut]
    stderr = math.sqrt(ours.var() / len(ours) + ref.var() / len(ref))
    assert abs(ours.mean() - ref.mean()) < 5 * stderr
    # λ lives on a lattice (box pixels), so a chi-square test on the pixel counts, not KS.
    values = np.union1d(box_pixels, np.rint((1 - ref) * height * width))
    table = np.array([[np.sum(box_pixels == v) for v in values],
                      [np.sum(np.rint((1 - ref) * height * width) == v) for v in values]])
    assert stats.chi2_contingency(table[:, table.sum(0) >= 10]).pvalue > 1e-3


@functools.partial(jax.jit, static_argnames="groups")
def _mix_and_draw(key, images, labels, groups=1):
    """mix_batch under jit, and the draw it should have made (one compile for both)."""
    _, height, width, _ = images.shape
    return (mixup.mix_batch(key, images, labels, num_classes=NUM_CLASSES, groups=groups),
            mixup.sample_mix_params(key, height, width))


def test_mix_batch_under_jit_is_mix_with_at_its_draw():
    """mix_batch equals the numpy reference at sample_mix_params's draw; targets sum to 1."""
    images, labels = _batch(size=16)
    modes = set()
    for k in range(6):
        (mixed, targets), params = _mix_and_draw(jax.random.key(k), images, labels)
        modes.add(bool(params.use_cutmix))
        expected = _reference(images, labels, float(params.lam), np.asarray(params.box),
                              bool(params.use_cutmix), 0.1)
        np.testing.assert_allclose(mixed, expected[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(targets, expected[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
    assert modes == {False, True}


def test_disabled_modes():
    """Alpha 0 turns a mode off; both 0: images untouched, targets only smoothed (eagerly)."""
    images, labels = _batch()
    for k in range(3):
        key = jax.random.key(k)
        mixed, targets = mixup.mix_batch(key, jnp.asarray(images), jnp.asarray(labels),
                                         num_classes=NUM_CLASSES, mixup_alpha=0.0,
                                         cutmix_alpha=0.0, label_smoothing=0.2)
        np.testing.assert_array_equal(mixed, images)
        np.testing.assert_allclose(targets, _reference(images, labels, 1.0, (0, 0, 0, 0), False,
                                                       0.2)[1], atol=1e-7)
        assert bool(mixup.sample_mix_params(key, 10, 12, mixup_alpha=0.0).use_cutmix)
        only_mixup = mixup.sample_mix_params(key, 10, 12, cutmix_alpha=0.0)
        assert not bool(only_mixup.use_cutmix) and 0 < float(only_mixup.lam) < 1


def test_mixing_within_parts_of_the_batch():
    """With groups=g each of the g parts of the batch is mixed on its own (the reference on
    each part), with one draw for the whole batch."""
    images, labels = _batch(size=12)
    for k in range(4):
        (mixed, targets), params = _mix_and_draw(jax.random.key(k), images, labels, groups=3)
        for part in np.split(np.arange(12), 3):
            expected = _reference(images[part], labels[part], float(params.lam),
                                  np.asarray(params.box), bool(params.use_cutmix), 0.1)
            np.testing.assert_allclose(mixed[part], expected[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(targets[part], expected[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mixup.partners(np.arange(6), 2), [2, 1, 0, 5, 4, 3])


def test_sharded_batch_equals_unsharded():
    """A batch split over 8 devices, mixed within each device's part, gives the unsharded
    result."""
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    images, labels = _batch(size=16)
    modes = set()
    for k in (0, 1, 2, 3):
        key = jax.random.key(k)
        (plain, plain_targets), params = _mix_and_draw(key, images, labels, groups=8)
        (mixed, targets), _ = _mix_and_draw(key, jax.device_put(images, sharding),
                                            jax.device_put(labels, sharding), groups=8)
        modes.add(bool(params.use_cutmix))
        assert len(mixed.sharding.device_set) == 8
        np.testing.assert_array_equal(mixed, plain)
        np.testing.assert_array_equal(targets, plain_targets)
    assert modes == {False, True}


def test_optax_smoothing_and_soft_cross_entropy_are_the_timm_formulas():
    """optax.smooth_labels is timm's one-hot (off ε / K, on 1 - ε + ε / K) and
    optax.softmax_cross_entropy is -Σ t log softmax (timm's SoftTargetCrossEntropy), both to
    float32 round-off; the cross-entropy also against float64."""
    labels = np.array([0, 3, 6, 2, 2])
    hot = jax.nn.one_hot(labels, NUM_CLASSES, dtype=jnp.float32)
    off = 0.1 / NUM_CLASSES
    np.testing.assert_allclose(optax.smooth_labels(hot, 0.1), hot * (1.0 - 0.1) + off,
                               rtol=1e-7, atol=1e-8)
    timm_hot = timm_mixup.one_hot(torch.as_tensor(labels), NUM_CLASSES, 1 - 0.1 + off, off)
    np.testing.assert_allclose(optax.smooth_labels(hot, 0.1), timm_hot.numpy(), rtol=1e-6)

    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(5, NUM_CLASSES)).astype(np.float32) * 3)
    targets = jnp.asarray(rng.dirichlet(np.ones(NUM_CLASSES), 5).astype(np.float32))
    got = optax.softmax_cross_entropy(logits, targets)
    np.testing.assert_allclose(got, -jnp.sum(targets * jax.nn.log_softmax(logits), -1),
                               rtol=1e-6)
    logits64 = np.asarray(logits, np.float64)
    log_probs = logits64 - np.log(np.exp(logits64).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, -(np.asarray(targets) * log_probs).sum(-1), rtol=1e-5)
