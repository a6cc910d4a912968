"""RandAugment and random erasing (tf.data side of the fine-tuning recipe).

Each op against the Pillow call timm makes (exact: same bytes); the magnitude → argument maps
against timm's own; rand_augment as the composition of its sampled layers; the draws' law;
determinism, range, the identity at probability 0 and graph mode inside tf.data. Random erasing
against timm's RandomErasing in distribution, and its rectangle exactly.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import tensorflow as tf
import torch
from PIL import Image, ImageEnhance, ImageOps
from timm.data import auto_augment as timm_aa
from timm.data.random_erasing import RandomErasing

from mvmae_jax.data import randaugment as ra

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _images() -> list[np.ndarray]:
    """Noise (every value), a narrow-range image and smooth ramps: uint8 (19, 23, 3).

    One non-square size of odd sides, so that each op traces once in `_apply`.
    """
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:19, :23]
    ramps = np.stack([(x * 11) % 256, (y * 13) % 256, ((x + y) * 5) % 256], -1)
    return [rng.integers(0, 256, (19, 23, 3), dtype=np.uint8),
            np.clip(rng.normal(100, 15, (19, 23, 3)), 0, 255).astype(np.uint8),
            ramps.astype(np.uint8)]


# Graph mode: executing ~100 small ops eagerly costs more than tracing them once.
_apply = tf.function(ra.apply_op)


def _pillow(name: str, image: np.ndarray, arg, interpolation: str,
            fill=ra.FILL) -> np.ndarray:
    """The Pillow call of timm's op functions (timm.data.auto_augment), written out."""
    pil = Image.fromarray(image)
    width, height = pil.size
    geometric = dict(resample=RESAMPLE[interpolation], fillcolor=fill)

    def affine(matrix):
        return pil.transform(pil.size, Image.Transform.AFFINE, matrix, **geometric)

    if name == "PosterizeIncreasing" and arg == 0:
        # Pillow >= 11 rejects 0 bits; the older Pillow timm was written for kept no bit.
        return np.zeros_like(image, np.float32)
    out = {
        "AutoContrast": lambda: ImageOps.autocontrast(pil),
        "Equalize": lambda: ImageOps.equalize(pil),
        "Invert": lambda: ImageOps.invert(pil),
        "Rotate": lambda: pil.rotate(arg, **geometric),
        "PosterizeIncreasing": lambda: ImageOps.posterize(pil, int(arg)),
        "SolarizeIncreasing": lambda: ImageOps.solarize(pil, int(arg)),
        "SolarizeAdd": lambda: pil.point(
            [min(255, i + int(arg)) if i < 128 else i for i in range(256)] * 3),
        "ColorIncreasing": lambda: ImageEnhance.Color(pil).enhance(arg),
        "ContrastIncreasing": lambda: ImageEnhance.Contrast(pil).enhance(arg),
        "BrightnessIncreasing": lambda: ImageEnhance.Brightness(pil).enhance(arg),
        "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(pil).enhance(arg),
        "ShearX": lambda: affine((1, arg, 0, 0, 1, 0)),
        "ShearY": lambda: affine((1, 0, 0, arg, 1, 0)),
        "TranslateXRel": lambda: affine((1, 0, arg * width, 0, 1, 0)),
        "TranslateYRel": lambda: affine((1, 0, 0, 0, 1, arg * height)),
    }[name]()
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("name", ra.OPS)
def test_op_matches_pillow(name):
    """Every op at magnitudes 0 .. 10, both signs, on three images: Pillow's exact bytes.

    Point and colour ops are compared bit for bit. Geometric ops may differ where a sampling
    coordinate lands on a truncation boundary by float rounding (Pillow rounds the rotation
    matrix to 15 decimals in Python): allowed on at most 0.1% of the values, by at most 1.
    """
    geometric = name in ra.GEOMETRIC_OPS
    interpolations = ("bicubic", "bilinear") if geometric else ("bicubic",)
    signs = (False, True) if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel",
                                      "TranslateYRel", "ColorIncreasing", "ContrastIncreasing",
                                      "BrightnessIncreasing", "SharpnessIncreasing") else (False,)
    differing = total = 0
    for image in _images():
        for magnitude in (0.0, 2.5, 6.0, 9.0, 10.0):
            for negate in signs:
                arg = ra.level_to_arg(name, magnitude, negate)
                arg_value = None if arg is None else float(arg)
                for interpolation in interpolations:
                    ours = _apply(name, tf.constant(image, tf.float32), arg,
                                  interpolation=interpolation).numpy()
                    ref = _pillow(name, image, arg_value, interpolation)
                    assert ours.dtype == np.float32 and ours.shape == image.shape
                    if not geometric:
                        np.testing.assert_array_equal(
                            ours, ref, err_msg=f"{name} m={magnitude} negate={negate}")
                    else:
                        assert np.abs(ours - ref).max() <= 1, (name, magnitude, negate)
                        differing += int((ours != ref).sum())
                        total += ref.size
    if geometric:
        assert differing <= 1e-3 * total, (name, differing, total)


