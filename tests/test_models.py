"""The Flax models against the specification (docs/method.md) and published architectures.

ViT-B-sized checks use `jax.eval_shape` only (no compute). The numerical references here are
written from the specification in plain numpy (float64): the MAE sin-cos position embedding, a
pre-norm ViT forward from the parameter tree, the [CLS] attention and the decoder's input tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import smooth_images, tiny_config
from jax import ad_checkpoint
from scipy import special

from mvmae_jax import config_lib, masking, models, optim, sharding
from mvmae_jax.default_config import get_base_config
from mvmae_jax.models import vit
from mvmae_jax.models.vit import VisionTransformer

KEY = jax.random.key(0)


# --------------------------------------------------------------------------------------------
# Independent references (numpy, float64).


def _published_vit_count(width: int, depth: int, mlp_dim: int, patch: int,
                         channels: int = 3) -> int:
    """ViT encoder parameters (no position embedding, no head) from the published architecture."""
    patch_embed = patch * patch * channels * width + width
    cls_token = width
    layer_norm = 2 * width
    attention = 4 * (width * width + width)  # q, k, v, out projections with biases
    mlp = (width * mlp_dim + mlp_dim) + (mlp_dim * width + width)
    block = 2 * layer_norm + attention + mlp
    return patch_embed + cls_token + depth * block + layer_norm


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _mae_sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """MAE's 2-D sin-cos embedding, patch by patch: [sin(cω), cos(cω), sin(rω), cos(rω)]."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    out = np.zeros((grid_h * grid_w, dim), np.float64)
    for k in range(grid_h * grid_w):
        row, col = divmod(k, grid_w)  # patches row-major
        out[k] = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                                 np.sin(row * omega), np.cos(row * omega)])
    return out


def _patchify(images: np.ndarray, p: int) -> np.ndarray:
    """(B, H, W, C) → (B, N, p*p*C), pixels (p, p, C) inside a patch, patches row-major."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def _layer_norm(x: np.ndarray, params) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * params["scale"] + params["bias"]


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _block_reference(x: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
    """Pre-norm block x + attn(LN(x)), x + mlp(LN(x)); also the attention probs (B, h, T, T)."""
    attn = params["MultiHeadDotProductAttention_0"]

    def project(name, y):
        return np.einsum("btd,dhk->bthk", y, attn[name]["kernel"]) + attn[name]["bias"]

    y = _layer_norm(x, params["LayerNorm_0"])
    q, k, v = project("query", y), project("key", y), project("value", y)
    probs = _softmax(np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1]))
    attended = np.einsum("bhqs,bshk->bqhk", probs, v)
    x = x + np.einsum("bqhk,hkd->bqd", attended, attn["out"]["kernel"]) + attn["out"]["bias"]
    mlp = params["MlpBlock_0"]
    y = _layer_norm(x, params["LayerNorm_1"])
    y = _gelu_erf(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    return x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"], probs


def _encoder_reference(params, images: np.ndarray, visible: np.ndarray | None,
                       patch: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole ViT encoder in numpy: (tokens (B, 1+n, D), last block's probs (B, h, T, T))."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    kernel = params["embedding"]["kernel"]
    width = kernel.shape[-1]
    _, h, w, _ = images.shape
    x = _patchify(images.astype(np.float64), patch) @ kernel.reshape(-1, width)
    x = x + params["embedding"]["bias"] + _mae_sincos_2d(h // patch, w // patch, width)[None]
    if visible is not None:
        x = np.take_along_axis(x, visible[..., None], axis=1)
    cls = np.broadcast_to(params["cls"].reshape(1, 1, width), (x.shape[0], 1, width))
    x = np.concatenate([cls, x], axis=1)
    blocks = params["Transformer"]
    depth = sum(name.startswith("encoderblock_") for name in blocks)
    probs = None
    for i in range(depth):
        x, probs = _block_reference(x, blocks[f"encoderblock_{i}"])
    return _layer_norm(x, blocks["encoder_norm"]), probs


def _perturbed(params, seed: int, scale: float = 0.1):
    """Params plus Gaussian noise, so that biases and LayerNorm affines are not 0 / 1."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [
        jnp.asarray(np.asarray(leaf) + scale * rng.normal(size=leaf.shape), leaf.dtype)
        for leaf in leaves])


def _paths(tree) -> list[str]:
    return ["/".join(k) for k in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))]


# --------------------------------------------------------------------------------------------
# Shared set-ups.


def _b16_config() -> ml_collections.ConfigDict:
    """The docs/method.md default: ViT-B/16 at 224, decoder 512/8/16, mask 0.45 / throw 0.40."""
    config = get_base_config()
    config.img_size = 224
    config.model.update(variant="B/16", width=0, depth=0, num_heads=0, mlp_dim=0, patch_size=0,
                        decoder_width=512, decoder_depth=8, decoder_heads=16, dtype="float32")
    config.masking.update(mask_ratio=0.45, throw_ratio=0.40)
    return config


def _amt_masks(seed: int, rows: int, num_patches: int, mask_ratio: float,
               throw_ratio: float) -> masking.Masks:
    n_mask, n_throw, _ = masking.mask_counts(num_patches, mask_ratio, throw_ratio)
    weights = jax.random.uniform(jax.random.key(seed + 1), (rows, num_patches))
    return masking.amt_masking(jax.random.key(seed), weights, n_mask, n_throw)


@pytest.fixture(scope="module")
def b16():
    """(model, masks, abstract variables) of the ViT-B/16 MV-MAE; shapes only."""
    config = _b16_config()
    model = models.build_model(config)
    masks = _amt_masks(0, 2, 196, config.masking.mask_ratio, config.masking.throw_ratio)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, KEY, images, masks)
    return model, masks, images, variables


