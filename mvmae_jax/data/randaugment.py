"""Fine-tuning augmentations in TensorFlow: timm's RandAugment ("rand-m9-mstd0.5-inc1") and
RandomErasing(mode="pixel"), each op matching timm's Pillow call on a uint8 image."""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from mvmae_jax.data.augment import sample_boxes

# timm's op set for "inc1" (`_RAND_INCREASING_TRANSFORMS`), in its order.
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm's default fill of the area geometric ops uncover (MAE's create_transform passes the mean).
FILL = (128, 128, 128)
MAX_MAGNITUDE = 10.0  # timm's _LEVEL_DENOM
INTERPOLATIONS = ("bilinear", "bicubic", "random")


def quantise(image: tf.Tensor) -> tf.Tensor:
    """Float32 with the values a uint8 image can hold: timm's ops act on uint8 PIL images."""
    return tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0)


# --- Point and colour ops: image float32 (H, W, 3) holding integers in [0, 255].

def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.autocontrast: each channel's [min, max] stretched onto [0, 255]."""
    lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
    hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
    # Pillow's table: int(v * scale + offset) in double precision.
    scale = 255.0 / tf.where(hi > lo, hi - lo, 1.0)
    offset = -lo * scale
    stretched = tf.clip_by_value(tf.floor(tf.cast(image, tf.float64) * scale + offset), 0.0, 255.0)
    return tf.where(hi > lo, tf.cast(stretched, tf.float32), image)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.equalize: per channel, the cumulative histogram as lookup table."""
    # Each channel's values offset by 256: indices into a flat (3, 256) table.
    values = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=768, maxlength=768)
    hist = tf.reshape(hist, [3, 256])
    total = tf.reduce_sum(hist, axis=1)
    top = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.int32)
    top_count = tf.gather(hist, top, batch_dims=1)  # Pillow's histo[-1]: the last non-empty bin
    step = (total - top_count) // 255
    before = tf.cumsum(hist, axis=1, exclusive=True)
    lut = (step[:, None] // 2 + before) // tf.maximum(step, 1)[:, None]
    lut = tf.minimum(lut, 255)  # Pillow clips its table to uint8
    identity = tf.range(256, dtype=tf.int32)[None, :]
    keep = (tf.math.count_nonzero(hist, axis=1) <= 1) | (step == 0)
    lut = tf.where(keep[:, None], identity, lut)
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), values), tf.float32)


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """ImageOps.posterize: keep the `bits` top bits (0 bits: black, as in timm's Pillow)."""
    shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
    values = tf.cast(image, tf.int32)
    kept = tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift)
    return tf.cast(tf.where(shift >= 8, 0, kept), tf.float32)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """ImageOps.solarize: values >= threshold inverted."""
    return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def solarize_add(image: tf.Tensor, addition: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
    """timm's solarize_add: values below threshold raised by `addition`, capped at 255."""
    raised = tf.minimum(image + tf.cast(addition, tf.float32), 255.0)
    return tf.where(image < threshold, raised, image)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Image.blend(degenerate, image, factor) as in ImageEnhance: float32, clipped, truncated."""
    mixed = degenerate + tf.cast(factor, tf.float32) * (image - degenerate)
    return tf.floor(tf.clip_by_value(mixed, 0.0, 255.0))


def grayscale(image: tf.Tensor) -> tf.Tensor:
    """(H, W) Pillow's RGB → L conversion: ITU-R 601-2 luma in 16-bit fixed point, rounded."""
    values = tf.cast(image, tf.int32)
    weighted = values[..., 0] * 19595 + values[..., 1] * 38470 + values[..., 2] * 7471
    return tf.cast(tf.bitwise.right_shift(weighted + 0x8000, 16), tf.float32)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Color: blend with the image's grey version."""
    grey = grayscale(image)[..., None]
    return blend(tf.broadcast_to(grey, tf.shape(image)), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Contrast: blend with a flat image at the rounded mean grey level."""
    grey = tf.cast(grayscale(image), tf.float64)
    mean = tf.floor(tf.reduce_sum(grey) / tf.cast(tf.size(grey), tf.float64) + 0.5)
    return blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def smooth(image: tf.Tensor) -> tf.Tensor:
    """ImageFilter.SMOOTH as Pillow applies it: kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 on the
    interior in Pillow's float32 order of sums, rounded half up; the border is kept."""
    weights = [tf.constant(1 / 13, tf.float32), tf.constant(5 / 13, tf.float32)]
    height, width = tf.shape(image)[0], tf.shape(image)[1]

    def row_sum(rows: tf.Tensor, centre_weight: tf.Tensor) -> tf.Tensor:
        left, middle, right = rows[:, :-2], rows[:, 1:-1], rows[:, 2:]
        return left * weights[0] + middle * centre_weight + right * weights[0]

    # Pillow adds the row below, then the row itself, then the row above, onto 0.5.
    total = tf.constant(0.5, tf.float32) + row_sum(image[2:], weights[0])
    total = total + row_sum(image[1:-1], weights[1])
    total = total + row_sum(image[:-2], weights[0])
    interior = tf.floor(tf.clip_by_value(total, 0.0, 255.0))
    padded = tf.pad(interior, [[1, 1], [1, 1], [0, 0]])
    rows = tf.range(height)[:, None, None]
    cols = tf.range(width)[None, :, None]
    border = (rows == 0) | (rows == height - 1) | (cols == 0) | (cols == width - 1)
    return tf.where(border, image, padded)


_POINT_OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": lambda image: 255.0 - image,
    "PosterizeIncreasing": posterize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": color,
    "ContrastIncreasing": contrast,
    "BrightnessIncreasing": lambda image, factor: blend(tf.zeros_like(image), image, factor),
    "SharpnessIncreasing": lambda image, factor: blend(smooth(image), image, factor),
}


# --- Geometric ops: Pillow's Image.transform(AFFINE) with its sampling rules.

def affine(image: tf.Tensor, matrix, *, fill=FILL, interpolation: str = "bicubic") -> tf.Tensor:
    """Image.transform(size, AFFINE, matrix, resample, fillcolor=fill): pixel (x, y) samples
    (a x' + b y' + c, d x' + e y' + f) at (x', y') = (x + 0.5, y + 0.5), `fill` outside."""
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
    return _affine(tf.cast(image, tf.float32), tf.cast(matrix, tf.float64),
                   tf.constant(fill, tf.float64), interpolation)


# XLA fuses the sampler's element-wise float64 ops (bit-identical to running them one by one).
@functools.partial(tf.function, jit_compile=True)
def _affine(image: tf.Tensor, matrix: tf.Tensor, fill: tf.Tensor, interpolation: str) -> tf.Tensor:
    """`affine`'s sampling (fill float64 (C,)): double precision, truncated as Pillow."""
    a, b, c, d, e, f = tf.unstack(matrix)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    h_float = tf.cast(height, tf.float64)
    w_float = tf.cast(width, tf.float64)
    ys = tf.cast(tf.range(height), tf.float64)[:, None] + 0.5
    xs = tf.cast(tf.range(width), tf.float64)[None, :] + 0.5
    x_in = a * xs + b * ys + c
    y_in = d * xs + e * ys + f
    inside = (x_in >= 0.0) & (x_in < w_float) & (y_in >= 0.0) & (y_in < h_float)

    x_in = x_in - 0.5
    y_in = y_in - 0.5
    x0 = tf.floor(x_in)
    y0 = tf.floor(y_in)
    dx = (x_in - x0)[..., None, None]  # broadcast over taps and channels
    dy = (y_in - y0)[..., None]
    # Outside points are masked below; clamp their (possibly huge) indices before the cast.
    x0 = tf.cast(tf.clip_by_value(x0, -2.0, w_float), tf.int32)
    y0 = tf.cast(tf.clip_by_value(y0, -2.0, h_float), tf.int32)
    # One gather of the (taps x taps) neighbourhood of every output pixel: (H, W, taps, taps, C).
    offsets = tf.constant([0, 1] if interpolation == "bilinear" else [-1, 0, 1, 2], tf.int32)
    rows = tf.clip_by_value(y0[..., None] + offsets, 0, height - 1)
    cols = tf.clip_by_value(x0[..., None] + offsets, 0, width - 1)
    index = rows[..., :, None] * width + cols[..., None, :]
    pixels = tf.reshape(tf.cast(image, tf.float64), [-1, shape[2]])
    taps = tf.gather(pixels, index)

    if interpolation == "bilinear":
        def lerp(v, t):  # along the tap axis (-2 after the channel axis)
            return v[..., 0, :] + (v[..., 1, :] - v[..., 0, :]) * t

        value = lerp(lerp(taps, dx), dy)  # first along x (each row), then along y
    else:
        def cubic(v, t):
            v1, v2, v3, v4 = v[..., 0, :], v[..., 1, :], v[..., 2, :], v[..., 3, :]
            p2 = -v1 + v3
            p3 = 2 * (v1 - v2) + v3 - v4
            p4 = -v1 + v2 - v3 + v4
            return v2 + t * (p2 + t * (p3 + t * p4))

        value = cubic(cubic(taps, dx), dy)
    value = tf.floor(tf.clip_by_value(value, 0.0, 255.0))
    fill_value = tf.broadcast_to(fill, tf.shape(value))
    return tf.cast(tf.where(inside[..., None], value, fill_value), tf.float32)


def affine_matrix(name: str, arg: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """float64 (6,) the inverse map of timm's geometric op `name` with argument `arg` (Rotate:
    degrees counter-clockwise; Translate*Rel: a fraction of the width / height)."""
    arg = tf.cast(arg, tf.float64)
    one = tf.constant(1.0, tf.float64)
    zero = tf.constant(0.0, tf.float64)
    h_float = tf.cast(height, tf.float64)
    w_float = tf.cast(width, tf.float64)
    if name == "Rotate":
        angle = -arg * (math.pi / 180.0)

        def round15(v):  # Pillow rounds the matrix entries to 15 decimals
            return tf.round(v * 1e15) / 1e15

        cos, sin = round15(tf.cos(angle)), round15(tf.sin(angle))
        centre_x, centre_y = w_float / 2.0, h_float / 2.0
        shift_x = cos * -centre_x + sin * -centre_y + centre_x
        shift_y = -sin * -centre_x + cos * -centre_y + centre_y
        return tf.stack([cos, sin, shift_x, -sin, cos, shift_y])
    if name == "ShearX":
        return tf.stack([one, arg, zero, zero, one, zero])
    if name == "ShearY":
        return tf.stack([one, zero, zero, arg, one, zero])
    if name == "TranslateXRel":
        return tf.stack([one, zero, arg * w_float, zero, one, zero])
    if name == "TranslateYRel":
        return tf.stack([one, zero, zero, zero, one, arg * h_float])
    raise ValueError(f"{name!r} is not a geometric op")


# --- Magnitude → op argument, and the ops by name.

def level_to_arg(name: str, magnitude: tf.Tensor, negate: tf.Tensor | bool = False):
    """timm's LEVEL_TO_ARG: op `name`'s argument at `magnitude` in [0, 10], None for the ops
    without one; `negate` is timm's random sign coin (ignored by unsigned ops)."""
    if not isinstance(magnitude, tf.Tensor):  # a Python float stays in double precision
        magnitude = tf.constant(magnitude, tf.float64)
    level = tf.cast(magnitude, tf.float64) / MAX_MAGNITUDE
    sign = tf.where(tf.cast(negate, tf.bool), tf.constant(-1.0, tf.float64), 1.0)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return sign * level * 30.0
    if name == "PosterizeIncreasing":
        return 4.0 - tf.floor(level * 4.0)
    if name == "SolarizeIncreasing":
        return 256.0 - tf.minimum(tf.floor(level * 256.0), 256.0)
    if name == "SolarizeAdd":
        return tf.minimum(tf.floor(level * 110.0), 128.0)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing"):
        return tf.maximum(1.0 + sign * level * 0.9, 0.1)
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * 0.45
    raise ValueError(f"unknown op {name!r}")


def apply_op(name: str, image: tf.Tensor, arg=None, *, fill=FILL,
             interpolation: str = "bicubic") -> tf.Tensor:
    """Op `name` with argument `arg` (from `level_to_arg`) on a uint8-valued float32 image."""
    if name in GEOMETRIC_OPS:
        shape = tf.shape(image)
        matrix = affine_matrix(name, arg, shape[0], shape[1])
        return affine(image, matrix, fill=fill, interpolation=interpolation)
    fn = _POINT_OPS[name]
    return fn(image) if arg is None else fn(image, arg)


# --- RandAugment and random erasing.

def sample_layers(seed: tf.Tensor, *, num_layers: int = 2, magnitude: float = 9.0,
                  magnitude_std: float = 0.5, probability: float = 0.5) -> dict[str, tf.Tensor]:
    """`rand_augment`'s random choices, each (num_layers,): `op`, `apply`, `magnitude` (clipped
    to [0, 10]), `negate` and `bicubic` (the interpolation="random" coin)."""
    op_seed, coin_seed, normal_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    ops = tf.random.stateless_uniform([num_layers], op_seed, minval=0, maxval=len(OPS),
                                      dtype=tf.int32)
    coins = tf.random.stateless_uniform([4, num_layers], coin_seed)
    if math.isinf(magnitude_std):
        drawn = coins[3] * magnitude
    else:
        drawn = magnitude + magnitude_std * tf.random.stateless_normal([num_layers], normal_seed)
    return {"op": ops, "apply": coins[0] < probability, "negate": coins[1] < 0.5,
            "bicubic": coins[2] < 0.5, "magnitude": tf.clip_by_value(drawn, 0.0, MAX_MAGNITUDE)}


def _random_op(image: tf.Tensor, op: tf.Tensor, magnitude: tf.Tensor, negate: tf.Tensor,
               bicubic: tf.Tensor, fill, interpolation: str) -> tf.Tensor:
    """OPS[op] at `magnitude`, chosen in the graph; one sampler serves the five geometric ops
    (only their matrix differs), which keeps the graph small and tracing fast."""
    point_names = [name for name in OPS if name not in GEOMETRIC_OPS]
    point_index = tf.gather([point_names.index(n) if n in point_names else -1 for n in OPS], op)
    geometric_index = tf.gather(
        [GEOMETRIC_OPS.index(n) if n in GEOMETRIC_OPS else -1 for n in OPS], op)
    shape = tf.shape(image)

    def point():
        return tf.switch_case(point_index, [
            lambda name=name: apply_op(name, image, level_to_arg(name, magnitude, negate))
            for name in point_names])

    def geometric():
        matrix = tf.switch_case(geometric_index, [
            lambda name=name: affine_matrix(name, level_to_arg(name, magnitude, negate),
                                            shape[0], shape[1])
            for name in GEOMETRIC_OPS])
        if interpolation != "random":
            return affine(image, matrix, fill=fill, interpolation=interpolation)
        return tf.cond(bicubic, lambda: affine(image, matrix, fill=fill, interpolation="bicubic"),
                       lambda: affine(image, matrix, fill=fill, interpolation="bilinear"))

    return tf.cond(geometric_index >= 0, geometric, point)


# The control flow is explicit; autograph would only slow tracing inside tf.data's map.
@tf.autograph.experimental.do_not_convert
def rand_augment(image: tf.Tensor, seed: tf.Tensor, *, num_layers: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5, probability: float = 0.5,
                 fill=FILL, interpolation: str = "bicubic") -> tf.Tensor:
    """timm's RandAugment "rand-m{magnitude}-n{num_layers}-mstd{magnitude_std}-inc1" on float32
    (H, W, 3) in [0, 255] with an int (2,) seed; returns uint8 values as float32. `interpolation`:
    "bicubic" (MAE's), "bilinear" or "random" (a coin per op, timm's default)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    image = quantise(image)
    layers = sample_layers(seed, num_layers=num_layers, magnitude=magnitude,
                           magnitude_std=magnitude_std, probability=probability)

    def layer(i, image):
        def augmented():
            return quantise(_random_op(image, layers["op"][i], layers["magnitude"][i],
                                       layers["negate"][i], layers["bicubic"][i], fill,
                                       interpolation))

        return i + 1, tf.cond(layers["apply"][i], augmented, lambda: image)

    # A loop rather than num_layers copies of the 15 ops in the graph.
    _, image = tf.while_loop(lambda i, _: i < num_layers, layer, (tf.constant(0), image))
    return image


def erasing_box(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, *,
                probability: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3,
                min_aspect: float = 0.3, attempts: int = 10) -> tf.Tensor:
    """int32 (top, left, h, w) of timm's RandomErasing rectangle (h = w = 0 when none): the
    first of `attempts` draws of area and log-uniform aspect that fits, placed uniformly."""
    draws = tf.random.stateless_uniform([5, attempts], seed, dtype=tf.float32)
    boxes = sample_boxes(draws, height, width, (min_area, max_area),
                         (min_aspect, 1 / min_aspect), wide=False)
    fits = (boxes[2] < height) & (boxes[3] < width)
    erase = tf.reduce_any(fits) & (draws[4, 0] < probability)
    box = boxes[:, tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)]
    return tf.where(erase, box, tf.zeros([4], tf.int32))


@tf.autograph.experimental.do_not_convert
def random_erasing(image: tf.Tensor, seed: tf.Tensor, *, probability: float = 0.25,
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   attempts: int = 10) -> tf.Tensor:
    """timm's RandomErasing(probability, mode="pixel", max_count=1) on a normalised float32
    (H, W, C) image: `erasing_box`'s rectangle gets per-pixel N(0, 1) noise."""
    box_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(image)
    top, left, box_h, box_w = tf.unstack(erasing_box(
        box_seed, shape[0], shape[1], probability=probability, min_area=min_area,
        max_area=max_area, min_aspect=min_aspect, attempts=attempts))
    rows = tf.range(shape[0])[:, None, None]
    cols = tf.range(shape[1])[None, :, None]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    noise = tf.random.stateless_normal(shape, noise_seed, dtype=image.dtype)
    return tf.where(inside, noise, image)
