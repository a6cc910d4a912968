"""Classifier state and the compiled steps of the linear probe and fine-tuning.

A training batch holds `image` (B, H, W, C) normalised and `label` (B,) int; an evaluation
batch adds `valid` (B,) bool, False on padding rows. Mixup/cutmix and label smoothing run in
the step, on the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from mvmae_jax import mixup, sharding
from mvmae_jax.default_config import PROBE
from mvmae_jax.models import classifier as classifier_lib
from mvmae_jax.models import encoder_dims


@flax.struct.dataclass
class ClassifierState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # what the optimizer updates (the probe: the head only)
    opt_state: Any
    rng: jax.Array  # base PRNG key; each step folds in its step number
    batch_stats: Any  # the probe BatchNorm's running statistics ({} without it)
    frozen: Any  # parameters that never change (the probe: {"encoder": ...}); {} otherwise


def build_classifier(config: ml_collections.ConfigDict,
                     num_classes: int) -> classifier_lib.Classifier:
    dims = encoder_dims(config.model)
    return classifier_lib.Classifier(
        num_classes=num_classes, pool=config.model.pool, head_batchnorm=config.task == PROBE,
        head_init_std=config.model.head_init_std, drop_path_rate=config.model.drop_path,
        remat=config.model.remat, remat_policy=config.model.remat_policy,
        dtype=jnp.dtype(config.model.dtype), attention=config.model.attention, **dims)


def frozen_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Top-level parameter groups that are not trained: the encoder in the linear probe."""
    return ("encoder",) if config.task == PROBE else ()


def init_variables(config: ml_collections.ConfigDict, model: classifier_lib.Classifier,
                   pretrained_encoder: Any | None) -> dict[str, Any]:
    """Random variables of the classifier, with the pretrained encoder put in when given.

    Parameters the classifier does not use (the encoder's final norm under pool "gap") are
    dropped; any other difference between the trees is an error.
    """
    images = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    variables = model.init(jax.random.PRNGKey(config.seed), images)
    variables = flax.core.unfreeze(variables)
    if pretrained_encoder is not None:
        variables["params"]["encoder"] = _matching(pretrained_encoder,
                                                   variables["params"]["encoder"])
    variables.setdefault("batch_stats", {})
    return variables


def _matching(pretrained: Any, target: Any) -> Any:
    """`pretrained` restricted to the keys of `target`, checked leaf by leaf for shape."""
    if not isinstance(target, dict):
        if tuple(np.shape(pretrained)) != tuple(target.shape):
            raise ValueError(f"pretrained shape {np.shape(pretrained)} != {target.shape}")
        return jnp.asarray(pretrained, target.dtype)
    missing = sorted(set(target) - set(pretrained))
    if missing:
        raise ValueError(f"the pretrained encoder lacks {missing}")
    return {key: _matching(pretrained[key], value) for key, value in target.items()}


def create_state(config: ml_collections.ConfigDict, model: classifier_lib.Classifier,
                 optimizer: optax.GradientTransformation, mesh: Mesh,
                 pretrained_encoder: Any | None) -> ClassifierState:
    """The initial state, replicated over the mesh."""
    frozen_keys = frozen_names(config)

    def init(encoder):
        variables = init_variables(config, model, encoder)
        params = {k: v for k, v in variables["params"].items() if k not in frozen_keys}
        frozen = {k: v for k, v in variables["params"].items() if k in frozen_keys}
        return ClassifierState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
            rng=jax.random.PRNGKey(config.seed + 1), batch_stats=variables["batch_stats"],
            frozen=frozen)

    return jax.jit(init, out_shardings=sharding.replicated(mesh))(pretrained_encoder)


def state_shardings(state: ClassifierState, mesh: Mesh) -> ClassifierState:
    return jax.tree.map(lambda _: sharding.replicated(mesh), state)


def _variables(state: ClassifierState, params: Any) -> dict[str, Any]:
    variables = {"params": {**state.frozen, **params}}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def make_train_step(config: ml_collections.ConfigDict, model: classifier_lib.Classifier,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, state_sharding: ClassifierState,
                    num_classes: int) -> Callable[[ClassifierState, dict], tuple]:
    """Jitted (state, batch) → (state, metrics); the state is donated."""
    aug = config.augment
    probe = config.task == PROBE
    batch_sharding = sharding.batch_sharding(mesh)

    def train_step(state: ClassifierState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        mix_rng, dropout_rng = jax.random.split(rng)
        images, targets = mixup.mix_batch(
            mix_rng, batch["image"], batch["label"], num_classes=num_classes,
            mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, switch_prob=aug.switch_prob,
            label_smoothing=aug.label_smoothing)

        def loss_fn(params):
            logits, updates = model.apply(
                _variables(state, params), images, train=True, frozen_encoder=probe,
                rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
            loss = jnp.mean(mixup.soft_cross_entropy(logits, targets))
            return loss, (logits, updates.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            # Against the dominant label of the mixed target.
            "top1": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  batch_stats=batch_stats or state.batch_stats)
        return new_state, metrics

    return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_eval_step(model: classifier_lib.Classifier, mesh: Mesh,
                   state_sharding: ClassifierState) -> Callable[[ClassifierState, dict], dict]:
    """Jitted (state, batch) → summed {top1, top5, loss, count} over the valid rows."""
    def eval_step(state: ClassifierState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = model.apply(_variables(state, state.params), batch["image"], train=False)
        labels = batch["label"]
        valid = batch["valid"].astype(jnp.float32)
        k = min(5, logits.shape[-1])
        top_k = jax.lax.top_k(logits, k)[1]
        in_top_k = jnp.any(top_k == labels[:, None], axis=-1)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        return {"top1": jnp.sum((top_k[:, 0] == labels) * valid),
                "top5": jnp.sum(in_top_k * valid),
                "loss": jnp.sum(loss * valid),
                "count": jnp.sum(valid)}

    return jax.jit(eval_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
