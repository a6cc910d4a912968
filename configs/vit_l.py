"""MV-MAE + AMT (bank) pretraining of ViT-L/16 on ImageNet-1K, 1600 epochs.

Command (TPU v4-256 or 64 GPUs):
  python -m mvmae_jax.main --config=configs/vit_l.py --workdir=gs://BUCKET/mvmae_vit_l \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
Recipe as configs/vit_b.py with a ViT-L/16 encoder (1024 wide, 24 deep, 16 heads), 1600 epochs,
and FSDP (config.sharding): parameters and optimizer state split over all devices. On several
slices, add --config.sharding.fsdp_axis_size=<chips of one slice> (docs/benchmarks.md "Several
TPU slices"). No published MV-MAE number exists for this size, and none has been measured here.
Memory: no remat; --config.model.remat=True trades 22% more FLOPs for less memory
(docs/benchmarks.md "Remat").
"""

from mvmae_jax.default_config import get_base_config


def get_config():
    config = get_base_config()
    config.model.variant = "L/16"
    config.sharding.strategy = "fsdp"
    config.total_epochs = 1600
    return config