@dataclasses.dataclass
class Tiny:
    config: ml_collections.ConfigDict
    model: models.MVMAE
    params: dict
    images: jax.Array
    masks: masking.Masks
    apply: Callable  # jitted model.apply
    maps: Callable  # jitted attention_maps


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    """A tiny contrastive MV-MAE (16x16, 4x4 patches, N=16), perturbed params, images, masks."""
    config = tiny_config()
    model = models.build_model(config)
    images = jnp.asarray(smooth_images(np.random.default_rng(0), 4, config.img_size))
    masks = _amt_masks(3, 4, 16, config.masking.mask_ratio, config.masking.throw_ratio)
    params = _perturbed(jax.jit(model.init)(KEY, images, masks)["params"], seed=1)
    maps = jax.jit(functools.partial(model.apply, method=models.MVMAE.attention_maps))
    return Tiny(config, model, params, images, masks, jax.jit(model.apply), maps)


# --------------------------------------------------------------------------------------------
# 1-2. Parameter counts and names.


@pytest.mark.parametrize("variant,timm_name", [
    ("B/16", "vit_base_patch16_224"),
    ("S/16", "vit_small_patch16_224"),
    ("Ti/16", "vit_tiny_patch16_224"),
])
def test_encoder_param_count_matches_published_vit_and_timm(variant, timm_name):
    """Encoder parameter count = published ViT architecture = timm's ViT minus its pos_embed."""
    dims = models.vit_config(variant)
    encoder = VisionTransformer(**dims)
    shapes = jax.eval_shape(encoder.init, KEY, jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                                    jnp.float32))
    assert set(shapes) == {"params"}
    count = _count(shapes["params"])
    expected = _published_vit_count(dims["width"], dims["depth"], dims["mlp_dim"],
                                    dims["patch_size"])
    assert count == expected
    if variant == "B/16":
        assert count == 85_647_360  # ViT-B/16 without head and pos_embed ("86M")

    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    with torch.device("meta"):  # shapes only, no allocation or initialisation
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0)
    timm_count = sum(p.numel() for p in reference.parameters())
    assert count == timm_count - reference.pos_embed.numel()


def test_decoder_and_projection_param_counts_match_mae_and_spec(b16):
    """MVMAE-B/16: decoder count = MAE's dec512d8b (no pos embed), head = 3-layer 2048/256 MLP."""
    _, _, _, variables = b16
    params = variables["params"]
    assert set(params) == {"encoder", "decoder", "projection"}
    d, m, pixels = 512, 2048, 16 * 16 * 3
    block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
    mae_decoder = (768 * d + d) + d + 8 * block + 2 * d + (d * pixels + pixels)
    assert _count(params["decoder"]) == mae_decoder
    assert _count(params["projection"]) == (768 * 2048 + 2048) + (2048 * 2048 + 2048) + (
        2048 * 256 + 256)
    assert _count(params["encoder"]) == _published_vit_count(768, 12, 3072, 16)


def test_param_names_follow_big_vision(b16):
    """Encoder tree has big_vision names and flax MHA kernel shapes; no 'pos' param anywhere."""
    _, _, _, variables = b16
    enc = variables["params"]["encoder"]
    D, heads, hd, mlp, p = 768, 12, 64, 3072, 16
    expected = {
        "embedding/kernel": (p, p, 3, D), "embedding/bias": (D,), "cls": (1, 1, D),
        "Transformer/encoder_norm/scale": (D,), "Transformer/encoder_norm/bias": (D,),
    }
    for i in range(12):
        prefix = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            expected[prefix + ln + "/scale"] = (D,)
            expected[prefix + ln + "/bias"] = (D,)
        att = prefix + "MultiHeadDotProductAttention_0/"
        for name in ("query", "key", "value"):
            expected[att + name + "/kernel"] = (D, heads, hd)
            expected[att + name + "/bias"] = (heads, hd)
        expected[att + "out/kernel"] = (heads, hd, D)
        expected[att + "out/bias"] = (D,)
        expected[prefix + "MlpBlock_0/Dense_0/kernel"] = (D, mlp)
        expected[prefix + "MlpBlock_0/Dense_0/bias"] = (mlp,)
        expected[prefix + "MlpBlock_0/Dense_1/kernel"] = (mlp, D)
        expected[prefix + "MlpBlock_0/Dense_1/bias"] = (D,)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(enc), sep="/")
    assert {k: tuple(v.shape) for k, v in flat.items()} == expected
    for leaf in jax.tree.leaves(variables["params"]):
        assert leaf.dtype == jnp.float32

    # Position embeddings are constants: in no collection, under no name.
    all_paths = _paths({c: v for c, v in variables.items()})
    assert not [path for path in all_paths if "pos" in path.lower()]
    assert set(variables) == {"params"}


def _param_path_by_hand(path) -> str:
    """The key names joined by "/", read off each key's `key`, `name` or `idx`."""
    names = []
    for key in path:
        attribute = next(a for a in ("key", "name", "idx") if hasattr(key, a))
        names.append(str(getattr(key, attribute)))
    return "/".join(names)


def test_param_path_names_params_and_optimizer_state(b16):
    """`sharding.param_path` (jax's keystr) gives the "/" names that fsdp_rules match, on the
    ViT-B/16 MV-MAE's parameters and its AdamW state (dict keys, named and indexed fields)."""
    _, _, _, variables = b16
    params = variables["params"]
    tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, weight_decay=0.05, grad_clip_norm=1.0)), lambda step: 0.0)
    tree = (params, jax.eval_shape(tx.init, params))
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert [sharding.param_path(p) for p in paths] == [_param_path_by_hand(p) for p in paths]
    names = {sharding.param_path(p) for p in paths}
    assert "0/encoder/Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel" in names
    assert "1/1/0/mu/decoder/decoder_pred/bias" in names


# --------------------------------------------------------------------------------------------
# 3-4. Token counts and what reaches the encoder / decoder.


def test_b16_token_counts_through_encoder_and_decoder(b16):
    """B/16 @224, mask .45 / throw .40: 30/88/78 patches; encoder 1+30, decoder 1+118 tokens."""
    model, masks, images, variables = b16
    assert masking.mask_counts(196, 0.45, 0.40) == (88, 78, 30)
    assert masks.visible.shape == (2, 30)
    assert masks.masked.shape == (2, 88)
    assert masks.thrown.shape == (2, 78)

    apply = functools.partial(model.apply, mutable=["intermediates"])
    out, state = jax.eval_shape(apply, {"params": variables["params"]}, images, masks)
    inter = state["intermediates"]
    (enc_in,) = inter["encoder"]["encoder_input_tokens"]
    (dec_in,) = inter["decoder"]["decoder_input_tokens"]
    assert enc_in.shape == (2, 1 + 30, 768)
    assert dec_in.shape == (2, 1 + 30 + 88, 512)
    assert out["predictions"].shape == (2, 88, 16 * 16 * 3)
    assert out["predictions"].dtype == jnp.float32
    assert out["embeddings"].shape == (2, 256)


