"""Export of a pretraining checkpoint to timm/MAE (.safetensors, .pth) and big_vision (.npz):

  python -m mvmae_jax.export --workdir=DIR [--step=N] --output=FILE.safetensors [--with_decoder]
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from mvmae_jax import console
from mvmae_jax.models import encoder_dims
from mvmae_jax.models.vit import VIT_SIZES, sincos_2d

Params = Mapping[str, Any]

FORMATS = (".safetensors", ".pth", ".npz")

# timm's plain-ViT presets (class token, absolute position embedding, MLP ratio 4), by their
# sizes. Other sizes have no timm name: `TIMM_CLASS(**kwargs)` builds every model.
_TIMM_PRESETS = (
    "vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch8_224",
    "vit_small_patch16_224", "vit_small_patch16_384", "vit_small_patch32_224",
    "vit_small_patch32_384", "vit_base_patch8_224", "vit_base_patch16_224",
    "vit_base_patch16_384", "vit_base_patch32_224", "vit_base_patch32_384",
    "vit_large_patch14_224", "vit_large_patch16_224", "vit_large_patch16_384",
    "vit_large_patch32_224", "vit_large_patch32_384", "vit_huge_patch14_224")
_TIMM_SIZE_NAMES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}


def _preset_key(name: str) -> tuple[int, int, int, int, int, int]:
    """(width, depth, num_heads, mlp_dim, patch_size, image_size) of a preset's name."""
    _, size, patch, image = name.split("_")
    width, depth, heads = VIT_SIZES[_TIMM_SIZE_NAMES[size]]
    return width, depth, heads, 4 * width, int(patch.removeprefix("patch")), int(image)


STANDARD_TIMM_MODELS: dict[tuple[int, int, int, int, int, int], str] = {
    _preset_key(name): name for name in _TIMM_PRESETS}
TIMM_CLASS = "timm.models.vision_transformer.VisionTransformer"


def _f32(x: Any) -> np.ndarray:
    # safetensors and torch.from_numpy need contiguous arrays.
    return np.ascontiguousarray(np.asarray(x, np.float32))


def _blocks(transformer: Params, prefix: str) -> list[Params]:
    """The children `{prefix}_0`, `{prefix}_1`, ... in order."""
    return [transformer[f"{prefix}_{i}"]
            for i in range(sum(key.startswith(prefix + "_") for key in transformer))]


def encoder_params(params: Params) -> Params:
    """The encoder tree of a checkpoint's parameters: `params["encoder"]` of a pretraining
    checkpoint, or `params` itself when it is already an encoder tree."""
    if "encoder" in params:
        return params["encoder"]
    if "embedding" in params and "Transformer" in params:
        return params
    raise ValueError(f"no ViT encoder in a parameter tree with keys {sorted(params)}")


def pos_embed_with_cls(grid_size: int, width: int) -> np.ndarray:
    """(1, 1 + N, D): the sin-cos table after a zero [CLS] row, MAE's layout."""
    table = sincos_2d((grid_size, grid_size), width)
    return np.concatenate([np.zeros((1, width), np.float32), table])[None]


def _grid_size(image_size: int, patch_size: int) -> int:
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size "
                         f"{patch_size}")
    return image_size // patch_size


def _torch_layer(layer: Params, name: str) -> dict[str, np.ndarray]:
    """A Dense or a LayerNorm → torch's `{name}.weight` ((out, in), or the scale) and bias."""
    weight = np.transpose(layer["kernel"]) if "kernel" in layer else layer["scale"]
    return {f"{name}.weight": _f32(weight), f"{name}.bias": _f32(layer["bias"])}


