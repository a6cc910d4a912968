"""MV-MAE + AMT (bank) pretraining of ViT-S/16 on ImageNet-1K.

Command:
  python -m mvmae_jax.main --config=configs/vit_s.py --workdir=gs://BUCKET/mvmae_vit_s \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
Hardware: a TPU v4-32 slice or an 8-GPU node. Recipe as configs/vit_b.py with a ViT-S/16
encoder (384 wide, 12 deep, 6 heads). No published MV-MAE number exists for ViT-S and none has
been measured here yet.
"""

from mvmae_jax.default_config import get_base_config


def get_config():
    config = get_base_config()
    config.model.variant = "S/16"
    return config
