"""The MAE optimisation recipe: AdamW with a weight-decay mask, warm-up then cosine to zero."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def weight_decay_mask(params: Any) -> Any:
    """True for the kernels of dense and conv layers, the decayed parameters."""
    def decayed(path, _):
        return getattr(path[-1], "key", None) == "kernel"

    return jax.tree_util.tree_map_with_path(decayed, params)


def learning_rate_schedule(optim_config: ml_collections.ConfigDict, global_batch: int,
                           warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak (MAE's base_lr * global_batch / 256), then half-cosine
    to `optim_config.min_lr` (0 when the config has none) at `total_steps`."""
    peak = optim_config.base_lr * global_batch / 256
    # A run shorter than its warm-up still ends with one step of (cosine) decay.
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=min(optim_config.get("min_lr", 0.0), peak))


def make_optimizer(optim_config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW(b1, b2, weight_decay) on the masked parameters, optional global-norm clipping."""
    clip = optim_config.grad_clip_norm
    transforms = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    transforms.append(optax.adamw(
        schedule, b1=optim_config.b1, b2=optim_config.b2, eps=1e-8,
        weight_decay=optim_config.weight_decay, mask=weight_decay_mask))
    return optax.chain(*transforms)


def layer_ids(params: Any, depth: int) -> Any:
    """Each classifier parameter's layer for layer-wise lr decay (BEiT/MAE numbering): 0 the
    patch embedding and [CLS], i + 1 encoder block i, depth + 1 all after the blocks."""
    def layer(path, _):
        names = [getattr(key, "key", str(key)) for key in path]
        if names[0] != "encoder":
            return depth + 1
        if names[1] in ("embedding", "cls"):
            return 0
        block = next((n for n in names if n.startswith("encoderblock_")), None)
        return int(block.rsplit("_", 1)[1]) + 1 if block is not None else depth + 1

    return jax.tree_util.tree_map_with_path(layer, params)


def make_classify_optimizer(optim_config: ml_collections.ConfigDict, schedule: optax.Schedule,
                            params: Any, depth: int) -> optax.GradientTransformation:
    """LARS (linear probe) or AdamW with layer-wise lr decay (fine-tuning). Weight decay and
    LARS's trust ratio apply to kernels only, as in MAE; the layer factor multiplies the whole
    update, decay included (a per-group lr in PyTorch)."""
    clip = optim_config.grad_clip_norm
    transforms = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    if optim_config.name == "lars":
        transforms.append(optax.lars(
            schedule, weight_decay=optim_config.weight_decay,
            weight_decay_mask=weight_decay_mask, trust_coefficient=0.001, eps=0.0,
            trust_ratio_mask=weight_decay_mask, momentum=optim_config.momentum))
        return optax.chain(*transforms)
    transforms += [optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=1e-8),
                   optax.add_decayed_weights(optim_config.weight_decay, mask=weight_decay_mask)]
    if optim_config.layer_decay != 1.0:
        factors = jax.tree.map(lambda layer: optim_config.layer_decay ** (depth + 1 - layer),
                               layer_ids(params, depth))
        transforms.append(optax.stateless(
            lambda updates, _: jax.tree.map(lambda u, f: u * f, updates, factors)))
    transforms.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*transforms)