def _set_patches(images: np.ndarray, rows_patches: dict[int, np.ndarray], p: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A copy of `images` with the listed patches of each row replaced by large noise."""
    out = np.array(images)
    grid_w = out.shape[2] // p
    for row, patches in rows_patches.items():
        for k in np.asarray(patches).tolist():
            r, c = divmod(k, grid_w)
            out[row, r * p:(r + 1) * p, c * p:(c + 1) * p] = 5.0 * rng.normal(size=(p, p, 3))
    return out


def test_thrown_and_masked_pixels_do_not_reach_the_model(tiny):
    """New pixels in every thrown+masked patch: bit-identical outputs; one visible patch: not."""
    config, params, images, masks, apply = (tiny.config, tiny.params, tiny.images, tiny.masks,
                                             tiny.apply)
    p = config.model.patch_size
    assert masks.thrown.shape[1] == 4 and masks.masked.shape[1] == 8
    base = jax.device_get(apply({"params": params}, images, masks))
    rng = np.random.default_rng(5)
    hidden = np.concatenate([masks.masked, masks.thrown], axis=1)
    changed = _set_patches(np.asarray(images), dict(enumerate(hidden)), p, rng)
    assert not np.array_equal(changed, np.asarray(images))
    out = jax.device_get(apply({"params": params}, jnp.asarray(changed), masks))
    for name in ("predictions", "embeddings"):
        np.testing.assert_array_equal(out[name], base[name])

    # One visible patch of row 0 changes row 0's outputs, and only row 0's.
    changed = _set_patches(np.asarray(images), {0: masks.visible[0, :1]}, p, rng)
    out = jax.device_get(apply({"params": params}, jnp.asarray(changed), masks))
    for name in ("predictions", "embeddings"):
        assert np.abs(out[name][0] - base[name][0]).max() > 1e-3
        np.testing.assert_array_equal(out[name][1:], base[name][1:])


def test_decoder_is_equivariant_to_token_order(tiny):
    """Permuting visible and masked indices permutes predictions likewise; embeddings unchanged."""
    params, images, masks, apply = tiny.params, tiny.images, tiny.masks, tiny.apply
    rng = np.random.default_rng(7)
    perm_vis = rng.permutation(masks.visible.shape[1])
    perm_mask = rng.permutation(masks.masked.shape[1])
    shuffled = masking.Masks(masks.visible[:, perm_vis], masks.masked[:, perm_mask],
                             masks.thrown[:, ::-1])
    base = apply({"params": params}, images, masks)
    out = apply({"params": params}, images, shuffled)
    np.testing.assert_allclose(out["predictions"], base["predictions"][:, perm_mask], atol=1e-5)
    np.testing.assert_allclose(out["embeddings"], base["embeddings"], atol=1e-5)
    # The predictions do depend on which patch each row is for.
    assert np.abs(np.asarray(out["predictions"]) - np.asarray(base["predictions"])).max() > 1e-3


def test_decoder_input_and_embeddings_match_reference(tiny):
    """Decoder input = [embed(enc) + (0 | pos[vis]), mask_token + pos[masked]]; head on [CLS]."""
    config, model, params, images, masks = (tiny.config, tiny.model, tiny.params, tiny.images,
                                            tiny.masks)
    p = config.model.patch_size
    grid = config.img_size // p

    def run(module, x, m):
        tokens = module.encoder(x, m.visible)["tokens"]
        return tokens, module(x, m)

    (tokens, out), state = jax.jit(functools.partial(
        model.apply, method=run, mutable=["intermediates"]))({"params": params}, images, masks)
    (dec_in,) = state["intermediates"]["decoder"]["decoder_input_tokens"]
    dec = jax.tree.map(lambda a: np.asarray(a, np.float64), params["decoder"])
    width = config.model.decoder_width
    pos = _mae_sincos_2d(grid, grid, width)
    visible, masked = np.asarray(masks.visible), np.asarray(masks.masked)
    embedded = np.asarray(tokens, np.float64) @ dec["decoder_embed"]["kernel"] + dec[
        "decoder_embed"]["bias"]
    embedded[:, 1:] += pos[visible]
    mask_part = dec["mask_token"].reshape(1, 1, width) + pos[masked]
    expected = np.concatenate([embedded, mask_part], axis=1)
    assert dec_in.shape == (4, 1 + 4 + 8, width)
    np.testing.assert_allclose(np.asarray(dec_in), expected, atol=1e-5)

    # Contrastive head (pool "cls"): Dense-GELU-Dense-GELU-Dense on [CLS], then L2-normalised.
    assert config.contrastive.pool == "cls" and config.contrastive.num_layers == 3
    head = jax.tree.map(lambda a: np.asarray(a, np.float64), params["projection"])
    x = np.asarray(tokens, np.float64)[:, 0]
    for i in range(3):
        x = x @ head[f"Dense_{i}"]["kernel"] + head[f"Dense_{i}"]["bias"]
        x = _gelu_erf(x) if i < 2 else x
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    assert out["embeddings"].shape == (4, config.contrastive.output_dim)
    np.testing.assert_allclose(np.asarray(out["embeddings"]), x, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 5. Position embedding.


@pytest.mark.parametrize("grid,dim", [((14, 14), 768), ((14, 14), 512), ((3, 5), 32),
                                      ((4, 2), 16)])
def test_sincos_2d_matches_mae_convention(grid, dim):
    """sincos_2d = MAE's get_2d_sincos_pos_embed (column first, row second, row-major)."""
    got = models.sincos_2d(grid, dim)
    assert got.shape == (grid[0] * grid[1], dim)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _mae_sincos_2d(*grid, dim), rtol=0, atol=1e-6)
    q = dim // 4
    # Hand values: patch 0 is (row 0, col 0); patch 1 is (row 0, col 1); patch gw is (1, 0).
    np.testing.assert_array_equal(got[0], np.tile(np.repeat([0.0, 1.0], q), 2))
    np.testing.assert_allclose(got[1, [0, q, 2 * q, 3 * q]], [np.sin(1), np.cos(1), 0, 1],
                               atol=1e-7)
    np.testing.assert_allclose(got[grid[1], [0, q, 2 * q, 3 * q]], [0, 1, np.sin(1), np.cos(1)],
                               atol=1e-7)


