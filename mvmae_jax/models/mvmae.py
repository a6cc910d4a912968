"""The MV-MAE model: ViT encoder, MAE decoder and contrastive projection head, views folded
into the batch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvmae_jax import masking
from mvmae_jax.losses import l2_normalise
from mvmae_jax.models.vit import Dtype, Transformer, VisionTransformer, pool_tokens, sincos_2d


class MAEDecoder(nn.Module):
    """MAE decoder; row k predicts patch `masked[:, k]`. No unshuffle: each token carries its
    own position embedding."""

    grid_size: tuple[int, int]
    patch_pixels: int  # p * p * C
    width: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_dim: int = 2048
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "einsum"
    remat_policy: str = "nothing_saveable"

    @nn.compact
    def __call__(self, encoder_tokens: jax.Array, visible: jax.Array,
                 masked: jax.Array) -> jax.Array:
        """encoder_tokens (B, 1 + n_vis, D_enc) → predictions (B, n_mask, patch_pixels)."""
        x = nn.Dense(self.width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                     name="decoder_embed")(encoder_tokens)
        batch, num_masked = masked.shape
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
        posemb = jnp.asarray(sincos_2d(self.grid_size, self.width), self.dtype)
        cls_pos = jnp.zeros((batch, 1, self.width), self.dtype)
        positions = jnp.concatenate([cls_pos, posemb[visible], posemb[masked]], axis=1)
        mask_tokens = jnp.broadcast_to(mask_token.astype(self.dtype),
                                       (batch, num_masked, self.width))
        x = jnp.concatenate([x, mask_tokens], axis=1) + positions
        self.sow("intermediates", "decoder_input_tokens", x)
        x, _ = Transformer(self.depth, self.num_heads, self.mlp_dim, remat=self.remat,
                           dtype=self.dtype, prefix="decoder", attention=self.attention,
                           remat_policy=self.remat_policy, name="DecoderTransformer")(x)
        x = x[:, x.shape[1] - num_masked:]
        return nn.Dense(self.patch_pixels, dtype=self.dtype,
                        kernel_init=nn.initializers.xavier_uniform(), name="decoder_pred")(x)


class ProjectionHead(nn.Module):
    """MLP projection for the contrastive loss; output L2-normalised, float32."""

    hidden_dim: int = 2048
    output_dim: int = 256
    num_layers: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        widths = [self.hidden_dim] * (self.num_layers - 1) + [self.output_dim]
        for i, width in enumerate(widths):  # Dense_0, Dense_1, ...
            if i:
                x = nn.gelu(x, approximate=False)
            x = nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)
        return l2_normalise(x)


class MVMAE(nn.Module):
    """The `encoder`, the `decoder` and, when `contrastive`, the `projection` head."""

    encoder: VisionTransformer
    image_size: int
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    contrastive: bool = True
    pool: str = "cls"
    projection_hidden: int = 2048
    projection_dim: int = 256
    projection_layers: int = 3
    channels: int = 3
    remat: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "einsum"
    remat_policy: str = "nothing_saveable"

    def setup(self):
        self.decoder = MAEDecoder(
            grid_size=self.grid_size, patch_pixels=self.patch_size ** 2 * self.channels,
            width=self.decoder_width, depth=self.decoder_depth, num_heads=self.decoder_heads,
            mlp_dim=4 * self.decoder_width, remat=self.remat, dtype=self.dtype,
            attention=self.attention, remat_policy=self.remat_policy)
        if self.contrastive:
            self.projection = ProjectionHead(self.projection_hidden, self.projection_dim,
                                             self.projection_layers, dtype=self.dtype)

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def _check_size(self, images: jax.Array) -> None:
        # The decoder's position grid is fixed by image_size.
        if tuple(images.shape[1:3]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, the model is "
                             f"built for {self.image_size}x{self.image_size}")

    def __call__(self, images: jax.Array, masks: masking.Masks) -> dict[str, jax.Array]:
        """(R, H, W, C) views → `predictions` (R, n_mask, p*p*C) of `masks.masked` from the
        visible patches, and with a contrastive head `embeddings` (R, projection_dim)."""
        self._check_size(images)
        tokens = self.encoder(images, masks.visible)["tokens"]
        out = {"predictions": self.decoder(tokens, masks.visible, masks.masked)}
        if self.contrastive:
            out["embeddings"] = self._embed(tokens)
        return out

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return self.projection(pool_tokens(tokens, self.pool))

    def embeddings(self, images: jax.Array, masks: masking.Masks) -> jax.Array:
        """`__call__`'s `embeddings` without the decoder."""
        self._check_size(images)
        return self._embed(self.encoder(images, masks.visible)["tokens"])

    def attention_maps(self, images: jax.Array) -> jax.Array:
        """(R, H, W, C) → (R, N): AMT maps from a forward over all patches, no gradient."""
        self._check_size(images)
        out = self.encoder(images, None, return_cls_attention=True)
        return masking.cls_attention_map(out["cls_attention"])
