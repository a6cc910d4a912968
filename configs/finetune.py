"""Fine-tuning on the bundled digits, from the quickstart's pretraining run.

Command (from the repository root, after the quickstart of the README):
  python -m mvmae_jax.main --config=configs/finetune.py --workdir=/tmp/mvmae_finetune \
      --config.init_from=/tmp/mvmae_quickstart
Without init_from the encoder is randomly initialised (the baseline of docs/results.md).
Hardware: 2 CPU cores, no accelerator. Time and result: docs/results.md (measured there).

MAE's recipe (configs/finetune_b.py) at the quickstart's scale: AdamW with layer-wise lr decay,
drop-path, mixup/cutmix, label smoothing, RandAugment and random erasing, global average pool
with its own LayerNorm. Differences, for 32x32 digits, a 4-block ViT and a CPU: batch 64, 20
epochs, base lr 1e-2 and layer decay 0.85 (a shallow model trained briefly); crops keep at least
half of the image and there are no flips (a mirrored digit is another glyph); lighter
regularisation: mixup 0.1 and no cutmix, RandAugment magnitude 5, random erasing 0.1 (MAE's
strengths held this small model back).
"""

from mvmae_jax.default_config import FINETUNE, get_classify_config


def get_config():
    config = get_classify_config(FINETUNE)
    config.img_size = 32
    config.batch_size = 64
    config.total_epochs = 20
    config.model.variant = ""
    config.model.patch_size = 4
    config.model.width = 96
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 384
    config.model.dtype = "float32"
    config.optim.base_lr = 1e-2
    config.optim.warmup_epochs = 1
    config.optim.layer_decay = 0.85
    config.augment.mixup = 0.1
    config.augment.cutmix = 0.0
    config.augment.randaugment_magnitude = 5.0
    config.augment.random_erasing = 0.1
    config.augment.crop_scale = (0.5, 1.0)
    config.augment.hflip = False
    config.dataset.name = "digits"
    config.dataset.eval_split = "test"
    config.input.eval_crop_fraction = 1.0
    config.input.shuffle_buffer = 2000
    config.evals.classification.every_steps = 110
    config.log_every_steps = 10
    config.checkpoint_every_steps = 110
    return config
