"""An independent PyTorch implementation of the pretraining objective, for throughput
comparisons: what a PyTorch user would otherwise run.

MAE's published design built from timm `Block`s: patchify with a strided convolution and fixed
2-D sin-cos position embeddings, random masking by sorting per-row noise, the encoder on [CLS] +
the visible tokens, a decoder with a mask token at each masked position, norm-pix MSE on the
masked patches. With two views (MV-MAE), a projection head on the [CLS] feature and symmetric
InfoNCE between the views. Throwing (AMT) removes tokens: the encoder sees N - masked - thrown
tokens, the decoder the visible and masked ones; the patches are drawn in a random order here
(this reference has no attention bank), so a run with throwing has AMT's token counts and costs.
AdamW (MAE's betas and weight decay, none on biases, norms and tokens); eager by default,
`--compile` for torch.compile; bfloat16 autocast on CUDA when the dtype is bfloat16.

The sizes come from the same configs as the JAX side (`--config`, `--config.field=value`):

  python benchmarks/pytorch_reference.py --json=/tmp/torch.json                 # configs/vit_b.py
  python benchmarks/pytorch_reference.py --compile --dtype=auto --json=F         # CUDA: bf16
  python benchmarks/pytorch_reference.py --tiny --steps=2 --json=/tmp/t.json     # CI smoke
"""

from __future__ import annotations

# torch (and timm's torchvision) first: torchvision's native extensions crash when they load
# after TensorFlow's, should anything import that.
import torch  # isort: skip
import timm  # isort: skip  # noqa: F401

import functools
import gc
import json
import math
import os
import platform
import time
from typing import Any

import bench_lib
import ml_collections
import numpy as np
import torch.nn.functional as F
from absl import app, flags
from ml_collections import config_flags
from timm.models.vision_transformer import Block
from torch import nn

from mvmae_jax import hardware

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined on demand, so that tests can import this module beside
    others that define flags of the same names)."""
    config_flags.DEFINE_config_file("config", bench_lib.DEFAULT_CONFIG,
                                    "Pretraining config file (see configs/).", lock_config=True)
    flags.DEFINE_string("json", "", "Where to write the results (they are printed too).")
    flags.DEFINE_bool("tiny", False, "A tiny model (16x16 images, width 32), for the smoke test.")
    flags.DEFINE_string("phase", "", "'random' or 'amt' (token counts of that phase); default: "
                        "'amt' for AMT configs.")
    flags.DEFINE_string("dtype", "", "'' keeps config.model.dtype; 'auto' is bfloat16 on CUDA and "
                        "float32 on the CPU. bfloat16 runs under autocast.")
    flags.DEFINE_bool("compile", False, "torch.compile the forward and loss.")
    flags.DEFINE_integer("steps", 10, "Timed steps per run.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps per run, at least one (torch.compile "
                         "compiles in the first).")
    flags.DEFINE_bool("amt_throw", False, "Also measure AMT's token counts against mask 0.75.")
    flags.DEFINE_bool("mvmae", False, "Also measure two views against one view.")
    flags.DEFINE_float("amt_mask_ratio", 0.45, "Mask ratio of the AMT runs.")
    flags.DEFINE_float("amt_throw_ratio", 0.40, "Throw ratio of the AMT runs.")
    flags.DEFINE_float("plain_mask_ratio", 0.75, "Mask ratio of the run without throwing.")
    flags.DEFINE_integer("threads", os.cpu_count(), "torch.set_num_threads (CPU).")
    flags.DEFINE_bool("find_max_batch", False, "CUDA: measure the main run at the largest batch "
                      "that fits (from eager steps' peak memory); without CUDA, at the given "
                      "batch.")
    flags.DEFINE_integer("batch_granularity", 8, "--find_max_batch: batch multiple.")


# (width, depth, heads) of the standard ViT sizes (Dosovitskiy et al.; Ti from DeiT).
VIT_SIZES = {"Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
             "H": (1280, 32, 16)}
LAYER_NORM = functools.partial(nn.LayerNorm, eps=1e-6)


def encoder_sizes(model: ml_collections.ConfigDict) -> dict[str, int]:
    """width, depth, num_heads, mlp_dim, patch_size: the variant ('B/16'), then explicit
    non-zero fields."""
    sizes = {}
    if model.variant:
        name, patch = model.variant.split("/")
        width, depth, heads = VIT_SIZES[name]
        sizes = dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
                     patch_size=int(patch))
    for field in ("width", "depth", "num_heads", "mlp_dim", "patch_size"):
        if model[field]:
            sizes[field] = model[field]
    return sizes


def token_counts(num_patches: int, mask_ratio: float, throw_ratio: float) -> tuple[int, int]:
    """(masked, thrown) per view, rounded as AMT's code does."""
    masked = int(num_patches * mask_ratio)
    return masked, int(num_patches * (mask_ratio + throw_ratio)) - masked


