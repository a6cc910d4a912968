"""Checks a config before anything is compiled: every field's type, range and choices, for
pretraining, the linear probe and fine-tuning. Each error is one line that names the field and
what to change.

`validate` checks a whole config for a number of devices and processes; `check_field` a field
path given on the command line (a moved or misspelt field); `check_init_from` the pretraining
run a linear probe or fine-tuning starts from.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

from mvmae_jax import default_config, evaluators, masking
from mvmae_jax.errors import ConfigError
from mvmae_jax.models import encoder_dims
from mvmae_jax.models.classifier import POOLS
from mvmae_jax.models.vit import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

TASKS = ("pretrain", default_config.PROBE, default_config.FINETUNE)
DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("stop", "rollback")

# Fields of earlier versions: (old top-level name, its place now; {} is the evaluator's name).
_MOVED = {"knn": "evals.knn", "eval_every_steps": "evals.{}.every_steps",
          "eval_batch_size": "evals.{}.batch_size"}


# --- Field paths: unknown, moved and misspelt fields.

def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """The dotted path of every field and section of `config` ("model", "model.width", ...)."""
    paths = []
    for name, value in config.items():
        paths.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            paths.extend(field_paths(value, f"{prefix}{name}."))
    return paths


def check_field(config: ml_collections.ConfigDict, path: str) -> None:
    """Raises ConfigError unless `path` ("model.width") is a field of `config`: for a field
    that moved, its new place; otherwise the closest existing field."""
    paths = field_paths(config)
    if path in paths:
        return
    first, _, rest = path.partition(".")
    if first in _MOVED:
        evaluators = list(config.evals) or ["NAME"]
        new = _MOVED[first].format(evaluators[0]) + (f".{rest}" if rest else "")
        raise ConfigError(f"config.{path} moved to config.{new}")
    close = difflib.get_close_matches(path, paths, n=1, cutoff=0.6)
    hint = (f"did you mean config.{close[0]}?" if close
            else "mvmae_jax/default_config.py lists the fields")
    raise ConfigError(f"config.{path} is not a field; {hint}")


def _check_fields_known(config: ml_collections.ConfigDict,
                        reference: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every field of `config` exists in `reference` and has a type that fits its default's."""
    for name, value in config.items():
        path = prefix + name
        if name not in reference:
            if not prefix:
                check_field(reference, name)  # a moved field, or the closest of all fields
            _unknown(reference, name, path)
        default = reference[name]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config.{path}={value!r} must be a section (ConfigDict)")
            if path != "evals":  # evaluators: one section per name, checked by their type
                _check_fields_known(value, default, f"{path}.")
        else:
            _check_type(path, value, default)
    for name in reference:
        if name not in config and prefix + name != "evals":
            raise ConfigError(f"config.{prefix}{name} is missing; start the config from "
                              "mvmae_jax/default_config.py")


def _unknown(section: ml_collections.ConfigDict, name: str, path: str) -> None:
    close = difflib.get_close_matches(name, list(section), n=1, cutoff=0.6)
    parent = path.rpartition(".")[0]
    hint = f"did you mean config.{parent}.{close[0]}?" if close else f"fields: {sorted(section)}"
    raise ConfigError(f"config.{path} is not a field; {hint}")


