"""Fine-tuning of a ViT-B/16 pretraining run on ImageNet-1K: MAE's recipe.

Command (TPU v4-64 pod slice or a GPU node; the same as pretraining):
  python -m mvmae_jax.main --config=configs/finetune_b.py --workdir=gs://BUCKET/finetune_b \
      --config.init_from=gs://BUCKET/mvmae_vit_b \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Recipe (docs/method.md): global average pool of the patch tokens with its own LayerNorm,
AdamW (0.9, 0.999, weight decay 0.05) with layer-wise lr decay 0.65, base lr 5e-4 (peak 2e-3 at
batch 1024), 5 warm-up epochs then cosine to 1e-6, 100 epochs, drop-path 0.1, mixup 0.8, cutmix
1.0 (one of the two per batch, even odds), label smoothing 0.1, RandAugment(2 ops, magnitude 9,
std 0.5), random erasing 0.25; evaluation on the 224 centre crop of the image resized to 256.
Expected result (published, MV-MAE 800 epochs, ViT-B/16): 83.2 top-1
(docs/method.md#published-results).
Not reproduced here: this code base has not run it, and no time has been measured for it.
"""

from mvmae_jax.default_config import FINETUNE, get_classify_config


def get_config():
    return get_classify_config(FINETUNE)
