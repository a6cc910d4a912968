"""Every config field with its default (pretraining, linear probe, fine-tuning); configs/
change a few fields. The configs are locked: only `evals` takes new sections."""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROBE = "linear_probe"
FINETUNE = "finetune"


def _model(**fields) -> ml_collections.ConfigDict:
    """The encoder's size and how every block computes, with the task's `fields`."""
    return ml_collections.ConfigDict(dict(
        variant="B/16",  # or "" with width/depth/num_heads/mlp_dim/patch_size below
        width=0, depth=0, num_heads=0, mlp_dim=0, patch_size=0,  # 0: from the variant
        dtype="bfloat16",  # compute dtype; parameters are float32
        remat=False,  # recompute each block in the backward pass
        remat_policy="nothing_saveable",  # what a recomputed block keeps: see models/vit.py
        # "auto": cuDNN's flash kernel on NVIDIA GPUs in bfloat16/float16, else XLA; "einsum"
        # or "fused" (jax.nn.dot_product_attention) force one; see models/vit.py.
        attention="auto",
        **fields))


def _input(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        mean=IMAGENET_MEAN, std=IMAGENET_STD,  # classifiers: replaced by init_from's
        eval_crop_fraction=0.875,  # resize to img_size / 0.875 then centre crop
        shuffle_buffer=10_000,  # tfds sources: records shuffled per host
        prefetch=2,  # global batches kept ahead on the devices
        threads=0,  # tf.data thread pool per host; 0: all cores
        **fields))


def _finish(config: ml_collections.ConfigDict, evals: dict) -> ml_collections.ConfigDict:
    """Adds the sections every task has, and locks `config` (`evals` takes new sections)."""
    config.dataset = ml_collections.ConfigDict(dict(
        name="imagenet2012",  # a tfds builder, "imagefolder" or "digits"
        path="",  # imagefolder: the training folder
        data_dir="",  # tfds: where the data set is prepared (local or gs://)
        split="train",
        eval_split="validation",
        eval_path="",  # imagefolder: the evaluation folder
    ))
    config.sharding = ml_collections.ConfigDict(dict(
        # "data": parameters and optimizer state replicated on every device; "fsdp": both
        # split over the devices (ViT-L/H), each parameter as the first matching rule says.
        strategy="data",
        # fsdp: the devices that share one copy of the parameters (the mesh's `fsdp` axis; 0:
        # all), copies along `data`; e.g. the chips of one TPU slice.
        fsdp_axis_size=0,
        # (regex over the "/"-joined parameter path, how): how is "largest" (the largest dimension
        # divisible by fsdp_axis_size), a dimension (int) or "replicate". No match: replicated.
        fsdp_rules=((".*", "largest"),),
        fsdp_min_size=2**14,  # parameters with fewer elements stay replicated under fsdp
    ))
    # Evaluators, each run every `every_steps` steps and at the end (0: only at the end;
    # -1: never); `type` says which evaluator a section configures.
    config.evals = ml_collections.ConfigDict(evals)
    # A step with a non-finite loss, gradient norm or parameter: "stop", or "rollback" to the
    # last good checkpoint, skipping the batches that led there (at most max_rollbacks times).
    config.nonfinite = ml_collections.ConfigDict(dict(policy="stop", max_rollbacks=3))
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.lock()
    config.evals.unlock()
    for section in config.evals.values():
        section.lock()
    return config


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "pretrain"
    config.seed = 0
    config.img_size = 224
    config.batch_size = 4096  # global, over all devices and hosts
    config.grad_accum_steps = 1
    config.total_epochs = 800
    config.total_steps = -1  # > 0 overrides total_epochs
    config.norm_pix_loss = True
    config.image_every_steps = 5000  # image grids; 0: never
    config.image_examples = 4

    config.model = _model(decoder_width=512, decoder_depth=8, decoder_heads=16)
    config.views = ml_collections.ConfigDict(dict(num=2, same_crop=False))
    config.masking = ml_collections.ConfigDict(dict(
        strategy="amt",  # "random" (MAE) or "amt"
        mask_ratio=0.45, throw_ratio=0.40,
    ))
    config.amt = ml_collections.ConfigDict(dict(
        source="bank",  # "bank" (whole-image maps, refreshed) or "online" (this step's encoder)
        start_epoch=40, refresh_every=40, warmup_mask_ratio=0.75,
    ))
    config.contrastive = ml_collections.ConfigDict(dict(
        weight=1.0, temperature=0.2, pool="cls", hidden_dim=2048, output_dim=256, num_layers=3,
    ))
    config.optim = ml_collections.ConfigDict(dict(
        base_lr=1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05, warmup_epochs=40,
        grad_clip_norm=0.0,
    ))
    config.input = _input(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True)
    return _finish(config, {"knn": ml_collections.ConfigDict(dict(
        # kNN classification of the eval split by frozen encoder features of labelled
        # training images (docs/method.md#evaluation-protocols); needs labels in both splits.
        type="knn", every_steps=25_000,
        train_examples=50_000,  # labelled train images whose features vote; 0: the whole split
        k=20, temperature=0.07,
        feature="cls",  # "cls" or "mean" (of the patch tokens), after the final norm
        batch_size=0,  # 0: config.batch_size
    ))})


def get_classify_config(task: str) -> ml_collections.ConfigDict:
    """A linear-probe or fine-tuning config. With `init_from` set, the encoder size and the
    input normalisation are the pretraining run's; without, a random encoder of `model`."""
    if task not in (PROBE, FINETUNE):
        raise ValueError(f"task must be {PROBE!r} or {FINETUNE!r}, got {task!r}")
    probe = task == PROBE
    config = ml_collections.ConfigDict()
    config.task = task
    config.seed = 0
    config.init_from = ""  # pretraining workdir or checkpoint directory; "": random encoder
    config.init_step = -1  # -1: the last checkpoint of init_from, a finished run (done.json)
    config.img_size = 224
    config.batch_size = 16384 if probe else 1024  # global
    config.total_epochs = 90 if probe else 100
    config.total_steps = -1  # > 0 overrides total_epochs
    config.num_classes = 0  # 0: the data set's

    config.model = _model(
        pool="cls" if probe else "gap",  # "cls", "mean" or "gap" (see models/classifier.py)
        head_init_std=0.01 if probe else 2e-5,
        drop_path=0.0 if probe else 0.1,
    )
    config.optim = ml_collections.ConfigDict(dict(
        name="lars" if probe else "adamw",
        base_lr=0.1 if probe else 5e-4,  # peak lr = base_lr * batch_size / 256
        min_lr=0.0 if probe else 1e-6,
        warmup_epochs=10 if probe else 5,
        weight_decay=0.0 if probe else 0.05,
        b1=0.9, b2=0.999,  # adamw
        momentum=0.9,  # lars
        layer_decay=1.0 if probe else 0.65,  # lr x layer_decay^(depth + 1 - layer)
        grad_clip_norm=0.0,
    ))
    config.augment = ml_collections.ConfigDict(dict(
        crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True,
        randaugment_layers=0 if probe else 2,  # 0: off
        randaugment_magnitude=9.0, randaugment_std=0.5,
        random_erasing=0.0 if probe else 0.25,
        mixup=0.0 if probe else 0.8, cutmix=0.0 if probe else 1.0, switch_prob=0.5,
        label_smoothing=0.0 if probe else 0.1,
    ))
    config.input = _input()
    return _finish(config, {"classification": ml_collections.ConfigDict(dict(
        # Top-1, top-5 and loss on the eval split.
        type="classification", every_steps=1000,
        batch_size=0,  # 0: config.batch_size
    ))})
