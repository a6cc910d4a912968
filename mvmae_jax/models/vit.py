"""Vision Transformer encoder with big_vision parameter names.

Parameter tree (so that the weights map one-to-one onto timm's VisionTransformer):
  embedding/{kernel,bias}                    patch embedding (a p x p conv with stride p,
                                             applied to the visible patches only)
  cls                                        [CLS] token, (1, 1, D)
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
      LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}
  Transformer/encoder_norm
The 2-D sin-cos position embedding is a constant of the input size: no parameter, no update.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvmae_jax.losses import patchify

# Width, depth, heads of the standard sizes; MLP width is 4x the width.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}

Dtype = Any

# How MultiHeadDotProductAttention computes attention (config.model.attention): "auto" is
# "fused" where cuDNN's flash kernel runs (NVIDIA GPUs in bfloat16/float16), "einsum" elsewhere.
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "fused")

# What a rematerialised block keeps for its backward pass (config.model.remat_policy): names
# in jax.checkpoint_policies. "nothing_saveable": the block's input only, the whole block is
# recomputed; "dots_with_no_batch_dims_saveable": also the outputs of the products with the
# weights, so only attention, LayerNorms and GELU are recomputed and the (heads, N, N)
# probabilities are not kept; "dots_saveable": also the attention products' outputs.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
    """MAE's 1-D sin-cos embedding: (M,) positions → (M, dim), sines then cosines."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(grid_size: tuple[int, int], dim: int) -> np.ndarray:
    """MAE's 2-D sin-cos position embedding, (gh * gw, dim), patches row-major.

    As in MAE, the first half of the channels encodes the column, the second half the row, so
    that exported `pos_embed` tensors equal those of MAE's released checkpoints.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid_size
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return np.concatenate(
        [sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], axis=1).astype(np.float32)


def xavier_uniform_fused(in_axes: tuple[int, ...], out_axes: tuple[int, ...]):
    """Xavier-uniform over a kernel whose input and output dimensions span several axes.

    (DenseGeneral flattens its kernel before initialising it; Conv does not.)
    """
    return nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=in_axes, out_axis=out_axes)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth: drops the residual branch per example, rescaling the kept ones."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class DenseParams(nn.Module):
    """The kernel and bias of a `nn.DenseGeneral` (same names and shapes, zero bias), returned
    instead of applied, so that several projections can run as one matrix product.

    The kernel is Xavier-uniform over the kernel flattened to (prod(in), prod(out)), with the
    output fan multiplied by `fused_outputs`: a projection that is one of k sharing a fused
    (D, k D) matrix (MAE's qkv Linear) is initialised as that matrix's slice.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    fused_outputs: int = 1

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        flat = (math.prod(self.in_shape), math.prod(self.out_shape))
        # Xavier's variance 2 / (fan_in + fan_out) with fan_out of the whole fused matrix.
        scale = sum(flat) / (flat[0] + self.fused_outputs * flat[1])

        def kernel_init(rng, shape, dtype=jnp.float32):
            init = nn.initializers.variance_scaling(scale, "fan_avg", "uniform")
            return init(rng, flat, dtype).reshape(shape)

        kernel = self.param("kernel", kernel_init, self.in_shape + self.out_shape)
        bias = self.param("bias", nn.initializers.zeros, self.out_shape)
        return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with flax's parameter layout that can also return its [CLS] row.

    query/key/value kernels are (D, heads, head_dim) and out is (heads, head_dim, D), as in
    flax.linen.MultiHeadDotProductAttention and big_vision checkpoints; the three input kernels
    are initialised as the slices of one Xavier-uniform (D, 3D) matrix, like MAE's qkv layer.
    The einsum path runs the three input projections as one (D, 3D) matrix product and moves
    the heads in front of the tokens once, so that the attention products run on contiguous
    (head, token, head_dim) blocks (the fastest layout measured on the CPU); the fused path
    runs three products that each give the dense (B, N, H, hd) operand cuDNN's kernel takes.

    `implementation` picks how softmax(q k^T / sqrt(d)) v is computed (ATTENTION_IMPLEMENTATIONS):
    "einsum" materialises the (heads, N, N) probabilities in XLA (the fastest measured on the
    CPU); "fused" calls `jax.nn.dot_product_attention` on the tokens padded to an even count
    (prefix_attention), run as cuDNN's fused (flash) kernel on NVIDIA GPUs in
    bfloat16/float16 and as XLA operations elsewhere (fused_attention_backend); "auto" is
    "fused" where that kernel runs and "einsum" elsewhere (resolve_attention). All give the
    same values; with "fused" the [CLS] row that AMT reads is computed apart, from q[CLS] and
    the keys.
    """

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
            # One (D, 3D) product; the heads then move in front of the tokens once.
            kernel = jnp.concatenate([k.reshape(width, width) for k, _ in projections], axis=1)
            bias = jnp.concatenate([b.reshape(width) for _, b in projections])
            qkv = x @ kernel.astype(self.dtype) + bias.astype(self.dtype)
            attended, probs = _einsum_attention(qkv.reshape(batch, length, 3, heads, head_dim),
                                                self.dtype)
            # The [CLS] query's attention to the patch keys (the [CLS] key excluded).
            cls_attention = probs[:, :, 0, 1:] if return_cls_attention else None
            padded = length
        else:
            # An even token count (see prefix_attention): an odd count gets one padding row
            # here, once, rather than one on each of query, key and value.
            padded = length + length % 2
            if padded > length:
                x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0)))
            # Three products, each writing a dense (B, N, H, hd) array, the layout
            # jax.nn.dot_product_attention takes: slices of one fused product would be copied
            # into it forward and concatenated backward.
            query, key, value = (
                jnp.einsum("bnd,dhk->bnhk", x, k.astype(self.dtype)) + b.astype(self.dtype)
                for k, b in projections)
            attended = prefix_attention(query, key, value, length, scale=head_dim**-0.5,
                                        implementation=fused_attention_backend(self.dtype))
            cls_attention = (
                _cls_attention(query[:, 0] * jnp.asarray(head_dim**-0.5, self.dtype),
                               key[:, :length])
                if return_cls_attention else None)
        attended = attended.reshape(batch, padded, width)
        out = (attended @ out_kernel.reshape(width, width).astype(self.dtype)
               + out_bias.astype(self.dtype))
        return out[:, :length], cls_attention


def fused_attention_backend(dtype: Dtype) -> str:
    """What `jax.nn.dot_product_attention` runs for attention="fused": cuDNN's kernel on GPUs in
    bfloat16 or float16 (the dtypes it takes; an unsupported shape is an error, not a silent
    fallback), XLA's operations elsewhere. (JAX's own default, implementation=None, is XLA.)"""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


def resolve_attention(implementation: str, dtype: Dtype) -> str:
    """The implementation a block runs: "auto" becomes "fused" where cuDNN's kernel runs (GPU,
    bfloat16/float16) and "einsum" elsewhere; any other name is returned as it is."""
    if implementation != "auto":
        return implementation
    return "fused" if fused_attention_backend(dtype) == "cudnn" else "einsum"


def prefix_attention(query: jax.Array, key: jax.Array, value: jax.Array, length: int, *,
                     scale: float, implementation: str) -> jax.Array:
    """softmax(q k^T * scale) v among the first `length` of the M tokens of (B, M, H, hd)
    inputs, by `jax.nn.dot_product_attention` (`implementation` "cudnn" or "xla").

    The tokens past `length` are no keys (`key_value_seq_lengths`), so they change no real
    token's output and get no gradient through the keys or values; their own output rows are
    unspecified, to be dropped. All M rows stay queries (no query lengths), so that no row
    attends to nothing.

    Why M = length + 1 for an odd length: cuDNN's flash kernel takes any length in a forward
    pass, but under jax.grad JAX (0.10 and 0.11) refuses odd ones: it replaces the absent bias
    by a placeholder array that its training rule (check_is_flash_attention) counts as a bias,
    and a trained bias needs even lengths. One row passes that check; more (e.g. 256) would
    only cost.
    """
    seq_lengths = None
    if length < key.shape[1]:
        seq_lengths = jnp.full((key.shape[0],), length, jnp.int32)
    return jax.nn.dot_product_attention(query, key, value, scale=scale,
                                        key_value_seq_lengths=seq_lengths,
                                        implementation=implementation)


def _einsum_attention(qkv: jax.Array, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """Attention of a (B, N, 3, H, hd) projection: ((B, N, H, hd) output, (B, H, N, N)
    float32 probabilities)."""
    head_dim = qkv.shape[-1]
    # Heads in front of the tokens, once: the products then run on contiguous blocks.
    qkv = qkv.transpose(2, 0, 3, 1, 4)
    query, key, value = qkv[0] * jnp.asarray(head_dim**-0.5, dtype), qkv[1], qkv[2]
    logits = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    attended = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), value)
    return attended.transpose(0, 2, 1, 3), probs


def _cls_attention(scaled_cls_query: jax.Array, key: jax.Array) -> jax.Array:
    """The (B, H, N-1) attention of the [CLS] query (B, H, hd), already scaled by
    1/sqrt(hd), to the patch keys of (B, N, H, hd), in float32 like the einsum path's."""
    logits = jnp.einsum("bhd,bkhd->bhk", scaled_cls_query, key,
                        preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits, axis=-1)[:, :, 1:]


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
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        y, cls_attention = MultiHeadDotProductAttention(
            self.num_heads, dtype=self.dtype, implementation=self.attention)(
                y, return_cls_attention)
        x = x + self._drop_path(y, train)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        y = MlpBlock(self.mlp_dim, dtype=self.dtype)(y)
        x = x + self._drop_path(y, train)
        return x, cls_attention

    def _drop_path(self, y: jax.Array, train: bool) -> jax.Array:
        if not train or self.drop_path_rate == 0.0:
            return y
        return drop_path(y, self.drop_path_rate, self.make_rng("dropout"))


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
        cls_attention = None
        for i in range(self.depth):
            # Linearly increasing stochastic-depth rate, as timm/MAE.
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            last = i == self.depth - 1
            x, attn = block_cls(self.num_heads, self.mlp_dim, rate, dtype=self.dtype,
                                attention=self.attention, name=f"{self.prefix}block_{i}")(
                                    x, return_cls_attention and last, train)
            if last:
                cls_attention = attn
        if self.final_norm:
            x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"{self.prefix}_norm")(x)
        return x, cls_attention


