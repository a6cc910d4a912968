"""Linear probe on the bundled digits, from the quickstart's pretraining run.

Command (from the repository root, after the quickstart of the README):
  python -m mvmae_jax.main --config=configs/linear_probe.py --workdir=/tmp/mvmae_probe \
      --config.init_from=/tmp/mvmae_quickstart
Without init_from the encoder is randomly initialised (the baseline of docs/results.md).
Hardware: 2 CPU cores, no accelerator. Time and result: docs/results.md (measured there).

MAE's protocol (configs/linear_probe_b.py) at the quickstart's scale: the frozen encoder's
[CLS] token after the final norm, BatchNorm without affine parameters, a linear head, LARS
without weight decay, warm-up then cosine. Differences, for 32x32 digits on a CPU: batch 128,
not 16384; 30 epochs; crops keep at least half of the image, and no flips (a mirrored digit
is another glyph).
"""

from mvmae_jax.default_config import PROBE, get_classify_config


def get_config():
    config = get_classify_config(PROBE)
    config.img_size = 32
    config.batch_size = 128
    config.total_epochs = 30
    config.model.variant = ""
    config.model.patch_size = 4
    config.model.width = 96
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 384
    config.model.dtype = "float32"
    config.optim.base_lr = 20.0
    config.optim.warmup_epochs = 3
    config.augment.crop_scale = (0.5, 1.0)
    config.augment.hflip = False
    config.dataset.name = "digits"
    config.dataset.eval_split = "test"
    config.input.eval_crop_fraction = 1.0
    config.input.shuffle_buffer = 2000
    config.evals.classification.every_steps = 100
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    return config