def test_sincos_2d_rejects_width_not_divisible_by_4():
    """A width that is not a multiple of 4 is an error, not a silently wrong embedding."""
    with pytest.raises(ValueError, match="30"):
        models.sincos_2d((2, 2), 30)


# --------------------------------------------------------------------------------------------
# 6. Encoder forward and [CLS] attention against a numpy re-implementation.


@pytest.mark.parametrize("implementation", vit.ATTENTION_IMPLEMENTATIONS)
def test_encoder_matches_numpy_forward_and_cls_attention(implementation):
    """A tiny encoder (non-square image, subset of patches) = numpy pre-norm ViT to 1e-5, with
    either attention implementation."""
    p, width, heads = 4, 32, 2
    encoder = VisionTransformer(patch_size=p, width=width, depth=2, num_heads=heads, mlp_dim=64,
                                attention=implementation)
    images = smooth_images(np.random.default_rng(2), 2, 12)[:, :8]  # (2, 8, 12, 3): grid 2x3
    visible = np.array([[4, 0, 2, 5], [1, 5, 3, 0]], np.int32)
    params = _perturbed(jax.jit(encoder.init)(KEY, images, visible)["params"], seed=3)

    @jax.jit
    def forward(params, images, visible):
        plain = encoder.apply({"params": params}, images, visible)
        full = encoder.apply({"params": params}, images, visible, return_cls_attention=True)
        every = encoder.apply({"params": params}, images, None, return_cls_attention=True)
        return plain, full, every

    plain, full, every = forward(params, jnp.asarray(images), jnp.asarray(visible))
    assert set(plain) == {"tokens"}
    np.testing.assert_allclose(full["tokens"], plain["tokens"], rtol=0, atol=1e-5)

    for out, vis in ((full, visible), (every, None)):
        tokens, probs = _encoder_reference(params, images, vis, p)
        n = probs.shape[-1] - 1
        assert out["tokens"].shape == (2, 1 + n, width)
        assert out["cls_attention"].shape == (2, heads, n)
        np.testing.assert_allclose(out["tokens"], tokens, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out["cls_attention"], probs[:, :, 0, 1:], rtol=0, atol=1e-6)
        # The [CLS] key is excluded: the row sums to 1 - P(CLS -> CLS) < 1.
        sums = np.asarray(out["cls_attention"]).sum(-1)
        np.testing.assert_allclose(sums, 1.0 - probs[:, :, 0, 0], atol=1e-6)
        assert (sums < 1.0 - 1e-3).all()
    assert set(every) == {"tokens", "cls_attention"}


class _ConvPatchTokens(nn.Module):
    """The patch embedding as a p x p, stride-p nn.Conv over the whole image, then the
    position embedding and the gather of the visible tokens."""

    patch_size: int
    width: int

    @nn.compact
    def __call__(self, images, visible):
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                    kernel_init=nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                    name="embedding")(images)
        batch, gh, gw, width = x.shape
        x = x.reshape(batch, gh * gw, width) + models.sincos_2d((gh, gw), width)[None]
        return x if visible is None else jnp.take_along_axis(x, visible[..., None], axis=1)


def test_patch_embedding_of_gathered_pixels_equals_convolution():
    """Embedding the visible patches' pixels (one (p*p*C, D) product) = the convolution over
    every patch then the gather, to float32 round-off, on a non-square image with a
    non-symmetric kernel; same parameter names, shapes and initial values as the nn.Conv."""
    p, width = 4, 48
    encoder = VisionTransformer(patch_size=p, width=width, depth=1, num_heads=2, mlp_dim=8)
    conv = _ConvPatchTokens(p, width)
    images = jnp.asarray(np.random.default_rng(4).normal(size=(3, 8, 12, 3)), jnp.float32)
    visible = jnp.asarray([[5, 0, 2], [1, 5, 3], [4, 4, 0]], jnp.int32)
    params = jax.jit(encoder.init)(KEY, images, visible)["params"]
    conv_params = conv.init(KEY, images, visible)["params"]
    assert jax.tree.map(jnp.shape, conv_params) == {
        "embedding": {"kernel": (p, p, 3, width), "bias": (width,)}}
    jax.tree.map(np.testing.assert_array_equal, params["embedding"], conv_params["embedding"])

    params = _perturbed(params, seed=5)
    tokens = jax.jit(functools.partial(encoder.apply, method=VisionTransformer.patch_tokens))
    for vis in (visible, None):
        got = tokens({"params": params}, images, vis)
        expected = conv.apply({"params": {"embedding": params["embedding"]}}, images, vis)
        assert got.shape == expected.shape == (3, 6 if vis is None else 3, width)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------------
# 7. Attention maps.


def _minmax_mean(cls_attention: np.ndarray) -> np.ndarray:
    low = cls_attention.min(-1, keepdims=True)
    high = cls_attention.max(-1, keepdims=True)
    return ((cls_attention - low) / (high - low)).mean(1)


