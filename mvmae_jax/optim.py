"""The MAE optimisation recipe: AdamW with a weight-decay mask, warm-up then cosine to zero."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def weight_decay_mask(params: Any) -> Any:
    """True for the parameters that are decayed: the kernels of dense and conv layers.

    Biases, LayerNorm scales and offsets, the [CLS] token and the mask token are not decayed
    (position embeddings are constants, not parameters).
    """
    def decayed(path, _):
        return getattr(path[-1], "key", None) == "kernel"

    return jax.tree_util.tree_map_with_path(decayed, params)


def peak_learning_rate(optim_config: ml_collections.ConfigDict, global_batch: int) -> float:
    """MAE's linear scaling rule: base_lr * global_batch / 256."""
    return optim_config.base_lr * global_batch / 256


def learning_rate_schedule(optim_config: ml_collections.ConfigDict, global_batch: int,
                           warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then half-cosine to 0 at `total_steps`."""
    peak = peak_learning_rate(optim_config, global_batch)
    warmup_steps = min(warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, 1), end_value=0.0)


def make_optimizer(optim_config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW(b1, b2, weight_decay) on the masked parameters, optional global-norm clipping."""
    transforms = []
    if optim_config.grad_clip_norm > 0:
        transforms.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    transforms.append(optax.adamw(
        schedule, b1=optim_config.b1, b2=optim_config.b2, eps=1e-8,
        weight_decay=optim_config.weight_decay, mask=weight_decay_mask))
    return optax.chain(*transforms)
