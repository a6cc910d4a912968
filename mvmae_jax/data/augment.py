"""Per-example preprocessing in TensorFlow: the pretraining views and evaluation crops, uint8,
with stateless per-example randomness."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import tensorflow as tf

DCT_SCALES = (1, 2, 4, 8)  # libjpeg's scaled decodes


def sample_boxes(draws: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                 area: tuple[float, float], aspect: tuple[float, float], wide: bool) -> tf.Tensor:
    """int32 (4, attempts) boxes (top, left, h, w) from uniform `draws` (4+, attempts): area a
    fraction in `area`, aspect log-uniform in `aspect` (w / h if `wide`, else h / w), top-left
    uniform where the box fits."""
    target = tf.cast(height, tf.float32) * tf.cast(width, tf.float32) * (
        area[0] + (area[1] - area[0]) * draws[0])
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = tf.exp(log_lo + (log_hi - log_lo) * draws[1])
    long = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)  # half to even, as Python
    short = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
    box_h, box_w = (short, long) if wide else (long, short)
    # floor(u · n) can reach n when u rounds up to 1 in float32; keep the box inside.
    top = tf.cast(tf.floor(draws[2] * tf.cast(height - box_h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(draws[3] * tf.cast(width - box_w + 1, tf.float32)), tf.int32)
    return tf.stack([tf.minimum(top, height - box_h), tf.minimum(left, width - box_w), box_h,
                     box_w])


def random_resized_crop_box(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                            scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> tf.Tensor:
    """torchvision's RandomResizedCrop parameters, stateless: int32 (top, left, h, w); the central
    crop (aspect clamped into `ratio`) when none of the `attempts` draws fits."""
    draws = tf.random.stateless_uniform([4, attempts], seed, dtype=tf.float32)
    boxes = sample_boxes(draws, height, width, scale, ratio, wide=True)
    crop_h, crop_w = boxes[2], boxes[3]
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    sampled = boxes[:, tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)]
    h_float, w_float = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    in_ratio = w_float / h_float
    fallback_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_float * ratio[1]), tf.int32),
                          width)
    fallback_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_float / ratio[0]), tf.int32),
                          height)
    fallback = tf.stack([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h,
                         fallback_w])
    return tf.where(tf.reduce_any(fits), sampled, fallback)


def resize(image: tf.Tensor, size) -> tf.Tensor:
    """`image` resized to `size` (h, w), uint8: area averaging where both sides shrink (the
    cheapest antialiased filter), else antialiased bicubic, the filter of MAE's PIL pipeline."""
    shape = tf.shape(image)
    size = tf.convert_to_tensor(size, tf.int32)
    shrinks = (shape[0] >= size[0]) & (shape[1] >= size[1])
    resized = tf.cond(shrinks, lambda: tf.image.resize(image, size, method="area"),
                      lambda: tf.image.resize(image, size, method="bicubic", antialias=True))
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def normalise(image: tf.Tensor, mean, std) -> tf.Tensor:
    """Pixels in [0, 255] → float32 (x / 255 - mean) / std per channel."""
    mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG, PNG, GIF (first frame) or BMP bytes → uint8 RGB (H, W, 3)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _crop_views(image: tf.Tensor, boxes: tf.Tensor, flips: tf.Tensor, size: int) -> tf.Tensor:
    """(V, size, size, 3) uint8: each box (top, left, h, w) of `image` resized, maybe flipped."""
    views = []
    for v in range(boxes.shape[0]):
        top, left, height, width = tf.unstack(boxes[v])
        view = resize(image[top:top + height, left:left + width], (size, size))
        # tf.cond, not tf.where: a select would reverse and copy every view.
        views.append(tf.cond(flips[v], lambda view=view: tf.reverse(view, axis=[1]),
                             lambda view=view: view))
    return tf.stack(views)