def sincos_table(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D position embedding, (grid * grid, dim): the first half of the channels
    encodes the patch's column, the second half its row, each as sines then cosines."""
    def one_axis(positions: np.ndarray, channels: int) -> np.ndarray:
        freq = 1.0 / 10000 ** (np.arange(channels // 2) / (channels / 2))
        angle = np.outer(positions.astype(np.float64), freq)
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    row, col = np.divmod(np.arange(grid * grid), grid)
    table = np.concatenate([one_axis(col, dim // 2), one_axis(row, dim // 2)], axis=1)
    return torch.from_numpy(table.astype(np.float32))


def mlp_ratio(width: int, mlp_dim: int) -> float:
    """The float timm's Block turns back into `mlp_dim` (it takes int(width * ratio))."""
    ratio = mlp_dim / width
    while int(width * ratio) < mlp_dim:
        ratio = np.nextafter(ratio, np.inf)
    return float(ratio)


class MaskedAutoencoder(nn.Module):
    """MAE (He et al. 2022) with an optional MV-MAE projection head; timm blocks.

    forward(images (R, C, H, W), visible (R, n_vis), masked (R, n_mask)) → predictions
    (R, n_mask, p*p*C) of the masked patches, and the L2-normalised projection of each row's
    pooled feature (or None without a head).
    """

    def __init__(self, img_size: int, patch_size: int, width: int, depth: int, num_heads: int,
                 mlp_dim: int, decoder_width: int, decoder_depth: int, decoder_heads: int,
                 projection: tuple[int, int, int] | None = None, pool: str = "cls",
                 channels: int = 3):
        super().__init__()
        self.patch_size, self.pool = patch_size, pool
        grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_table(grid, width), persistent=False)
        self.blocks = nn.ModuleList([
            Block(width, num_heads, mlp_ratio(width, mlp_dim), qkv_bias=True,
                  norm_layer=LAYER_NORM) for _ in range(depth)])
        self.norm = LAYER_NORM(width)
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer("decoder_pos_embed", sincos_table(grid, decoder_width),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_width, decoder_heads, 4.0, qkv_bias=True, norm_layer=LAYER_NORM)
            for _ in range(decoder_depth)])
        self.decoder_norm = LAYER_NORM(decoder_width)
        self.decoder_pred = nn.Linear(decoder_width, patch_size ** 2 * channels)
        self.projection = None
        if projection is not None:
            hidden, out, layers = projection
            dims = [width] + [hidden] * (layers - 1) + [out]
            parts = []
            for i in range(layers):
                parts.append(nn.Linear(dims[i], dims[i + 1]))
                if i < layers - 1:
                    parts.append(nn.GELU())
            self.projection = nn.Sequential(*parts)
        self._init_weights()

    def _init_weights(self):
        """MAE's initialisation: Xavier-uniform linear layers (and the patch embedding as a
        linear layer), zero biases, N(0, 0.02) tokens."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor):
        rows = images.shape[0]
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        width = tokens.shape[-1]
        tokens = torch.gather(tokens, 1, visible[..., None].expand(-1, -1, width))
        x = torch.cat([self.cls_token.expand(rows, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)

        y = self.decoder_embed(x)
        dec_width = y.shape[-1]
        mask_tokens = self.mask_token.expand(rows, masked.shape[1], -1)
        y = torch.cat([y, mask_tokens], dim=1)
        # Every token carries its own patch's embedding ([CLS] none), so order is free.
        positions = torch.cat([visible, masked], dim=1)
        table = self.decoder_pos_embed.to(y.dtype)
        pos = table[positions]
        y = y + torch.cat([pos.new_zeros(rows, 1, dec_width), pos], dim=1)
        for block in self.decoder_blocks:
            y = block(y)
        y = self.decoder_norm(y)
        predictions = self.decoder_pred(y[:, -masked.shape[1]:])

        embeddings = None
        if self.projection is not None:
            pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
            embeddings = F.normalize(self.projection(pooled).float(), dim=-1)
        return predictions, embeddings


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(R, C, H, W) → (R, N, p*p*C), patches row-major, pixels (row, column, channel)."""
    rows, channels, height, width = images.shape
    x = images.reshape(rows, channels, height // patch, patch, width // patch, patch)
    x = torch.einsum("rchpwq->rhwpqc", x)
    return x.reshape(rows, (height // patch) * (width // patch), patch * patch * channels)


def reconstruction_loss(predictions: torch.Tensor, images: torch.Tensor,
                        masked: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """Mean squared error on the masked patches; with `norm_pix`, each target patch is
    normalised by its mean and (unbiased) variance, as MAE."""
    target = patchify(images.float(), patch)
    target = torch.gather(target, 1, masked[..., None].expand(-1, -1, target.shape[-1]))
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return ((predictions.float() - target) ** 2).mean()


def info_nce(embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent over (B, 2, d) embeddings: each view's positive is its image's other
    view, every other view of the batch a negative."""
    batch = embeddings.shape[0]
    z = torch.cat([embeddings[:, 0], embeddings[:, 1]], dim=0)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=z.device),
                                float("-inf"))
    partner = (torch.arange(2 * batch, device=z.device) + batch) % (2 * batch)
    return F.cross_entropy(logits, partner)


def objective(model: MaskedAutoencoder, views: torch.Tensor, visible: torch.Tensor,
              masked: torch.Tensor, norm_pix: bool, temperature: float,
              contrastive_weight: float) -> torch.Tensor:
    """The loss of a batch: views (B, V, C, H, W); visible, masked (B * V, k) patch indices."""
    batch, num_views = views.shape[:2]
    rows = views.flatten(0, 1)
    predictions, embeddings = model(rows, visible, masked)
    loss = reconstruction_loss(predictions, rows, masked, model.patch_size, norm_pix)
    if embeddings is not None:
        loss = loss + contrastive_weight * info_nce(
            embeddings.reshape(batch, num_views, -1), temperature)
    return loss


def random_masks(rows: int, num_patches: int, num_masked: int, num_thrown: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, masked) indices: each row's patches in the order of sorted uniform noise; the
    first `num_masked` are masked, the next `num_thrown` dropped, the rest visible."""
    order = torch.argsort(torch.rand(rows, num_patches, device=device), dim=1)
    return order[:, num_masked + num_thrown:], order[:, :num_masked]


def build_model(config: ml_collections.ConfigDict) -> MaskedAutoencoder:
    sizes = encoder_sizes(config.model)
    contrastive = config.views.num == 2 and config.contrastive.weight > 0
    projection = ((config.contrastive.hidden_dim, config.contrastive.output_dim,
                   config.contrastive.num_layers) if contrastive else None)
    return MaskedAutoencoder(
        config.img_size, sizes["patch_size"], sizes["width"], sizes["depth"],
        sizes["num_heads"], sizes["mlp_dim"], config.model.decoder_width,
        config.model.decoder_depth, config.model.decoder_heads, projection,
        config.contrastive.pool)


def make_optimizer(model: nn.Module, config: ml_collections.ConfigDict,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW at MAE's scaled lr; weight decay on weight matrices and kernels only."""
    named = list(model.named_parameters())
    decay = [p for name, p in named if name.endswith("weight") and p.ndim >= 2]
    rest = [p for name, p in named if not (name.endswith("weight") and p.ndim >= 2)]
    lr = config.optim.base_lr * config.batch_size / 256
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.optim.weight_decay},
         {"params": rest, "weight_decay": 0.0}],
        lr=lr, betas=(config.optim.b1, config.optim.b2), eps=1e-8,
        fused=device.type == "cuda")


def run_counts(config: ml_collections.ConfigDict, phase: str) -> dict[str, int]:
    patch = encoder_sizes(config.model)["patch_size"]
    num_patches = (config.img_size // patch) ** 2
    masked, thrown = token_counts(num_patches, *bench_lib.phase_ratios(config, phase))
    if num_patches - masked - thrown < 1:
        raise ValueError(f"no patch stays visible: {masked} masked, {thrown} thrown of "
                         f"{num_patches}")
    return {"num_patches": num_patches, "masked": masked, "thrown": thrown,
            "visible": num_patches - masked - thrown}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config: ml_collections.ConfigDict, phase: str, steps: int, warmup: int,
            device: torch.device, autocast: bool, compile_model: bool) -> dict[str, Any]:
    """Builds the model and optimizer of a run, then times its training steps."""
    torch.manual_seed(0)
    counts = run_counts(config, phase)
    model = build_model(config).to(device)
    optimizer = make_optimizer(model, config, device)
    batch, num_views = config.batch_size, config.views.num
    views = torch.randn(batch, num_views, 3, config.img_size, config.img_size, device=device)

    def forward_loss(images):
        visible, masked = random_masks(batch * num_views, counts["num_patches"],
                                       counts["masked"], counts["thrown"], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return objective(model, images, visible, masked, config.norm_pix_loss,
                             config.contrastive.temperature, config.contrastive.weight)

    loss_fn = torch.compile(forward_loss) if compile_model else forward_loss
    clip = config.optim.grad_clip_norm

    def train_step():
        loss = loss_fn(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    loss = train_step()
    _synchronize(device)
    first_step_s = time.perf_counter() - started
    for _ in range(max(warmup - 1, 0)):
        loss = train_step()
    _synchronize(device)
    seconds = []
    host_before = bench_lib.host_usage()
    for _ in range(steps):
        begin = time.perf_counter()
        loss = train_step()
        _synchronize(device)
        seconds.append(time.perf_counter() - begin)
    host = bench_lib.host_usage_per_step(host_before, steps)
    final_loss = float(loss)
    if not np.isfinite(final_loss):
        raise FloatingPointError(f"the loss is {final_loss}: the timed steps are not meaningful")

    timing = bench_lib.timing_stats(seconds, batch)
    sizes = encoder_sizes(config.model)
    flops = bench_lib.analytic_train_flops(config, sizes, counts["masked"], counts["thrown"])
    peak = (hardware.peak_flops(torch.cuda.get_device_name(device))
            if device.type == "cuda" else None)
    if device.type == "cuda":
        memory = int(torch.cuda.max_memory_allocated(device))
        memory_source = "torch.cuda.max_memory_allocated during this run"
    else:
        memory = bench_lib.max_rss_bytes()
        memory_source = "process max RSS (ru_maxrss): CPU, no device memory statistics"
    params = sum(p.numel() for p in model.parameters())
    result = {
        "encoder": sizes, "variant": config.model.variant,
        "decoder": {"width": config.model.decoder_width, "depth": config.model.decoder_depth,
                    "heads": config.model.decoder_heads},
        "img_size": config.img_size, "batch": batch, "views": num_views,
        "contrastive": model.projection is not None, "phase": phase,
        "mask_ratio_throw_ratio": list(bench_lib.phase_ratios(config, phase)),
        "masking": "random order (no attention bank); the phase's token counts",
        "tokens": counts, "parameters": params,
        "dtype": "bfloat16 autocast" if autocast else "float32",
        "mode": "torch.compile" if compile_model else "eager",
        **timing, **host,
        "first_step_s": first_step_s,
        "compile_s": first_step_s - timing["step_s"] if compile_model else 0.0,
        "flops_analytic_per_step": flops["model"],
        "flops_analytic_per_image": flops["model"] / batch,
        "achieved_tflops": flops["model"] / timing["step_s"] / 1e12,
        "peak_flops_per_device": peak,
        "mfu": None if peak is None else flops["model"] / timing["step_s"] / peak,
        "peak_memory_bytes": memory, "peak_memory_source": memory_source,
        "final_loss": final_loss,
    }
    return result


def release(device: torch.device) -> None:
    """Frees what a finished run left behind (compiled graphs, cached GPU blocks), so that the
    next run starts from the same memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_and_release(config: ml_collections.ConfigDict, phase: str, steps: int,
                        warmup: int, device: torch.device, autocast: bool,
                        compile_model: bool) -> dict[str, Any]:
    try:
        return measure(config, phase, steps, warmup, device, autocast, compile_model)
    finally:
        release(device)


def run_key(config: ml_collections.ConfigDict, phase: str):
    """Runs with the same sizes, views and token counts are the same run here (masking is
    random whatever the strategy)."""
    return (config.img_size, config.batch_size, config.views.num,
            config.views.num == 2 and config.contrastive.weight > 0,
            json.dumps(encoder_sizes(config.model), sort_keys=True),
            config.model.decoder_width, config.model.decoder_depth,
            tuple(run_counts(config, phase).values()))


def largest_batch(config: ml_collections.ConfigDict, phase: str, device: torch.device,
                  autocast: bool, compile_model: bool, granularity: int):
    """The largest batch that fits on the GPU, from the peak memory of one eager step per
    probed batch (`bench_lib.search_largest_batch` from config.batch_size; a probe out of
    memory does not fit; eager probes need no compile, and torch.compile's step usually keeps
    fewer activations), then timed once (10% lower per out-of-memory failure).
    Returns (config, run, search)."""
    def at(batch: int) -> ml_collections.ConfigDict:
        return bench_lib.config_variant(config, batch_size=batch)

    def peak_at(batch: int) -> float:
        try:
            return measure_and_release(at(batch), phase, 1, 0, device, autocast, False)[
                "peak_memory_bytes"]
        except torch.OutOfMemoryError:
            release(device)
            return math.inf

    limit = torch.cuda.get_device_properties(device).total_memory * 0.95
    started = time.perf_counter()
    batch, search = bench_lib.search_largest_batch(peak_at, config.batch_size, limit,
                                                   granularity)
    search.update(search_s=time.perf_counter() - started, failed_batches=[],
                  probes="eager, one step each (torch.cuda.max_memory_allocated)")
    while True:
        try:
            result = measure_and_release(at(batch), phase, FLAGS.steps, FLAGS.warmup, device,
                                         autocast, compile_model)
            break
        except torch.OutOfMemoryError:
            release(device)
            if batch <= granularity:
                raise
            search["failed_batches"].append(batch)
            batch = bench_lib.round_down(batch * 0.9, granularity)
    search["batch"] = batch
    return at(batch), result, search


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    torch.set_num_threads(FLAGS.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = FLAGS.config
    if FLAGS.tiny:
        bench_lib.apply_tiny(config)
    dtype = FLAGS.dtype or config.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise app.UsageError(f"--dtype must be bfloat16, float32 or auto, got {dtype!r}")
    config.model.dtype = dtype
    autocast = dtype == "bfloat16"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs: what users enable
        torch.backends.cudnn.allow_tf32 = True
    phase = FLAGS.phase or bench_lib.default_phase(config)
    experiments = [n for n in ("amt_throw", "mvmae") if getattr(FLAGS, n)]

    def runs_of(run_config):
        return bench_lib.experiment_runs(
            run_config, phase, experiments, (FLAGS.amt_mask_ratio, FLAGS.amt_throw_ratio),
            FLAGS.plain_mask_ratio)

    def measure_run(run_config, run_phase):
        return measure_and_release(run_config, run_phase, FLAGS.steps, FLAGS.warmup, device,
                                   autocast, FLAGS.compile)

    search, done = None, None
    if FLAGS.find_max_batch and device.type != "cuda":
        # No device memory to fill: the run at the given batch (the CPU smoke test).
        search = {"skipped": "no CUDA device: measured at the given batch"}
    elif FLAGS.find_max_batch:
        config, main_run, search = largest_batch(config, phase, device, autocast,
                                                 FLAGS.compile, FLAGS.batch_granularity)
        done = {bench_lib.MAIN: main_run}
    measured = bench_lib.measure_runs(runs_of(config), measure_run, run_key, done)

    main_run = measured[bench_lib.MAIN]
    result = {
        "framework": "torch",
        "versions": {"torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "device": str(device),
        "device_kind": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or "cpu"),
        "cpu_threads": torch.get_num_threads(),
        "cpu_threads_note": "torch.set_num_threads(--threads), default os.cpu_count()",
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "machine": bench_lib.machine_info(),
        "config": str(config_flags.get_config_filename(FLAGS["config"])),
        "tiny": FLAGS.tiny, "experiments": experiments, "warmup_steps": FLAGS.warmup,
        "mode": main_run["mode"], "dtype": main_run["dtype"],
        "optimizer": "torch.optim.AdamW" + (" (fused)" if device.type == "cuda" else ""),
        "img_per_s": main_run["img_per_s"], "step_s": main_run["step_s"],
        "compile_s": main_run["compile_s"], "batch": main_run["batch"],
        "flops_per_image_analytic": main_run["flops_analytic_per_image"],
        "mfu": main_run["mfu"],
        "peak_memory_bytes": main_run["peak_memory_bytes"],
        "peak_memory_source": main_run["peak_memory_source"],
        "max_batch_search": search,
    }
    result.update(bench_lib.experiment_summary(measured))
    result["runs"] = measured
    bench_lib.write_json(result, FLAGS.json)


if __name__ == "__main__":
    define_flags()
    app.run(main)
