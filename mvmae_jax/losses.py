"""Pretraining losses: masked-patch pixel reconstruction and cross-view InfoNCE, on global
arrays (under `jax.jit` over a mesh, the similarities span the global batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NORM_PIX_EPS = 1e-6


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) → (B, N, p*p*C); patches row-major, pixels (p, p, C) inside, as MAE."""
    batch, height, width, channels = images.shape
    gh, gw = height // patch_size, width // patch_size
    x = images.reshape(batch, gh, patch_size, gw, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, gh * gw, patch_size * patch_size * channels)


def unpatchify(patches: jax.Array, patch_size: int, grid_size: tuple[int, int]) -> jax.Array:
    """Inverse of `patchify`: (B, N, p*p*C) → (B, H, W, C)."""
    batch = patches.shape[0]
    gh, gw = grid_size
    channels = patches.shape[-1] // (patch_size * patch_size)
    x = patches.reshape(batch, gh, gw, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, gh * patch_size, gw * patch_size, channels)


def normalise_patches(patches: jax.Array) -> jax.Array:
    """Each patch to zero mean, unit variance (unbiased variance + eps, as MAE's norm_pix_loss)."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + NORM_PIX_EPS)


def l2_normalise(x: jax.Array) -> jax.Array:
    """x / |x| along the last axis, float32 (zero stays zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def gather_patches(patches: jax.Array, indices: jax.Array) -> jax.Array:
    """(B, N, D) patches, (B, K) indices → (B, K, D)."""
    return jnp.take_along_axis(patches, indices[..., None], axis=1)


def reconstruction_loss(predictions: jax.Array, target_patches: jax.Array, masked: jax.Array,
                        norm_pix: bool = True) -> jax.Array:
    """Mean squared error over the masked patches: row k of `predictions` (B, n_mask, p*p*C)
    predicts patch `masked[:, k]` of `target_patches` (B, N, p*p*C), normalised with `norm_pix`."""
    target = gather_patches(target_patches.astype(jnp.float32), masked)
    if norm_pix:
        target = normalise_patches(target)
    return jnp.mean(jnp.square(predictions.astype(jnp.float32) - target))


def info_nce_loss(embeddings: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE (NT-Xent) of (B, 2, d) L2-normalised embeddings: each view's positive is
    its image's other view, the other 2B - 2 views negatives: (mean loss, partner top-1)."""
    batch, num_views, _ = embeddings.shape
    if num_views != 2:
        raise ValueError(f"info_nce_loss needs exactly 2 views per image, got {num_views}")
    # All first views, then all second views: the partner of row i is row (i + B) mod 2B.
    z = jnp.concatenate([embeddings[:, 0], embeddings[:, 1]], axis=0).astype(jnp.float32)
    logits = z @ z.T / temperature
    logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -jnp.inf, logits)
    partner = (jnp.arange(2 * batch) + batch) % (2 * batch)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, partner).mean()
    top1 = jnp.mean(jnp.argmax(logits, axis=-1) == partner)
    return loss, top1
