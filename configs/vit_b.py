"""MV-MAE + AMT (bank) pretraining of ViT-B/16 on ImageNet-1K: the system as specified.

Command (TPU v4-64 pod slice; the same on an 8-GPU node or more):
  python -m mvmae_jax.main --config=configs/vit_b.py --workdir=gs://BUCKET/mvmae_vit_b \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Data: tfds `imagenet2012`, prepared once with
  tfds build imagenet2012 --data_dir=gs://BUCKET/tensorflow_datasets --manual_dir=DIR
Recipe (docs/method.md): 800 epochs, global batch 4096, AdamW lr 1.5e-4 * 4096 / 256, 40 warm-up
epochs; random masking at 0.75 for 40 epochs, then AMT with mask 0.45 / throw 0.40 and a bank
refreshed every 40 epochs; contrastive weight 1, temperature 0.2.
Expected result (published, MV-MAE 800 epochs): 83.2 fine-tune top-1. Not reproduced here: this
code base has not yet run it, and no time has been measured for it (see docs/benchmarks.md for
what has been).
"""

from mvmae_jax.default_config import get_base_config


def get_config():
    return get_base_config()