def block_to_timm(block: Params, prefix: str) -> dict[str, np.ndarray]:
    """One pre-norm block → timm `Block` names under `prefix` (e.g. 'blocks.3.'); query, key
    and value are fused into one head-major (3 * D, D) `qkv`."""
    attn = block["MultiHeadDotProductAttention_0"]
    width = np.shape(attn["query"]["kernel"])[0]
    qkv = [attn[name] for name in ("query", "key", "value")]
    return {
        **_torch_layer(block["LayerNorm_0"], f"{prefix}norm1"),
        f"{prefix}attn.qkv.weight": _f32(np.concatenate(
            [np.reshape(p["kernel"], (width, -1)).T for p in qkv])),
        f"{prefix}attn.qkv.bias": _f32(np.concatenate([np.reshape(p["bias"], -1) for p in qkv])),
        f"{prefix}attn.proj.weight": _f32(np.reshape(attn["out"]["kernel"], (-1, width)).T),
        f"{prefix}attn.proj.bias": _f32(attn["out"]["bias"]),
        **_torch_layer(block["LayerNorm_1"], f"{prefix}norm2"),
        **_torch_layer(block["MlpBlock_0"]["Dense_0"], f"{prefix}mlp.fc1"),
        **_torch_layer(block["MlpBlock_0"]["Dense_1"], f"{prefix}mlp.fc2"),
    }


def _transformer_to_timm(transformer: Params, name: str, blocks: str,
                         norm: str) -> dict[str, np.ndarray]:
    """Blocks `{name}block_i` → `{blocks}.i.*`, then the final `{name}_norm` → `{norm}.*`."""
    state = {}
    for i, block in enumerate(_blocks(transformer, f"{name}block")):
        state.update(block_to_timm(block, f"{blocks}.{i}."))
    return state | _torch_layer(transformer[f"{name}_norm"], norm)


