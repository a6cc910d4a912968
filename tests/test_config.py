"""Config checks: every config file validates, every bad value stops with one line naming the
field, and the entry point turns a bad flag into one line before anything is compiled."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import load_config, set_dotted, tiny_config

from mvmae_jax import config_lib
from mvmae_jax.default_config import FINETUNE, PROBE, get_base_config, get_classify_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def tiny_classify_config(task: str = FINETUNE, **overrides):
    """16x16 digits and the encoder of `tiny_config()`."""
    config = get_classify_config(task)
    config.img_size = 16
    config.batch_size = 32
    config.model.update(variant="", patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                        dtype="float32")
    config.augment.crop_scale = (0.5, 1.0)
    config.dataset.update(name="digits", split="train", eval_split="test")
    config.input.update(eval_crop_fraction=1.0, shuffle_buffer=1000)
    return set_dotted(config, overrides)


def run_main(*flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "mvmae_jax.main", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


# --- Every config file.

@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_is_valid(path):
    """Each config loads, passes validation on 8 devices and has a docstring with a command."""
    config_lib.validate(load_config(path), 8, 1)
    module_doc = path.read_text().split('"""')[1]
    assert "python -m mvmae_jax.main --config=configs/" + path.name in module_doc


def test_evaluators_and_the_nonfinite_policy_have_one_place():
    for config, name in ((get_base_config(), "knn"), (get_classify_config(PROBE),
                                                       "classification")):
        assert list(config.evals) == [name] and config.evals[name].type == name
        assert config.nonfinite.to_dict() == {"policy": "stop", "max_rollbacks": 3}


# --- Bad values: one ConfigError that names the field.

