"""Losses against plain-numpy references written from the specification.

patchify (MAE layout), the masked-patch reconstruction loss (norm_pix with unbiased variance)
and the symmetric InfoNCE (NT-Xent) loss, including under jit over an 8-device mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mvmae_jax import losses

# --------------------------------------------------------------------------------------------
# patchify / unpatchify.


def _patchify_loop(images: np.ndarray, p: int) -> np.ndarray:
    """Reference: patch n = i * gw + j is the (p, p, C) block at grid cell (i, j), flattened."""
    batch, height, width, channels = images.shape
    gh, gw = height // p, width // p
    out = np.zeros((batch, gh * gw, p * p * channels), images.dtype)
    for b in range(batch):
        for i in range(gh):
            for j in range(gw):
                block = images[b, i * p:(i + 1) * p, j * p:(j + 1) * p, :]
                out[b, i * gw + j] = block.reshape(-1)
    return out


def test_patchify_matches_loop_and_roundtrips():
    """patchify equals the loop reference on a non-square image; unpatchify inverts it exactly."""
    rng = np.random.default_rng(0)
    p, grid = 4, (2, 3)
    images = rng.normal(size=(2, grid[0] * p, grid[1] * p, 3)).astype(np.float32)
    patches = np.asarray(losses.patchify(jnp.asarray(images), p))
    assert patches.shape == (2, 6, p * p * 3)
    np.testing.assert_array_equal(patches, _patchify_loop(images, p))
    back = np.asarray(losses.unpatchify(jnp.asarray(patches), p, grid))
    np.testing.assert_array_equal(back, images)
    # And the other way round: patchify(unpatchify(x)) == x for arbitrary patches.
    random_patches = rng.normal(size=(2, 6, p * p * 3)).astype(np.float32)
    again = losses.patchify(losses.unpatchify(jnp.asarray(random_patches), p, grid), p)
    np.testing.assert_array_equal(np.asarray(again), random_patches)


# --------------------------------------------------------------------------------------------
# reconstruction_loss.


def _reconstruction_reference(pred: np.ndarray, target: np.ndarray, masked: np.ndarray,
                              norm_pix: bool, ddof: int = 1) -> float:
    """Plain loops in float64: mean of (pred - target)^2 over examples, masked patches, values."""
    batch, n_mask, dim = pred.shape
    total = 0.0
    for b in range(batch):
        for k in range(n_mask):
            t = target[b, masked[b, k]].astype(np.float64)
            if norm_pix:
                t = (t - t.mean()) / np.sqrt(t.var(ddof=ddof) + 1e-6)
            total += float(np.sum((pred[b, k].astype(np.float64) - t) ** 2))
    return total / (batch * n_mask * dim)


def _reconstruction_case():
    """B=3, N=8, D=12 (2x2x3 patches): 3 masked, 2 thrown, 3 visible per example.

    Targets have a per-patch offset and scale (so norm_pix matters) and one masked patch is
    constant (its normalised target is 0, not NaN).
    """
    rng = np.random.default_rng(0)
    batch, num_patches, dim, n_mask, n_throw = 3, 8, 12, 3, 2
    offset = rng.normal(size=(batch, num_patches, 1)) * 3
    scale = rng.uniform(0.5, 4.0, (batch, num_patches, 1))
    target = (offset + scale * rng.normal(size=(batch, num_patches, dim))).astype(np.float32)
    order = np.argsort(rng.random((batch, num_patches)), axis=1).astype(np.int32)
    masked = order[:, :n_mask]
    thrown = order[:, n_mask:n_mask + n_throw]
    visible = order[:, n_mask + n_throw:]
    target[0, masked[0, 1]] = 2.5  # a constant masked patch
    pred = rng.normal(size=(batch, n_mask, dim)).astype(np.float32)
    return pred, target, masked, thrown, visible


_recon = jax.jit(losses.reconstruction_loss, static_argnames="norm_pix")


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_loss_matches_reference(norm_pix):
    """Equals the numpy loop reference (unbiased variance for norm_pix), on and off.

    The ddof=0 variant differs by far more than the tolerance, so the variance convention is
    really checked.
    """
    pred, target, masked, _, _ = _reconstruction_case()
    got = float(_recon(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(masked),
                       norm_pix=norm_pix))
    want = _reconstruction_reference(pred, target, masked, norm_pix)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if norm_pix:
        biased = _reconstruction_reference(pred, target, masked, norm_pix, ddof=0)
        assert abs(biased - want) > 100 * 1e-5 * abs(want)
    # Rows of `predictions` go with `masked[:, k]`: a permuted pairing gives another loss.
    swapped = _reconstruction_reference(pred, target, masked[:, ::-1], norm_pix)
    assert abs(swapped - want) > 100 * 1e-5 * abs(want)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_loss_only_masked_patches_count(norm_pix):
    """Changing visible or thrown target patches leaves the loss unchanged; a masked one not."""
    pred, target, masked, thrown, visible = _reconstruction_case()
    rng = np.random.default_rng(1)

    def loss(t):
        return float(_recon(jnp.asarray(pred), jnp.asarray(t), jnp.asarray(masked),
                            norm_pix=norm_pix))

    base = loss(target)
    for name, indices in [("visible", visible), ("thrown", thrown)]:
        changed = target.copy()
        for b in range(len(target)):
            changed[b, indices[b]] = rng.normal(size=changed[b, indices[b]].shape) * 10 + 5
        assert loss(changed) == base, name
    changed = target.copy()
    changed[1, masked[1, 2]] += rng.normal(size=target.shape[-1]).astype(np.float32)
    assert abs(loss(changed) - base) > 1e-3 * base


# --------------------------------------------------------------------------------------------
# info_nce_loss.


def test_l2_normalise():
    """Unit rows in float32, in the direction of the input; a zero row stays zero."""
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float16)
    x[2] = 0
    got = np.asarray(losses.l2_normalise(jnp.asarray(x)))
    assert got.dtype == np.float32
    want = x.astype(np.float64) / np.maximum(np.linalg.norm(x.astype(np.float64), axis=-1,
                                                            keepdims=True), 1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _info_nce_reference(embeddings: np.ndarray, temperature: float) -> tuple[float, float]:
    """NT-Xent in float64 over the 2B views, written per view: positive = the other view of the
    same image, candidates = all other 2B - 1 views; log-sum-exp computed stably."""
    emb = np.asarray(embeddings, np.float64)
    batch = emb.shape[0]
    views = [(b, v) for b in range(batch) for v in range(2)]
    losses_, hits = [], []
    for b, v in views:
        anchor = emb[b, v]
        others = [(c, w) for c, w in views if (c, w) != (b, v)]
        sims = np.array([anchor @ emb[c, w] / temperature for c, w in others])
        positive = others.index((b, 1 - v))
        top = sims.max()
        lse = top + np.log(np.sum(np.exp(sims - top)))
        losses_.append(lse - sims[positive])
        hits.append(int(np.argmax(sims)) == positive)
    return float(np.mean(losses_)), float(np.mean(hits))


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_info_nce_matches_reference(temperature):
    """Loss and top1 equal the float64 numpy reference on random normalised embeddings.

    The partners are correlated so that top1 is strictly between 0 and 1.
    """
    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 1, 16))
    emb = _normalised(base + 0.9 * rng.normal(size=(8, 2, 16)))
    loss, top1 = jax.jit(functools.partial(losses.info_nce_loss, temperature=temperature))(
        jnp.asarray(emb))
    want_loss, want_top1 = _info_nce_reference(emb, temperature)
    assert 0.0 < want_top1 < 1.0
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert float(top1) == pytest.approx(want_top1, abs=1e-7)


def _top1_cases() -> tuple[np.ndarray, np.ndarray]:
    """Two hand-built (4, 2, 4) batches: all partners found, and exactly half of the views not.

    Case 1: both views of image b are e_b. Case 2: images 0, 1 as before; image 2 has views
    (e2, ~e3) and image 3 has (e3, ~e2), so all four views of images 2 and 3 pick the wrong
    neighbour (cosine 0.995 vs 0.0995): top1 = 4/8.
    """
    eye = np.eye(4)
    good = np.stack([eye, eye], axis=1)
    half = good.copy()
    half[2, 1] = eye[3] + 0.1 * eye[2]
    half[3, 1] = eye[2] + 0.1 * eye[3]
    return _normalised(good), _normalised(half)


def test_info_nce_top1_hand_built():
    """top1 is 1 when every partner is the nearest view, and 0.5 in the half-confused case."""
    good, half = _top1_cases()
    fn = jax.jit(functools.partial(losses.info_nce_loss, temperature=0.2))
    for emb, want_top1 in [(good, 1.0), (half, 0.5)]:
        loss, top1 = fn(jnp.asarray(emb))
        assert float(top1) == want_top1
        ref_loss, ref_top1 = _info_nce_reference(emb, 0.2)
        assert ref_top1 == want_top1
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    # Identical partners, orthogonal pairs: every view's loss is -log(e^{1/T} / (e^{1/T} + 6)).
    loss, _ = fn(jnp.asarray(good))
    np.testing.assert_allclose(float(loss), np.log1p(6 * np.exp(-1 / 0.2)), rtol=1e-5)


def test_info_nce_sharded_matches_single_device():
    """Under jit with the batch sharded over 8 devices, loss and top1 equal the one-device ones.

    The negatives span the global batch: the result also equals the global numpy reference and
    differs clearly from a per-shard (local negatives only) loss.
    """
    devices = jax.devices()
    assert len(devices) >= 8
    mesh = jax.sharding.Mesh(np.array(devices[:8]), ("data",))
    rng = np.random.default_rng(3)
    batch, temperature = 16, 0.2
    emb = _normalised(rng.normal(size=(batch, 1, 8)) + 0.8 * rng.normal(size=(batch, 2, 8)))
    fn = jax.jit(functools.partial(losses.info_nce_loss, temperature=temperature))
    sharded = jax.device_put(emb, NamedSharding(mesh, P("data")))
    assert len(sharded.sharding.device_set) == 8
    assert sharded.addressable_shards[0].data.shape == (batch // 8, 2, 8)
    loss_sharded, top1_sharded = fn(sharded)
    loss_single, top1_single = fn(jax.device_put(emb, devices[0]))
    np.testing.assert_allclose(float(loss_sharded), float(loss_single), rtol=1e-6)
    assert float(top1_sharded) == float(top1_single)
    want_loss, want_top1 = _info_nce_reference(emb, temperature)
    np.testing.assert_allclose(float(loss_sharded), want_loss, rtol=1e-5)
    assert float(top1_sharded) == pytest.approx(want_top1, abs=1e-7)
    local = np.mean([_info_nce_reference(emb[i:i + 2], temperature)[0]
                     for i in range(0, batch, 2)])
    assert abs(local - want_loss) > 0.1