@pytest.mark.parametrize("implementation", vit.ATTENTION_IMPLEMENTATIONS)
def test_attention_equals_flax_with_mae_initialisation(implementation):
    """Our attention (one (D, 3D) input product; every implementation) has flax's
    MultiHeadDotProductAttention parameter tree and computes the same outputs, in float32 and
    in bfloat16; it draws the out projection and the zero biases as DenseGeneral does, and the
    query/key/value kernels from the fused (D, 3D) Xavier range instead."""
    x = jax.random.normal(jax.random.key(0), (3, 7, 32))
    ours = vit.MultiHeadDotProductAttention(num_heads=4, implementation=implementation)
    theirs = flax.linen.MultiHeadDotProductAttention(
        num_heads=4, kernel_init=flax.linen.initializers.xavier_uniform())
    our_params = ours.init(jax.random.key(1), x)
    their_params = theirs.init(jax.random.key(1), x)
    assert jax.tree.structure(our_params) == jax.tree.structure(their_params)
    assert jax.tree.map(jnp.shape, our_params) == jax.tree.map(jnp.shape, their_params)
    ours_flat = flax.traverse_util.flatten_dict(our_params["params"], sep="/")
    theirs_flat = flax.traverse_util.flatten_dict(their_params["params"], sep="/")
    for name, value in ours_flat.items():
        if name in ("query/kernel", "key/kernel", "value/kernel"):
            assert np.abs(value).max() <= np.sqrt(6 / (32 + 3 * 32))
        else:
            np.testing.assert_array_equal(value, theirs_flat[name])
    # Trained-looking biases, so that a dropped or misplaced bias shows.
    keys = iter(jax.random.split(jax.random.key(2), 8))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape),
                          their_params)
    got, _ = ours.apply(params, x)
    np.testing.assert_allclose(got, theirs.apply(params, x), rtol=1e-5, atol=1e-6)
    low, _ = vit.MultiHeadDotProductAttention(
        num_heads=4, dtype=jnp.bfloat16, implementation=implementation).apply(params, x)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(np.float32), got, atol=0.05)


def test_qkv_kernels_initialise_as_one_fused_xavier_matrix():
    """Width 1024, 16 heads: each of the query/key/value kernels is uniform on +-sqrt(6 / (D +
    3D)), the range of MAE's Xavier-initialised (D, 3D) qkv layer, not +-sqrt(6 / (D + D)) (one
    Xavier matrix per projection, sqrt(2) wider); the out projection keeps +-sqrt(6 / 2D)."""
    width = 1024
    params = jax.jit(vit.MultiHeadDotProductAttention(num_heads=16).init)(
        jax.random.key(3), jnp.zeros((1, 2, width)))["params"]
    fused_bound, single_bound = np.sqrt(6 / (4 * width)), np.sqrt(6 / (2 * width))
    kernels = {name: np.asarray(params[name]["kernel"])
               for name in ("query", "key", "value", "out")}
    for name in ("query", "key", "value"):
        kernel = kernels[name]
        assert kernel.shape == (width, 16, 64)
        # 1M uniform draws: the max is within 1e-4 of the bound, the std within 0.5% of
        # bound / sqrt(3).
        assert fused_bound * 0.999 < np.abs(kernel).max() <= fused_bound
        np.testing.assert_allclose(kernel.std(), fused_bound / np.sqrt(3), rtol=5e-3)
    assert single_bound * 0.999 < np.abs(kernels["out"]).max() <= single_bound
    # Independent draws for the three projections.
    assert abs(np.corrcoef(kernels["query"].ravel(), kernels["key"].ravel())[0, 1]) < 0.01


def test_attention_maps_normalised_and_stop_gradient(tiny):
    """Maps: (R, N) in [0, 1], = per-head min-max then head mean; zero gradient to params."""
    model, params, images, maps_fn = tiny.model, tiny.params, tiny.images, tiny.maps
    maps = np.asarray(maps_fn({"params": params}, images))
    assert maps.shape == (4, 16)
    assert maps.dtype == np.float32
    assert (maps >= -1e-6).all() and (maps <= 1 + 1e-6).all()  # [0, 1] up to rounding

    cls_attention = jax.jit(lambda prm, x: model.apply(
        {"params": prm}, x, method=lambda m, y: m.encoder(y, return_cls_attention=True)))(
            params, images)["cls_attention"]
    np.testing.assert_allclose(maps, _minmax_mean(np.asarray(cls_attention, np.float64)),
                               atol=1e-6)

    grads = jax.jit(jax.grad(lambda prm: (maps_fn({"params": prm}, images) ** 2).sum()))(params)
    for leaf in jax.tree.leaves(grads):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    # The map does depend on the params (so the zero gradient is the stop-gradient's).
    other = np.asarray(maps_fn({"params": _perturbed(params, seed=9)}, images))
    assert np.abs(other - maps).max() > 1e-3


def test_attention_maps_single_head_span_zero_to_one():
    """With one head (heads agree), each map row has min 0 and max 1 (to 1e-6)."""
    config = tiny_config(**{"model.num_heads": 1})
    model = models.build_model(config)
    images = jnp.asarray(smooth_images(np.random.default_rng(4), 3, config.img_size))
    params = jax.jit(functools.partial(model.init, method=models.MVMAE.attention_maps))(
        KEY, images)["params"]
    maps = np.asarray(jax.jit(functools.partial(
        model.apply, method=models.MVMAE.attention_maps))({"params": params}, images))
    assert maps.shape == (3, 16)
    # Exact up to XLA's rewrites of (x - min) / (max - min) (e.g. a reciprocal multiply).
    np.testing.assert_allclose(maps.min(1), np.zeros(3), rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps.max(1), np.ones(3), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 8-9. remat and dtype.


def _loss(model, params, images, masks):
    out = model.apply({"params": params}, images, masks)
    direction = jnp.linspace(-1.0, 1.0, out["embeddings"].shape[-1])
    return (out["predictions"] ** 2).mean() + (out["embeddings"] @ direction).sum(), out


def _assert_same_model_as_tiny(variant, tiny, output_rtol: float) -> list[jax.Array]:
    """`variant` (the tiny config with one field changed) has tiny's parameter tree and, on
    tiny's parameters, its loss, outputs, AMT attention maps and gradients; returns tiny's
    gradient leaves."""
    model, params, images, masks = tiny.model, tiny.params, tiny.images, tiny.masks
    shapes = jax.eval_shape(variant.init, KEY, images, masks)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)

    def grads_of(m):
        grad_fn = jax.value_and_grad(functools.partial(_loss, m), has_aux=True)
        return jax.jit(grad_fn)(params, images, masks)

    (loss, out), grads = grads_of(model)
    (v_loss, v_out), v_grads = grads_of(variant)
    np.testing.assert_allclose(v_loss, loss, rtol=1e-6)
    for name in out:
        np.testing.assert_allclose(v_out[name], out[name], rtol=output_rtol, atol=1e-6)
    # The [CLS]-attention path (return_cls_attention: a static argument of a remat'd block,
    # a separate [CLS] row with fused attention).
    v_maps = jax.jit(functools.partial(variant.apply, method=models.MVMAE.attention_maps))(
        {"params": params}, images)
    np.testing.assert_allclose(v_maps, tiny.maps({"params": params}, images), atol=1e-6)
    flat, v_flat = jax.tree.leaves(grads), jax.tree.leaves(v_grads)
    assert len(flat) == len(v_flat)
    for g, vg in zip(flat, v_flat, strict=True):
        # A few float32 ulps of the leaf's scale: XLA fuses the two programs differently.
        scale = max(1.0, float(jnp.abs(g).max()))
        np.testing.assert_allclose(vg, g, rtol=0, atol=4e-6 * scale)
    return flat


