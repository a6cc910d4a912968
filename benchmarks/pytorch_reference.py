"""An independent PyTorch MAE / MV-MAE from timm `Block`s, timed at step_time.py's configs and
flags: MAE's design (sin-cos positions, encoder on [CLS] + visible tokens, decoder with mask
tokens, norm-pix MSE), with two views a projection head and InfoNCE. Random masked and thrown
patches (AMT's token counts). AdamW; `--compile`: torch.compile; bf16 autocast on CUDA.
`--ours`: step_time.py's JSON at the same setting, on one device: adds ours / PyTorch per run.

  SETTING="--config=configs/mae_b.py --config.batch_size=256 --dtype=auto --amt_throw"
  python benchmarks/step_time.py $SETTING --json=/tmp/ours.json
  python benchmarks/pytorch_reference.py $SETTING --ours=/tmp/ours.json --json=/tmp/torch.json
"""

from __future__ import annotations

# torch (and timm's torchvision) first: torchvision's extensions crash if loaded after TensorFlow.
import torch  # isort: skip
import timm  # isort: skip  # noqa: F401

import functools
import gc
import json
import os
import pathlib
import platform
import time
from typing import Any

import bench_lib
import ml_collections
import torch.nn.functional as F
from absl import app, flags
from timm.models.vision_transformer import Block
from torch import nn

from mvmae_jax import hardware, models
from mvmae_jax.export import mlp_ratio
from mvmae_jax.models import vit

FLAGS = flags.FLAGS
LAYER_NORM = functools.partial(nn.LayerNorm, eps=1e-6)


