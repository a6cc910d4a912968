"""Plain MAE (He et al. 2022): ViT-B/16, one view, random masking 0.75, no contrastive loss.

Command:
  python -m mvmae_jax.main --config=configs/mae_b.py --workdir=gs://BUCKET/mae_b \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
Hardware: TPU v4-64 or an 8-GPU node. Published result: 83.6 fine-tune top-1, 68.0 linear probe
after 1600 epochs (set --config.total_epochs=1600). Not reproduced here yet.
"""

from mvmae_jax.default_config import get_base_config


def get_config():
    config = get_base_config()
    config.views.num = 1
    config.contrastive.weight = 0.0
    config.masking.strategy = "random"
    config.masking.mask_ratio = 0.75
    config.masking.throw_ratio = 0.0
    return config
