"""Export to PyTorch: checkpoints → timm / MAE / big_vision files, checked against timm itself.

Every exported encoder is loaded into timm strictly, with the name and kwargs of its JSON, and
timm's `forward_features` must give the tokens of `mvmae_jax.load_encoder` to 1e-4 (fp32).
Checkpoints: a tiny model trained for 4 steps (patch 16 at 32x32) and random ones, ViT-B/16 at 224
and tiny patch-14 models at 224 and at 28x28 (32 is no multiple of 14). Random parameters
are drawn away from their initial values (LayerNorm scales not 1, biases not 0), so that a
swapped or transposed tensor cannot go unnoticed.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import timm
import torch
from helpers import smooth_images, tiny_config

import mvmae_jax
from mvmae_jax import checkpointing, export, inference, masking, models
from mvmae_jax import train_step as ts

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
FORMATS = ("safetensors", "pth", "npz")


# --- Checkpoints.

def _tiny_model(config: ml_collections.ConfigDict, patch: int, image: int) -> None:
    config.img_size = image
    config.model.update(variant="", patch_size=patch, width=32, depth=2, num_heads=2, mlp_dim=64,
                        decoder_width=32, decoder_depth=2, decoder_heads=2)


def random_params(abstract: dict, rng: np.random.Generator) -> dict:
    """Random float32 parameters of the shapes of `abstract`, far from any initialisation."""
    def draw(path, leaf):
        name = str(path[-1].key)
        normal = rng.standard_normal(leaf.shape, dtype=np.float32)
        if name == "scale":
            return 1.0 + 0.2 * normal
        if name == "bias":
            return 0.1 * normal
        if name == "kernel":
            # fan-in: the first axis of query/key/value (D, H, hd), all but the last elsewhere.
            qkv = len(path) > 1 and str(path[-2].key) in ("query", "key", "value")
            fan_in = leaf.shape[0] if qkv else int(np.prod(leaf.shape[:-1]))
            return normal / np.float32(np.sqrt(fan_in))
        return 0.5 * normal  # cls, mask_token

    return jax.tree_util.tree_map_with_path(draw, abstract)


def abstract_params(config: ml_collections.ConfigDict) -> dict:
    """The shapes of the pretraining model's parameters (traced, not run)."""
    model = models.build_model(config)
    order = jnp.arange(model.num_patches, dtype=jnp.int32)[None]
    half = model.num_patches // 2
    masks = masking.Masks(visible=order[:, :half], masked=order[:, half:], thrown=order[:, :0])
    images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images, masks)["params"]


def write_checkpoint(workdir: pathlib.Path, config: ml_collections.ConfigDict, seed: int,
                     steps: tuple[int, ...] = (7,), poison: int = 0) -> None:
    """A workdir as train.py leaves it (config.json, checkpoints/<step>/state), with different
    random parameters at each step; `poison` values of the encoder's first block set to NaN
    and inf. No optimizer state: only the parameters are exported."""
    abstract = abstract_params(config)
    rng = np.random.default_rng(seed)
    manager = checkpointing.make_manager(str(workdir / "checkpoints"), 3, async_save=False)
    for step in steps:
        params = random_params(abstract, rng)
        if poison:
            kernel = params["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_0"][
                "Dense_0"]["kernel"]
            kernel.reshape(-1)[:poison] = np.where(np.arange(poison) % 2, np.inf, np.nan)
        state = ts.TrainState(step=np.int32(step), params=params, opt_state=(),
                              rng=np.zeros((2,), np.uint32), extras={})
        checkpointing.save(manager, state, [[0, 0]])
    manager.wait_until_finished()
    manager.close()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def random_config(variant: str, image: int, patch: int = 0) -> ml_collections.ConfigDict:
    config = tiny_config(**{"masking.strategy": "random", "masking.throw_ratio": 0.0})
    if variant:
        config.img_size = image
        config.model.update(variant=variant, patch_size=0, width=0, depth=0, num_heads=0,
                            mlp_dim=0, decoder_width=64, decoder_depth=1, decoder_heads=2)
    else:
        _tiny_model(config, patch, image)
    return config


