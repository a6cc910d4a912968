"""Vision Transformer encoder with big_vision parameter names (one-to-one with timm's
VisionTransformer; the table is in docs/implementation.md); sin-cos positions are constants."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvmae_jax.losses import gather_patches, patchify

# Width, depth, heads of the standard sizes; the MLP is 4x the width.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
    "H": (1280, 32, 16)}

Dtype = Any

# config.model.attention: see MultiHeadDotProductAttention.
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "fused")

# config.model.remat_policy: names in jax.checkpoint_policies, saving more from left to right.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


def sincos_2d(grid_size: tuple[int, int], dim: int) -> np.ndarray:
    """MAE's 2-D sin-cos position embedding, (gh * gw, dim), patches row-major: sines then
    cosines of the column in the first half of the channels, of the row in the second."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_size[0]), np.arange(grid_size[1]), indexing="ij")
    angles = [positions.reshape(-1, 1) * omega for positions in (cols, rows)]
    return np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)],
                          axis=1).astype(np.float32)


class DenseParams(nn.Module):
    """A `nn.DenseGeneral`'s kernel and bias, returned so that projections can be fused.
    Xavier-uniform as a slice of one (D, `fused_outputs` D) matrix (MAE's qkv Linear)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    fused_outputs: int = 1

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        fan_in, fan_out = np.prod(self.in_shape), np.prod(self.out_shape)
        # Xavier's variance 2 / (fan_in + fan_out) with fan_out of the whole fused matrix.
        scale = float(fan_in + fan_out) / float(fan_in + self.fused_outputs * fan_out)
        axes = len(self.in_shape), len(self.in_shape) + len(self.out_shape)
        kernel_init = nn.initializers.variance_scaling(
            scale, "fan_avg", "uniform", in_axis=tuple(range(axes[0])),
            out_axis=tuple(range(*axes)))
        kernel = self.param("kernel", kernel_init, self.in_shape + self.out_shape)
        bias = self.param("bias", nn.initializers.zeros, self.out_shape)
        return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with flax's parameter layout that can also return its [CLS] row:
    "einsum" in XLA, "fused" through `jax.nn.dot_product_attention`, "auto" the fused kernel
    where it runs."""

    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, return_cls_attention: bool = False):
        batch, length, width = x.shape
        implementation = resolve_attention(self.implementation, self.dtype)
        heads, head_dim = self.num_heads, width // self.num_heads
        projections = [DenseParams((width,), (heads, head_dim), fused_outputs=3, name=name)()
                       for name in ("query", "key", "value")]
        out_kernel, out_bias = DenseParams((heads, head_dim), (width,), name="out")()
        x = x.astype(self.dtype)
        if implementation == "einsum":
            kernel = jnp.concatenate([k.reshape(width, width) for k, _ in projections], axis=1)
            bias = jnp.concatenate([b.reshape(width) for _, b in projections])
            qkv = x @ kernel.astype(self.dtype) + bias.astype(self.dtype)
            attended, probs = _einsum_attention(qkv.reshape(batch, length, 3, heads, head_dim),
                                                self.dtype)
            # The [CLS] query's attention to the patch keys (the [CLS] key excluded).
            cls_attention = probs[:, :, 0, 1:] if return_cls_attention else None
            padded = length
        else:
            # An even token count (see prefix_attention), padded once here.
            padded = length + length % 2
            if padded > length:
                x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0)))
            # Three products: slices of one would be copied into dense (B, N, H, hd) operands.
            query, key, value = (
                jnp.einsum("bnd,dhk->bnhk", x, k.astype(self.dtype)) + b.astype(self.dtype)
                for k, b in projections)
            attended = prefix_attention(query, key, value, length, scale=head_dim**-0.5,
                                        implementation=fused_attention_backend(self.dtype))
            cls_attention = None
            if return_cls_attention:  # [CLS] to the patch keys, float32 as the einsum path's
                scaled = query[:, 0] * jnp.asarray(head_dim**-0.5, self.dtype)
                logits = jnp.einsum("bhd,bkhd->bhk", scaled, key[:, :length],
                                    preferred_element_type=jnp.float32)
                cls_attention = jax.nn.softmax(logits, axis=-1)[:, :, 1:]
        attended = attended.reshape(batch, padded, width)
        out = (attended @ out_kernel.reshape(width, width).astype(self.dtype)
               + out_bias.astype(self.dtype))
        return out[:, :length], cls_attention


