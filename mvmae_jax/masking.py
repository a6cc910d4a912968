"""Patch masking: random (MAE) and attention-driven masking and throwing (AMT).

Every count is a static Python int, so that each compiled step has fixed shapes. A `Masks`
holds, per example, the patch indices that are visible to the encoder, masked (reconstructed
by the decoder) and thrown (seen by neither). Together they cover 0..N-1 exactly once.

The AMT attention maps come from the [CLS] query of the encoder's last block. They are either
kept per example in a bank over the whole (uncropped) image and resampled onto each view's
patch grid with the view's crop box and flip (`align_bank_maps`), or computed online from the
view itself.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Added to the weights before the log, so that zero-attention patches can still be drawn
# (torch.multinomial over w + eps, as in AMT) and the log stays finite.
AMT_EPS = 1e-6


class Masks(NamedTuple):
    """Patch indices per example; int32, each row of the three together covers 0..N-1 once."""

    visible: jax.Array  # (B, n_vis)
    masked: jax.Array  # (B, n_mask)
    thrown: jax.Array  # (B, n_throw); n_throw may be 0


def mask_counts(num_patches: int, mask_ratio: float,
                throw_ratio: float = 0.0) -> tuple[int, int, int]:
    """Returns (n_mask, n_throw, n_vis) by the AMT code's rounding convention.

    n_mask = int(N * mask_ratio); n_throw = int(N * (mask_ratio + throw_ratio)) - n_mask.
    """
    if not 0.0 <= mask_ratio < 1.0 or throw_ratio < 0.0:
        raise ValueError(
            f"mask_ratio must be in [0, 1) and throw_ratio >= 0, got {mask_ratio}, {throw_ratio}")
    num_masked = int(num_patches * mask_ratio)
    num_thrown = int(num_patches * (mask_ratio + throw_ratio)) - num_masked
    num_visible = num_patches - num_masked - num_thrown
    if num_visible < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} + throw_ratio={throw_ratio} leaves no visible patch out of "
            f"{num_patches}; lower them so that at least one patch stays visible")
    return num_masked, num_thrown, num_visible


def _split_order(order: jax.Array, num_masked: int, num_thrown: int) -> Masks:
    order = order.astype(jnp.int32)
    return Masks(
        visible=order[:, num_masked + num_thrown:],
        masked=order[:, :num_masked],
        thrown=order[:, num_masked:num_masked + num_thrown],
    )


def random_masking(rng: jax.Array, batch_size: int, num_patches: int, num_masked: int) -> Masks:
    """MAE masking: an independent uniform random permutation per example, nothing thrown."""
    noise = jax.random.uniform(rng, (batch_size, num_patches))
    return _split_order(jnp.argsort(noise, axis=-1), num_masked, 0)


def amt_masking(rng: jax.Array, weights: jax.Array, num_masked: int, num_thrown: int,
                *, eps: float = AMT_EPS) -> Masks:
    """AMT masking: patches ordered by sampling without replacement with p ∝ weights + eps.

    Sorting log(w + eps) + Gumbel noise in decreasing order gives exactly the distribution of
    drawing patches one at a time without replacement (Gumbel-top-k). The first `num_masked`
    drawn are masked, the next `num_thrown` thrown, the rest stay visible: high-attention
    patches tend to be masked, and the visible helpers tend to be low-attention ones.

    Args:
      rng: PRNG key.
      weights: (B, N) attention weights in [0, 1]; zeros are allowed.
      num_masked, num_thrown: static counts.
    """
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    gumbel = jax.random.gumbel(rng, weights.shape, jnp.float32)
    scores = jnp.log(weights + eps) + gumbel
    return _split_order(jnp.argsort(-scores, axis=-1), num_masked, num_thrown)


def cls_attention_map(cls_attention: jax.Array) -> jax.Array:
    """(B, heads, N) [CLS]-to-patch attention → (B, N) map in [0, 1], without gradient.

    Each head is min-max normalised over the N patches (a constant head gives zeros), then the
    heads are averaged.
    """
    attn = jax.lax.stop_gradient(cls_attention.astype(jnp.float32))
    low = attn.min(axis=-1, keepdims=True)
    span = attn.max(axis=-1, keepdims=True) - low
    normalised = jnp.where(span > 0, (attn - low) / jnp.where(span > 0, span, 1.0), 0.0)
    return normalised.mean(axis=1)


def view_patch_centres(boxes: jax.Array, flips: jax.Array, grid_size: tuple[int, int]) -> jax.Array:
    """Source-image coordinates (y, x), as fractions, of each view patch's centre.

    Args:
      boxes: (..., 4) crop boxes (top, left, height, width) as fractions of the source image.
      flips: (...) whether the view was flipped horizontally after cropping.
      grid_size: (gh, gw) patch grid of the view.
    Returns:
      (..., gh * gw, 2), patches in row-major order.
    """
    gh, gw = grid_size
    v = (jnp.arange(gh, dtype=jnp.float32) + 0.5) / gh
    u = (jnp.arange(gw, dtype=jnp.float32) + 0.5) / gw
    v, u = jnp.meshgrid(v, u, indexing="ij")
    v, u = v.reshape(-1), u.reshape(-1)
    boxes = boxes.astype(jnp.float32)
    flips = flips.astype(bool)[..., None]
    u = jnp.where(flips, 1.0 - u, u)
    top, left, height, width = (boxes[..., i:i + 1] for i in range(4))
    return jnp.stack([top + v * height, left + u * width], axis=-1)


def bilinear_sample(maps: jax.Array, coords: jax.Array, grid_size: tuple[int, int]) -> jax.Array:
    """Samples (B, gh*gw) maps at (B, M, 2) fractional (y, x) coordinates; edges replicate.

    Cell (i, j) of a map holds the value at the centre ((i + .5) / gh, (j + .5) / gw).
    """
    gh, gw = grid_size
    grid = maps.reshape(maps.shape[0], gh, gw).astype(jnp.float32)
    y = jnp.clip(coords[..., 0] * gh - 0.5, 0.0, gh - 1.0)
    x = jnp.clip(coords[..., 1] * gw - 0.5, 0.0, gw - 1.0)
    y0 = jnp.floor(y)
    x0 = jnp.floor(x)
    wy = y - y0
    wx = x - x0
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)
    y1 = jnp.minimum(y0 + 1, gh - 1)
    x1 = jnp.minimum(x0 + 1, gw - 1)

    def at(yi, xi):
        return jnp.take_along_axis(grid.reshape(grid.shape[0], -1), yi * gw + xi, axis=1)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def align_bank_maps(bank_maps: jax.Array, boxes: jax.Array, flips: jax.Array,
                    grid_size: tuple[int, int]) -> jax.Array:
    """Resamples whole-image attention maps onto each view's patch grid.

    Args:
      bank_maps: (B, gh*gw) maps over the whole source image (resized, not cropped).
      boxes: (B, V, 4) crop boxes (top, left, height, width) as fractions of the source.
      flips: (B, V) horizontal flip of each view.
      grid_size: (gh, gw), the patch grid of both the bank map and the views.
    Returns:
      (B, V, gh*gw): the map value under each view patch's centre (bilinear).
    """
    batch, num_views = flips.shape
    centres = view_patch_centres(boxes, flips, grid_size)  # (B, V, N, 2)
    centres = centres.reshape(batch, num_views * centres.shape[-2], 2)
    sampled = bilinear_sample(jax.lax.stop_gradient(bank_maps), centres, grid_size)
    return sampled.reshape(batch, num_views, -1)