def train_tiny(workdir: pathlib.Path, data_dir: pathlib.Path) -> None:
    """4 steps of MAE on the digits at 32x32 with 16x16 patches (one view and no contrastive
    head: the smallest train step to compile; the random checkpoints have the head)."""
    from mvmae_jax import train  # imports tensorflow (after torchvision: see conftest)

    config = tiny_config(**{"masking.strategy": "random", "masking.throw_ratio": 0.0,
                            "masking.mask_ratio": 0.5, "views.num": 1, "contrastive.weight": 0.0})
    _tiny_model(config, patch=16, image=32)
    config.update(batch_size=16, total_steps=4, checkpoint_every_steps=4, log_every_steps=4,
                  image_every_steps=0)
    config.evals.knn.every_steps = -1  # no kNN monitor
    config.optim.update(base_lr=0.05, warmup_epochs=0)  # parameters move visibly in 4 steps
    config.input.mean = (0.5, 0.4, 0.3)  # the export must carry the run's own normalisation
    config.input.std = (0.2, 0.25, 0.3)
    config.dataset.data_dir = str(data_dir)
    train.train_and_evaluate(config, str(workdir))


CASES = {
    # name: (make the workdir or None for the trained one, image size, patch size)
    "trained_tiny_p16_32": (None, 32, 16),
    "random_B16_224": (lambda: random_config("B/16", 224), 224, 16),
    "random_tiny_p14_224": (lambda: random_config("", 224, 14), 224, 14),
    "random_tiny_p14_28": (lambda: random_config("", 28, 14), 28, 14),
}


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("trained")
    train_tiny(workdir, tmp_path_factory.mktemp("tfds"))
    return workdir


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory) -> pathlib.Path:
    """Random tiny checkpoints (patch 16 at 32x32, 2 decoder blocks) at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("tiny")
    config = random_config("", 32, 16)
    config.input.update(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    write_checkpoint(workdir, config, seed=3, steps=(2, 4))
    return workdir


def images_01(size: int, count: int = 2, seed: int = 0) -> np.ndarray:
    """Smooth random RGB images in [0, 1]."""
    images = smooth_images(np.random.default_rng(seed), count, size)
    low, high = images.min(), images.max()
    return ((images - low) / (high - low)).astype(np.float32)


SLOW_CASES = ("trained_tiny_p16_32", "random_B16_224")  # a training run; 350 MB of weights


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_CASES else [])
    for name in CASES])
def case(request, tmp_path_factory):
    """(name, workdir, encoder, images in [0, 1], load_encoder's tokens of them)."""
    name = request.param
    make_config, image, _ = CASES[name]
    if make_config is None:
        workdir = request.getfixturevalue("trained_workdir")
    else:
        workdir = tmp_path_factory.mktemp(name)
        write_checkpoint(workdir, make_config(), seed=len(name))
    encoder = mvmae_jax.load_encoder(str(workdir))
    images = images_01(image)
    return name, workdir, encoder, images, np.asarray(encoder(images))


# --- timm side.

def build_timm(info: dict) -> torch.nn.Module:
    """The JSON's model: its timm preset with the kwargs, or `timm_class(**timm_kwargs)`."""
    if info["timm_model"] is None:
        return timm.models.vision_transformer.VisionTransformer(**info["timm_kwargs"])
    return timm.create_model(info["timm_model"], pretrained=False, **info["timm_kwargs"])


def timm_model(info: dict) -> torch.nn.Module:
    """The JSON's model, uninitialised (built on the meta device: no random init of ViT-B's
    weights) and filled with NaN, so that a tensor that a loader skips shows."""
    with torch.device("meta"):
        model = build_timm(info)
    model = model.to_empty(device="cpu")
    assert not list(model.buffers())  # nothing that to_empty left unset outside the weights
    nan_fill(model)
    return model.eval()


def nan_fill(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))