def test_geometric_fill_colour():
    """A non-default fill (timm's create_transform passes the normalisation mean) as Pillow's."""
    image = _images()[2]
    fill = (124, 116, 104)
    ours = ra.apply_op("Rotate", tf.constant(image, tf.float32), 25.0, fill=fill).numpy()
    ref = _pillow("Rotate", image, 25.0, "bicubic", fill=fill)
    np.testing.assert_array_equal(ours, ref)
    assert (ours == np.asarray(fill, np.float32)).all(axis=-1).sum() > 20  # corners uncovered


@pytest.mark.parametrize("magnitude", [0.0, 1.7, 4.2, 9.0, 9.6, 10.0])
def test_level_to_arg_matches_timm(magnitude, monkeypatch):
    """Our magnitude → argument map equals timm's LEVEL_TO_ARG, both outcomes of its sign coin
    (timm negates when random.random() > 0.5)."""
    hparams = dict(timm_aa._HPARAMS_DEFAULT)
    for negate in (False, True):
        monkeypatch.setattr(timm_aa.random, "random", lambda negate=negate: 1.0 if negate else 0.0)
        for name in ra.OPS:
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            ours = ra.level_to_arg(name, magnitude, negate)
            if level_fn is None:
                assert ours is None
                continue
            (expected,) = level_fn(magnitude, hparams)
            assert float(ours) == pytest.approx(expected, abs=1e-12), (name, magnitude, negate)


def _compose(image: np.ndarray, layers: dict, interpolation: str = "bicubic") -> np.ndarray:
    """rand_augment spelled out from its sampled layers."""
    out = tf.constant(np.round(image), tf.float32)
    for layer in range(len(layers["op"])):
        if not layers["apply"][layer]:
            continue
        name = ra.OPS[layers["op"][layer]]
        arg = ra.level_to_arg(name, layers["magnitude"][layer], layers["negate"][layer])
        if interpolation == "random":
            interpolation_used = "bicubic" if layers["bicubic"][layer] else "bilinear"
        else:
            interpolation_used = interpolation
        out = _apply(name, out, arg, interpolation=interpolation_used)
    return out.numpy()


@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_rand_augment_is_the_composition_of_its_layers(interpolation):
    """For many seeds, rand_augment equals its sampled ops applied in order; 3 layers, p = 0.8."""
    image = _images()[2].astype(np.float32) + 0.3  # not yet integers: the op rounds first
    kwargs = dict(num_layers=3, magnitude=7.0, magnitude_std=1.0, probability=0.8)
    ops_seen = set()
    for i in range(12):
        seed = tf.constant([i, 11], tf.int32)
        layers = {k: v.numpy() for k, v in ra.sample_layers(seed, **kwargs).items()}
        ops_seen.update(layers["op"][layers["apply"]].tolist())
        ours = ra.rand_augment(tf.constant(image), seed, interpolation=interpolation,
                               **kwargs).numpy()
        np.testing.assert_array_equal(ours, _compose(image, layers, interpolation))
    assert len(ops_seen) >= 8