def fused_attention_backend(dtype: Dtype) -> str:
    """What `jax.nn.dot_product_attention` runs for attention="fused": "cudnn" on GPUs in
    bfloat16 or float16 (an unsupported shape is then an error, not a fallback), else "xla"."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


def resolve_attention(implementation: str, dtype: Dtype) -> str:
    """"auto" → "fused" where cuDNN's kernel runs, else "einsum"; other names unchanged."""
    if implementation != "auto":
        return implementation
    return "fused" if fused_attention_backend(dtype) == "cudnn" else "einsum"


def prefix_attention(query: jax.Array, key: jax.Array, value: jax.Array, length: int, *,
                     scale: float, implementation: str) -> jax.Array:
    """softmax(q k^T * scale) v among the first `length` of the M tokens of (B, M, H, hd)
    inputs; the padding rows are no keys and their outputs are to be dropped. Odd lengths are
    padded by one row: JAX's cuDNN rule refuses them under jax.grad."""
    seq_lengths = (jnp.full((key.shape[0],), length, jnp.int32) if length < key.shape[1]
                   else None)
    return jax.nn.dot_product_attention(query, key, value, scale=scale,
                                        key_value_seq_lengths=seq_lengths,
                                        implementation=implementation)


def _einsum_attention(qkv: jax.Array, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """Attention of a (B, N, 3, H, hd) projection: (output (B, N, H, hd), probabilities float32)."""
    head_dim = qkv.shape[-1]
    # Heads in front of the tokens once, so that the products run on contiguous blocks.
    qkv = qkv.transpose(2, 0, 3, 1, 4)
    query, key, value = qkv[0] * jnp.asarray(head_dim**-0.5, dtype), qkv[1], qkv[2]
    logits = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    attended = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), value)
    return attended.transpose(0, 2, 1, 3), probs


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype,
                     kernel_init=nn.initializers.xavier_uniform())(x)
        # Exact (erf) GELU, as timm and PyTorch MAE.
        x = nn.gelu(x, approximate=False)
        return nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)


class Encoder1DBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    num_heads: int
    mlp_dim: int
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, return_cls_attention: bool = False, train: bool = False):
        # Stochastic depth: a residual branch dropped for whole examples.
        drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2),
                               deterministic=not train)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        y, cls_attention = MultiHeadDotProductAttention(
            self.num_heads, dtype=self.dtype, implementation=self.attention)(
                y, return_cls_attention)
        x = x + drop_path(y)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        y = MlpBlock(self.mlp_dim, dtype=self.dtype)(y)
        return x + drop_path(y), cls_attention


class Transformer(nn.Module):
    """A stack of blocks followed by a final LayerNorm (`<prefix>_norm`)."""

    depth: int
    num_heads: int
    mlp_dim: int
    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    prefix: str = "encoder"
    final_norm: bool = True
    attention: str = "auto"
    remat_policy: str = "nothing_saveable"

    @nn.compact
    def __call__(self, x: jax.Array, return_cls_attention: bool = False, train: bool = False):
        block_cls = Encoder1DBlock
        if self.remat:
            # The static flags (return_cls_attention, train) stay Python bools.
            block_cls = nn.remat(Encoder1DBlock, static_argnums=(2, 3),
                                 policy=getattr(jax.checkpoint_policies, self.remat_policy))
        for i in range(self.depth):
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)  # linear, as timm/MAE
            last = i == self.depth - 1  # the only block asked for its [CLS] attention
            x, cls_attention = block_cls(self.num_heads, self.mlp_dim, rate, dtype=self.dtype,
                                         attention=self.attention, name=f"{self.prefix}block_{i}")(
                                             x, return_cls_attention and last, train)
        if self.final_norm:
            x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"{self.prefix}_norm")(x)
        return x, cls_attention


