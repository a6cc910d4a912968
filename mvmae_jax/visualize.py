"""Pictures of what the model sees and reconstructs: one row per view (columns in
docs/implementation.md)."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mvmae_jax import losses, masking, models, sharding
from mvmae_jax.models import MVMAE

# Masked patches grey; thrown ones a magenta that images and the weight colours rarely have.
MASKED_RGB = (0.5, 0.5, 0.5)
THROWN_RGB = (1.0, 0.0, 1.0)
# AMT weights, low → high (dark blue, teal, green, yellow: readable in grey too).
WEIGHT_COLORS = ((0.27, 0.0, 0.33), (0.23, 0.32, 0.55), (0.13, 0.57, 0.55),
                 (0.37, 0.79, 0.38), (0.99, 0.91, 0.14))
COLUMNS = ("view", "encoder input", "reconstruction", "AMT weights")
WEIGHTS_COLUMN = COLUMNS.index("AMT weights")
# Layout of `grid_image`, in output pixels.
MIN_PANEL = 128  # a panel's least size: room for its column title
FONT_SIZE = 13
LINE_HEIGHT = 18  # title, legend, column titles, example captions
MARGIN = 6
PANEL_GAP = 6
VIEW_GAP = 3  # between the views of one example
EXAMPLE_GAP = 14  # between examples (their captions follow)
COLOR_BAR_WIDTH = 80
FRAME_RGB = (190, 190, 190)  # uint8: the 1-pixel frame around each panel


def make_visualize_fn(config: ml_collections.ConfigDict, model: MVMAE,
                      policy: masking.MaskingPolicy, mesh: Mesh, state_sharding: Any,
                      phase: str) -> Callable:
    """Compiled (state, batch, rng) → the first `image_examples` examples' views, masks and
    predictions in `phase`, and the attention weights when the masks come from them."""
    count = config.image_examples

    def visualize(state, batch, rng):
        batch = dict(batch, views=models.normalise_pixels(batch["views"], config.input.mean,
                                                          config.input.std))
        bank = state.extras.get("bank")
        masks = policy.masks(state.params, bank, batch, rng, phase)
        num_views = batch["views"].shape[1]
        rows = batch["views"][:count].reshape((count * num_views,) + batch["views"].shape[2:])
        flat = jax.tree.map(lambda m: m[:count].reshape(count * num_views, -1), masks)
        predictions = model.apply({"params": state.params}, rows, flat)["predictions"]
        out = {"views": rows, "visible": flat.visible, "masked": flat.masked,
               "thrown": flat.thrown, "predictions": predictions.astype(jnp.float32)}
        if phase != masking.WARMUP_PHASE and policy.strategy.uses_attention:
            # Computed for the whole batch: the bank lookup is a collective over all of it.
            out["weights"] = policy.weights(state.params, bank, batch)[:count * num_views]
        return out

    return jax.jit(visualize, in_shardings=(state_sharding, sharding.batch_sharding(mesh), None),
                   out_shardings=sharding.replicated(mesh))


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB in [0, 1] along `WEIGHT_COLORS` (dark blue → yellow)."""
    anchors = np.asarray(WEIGHT_COLORS, np.float32)
    position = np.clip(values, 0.0, 1.0) * (len(anchors) - 1)
    low = np.minimum(np.floor(position).astype(int), len(anchors) - 2)
    t = (position - low)[..., None]
    return (1.0 - t) * anchors[low] + t * anchors[low + 1]


