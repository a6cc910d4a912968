"""Linear probe of a ViT-B/16 pretraining run on ImageNet-1K: MAE's protocol.

Command (TPU v4-64 pod slice or a GPU node; the same as pretraining):
  python -m mvmae_jax.main --config=configs/linear_probe_b.py --workdir=gs://BUCKET/probe_b \
      --config.init_from=gs://BUCKET/mvmae_vit_b \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Recipe (docs/method.md): the frozen encoder's [CLS] token after the final norm,
BatchNorm without affine parameters, a linear head initialised with std 0.01, LARS (momentum
0.9, trust coefficient 0.001, no weight decay), global batch 16384, base lr 0.1 (peak 6.4),
10 warm-up epochs then cosine, 90 epochs; random resized crops (scale 0.08-1) and flips;
evaluation on the 224 centre crop of the image resized to 256.
Expected result (published, ViT-B/16, docs/method.md#published-results): MV-MAE 1600 epochs 76.7,
MAE 68.0. Not reproduced here: this code base has not run it, and no time has been measured for it.
"""

from mvmae_jax.default_config import PROBE, get_classify_config


def get_config():
    return get_classify_config(PROBE)
