"""Linear probe and fine-tuning: layer decay, the classifier's trees, a frozen encoder, resume."""

from __future__ import annotations

import json
import pathlib
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compile_steps, load_config, set_dotted, tiny_config

from mvmae_jax import checkpointing, metrics_io, models, optim, sharding, tasks, train
from mvmae_jax import train_step as ts
from mvmae_jax.default_config import FINETUNE, PROBE, get_classify_config

DIGITS = SimpleNamespace(num_classes=10, num_examples=1437)


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
    config.evals.classification.every_steps = 2
    config.update(log_every_steps=1, checkpoint_every_steps=2)
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
    task = tasks.PretrainTask(config, sharding.make_mesh(), DIGITS)
    optimizer = task.optimizer(optax.constant_schedule(1e-3))
    state = ts.create_train_state(task, optimizer, sharding.make_mesh(), config)
    manager = checkpointing.make_manager(str(workdir / "checkpoints"), 3)
    checkpointing.save(manager, state.replace(step=jnp.int32(7)), [[0, 0]])
    manager.wait_until_finished()
    manager.close()
    (workdir / "done.json").write_text(json.dumps({"step": 7}))
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return str(workdir)


def classify_task(config, mesh=None) -> tasks.ClassifyTask:
    return tasks.ClassifyTask(tasks.resolve_config(config), mesh or sharding.make_mesh(), DIGITS)


def test_layer_ids_and_decay_factors():
    config = tiny_classify_config(FINETUNE)
    params = jax.eval_shape(lambda: classify_task(config).init(jax.random.PRNGKey(0))[0])
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
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
        config = tiny_classify_config(task, pretrained)
        config.model.pool = pool
        trained, extras = classify_task(config).init(jax.random.PRNGKey(0))
        loaded = (extras["frozen"] if task == PROBE else trained)["encoder"]
        assert set(trained) == ({"head"} if task == PROBE else {"encoder", "fc_norm", "head"})
        has_norm = "encoder_norm" in loaded["Transformer"]
        assert has_norm == (pool != "gap")
        for path, leaf in jax.tree_util.tree_leaves_with_path(loaded):
            source = params["encoder"]
            for key in path:
                source = source[key.key]
            np.testing.assert_array_equal(np.asarray(leaf), source)
    config = tiny_classify_config(PROBE, **{"model.width": 48})
    task = classify_task(config)
    task.pretrained_encoder = params["encoder"]
    with pytest.raises(ValueError, match="shape"):
        task.init(jax.random.PRNGKey(0))


@pytest.mark.slow
def test_probe_leaves_the_encoder_bit_identical_and_resumes_exactly(pretrained, data_dir,
                                                                     tmp_path):
    config = tiny_classify_config(PROBE, pretrained, **{"dataset.data_dir": data_dir})
    state = train.train_and_evaluate(config, str(tmp_path / "probe"))
    _, params, step = checkpointing.load_params(pretrained)
    assert step == 7
    frozen = jax.device_get(state.extras["frozen"]["encoder"])
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
    assert set(state.extras["batch_stats"]["head_norm"]) == {"mean", "var"}

    # Resume: a copy of the workdir without the last checkpoint (step 4) restarts from step 2
    # and ends with the parameters and statistics of the uninterrupted run.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "probe", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")
    (resumed_dir / "done.json").unlink()
    resumed = train.train_and_evaluate(config, str(resumed_dir))
    for got, want in zip(jax.tree.leaves(jax.device_get((resumed.params, resumed.extras))),
                         jax.tree.leaves(jax.device_get((state.params, state.extras))),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    resumed_evals = [r["step"] for r in metrics_io.read_metrics(str(resumed_dir))
                     if "eval/top1" in r]
    assert resumed_evals == [2, 4]


@pytest.mark.slow
def test_finetuning_updates_every_parameter_and_logs_eval(pretrained, data_dir, tmp_path):
    config = tiny_classify_config(FINETUNE, pretrained, **{"dataset.data_dir": data_dir})
    state = train.train_and_evaluate(config, str(tmp_path / "finetune"))
    _, params, _ = checkpointing.load_params(pretrained)
    assert set(state.params) == {"encoder", "fc_norm", "head"} and not state.extras
    moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b),
                         state.params["encoder"]["embedding"], params["encoder"]["embedding"])
    assert all(jax.tree.leaves(moved))
    records = metrics_io.read_metrics(str(tmp_path / "finetune"))
    assert [r["step"] for r in records if "eval/top1" in r] == [2, 4]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)