def timm_features(model: torch.nn.Module, images: np.ndarray, info: dict) -> np.ndarray:
    x = (images - np.asarray(info["mean"], np.float32)) / np.asarray(info["std"], np.float32)
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def load_into_timm(model: torch.nn.Module, path: pathlib.Path) -> None:
    nan_fill(model)
    if path.suffix == ".npz":
        model.load_pretrained(str(path))
        return
    if path.suffix == ".pth":
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    else:
        state = safetensors.torch.load_file(str(path))
    model.load_state_dict(state, strict=True)


# --- Tests.

def test_every_format_loads_into_timm_and_gives_load_encoders_tokens(case, tmp_path):
    """.safetensors, .pth (strict load_state_dict) and .npz (timm's load_pretrained) with the
    JSON's model name and kwargs: timm's forward_features equals load_encoder to 1e-4."""
    name, workdir, encoder, images, tokens = case
    _, image, patch = CASES[name]
    num_patches = (image // patch) ** 2
    assert tokens.shape == (2, 1 + num_patches, encoder.dims["width"])
    assert tokens.dtype == np.float32
    # The first format through the whole command path; the others from the same parameters.
    info = export.export_checkpoint(str(workdir), str(tmp_path / f"{name}.safetensors"))
    config, params, step = checkpointing.load_params(str(workdir))
    assert info["step"] == step == encoder.step
    np.testing.assert_array_equal(info["mean"], encoder.config.input.mean)
    np.testing.assert_array_equal(info["std"], encoder.config.input.std)
    model = timm_model(info)
    for fmt in FORMATS:
        output = tmp_path / f"{name}.{fmt}"
        if fmt != "safetensors":
            assert export.write_export(config, params, step, str(output)) == dict(
                info, format=fmt)
        assert json.loads(output.with_suffix(".json").read_text()) == dict(info, format=fmt)
        load_into_timm(model, output)
        got = timm_features(model, images, info)
        np.testing.assert_allclose(got, tokens, atol=TOLERANCE, rtol=0, err_msg=fmt)


def test_model_names_and_kwargs():
    """A timm preset name only when every size is the preset's (image size included); the
    kwargs always hold every size."""
    dims = dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16)
    full = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                mlp_ratio=4.0, num_classes=0, global_pool="token", class_token=True,
                no_embed_class=False)
    assert export.timm_spec(dims, 224) == ("vit_base_patch16_224", full)
    assert export.timm_spec(dims, 384)[0] == "vit_base_patch16_384"
    assert export.timm_spec(dims, 32) == (None, dict(full, img_size=32))
    name, kwargs = export.timm_spec(dict(dims, patch_size=14), 224)
    assert name is None and kwargs["patch_size"] == 14 and kwargs["embed_dim"] == 768
    assert export.timm_spec(dict(dims, depth=11), 224)[0] is None
    assert export.timm_spec(dict(dims, mlp_dim=2048), 224)[0] is None
    name, kwargs = export.timm_spec(dict(width=48, depth=3, num_heads=3, mlp_dim=100,
                                         patch_size=4), 32)
    assert name is None
    assert int(48 * kwargs["mlp_ratio"]) == 100 and kwargs["depth"] == 3


def quickstart_like_config() -> ml_collections.ConfigDict:
    """The quickstart's model: 96 wide, 4 blocks of 4 heads, MLP 384, patch 4 at 32x32."""
    config = random_config("", 32, 4)
    config.model.update(width=96, depth=4, num_heads=4, mlp_dim=384)
    return config


def test_json_names_a_preset_only_when_it_is_one():
    """ViT-B/16 at 224 is named vit_base_patch16_224, and `timm_class(**timm_kwargs)` (what
    the README's snippet builds) is that preset; the quickstart's model names no preset, says
    so, and `timm_class(**timm_kwargs)` loads its state_dict strictly."""
    base = export.metadata(random_config("B/16", 224), step=1)
    assert base["timm_model"] == "vit_base_patch16_224"
    assert base["architecture"].endswith("(timm's preset vit_base_patch16_224)")
    with torch.device("meta"):
        preset = timm.create_model(base["timm_model"], pretrained=False, **base["timm_kwargs"])
        direct = timm.models.vision_transformer.VisionTransformer(**base["timm_kwargs"])
    assert repr(preset) == repr(direct)

    config = quickstart_like_config()
    abstract = abstract_params(config)
    info = export.metadata(config, step=1)
    assert info["timm_model"] is None
    assert info["architecture"] == ("ViT: width 96, depth 4, 4 heads, MLP 384, patch 4, image 32 "
                                    "(no timm preset has these sizes)")
    assert info["timm_class"] == "timm.models.vision_transformer.VisionTransformer"
    model = timm.models.vision_transformer.VisionTransformer(**info["timm_kwargs"])
    params = random_params(abstract, np.random.default_rng(0))
    state = export.state_dict(config, params)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    assert len(model.blocks) == 4 and model.patch_embed.proj.kernel_size == (4, 4)