@pytest.mark.parametrize("policy", vit.REMAT_POLICIES)
def test_remat_same_outputs_and_gradients(tiny, policy):
    """remat=True, each policy: same parameter tree, outputs, attention maps and gradients as
    remat=False."""
    remat_model = models.build_model(tiny_config(**{"model.remat": True,
                                                    "model.remat_policy": policy}))
    assert remat_model.remat and remat_model.remat_policy == policy and not tiny.model.remat
    flat = _assert_same_model_as_tiny(remat_model, tiny, output_rtol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in flat) > 1e-3


def _saved_activation_shapes(module: nn.Module, x: jax.Array) -> set[str]:
    """Shapes of the intermediate values that the backward pass of `module` on `x` keeps
    (not its arguments), as jax.ad_checkpoint.print_saved_residuals lists them."""
    params = module.init(KEY, x)
    lines = io.StringIO()
    with contextlib.redirect_stdout(lines):
        ad_checkpoint.print_saved_residuals(lambda p: module.apply(p, x)[0].sum(), params)
    return {line.split()[0] for line in lines.getvalue().splitlines()
            if " output of " in line}


def test_remat_policies_keep_what_they_name():
    """Batch 3, 5 tokens, width 32, 2 heads, MLP 64: the (3, 2, 5, 5) attention logits and
    probabilities and the (3, 5, 64) MLP hidden layer are kept without remat (the (3, 5, 96)
    query-key-value product is kept split into heads); "nothing_saveable" keeps none of them;
    the weight products' outputs (query-key-value, MLP hidden) but no (heads, N, N) tensor
    under "dots_with_no_batch_dims_saveable"; the logits too under "dots_saveable"."""
    x = jax.random.normal(KEY, (3, 5, 32))

    def kept(**remat):
        return _saved_activation_shapes(
            vit.Transformer(depth=2, num_heads=2, mlp_dim=64, **remat), x)

    scores, qkv, hidden = "f32[3,2,5,5]", "f32[3,5,96]", "f32[3,5,64]"
    assert {scores, hidden} <= kept()
    assert not {scores, qkv, hidden} & kept(remat=True)
    assert not {scores, qkv, hidden} & kept(remat=True, remat_policy="nothing_saveable")
    no_batch = kept(remat=True, remat_policy="dots_with_no_batch_dims_saveable")
    assert {qkv, hidden} <= no_batch and scores not in no_batch
    assert {scores, qkv, hidden} <= kept(remat=True, remat_policy="dots_saveable")


def test_unknown_remat_policy_rejected():
    with pytest.raises(config_lib.ConfigError, match="config.model.remat_policy"):
        config_lib.validate(tiny_config(**{"model.remat_policy": "dots"}), 1, 1)


def test_fused_attention_same_outputs_gradients_and_maps(tiny):
    """model.attention="fused" (jax.nn.dot_product_attention, the odd token counts padded;
    XLA on the CPU): same parameter tree, outputs, AMT attention maps and gradients as the
    einsum attention that "auto" runs on the CPU. (Tiny's encoder sees 1 + 4 tokens, its
    decoder 1 + 12 and the map's forward 1 + 16: odd counts, padded.)"""
    fused = models.build_model(tiny_config(**{"model.attention": "fused"}))
    assert fused.attention == "fused" and tiny.model.attention == "auto"
    assert vit.resolve_attention("auto", tiny.model.dtype) == "einsum"
    _assert_same_model_as_tiny(fused, tiny, output_rtol=1e-5)


def test_fused_attention_backend_is_cudnn_only_for_gpu_half_precision(monkeypatch):
    """cuDNN's kernel takes bfloat16/float16 on GPUs; everything else runs XLA's attention,
    and "auto" is "fused" exactly where cuDNN's kernel runs."""
    assert vit.fused_attention_backend(jnp.bfloat16) == "xla"  # this CPU
    assert vit.resolve_attention("auto", jnp.bfloat16) == "einsum"
    for backend, dtype, expected in [
            ("gpu", jnp.bfloat16, "cudnn"), ("gpu", "float16", "cudnn"),
            ("gpu", jnp.float32, "xla"), ("tpu", jnp.bfloat16, "xla"),
            ("cpu", jnp.float16, "xla")]:
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert vit.fused_attention_backend(dtype) == expected
        assert vit.resolve_attention("auto", dtype) == (
            "fused" if expected == "cudnn" else "einsum")
        for forced in ("einsum", "fused"):
            assert vit.resolve_attention(forced, dtype) == forced


def _random_qkv(seed: int, length: int, batch: int = 2, heads: int = 3,
                head_dim: int = 8) -> jax.Array:
    """A (B, N, 3, H, hd) float32 query-key-value projection with logits of order 1."""
    return jax.random.normal(jax.random.key(seed), (batch, length, 3, heads, head_dim))


