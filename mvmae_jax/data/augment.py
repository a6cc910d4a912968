"""Per-example preprocessing in TensorFlow: the views of docs/method.md and evaluation crops.

All randomness is stateless and seeded per example (from the run's seed, the epoch and the
example's index), so a view does not depend on the order, the parallelism or the host that
produced it: the pipeline can restart anywhere and give the same pixels.
"""

from __future__ import annotations

import math

import tensorflow as tf


def random_resized_crop_box(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                            scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> tf.Tensor:
    """torchvision's RandomResizedCrop parameters, stateless: int32 (top, left, h, w).

    Up to `attempts` (area fraction, log-uniform aspect ratio) draws; the first whose crop fits
    wins; if none fits, the central crop with the aspect ratio clamped into `ratio`.
    """
    h_float = tf.cast(height, tf.float32)
    w_float = tf.cast(width, tf.float32)
    area = h_float * w_float
    draws = tf.random.stateless_uniform([4, attempts], seed, dtype=tf.float32)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * draws[1])
    crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    top = tf.cast(tf.floor(draws[2] * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(draws[3] * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    sampled = tf.stack([top[first], left[first], crop_h[first], crop_w[first]])

    in_ratio = w_float / h_float
    fallback_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_float * ratio[1]), tf.int32),
                          width)
    fallback_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_float / ratio[0]), tf.int32),
                          height)
    fallback = tf.stack([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h,
                         fallback_w])
    return tf.where(tf.reduce_any(fits), sampled, fallback)


def resize(image: tf.Tensor, size: tuple[int, int] | tf.Tensor) -> tf.Tensor:
    """Bilinear with antialiasing (as PIL when downscaling); float32 in [0, 255]."""
    return tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=True)


def normalise(image: tf.Tensor, mean, std) -> tf.Tensor:
    """[0, 255] → (x / 255 - mean) / std per channel."""
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image / 255.0 - mean) / std


def make_view(image: tf.Tensor, seed: tf.Tensor, size: int, scale, ratio,
              hflip: bool = True) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One random view: (pixels (size, size, 3) float in [0, 255], box (4,), flip ())."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    top, left, crop_h, crop_w = tf.unstack(
        random_resized_crop_box(box_seed, height, width, scale, ratio))
    crop = tf.image.crop_to_bounding_box(image, top, left, crop_h, crop_w)
    view = resize(crop, (size, size))
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5 if hflip else tf.constant(False)
    view = tf.cond(flip, lambda: tf.reverse(view, axis=[1]), lambda: view)
    h_float = tf.cast(height, tf.float32)
    w_float = tf.cast(width, tf.float32)
    box = tf.stack([tf.cast(top, tf.float32) / h_float, tf.cast(left, tf.float32) / w_float,
                    tf.cast(crop_h, tf.float32) / h_float, tf.cast(crop_w, tf.float32) / w_float])
    return view, box, tf.cast(flip, tf.int32)


def make_views(image: tf.Tensor, seed: tf.Tensor, *, size: int, num_views: int,
               same_crop: bool, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
               hflip: bool = True) -> dict[str, tf.Tensor]:
    """`num_views` views with their crop boxes and flips; shared when `same_crop`."""
    seeds = tf.random.experimental.stateless_split(seed, num_views)
    views, boxes, flips = [], [], []
    for v in range(num_views):
        if same_crop and v > 0:
            view, box, flip = views[0], boxes[0], flips[0]
        else:
            view, box, flip = make_view(image, seeds[v], size, scale, ratio, hflip)
        views.append(view)
        boxes.append(box)
        flips.append(flip)
    return {"views": tf.stack(views), "boxes": tf.stack(boxes), "flips": tf.stack(flips)}


def centre_crop(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Evaluation view: shorter side resized to size / crop_fraction, then the central square."""
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
    """The whole image resized to size x size, aspect not kept (the AMT bank's frame)."""
    return resize(image, (size, size))