CLASSIFY_CONFIGS = sorted(p for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                          if "get_classify_config" in p.read_text())


def test_there_are_probe_and_finetune_configs_for_digits_and_imagenet():
    assert {p.stem for p in CLASSIFY_CONFIGS} == {"linear_probe", "linear_probe_b", "finetune",
                                                   "finetune_b"}


@pytest.mark.parametrize("path", CLASSIFY_CONFIGS, ids=[p.stem for p in CLASSIFY_CONFIGS])
def test_every_classify_config_compiles(path):
    """Each config documents its command, and its train step compiles at the config's width
    (one block, 2x2 patches)."""
    config = load_config(path)
    assert ("python -m mvmae_jax.main --config=configs/" + path.name
            in path.read_text().split('"""')[1])
    config.init_from = ""
    config.img_size = 2 * models.encoder_dims(config.model)["patch_size"]
    config.batch_size = 8
    config.model.depth = 1
    mesh = sharding.make_mesh()
    task = classify_task(config, mesh)
    size = config.img_size
    batch = {"image": jax.ShapeDtypeStruct((8, size, size, 3), np.float32),
             "label": jax.ShapeDtypeStruct((8,), np.int32)}
    assert all(step is not None for step in compile_steps(task, config, mesh, batch))


def test_finetuning_step_moves_no_images_between_devices():
    """Mixup and CutMix pair each example with one of its own device's: the compiled
    fine-tuning step on 4 devices has no collective-permute or all-to-all."""
    config = tiny_classify_config(FINETUNE, batch_size=8)
    mesh = sharding.make_mesh(jax.devices()[:4])
    task = classify_task(config, mesh)
    batch = {"image": jax.ShapeDtypeStruct((8, 16, 16, 3), np.float32),
             "label": jax.ShapeDtypeStruct((8,), np.int32)}
    (step,) = compile_steps(task, config, mesh, batch)
    hlo = step.as_text()
    assert "all-reduce" in hlo  # the gradients': the step is partitioned over the devices
    for collective in ("collective-permute", "all-to-all"):
        assert collective not in hlo


def test_fsdp_finetuning_equals_data_parallel_finetuning():
    """Fine-tuning shards with config.sharding like pretraining: under FSDP the encoder's large
    parameters and their Adam moments are split over the 8 devices, and two steps give the
    parameters of data-parallel fine-tuning."""
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    results = {}
    for strategy in ("data", "fsdp"):
        config = tiny_classify_config(FINETUNE, **{"sharding.strategy": strategy,
                                                   "sharding.fsdp_min_size": 1024,
                                                   "batch_size": 16})
        mesh = sharding.make_mesh()
        task = classify_task(config, mesh)
        schedule = optax.constant_schedule(1e-3)
        optimizer = task.optimizer(schedule)
        state = ts.create_train_state(task, optimizer, mesh, config)
        shardings = ts.state_shardings(state, mesh, config)
        step = ts.make_train_step(task, optimizer, schedule, mesh, shardings, "train")
        kernel = state.params["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_0"][
            "Dense_0"]["kernel"]
        assert kernel.sharding.is_fully_replicated == (strategy == "data")
        for _ in range(2):
            state, metrics = step(state, sharding.shard_batch(batch, mesh))
        results[strategy] = (jax.device_get(state.params), float(metrics["loss"]))
    (data_params, data_loss), (fsdp_params, fsdp_loss) = results["data"], results["fsdp"]
    np.testing.assert_allclose(fsdp_loss, data_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(data_params), jax.tree.leaves(fsdp_params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