def view_panels(out: dict[str, np.ndarray], row: int, patch_size: int, grid: tuple[int, int],
                mean, std, norm_pix: bool) -> list[np.ndarray]:
    """One view's panels (`columns(out)`), each (H, W, 3) RGB float in [0, 1]."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    view = np.clip(out["views"][row] * std + mean, 0.0, 1.0)
    patches = np.asarray(losses.patchify(view[None], patch_size))[0]  # (N, p*p*C)
    masked, thrown = out["masked"][row], out["thrown"][row]
    predicted = out["predictions"][row]
    if norm_pix:
        # Put each true patch's statistics back (in normalised-input space, then to pixels).
        raw = np.asarray(losses.patchify(out["views"][row][None], patch_size))[0][masked]
        mu = raw.mean(-1, keepdims=True)
        sigma = np.sqrt(raw.var(-1, ddof=1, keepdims=True) + losses.NORM_PIX_EPS)
        predicted = predicted * sigma + mu
    predicted = predicted.reshape(len(masked), -1, view.shape[-1])
    encoder_input, reconstruction = patches.copy(), patches.copy()
    encoder_input[masked] = np.tile(np.asarray(MASKED_RGB, np.float32), patch_size ** 2)
    reconstruction[masked] = np.clip(predicted * std + mean, 0.0, 1.0).reshape(len(masked), -1)
    for panel in (encoder_input, reconstruction):
        panel[thrown] = np.tile(np.asarray(THROWN_RGB, np.float32), patch_size ** 2)

    def image(p):
        return np.asarray(losses.unpatchify(p[None], patch_size, grid))[0]

    panels = [view, image(encoder_input), image(reconstruction)]
    if "weights" in out:
        weights = np.asarray(out["weights"][row], np.float32).reshape(grid)
        # Stretched per view for display: head-averaged maps span a narrow range.
        weights = (weights - weights.min()) / max(float(np.ptp(weights)), 1e-12)
        heatmap = colormap(np.kron(weights, np.ones((patch_size, patch_size), np.float32)))
        panels.append(heatmap.astype(np.float32))
    return panels


def columns(out: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The column titles of `out`'s picture: the AMT weights only when `out` has them."""
    return COLUMNS if "weights" in out else COLUMNS[:WEIGHTS_COLUMN]


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Where `grid_image` puts things, in output pixels: the title, legend and column-title
    lines, then per example a caption line over its views' rows of `panel`-pixel panels."""

    num_rows: int
    num_views: int
    panel: int
    scale: int
    num_columns: int = len(COLUMNS)

    @property
    def width(self) -> int:
        return 2 * MARGIN + self.num_columns * self.panel + (self.num_columns - 1) * PANEL_GAP

    title_y = MARGIN
    legend_y = MARGIN + LINE_HEIGHT
    column_titles_y = MARGIN + 2 * LINE_HEIGHT
    header_height = MARGIN + 3 * LINE_HEIGHT

    @property
    def example_height(self) -> int:
        return LINE_HEIGHT + self.num_views * self.panel + (self.num_views - 1) * VIEW_GAP

    @property
    def height(self) -> int:
        examples = self.num_rows // self.num_views
        return (self.header_height + examples * self.example_height
                + (examples - 1) * EXAMPLE_GAP + MARGIN)

    def column_x(self, column: int) -> int:
        """Left edge of a column's panels."""
        return MARGIN + column * (self.panel + PANEL_GAP)

    def example_y(self, example: int) -> int:
        """Top of an example's caption line."""
        return self.header_height + example * (self.example_height + EXAMPLE_GAP)

    def row_y(self, row: int) -> int:
        """Top of a view's panels (rows example-major, then view)."""
        example, view = divmod(row, self.num_views)
        return self.example_y(example) + LINE_HEIGHT + view * (self.panel + VIEW_GAP)