class PatchEmbedding(nn.Module):
    """The patch embedding: a p x p convolution with stride p, applied to patches given as
    (B, n, p*p*C) pixel rows (`patchify`'s layout) by one (p*p*C, D) matrix product.

    Its parameters are those of that `nn.Conv` (kernel (p, p, C, D), bias (D,), same names
    and initialisation); a pixel row is ordered (row, column, channel) like the kernel's
    first three axes, so the kernel reshaped to (p*p*C, D) lines up with it.
    """

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        p = self.patch_size
        channels, rest = divmod(patches.shape[-1], p * p)
        if rest:
            raise ValueError(f"patch rows of {patches.shape[-1]} pixels are not {p}x{p}xC")
        kernel = self.param("kernel", xavier_uniform_fused((0, 1, 2), (3,)),
                            (p, p, channels, self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        kernel = kernel.reshape(p * p * channels, self.width).astype(self.dtype)
        return patches.astype(self.dtype) @ kernel + bias.astype(self.dtype)


class VisionTransformer(nn.Module):
    """ViT encoder over [CLS] + the visible patches only.

    Attributes:
      patch_size: p; the image size must be a multiple of it (any size, set by the input).
      width, depth, num_heads, mlp_dim: the transformer size (see `VIT_SIZES`).
      drop_path_rate: stochastic depth (fine-tuning; 0 in pretraining).
      remat: recompute each block in the backward pass (saves activation memory).
      remat_policy: what a recomputed block keeps (`REMAT_POLICIES`).
      dtype: compute dtype; parameters stay float32.
      final_norm: end with `encoder_norm` (off for MAE's global-pool fine-tuning, which
        normalises the pooled feature instead).
      attention: "auto", "einsum" or "fused" (MultiHeadDotProductAttention's
        `implementation`).
    """

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
        self.embedding = PatchEmbedding(self.patch_size, self.width, self.dtype,
                                        name="embedding")
        self.cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
        self.transformer = Transformer(
            self.depth, self.num_heads, self.mlp_dim, self.drop_path_rate, self.remat,
            self.dtype, prefix="encoder", final_norm=self.final_norm, attention=self.attention,
            remat_policy=self.remat_policy, name="Transformer")

    def patch_tokens(self, images: jax.Array, visible: jax.Array | None = None) -> jax.Array:
        """(B, H, W, C) → (B, n, D): the embeddings of the patches in `visible` ((B, n) indices;
        all N in order when None) plus their position embeddings.

        Only the listed patches' pixels are embedded: they are gathered first, so the
        embedding's matrix product runs on n patches, not N."""
        height, width = images.shape[1:3]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
        grid = (height // p, width // p)
        patches = patchify(images, p)
        posemb = jnp.asarray(sincos_2d(grid, self.width), self.dtype)
        if visible is None:
            return self.embedding(patches) + posemb[None]
        patches = jnp.take_along_axis(patches, visible[..., None], axis=1)
        return self.embedding(patches) + posemb[visible]

    def __call__(self, images: jax.Array, visible: jax.Array | None = None, *,
                 return_cls_attention: bool = False, train: bool = False) -> dict[str, jax.Array]:
        """Encodes [CLS] + the patches listed in `visible` (all patches when None).

        Args:
          images: (B, H, W, C) normalised images.
          visible: (B, n_vis) int patch indices, or None for all N patches in order.
          return_cls_attention: also return the last block's [CLS]-to-patch attention.
          train: enables stochastic depth.
        Returns:
          dict with `tokens` (B, 1 + n_vis, D) after the final norm if any ([CLS] first), and with
          `cls_attention` (B, heads, n_vis) when asked for.
        """
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


def vit_config(variant: str) -> dict[str, int]:
    """'B/16' → dict(width, depth, num_heads, mlp_dim, patch_size)."""
    size, _, patch = variant.partition("/")
    if size not in VIT_SIZES or not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"unknown ViT variant {variant!r}; expected e.g. 'B/16', sizes "
                         f"{sorted(VIT_SIZES)}")
    width, depth, heads = VIT_SIZES[size]
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
                patch_size=int(patch))
