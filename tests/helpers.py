"""Tiny configs and synthetic batches shared by the tests."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections
import numpy as np

from mvmae_jax.default_config import get_base_config


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The base config shrunk: 16x16 images, 4x4 patches (N = 16), width 32, MV-MAE + AMT(bank).

    `overrides` take dotted keys, e.g. tiny_config(**{"masking.throw_ratio": 0.0}).
    """
    config = get_base_config()
    config.img_size = 16
    config.batch_size = 8
    config.model.update(variant="", patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                        decoder_width=32, decoder_depth=1, decoder_heads=2, dtype="float32")
    config.masking.update(mask_ratio=0.5, throw_ratio=0.25)
    config.amt.update(start_epoch=1, refresh_every=1)
    config.contrastive.update(hidden_dim=64, output_dim=32)
    config.optim.warmup_epochs = 1
    config.dataset.update(name="digits", split="train", eval_split="test")
    config.input.update(eval_crop_fraction=1.0, shuffle_buffer=1000)
    return set_dotted(config, overrides)


def load_config(path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (configs/*.py)."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def set_dotted(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys ("masking.throw_ratio") of `config` in place; returns it."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def smooth_images(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Random low-frequency RGB images (sums of a few 2-D cosines), roughly unit scale."""
    coords = np.arange(size, dtype=np.float32) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    images = np.zeros((count, size, size, 3), np.float32)
    for _ in range(3):
        fy, fx = rng.integers(0, 3, (2, count, 1, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (count, 1, 1, 3))
        amp = rng.normal(size=(count, 1, 1, 3))
        images += amp * np.cos(2 * np.pi * (fy * y[None, ..., None] + fx * x[None, ..., None])
                               + phase)
    return images.astype(np.float32)


def synthetic_batch(rng: np.random.Generator, batch_size: int, size: int, num_views: int = 2,
                    num_examples: int | None = None) -> dict[str, np.ndarray]:
    """A pretraining batch whose uint8 views (as they leave the host) are noisy, possibly
    flipped copies of one image."""
    images = smooth_images(rng, batch_size, size)
    flips = rng.integers(0, 2, (batch_size, num_views)).astype(np.int32)
    views = np.stack([np.where(flips[:, v, None, None, None], images[:, :, ::-1], images)
                      for v in range(num_views)], axis=1)
    views = views + 0.05 * rng.normal(size=views.shape).astype(np.float32)
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (batch_size, num_views, 1))
    high = num_examples if num_examples is not None else batch_size
    index = rng.choice(high, batch_size, replace=False).astype(np.int32)
    return dict(views=to_pixels(views), boxes=boxes, flips=flips, index=index)


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Roughly unit-scale float images → uint8 pixels around mid-grey."""
    return np.clip(np.round(128 + 50 * images), 0, 255).astype(np.uint8)


def compile_steps(task, config, mesh, batch) -> list:
    """Every phase's train step of `task`, compiled on abstract state and `batch` (shapes)."""
    import jax

    from mvmae_jax import optim
    from mvmae_jax import train_step as ts

    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, 1, 10)
    optimizer = task.optimizer(schedule)
    abstract = jax.eval_shape(lambda: ts.create_train_state(task, optimizer, mesh, config))
    state_sharding = ts.state_shardings(abstract, mesh, config)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, state_sharding)
    return [ts.make_train_step(task, optimizer, schedule, mesh, state_sharding, phase)
            .lower(abstract, batch).compile() for phase in task.phases]