def encoder_to_timm(encoder: Params, image_size: int) -> dict[str, np.ndarray]:
    """An encoder tree → the state_dict of timm's `VisionTransformer` (and of MAE's encoder);
    `image_size` fixes the length of `pos_embed`."""
    kernel = np.asarray(encoder["embedding"]["kernel"])  # (p, p, C, D)
    width = kernel.shape[-1]
    grid = _grid_size(image_size, kernel.shape[0])
    return {
        "cls_token": _f32(encoder["cls"]),
        "pos_embed": pos_embed_with_cls(grid, width),
        # Conv kernels: flax (kh, kw, in, out) → torch (out, in, kh, kw).
        "patch_embed.proj.weight": _f32(kernel.transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _f32(encoder["embedding"]["bias"]),
        **_transformer_to_timm(encoder["Transformer"], "encoder", "blocks", "norm"),
    }


def decoder_to_mae(decoder: Params, grid_size: int) -> dict[str, np.ndarray]:
    """A decoder tree → the decoder tensors of MAE's PyTorch `MaskedAutoencoderViT` (pixels
    predicted in (row, column, channel) order, as MAE's `patchify`)."""
    width = np.shape(decoder["mask_token"])[-1]
    return {
        "mask_token": _f32(decoder["mask_token"]),
        "decoder_pos_embed": pos_embed_with_cls(grid_size, width),
        **_torch_layer(decoder["decoder_embed"], "decoder_embed"),
        **_transformer_to_timm(decoder["DecoderTransformer"], "decoder", "decoder_blocks",
                               "decoder_norm"),
        **_torch_layer(decoder["decoder_pred"], "decoder_pred"),
    }


def encoder_to_big_vision(encoder: Params, image_size: int) -> dict[str, np.ndarray]:
    """An encoder tree → big_vision's flat `.npz` layout ("/"-joined flax names), plus
    `pos_embedding` (1, 1 + N, D) with a zero [CLS] row: timm's loader takes it as the sign of
    big_vision's names, and big_vision's folds the [CLS] row into `cls`."""
    flat = {key: _f32(value) for key, value in traverse_util.flatten_dict(encoder, sep="/").items()}
    patch = np.shape(encoder["embedding"]["kernel"])[0]
    width = np.shape(encoder["cls"])[-1]
    flat["pos_embedding"] = pos_embed_with_cls(_grid_size(image_size, patch), width)
    return flat


def mlp_ratio(width: int, mlp_dim: int) -> float:
    """The float that timm turns back into `mlp_dim` with int(width * ratio)."""
    ratio = mlp_dim / width
    while int(width * ratio) < mlp_dim:  # float rounding below an integer; at most a step
        ratio = float(np.nextafter(ratio, np.inf))
    return ratio


def timm_spec(dims: Mapping[str, int], image_size: int) -> tuple[str | None, dict[str, Any]]:
    """(timm preset name or None, kwargs) of the timm ViT that loads `encoder_to_timm` strictly:
    `TIMM_CLASS(**kwargs)` builds it with or without a preset, headless, `forward_features`
    ending with the final norm, MAE's [CLS] row in `pos_embed`."""
    key = (dims["width"], dims["depth"], dims["num_heads"], dims["mlp_dim"], dims["patch_size"],
           image_size)
    kwargs: dict[str, Any] = dict(
        img_size=image_size, patch_size=dims["patch_size"], embed_dim=dims["width"],
        depth=dims["depth"], num_heads=dims["num_heads"],
        mlp_ratio=mlp_ratio(dims["width"], dims["mlp_dim"]), num_classes=0,
        global_pool="token", class_token=True, no_embed_class=False)
    return STANDARD_TIMM_MODELS.get(key), kwargs


def metadata(config: Any, step: int, with_decoder: bool = False) -> dict[str, Any]:
    """The `FILE.json` written beside an export of a checkpoint of `config`."""
    dims = encoder_dims(config.model)
    preset, kwargs = timm_spec(dims, config.img_size)
    architecture = (
        f"ViT: width {dims['width']}, depth {dims['depth']}, {dims['num_heads']} heads, "
        f"MLP {dims['mlp_dim']}, patch {dims['patch_size']}, image {config.img_size} "
        + (f"(timm's preset {preset})" if preset else "(no timm preset has these sizes)"))
    out = {
        "architecture": architecture,
        "timm_model": preset,  # or None; `timm_class(**timm_kwargs)` builds it either way
        "timm_class": TIMM_CLASS,
        "timm_kwargs": kwargs,
        "mean": [float(m) for m in config.input.mean],
        "std": [float(s) for s in config.input.std],
        "input": "RGB in [0, 1], NCHW; normalise as (x - mean) / std",
        "features": "forward_features: final-norm tokens (B, 1 + N, D), [CLS] first",
        "image_size": int(config.img_size),
        "step": int(step),
        "encoder": dims,
    }
    if with_decoder:
        out["decoder"] = {
            "layout": "facebookresearch/mae models_mae.py MaskedAutoencoderViT",
            "keys": ["mask_token", "decoder_pos_embed", "decoder_embed.*", "decoder_blocks.*",
                     "decoder_norm.*", "decoder_pred.*"],
            "decoder_embed_dim": config.model.decoder_width,
            "decoder_depth": config.model.decoder_depth,
            "decoder_num_heads": config.model.decoder_heads,
            "mlp_ratio": 4.0,  # MAEDecoder's MLP is 4x its width
            "block": "timm.models.vision_transformer.Block(dim, num_heads, mlp_ratio, "
                     "qkv_bias=True), LayerNorm eps 1e-6",
            "patch_size": dims["patch_size"],
            "in_chans": 3,
            "pred_pixel_order": "(row, column, channel) within a patch, as MAE's patchify",
            "norm_pix_loss": bool(config.norm_pix_loss),
        }
    return out


def state_dict(config: Any, params: Params, with_decoder: bool = False) -> dict[str, np.ndarray]:
    """The timm encoder state_dict of a checkpoint's parameters (plus MAE's decoder)."""
    state = encoder_to_timm(encoder_params(params), config.img_size)
    if with_decoder:
        if "decoder" not in params:
            raise ValueError("--with_decoder: the checkpoint holds no decoder")
        patch = encoder_dims(config.model)["patch_size"]
        state.update(decoder_to_mae(params["decoder"], _grid_size(config.img_size, patch)))
    return state


class NonFiniteParameters(ValueError):
    """The parameters to export hold NaN or infinite values."""


def _check_request(output: str, with_decoder: bool) -> str:
    """The format (suffix) of `output`; ValueError for an unknown one or .npz with decoder."""
    suffix = epath.Path(output).suffix
    if suffix not in FORMATS:
        raise ValueError(f"--output must end with one of {FORMATS}, got {output!r}")
    if with_decoder and suffix == ".npz":
        raise ValueError("--with_decoder: the .npz export is the encoder only (big_vision's "
                         "ViT layout); use .safetensors or .pth")
    return suffix


def serialise(tensors: dict[str, np.ndarray], suffix: str) -> bytes:
    """The bytes of a file of `tensors` in the format of `suffix`."""
    if suffix == ".safetensors":
        from safetensors.numpy import save

        # "format": "pt" marks the file as PyTorch tensors for loaders that check it.
        return save(tensors, metadata={"format": "pt"})
    buffer = io.BytesIO()
    if suffix == ".npz":
        np.savez(buffer, **tensors)
    elif suffix == ".pth":
        import torch  # only this format needs torch

        torch.save({"model": {k: torch.from_numpy(v) for k, v in tensors.items()}}, buffer)
    else:
        raise ValueError(f"unknown format {suffix!r}; expected one of {FORMATS}")
    return buffer.getvalue()


def write_export(config: Any, params: Params, step: int, output: str,
                 with_decoder: bool = False, source: str = "the parameters") -> dict[str, Any]:
    """Writes `output` (format by suffix) and `FILE.json` beside it; returns the JSON's content.
    Non-finite parameters raise NonFiniteParameters, naming `source`, before any write."""
    suffix = _check_request(output, with_decoder)
    exported = {"encoder": encoder_params(params)}
    if with_decoder and "decoder" in params:
        exported["decoder"] = params["decoder"]
    bad = sum(int(np.size(leaf) - np.count_nonzero(np.isfinite(leaf)))
              for leaf in jax.tree.leaves(exported))
    if bad:
        raise NonFiniteParameters(
            f"{source} (step {step}): {bad:,} of the {' and '.join(exported)} parameter values "
            "are not finite (NaN or inf); nothing written")
    if suffix == ".npz":
        tensors = encoder_to_big_vision(encoder_params(params), config.img_size)
    else:
        tensors = state_dict(config, params, with_decoder)
    info = metadata(config, step, with_decoder)
    info["format"] = suffix[1:]
    output = epath.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(serialise(tensors, suffix))
    output.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def export_checkpoint(path: str, output: str, step: int | None = None,
                      with_decoder: bool = False) -> dict[str, Any]:
    """`write_export` of a workdir's checkpoint (latest, or `step`) or a checkpoint directory."""
    from mvmae_jax import checkpointing

    _check_request(output, with_decoder)  # fails before the checkpoint is read
    config, params, step = checkpointing.load_params(path, step)
    checkpoint, _ = checkpointing.resolve_checkpoint(path, step)
    return write_export(config, params, step, output, with_decoder,
                        source=f"checkpoint {checkpoint}")


def main(argv) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    console.quiet_libraries()
    values = flags.FLAGS
    try:
        export_checkpoint(values.workdir, values.output, values.step, values.with_decoder)
    except NonFiniteParameters as error:
        # A broken checkpoint, not a usage error: one line, no flag help, no traceback.
        print(f"mvmae_jax.export: {error}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from error
    print(f"Wrote {values.output} and {epath.Path(values.output).with_suffix('.json')}")


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so that importing this module next
    to `mvmae_jax.main` (which also has --workdir) defines no flag twice."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Pretraining workdir, or one checkpoint directory "
                        "(WORKDIR/checkpoints/<step>).")
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
    flags.DEFINE_string("output", None, "FILE.safetensors, FILE.pth or FILE.npz (local or "
                        "gs://); FILE.json is written beside it.")
    flags.DEFINE_bool("with_decoder", False, "Also export the decoder (MAE's PyTorch names).")
    flags.mark_flags_as_required(["workdir", "output"])


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