def readme_block(language: str, containing: str) -> str:
    """The one fenced `language` block of README.md that contains `containing`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [block for block in blocks if containing in block]
    return block


def test_readme_export_command_and_timm_snippet_run_as_written(tmp_path):
    """The README's export command and timm snippet, read from README.md, on a checkpoint of the
    quickstart's model in $WORKDIR: the snippet loads the export and prints the model and the
    feature shape, as the README says it does."""
    workdir = tmp_path / "quickstart"
    write_checkpoint(workdir, quickstart_like_config(), seed=11, steps=(352,))
    env = dict(os.environ, WORKDIR=str(workdir),
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    (command,) = [line for line in readme_block("bash", "mvmae_jax.export").splitlines()
                  if line.startswith("python -m mvmae_jax.export")]
    exported = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    loaded = subprocess.run([sys.executable, "-c", readme_block("python", "encoder.json")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    printed = loaded.stdout.strip()
    assert printed == ("Loaded ViT: width 96, depth 4, 4 heads, MLP 384, patch 4, image 32 (no "
                       "timm preset has these sizes), step 352: features (2, 65, 96)"), printed
    assert printed in " ".join((ROOT / "README.md").read_text().split())


@pytest.mark.parametrize("key, name", sorted(export.STANDARD_TIMM_MODELS.items()),
                         ids=sorted(export.STANDARD_TIMM_MODELS.values()))
def test_standard_names_have_our_tensor_shapes(key, name):
    """Each preset name is registered in timm and builds, with our kwargs (on the meta device),
    our depth and, at depth 1, exactly the names and shapes of `encoder_to_timm`; the preset
    alone (no size in the kwargs) has the same sizes."""
    width, depth, heads, mlp_dim, patch, image = key
    dims = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, patch_size=patch)
    got_name, kwargs = export.timm_spec(dims, image)
    assert got_name == name
    sizes = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size")
    with torch.device("meta"):
        assert len(timm.create_model(name, pretrained=False, **kwargs).blocks) == depth
        preset = timm.create_model(name, pretrained=False, **{
            k: v for k, v in kwargs.items() if k not in sizes})
        shallow = timm.create_model(name, pretrained=False, **dict(kwargs, depth=1))
    assert len(preset.blocks) == depth and preset.embed_dim == width
    assert preset.patch_embed.img_size == (image, image)
    assert preset.blocks[0].mlp.fc1.out_features == mlp_dim
    vit = models.VisionTransformer(patch_size=patch, width=width, depth=1, num_heads=heads,
                                   mlp_dim=mlp_dim)
    abstract = jax.eval_shape(vit.init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, image, image, 3), np.float32))["params"]
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
    ours = {k: v.shape for k, v in export.encoder_to_timm(zeros, image).items()}
    assert ours == {k: tuple(v.shape) for k, v in shallow.state_dict().items()}


def test_cli_refuses_a_non_finite_checkpoint(tmp_path):
    """A checkpoint with NaN / inf encoder values: exit 1, one line naming the checkpoint, the
    step and the count, no traceback, no file written."""
    workdir = tmp_path / "workdir"
    write_checkpoint(workdir, random_config("", 32, 16), seed=5, steps=(3,), poison=7)
    output = tmp_path / "out" / "encoder.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "mvmae_jax.export", f"--workdir={workdir}",
         f"--output={output}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "not finite" in line]
    assert lines == [f"mvmae_jax.export: checkpoint {workdir / 'checkpoints' / '3'} (step 3): "
                     "7 of the encoder parameter values are not finite (NaN or inf); "
                     "nothing written"], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    # The same check in the library call, with the decoder counted too.
    config, params, step = checkpointing.load_params(str(workdir))
    params["decoder"]["decoder_pred"]["bias"][:2] = np.nan
    with pytest.raises(export.NonFiniteParameters, match="9 of the encoder and decoder"):
        export.write_export(config, params, step, str(output), with_decoder=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_step_decoder_and_checkpoint_directory(tiny_workdir, tmp_path):
    """`python -m mvmae_jax.export --step=2 --with_decoder` writes step 2's encoder (not the
    latest) and MAE's decoder tensors; a checkpoint directory loads like workdir + step."""
    output = tmp_path / "step2.pth"
    result = subprocess.run(
        [sys.executable, "-m", "mvmae_jax.export", f"--workdir={tiny_workdir}", "--step=2",
         f"--output={output}", "--with_decoder"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(output.with_suffix(".json").read_text())
    assert info["step"] == 2
    state = torch.load(output, map_location="cpu", weights_only=True)["model"]

    config, params, step = checkpointing.load_params(str(tiny_workdir / "checkpoints" / "2"))
    assert step == 2
    _, latest, _ = checkpointing.load_params(str(tiny_workdir))
    want = export.state_dict(config, params, with_decoder=True)
    assert sorted(state) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)
    changed = export.encoder_to_timm(latest["encoder"], 32)["blocks.0.attn.qkv.weight"]
    assert np.abs(changed - want["blocks.0.attn.qkv.weight"]).max() > 1e-4

    grid, width, patch = 2, 32, 16
    decoder_shapes = {
        "mask_token": (1, 1, width), "decoder_pos_embed": (1, 1 + grid * grid, width),
        "decoder_embed.weight": (width, 32), "decoder_embed.bias": (width,),
        "decoder_blocks.1.attn.qkv.weight": (3 * width, width),
        "decoder_blocks.1.mlp.fc1.weight": (4 * width, width),
        "decoder_norm.weight": (width,), "decoder_pred.weight": (patch * patch * 3, width),
        "decoder_pred.bias": (patch * patch * 3,)}
    for key, shape in decoder_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("decoder_blocks.2.") for k in state)
    np.testing.assert_array_equal(state["decoder_pos_embed"][0, 0].numpy(), 0.0)
    assert info["decoder"]["decoder_depth"] == 2 and info["decoder"]["decoder_num_heads"] == 2

    images = images_01(32, count=3)
    by_dir = inference.load_encoder(str(tiny_workdir / "checkpoints" / "2"))
    by_step = inference.load_encoder(str(tiny_workdir), step=2)
    np.testing.assert_array_equal(np.asarray(by_dir(images)), np.asarray(by_step(images)))
    # Batch size 3 and 1: each row's tokens do not depend on the batch.
    np.testing.assert_allclose(np.asarray(by_dir(images[:1])), np.asarray(by_dir(images))[:1],
                               atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="float images"):
        by_dir((images * 255).astype(np.uint8))
    # bfloat16 compute: float32 tokens close to the float32 ones.
    half = inference.load_encoder(str(tiny_workdir), step=2, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16 and half(images).dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half(images)), np.asarray(by_dir(images)), atol=0.1)


