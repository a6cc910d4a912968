"""The masking policy: which patches each view shows, hides (masked) and throws away, and when.

A strategy (`config.masking.strategy`) orders each view's patches: the first `n_mask` are
masked (reconstructed), the next `n_throw` thrown (seen by neither), the rest visible; counts are
static. A new strategy is a registered function plus a config value:

    @register_strategy("lowest_attention", uses_attention=True)
    def lowest_attention(rng, shape, weights, num_masked, num_thrown):
        order = jnp.argsort(weights, axis=-1)  # weights (R, N): lowest attention first
        return split_order(order, num_masked, num_thrown)

and `--config.masking.strategy=lowest_attention`. `shape` is (R, N), views by patches;
`weights` is None for a strategy registered with uses_attention=False.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy import ndimage

from mvmae_jax import bank as bank_lib
from mvmae_jax.errors import ConfigError, in_range, need, one_of

# Added to the weights before the log: zero-attention patches can still be drawn, as in AMT.
AMT_EPS = 1e-6


class Masks(NamedTuple):
    """Patch indices per example; int32, each row of the three together covers 0..N-1 once."""

    visible: jax.Array  # (B, n_vis)
    masked: jax.Array  # (B, n_mask)
    thrown: jax.Array  # (B, n_throw); n_throw may be 0


def mask_counts(num_patches: int, mask_ratio: float,
                throw_ratio: float = 0.0) -> tuple[int, int, int]:
    """(n_mask, n_throw, n_vis), rounded as the AMT code: n_mask = int(N * mask_ratio),
    n_throw = int(N * (mask_ratio + throw_ratio)) - n_mask."""
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


def split_order(order: jax.Array, num_masked: int, num_thrown: int) -> Masks:
    """(R, N) patch orders → Masks: the first `num_masked` masked, the next `num_thrown` thrown."""
    order = order.astype(jnp.int32)
    return Masks(visible=order[:, num_masked + num_thrown:], masked=order[:, :num_masked],
                 thrown=order[:, num_masked:num_masked + num_thrown])


def random_masking(rng: jax.Array, batch_size: int, num_patches: int, num_masked: int) -> Masks:
    """MAE masking: an independent uniform random permutation per example, nothing thrown."""
    noise = jax.random.uniform(rng, (batch_size, num_patches))
    return split_order(jnp.argsort(noise, axis=-1), num_masked, 0)


def amt_masking(rng: jax.Array, weights: jax.Array, num_masked: int, num_thrown: int,
                *, eps: float = AMT_EPS) -> Masks:
    """AMT masking: patches ordered by sampling without replacement with p ∝ weights (B, N) + eps
    (sorting log(w + eps) + Gumbel noise); the first drawn are masked, the next thrown."""
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    gumbel = jax.random.gumbel(rng, weights.shape, jnp.float32)
    scores = jnp.log(weights + eps) + gumbel
    return split_order(jnp.argsort(-scores, axis=-1), num_masked, num_thrown)


def cls_attention_map(cls_attention: jax.Array) -> jax.Array:
    """(B, heads, N) [CLS]-to-patch attention → (B, N) map in [0, 1], without gradient: each
    head min-max normalised over the patches (a constant head gives zeros), then averaged."""
    attn = jax.lax.stop_gradient(cls_attention.astype(jnp.float32))
    low = attn.min(axis=-1, keepdims=True)
    span = attn.max(axis=-1, keepdims=True) - low
    normalised = jnp.where(span > 0, (attn - low) / jnp.where(span > 0, span, 1.0), 0.0)
    return normalised.mean(axis=1)


def align_bank_maps(bank_maps: jax.Array, boxes: jax.Array, flips: jax.Array,
                    grid_size: tuple[int, int]) -> jax.Array:
    """(B, V, gh*gw): whole-image maps (B, gh*gw) resampled bilinearly under each view's patch
    centres, from its crop box (B, V, 4) (fractions of the image) and flip (B, V)."""
    gh, gw = grid_size
    v = (jnp.arange(gh, dtype=jnp.float32) + 0.5) / gh
    u = (jnp.arange(gw, dtype=jnp.float32) + 0.5) / gw
    v, u = (a.reshape(-1) for a in jnp.meshgrid(v, u, indexing="ij"))
    u = jnp.where(flips.astype(bool)[..., None], 1.0 - u, u)
    top, left, height, width = (boxes.astype(jnp.float32)[..., i:i + 1] for i in range(4))
    # Map cell (i, j) holds the value at ((i + .5) / gh, (j + .5) / gw) of the image.
    rows = (top + v * height) * gh - 0.5
    cols = (left + u * width) * gw - 0.5

    def sample(image, rows, cols):
        return ndimage.map_coordinates(image, [rows, cols], order=1, mode="nearest")

    grid = jax.lax.stop_gradient(bank_maps).reshape(-1, gh, gw).astype(jnp.float32)
    return jax.vmap(sample)(grid, rows, cols)


# --- Strategies and the policy of a run.

WARMUP_PHASE = "warmup"


class Strategy(NamedTuple):
    """order(rng, (R, N), weights (R, N) in [0, 1] or None, num_masked, num_thrown) -> Masks."""

    order: Callable[..., Masks]
    uses_attention: bool


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, *, uses_attention: bool) -> Callable:
    """Decorator: makes `fn` the masking strategy `name` (config.masking.strategy)."""
    def register(fn: Callable[..., Masks]) -> Callable[..., Masks]:
        STRATEGIES[name] = Strategy(fn, uses_attention)
        return fn
    return register


@register_strategy("random", uses_attention=False)
def _random_strategy(rng, shape, weights, num_masked, num_thrown):
    del weights
    if num_thrown:
        # Random throwing (the AMT ablation): sampling on equal weights is a uniform order.
        return amt_masking(rng, jnp.ones(shape), num_masked=num_masked, num_thrown=num_thrown)
    return random_masking(rng, batch_size=shape[0], num_patches=shape[1], num_masked=num_masked)


@register_strategy("amt", uses_attention=True)
def _amt_strategy(rng, shape, weights, num_masked, num_thrown):
    del shape
    return amt_masking(rng, weights, num_masked=num_masked, num_thrown=num_thrown)


class MaskingPolicy:
    """The masking of one run: its phases, the bank's refresh schedule, each phase's counts and the
    masks of a batch (`views`, `boxes`, `flips`, bank row `index`); the bank split over `mesh`."""

    def __init__(self, config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh):
        self.name = config.masking.strategy
        self.strategy = STRATEGIES[self.name]
        self._masking = config.masking
        self._amt = config.amt
        self._model = model
        self._mesh = mesh
        attention = self.strategy.uses_attention
        self.uses_bank = attention and config.amt.source == "bank"
        self.phases: tuple[str, ...] = ((WARMUP_PHASE, self.name)
                                        if attention and config.amt.start_epoch > 0
                                        else (self.name,))
        self._warmup_epochs = config.amt.start_epoch if len(self.phases) > 1 else 0

    def phase_at_epoch(self, epoch: int) -> str:
        return self.phases[-1] if epoch >= self._warmup_epochs else self.phases[0]

    def bank_refresh_due(self, epoch: int) -> bool:
        """Whether the bank is rebuilt at `epoch`: every `refresh_every` epochs after warm-up."""
        if not self.uses_bank or epoch < self._warmup_epochs:
            return False
        return (epoch - self._warmup_epochs) % self._amt.refresh_every == 0

    def counts(self, phase: str) -> tuple[int, int, int]:
        """(n_mask, n_throw, n_vis) per view in `phase`."""
        if phase == WARMUP_PHASE:
            return mask_counts(self._model.num_patches, self._amt.warmup_mask_ratio, 0.0)
        return mask_counts(self._model.num_patches, self._masking.mask_ratio,
                           self._masking.throw_ratio)

    def weights(self, params: Any, bank: jax.Array | None,
                batch: dict[str, jax.Array]) -> jax.Array:
        """(B * V, N) attention weights of every view, without gradient: the bank map aligned
        to the view's crop and flip, or the current encoder's map of the view."""
        views = batch["views"]
        rows = views.shape[0] * views.shape[1]
        if self.uses_bank:
            maps = bank_lib.bank_lookup(bank, batch["index"], self._mesh)
            weights = align_bank_maps(maps, batch["boxes"], batch["flips"], self._model.grid_size)
        else:
            weights = self.attention_maps(params, views.reshape((rows,) + views.shape[2:]))
        return jax.lax.stop_gradient(weights.reshape(rows, self._model.num_patches))

    def attention_maps(self, params: Any, images: jax.Array) -> jax.Array:
        """(R, H, W, C) whole images or views → (R, N) [CLS] attention maps."""
        return self._model.apply({"params": params}, images, method="attention_maps")

    def masks(self, params: Any, bank: jax.Array | None, batch: dict[str, jax.Array],
              rng: jax.Array, phase: str) -> Masks:
        """The masks of every view of the batch in `phase`, (B, V, k) each."""
        batch_size, num_views = batch["views"].shape[:2]
        shape = (batch_size * num_views, self._model.num_patches)
        n_mask, n_throw, _ = self.counts(phase)
        if phase == WARMUP_PHASE:
            masks = _random_strategy(rng, shape, None, n_mask, 0)
        else:
            weights = (self.weights(params, bank, batch) if self.strategy.uses_attention else None)
            masks = self.strategy.order(rng, shape, weights, n_mask, n_throw)
        return jax.tree.map(lambda m: m.reshape(batch_size, num_views, m.shape[-1]), masks)

    def refresh_bank(self, params: Any, bank: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        """The bank with rows `batch["index"]` (-1: padding) set to the maps of `batch["image"]`."""
        maps = self.attention_maps(params, batch["image"])
        return bank_lib.bank_update(bank, batch["index"], maps, self._mesh)


def check_config(masking: ml_collections.ConfigDict, amt: ml_collections.ConfigDict,
                 num_patches: int) -> None:
    """ConfigError for bad `config.masking` or `config.amt` sections at `num_patches` patches."""
    one_of("masking.strategy", masking.strategy, tuple(STRATEGIES))
    one_of("amt.source", amt.source, ("bank", "online"))
    in_range("amt.start_epoch", amt.start_epoch, 0)
    in_range("amt.refresh_every", amt.refresh_every, 1)
    for path, value in (("masking.mask_ratio", masking.mask_ratio),
                        ("masking.throw_ratio", masking.throw_ratio),
                        ("amt.warmup_mask_ratio", amt.warmup_mask_ratio)):
        in_range(path, value, 0, 1, high_open=True)
    phases = [("masking.mask_ratio", masking.mask_ratio, masking.throw_ratio)]
    if STRATEGIES[masking.strategy].uses_attention and amt.start_epoch > 0:  # a warm-up phase
        phases.append(("amt.warmup_mask_ratio", amt.warmup_mask_ratio, 0.0))
    for path, mask_ratio, throw_ratio in phases:
        need(int(num_patches * mask_ratio) >= 1,
             f"config.{path}={mask_ratio} masks no patch out of {num_patches}; raise it")
        try:
            mask_counts(num_patches, mask_ratio, throw_ratio)
        except ValueError as error:
            raise ConfigError(f"config.{path}: {error}") from error
