"""Image grids of what the model sees and reconstructs, one row per view.

Columns: the view; the encoder's input (masked patches grey, thrown patches dark red); the
reconstruction (visible patches as they are, masked patches predicted, thrown ones black);
the AMT attention weights of the view (in the AMT phase the weights that chose the masks, in
the random phase the current encoder's map of the view). With norm-pix targets the model
predicts normalised patches; they are shown with each true patch's mean and variance put
back, as MAE's visualisation does.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mvmae_jax import losses, sharding
from mvmae_jax import train_step as ts
from mvmae_jax.models import MVMAE

MASKED_RGB = (0.5, 0.5, 0.5)
THROWN_RGB = (0.45, 0.0, 0.0)


def make_visualize_fn(config: ml_collections.ConfigDict, model: MVMAE, mesh: Mesh,
                      state_sharding: ts.TrainState, phase: str) -> Callable:
    """Compiled (state, batch, rng) → host-sized arrays of the first `image_examples` images."""
    count = config.image_examples

    def visualize(state, batch, rng):
        masks = ts.make_masks(config, model, phase, mesh, state.params, state.bank, batch, rng)
        num_views = batch["views"].shape[1]
        rows = batch["views"][:count].reshape((count * num_views,) + batch["views"].shape[2:])
        flat = jax.tree.map(lambda m: m[:count].reshape(count * num_views, -1), masks)
        predictions = model.apply({"params": state.params}, rows, flat)["predictions"]
        if phase == ts.AMT_PHASE:
            # Computed for the whole batch: the bank lookup is a collective over all of it.
            weights = ts.amt_weights(config, model, mesh, state.params, state.bank, batch)
            weights = weights[:count * num_views]
        else:
            weights = model.apply({"params": state.params}, rows, method=MVMAE.attention_maps)
        return {"views": rows, "visible": flat.visible, "masked": flat.masked,
                "thrown": flat.thrown, "predictions": predictions.astype(jnp.float32),
                "weights": weights}

    return jax.jit(visualize, in_shardings=(state_sharding, sharding.batch_sharding(mesh), None),
                   out_shardings=sharding.replicated(mesh))


def _paint(patches: np.ndarray, indices: np.ndarray, value: np.ndarray) -> np.ndarray:
    patches = patches.copy()
    patches[indices] = value
    return patches


def view_grid(out: dict[str, np.ndarray], row: int, patch_size: int, grid: tuple[int, int],
              mean, std, norm_pix: bool) -> np.ndarray:
    """One view's four panels side by side, RGB float in [0, 1]."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    view = np.clip(out["views"][row] * std + mean, 0.0, 1.0)
    patches = np.asarray(losses.patchify(view[None], patch_size))[0]  # (N, p*p*C)
    channels = view.shape[-1]

    def fill(rgb):
        return np.tile(np.asarray(rgb, np.float32), patch_size * patch_size)

    masked, thrown = out["masked"][row], out["thrown"][row]
    encoder_input = _paint(_paint(patches, masked, fill(MASKED_RGB)), thrown, fill(THROWN_RGB))

    predicted = out["predictions"][row]
    if norm_pix:
        # Put each true patch's statistics back (in normalised-input space, then to pixels).
        raw = np.asarray(losses.patchify(out["views"][row][None], patch_size))[0][masked]
        mu = raw.mean(-1, keepdims=True)
        sigma = np.sqrt(raw.var(-1, ddof=1, keepdims=True) + losses.NORM_PIX_EPS)
        predicted = predicted * sigma + mu
    predicted = predicted.reshape(len(masked), patch_size, patch_size, channels)
    predicted = np.clip(predicted * std + mean, 0.0, 1.0).reshape(len(masked), -1)
    reconstruction = _paint(_paint(patches, masked, predicted), thrown, fill((0.0, 0.0, 0.0)))

    weights = out["weights"][row].reshape(grid)
    # Stretched per view for display: head-averaged maps span a narrow range.
    weights = (weights - weights.min()) / max(float(np.ptp(weights)), 1e-12)
    heat = np.kron(weights, np.ones((patch_size, patch_size)))
    heatmap = np.stack([heat, 0.2 * np.ones_like(heat), 1.0 - heat], axis=-1)

    def image(p):
        return np.asarray(losses.unpatchify(p[None], patch_size, grid))[0]

    gap = np.ones((view.shape[0], 2, 3), np.float32)
    panels = [view, image(encoder_input), image(reconstruction), heatmap.astype(np.float32)]
    return np.concatenate(functools.reduce(lambda a, b: a + [gap, b], panels[1:], [panels[0]]),
                          axis=1)


def grid_image(out: dict[str, np.ndarray], num_views: int, patch_size: int,
               grid: tuple[int, int], mean, std, norm_pix: bool) -> np.ndarray:
    """All rows (example-major, then view) stacked; uint8 RGB."""
    rows = [view_grid(out, r, patch_size, grid, mean, std, norm_pix)
            for r in range(out["views"].shape[0])]
    spaced = []
    for r, row in enumerate(rows):
        spaced.append(row)
        gap = 6 if (r + 1) % num_views == 0 else 2
        spaced.append(np.ones((gap, row.shape[1], 3), np.float32))
    return (np.concatenate(spaced[:-1], axis=0) * 255).round().astype(np.uint8)


def to_png(image: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image

    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()
