"""Quickstart: MV-MAE + AMT (bank) on the bundled digits with a tiny ViT, on a laptop CPU.

Command (from the repository root, in the virtualenv of the README):
  python -m mvmae_jax.main --config=configs/quickstart.py --workdir=/tmp/mvmae_quickstart
Hardware: 2 CPU cores, no accelerator. Time and result: see README (measured there).
It goes through all three stages of the method: 3 epochs of random-masking warm-up (mask 0.75),
the AMT bank built at epoch 3 and refreshed at epochs 7, 11 and 15, AMT masking to the end.
Data: scikit-learn's 1,437 training digits at 32x32 (prepared offline on first use).
Two settings differ from the ViT-B recipe because a digit is mostly blank paper: AMT throws 20%
of the patches, not 40% (the helpers AMT keeps visible are low-attention patches, here mostly
background, and with 40% thrown too little of the digit stays visible for the views to be
matched), and crops keep at least half of the image.
"""

from mvmae_jax.default_config import get_base_config


def get_config():
    config = get_base_config()
    config.img_size = 32
    config.batch_size = 64
    config.total_epochs = 16
    config.model.variant = ""
    config.model.patch_size = 4
    config.model.width = 96
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 384
    config.model.decoder_width = 64
    config.model.decoder_depth = 2
    config.model.decoder_heads = 4
    config.model.dtype = "float32"
    config.masking.throw_ratio = 0.2
    config.amt.start_epoch = 3
    config.amt.refresh_every = 4
    config.contrastive.hidden_dim = 256
    config.contrastive.output_dim = 64
    config.optim.base_lr = 1.5e-3
    config.optim.warmup_epochs = 1
    config.dataset.name = "digits"
    config.dataset.eval_split = "test"
    config.input.eval_crop_fraction = 1.0
    config.input.crop_scale = (0.5, 1.0)  # a fifth of a 32x32 digit is too little to match
    config.input.shuffle_buffer = 2000
    config.evals.knn.train_examples = 0  # all 1,437 training digits vote
    config.evals.knn.every_steps = 88  # every 4 epochs
    config.log_every_steps = 16  # 22 progress lines
    config.checkpoint_every_steps = 88  # with the kNN evaluations
    config.image_every_steps = 66
    return config
