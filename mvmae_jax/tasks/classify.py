"""The linear probe and fine-tuning of a pretrained encoder (`--config.init_from=DIR`)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from mvmae_jax import checkpointing, config_lib, mixup, models, optim
from mvmae_jax import train_step as ts
from mvmae_jax.default_config import PROBE
from mvmae_jax.models import ENCODER_FIELDS, encoder_dims


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the run trains with: a probe or fine-tuning from `init_from` takes the encoder
    size and input normalisation of its pretraining run."""
    if config.task == "pretrain" or not config.init_from:
        return config
    pretrained = config_lib.check_init_from(config)
    config = ml_collections.ConfigDict(config.to_dict())
    for field in ENCODER_FIELDS:
        config.model[field] = pretrained.model.get(field, config.model[field])
    config.input.mean = tuple(pretrained.input.mean)
    config.input.std = tuple(pretrained.input.std)
    return config


def _init_step(config: ml_collections.ConfigDict) -> int | None:
    return config.init_step if config.init_step >= 0 else None


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


class ClassifyTask:
    """The linear probe or fine-tuning as a `tasks.Task`."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, train_source: Any):
        self.config = config
        self.mesh = mesh
        self.source = train_source
        self.num_classes = config.num_classes or train_source.num_classes
        if not self.num_classes:
            raise config_lib.ConfigError(
                "the training data has no class labels; set config.num_classes and use a "
                "labelled data set (an image folder needs one sub-folder per class)")
        self.probe = config.task == PROBE
        self.model = models.build_model(config, self.num_classes)
        self.pixels = functools.partial(models.normalise_pixels, mean=config.input.mean,
                                        std=config.input.std)
        self.phases = ("train",)
        self.pretrained_encoder = None
        if config.init_from:
            _, params, step = checkpointing.load_params(config.init_from, _init_step(config))
            self.pretrained_encoder = params["encoder"]
            logging.info("Encoder from %s, step %d.", config.init_from, step)
        else:
            logging.warning("config.init_from is empty: the encoder is randomly initialised.")

    # --- State.
    # The probe's frozen encoder is placed like the parameters; BatchNorm statistics replicated.
    extras_spec = {"frozen": ts.ExtraSpec(sharding="params")}

    def init(self, rng: jax.Array) -> tuple[Any, dict[str, Any]]:
        """(trained parameters, extras) with the pretrained encoder when there is one (keys the
        classifier lacks are dropped); the probe's encoder goes to extras["frozen"]."""
        images = jnp.zeros((1, self.config.img_size, self.config.img_size, 3), jnp.float32)
        variables = flax.core.unfreeze(self.model.init(rng, images))
        if self.pretrained_encoder is not None:
            variables["params"]["encoder"] = _matching(self.pretrained_encoder,
                                                       variables["params"]["encoder"])
        params = dict(variables["params"])
        extras = {"frozen": {"encoder": params.pop("encoder")}} if self.probe else {}
        if "batch_stats" in variables:
            extras["batch_stats"] = variables["batch_stats"]
        return params, extras

    def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        """LARS (probe) or AdamW with layer-wise decay (fine-tuning) of the trained parameters."""
        params = jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0))[0])
        return optim.make_classify_optimizer(self.config.optim, schedule, params,
                                             encoder_dims(self.config.model)["depth"])

    def phase_at_epoch(self, epoch: int) -> str:
        return "train"

    def variables(self, params: Any, extras: dict[str, Any]) -> dict[str, Any]:
        """The model's variables from the trained parameters and the extras."""
        variables = {"params": {**extras.get("frozen", {}), **params}}
        if "batch_stats" in extras:
            variables["batch_stats"] = extras["batch_stats"]
        return variables

    # --- The objective.
    def gradients(self, params: Any, extras: dict[str, Any], batch: dict[str, jax.Array],
                  rng: jax.Array, phase: str) -> tuple[Any, dict[str, jax.Array], dict]:
        """(gradients, metrics, extras): soft cross-entropy of the mixed batch; the probe's
        BatchNorm statistics are updated in extras."""
        del phase
        aug = self.config.augment
        mix_rng, dropout_rng = jax.random.split(rng)
        images, targets = mixup.mix_batch(
            mix_rng, batch["image"], batch["label"], num_classes=self.num_classes,
            mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, switch_prob=aug.switch_prob,
            label_smoothing=aug.label_smoothing, groups=self.mesh.size)

        def loss_fn(params):
            logits, updates = self.model.apply(
                self.variables(params, extras), images, train=True, frozen_encoder=self.probe,
                rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
            loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
            return loss, (logits, updates.get("batch_stats"))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # top1 against the dominant label of the mixed target.
        top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
        metrics = {"loss": loss, "top1": top1}
        if batch_stats:
            extras = dict(extras, batch_stats=batch_stats)
        return grads, metrics, extras

    # --- Epoch starts.
    def make_epoch_start(self, state_sharding, bank_batches) -> None:
        return None

    def make_pictures(self, state_sharding) -> None:
        return None

    # --- What evaluators see.
    def eval_params(self, state) -> dict[str, Any]:
        return self.variables(state.params, state.extras)

    def logits(self, variables: dict[str, Any], images: jax.Array) -> jax.Array:
        """Class logits of uint8 images."""
        return self.model.apply(variables, self.pixels(images), train=False)

    def encode(self, variables: dict[str, Any], images: jax.Array) -> jax.Array:
        """Tokens (B, 1 + N, D) of the classifier's encoder, of uint8 images."""
        return self.model.apply(variables, self.pixels(images),
                                method=lambda module, x: module.encoder(x)["tokens"])