@pytest.mark.parametrize("length", [1, 2, 5, 8, 13, 17])
def test_fused_attention_equals_einsum_values_and_gradients(length):
    """The fused attention (jax.nn.dot_product_attention on the tokens padded to an even
    count, the real ones marked by key_value_seq_lengths; XLA's implementation here, cuDNN's
    on GPUs with the same inputs) equals the einsum attention in value, [CLS] row and
    gradient (to the parameters and the input), for odd and even counts, in float32."""
    x = jax.random.normal(jax.random.key(length), (2, length, 24))
    cotangent = jax.random.normal(jax.random.key(100 + length), (2, length, 24))
    params = _perturbed(vit.MultiHeadDotProductAttention(num_heads=3).init(KEY, x), seed=6)

    def run(implementation):
        layer = vit.MultiHeadDotProductAttention(num_heads=3, implementation=implementation)

        def loss(params, x):
            out, cls_attention = layer.apply(params, x, return_cls_attention=True)
            return (out * cotangent).sum(), cls_attention

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (value, cls_attention), grads = run("fused")
    (ref_value, ref_cls_attention), ref_grads = run("einsum")
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    assert cls_attention.shape == (2, 3, length - 1)
    np.testing.assert_allclose(cls_attention, ref_cls_attention, rtol=0, atol=1e-6)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert max(float(np.abs(g).max()) for g in ref_flat) > 0.1
    for g, ref in zip(flat, ref_flat, strict=True):
        assert g.shape == ref.shape
        np.testing.assert_allclose(g, ref, rtol=0, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_fused_attention_pads_odd_counts_by_one_row(monkeypatch):
    """What jax.nn.dot_product_attention receives from the fused attention: an odd count
    plus one row, with the real count as key_value_seq_lengths; an even count unpadded and
    unmasked."""
    calls = []
    original = jax.nn.dot_product_attention

    def spy(query, key, value, **kwargs):
        calls.append((query.shape[1], key.shape[1], kwargs["key_value_seq_lengths"]))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    layer = vit.MultiHeadDotProductAttention(num_heads=2, implementation="fused")
    for length in (5, 6):
        x = jnp.ones((2, length, 16))
        out, _ = layer.apply(layer.init(KEY, x), x)
        assert out.shape == x.shape
    (q5, k5, lengths5), _, (q6, k6, lengths6), _ = calls  # init, then apply
    assert (q5, k5, q6, k6) == (6, 6, 6, 6)
    np.testing.assert_array_equal(lengths5, [5, 5])
    assert lengths5.dtype == jnp.int32 and lengths6 is None


def _primitives(jaxpr) -> set[str]:
    """Every primitive of a jaxpr, nested ones included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None:
                names |= _primitives(getattr(inner, "jaxpr", inner))
    return names


def test_fused_attention_projects_query_key_value_apart():
    """The fused path gives jax.nn.dot_product_attention three dense products: no slice of a
    fused q/k/v product forward, no concatenation backward (with an even count, no padding
    either)."""
    x = jnp.ones((2, 6, 24))
    layer = vit.MultiHeadDotProductAttention(num_heads=3, implementation="fused")
    params = layer.init(KEY, x)
    loss = lambda p, x: layer.apply(p, x)[0].sum()  # noqa: E731
    used = _primitives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr)
    assert "dot_general" in used
    assert not used & {"concatenate", "slice", "dynamic_slice", "gather", "pad"}, used


@pytest.mark.parametrize("length,padded", [(5, 6), (6, 8), (1, 2)])
def test_pad_rows_change_nothing(length, padded):
    """Random values in the rows past `length` (as queries, keys and values) change no real
    row's output nor any gradient to the real rows, and receive no gradient through the keys
    and values."""
    qkv = _random_qkv(length, padded)
    noise = jax.random.normal(jax.random.key(7), qkv.shape) * 10.0
    with_noise = qkv.at[:, length:].set(noise[:, length:])
    zeroed = qkv.at[:, length:].set(0.0)
    cotangent = jax.random.normal(jax.random.key(8), (2, length, 3, 8))

    @jax.jit
    def loss_and_grad(qkv):
        def loss(qkv):
            out = vit.prefix_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], length,
                                       scale=8**-0.5, implementation="xla")
            return (out[:, :length] * cotangent).sum(), out[:, :length]
        return jax.value_and_grad(loss, has_aux=True)(qkv)

    (loss, out), grad = loss_and_grad(with_noise)
    (ref_loss, ref_out), ref_grad = loss_and_grad(zeroed)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grad[:, :length], ref_grad[:, :length], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(grad[:, length:], 0.0)
    # The real rows equal the unpadded einsum attention.
    np.testing.assert_allclose(out, vit._einsum_attention(qkv[:, :length], jnp.float32)[0],
                               rtol=0, atol=1e-6)


def test_auto_attention_calls_cudnn_with_even_lengths_on_gpu_half_precision(monkeypatch):
    """With jax.default_backend() "gpu" and bfloat16, attention="auto" runs the fused path:
    every call of jax.nn.dot_product_attention (here run by XLA) asks for cuDNN with an even
    token count, in the forward and under jax.grad, and the [CLS] row still comes back;
    in float32 it runs the einsum path (no call)."""
    calls = []
    original = jax.nn.dot_product_attention

    def spy(query, key, value, *, implementation, **kwargs):
        calls.append((implementation, query.shape[1], key.shape[1]))
        return original(query, key, value, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    encoder = VisionTransformer(patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                                dtype=jnp.bfloat16)
    images = jnp.asarray(smooth_images(np.random.default_rng(1), 2, 12))  # N = 9
    visible = jnp.asarray([[0, 3, 8, 5], [1, 2, 4, 7]], jnp.int32)
    params = jax.jit(encoder.init)(KEY, images, visible)["params"]
    calls.clear()
    out = jax.jit(functools.partial(encoder.apply, return_cls_attention=True))(
        {"params": params}, images, None)
    assert out["cls_attention"].shape == (2, 2, 9)
    jax.jit(jax.grad(lambda p: encoder.apply({"params": p}, images, visible)["tokens"].astype(
        jnp.float32).sum()))(params)
    assert calls == [("cudnn", 10, 10)] * 2 + [("cudnn", 6, 6)] * 2
    calls.clear()
    jax.jit(VisionTransformer(patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64).apply)(
        {"params": params}, images, visible)
    assert not calls


def test_unknown_attention_implementation_rejected():
    with pytest.raises(config_lib.ConfigError, match="config.model.attention"):
        config_lib.validate(tiny_config(**{"model.attention": "flash"}), 1, 1)


def test_bfloat16_compute_float32_params(tiny):
    """bfloat16: params float32, predictions bfloat16, embeddings float32 and unit-norm."""
    params, images, masks = tiny.params, tiny.images, tiny.masks
    bf16 = models.build_model(tiny_config(**{"model.dtype": "bfloat16"}))
    assert bf16.dtype == jnp.bfloat16
    fresh = jax.eval_shape(bf16.init, KEY, images, masks)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.float32)}

    out, state = jax.jit(functools.partial(bf16.apply, mutable=["intermediates"]))(
        {"params": params}, images, masks)
    assert out["predictions"].dtype == jnp.bfloat16
    assert out["embeddings"].dtype == jnp.float32
    assert state["intermediates"]["encoder"]["encoder_input_tokens"][0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["embeddings"]), axis=-1), 1.0,
                               atol=1e-6)
    # The same function as in float32, up to bfloat16 rounding.
    ref = tiny.apply({"params": params}, images, masks)
    pred, ref_pred = (np.asarray(a, np.float32) for a in (out["predictions"],
                                                           ref["predictions"]))
    assert np.linalg.norm(pred - ref_pred) < 0.05 * np.linalg.norm(ref_pred)
    assert np.abs(np.asarray(out["embeddings"]) - np.asarray(ref["embeddings"])).max() < 0.05


def test_drop_path_drops_whole_examples_and_rescales():
    """Stochastic depth in a block: each example's residual branch is all zero or scaled by
    1/(1-rate), dropped with probability rate; the same as the formula's with that key."""
    rate = 0.25
    block = vit.Encoder1DBlock(num_heads=2, mlp_dim=8, drop_path_rate=rate)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(4000, 3, 8)).astype(np.float32))
    params = flax.core.unfreeze(block.init(KEY, x))
    mlp_out = params["params"]["MlpBlock_0"]["Dense_1"]
    mlp_out.update(jax.tree.map(jnp.zeros_like, mlp_out))  # only the attention branch is left
    branch = np.asarray(block.apply(params, x)[0] - x)
    y = np.asarray(block.apply(params, x, train=True, rngs={"dropout": jax.random.key(11)})[0]
                   - x)
    kept = np.abs(y).reshape(len(y), -1).max(1) > 0
    np.testing.assert_array_equal(y[~kept], 0.0)
    np.testing.assert_allclose(y[kept], branch[kept] / (1 - rate), rtol=1e-4, atol=1e-5)
    # Binomial(4000, 0.75): sd 27; 6 sd either side.
    assert abs(kept.sum() - 3000) < 165
    # flax's Dropout over all but the batch axis is the stochastic-depth formula.
    y = jnp.asarray(np.random.default_rng(7).normal(size=(50, 3, 5)).astype(np.float32))
    key = jax.random.key(12)
    keep = jax.random.bernoulli(key, 1.0 - rate, (50, 1, 1))
    np.testing.assert_array_equal(
        nn.Dropout(rate, broadcast_dims=(1, 2)).apply({}, y, deterministic=False, rng=key),
        jnp.where(keep, y / (1.0 - rate), 0.0))