def _check_type(path: str, value: Any, default: Any) -> None:
    """`value` has the kind of `default`: int, number (int or float), str, bool or sequence."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "True or False"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok, kind = ok and math.isfinite(value), "a finite number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    elif isinstance(default, (tuple, list)):
        ok, kind = isinstance(value, (tuple, list)), "a tuple"
    else:
        ok, kind = True, ""
    if not ok:
        raise ConfigError(f"config.{path}={value!r} must be {kind}")


# --- Small checks; each names the field.

def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _in_range(path: str, value: float, low: float | None = None, high: float | None = None,
              low_open: bool = False, high_open: bool = False) -> None:
    """low <= value <= high, with either end open; None: unbounded above."""
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    _need(above and below,
          f"config.{path}={value!r} must be {_interval(low, high, low_open, high_open)}")


def _choice(path: str, value: Any, choices: Sequence[Any]) -> None:
    _need(value in choices, f"config.{path}={value!r} must be one of {tuple(choices)}")


def _pair(path: str, pair: Sequence[float], low: float, high: float | None,
          low_open: bool) -> None:
    """A (low, high) range of two numbers, each in the interval, low <= high."""
    _need(len(pair) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in pair),
          f"config.{path}={tuple(pair)!r} must be two numbers (low, high)")
    interval = _interval(low, high, low_open, high_open=False)
    _need(all(value > low if low_open else value >= low for value in pair)
          and (high is None or all(value <= high for value in pair)),
          f"config.{path}={tuple(pair)!r}: both ends must be {interval}")
    _need(pair[0] <= pair[1], f"config.{path}={tuple(pair)!r}: low must not exceed high")


def _dotted(config: ml_collections.ConfigDict, path: str) -> Any:
    for name in path.split("."):
        config = config[name]
    return config


def _positive(config, *paths: str) -> None:
    for path in paths:
        _in_range(path, _dotted(config, path), 1)


def _non_negative(config, *paths: str) -> None:
    for path in paths:
        _in_range(path, _dotted(config, path), 0)


def _fraction(config, *paths: str, high_open: bool = True) -> None:
    for path in paths:
        _in_range(path, _dotted(config, path), 0, 1, high_open=high_open)


# --- The whole config.

def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
    """Raises ConfigError for a config (pretraining, linear probe or fine-tuning, by
    `config.task`) that cannot run on this many devices and processes."""
    _choice("task", config.task, TASKS)
    pretrain = config.task == "pretrain"
    reference = (default_config.get_base_config() if pretrain
                 else default_config.get_classify_config(config.task))
    _check_fields_known(config, reference)

    _non_negative(config, "seed")
    _positive(config, "img_size", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints")
    _need(config.total_steps > 0 or config.total_epochs > 0,
          f"config.total_epochs={config.total_epochs} or config.total_steps="
          f"{config.total_steps} must be positive")
    _check_batch("batch_size", config.batch_size, num_devices, num_processes)
    patch_size = _check_encoder(config)
    _check_block_settings(config.model)
    _check_data(config, pretrain)
    _check_evals(config, num_devices, num_processes)
    _choice("nonfinite.policy", config.nonfinite.policy, NONFINITE_POLICIES)
    _non_negative(config, "nonfinite.max_rollbacks")
    validate_sharding(config.sharding, num_devices)
    if pretrain:
        _check_pretraining(config, num_devices, patch_size)
    else:
        _check_classification(config)


def _check_batch(path: str, size: int, num_devices: int, num_processes: int) -> None:
    _in_range(path, size, 1)
    _need(size % num_processes == 0,
          f"config.{path}={size} is not divisible by the {num_processes} processes; choose a "
          "multiple of the process count")
    _need(size % num_devices == 0,
          f"config.{path}={size} is not divisible by the {num_devices} devices; choose a "
          "multiple of the device count")


def _check_encoder(config: ml_collections.ConfigDict) -> int:
    """Checks the encoder's size and returns its patch size."""
    _non_negative(config, *(f"model.{f}" for f in
                            ("width", "depth", "num_heads", "mlp_dim", "patch_size")))
    try:
        dims = encoder_dims(config.model)
    except (ValueError, KeyError) as error:
        raise ConfigError(f"config.model.variant={config.model.variant!r}: {error}") from error
    _check_width("model.width", dims["width"], "model.num_heads", dims["num_heads"])
    _need(dims["depth"] >= 1 and dims["mlp_dim"] >= 1 and dims["patch_size"] >= 1,
          f"config.model: depth, mlp_dim and patch_size must be >= 1 (from the variant "
          f"{config.model.variant!r} or set), got {dims}")
    patch = dims["patch_size"]
    _need(config.img_size % patch == 0,
          f"config.img_size={config.img_size} is not divisible by the patch size {patch} "
          "(config.model.variant / config.model.patch_size)")
    return patch