def grid_layout(num_rows: int, num_views: int, image_size: int, scale: int | None = None,
                num_columns: int = len(COLUMNS)) -> GridLayout:
    """`grid_image`'s layout; `scale` None: the least whole factor that makes a panel at least
    `MIN_PANEL` pixels (room for the column titles)."""
    if scale is None:
        scale = max(1, -(-MIN_PANEL // image_size))
    if num_rows % num_views:
        raise ValueError(f"{num_rows} rows are not whole examples of {num_views} views")
    return GridLayout(num_rows=num_rows, num_views=num_views, panel=image_size * scale,
                      scale=scale, num_columns=num_columns)


def _font(size: int = FONT_SIZE):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def title(step: int, phase: str) -> str:
    """`step 176, amt phase`, or `step 44, warmup phase (random masking)`."""
    line = f"step {step}, {phase} phase"
    return line + " (random masking)" if phase == masking.WARMUP_PHASE else line


def _draw_header(draw, layout: GridLayout, font, names: tuple[str, ...], heading: str,
                 thrown: bool) -> None:
    """The title, the legend (masked, thrown, the weight colours) and the column titles."""
    ink = (0, 0, 0)
    draw.text((MARGIN, layout.title_y + LINE_HEIGHT // 2), heading, fill=ink, font=font,
              anchor="lm")
    top = layout.legend_y
    swatch = LINE_HEIGHT - 6
    x = MARGIN
    swatches = [("masked", MASKED_RGB)] + ([("thrown", THROWN_RGB)] if thrown else [])
    for name, rgb in swatches:
        fill = tuple(int(round(255 * c)) for c in rgb)
        draw.rectangle([x, top + 3, x + swatch - 1, top + 3 + swatch - 1], fill=fill, outline=ink)
        x += swatch + 4
        draw.text((x, top + LINE_HEIGHT // 2), name, fill=ink, font=font, anchor="lm")
        x += int(draw.textlength(name, font=font)) + 14
    if COLUMNS[WEIGHTS_COLUMN] in names:
        label = "AMT weight (per view): low"
        draw.text((x, top + LINE_HEIGHT // 2), label, fill=ink, font=font, anchor="lm")
        x += int(draw.textlength(label, font=font)) + 4
        bar = colormap(np.linspace(0.0, 1.0, COLOR_BAR_WIDTH))
        for i, rgb in enumerate((bar * 255).round().astype(np.uint8)):
            draw.line([x + i, top + 3, x + i, top + 3 + swatch - 1],
                      fill=tuple(int(c) for c in rgb))
        draw.rectangle([x - 1, top + 2, x + COLOR_BAR_WIDTH, top + 3 + swatch], outline=ink)
        draw.text((x + COLOR_BAR_WIDTH + 4, top + LINE_HEIGHT // 2), "high", fill=ink,
                  font=font, anchor="lm")
    for column, name in enumerate(names):
        center = layout.column_x(column) + layout.panel // 2
        draw.text((center, layout.column_titles_y + LINE_HEIGHT // 2), name, fill=ink,
                  font=font, anchor="mm")


def grid_image(out: dict[str, np.ndarray], num_views: int, patch_size: int,
               grid: tuple[int, int], mean, std, norm_pix: bool, *, step: int, phase: str,
               scale: int | None = None) -> np.ndarray:
    """The labelled picture of `out` (rows example-major, then view) as uint8 RGB (H, W, 3),
    each image scaled up `scale` times (None: see `grid_layout`)."""
    from PIL import Image, ImageDraw

    num_rows, image_size = out["views"].shape[0], out["views"].shape[1]
    names = columns(out)
    layout = grid_layout(num_rows, num_views, image_size, scale, len(names))
    pil = Image.new("RGB", (layout.width, layout.height), (255, 255, 255))
    draw = ImageDraw.Draw(pil)
    for row in range(num_rows):
        y = layout.row_y(row)
        for column, panel in enumerate(view_panels(out, row, patch_size, grid, mean, std,
                                                   norm_pix)):
            big = np.kron(panel, np.ones((layout.scale, layout.scale, 1), np.float32))
            x = layout.column_x(column)
            pil.paste(Image.fromarray((big * 255).round().astype(np.uint8)), (x, y))
            # A frame: white content meets the white page.
            draw.rectangle([x - 1, y - 1, x + layout.panel, y + layout.panel], outline=FRAME_RGB)
    font = _font()
    _draw_header(draw, layout, font, names, title(step, phase), thrown=np.size(out["thrown"]) > 0)
    for example in range(num_rows // num_views):
        y = layout.example_y(example)
        views = "one view" if num_views == 1 else f"views 1-{num_views}, one per row"
        draw.text((MARGIN, y + LINE_HEIGHT // 2), f"example {example + 1} ({views})",
                  fill=(96, 96, 96), font=font, anchor="lm")
    return np.asarray(pil)


def to_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
