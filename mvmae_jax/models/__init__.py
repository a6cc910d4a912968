"""Model definitions and the one place where a config becomes a model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mvmae_jax.errors import ConfigError, in_range, need, one_of
from mvmae_jax.models import classifier, vit
from mvmae_jax.models.classifier import Classifier
from mvmae_jax.models.mvmae import MVMAE, MAEDecoder, ProjectionHead
from mvmae_jax.models.vit import VIT_SIZES, VisionTransformer, sincos_2d, vit_config

__all__ = [
    "Classifier", "MAEDecoder", "MVMAE", "ProjectionHead", "VIT_SIZES", "VisionTransformer",
    "ENCODER_FIELDS", "ENCODER_SIZES", "build_model", "encoder_dims", "normalise_pixels",
    "sincos_2d", "vit_config",
]

# The config.model fields that fix the encoder: a variant, and sizes that override it.
ENCODER_SIZES = ("width", "depth", "num_heads", "mlp_dim", "patch_size")
ENCODER_FIELDS = ("variant",) + ENCODER_SIZES


def encoder_dims(model_config: ml_collections.ConfigDict) -> dict[str, int]:
    """The encoder size: `variant` ('B/16', ...) with any explicitly given size on top."""
    dims = vit_config(model_config.variant) if model_config.variant else {}
    dims.update({field: model_config[field] for field in ENCODER_SIZES if model_config[field]})
    missing = [field for field in ENCODER_SIZES if field not in dims]
    if missing:
        raise ValueError(f"config.model needs a variant (e.g. 'B/16') or the fields {missing}")
    return dims


def normalise_pixels(pixels: jax.Array, mean, std) -> jax.Array:
    """uint8 pixels as batches leave the host → float32 (x / 255 - mean) / std per channel."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (pixels.astype(jnp.float32) / 255.0 - mean) / std


def _block_settings(model_config: ml_collections.ConfigDict) -> dict:
    """How every transformer block of the run computes: dtype, remat, attention."""
    return dict(remat=model_config.remat, remat_policy=model_config.remat_policy,
                dtype=jnp.dtype(model_config.dtype), attention=model_config.attention)


def build_model(config: ml_collections.ConfigDict,
                num_classes: int | None = None) -> MVMAE | Classifier:
    """The model of a config: the pretraining `MVMAE`, or for the linear probe and fine-tuning
    (`config.task`) the `Classifier` with `num_classes` outputs."""
    dims, blocks = encoder_dims(config.model), _block_settings(config.model)
    if config.task != "pretrain":
        encoder = VisionTransformer(**dims, **blocks, drop_path_rate=config.model.drop_path,
                                    final_norm=config.model.pool != "gap")
        return Classifier(num_classes=num_classes, encoder=encoder, pool=config.model.pool,
                          head_batchnorm=config.task == "linear_probe",
                          head_init_std=config.model.head_init_std)
    return MVMAE(
        encoder=VisionTransformer(**dims, **blocks),
        image_size=config.img_size,
        decoder_width=config.model.decoder_width,
        decoder_depth=config.model.decoder_depth,
        decoder_heads=config.model.decoder_heads,
        contrastive=config.views.num == 2 and config.contrastive.weight > 0,
        pool=config.contrastive.pool,
        projection_hidden=config.contrastive.hidden_dim,
        projection_dim=config.contrastive.output_dim,
        projection_layers=config.contrastive.num_layers,
        **blocks,
    )


def check_config(model: ml_collections.ConfigDict) -> dict[str, int]:
    """Raises ConfigError for a bad `config.model`; returns the encoder size."""
    for field in ENCODER_SIZES:
        in_range(f"model.{field}", model[field], 0)
    try:
        dims = encoder_dims(model)
    except (ValueError, KeyError) as error:
        raise ConfigError(f"config.model.variant={model.variant!r}: {error}") from error
    _check_width("width", dims["width"], "num_heads", dims["num_heads"])
    need(min(dims["depth"], dims["mlp_dim"], dims["patch_size"]) >= 1,
         f"config.model: depth, mlp_dim and patch_size must be >= 1 (from the variant "
         f"{model.variant!r} or set), got {dims}")
    one_of("model.dtype", model.dtype, ("float32", "bfloat16", "float16"))
    one_of("model.attention", model.attention, vit.ATTENTION_IMPLEMENTATIONS)
    one_of("model.remat_policy", model.remat_policy, vit.REMAT_POLICIES)
    if "decoder_width" in model:  # pretraining
        in_range("model.decoder_depth", model.decoder_depth, 1)
        _check_width("decoder_width", model.decoder_width, "decoder_heads", model.decoder_heads)
    if "pool" in model:  # a classifier
        one_of("model.pool", model.pool, classifier.POOLS)
        in_range("model.head_init_std", model.head_init_std, 0)
        in_range("model.drop_path", model.drop_path, 0, 1, high_open=True)
    return dims


def _check_width(width_field: str, width: int, heads_field: str, heads: int) -> None:
    """Heads split the width evenly; the 2-D sin-cos position embedding needs width % 4 == 0."""
    need(heads >= 1, f"config.model.{heads_field}={heads} must be >= 1")
    need(width >= 1 and width % heads == 0,
         f"config.model.{heads_field}={heads} does not divide config.model.{width_field}="
         f"{width}; choose a number of heads that divides the width")
    need(width % 4 == 0, f"config.model.{width_field}={width} must be divisible by 4 (2-D "
         "sin-cos position embedding)")