def test_exported_decoder_runs_maes_forward_decoder(tiny_workdir):
    """MAE's `forward_decoder` in PyTorch (timm Blocks, the exported tensors, unshuffling with
    ids_restore) predicts the masked patches as our decoder does, to 1e-4."""
    config, params, _ = checkpointing.load_params(str(tiny_workdir))
    state = export.state_dict(config, params, with_decoder=True)
    num_patches, width = 4, 32
    decoder = models.MAEDecoder(grid_size=(2, 2), patch_pixels=16 * 16 * 3, width=width,
                                depth=2, num_heads=2, mlp_dim=4 * width)
    rng = np.random.default_rng(1)
    batch, num_visible = 3, 2
    order = np.stack([rng.permutation(num_patches) for _ in range(batch)]).astype(np.int32)
    visible, masked = order[:, :num_visible], order[:, num_visible:]
    tokens = rng.standard_normal((batch, 1 + num_visible, width)).astype(np.float32)
    want = np.asarray(decoder.apply({"params": params["decoder"]}, tokens, visible, masked))

    blocks = torch.nn.ModuleList(
        timm.models.vision_transformer.Block(width, 2, mlp_ratio=4.0, qkv_bias=True)
        for _ in range(2))
    blocks.load_state_dict({k.removeprefix("decoder_blocks."): torch.from_numpy(v)
                            for k, v in state.items() if k.startswith("decoder_blocks.")})
    blocks.eval()
    t = {k: torch.from_numpy(v) for k, v in state.items()}
    with torch.no_grad():
        x = torch.from_numpy(tokens) @ t["decoder_embed.weight"].T + t["decoder_embed.bias"]
        ids_restore = torch.from_numpy(np.argsort(order, axis=1))
        mask_tokens = t["mask_token"].expand(batch, num_patches - num_visible, width)
        rest = torch.cat([x[:, 1:], mask_tokens], dim=1)
        rest = torch.gather(rest, 1, ids_restore[..., None].expand(-1, -1, width))
        x = torch.cat([x[:, :1], rest], dim=1) + t["decoder_pos_embed"]
        for block in blocks:
            x = block(x)
        x = torch.nn.functional.layer_norm(x, (width,), t["decoder_norm.weight"],
                                           t["decoder_norm.bias"], eps=1e-6)
        pred = (x @ t["decoder_pred.weight"].T + t["decoder_pred.bias"])[:, 1:].numpy()
    got = np.take_along_axis(pred, masked[..., None], axis=1)
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_npz_is_big_vision_layout(tiny_workdir, tmp_path):
    """The .npz keys are big_vision's flat flax names plus `pos_embedding` (1, 1 + N, D)."""
    output = tmp_path / "bv.npz"
    export.export_checkpoint(str(tiny_workdir), str(output))
    with np.load(output) as npz:
        arrays = dict(npz)
    _, params, _ = checkpointing.load_params(str(tiny_workdir))
    encoder = params["encoder"]
    np.testing.assert_array_equal(
        arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"],
        encoder["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]["query"][
            "kernel"])
    np.testing.assert_array_equal(arrays["embedding/kernel"], encoder["embedding"]["kernel"])
    np.testing.assert_array_equal(arrays["pos_embedding"],
                                  export.pos_embed_with_cls(2, 32))
    assert arrays["pos_embedding"].shape == (1, 5, 32) and arrays["cls"].shape == (1, 1, 32)
    assert len(arrays) == 1 + len(jax.tree.leaves(encoder))


