"""The config checks that span sections, and `check_init_from`; each error is one line naming
the field (each component checks its own section)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import ml_collections
from etils import epath

from mvmae_jax import checkpointing, data, default_config, evaluators, masking, models
from mvmae_jax.errors import ConfigError, in_range, interval, need, one_of

TASKS = ("pretrain", default_config.PROBE, default_config.FINETUNE)


def _at_least(config: ml_collections.ConfigDict, low: int, *paths: str) -> None:
    for path in paths:
        in_range(path, config[path], low)


def _fractions(config: ml_collections.ConfigDict, *paths: str, high_open: bool = True) -> None:
    for path in paths:
        in_range(path, config[path], 0, 1, high_open=high_open)


def _pair(path: str, pair: Sequence[float], low: float, high: float | None) -> None:
    """A (low, high) range of two numbers, both in the interval (low, high], low <= high."""
    need(len(pair) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                for v in pair),
         f"config.{path}={tuple(pair)!r} must be two numbers (low, high)")
    need(all(value > low and (high is None or value <= high) for value in pair),
         f"config.{path}={tuple(pair)!r}: both ends must be {interval(low, high, True, False)}")
    need(pair[0] <= pair[1], f"config.{path}={tuple(pair)!r}: low must not exceed high")


def _check_batch(path: str, size: int, num_devices: int, num_processes: int) -> None:
    in_range(path, size, 1)
    need(size % num_processes == 0, f"config.{path}={size} is not divisible by the "
         f"{num_processes} processes; choose a multiple of the process count")
    need(size % num_devices == 0, f"config.{path}={size} is not divisible by the {num_devices} "
         "devices; choose a multiple of the device count")


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
    """Raises ConfigError for a config (pretraining, linear probe or fine-tuning, by
    `config.task`) that cannot run on this many devices and processes."""
    one_of("task", config.task, TASKS)
    _at_least(config, 0, "seed", "nonfinite.max_rollbacks")
    _at_least(config, 1, "img_size", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints")
    need(config.total_steps > 0 or config.total_epochs > 0,
         f"config.total_epochs={config.total_epochs} or config.total_steps="
         f"{config.total_steps} must be positive")
    _check_batch("batch_size", config.batch_size, num_devices, num_processes)
    patch = models.check_config(config.model)["patch_size"]
    need(config.img_size % patch == 0,
         f"config.img_size={config.img_size} is not divisible by the patch size {patch} "
         "(config.model.variant / config.model.patch_size)")
    data.check_config(config.dataset)
    _check_input(config, "input" if config.task == "pretrain" else "augment")
    for name, section in config.evals.items():
        evaluators.check_config(f"evals.{name}", section)
        if "batch_size" in section:
            _check_batch(f"evals.{name}.batch_size", section.batch_size or config.batch_size,
                         num_devices, num_processes)
    one_of("nonfinite.policy", config.nonfinite.policy, ("stop", "rollback"))
    validate_sharding(config.sharding, num_devices)
    if config.task == "pretrain":
        _check_pretraining(config, num_devices, (config.img_size // patch) ** 2)
    else:
        _check_classification(config)


def _check_input(config: ml_collections.ConfigDict, crops: str) -> None:
    """`config.input`, and the crops of `config.<crops>`."""
    inp = config.input
    for path, values in (("input.mean", inp.mean), ("input.std", inp.std)):
        need(len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                      for v in values),
             f"config.{path}={tuple(values)!r} must be 3 numbers (red, green, blue)")
    need(all(v > 0 for v in inp.std), f"config.input.std={tuple(inp.std)!r} must be positive")
    in_range("input.eval_crop_fraction", inp.eval_crop_fraction, 0, 1, low_open=True)
    _at_least(config, 1, "input.shuffle_buffer", "input.prefetch")
    _at_least(config, 0, "input.threads")
    _pair(f"{crops}.crop_scale", config[crops].crop_scale, 0, 1)
    _pair(f"{crops}.crop_ratio", config[crops].crop_ratio, 0, None)


def _check_pretraining(config: ml_collections.ConfigDict, num_devices: int,
                       num_patches: int) -> None:
    micro = config.grad_accum_steps
    in_range("grad_accum_steps", micro, 1)
    need(config.batch_size % (micro * num_devices) == 0,
         f"config.grad_accum_steps={micro}: each microbatch (batch_size / grad_accum_steps) "
         f"must be a multiple of the {num_devices} devices")
    one_of("views.num", config.views.num, (1, 2))
    con = config.contrastive
    _at_least(config, 0, "contrastive.weight", "optim.base_lr", "optim.weight_decay",
              "optim.warmup_epochs", "optim.grad_clip_norm", "image_every_steps")
    _at_least(config, 1, "contrastive.hidden_dim", "contrastive.output_dim",
              "contrastive.num_layers", "image_examples")
    in_range("contrastive.temperature", con.temperature, 0, low_open=True)
    one_of("contrastive.pool", con.pool, ("cls", "mean"))
    need(config.views.num == 2 or con.weight == 0,
         f"config.contrastive.weight={con.weight} needs two views (config.views.num=2); set "
         "it to 0 for one view")
    _fractions(config, "optim.b1", "optim.b2")
    masking.check_config(config.masking, config.amt, num_patches)


def _check_classification(config: ml_collections.ConfigDict) -> None:
    in_range("init_step", config.init_step, -1)
    one_of("optim.name", config.optim.name, ("lars", "adamw"))
    _at_least(config, 0, "num_classes", "optim.base_lr", "optim.min_lr", "optim.weight_decay",
              "optim.warmup_epochs", "optim.grad_clip_norm", "augment.randaugment_layers",
              "augment.randaugment_magnitude", "augment.randaugment_std", "augment.mixup",
              "augment.cutmix")
    _fractions(config, "optim.b1", "optim.b2", "optim.momentum", "augment.label_smoothing")
    in_range("optim.layer_decay", config.optim.layer_decay, 0, 1, low_open=True)
    _fractions(config, "augment.random_erasing", "augment.switch_prob", high_open=False)


def validate_sharding(sharding: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks `config.sharding` for this many devices (the rules meet the shapes at placement)."""
    one_of("sharding.strategy", sharding.strategy, ("data", "fsdp"))
    size = sharding.fsdp_axis_size
    in_range("sharding.fsdp_axis_size", size, 0)
    in_range("sharding.fsdp_min_size", sharding.fsdp_min_size, 0)
    need(size in (0, 1) or sharding.strategy == "fsdp",
         f"config.sharding.fsdp_axis_size={size} splits parameters only under "
         "config.sharding.strategy='fsdp'; set it, or fsdp_axis_size=0")
    need(num_devices % max(size, 1) == 0,
         f"config.sharding.fsdp_axis_size={size} does not divide the {num_devices} devices; "
         "choose a divisor of the device count (0: all devices)")
    for rule in sharding.fsdp_rules:
        need(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
             and (rule[1] in ("largest", "replicate") or type(rule[1]) is int),
             f"config.sharding.fsdp_rules: {rule!r} is not a (regex, 'largest' | 'replicate' | "
             "dimension) pair")
        try:
            re.compile(rule[0])
        except re.error as error:
            raise ConfigError(f"config.sharding.fsdp_rules: {rule[0]!r} is not a regular "
                              f"expression ({error})") from error


