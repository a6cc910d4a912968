"""Mixup and CutMix inside the jitted train step (timm's `Mixup`, mode "batch"), each example
mixed with a partner on its own device."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class MixParams(NamedTuple):
    """One batch's draw. lam: float32 () the weight of the example itself (for CutMix already
    corrected to the box area); box: int32 (4,) (top, bottom, left, right), rows top..bottom-1
    and columns left..right-1 taken from the partner; use_cutmix: bool ()."""

    lam: jax.Array
    box: jax.Array
    use_cutmix: jax.Array


def cutmix_box(lam: jax.Array, centre_y: jax.Array, centre_x: jax.Array, height: int,
               width: int) -> jax.Array:
    """timm's `rand_bbox`: int32 (top, bottom, left, right) of a box of sides
    int(side · sqrt(1 - λ)) about the centre, clipped to the image."""
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    top = jnp.clip(centre_y - cut_h // 2, 0, height)
    bottom = jnp.clip(centre_y + (cut_h + 1) // 2, 0, height)
    left = jnp.clip(centre_x - cut_w // 2, 0, width)
    right = jnp.clip(centre_x + (cut_w + 1) // 2, 0, width)
    return jnp.stack([top, bottom, left, right]).astype(jnp.int32)


def sample_mix_params(rng: jax.Array, height: int, width: int, *, mixup_alpha: float = 0.8,
                      cutmix_alpha: float = 1.0, switch_prob: float = 0.5) -> MixParams:
    """timm's `Mixup._params_per_batch` (prob 1) with the CutMix box and corrected λ: CutMix
    with probability `switch_prob`, else mixup; λ ~ Beta(α, α); α = 0 disables its mode."""
    switch_key, gamma_key, y_key, x_key = jax.random.split(rng, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_key) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    # Beta(α, α) = G1 / (G1 + G2) for independent Gamma(α) draws, computed from their logs (no
    # underflow at small α). One gamma sampler for both modes keeps the compiled step small.
    alphas = jnp.array([mixup_alpha or 1.0] * 2 + [cutmix_alpha or 1.0] * 2, jnp.float32)
    log_gammas = (jax.random.loggamma(gamma_key, alphas) if mixup_alpha > 0 or cutmix_alpha > 0
                  else jnp.zeros(4))
    lam_mixup = (jax.nn.sigmoid(log_gammas[0] - log_gammas[1]) if mixup_alpha > 0
                 else jnp.float32(1.0))
    lam_cutmix = (jax.nn.sigmoid(log_gammas[2] - log_gammas[3]) if cutmix_alpha > 0
                  else jnp.float32(1.0))
    centre_y = jax.random.randint(y_key, (), 0, height)
    centre_x = jax.random.randint(x_key, (), 0, width)
    box = cutmix_box(lam_cutmix, centre_y, centre_x, height, width)
    top, bottom, left, right = box
    lam_box = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    lam = jnp.where(use_cutmix, lam_box, lam_mixup).astype(jnp.float32)
    return MixParams(lam=lam, box=box, use_cutmix=use_cutmix)


def partners(x: jax.Array, groups: int = 1) -> jax.Array:
    """x (B, ...) with each of its `groups` consecutive parts reversed: every row's mixing
    partner, from its own part (one device's examples)."""
    return x.reshape((groups, -1) + x.shape[1:])[:, ::-1].reshape(x.shape)


def mix_with(images: jax.Array, labels: jax.Array, lam: jax.Array, box: jax.Array,
             use_cutmix: jax.Array, *, num_classes: int, label_smoothing: float = 0.1,
             groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """Mixes each example with its `partners` row (CutMix: the partner's pixels inside `box`; mixup:
    λ · x + (1 - λ) · partner); targets λ · smooth(y) + (1 - λ) · smooth(partner's y)."""
    _, height, width, _ = images.shape
    partner = partners(images, groups)
    rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
    cut = jnp.where(inside[None, :, :, None], partner, images)
    lam_images = jnp.asarray(lam).astype(images.dtype)
    blended = images * lam_images + partner * (1 - lam_images)
    mixed = jnp.where(use_cutmix, cut, blended)

    # timm's smoothing: off value ε / K, on value 1 - ε + ε / K.
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32),
                                  label_smoothing)
    lam = jnp.asarray(lam, jnp.float32)
    return mixed, targets * lam + partners(targets, groups) * (1.0 - lam)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
              label_smoothing: float = 0.1, groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """timm's Mixup(mode="batch", prob=1, correct_lam=True) on images (B, H, W, C) and int
    labels (B,), within each of `groups` parts (devices): (mixed images, targets (B, K))."""
    _, height, width, _ = images.shape
    params = sample_mix_params(rng, height, width, mixup_alpha=mixup_alpha,
                               cutmix_alpha=cutmix_alpha, switch_prob=switch_prob)
    return mix_with(images, labels, *params, num_classes=num_classes,
                    label_smoothing=label_smoothing, groups=groups)

