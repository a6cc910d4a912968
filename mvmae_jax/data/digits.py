"""`digits`: scikit-learn's 1,797 8x8 digit scans as a tfds data set of 32x32 RGB PNGs, with no
download; every fifth example is `test` (360), the rest `train` (1,437)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
TEST_EVERY = 5


def digit_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (n, size, size, 3) uint8 RGB, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are ink counts 0..16; white background, dark ink like a scan.
    grey = (255 - np.round(digits.images * (255 / 16))).astype(np.uint8)
    images = np.stack([
        np.asarray(Image.fromarray(g, "L").resize((size, size), Image.BICUBIC).convert("RGB"))
        for g in grey])
    return images, digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits, 32x32 RGB, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                             encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        images, labels = digit_images()
        test = np.arange(len(labels)) % TEST_EVERY == 0
        return {
            "train": self._generate_examples(images[~test], labels[~test]),
            "test": self._generate_examples(images[test], labels[test]),
        }

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}  # tfds encodes the PNG