def test_pool_tokens():
    tokens = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(vit.pool_tokens(tokens, "cls"), tokens[:, 0])
    np.testing.assert_allclose(vit.pool_tokens(tokens, "mean"), tokens[:, 1:].mean(1))


# --------------------------------------------------------------------------------------------
# 10. Configuration and input checks.


def test_image_size_not_multiple_of_patch_raises():
    """img_size 18 with 4x4 patches: ValueError naming both sizes."""
    model = models.build_model(tiny_config(img_size=18))
    masks = _amt_masks(0, 1, 16, 0.5, 0.25)
    with pytest.raises(ValueError, match=r"18.*4"):
        model.init(KEY, jnp.zeros((1, 18, 18, 3)), masks)


def test_encoder_rejects_image_not_multiple_of_patch():
    """The encoder itself raises on an 18x18 image with 4x4 patches."""
    encoder = VisionTransformer(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)
    with pytest.raises(ValueError, match=r"18.*4"):
        jax.eval_shape(encoder.init, KEY, jax.ShapeDtypeStruct((1, 18, 18, 3), jnp.float32))


def test_mvmae_rejects_images_of_another_size():
    """An MVMAE built for 16x16 images raises on 20x20 images."""
    model = models.build_model(tiny_config())
    masks = _amt_masks(0, 1, 16, 0.5, 0.25)
    with pytest.raises(ValueError, match="20"):
        jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, 20, 20, 3), jnp.float32),
                       masks)


# The sizes of docs/method.md#model (width, depth, heads); MLP ratio 4.
SPEC_SIZES = {"Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
              "H": (1280, 32, 16)}


@pytest.mark.parametrize("variant", ["Ti/16", "S/16", "B/16", "L/14", "L/16", "H/14", "B/8"])
def test_vit_config_and_encoder_dims_resolve_variants(variant):
    """'B/16', 'L/14', ... resolve to the spec's sizes through vit_config and encoder_dims."""
    size, patch = variant.split("/")
    width, depth, heads = SPEC_SIZES[size]
    expected = dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
                    patch_size=int(patch))
    assert models.vit_config(variant) == expected
    config = get_base_config()
    config.model.variant = variant
    assert models.encoder_dims(config.model) == expected


def test_encoder_dims_explicit_fields():
    """Explicit fields override the variant; without a variant all five are required."""
    config = tiny_config()
    assert models.encoder_dims(config.model) == dict(width=32, depth=2, num_heads=2, mlp_dim=64,
                                                      patch_size=4)
    config = get_base_config()
    config.model.update(variant="L/14", patch_size=16, depth=12)
    assert models.encoder_dims(config.model) == dict(width=1024, depth=12, num_heads=16,
                                                     mlp_dim=4096, patch_size=16)
    config = tiny_config(**{"model.mlp_dim": 0})
    with pytest.raises(ValueError, match="mlp_dim"):
        models.encoder_dims(config.model)


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/", "B/x", "b/16", "G/14", "B/0"])
def test_unknown_variant_rejected(variant):
    """An unknown or malformed variant is a ValueError naming it."""
    message = "unknown ViT variant " + re.escape(repr(variant))
    with pytest.raises(ValueError, match=message):
        models.vit_config(variant)
    config = get_base_config()
    config.model.variant = variant
    with pytest.raises(ValueError, match=message):
        models.encoder_dims(config.model)
