"""MV-MAE + AMT (bank) pretraining of ViT-H/14 on ImageNet-1K, 1600 epochs.

Command (TPU v4-256 or more):
  python -m mvmae_jax.main --config=configs/vit_h.py --workdir=gs://BUCKET/mvmae_vit_h \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
Recipe as configs/vit_b.py with a ViT-H/14 encoder (1280 wide, 32 deep, 16 heads; 256 patches
at 224), 1600 epochs, and FSDP (config.sharding): parameters and optimizer state are split
over all devices, each kernel along its largest dimension that divides (tensors under 16k
elements stay whole), and XLA gathers them where they are used. On several slices, add
--config.sharding.fsdp_axis_size=<chips of one slice>: FSDP inside each slice, data
parallelism across (docs/benchmarks.md "Several TPU slices"). No published MV-MAE number
exists for ViT-H and none has been measured here yet.
Memory: no remat. At 32 examples per chip (v4-256: 128 chips), the TPU compiler puts the step
at 9.6 GiB per v4 chip (32 GiB); block remat (--config.model.remat=True) would cut that to
3.1 GiB for 22% more FLOPs: for per-chip batches that do not fit without it
(benchmarks/step_time.py --mode=memory, docs/benchmarks.md "Remat").
"""

from mvmae_jax.default_config import get_base_config


def get_config():
    config = get_base_config()
    config.model.variant = "H/14"
    config.sharding.strategy = "fsdp"
    config.total_epochs = 1600
    return config
