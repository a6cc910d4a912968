"""Checks a pretraining config before anything is compiled; errors name the field to change."""

from __future__ import annotations

import re

import ml_collections

from mvmae_jax import masking
from mvmae_jax.models import encoder_dims
from mvmae_jax.models.vit import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES


class ConfigError(ValueError):
    """The config cannot run; the message names the field and what to change."""


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
    """Raises ConfigError for a config that cannot run on this many devices and processes."""
    def need(condition: bool, message: str):
        if not condition:
            raise ConfigError(message)

    need(config.batch_size > 0, f"config.batch_size={config.batch_size} must be positive")
    need(config.batch_size % num_processes == 0,
         f"config.batch_size={config.batch_size} is not divisible by the {num_processes} "
         "processes; choose a multiple of the process count")
    need(config.batch_size % num_devices == 0,
         f"config.batch_size={config.batch_size} is not divisible by the {num_devices} devices; "
         "choose a multiple of the device count")
    micro = config.grad_accum_steps
    need(micro >= 1 and config.batch_size % (micro * num_devices) == 0,
         f"config.grad_accum_steps={micro}: each microbatch (batch_size / grad_accum_steps) "
         f"must be a multiple of the {num_devices} devices")
    try:
        dims = encoder_dims(config.model)
    except ValueError as error:
        raise ConfigError(f"config.model.variant: {error}") from error
    patch = dims["patch_size"]
    need(config.img_size % patch == 0,
         f"config.img_size={config.img_size} is not divisible by the patch size {patch} "
         "(config.model.variant / config.model.patch_size)")
    need(dims["width"] % dims["num_heads"] == 0,
         f"config.model: width {dims['width']} is not divisible by {dims['num_heads']} heads")
    validate_block_settings(config.model)
    num_patches = (config.img_size // patch) ** 2
    need(config.masking.strategy in ("random", "amt"),
         f"config.masking.strategy={config.masking.strategy!r} must be 'random' or 'amt'")
    need(config.amt.source in ("bank", "online"),
         f"config.amt.source={config.amt.source!r} must be 'bank' or 'online'")
    ratios = [("config.masking.mask_ratio + config.masking.throw_ratio",
               config.masking.mask_ratio, config.masking.throw_ratio)]
    if config.masking.strategy == "amt":
        ratios.append(("config.amt.warmup_mask_ratio", config.amt.warmup_mask_ratio, 0.0))
        need(config.amt.refresh_every >= 1,
             f"config.amt.refresh_every={config.amt.refresh_every} must be >= 1 (epochs)")
    for field, mask_ratio, throw_ratio in ratios:
        need(mask_ratio + throw_ratio < 1.0 and mask_ratio >= 0 and throw_ratio >= 0,
             f"{field} = {mask_ratio + throw_ratio:g} must be below 1 (some patch must stay "
             "visible)")
        try:
            masking.mask_counts(num_patches, mask_ratio, throw_ratio)
        except ValueError as error:
            raise ConfigError(f"{field}: {error}") from error
        need(int(num_patches * mask_ratio) >= 1,
             f"{field}: mask_ratio {mask_ratio} masks no patch out of {num_patches}")
    need(config.views.num in (1, 2), f"config.views.num={config.views.num} must be 1 or 2")
    need(config.views.num == 2 or config.contrastive.weight == 0,
         f"config.contrastive.weight={config.contrastive.weight} needs two views "
         "(config.views.num=2); set it to 0 for one view")
    validate_sharding(config.sharding)
    need(config.contrastive.pool in ("cls", "mean"),
         f"config.contrastive.pool={config.contrastive.pool!r} must be 'cls' or 'mean'")
    need(config.total_steps > 0 or config.total_epochs > 0,
         "config.total_epochs or config.total_steps must be positive")
    need(config.log_every_steps > 0, "config.log_every_steps must be positive")
    need(config.checkpoint_every_steps > 0, "config.checkpoint_every_steps must be positive")
    need(config.knn.feature in ("cls", "mean"),
         f"config.knn.feature={config.knn.feature!r} must be 'cls' or 'mean'")
    knn_batch = config.knn.batch_size or config.batch_size
    need(knn_batch % num_devices == 0 and knn_batch % num_processes == 0,
         f"config.knn.batch_size={knn_batch} is not divisible by the {num_devices} devices")
    need(config.knn.k >= 1, f"config.knn.k={config.knn.k} must be >= 1")


def validate_classify(config: ml_collections.ConfigDict, num_devices: int,
                      num_processes: int) -> None:
    """Raises ConfigError for a linear-probe or fine-tuning config that cannot run."""
    def need(condition: bool, message: str):
        if not condition:
            raise ConfigError(message)

    for field in ("batch_size", "eval_batch_size"):
        size = config[field] or config.batch_size
        need(size > 0 and size % num_devices == 0 and size % num_processes == 0,
             f"config.{field}={size} must be a positive multiple of the {num_devices} devices "
             f"and the {num_processes} processes")
    try:
        dims = encoder_dims(config.model)
    except ValueError as error:
        raise ConfigError(f"config.model.variant: {error}") from error
    need(config.img_size % dims["patch_size"] == 0,
         f"config.img_size={config.img_size} is not divisible by the patch size "
         f"{dims['patch_size']}")
    validate_block_settings(config.model)
    need(config.model.pool in ("cls", "mean", "gap"),
         f"config.model.pool={config.model.pool!r} must be 'cls', 'mean' or 'gap'")
    need(config.optim.name in ("lars", "adamw"),
         f"config.optim.name={config.optim.name!r} must be 'lars' or 'adamw'")
    need(0 < config.optim.layer_decay <= 1,
         f"config.optim.layer_decay={config.optim.layer_decay} must be in (0, 1]")
    aug = config.augment
    need(0 <= aug.random_erasing <= 1 and 0 <= aug.label_smoothing < 1
         and aug.mixup >= 0 and aug.cutmix >= 0 and 0 <= aug.switch_prob <= 1,
         "config.augment: random_erasing and switch_prob must be in [0, 1], label_smoothing in "
         "[0, 1), mixup and cutmix alphas >= 0")
    need(config.total_steps > 0 or config.total_epochs > 0,
         "config.total_epochs or config.total_steps must be positive")
    need(config.log_every_steps > 0, "config.log_every_steps must be positive")
    need(config.checkpoint_every_steps > 0, "config.checkpoint_every_steps must be positive")


def validate_block_settings(model: ml_collections.ConfigDict) -> None:
    """Checks how the blocks compute attention and what they keep for the backward pass."""
    if model.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"config.model.attention={model.attention!r} must be one of "
                          f"{ATTENTION_IMPLEMENTATIONS}")
    if model.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"config.model.remat_policy={model.remat_policy!r} must be one of "
                          f"{REMAT_POLICIES}")


def validate_sharding(sharding: ml_collections.ConfigDict) -> None:
    """Checks `config.sharding` (strategy and fsdp rules); the shapes are checked when the
    state is placed (`sharding.param_shardings`)."""
    if sharding.strategy not in ("data", "fsdp"):
        raise ConfigError(f"config.sharding.strategy={sharding.strategy!r} must be 'data' or "
                          "'fsdp'")
    if not isinstance(sharding.fsdp_min_size, int) or sharding.fsdp_min_size < 0:
        raise ConfigError(f"config.sharding.fsdp_min_size={sharding.fsdp_min_size!r} must be "
                          "an int >= 0")
    for rule in sharding.fsdp_rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2
                and isinstance(rule[0], str)):
            raise ConfigError(f"config.sharding.fsdp_rules: {rule!r} is not a (regex, how) "
                              "pair")
        pattern, how = rule
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"config.sharding.fsdp_rules: {pattern!r} is not a regular "
                              f"expression ({error})") from error
        if how not in ("largest", "replicate") and (
                isinstance(how, bool) or not isinstance(how, int)):
            raise ConfigError(f"config.sharding.fsdp_rules: {how!r} (for {pattern!r}) must be "
                              "'largest', 'replicate' or a dimension (int)")