@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 12}, "config.batch_size=12 is not divisible by the 8 devices"),
    ({"img_size": 30}, "config.img_size=30 is not divisible by the patch size 4"),
    ({"masking.mask_ratio": 0.6, "masking.throw_ratio": 0.4}, "config.masking.mask_ratio"),
    ({"masking.mask_ratio": 0.0, "masking.throw_ratio": 0.5},
     "config.masking.mask_ratio=0.0 masks no patch"),
    ({"masking.mask_ratio": -0.1}, "config.masking.mask_ratio=-0.1 must be in [0, 1)"),
    ({"masking.strategy": "lowest"}, "config.masking.strategy='lowest' must be one of"),
    ({"amt.warmup_mask_ratio": 1.0}, "config.amt.warmup_mask_ratio=1.0 must be in [0, 1)"),
    ({"amt.refresh_every": 0}, "config.amt.refresh_every=0 must be >= 1"),
    ({"amt.source": "memory"}, "config.amt.source='memory' must be one of"),
    ({"views.num": 1}, "config.contrastive.weight"),
    ({"views.num": 3}, "config.views.num=3 must be one of (1, 2)"),
    ({"grad_accum_steps": 4}, "config.grad_accum_steps=4"),
    ({"model.variant": "Q/16"}, "config.model.variant='Q/16'"),
    ({"model.decoder_width": 512, "model.decoder_heads": 3},
     "config.model.decoder_heads=3 does not divide config.model.decoder_width=512"),
    ({"model.num_heads": 3}, "config.model.num_heads=3 does not divide config.model.width=32"),
    ({"model.width": 34}, "config.model.width=34 must be divisible by 4"),
    ({"model.decoder_width": 30, "model.decoder_heads": 1},
     "config.model.decoder_width=30 must be divisible by 4"),
    ({"model.dtype": "float65"}, "config.model.dtype='float65' must be one of"),
    ({"model.remat_policy": "dots"}, "config.model.remat_policy='dots' must be one of"),
    ({"keep_checkpoints": 0}, "config.keep_checkpoints=0 must be >= 1"),
    ({"keep_checkpoints": -1}, "config.keep_checkpoints=-1 must be >= 1"),
    ({"log_every_steps": 0}, "config.log_every_steps=0 must be >= 1"),
    ({"checkpoint_every_steps": 0}, "config.checkpoint_every_steps=0 must be >= 1"),
    ({"image_every_steps": -1}, "config.image_every_steps=-1 must be >= 0"),
    ({"total_epochs": 0}, "config.total_epochs=0 or config.total_steps=-1 must be positive"),
    ({"optim.base_lr": -1.0}, "config.optim.base_lr=-1.0 must be >= 0"),
    ({"optim.base_lr": float("nan")}, "config.optim.base_lr=nan must be a finite number"),
    ({"optim.warmup_epochs": -1}, "config.optim.warmup_epochs=-1 must be >= 0"),
    ({"optim.weight_decay": -0.1}, "config.optim.weight_decay=-0.1 must be >= 0"),
    ({"optim.b2": 1.0}, "config.optim.b2=1.0 must be in [0, 1)"),
    ({"optim.grad_clip_norm": -1.0}, "config.optim.grad_clip_norm=-1.0 must be >= 0"),
    ({"input.crop_scale": (0, 0)}, "config.input.crop_scale=(0, 0): both ends must be in (0, 1]"),
    ({"input.crop_scale": (0.9, 0.5)}, "config.input.crop_scale=(0.9, 0.5): low must not"),
    ({"input.crop_ratio": (0.0, 1.0)}, "config.input.crop_ratio=(0.0, 1.0): both ends must be > 0"),
    ({"input.eval_crop_fraction": 0.0}, "config.input.eval_crop_fraction=0.0 must be in (0, 1]"),
    ({"input.std": (0.2, 0.0, 0.2)}, "config.input.std=(0.2, 0.0, 0.2) must be positive"),
    ({"input.mean": (0.5, 0.5)}, "config.input.mean=(0.5, 0.5) must be 3 numbers"),
    ({"input.prefetch": 0}, "config.input.prefetch=0 must be >= 1"),
    ({"contrastive.temperature": 0.0}, "config.contrastive.temperature=0.0 must be > 0"),
    ({"contrastive.weight": -1.0}, "config.contrastive.weight=-1.0 must be >= 0"),
    ({"contrastive.num_layers": 0}, "config.contrastive.num_layers=0 must be >= 1"),
    ({"dataset.name": ""}, "config.dataset.name is empty"),
    ({"dataset.name": "imagefolder"}, "config.dataset.path is empty"),
    ({"evals.knn.k": 0}, "config.evals.knn.k=0 must be >= 1"),
    ({"evals.knn.temperature": 0.0}, "config.evals.knn.temperature=0.0 must be > 0"),
    ({"evals.knn.feature": "max"}, "config.evals.knn.feature='max' must be one of"),
    ({"evals.knn.every_steps": -2}, "config.evals.knn.every_steps=-2 must be >= -1"),
    ({"evals.knn.type": "linear"}, "config.evals.knn.type='linear' must be one of"),
    ({"evals.knn.batch_size": 12}, "config.evals.knn.batch_size=12 is not divisible by the 8"),
    ({"nonfinite.policy": "retry"}, "config.nonfinite.policy='retry' must be one of"),
    ({"nonfinite.max_rollbacks": -1}, "config.nonfinite.max_rollbacks=-1 must be >= 0"),
    ({"sharding.strategy": "zero"}, "config.sharding.strategy='zero' must be one of"),
    ({"seed": -1}, "config.seed=-1 must be >= 0"),
])
def test_pretraining_errors_name_the_field(overrides, message):
    """Each impossible pretraining setting stops with a ConfigError that says what to change."""
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(tiny_config(**overrides), 8, 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_zero_learning_rate_is_accepted():
    """base_lr=0 is how docs/results.md measures a random encoder."""
    config_lib.validate(tiny_config(**{"optim.base_lr": 0.0}), 8, 1)
    config_lib.validate(tiny_classify_config(**{"optim.base_lr": 0.0}), 8, 1)


def test_batch_must_divide_over_processes():
    """A global batch that does not split over the processes is refused."""
    with pytest.raises(config_lib.ConfigError, match="processes"):
        config_lib.validate(tiny_config(batch_size=8), 2, 3)


def test_defaults_are_locked_and_typed():
    """ml_collections refuses a misspelt field (naming the closest), a dropped section and a
    value of the wrong type; only `evals` takes new sections."""
    config = tiny_config()
    with pytest.raises(AttributeError, match=r'Did you mean "batch_size" instead of "batchsize"'):
        config.batchsize = 8
    with pytest.raises(AttributeError, match=r'Did you mean "decoder_heads"'):
        config.model.decoder_hedas = 2
    with pytest.raises(AttributeError, match="locked"):
        del config.nonfinite
    with pytest.raises(TypeError, match="batch_size"):
        config.batch_size = "8"
    with pytest.raises(AttributeError, match="locked"):
        config.evals.knn.kk = 2
    config.evals.second = get_base_config().evals.knn
    config_lib.validate(config, 8, 1)


@pytest.mark.parametrize("task, overrides, message", [
    (FINETUNE, {"model.pool": "max"}, "config.model.pool='max' must be one of"),
    (FINETUNE, {"optim.name": "sgd"}, "config.optim.name='sgd' must be one of"),
    (FINETUNE, {"optim.layer_decay": 1.5}, "config.optim.layer_decay=1.5 must be in (0, 1]"),
    (FINETUNE, {"batch_size": 12}, "config.batch_size=12 is not divisible by the 8 devices"),
    (FINETUNE, {"optim.base_lr": -1.0}, "config.optim.base_lr=-1.0 must be >= 0"),
    (FINETUNE, {"optim.warmup_epochs": -1}, "config.optim.warmup_epochs=-1 must be >= 0"),
    (FINETUNE, {"model.drop_path": 1.0}, "config.model.drop_path=1.0 must be in [0, 1)"),
    (FINETUNE, {"augment.label_smoothing": 1.0}, "config.augment.label_smoothing=1.0"),
    (FINETUNE, {"augment.crop_scale": (0, 0)}, "config.augment.crop_scale=(0, 0)"),
    (FINETUNE, {"augment.mixup": -0.1}, "config.augment.mixup=-0.1 must be >= 0"),
    (FINETUNE, {"keep_checkpoints": 0}, "config.keep_checkpoints=0 must be >= 1"),
    (FINETUNE, {"model.dtype": "float65"}, "config.model.dtype='float65' must be one of"),
    (FINETUNE, {"model.num_heads": 3}, "config.model.num_heads=3 does not divide"),
    (PROBE, {"init_step": -2}, "config.init_step=-2 must be >= -1"),
    (PROBE, {"num_classes": -1}, "config.num_classes=-1 must be >= 0"),
    (PROBE, {"optim.momentum": 1.0}, "config.optim.momentum=1.0 must be in [0, 1)"),
    (PROBE, {"evals.classification.batch_size": 12},
     "config.evals.classification.batch_size=12 is not divisible by the 8 devices"),
    (PROBE, {"evals.classification.every_steps": -5},
     "config.evals.classification.every_steps=-5 must be >= -1"),
])
def test_classification_errors_name_the_field(task, overrides, message):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(tiny_classify_config(task, **overrides), 8, 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_task():
    with pytest.raises(config_lib.ConfigError, match="config.task='pretraining' must be one of"):
        config_lib.validate(tiny_config(task="pretraining"), 8, 1)


# --- Through the entry point: one line, before anything is imported or compiled.

@pytest.mark.parametrize("flags, message", [
    (["--config.batchsize=8"], 'error: config.batchsize is not a field; Did you mean '
     '"batch_size" instead of "batchsize"?'),
    (["--config.optim.base_rl=1"], 'error: config.optim.base_rl is not a field; Did you mean '
     '"base_lr" instead of "base_rl"?'),
    (["--config.knn.k=5"], "error: config.knn.k is not a field"),
    (["--config.batch_size=abc"], "error: flag --config.batch_size=abc: invalid literal for int() "
     "with base 10: 'abc'\n"),
    (["--config=configs/missing.py"], "error: --config=configs/missing.py: no such file"),
])
def test_bad_flags_are_one_line(tmp_path, flags, message):
    result = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}", *flags)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(tmp_path.iterdir())


def test_misspelt_field_in_a_config_file_is_one_line(tmp_path):
    config_file = tmp_path / "bad.py"
    config_file.write_text("from mvmae_jax.default_config import get_base_config\n\n\n"
                           "def get_config():\n    config = get_base_config()\n"
                           "    config.batchsize = 8\n    return config\n")
    result = run_main(f"--config={config_file}", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert result.stderr == (f"error: {config_file}:6: AttributeError: batchsize is not a field; "
                             'Did you mean "batch_size" instead of "batchsize"?\n')


def test_unknown_field_and_bad_value_stop_main_before_compiling(tmp_path):
    """A value that validation refuses stops the entry point with the message, before any
    checkpoint is written."""
    result = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}",
                      f"--config.dataset.data_dir={tmp_path / 'tfds'}",
                      "--config.batch_size=100")
    assert result.returncode != 0
    assert "config.batch_size=100 is not divisible by the 8 devices" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


