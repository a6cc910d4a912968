"""Model definitions and the builder that turns a config into an `MVMAE`."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from mvmae_jax.models.mvmae import MVMAE, MAEDecoder, ProjectionHead
from mvmae_jax.models.vit import VIT_SIZES, VisionTransformer, sincos_2d, vit_config

__all__ = [
    "MAEDecoder", "MVMAE", "ProjectionHead", "VIT_SIZES", "VisionTransformer", "build_model",
    "encoder_dims", "sincos_2d", "vit_config",
]

_ENCODER_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "patch_size")


def encoder_dims(model_config: ml_collections.ConfigDict) -> dict[str, int]:
    """The encoder size: `variant` ('B/16', ...) with any explicitly given field on top."""
    dims = vit_config(model_config.variant) if model_config.get("variant") else {}
    for field in _ENCODER_FIELDS:
        if model_config.get(field):
            dims[field] = model_config[field]
    missing = [f for f in _ENCODER_FIELDS if f not in dims]
    if missing:
        raise ValueError(f"config.model needs a variant (e.g. 'B/16') or the fields {missing}")
    return dims


def build_model(config: ml_collections.ConfigDict) -> MVMAE:
    """The pretraining model of a config (see configs/ for the fields)."""
    dims = encoder_dims(config.model)
    return MVMAE(
        image_size=config.img_size,
        decoder_width=config.model.decoder_width,
        decoder_depth=config.model.decoder_depth,
        decoder_heads=config.model.decoder_heads,
        contrastive=config.views.num == 2 and config.contrastive.weight > 0,
        pool=config.contrastive.pool,
        projection_hidden=config.contrastive.hidden_dim,
        projection_dim=config.contrastive.output_dim,
        projection_layers=config.contrastive.num_layers,
        remat=config.model.remat,
        remat_policy=config.model.remat_policy,
        dtype=jnp.dtype(config.model.dtype),
        attention=config.model.attention,
        **dims,
    )