def _check_width(width_path: str, width: int, heads_path: str, heads: int) -> None:
    """Attention heads split the width evenly; the 2-D sin-cos position embedding needs a
    width divisible by 4."""
    _need(heads >= 1, f"config.{heads_path}={heads} must be >= 1")
    _need(width >= 1 and width % heads == 0,
          f"config.{heads_path}={heads} does not divide config.{width_path}={width}; choose a "
          "number of heads that divides the width")
    _need(width % 4 == 0,
          f"config.{width_path}={width} must be divisible by 4 (2-D sin-cos position embedding)")


def _check_block_settings(model: ml_collections.ConfigDict) -> None:
    """Dtype, attention implementation and what a rematerialised block keeps."""
    _choice("model.dtype", model.dtype, DTYPES)
    _choice("model.attention", model.attention, ATTENTION_IMPLEMENTATIONS)
    _choice("model.remat_policy", model.remat_policy, REMAT_POLICIES)


def _check_data(config: ml_collections.ConfigDict, pretrain: bool) -> None:
    _need(bool(config.dataset.name), "config.dataset.name is empty; name a tfds data set, "
          "'imagefolder' or 'digits'")
    _need(bool(config.dataset.split), "config.dataset.split is empty (e.g. 'train')")
    _need(config.dataset.name != "imagefolder" or bool(config.dataset.path),
          "config.dataset.path is empty; with config.dataset.name='imagefolder' it names the "
          "training folder")
    inp = config.input
    for path, values in (("input.mean", inp.mean), ("input.std", inp.std)):
        _need(len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for v in values),
              f"config.{path}={tuple(values)!r} must be 3 numbers (red, green, blue)")
    _need(all(v > 0 for v in inp.std), f"config.input.std={tuple(inp.std)!r} must be positive")
    _fraction(config, "input.eval_crop_fraction", high_open=False)
    _need(inp.eval_crop_fraction > 0,
          f"config.input.eval_crop_fraction={inp.eval_crop_fraction!r} must be in (0, 1]")
    _positive(config, "input.shuffle_buffer", "input.prefetch")
    _non_negative(config, "input.threads")
    crops = "input" if pretrain else "augment"
    _pair(f"{crops}.crop_scale", config[crops].crop_scale, 0, 1, low_open=True)
    _pair(f"{crops}.crop_ratio", config[crops].crop_ratio, 0, None, low_open=True)


def _check_evals(config: ml_collections.ConfigDict, num_devices: int,
                 num_processes: int) -> None:
    """Each section of `config.evals` is a registered evaluator type with valid fields (the
    built-in types' own fields too)."""
    types = tuple(sorted(evaluators.REGISTRY))
    templates = {"knn": default_config.get_base_config().evals.knn,
                 "classification": default_config.get_classify_config(
                     default_config.PROBE).evals.classification}
    for name, section in config.evals.items():
        path = f"evals.{name}"
        _need(isinstance(section, ml_collections.ConfigDict) and "type" in section,
              f"config.{path} must be a section with a `type` (one of {types})")
        _choice(f"{path}.type", section.type, types)
        if section.type in templates:
            _check_fields_known(section, templates[section.type], f"{path}.")
        _need("every_steps" in section, f"config.{path}.every_steps is missing (> 0: every "
              "that many steps and at the end; 0: only at the end; -1: never)")
        _in_range(f"{path}.every_steps", section.every_steps, -1)
        if "batch_size" in section:  # 0: config.batch_size
            _non_negative(config, f"{path}.batch_size")
            _check_batch(f"{path}.batch_size", section.batch_size or config.batch_size,
                         num_devices, num_processes)
        if section.type == "knn":
            _positive(config, f"{path}.k")
            _non_negative(config, f"{path}.train_examples")
            _in_range(f"{path}.temperature", section.temperature, 0, low_open=True)
            _choice(f"{path}.feature", section.feature, ("cls", "mean"))