def make_views(encoded: tf.Tensor, seed: tf.Tensor, *, size: int, num_views: int,
               same_crop: bool, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True,
               decode_fn: Callable[[tf.Tensor], tf.Tensor] = decode) -> dict[str, tf.Tensor]:
    """`num_views` random views of an encoded image: uint8 `views` (V, size, size, 3), `boxes`
    (V, 4) as fractions of the image, `flips` (V,); `same_crop`: all as the first view."""
    seeds = tf.random.experimental.stateless_split(seed, num_views)
    drawn = 1 if same_crop else num_views
    view_seeds = [tf.random.experimental.stateless_split(seeds[v], 2) for v in range(drawn)]
    if hflip:
        flips = tf.stack([tf.random.stateless_uniform([], s[1]) < 0.5 for s in view_seeds])
    else:
        flips = tf.zeros([drawn], tf.bool)

    def boxes_in(height, width):
        return tf.stack([random_resized_crop_box(s[0], height, width, scale, ratio)
                         for s in view_seeds])

    def from_jpeg():
        shape = tf.io.extract_jpeg_shape(encoded)
        boxes = boxes_in(shape[0], shape[1])
        # The coarsest scale at which every crop keeps `size` pixels on both sides.
        level = tf.reduce_sum(tf.cast(
            tf.reduce_min(boxes[:, 2:]) >= tf.constant(DCT_SCALES[1:]) * size, tf.int32))
        dct = tf.constant(DCT_SCALES)[level]
        # In the scaled image (ceil(h / dct) x ceil(w / dct)): each box, then their union.
        scaled_shape = -(-shape[:2] // dct)
        starts = boxes[:, :2] // dct
        ends = tf.minimum(-(-(boxes[:, :2] + boxes[:, 2:]) // dct), scaled_shape)
        union_start = tf.reduce_min(starts, axis=0)
        union_size = tf.reduce_max(ends, axis=0) - union_start
        window = tf.concat([union_start, union_size], 0)
        # decode_and_crop_jpeg takes its scale as a constant: one branch per scale.
        image = tf.switch_case(level, [
            functools.partial(tf.io.decode_and_crop_jpeg, encoded, window, channels=3, ratio=r)
            for r in DCT_SCALES])
        image.set_shape([None, None, 3])
        local = tf.concat([starts - union_start, ends - starts], axis=1)
        fractions = tf.cast(tf.concat([starts, ends - starts], 1), tf.float32) / tf.cast(
            tf.tile(scaled_shape, [2]), tf.float32)
        return _crop_views(image, local, flips, size), fractions

    def from_other():
        image = decode_fn(encoded)
        shape = tf.shape(image)
        boxes = boxes_in(shape[0], shape[1])
        fractions = tf.cast(boxes, tf.float32) / tf.cast(tf.tile(shape[:2], [2]), tf.float32)
        return _crop_views(image, boxes, flips, size), fractions

    views, boxes = tf.cond(tf.io.is_jpeg(encoded), from_jpeg, from_other)
    views.set_shape([drawn, size, size, 3])
    boxes.set_shape([drawn, 4])
    flips = tf.cast(flips, tf.int32)
    if same_crop and num_views > 1:
        views, boxes, flips = (tf.repeat(x, num_views, axis=0) for x in (views, boxes, flips))
    return {"views": views, "boxes": boxes, "flips": flips}


def centre_crop(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Evaluation view, uint8: shorter side resized to size / crop_fraction, then centre square."""
    shape = tf.shape(image)
    height = tf.cast(shape[0], tf.float32)
    width = tf.cast(shape[1], tf.float32)
    shorter = tf.minimum(height, width)
    target = size / crop_fraction
    new_h = tf.maximum(tf.cast(tf.round(height * target / shorter), tf.int32), size)
    new_w = tf.maximum(tf.cast(tf.round(width * target / shorter), tf.int32), size)
    resized = resize(image, tf.stack([new_h, new_w]))
    return tf.image.crop_to_bounding_box(resized, (new_h - size) // 2, (new_w - size) // 2,
                                         size, size)


def whole_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """The whole image resized to size x size, aspect not kept (the AMT bank's frame), uint8."""
    return resize(image, (size, size))