def test_safetensors_needs_no_torch_and_bad_requests_fail(tiny_workdir, tmp_path):
    """safetensors are written without torch; a wrong suffix or .npz with the decoder fail."""
    data = export.serialise({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, ".safetensors")
    np.testing.assert_array_equal(safetensors.numpy.load(data)["a"],
                                  np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="must end with"):
        export.export_checkpoint(str(tiny_workdir), str(tmp_path / "x.bin"))
    with pytest.raises(ValueError, match="encoder only"):
        export.export_checkpoint(str(tiny_workdir), str(tmp_path / "x.npz"),
                                 with_decoder=True)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from mvmae_jax import export\n"
            f"export.export_checkpoint({str(tiny_workdir)!r}, "
            f"{str(tmp_path / 'nt.safetensors')!r}, with_decoder=True)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoder_pred.weight" in safetensors.numpy.load_file(str(tmp_path / "nt.safetensors"))


def test_import_is_light():
    """`import mvmae_jax` imports no JAX; `mvmae_jax.load_encoder` arrives on first use,
    without TensorFlow (users load encoders next to PyTorch)."""
    code = ("import sys, mvmae_jax\n"
            "assert 'jax' not in sys.modules, 'jax imported'\n"
            "assert callable(mvmae_jax.load_encoder)\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