def test_sample_layers_law():
    """Op uniform over the 15 with replacement; apply with p; magnitude N(9, 0.5) clipped to
    [0, 10]; fair sign coin. 15,000 layers from one seed, 5-sigma bounds."""
    n = 15000
    layers = {k: v.numpy() for k, v in ra.sample_layers(
        tf.constant([3, 4], tf.int32), num_layers=n, magnitude=9.0, magnitude_std=0.5,
        probability=0.3).items()}
    counts = np.bincount(layers["op"], minlength=len(ra.OPS))
    assert len(counts) == len(ra.OPS)
    expected = n / len(ra.OPS)
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)
    assert abs(layers["apply"].mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    assert abs(layers["negate"].mean() - 0.5) < 5 * math.sqrt(0.25 / n)
    assert abs(layers["bicubic"].mean() - 0.5) < 5 * math.sqrt(0.25 / n)
    magnitude = layers["magnitude"]
    assert magnitude.min() >= 0.0 and magnitude.max() == 10.0
    p_clipped = 0.5 * math.erfc((10.0 - 9.0) / 0.5 / math.sqrt(2))  # P(N(9, .5) >= 10)
    assert abs((magnitude == 10.0).mean() - p_clipped) < 5 * math.sqrt(p_clipped / n)
    below = magnitude[magnitude < 10.0]
    assert abs(np.median(below) - 8.99) < 0.03  # median of N(9, .5) truncated above at 10
    assert abs(np.std(below) - 0.5) < 0.05

    uniform = ra.sample_layers(tf.constant([3, 4], tf.int32), num_layers=n, magnitude=9.0,
                               magnitude_std=float("inf"))["magnitude"].numpy()
    assert uniform.min() >= 0.0 and uniform.max() <= 9.0 and abs(uniform.mean() - 4.5) < 0.15


def test_rand_augment_determinism_range_identity():
    image = tf.constant(_images()[0], tf.float32)
    outs = [ra.rand_augment(image, tf.constant([i, 0], tf.int32), probability=1.0).numpy()
            for i in range(6)]
    again = ra.rand_augment(image, tf.constant([0, 0], tf.int32), probability=1.0).numpy()
    np.testing.assert_array_equal(outs[0], again)
    assert len({o.tobytes() for o in outs}) == len(outs)  # different seeds, different results
    for out in outs:
        assert out.dtype == np.float32 and out.shape == image.shape
        assert out.min() >= 0 and out.max() <= 255
        np.testing.assert_array_equal(out, np.round(out))

    raw = tf.constant(_images()[1], tf.float32) * 1.3 - 20.0  # off-grid, some outside [0, 255]
    for i in range(4):
        out = ra.rand_augment(raw, tf.constant([i, 5], tf.int32), probability=0.0).numpy()
        np.testing.assert_array_equal(out, np.clip(np.round(raw.numpy()), 0, 255))
        normalised = tf.random.stateless_normal([12, 10, 3], [i, 1])
        np.testing.assert_array_equal(
            ra.random_erasing(normalised, tf.constant([i, 6], tf.int32), probability=0.0),
            normalised)


def test_graph_mode_in_tf_data():
    """Inside Dataset.map (graph mode, parallel calls) the same seeds give the eager results."""
    images = np.stack(_images() * 2).astype(np.float32)
    seeds = np.stack([np.arange(6), np.full(6, 9)], 1).astype(np.int64)

    def augment(image, seed):
        seed_ra, seed_re = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        augmented = ra.rand_augment(image, seed_ra, probability=0.9)
        return augmented, ra.random_erasing(augmented / 255.0, seed_re, probability=0.7)

    dataset = tf.data.Dataset.from_tensor_slices((images, seeds))
    dataset = dataset.map(augment, num_parallel_calls=4, deterministic=True)
    for (graph_ra, graph_re), image, seed in zip(dataset, images, seeds, strict=True):
        eager_ra, eager_re = augment(tf.constant(image), tf.constant(seed))
        np.testing.assert_array_equal(graph_ra.numpy(), eager_ra.numpy())
        np.testing.assert_array_equal(graph_re.numpy(), eager_re.numpy())


def _timm_boxes(count: int, height: int, width: int, probability: float) -> np.ndarray:
    """(count, 3) erased?, rows, cols of timm's RandomErasing, read off its output."""
    random.seed(0)
    torch.manual_seed(0)
    eraser = RandomErasing(probability=probability, mode="pixel", max_count=1, device="cpu")
    out = []
    for _ in range(count):
        image = torch.full((3, height, width), 1e4)  # noise never reaches this value
        erased = (eraser(image) != 1e4).any(0).numpy()
        rows, cols = np.nonzero(erased.any(1))[0], np.nonzero(erased.any(0))[0]
        out.append([erased.any(), len(rows), len(cols)])
    return np.asarray(out)


def test_random_erasing_law_matches_timm():
    """3,000 draws each: erased fraction ≈ probability, box area fraction and aspect ratio of the
    same law as timm's RandomErasing (means within 5 standard errors), sizes within bounds."""
    n, height, width, probability = 3000, 32, 40, 0.25
    seeds = tf.stack([tf.range(n), tf.fill([n], 17)], axis=1)
    boxes = tf.function(lambda seeds: tf.map_fn(
        lambda s: ra.erasing_box(s, height, width, probability=probability), seeds))(seeds)
    boxes = boxes.numpy()
    erased = boxes[:, 2] * boxes[:, 3] > 0
    assert abs(erased.mean() - probability) < 5 * math.sqrt(probability * (1 - probability) / n)
    top, left, box_h, box_w = boxes[erased].T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + box_h <= height).all() and (left + box_w <= width).all()
    assert (box_h < height).all() and (box_w < width).all()
    area = box_h * box_w / (height * width)
    # h, w are rounded: each is off by at most 1/2 from sqrt(area · aspect), sqrt(area / aspect)
    slack = (box_h + box_w + 0.5) / (2 * height * width)
    assert (area >= 0.02 - slack).all() and (area <= 1 / 3 + slack).all()

    reference = _timm_boxes(n, height, width, probability)
    ref_erased = reference[:, 0].astype(bool)
    assert abs(ref_erased.mean() - erased.mean()) < 5 * math.sqrt(2 * 0.25 * 0.75 / n)
    ref_area = reference[ref_erased, 1] * reference[ref_erased, 2] / (height * width)
    log_aspect = np.log(box_h / box_w)
    ref_log_aspect = np.log(reference[ref_erased, 1] / reference[ref_erased, 2])
    for ours_values, ref_values in ((area, ref_area), (log_aspect, ref_log_aspect)):
        stderr = math.sqrt(ours_values.var() / len(ours_values)
                           + ref_values.var() / len(ref_values))
        assert abs(ours_values.mean() - ref_values.mean()) < 5 * stderr


def test_random_erasing_rectangle_exactly():
    """The changed pixels are exactly erasing_box's rectangle, filled with N(0, 1) noise."""
    erased_count = 0
    noise = []
    for i in range(40):
        image = tf.random.stateless_normal([24, 28, 3], [i, 2]) * 0.1 + 5.0  # far from noise
        seed = tf.constant([i, 3], tf.int32)
        out = ra.random_erasing(image, seed, probability=0.5).numpy()
        box_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        top, left, box_h, box_w = ra.erasing_box(box_seed, 24, 28, probability=0.5).numpy()
        mask = np.zeros((24, 28), bool)
        mask[top:top + box_h, left:left + box_w] = True
        changed = (out != image.numpy()).any(-1)
        np.testing.assert_array_equal(changed, mask)
        np.testing.assert_array_equal(out[~mask], image.numpy()[~mask])
        erased_count += int(mask.any())
        noise.append(out[mask].ravel())
    assert 8 <= erased_count <= 32
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