def check_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The pretraining run's config (None when `config.init_from` is empty: a random encoder);
    ConfigError unless init_from is a pretraining workdir or checkpoint directory whose
    checkpoint of `config.init_step` (-1: the last of a finished run) fits this config."""
    if not config.init_from:
        return None
    field = f"config.init_from={config.init_from!r}"
    path = epath.Path(config.init_from)
    need(path.exists(), f"{field} does not exist; name a pretraining workdir")
    step = config.init_step if config.init_step >= 0 else None
    try:
        pretrained = checkpointing.load_config(config.init_from, step)[0]
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{field}: {error}") from error
    need(step is not None or (path / "done.json").exists() or (path / "state").exists(),
         f"{field} has not finished (no done.json); pass --config.init_step=N with one of its "
         "checkpoints to start from an unfinished run")
    task = pretrained.get("task", "pretrain")
    need(task == "pretrain", f"{field} is a {task} run, not a pretraining run")
    try:
        patch = models.encoder_dims(pretrained.model)["patch_size"]
    except (ValueError, KeyError, AttributeError) as error:
        raise ConfigError(f"{field}: its config.json has no encoder size ({error})") from error
    need(config.img_size % patch == 0, f"{field}: its patch size {patch} does not divide "
         f"config.img_size={config.img_size}; choose an image size that it divides")
    return pretrained