class MaskedAutoencoder(nn.Module):
    """MAE (He et al. 2022) with an optional MV-MAE projection head. forward(images, visible,
    masked) → predictions of the masked patches, the normalised projections (or None)."""

    def __init__(self, img_size: int, patch_size: int, width: int, depth: int, num_heads: int,
                 mlp_dim: int, decoder_width: int, decoder_depth: int, decoder_heads: int,
                 projection: tuple[int, int, int] | None = None, pool: str = "cls"):
        super().__init__()
        self.patch_size, self.pool = patch_size, pool
        grid = img_size // patch_size

        def positions(dim: int) -> torch.Tensor:  # MAE's fixed 2-D sin-cos table
            return torch.from_numpy(vit.sincos_2d((grid, grid), dim))

        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)  # RGB
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", positions(width), persistent=False)
        self.blocks = nn.ModuleList([
            Block(width, num_heads, mlp_ratio(width, mlp_dim), qkv_bias=True,
                  norm_layer=LAYER_NORM) for _ in range(depth)])
        self.norm = LAYER_NORM(width)
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer("decoder_pos_embed", positions(decoder_width), persistent=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_width, decoder_heads, 4.0, qkv_bias=True, norm_layer=LAYER_NORM)
            for _ in range(decoder_depth)])
        self.decoder_norm = LAYER_NORM(decoder_width)
        self.decoder_pred = nn.Linear(decoder_width, patch_size ** 2 * 3)
        self.projection = None
        if projection is not None:
            hidden, out, layers = projection
            dims = [width] + [hidden] * (layers - 1) + [out]
            linears = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)]
            # A GELU between each two: the linears at 0, 2, 4, ... (the names tests map ours to).
            self.projection = nn.Sequential(
                linears[0], *(module for linear in linears[1:] for module in (nn.GELU(), linear)))

    def forward(self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor):
        rows = images.shape[0]
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = torch.gather(tokens, 1, visible[..., None].expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([self.cls_token.expand(rows, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)

        y = torch.cat([self.decoder_embed(x), self.mask_token.expand(rows, masked.shape[1], -1)], 1)
        # Every token carries its own patch's embedding ([CLS] none), so order is free.
        pos = self.decoder_pos_embed.to(y.dtype)[torch.cat([visible, masked], dim=1)]
        y = y + torch.cat([pos.new_zeros(rows, 1, y.shape[-1]), pos], dim=1)
        for block in self.decoder_blocks:
            y = block(y)
        y = self.decoder_norm(y)
        predictions = self.decoder_pred(y[:, -masked.shape[1]:])

        if self.projection is None:
            return predictions, None
        pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return predictions, F.normalize(self.projection(pooled).float(), dim=-1)


def reconstruction_loss(predictions: torch.Tensor, images: torch.Tensor,
                        masked: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """MSE on the masked patches; `norm_pix`: targets normalised per patch (unbiased var) as MAE."""
    rows, channels, height, width = images.shape  # patches row-major, pixels (row, col, channel)
    target = images.float().reshape(rows, channels, height // patch, patch, width // patch, patch)
    target = torch.einsum("rchpwq->rhwpqc", target).reshape(rows, -1, patch * patch * channels)
    target = torch.gather(target, 1, masked[..., None].expand(-1, -1, target.shape[-1]))
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return ((predictions.float() - target) ** 2).mean()


def info_nce(embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent over (B, 2, d): a view's positive is its image's other view."""
    batch = embeddings.shape[0]
    z = torch.cat([embeddings[:, 0], embeddings[:, 1]], dim=0)
    self_pairs = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_pairs, float("-inf"))
    partner = (torch.arange(2 * batch, device=z.device) + batch) % (2 * batch)
    return F.cross_entropy(logits, partner)


def objective(model: MaskedAutoencoder, views: torch.Tensor, visible: torch.Tensor,
              masked: torch.Tensor, norm_pix: bool, temperature: float,
              contrastive_weight: float) -> torch.Tensor:
    """The loss of a batch: views (B, V, C, H, W); visible, masked (B * V, k) patch indices."""
    rows = views.flatten(0, 1)
    predictions, embeddings = model(rows, visible, masked)
    loss = reconstruction_loss(predictions, rows, masked, model.patch_size, norm_pix)
    if embeddings is not None:
        loss = loss + contrastive_weight * info_nce(
            embeddings.reshape(*views.shape[:2], -1), temperature)
    return loss


def random_masks(rows: int, num_patches: int, num_masked: int, num_thrown: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, masked) indices: each row's patches in the order of sorted uniform noise; the
    first `num_masked` are masked, the next `num_thrown` dropped, the rest visible."""
    order = torch.argsort(torch.rand(rows, num_patches, device=device), dim=1)
    return order[:, num_masked + num_thrown:], order[:, :num_masked]


def build_model(config: ml_collections.ConfigDict) -> MaskedAutoencoder:
    con, model = config.contrastive, config.model
    projection = ((con.hidden_dim, con.output_dim, con.num_layers)
                  if config.views.num == 2 and con.weight > 0 else None)
    return MaskedAutoencoder(  # encoder_dims: patch_size, width, depth, num_heads, mlp_dim
        config.img_size, **models.encoder_dims(model), decoder_width=model.decoder_width,
        decoder_depth=model.decoder_depth, decoder_heads=model.decoder_heads,
        projection=projection, pool=con.pool)


def make_optimizer(model: nn.Module, config: ml_collections.ConfigDict,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW at MAE's scaled lr; weight decay on weight matrices and kernels only."""
    named = list(model.named_parameters())
    decay = [p for name, p in named if name.endswith("weight") and p.ndim >= 2]
    rest = [p for name, p in named if not (name.endswith("weight") and p.ndim >= 2)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.optim.weight_decay},
         {"params": rest, "weight_decay": 0.0}], lr=config.optim.base_lr * config.batch_size / 256,
        betas=(config.optim.b1, config.optim.b2), eps=1e-8, fused=device.type == "cuda")


def measure(config: ml_collections.ConfigDict, phase: str, steps: int, warmup: int,
            device: torch.device, autocast: bool, compile_model: bool) -> dict[str, Any]:
    """Times a run's training steps; frees what it left (compiled graphs, cached GPU blocks)."""
    cuda = device.type == "cuda"
    try:
        torch.manual_seed(0)
        counts = bench_lib.token_counts(config, phase)
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
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds, untimed = [], max(warmup, 1)  # the first step compiles
        for _ in range(untimed + steps):
            begin = time.perf_counter()
            loss = loss_fn(views)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
            optimizer.step()
            if cuda:
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - begin)
        first_step_s, seconds = seconds[0], seconds[untimed:]
        result = bench_lib.run_record(
            config, phase, seconds,
            hardware.peak_flops(torch.cuda.get_device_name(device)) if cuda else None, 1,
            ((int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated")
             if cuda else bench_lib.max_rss()), float(loss))
        result.update(first_step_s=first_step_s,
                      compile_s=first_step_s - result["step_s"] if compile_model else 0.0,
                      parameters=sum(p.numel() for p in model.parameters()),
                      dtype="bfloat16 autocast" if autocast else "float32",
                      mode="torch.compile" if compile_model else "eager")
        return result
    finally:
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def against_ours(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Images/s of ours over the reference's for each run both measured, after checking that
    the two measured the same model, images, views and token counts."""
    by_run = {}
    for name in sorted(set(ours["runs"]) & set(theirs["runs"])):
        a, b = ours["runs"][name], theirs["runs"][name]
        if "error" in a or "error" in b:
            continue
        for field in ("encoder", "img_size", "views", "contrastive", "tokens"):
            if a[field] != b[field]:
                raise app.UsageError(f"run {name!r}: {field} {a[field]} in --ours, {b[field]} "
                                     "here: measure both at the same setting")
        by_run[name] = {"ours_img_per_s": a["img_per_s"], "img_per_s": b["img_per_s"],
                        "ratio": a["img_per_s"] / b["img_per_s"], "batch": [a["batch"], b["batch"]]}
    keys = ("img_per_s", "batch", "mfu", "amt_throw_speedup", "amt_masking_overhead",
            "mvmae_over_mae_cost", "dtype", "device_kind", "versions")
    return {"ratio": by_run.get(bench_lib.MAIN, {}).get("ratio"), "ratio_by_run": by_run,
            "ours": {key: ours.get(key) for key in keys}}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    torch.set_num_threads(os.cpu_count())  # as XLA's CPU backend: every core
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config, phase, header = bench_lib.setup("bfloat16" if cuda else "float32")
    if config.model.dtype not in ("bfloat16", "float32"):
        raise app.UsageError(f"--dtype must be bfloat16, float32 or auto, got {config.model.dtype}")
    if cuda:  # float32 runs: what users enable
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ours = json.loads(pathlib.Path(FLAGS.ours).read_text()) if FLAGS.ours else None
    if ours and ours["device_count"] != 1:
        raise app.UsageError(f"--ours ran on {ours['device_count']} devices, this on one: "
                             "measure ours with one visible (CUDA_VISIBLE_DEVICES=0)")
    if ours and FLAGS.find_max_batch and cuda:  # the search starts from our batch
        config.batch_size = ours["batch"]

    measure_at = functools.partial(measure, steps=FLAGS.steps, warmup=FLAGS.warmup, device=device,
                                   autocast=config.model.dtype == "bfloat16",
                                   compile_model=FLAGS.compile)

    def largest(config):
        """The largest batch, by one eager step's peak memory (compiled ones keep less); its run."""
        return bench_lib.largest_batch(
            config, lambda c: measure_at(c, phase, steps=1, warmup=0, compile_model=False)[
                "peak_memory_bytes"], lambda c: measure_at(c, phase),
            lambda error: isinstance(error, torch.OutOfMemoryError),
            torch.cuda.get_device_properties(device).total_memory * 0.95)

    experiments = [n for n in ("amt_throw", "mvmae") if FLAGS[n].value]
    result = bench_lib.measure_experiments(  # on a CPU at the given batch
        config, phase, experiments, measure_at, largest if FLAGS.find_max_batch and cuda
        else lambda c: (c, measure_at(c, phase), None))
    main_run = result["runs"][bench_lib.MAIN]
    bench_lib.write_json({
        **header, "framework": "torch",
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "device": str(device), "device_kind": (torch.cuda.get_device_name(device) if cuda
                                               else platform.processor() or "cpu"),
        "cpu_threads": torch.get_num_threads(), "machine": bench_lib.machine_info(),
        "mode": main_run["mode"], "dtype": main_run["dtype"],
        "optimizer": "torch.optim.AdamW" + (" (fused)" if cuda else ""), **result,
        **(against_ours(ours, result) if ours else {})}, FLAGS.json)


if __name__ == "__main__":
    bench_lib.define_flags()
    flags.DEFINE_bool("compile", False, "torch.compile the forward and loss.")
    flags.DEFINE_string("ours", "", "step_time.py's JSON at this setting, to compare with.")
    app.run(main)
