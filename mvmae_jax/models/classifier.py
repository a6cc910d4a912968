"""ViT classifier for the linear probe and fine-tuning (docs/method.md#evaluation-protocols)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvmae_jax.models.vit import VisionTransformer, pool_tokens

POOLS = ("cls", "mean", "gap")


class Classifier(nn.Module):
    """Encoder → pooled feature → (BatchNorm) → linear head. `pool`: "cls" or "mean" after the
    final norm, or "gap" (MAE's fine-tuning: the patch mean before any norm, then `fc_norm`)."""

    num_classes: int
    encoder: VisionTransformer  # without its final norm for pool "gap"
    pool: str = "cls"
    head_batchnorm: bool = False
    head_init_std: float = 0.01

    def setup(self):
        if self.pool == "gap":
            self.fc_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.encoder.dtype)
        if self.head_batchnorm:
            # PyTorch's BatchNorm1d(affine=False, eps=1e-6): momentum 0.1 there is 0.9 here.
            self.head_norm = nn.BatchNorm(momentum=0.9, epsilon=1e-6, use_bias=False,
                                          use_scale=False, dtype=jnp.float32)
        self.head = nn.Dense(self.num_classes, dtype=jnp.float32,
                             kernel_init=nn.initializers.truncated_normal(self.head_init_std),
                             name="head")

    def features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, C) normalised images → pooled features (B, D) float32."""
        tokens = self.encoder(images, train=train)["tokens"]
        if self.pool == "gap":
            return self.fc_norm(pool_tokens(tokens, "mean")).astype(jnp.float32)
        return pool_tokens(tokens, self.pool).astype(jnp.float32)

    def classify(self, features: jax.Array, train: bool = False) -> jax.Array:
        """Pooled features → logits (B, num_classes) float32."""
        if self.head_batchnorm:
            features = self.head_norm(features, use_running_average=not train)
        return self.head(features)

    def __call__(self, images: jax.Array, train: bool = False,
                 frozen_encoder: bool = False) -> jax.Array:
        """Logits of `images`; `frozen_encoder` stops gradients at the pooled feature."""
        features = self.features(images, train=train and not frozen_encoder)
        if frozen_encoder:
            features = jax.lax.stop_gradient(features)
        return self.classify(features, train=train)