def _check_pretraining(config: ml_collections.ConfigDict, num_devices: int,
                       patch_size: int) -> None:
    micro = config.grad_accum_steps
    _in_range("grad_accum_steps", micro, 1)
    _need(config.batch_size % (micro * num_devices) == 0,
          f"config.grad_accum_steps={micro}: each microbatch (batch_size / grad_accum_steps) "
          f"must be a multiple of the {num_devices} devices")

    model = config.model
    _positive(config, "model.decoder_depth")
    _check_width("model.decoder_width", model.decoder_width, "model.decoder_heads",
                 model.decoder_heads)

    _choice("views.num", config.views.num, (1, 2))
    con = config.contrastive
    _non_negative(config, "contrastive.weight")
    _in_range("contrastive.temperature", con.temperature, 0, low_open=True)
    _choice("contrastive.pool", con.pool, ("cls", "mean"))
    _positive(config, "contrastive.hidden_dim", "contrastive.output_dim",
              "contrastive.num_layers")
    _need(config.views.num == 2 or con.weight == 0,
          f"config.contrastive.weight={con.weight} needs two views (config.views.num=2); set "
          "it to 0 for one view")

    _non_negative(config, "optim.base_lr", "optim.weight_decay", "optim.warmup_epochs",
                  "optim.grad_clip_norm")
    _fraction(config, "optim.b1", "optim.b2")

    _choice("masking.strategy", config.masking.strategy, tuple(masking.STRATEGIES))
    _choice("amt.source", config.amt.source, ("bank", "online"))
    _non_negative(config, "amt.start_epoch")
    _positive(config, "amt.refresh_every")
    _fraction(config, "masking.mask_ratio", "masking.throw_ratio", "amt.warmup_mask_ratio")
    uses_attention = masking.STRATEGIES[config.masking.strategy].uses_attention
    num_patches = (config.img_size // patch_size) ** 2
    ratios = [("masking.mask_ratio", config.masking.mask_ratio, config.masking.throw_ratio)]
    if uses_attention and config.amt.start_epoch > 0:
        ratios.append(("amt.warmup_mask_ratio", config.amt.warmup_mask_ratio, 0.0))
    for path, mask_ratio, throw_ratio in ratios:
        _need(int(num_patches * mask_ratio) >= 1,
              f"config.{path}={mask_ratio} masks no patch out of {num_patches}; raise it")
        try:
            masking.mask_counts(num_patches, mask_ratio, throw_ratio)
        except ValueError as error:
            raise ConfigError(f"config.{path}: {error}") from error

    _non_negative(config, "image_every_steps")
    _positive(config, "image_examples")


def _check_classification(config: ml_collections.ConfigDict) -> None:
    _in_range("init_step", config.init_step, -1)
    _non_negative(config, "num_classes")
    model = config.model
    _choice("model.pool", model.pool, POOLS)
    _non_negative(config, "model.head_init_std")
    _fraction(config, "model.drop_path")

    opt = config.optim
    _choice("optim.name", opt.name, ("lars", "adamw"))
    _non_negative(config, "optim.base_lr", "optim.min_lr", "optim.weight_decay",
                  "optim.warmup_epochs", "optim.grad_clip_norm")
    _fraction(config, "optim.b1", "optim.b2", "optim.momentum")
    _in_range("optim.layer_decay", opt.layer_decay, 0, 1, low_open=True)

    _non_negative(config, "augment.randaugment_layers", "augment.randaugment_magnitude",
                  "augment.randaugment_std", "augment.mixup", "augment.cutmix")
    _fraction(config, "augment.random_erasing", "augment.switch_prob", high_open=False)
    _fraction(config, "augment.label_smoothing")


def validate_sharding(sharding: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks `config.sharding` (strategy, fsdp axis size and fsdp rules) for this many
    devices; the shapes are checked when the state is placed (`sharding.param_shardings`)."""
    _choice("sharding.strategy", sharding.strategy, ("data", "fsdp"))
    size = sharding.fsdp_axis_size
    _need(isinstance(size, int) and size >= 0,
          f"config.sharding.fsdp_axis_size={size!r} must be an int >= 0 (0: all devices)")
    _need(size in (0, 1) or sharding.strategy == "fsdp",
          f"config.sharding.fsdp_axis_size={size} splits parameters only under "
          "config.sharding.strategy='fsdp'; set it, or fsdp_axis_size=0")
    _need(num_devices % max(size, 1) == 0,
          f"config.sharding.fsdp_axis_size={size} does not divide the {num_devices} devices; "
          "choose a divisor of the device count (0: all devices)")
    _need(isinstance(sharding.fsdp_min_size, int) and sharding.fsdp_min_size >= 0,
          f"config.sharding.fsdp_min_size={sharding.fsdp_min_size!r} must be an int >= 0")
    for rule in sharding.fsdp_rules:
        _need(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str),
              f"config.sharding.fsdp_rules: {rule!r} is not a (regex, how) pair")
        pattern, how = rule
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"config.sharding.fsdp_rules: {pattern!r} is not a regular "
                              f"expression ({error})") from error
        _need(how in ("largest", "replicate") or (
            isinstance(how, int) and not isinstance(how, bool)),
            f"config.sharding.fsdp_rules: {how!r} (for {pattern!r}) must be 'largest', "
            "'replicate' or a dimension (int)")


# --- The pretraining run a linear probe or fine-tuning starts from.

def check_init_from(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError unless `config.init_from` is empty (a random encoder) or a
    pretraining run of this code whose encoder fits this config: a workdir with a checkpoint
    of `config.init_step` (-1: a finished run, its done.json written), or one checkpoint
    directory WORKDIR/checkpoints/STEP."""
    if not config.init_from:
        return
    field = f"config.init_from={config.init_from!r}"
    path = epath.Path(config.init_from)
    _need(path.exists(), f"{field} does not exist; name a pretraining workdir")
    step = config.init_step
    if (path / "state").exists():  # one checkpoint directory
        _need(path.name.isdigit(), f"{field} holds a checkpoint but is not named by its step")
        _need(step < 0 or int(path.name) == step,
              f"{field} is the checkpoint of step {path.name}, not of config.init_step={step}")
        workdir = path.parent.parent
    else:
        workdir = path
        directory = path / "checkpoints"
        steps = sorted(int(child.name) for child in
                       (directory.iterdir() if directory.is_dir() else [])
                       if child.name.isdigit() and (child / "state").exists())
        _need(bool(steps), f"{field} holds no checkpoint (no {directory}/STEP); name a "
              "pretraining workdir")
        if step >= 0:
            _need(step in steps, f"{field} has no checkpoint of config.init_step={step}; it "
                  f"has {steps}")
        else:
            _need((workdir / "done.json").exists(),
                  f"{field} has not finished (no done.json); pass --config.init_step=N with "
                  f"one of its checkpoints {steps} to start from an unfinished run")
    config_file = workdir / "config.json"
    _need(config_file.exists(), f"{field}: {config_file} is missing; name a workdir of "
          "python -m mvmae_jax.main")
    try:
        pretrained = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    except ValueError as error:
        raise ConfigError(f"{field}: {config_file} is not readable JSON ({error})") from error
    task = pretrained.get("task", "pretrain")
    _need(task == "pretrain", f"{field} is a {task} run, not a pretraining run")
    try:
        dims = encoder_dims(pretrained.model)
    except (ValueError, KeyError, AttributeError) as error:
        raise ConfigError(f"{field}: its config.json has no encoder size ({error})") from error
    _need(config.img_size % dims["patch_size"] == 0,
          f"{field}: its patch size {dims['patch_size']} does not divide "
          f"config.img_size={config.img_size}; choose an image size that it divides")
