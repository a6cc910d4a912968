"""Every field of a pretraining config, with the defaults of METHOD.md (MV-MAE + AMT, ViT-B/16).

The files in configs/ start from `get_base_config()` and change a few fields; every field is
listed here so that `--config.field=value` can override any of them and a misspelt field is an
error.
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.img_size = 224
    config.batch_size = 4096  # global, over all devices and hosts
    config.grad_accum_steps = 1
    config.total_epochs = 800
    config.total_steps = -1  # > 0 overrides total_epochs
    config.norm_pix_loss = True

    config.model = ml_collections.ConfigDict(dict(
        variant="B/16",  # or "" with width/depth/num_heads/mlp_dim/patch_size below
        width=0, depth=0, num_heads=0, mlp_dim=0, patch_size=0,  # 0: from the variant
        decoder_width=512, decoder_depth=8, decoder_heads=16,
        dtype="bfloat16",  # compute dtype; parameters are float32
        remat=False,
    ))
    config.views = ml_collections.ConfigDict(dict(num=2, same_crop=False))
    config.masking = ml_collections.ConfigDict(dict(
        strategy="amt",  # "random" (MAE) or "amt"
        mask_ratio=0.45, throw_ratio=0.40,
    ))
    config.amt = ml_collections.ConfigDict(dict(
        source="bank",  # "bank" (whole-image maps, refreshed) or "online" (this step's encoder)
        start_epoch=40, refresh_every=40, warmup_mask_ratio=0.75,
    ))
    config.contrastive = ml_collections.ConfigDict(dict(
        weight=1.0, temperature=0.2, pool="cls", hidden_dim=2048, output_dim=256, num_layers=3,
    ))
    config.optim = ml_collections.ConfigDict(dict(
        base_lr=1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05, warmup_epochs=40,
        grad_clip_norm=0.0,
    ))

    config.dataset = ml_collections.ConfigDict(dict(
        name="imagenet2012",  # a tfds builder, "imagefolder" or "digits"
        path="",  # imagefolder: the training folder
        data_dir="",  # tfds: where the data set is prepared (local or gs://)
        split="train",
        eval_split="validation",
        eval_path="",  # imagefolder: the evaluation folder
    ))
    config.input = ml_collections.ConfigDict(dict(
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True,
        eval_crop_fraction=0.875,  # resize to img_size / 0.875 then centre crop
        shuffle_buffer=10_000,  # tfds sources: records shuffled per host
        prefetch=2,  # global batches kept ahead on the devices
        threads=0,  # tf.data thread pool per host; 0: all cores
    ))

    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.image_every_steps = 5000  # image grids; 0: never
    config.image_examples = 4
    return config