# --- init_from: a finished pretraining run of a compatible model.

def fake_run(root: pathlib.Path, steps=(7,), done: bool = False, task: str | None = "pretrain",
             patch_size: int = 4) -> pathlib.Path:
    """A workdir with the files check_init_from reads (empty checkpoint folders)."""
    root.mkdir(parents=True, exist_ok=True)
    for step in steps:
        (root / "checkpoints" / str(step) / "state").mkdir(parents=True)
    config = json.loads(tiny_config(**{"model.patch_size": patch_size}).to_json())
    if task is None:
        del config["task"]
    else:
        config["task"] = task
    (root / "config.json").write_text(json.dumps(config))
    if done:
        (root / "done.json").write_text("{}")
    return root


def test_init_from_accepts_finished_runs_and_named_steps(tmp_path):
    finished = str(fake_run(tmp_path / "finished", done=True))
    config_lib.check_init_from(tiny_classify_config(init_from=finished))
    old = str(fake_run(tmp_path / "old", done=True, task=None))  # runs from before `task`
    config_lib.check_init_from(tiny_classify_config(init_from=old))
    unfinished = str(fake_run(tmp_path / "unfinished", steps=(3, 7)))
    config_lib.check_init_from(tiny_classify_config(init_from=unfinished, init_step=3))
    config_lib.check_init_from(tiny_classify_config(init_from=f"{unfinished}/checkpoints/7"))
    config_lib.check_init_from(tiny_classify_config(init_from=""))  # a random encoder


@pytest.mark.parametrize("run, overrides, message", [
    (None, {}, "does not exist"),
    ({"steps": ()}, {}, "no checkpoint in"),
    ({}, {}, "has not finished (no done.json); pass --config.init_step=N with one of its "
     "checkpoints"),
    ({"done": True}, {"init_step": 5}, "no checkpoint of step 5 in"),
    ({"done": True, "task": "finetune"}, {}, "is a finetune run, not a pretraining run"),
    ({"done": True, "patch_size": 5}, {}, "its patch size 5 does not divide "
     "config.img_size=16"),
])
def test_init_from_errors(tmp_path, run, overrides, message):
    path = tmp_path / "run"
    if run is not None:
        fake_run(path, **run)
    config = tiny_classify_config(init_from=str(path), **overrides)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.check_init_from(config)
    assert message in str(error.value) and "config.init_from=" in str(error.value)
    assert "\n" not in str(error.value)