class PatchEmbedding(nn.Module):
    """A p x p convolution with stride p, applied to (B, n, p*p*C) rows of `patchify`."""

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        p = self.patch_size
        channels, rest = divmod(patches.shape[-1], p * p)
        if rest:
            raise ValueError(f"patch rows of {patches.shape[-1]} pixels are not {p}x{p}xC")
        kernel = self.param("kernel", nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                            (p, p, channels, self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        kernel = kernel.reshape(p * p * channels, self.width).astype(self.dtype)
        return patches.astype(self.dtype) @ kernel + bias.astype(self.dtype)


class VisionTransformer(nn.Module):
    """ViT encoder over [CLS] + the visible patches, for any image size `patch_size` divides;
    `dtype` computes (parameters stay float32); `final_norm` is off for MAE's global pool."""

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    final_norm: bool = True
    attention: str = "auto"
    remat_policy: str = "nothing_saveable"

    def setup(self):
        self.embedding = PatchEmbedding(self.patch_size, self.width, self.dtype, name="embedding")
        self.cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
        self.transformer = Transformer(
            self.depth, self.num_heads, self.mlp_dim, self.drop_path_rate, self.remat,
            self.dtype, prefix="encoder", final_norm=self.final_norm, attention=self.attention,
            remat_policy=self.remat_policy, name="Transformer")

    def patch_tokens(self, images: jax.Array, visible: jax.Array | None = None) -> jax.Array:
        """(B, H, W, C) → (B, n, D): the embeddings plus position embeddings of the patches in
        `visible` ((B, n) indices; all N in order when None), only those pixels embedded."""
        height, width = images.shape[1:3]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
        grid = (height // p, width // p)
        patches = patchify(images, p)
        posemb = jnp.asarray(sincos_2d(grid, self.width), self.dtype)
        if visible is None:
            return self.embedding(patches) + posemb[None]
        return self.embedding(gather_patches(patches, visible)) + posemb[visible]

    def __call__(self, images: jax.Array, visible: jax.Array | None = None, *,
                 return_cls_attention: bool = False, train: bool = False) -> dict[str, jax.Array]:
        """`tokens` (B, 1 + n_vis, D) of [CLS] + the patches in `visible` (all when None), and with
        `return_cls_attention` the last block's `cls_attention` (B, heads, n_vis)."""
        x = self.patch_tokens(images, visible)
        # The [CLS] token has no position embedding (MAE's zero row of pos_embed).
        cls = jnp.broadcast_to(self.cls.astype(self.dtype), (x.shape[0], 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)
        self.sow("intermediates", "encoder_input_tokens", x)
        tokens, cls_attention = self.transformer(x, return_cls_attention, train)
        out = {"tokens": tokens}
        if return_cls_attention:
            out["cls_attention"] = cls_attention
        return out


def pool_tokens(tokens: jax.Array, pool: str) -> jax.Array:
    """Tokens (B, 1 + N, D) → (B, D): the [CLS] token ("cls") or the patch tokens' "mean"."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(axis=1)


def vit_config(variant: str) -> dict[str, int]:
    """'B/16' → dict(width, depth, num_heads, mlp_dim, patch_size)."""
    size, _, patch = variant.partition("/")
    if size not in VIT_SIZES or not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"unknown ViT variant {variant!r}; expected e.g. 'B/16', sizes "
                         f"{sorted(VIT_SIZES)}")
    width, depth, heads = VIT_SIZES[size]
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width, patch_size=int(patch))
