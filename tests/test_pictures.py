"""The training pictures (images/step_*.png): layout, legend, colours, on a synthetic `out`.

Views and predictions are grey, so that the only magenta pixels can be thrown patches and the
legend's swatch.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mvmae_jax import visualize

SIZE, PATCH = 8, 2
GRID = (SIZE // PATCH, SIZE // PATCH)
NUM_PATCHES = GRID[0] * GRID[1]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
WHITE = (255, 255, 255)
MAGENTA = tuple(int(255 * c) for c in visualize.THROWN_RGB)
MASKED_SWATCH = tuple(int(round(255 * c)) for c in visualize.MASKED_RGB)


def synthetic_out(num_rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """What the compiled visualize function returns in the AMT phase, for `num_rows` grey 8x8
    views: 6 masked and 4 thrown patches of 16 per view, random weights."""
    rng = np.random.default_rng(seed)
    grey = rng.uniform(0.1, 0.9, (num_rows, SIZE, SIZE, 1)).astype(np.float32)
    views = (np.repeat(grey, 3, axis=-1) - 0.5) / 0.25
    order = np.stack([rng.permutation(NUM_PATCHES) for _ in range(num_rows)]).astype(np.int32)
    predicted = rng.uniform(-1.5, 1.5, (num_rows, 6, PATCH * PATCH, 1)).astype(np.float32)
    return dict(views=views, visible=order[:, :6], masked=order[:, 6:12], thrown=order[:, 12:],
                predictions=np.repeat(predicted, 3, axis=-1).reshape(num_rows, 6, -1),
                weights=rng.random((num_rows, NUM_PATCHES)).astype(np.float32))


def warmup_out(num_rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """What it returns in the warm-up: 12 masked patches of 16 per view, none thrown, no
    weights."""
    out = synthetic_out(num_rows, seed)
    rng = np.random.default_rng(seed + 1)
    order = np.stack([rng.permutation(NUM_PATCHES) for _ in range(num_rows)]).astype(np.int32)
    predicted = np.repeat(out["predictions"], 2, axis=1)
    return dict(views=out["views"], visible=order[:, :4], masked=order[:, 4:],
                thrown=order[:, :0], predictions=predicted)


def picture(out: dict[str, np.ndarray], num_views: int, step: int = 26,
            phase: str = "amt") -> np.ndarray:
    return visualize.grid_image(out, num_views, PATCH, GRID, MEAN, STD, norm_pix=False,
                                step=step, phase=phase)


def text_band(layout, text: str, y: int) -> np.ndarray:
    """The line at `y` of a white picture as wide as `layout` with `text` drawn as the
    picture's title is."""
    from PIL import ImageDraw

    band = Image.new("RGB", (layout.width, visualize.LINE_HEIGHT), WHITE)
    ImageDraw.Draw(band).text((visualize.MARGIN, visualize.LINE_HEIGHT // 2), text,
                              fill=(0, 0, 0), font=visualize._font(), anchor="lm")
    return np.asarray(band)


def is_color(image: np.ndarray, rgb) -> np.ndarray:
    return np.all(image == np.asarray(rgb, np.uint8), axis=-1)


@pytest.fixture(scope="module")
def two_examples():
    """(out, image, layout) of 2 examples x 2 views."""
    out = synthetic_out(4)
    return out, picture(out, 2), visualize.grid_layout(4, 2, SIZE)


def test_size_scale_and_panels_in_place(two_examples):
    """The picture has the layout's size; each panel is the view's panel scaled up, exactly at
    its column's x and its row's y, framed; the gaps between columns are white."""
    out, image, layout = two_examples
    assert image.dtype == np.uint8 and image.shape == (layout.height, layout.width, 3)
    assert layout.scale == 16 and layout.panel == 128  # 8 pixels scaled to MIN_PANEL
    for row in range(4):
        y = layout.row_y(row)
        panels = visualize.view_panels(out, row, PATCH, GRID, MEAN, STD, False)
        for column, panel in enumerate(panels):
            x = layout.column_x(column)
            want = (np.kron(panel, np.ones((16, 16, 1))) * 255).round().astype(np.uint8)
            np.testing.assert_array_equal(image[y:y + 128, x:x + 128], want,
                                          err_msg=f"row {row}, column {column}")
            assert is_color(image[y:y + 128, x - 1], visualize.FRAME_RGB).all()
            assert is_color(image[y:y + 128, x + 128], visualize.FRAME_RGB).all()
        for column in range(1, len(visualize.COLUMNS)):
            middle = layout.column_x(column) - visualize.PANEL_GAP // 2 - 1
            assert is_color(image[y:y + 128, middle], WHITE).all()


def test_title_names_the_step_and_the_phase(two_examples):
    """The first line is the title with the step and the phase, drawn exactly; the warm-up's
    says that its masking is random."""
    _, image, layout = two_examples
    assert visualize.title(26, "amt") == "step 26, amt phase"
    assert visualize.title(3, "warmup") == "step 3, warmup phase (random masking)"
    line = visualize.LINE_HEIGHT
    np.testing.assert_array_equal(image[layout.title_y:layout.title_y + line],
                                  text_band(layout, "step 26, amt phase", layout.title_y))
    other = picture(synthetic_out(4), 2, step=27)
    assert not np.array_equal(other[layout.title_y:layout.title_y + line],
                              image[layout.title_y:layout.title_y + line])


def test_header_has_legend_and_a_title_over_each_column(two_examples):
    """Ink in the legend line, and in the title line above each column's centre."""
    _, image, layout = two_examples
    line = visualize.LINE_HEIGHT
    legend = image[layout.legend_y:layout.legend_y + line]
    assert (~is_color(legend, WHITE)).sum() > 500
    assert is_color(legend, MAGENTA).any()  # the thrown swatch
    assert is_color(legend, MASKED_SWATCH).sum() > 50  # the masked swatch
    titles = image[layout.column_titles_y:layout.header_height]
    for column, title in enumerate(visualize.COLUMNS):
        x = layout.column_x(column)
        ink = ~is_color(titles[:, x:x + layout.panel], WHITE)
        assert ink.sum() > 20 * len(title), title  # a word, not a speck
        # Centred: the ink's horizontal middle is near the panel's.
        columns = np.flatnonzero(ink.any(axis=0))
        assert abs((columns[0] + columns[-1]) / 2 - layout.panel / 2) < 8, title
    # The colour bar runs from the low colour to the high one.
    bar = legend[line // 2]
    low, high = (np.asarray(visualize.colormap(np.asarray(v)) * 255).round() for v in (0.0, 1.0))
    first = np.flatnonzero(np.all(np.abs(bar - low) <= 1, axis=-1))
    last = np.flatnonzero(np.all(np.abs(bar - high) <= 1, axis=-1))
    assert first.size and last.size and first[0] < last[-1]


def test_thrown_colour_exactly_on_thrown_patches(two_examples):
    """In the encoder input and in the reconstruction, the thrown colour covers the thrown
    patches and nothing else; no other panel and nothing else in the picture has it."""
    out, image, layout = two_examples
    scaled = PATCH * layout.scale
    for row in range(4):
        want = np.zeros(GRID, bool)
        want.reshape(-1)[out["thrown"][row]] = True
        want = np.kron(want, np.ones((scaled, scaled), bool))
        y = layout.row_y(row)
        for column in range(len(visualize.COLUMNS)):
            x = layout.column_x(column)
            got = is_color(image[y:y + layout.panel, x:x + layout.panel], MAGENTA)
            if visualize.COLUMNS[column] in ("encoder input", "reconstruction"):
                np.testing.assert_array_equal(got, want, err_msg=f"row {row}, column {column}")
            else:
                assert not got.any(), (row, column)
    legend = image[:layout.legend_y + visualize.LINE_HEIGHT]
    thrown_pixels = 4 * 2 * 4 * scaled * scaled  # rows x panels x patches x area
    assert is_color(image, MAGENTA).sum() == thrown_pixels + is_color(legend, MAGENTA).sum()


def test_examples_are_captioned_and_set_apart(two_examples):
    """The views of one example are VIEW_GAP apart; between examples a wider white band, then
    the next example's caption."""
    _, image, layout = two_examples
    assert visualize.EXAMPLE_GAP > 2 * visualize.VIEW_GAP
    assert layout.row_y(1) - (layout.row_y(0) + layout.panel) == visualize.VIEW_GAP
    end_of_first = layout.row_y(1) + layout.panel + 1  # below the frame
    caption = layout.example_y(1)
    assert caption - end_of_first >= visualize.EXAMPLE_GAP - 1
    assert is_color(image[end_of_first:caption], WHITE).all()
    for example in range(2):
        y = layout.example_y(example)
        band = image[y:y + visualize.LINE_HEIGHT - 1]
        assert (~is_color(band, WHITE)).sum() > 100, example  # "example k (...)"
    # Nothing below the last example but the margin.
    bottom = layout.row_y(3) + layout.panel + 1
    assert image.shape[0] - bottom == visualize.MARGIN - 1
    assert is_color(image[bottom:], WHITE).all()


def test_one_view_small_and_large_images():
    """One view per example; a panel is at least MIN_PANEL pixels, and a large image is not
    scaled."""
    out = synthetic_out(3, seed=1)
    layout = visualize.grid_layout(3, 1, SIZE)
    assert picture(out, 1).shape == (layout.height, layout.width, 3)
    assert visualize.grid_layout(2, 2, 32).panel == 128
    assert visualize.grid_layout(2, 2, 70).panel == 140
    assert visualize.grid_layout(2, 2, 224).scale == 1
    with pytest.raises(ValueError, match="whole examples"):
        visualize.grid_layout(3, 2, SIZE)


def test_png():
    """`to_png` writes the picture as it is."""
    image = picture(synthetic_out(2), 2)
    decoded = np.asarray(Image.open(io.BytesIO(visualize.to_png(image))))
    np.testing.assert_array_equal(decoded, image)


def test_warmup_picture_shows_only_what_exists_then():
    """In the warm-up nothing is thrown and no AMT weights exist: three columns (no weights
    column), a legend with the masked swatch only (no thrown swatch, no colour bar), no
    magenta anywhere; the panels are those of `view_panels`."""
    out = warmup_out(4)
    image = picture(out, 2, step=13, phase="warmup")
    layout = visualize.grid_layout(4, 2, SIZE, num_columns=3)
    assert visualize.columns(out) == ("view", "encoder input", "reconstruction")
    assert image.shape == (layout.height, layout.width, 3)
    assert layout.width < visualize.grid_layout(4, 2, SIZE).width
    assert not is_color(image, MAGENTA).any()
    line = visualize.LINE_HEIGHT
    legend = image[layout.legend_y:layout.legend_y + line]
    assert is_color(legend, MASKED_SWATCH).sum() > 50  # the masked swatch
    high = np.asarray(visualize.colormap(np.asarray(1.0)) * 255).round()
    assert not np.all(np.abs(legend - high) <= 1, axis=-1).any()  # no colour bar
    np.testing.assert_array_equal(image[layout.title_y:layout.title_y + line], text_band(
        layout, "step 13, warmup phase (random masking)", layout.title_y))
    for row in range(4):
        panels = visualize.view_panels(out, row, PATCH, GRID, MEAN, STD, False)
        assert len(panels) == 3
        y = layout.row_y(row)
        for column, panel in enumerate(panels):
            x = layout.column_x(column)
            want = (np.kron(panel, np.ones((16, 16, 1))) * 255).round().astype(np.uint8)
            np.testing.assert_array_equal(image[y:y + 128, x:x + 128], want)
