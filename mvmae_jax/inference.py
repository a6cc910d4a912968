"""A checkpoint's encoder as a function of images in [0, 1]:

  encoder = mvmae_jax.load_encoder("/tmp/run")   # (B, H, W, 3) in [0, 1] → (B, 1 + N, D)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvmae_jax import checkpointing
from mvmae_jax.export import encoder_params
from mvmae_jax.models import VisionTransformer, encoder_dims


@functools.cache
def _compiled_forward(dims: tuple[tuple[str, int], ...], dtype: jnp.dtype) -> Callable:
    """One jitted forward per architecture (`dims` items) and dtype."""
    module = VisionTransformer(**dict(dims), dtype=dtype)

    def forward(params, images, mean, std):
        x = (images.astype(jnp.float32) - mean) / std
        return module.apply({"params": params}, x)["tokens"].astype(jnp.float32)

    return jax.jit(forward)


class Encoder:
    """A checkpoint's encoder: RGB images (B, H, W, 3) in [0, 1] → float32 final-norm tokens
    (B, 1 + N, D), [CLS] first; any multiple of `patch_size` works as the image size."""

    def __init__(self, config: ml_collections.ConfigDict, params: Any, step: int,
                 dtype: Any = jnp.float32):
        self.config = config
        self.step = step
        self.dtype = jnp.dtype(dtype)
        self.dims = encoder_dims(config.model)
        self.params = jax.device_put(
            jax.tree.map(lambda x: np.asarray(x, np.float32), encoder_params(params)))
        self.patch_size = self.dims["patch_size"]
        self.image_size = int(config.img_size)
        self.mean = np.asarray(config.input.mean, np.float32)
        self.std = np.asarray(config.input.std, np.float32)
        self._forward = _compiled_forward(tuple(self.dims.items()), self.dtype)

    def __call__(self, images: Any) -> jax.Array:
        shape = np.shape(images)
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"expected images of shape (B, H, W, 3), got {shape}")
        if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
            # Integer pixels in [0, 255] would be normalised as if in [0, 1].
            raise TypeError(f"expected float images in [0, 1], got {jnp.result_type(images)}; "
                            "divide uint8 images by 255")
        return self._forward(self.params, jnp.asarray(images, jnp.float32), self.mean, self.std)

    def __repr__(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        return (f"Encoder({dims}, image_size={self.image_size}, step={self.step}, "
                f"dtype={self.dtype.name})")


def load_encoder(workdir_or_checkpoint: str, step: int | None = None,
                 dtype: Any = jnp.float32) -> Encoder:
    """The encoder of a workdir's checkpoint (the latest, or `step`) or of one checkpoint
    directory, as a jitted callable on images in [0, 1]; `dtype` is the compute dtype."""
    config, params, step = checkpointing.load_params(workdir_or_checkpoint, step)
    return Encoder(config, params, step, dtype)
