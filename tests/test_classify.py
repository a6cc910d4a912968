"""Linear probe and fine-tuning: layer decay, the classifier's trees, a frozen encoder, resume."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import set_dotted, tiny_config

from mvmae_jax import checkpointing, classify, config_lib, metrics_io, models, optim, sharding
from mvmae_jax import classify_step as cs
from mvmae_jax import train_step as ts
from mvmae_jax.default_config import FINETUNE, PROBE, get_classify_config


def tiny_classify_config(task: str, init_from: str = "", **overrides):
    """16x16 digits, the encoder of `tiny_config()`, a few steps."""
    config = get_classify_config(task)
    config.init_from = init_from
    config.img_size = 16
    config.batch_size = 32
    config.total_steps = 4
    config.model.update(variant="", patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                        dtype="float32")
    config.augment.crop_scale = (0.5, 1.0)
    if task == FINETUNE:
        config.augment.randaugment_magnitude = 5.0
    config.dataset.update(name="digits", split="train", eval_split="test")
    config.input.update(eval_crop_fraction=1.0, shuffle_buffer=1000)
    config.update(eval_every_steps=2, log_every_steps=1, checkpoint_every_steps=2)
    return set_dotted(config, overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A pretraining workdir with one checkpoint of a randomly initialised tiny MV-MAE."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = tiny_config()
    config.input.mean = (0.5, 0.4, 0.3)  # not ImageNet's: the classifier must take these
    model = models.build_model(config)
    optimizer = optim.make_optimizer(config.optim, optax.constant_schedule(1e-3))
    state = ts.create_train_state(config, model, optimizer, sharding.make_mesh(), 1437)
    manager = checkpointing.make_manager(str(workdir / "checkpoints"), 3)
    checkpointing.save(manager, state.replace(step=jnp.int32(7)), [[0, 0]])
    manager.wait_until_finished()
    manager.close()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return str(workdir)


def test_layer_ids_and_decay_factors():
    config = tiny_classify_config(FINETUNE)
    model = cs.build_classifier(config, 10)
    params = cs.init_variables(config, model, None)["params"]
    ids = optim.layer_ids(params, depth=2)
    assert ids["encoder"]["embedding"]["kernel"] == 0 and ids["encoder"]["cls"] == 0
    block1 = ids["encoder"]["Transformer"]["encoderblock_1"]
    assert set(jax.tree.leaves(block1)) == {2}
    assert set(jax.tree.leaves(ids["encoder"]["Transformer"]["encoderblock_0"])) == {1}
    assert ids["head"]["kernel"] == 3 and ids["fc_norm"]["scale"] == 3
    # One AdamW step from zero moments moves every coordinate by about lr x factor (the first
    # Adam update is g / |g|), with weight decay off.
    config.optim.update(layer_decay=0.5, weight_decay=0.0)
    lr = 1e-2
    opt = optim.make_classify_optimizer(config.optim, optax.constant_schedule(lr), params, 2)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0), params)
    updates, _ = opt.update(grads, opt.init(params), params)
    expected = {0: lr * 0.5 ** 3, 1: lr * 0.5 ** 2, 2: lr * 0.5, 3: lr}
    for update, layer in zip(jax.tree.leaves(updates), jax.tree.leaves(ids), strict=True):
        np.testing.assert_allclose(np.abs(np.asarray(update)), expected[layer], rtol=1e-4)


def test_lars_scales_kernels_by_the_trust_ratio_and_not_biases():
    config = get_classify_config(PROBE)
    params = {"head": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full((3,), 2.0)}}
    grads = {"head": {"kernel": jnp.full((4, 3), 0.5), "bias": jnp.full((3,), 0.5)}}
    lr = 0.1
    opt = optim.make_classify_optimizer(config.optim, optax.constant_schedule(lr), params, 2)
    updates, _ = opt.update(grads, opt.init(params), params)
    # Kernel: lr x 0.001 x |w| / |g| x g = 0.1 x 0.001 x (2 sqrt 12) / (0.5 sqrt 12) x 0.5.
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * 0.001 * 4.0 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(updates["head"]["bias"], -lr * 0.5, rtol=1e-6)


def test_pretrained_encoder_goes_in_and_unused_norm_is_dropped(pretrained):
    _, params, _ = checkpointing.load_params(pretrained)
    for task, pool in ((PROBE, "cls"), (FINETUNE, "gap")):
        config = tiny_classify_config(task)
        config.model.pool = pool
        model = cs.build_classifier(config, 10)
        variables = cs.init_variables(config, model, params["encoder"])
        loaded = variables["params"]["encoder"]
        has_norm = "encoder_norm" in loaded["Transformer"]
        assert has_norm == (pool != "gap")
        for path, leaf in jax.tree_util.tree_leaves_with_path(loaded):
            source = params["encoder"]
            for key in path:
                source = source[key.key]
            np.testing.assert_array_equal(np.asarray(leaf), source)
    config = tiny_classify_config(PROBE)
    config.model.width = 48
    with pytest.raises(ValueError, match="shape"):
        cs.init_variables(config, cs.build_classifier(config, 10), params["encoder"])


@pytest.mark.slow
def test_probe_leaves_the_encoder_bit_identical_and_resumes_exactly(pretrained, data_dir,
                                                                     tmp_path):
    config = tiny_classify_config(PROBE, pretrained, **{"dataset.data_dir": data_dir})
    state = classify.train_and_evaluate(config, str(tmp_path / "probe"))
    _, params, step = checkpointing.load_params(pretrained)
    assert step == 7
    frozen = jax.device_get(state.frozen["encoder"])
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(params["encoder"]),
                         strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert set(state.params) == {"head"}
    assert float(jnp.abs(state.params["head"]["kernel"]).sum()) > 0
    saved = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert saved["input"]["mean"] == [0.5, 0.4, 0.3]  # the pretraining run's normalisation
    records = metrics_io.read_metrics(str(tmp_path / "probe"))
    evals = {r["step"]: r for r in records if "eval/top1" in r}
    assert sorted(evals) == [2, 4] and {"eval/top5", "eval/loss"} <= set(evals[4])
    assert set(state.batch_stats["head_norm"]) == {"mean", "var"}

    # Resume: a copy of the workdir without the last checkpoint (step 4) restarts from step 2
    # and ends with the parameters and statistics of the uninterrupted run.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "probe", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")
    (resumed_dir / "done.json").unlink()
    resumed = classify.train_and_evaluate(config, str(resumed_dir))
    for got, want in zip(jax.tree.leaves(jax.device_get((resumed.params, resumed.batch_stats))),
                         jax.tree.leaves(jax.device_get((state.params, state.batch_stats))),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    resumed_evals = [r["step"] for r in metrics_io.read_metrics(str(resumed_dir))
                     if "eval/top1" in r]
    assert resumed_evals == [2, 4]


@pytest.mark.slow
def test_finetuning_updates_every_parameter_and_logs_eval(pretrained, data_dir, tmp_path):
    config = tiny_classify_config(FINETUNE, pretrained, **{"dataset.data_dir": data_dir})
    state = classify.train_and_evaluate(config, str(tmp_path / "finetune"))
    _, params, _ = checkpointing.load_params(pretrained)
    assert set(state.params) == {"encoder", "fc_norm", "head"} and not state.frozen
    moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b),
                         state.params["encoder"]["embedding"], params["encoder"]["embedding"])
    assert all(jax.tree.leaves(moved))
    records = metrics_io.read_metrics(str(tmp_path / "finetune"))
    assert [r["step"] for r in records if "eval/top1" in r] == [2, 4]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)


CLASSIFY_CONFIGS = sorted(p for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                          if "get_classify_config" in p.read_text())


def load_config(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_there_are_probe_and_finetune_configs_for_digits_and_imagenet():
    assert {p.stem for p in CLASSIFY_CONFIGS} == {"linear_probe", "linear_probe_b", "finetune",
                                                   "finetune_b"}


@pytest.mark.parametrize("path", CLASSIFY_CONFIGS, ids=[p.stem for p in CLASSIFY_CONFIGS])
def test_every_classify_config_is_valid_and_compiles(path):
    """Each config validates on 8 devices, documents its command, and its train and eval steps
    compile at the config's width (one block, 2x2 patches)."""
    config = load_config(path)
    config_lib.validate_classify(config, 8, 1)
    assert ("python -m mvmae_jax.main --config=configs/" + path.name
            in path.read_text().split('"""')[1])
    config.img_size = 2 * models.encoder_dims(config.model)["patch_size"]
    config.batch_size = 8
    config.model.depth = 1
    mesh = sharding.make_mesh()
    model = cs.build_classifier(config, 10)
    trainable = jax.eval_shape(lambda: cs.init_variables(config, model, None)["params"])
    trainable = {k: v for k, v in trainable.items() if k not in cs.frozen_names(config)}
    schedule = optim.learning_rate_schedule(config.optim, 8, 1, 10)
    optimizer = optim.make_classify_optimizer(config.optim, schedule, trainable, 1)
    abstract = jax.eval_shape(lambda: cs.create_state(config, model, optimizer, mesh, None))
    state_sharding = cs.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, state_sharding)
    size = config.img_size
    batch = {"image": jax.ShapeDtypeStruct((8, size, size, 3), np.float32),
             "label": jax.ShapeDtypeStruct((8,), np.int32)}
    step = cs.make_train_step(config, model, optimizer, schedule, mesh, state_sharding, 10)
    assert step.lower(abstract, batch).compile() is not None
    eval_step = cs.make_eval_step(model, mesh, state_sharding)
    batch["valid"] = jax.ShapeDtypeStruct((8,), np.bool_)
    assert eval_step.lower(abstract, batch).compile() is not None


def test_config_errors_name_the_field():
    for field, value in (("model.pool", "max"), ("optim.name", "sgd"),
                         ("optim.layer_decay", 1.5), ("batch_size", 12)):
        config = tiny_classify_config(FINETUNE, **{field: value})
        with pytest.raises(config_lib.ConfigError, match=f"config.{field}".replace(".", r"\.")):
            config_lib.validate_classify(config, 8, 1)
