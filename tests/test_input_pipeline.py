"""Input pipelines: sources, views with crop boxes, host sharding, exact restart, bad data."""

from __future__ import annotations

import io
import itertools
import logging
import pathlib

import jax
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_config
from PIL import Image

from mvmae_jax import input_pipeline as ip
from mvmae_jax import sharding
from mvmae_jax.data import augment, sources
from mvmae_jax.data.digits import digit_images

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # normalise() = identity


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """A tfds data_dir in which the bundled digits builder has been prepared (offline)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    sources.TfdsSource("digits", data_dir, "train")
    return data_dir


def digits_config(data_dir, **overrides):
    config = tiny_config(**overrides)
    config.dataset.data_dir = data_dir
    return config


def photo_crops(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random crops of the two real photographs that scikit-learn ships."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = rng.integers(24, 200, 2)
        top, left = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
        crops.append(photo[top:top + h, left:left + w])
    return crops


MIXED_FORMATS = [  # (file name, PIL mode, format, save options)
    ("a.jpg", "RGB", "JPEG", {}),
    ("b.JPEG", "L", "JPEG", {}),
    ("c.png", "RGBA", "PNG", {}),
    ("d.PNG", "P", "PNG", {}),
    ("e.bmp", "RGB", "BMP", {}),
    ("f.gif", "P", "GIF", {}),
    ("g.webp", "RGB", "WEBP", {}),
    ("h.jpeg", "CMYK", "JPEG", {}),
    ("i.Jpg", "LA", "PNG", {}),  # a PNG behind a JPEG extension still decodes
]


def write_image_folder(root: pathlib.Path, classes: int = 2, per_class: int = 9,
                       broken: bool = True) -> list[str]:
    """Class sub-folders of real photo crops in mixed formats and modes, + 2 broken files."""
    rng = np.random.default_rng(0)
    crops = iter(photo_crops(classes * per_class, rng))
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for name, mode, fmt, options in itertools.islice(itertools.cycle(MIXED_FORMATS),
                                                         per_class):
            Image.fromarray(next(crops)).convert(mode).save(folder / f"{c}{name}", fmt,
                                                            **options)
    broken_names = []
    if broken:
        good = io.BytesIO()
        Image.fromarray(photo_crops(1, rng)[0]).save(good, "JPEG")
        (root / "class_0" / "truncated.jpg").write_bytes(good.getvalue()[:300])
        (root / "class_1" / "garbage.png").write_bytes(b"not an image at all" * 10)
        broken_names = [str(root / "class_0" / "truncated.jpg"),
                        str(root / "class_1" / "garbage.png")]
    (root / "class_0" / "notes.txt").write_text("ignored: not an image extension")
    return broken_names


def test_digits_builder_prepares_offline(digits_dir):
    """The bundled builder makes 1437 train / 360 test 32x32 RGB digits from scikit-learn."""
    train = sources.TfdsSource("digits", digits_dir, "train")
    test = sources.TfdsSource("digits", digits_dir, "test")
    assert (train.num_examples, test.num_examples, train.num_classes) == (1437, 360, 10)
    element = next(iter(train.elements(seed=None, epoch=0)))
    image = train.decode(element["encoded"])
    assert image.shape == (32, 32, 3) and image.dtype == tf.uint8
    images, labels = digit_images()
    assert images.shape == (1797, 32, 32, 3) and set(labels) == set(range(10))


@pytest.mark.parametrize("kind", ["tfds", "imagefolder"])
def test_hosts_read_disjoint_parts_whose_union_is_the_split(kind, digits_dir, tmp_path):
    """Simulated processes 0..2 of 3: disjoint example indices, together the whole split."""
    if kind == "tfds":
        def make(p):
            return sources.TfdsSource("digits", digits_dir, "test", p, 3)
    else:
        write_image_folder(tmp_path, broken=False)

        def make(p):
            return sources.ImageFolderSource(str(tmp_path), p, 3)
    parts = []
    for process in range(3):
        source = make(process)
        indices = [int(e["index"]) for e in source.elements(seed=7, epoch=1)]
        assert len(indices) == source.host_size == len(set(indices))
        parts.append(set(indices))
    union = set().union(*parts)
    assert sum(len(p) for p in parts) == len(union) == source.num_examples
    assert union == set(range(source.num_examples))


def coordinate_image(height: int, width: int) -> np.ndarray:
    """R encodes the row, G the column (each scaled to 0..255 when the image is larger), B is
    constant."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    rows = rows * min(1.0, 255 / (height - 1))
    cols = cols * min(1.0, 255 / (width - 1))
    return np.stack([rows, cols, np.full_like(rows, 77)], axis=-1).round().astype(np.uint8)


def encoded(image: np.ndarray, fmt: str = "PNG", **options) -> tf.Tensor:
    data = io.BytesIO()
    Image.fromarray(image).save(data, fmt, **options)
    return tf.constant(data.getvalue())


@pytest.mark.parametrize(("seed", "fmt", "height", "width", "size"), [
    *((seed, "PNG", 120, 200, 32) for seed in range(4)),
    *((seed, "JPEG", 120, 200, 32) for seed in range(2)),
    # Crops of 190 pixels or more at size 24: decoded at 1/4 or 1/8 scale.
    *((seed, "JPEG", 400, 600, 24) for seed in range(4)),
])
def test_crop_box_and_flip_describe_the_view_pixels(seed, fmt, height, width, size):
    """At each view pixel, the source coordinates it shows are the ones its box + flip give:
    from a PNG, a JPEG decoded inside the views' union and a JPEG decoded at reduced scale."""
    options = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    image = encoded(coordinate_image(height, width), fmt, **options)
    out = augment.make_views(image, tf.constant([seed, 3], tf.int64), size=size, num_views=2,
                             same_crop=False)
    assert out["views"].dtype == tf.uint8
    row_unit = max(1.0, (height - 1) / 255)  # source pixels per R level
    col_unit = max(1.0, (width - 1) / 255)
    # Resampling is exact on a linear ramp away from the border; a reduced-scale decode puts
    # the box on its coarser grid (up to 8 source pixels); JPEG adds about 1 level.
    slack = 1.0 if fmt == "PNG" else 2.0
    if height > 255:
        slack += 8 / row_unit
    for view, box, flip in zip(out["views"].numpy(), out["boxes"].numpy(),
                               out["flips"].numpy(), strict=True):
        top, left, h, w = box
        assert 0 <= top and 0 <= left and top + h <= 1 + 1e-6 and left + w <= 1 + 1e-6
        assert 0.2 - 0.03 <= h * w <= 1.0
        assert 3 / 4 - 0.06 <= (w * width) / (h * height) <= 4 / 3 + 0.06
        centre = (np.arange(size) + 0.5) / size
        u = 1 - centre if flip else centre
        want_rows = ((top + centre * h) * height - 0.5) / row_unit
        want_cols = ((left + u * w) * width - 0.5) / col_unit
        inner = slice(3, size - 3)
        np.testing.assert_allclose(view[inner, inner, 0], np.broadcast_to(
            want_rows[inner, None], (size - 6, size - 6)), atol=slack)
        np.testing.assert_allclose(view[inner, inner, 1], np.broadcast_to(
            want_cols[None, inner], (size - 6, size - 6)), atol=slack)


@pytest.mark.parametrize(("size", "scaled", "tolerance"), [(224, False, 3.0), (112, True, 5.5)])
def test_views_match_maes_bicubic_resize_of_their_box(size, scaled, tolerance):
    """Each view is within `tolerance` grey levels, on average over its pixels, of MAE's
    filter: PIL's bicubic resize of the view's own box of the PIL-decoded JPEG, flipped alike.
    At size 224 every crop of these 427x640 photographs is decoded at full scale; at 112 many
    are decoded at half scale."""
    from sklearn.datasets import load_sample_images

    differences, dct_scaled = [], 0
    for i, photo in enumerate(load_sample_images().images):
        data = encoded(photo, "JPEG", quality=90)
        pil = Image.open(io.BytesIO(data.numpy())).convert("RGB")
        for seed in range(8):
            out = augment.make_views(data, tf.constant([seed, i], tf.int64), size=size,
                                     num_views=2, same_crop=False)
            boxes = out["boxes"].numpy() * [pil.height, pil.width, pil.height, pil.width]
            dct_scaled += int(boxes[:, 2:].min() >= 2 * size)
            for view, (top, left, h, w), flip in zip(out["views"].numpy(), boxes,
                                                     out["flips"].numpy(), strict=True):
                reference = np.asarray(pil.resize((size, size), Image.BICUBIC,
                                                  box=(left, top, left + w, top + h)), float)
                reference = reference[:, ::-1] if flip else reference
                differences.append(np.abs(view - reference).mean())
    assert (dct_scaled > 0) == scaled
    assert max(differences) < tolerance, (np.mean(differences), max(differences))


def test_crop_boxes_follow_torchvisions_law_through_the_decoder():
    """make_views' boxes of a JPEG decoded at full scale are exactly random_resized_crop_box's
    for the same seeds: the fast decode keeps the law that test_random_resized_crop_matches_
    torchvision checks."""
    data = encoded(coordinate_image(300, 400), "JPEG")
    for seed in range(20):
        seed = tf.constant([seed, 5], tf.int64)
        out = augment.make_views(data, seed, size=224, num_views=2, same_crop=False)
        view_seeds = tf.random.experimental.stateless_split(seed, 2)
        for v in range(2):
            box_seed = tf.random.experimental.stateless_split(view_seeds[v], 2)[0]
            want = augment.random_resized_crop_box(box_seed, tf.constant(300), tf.constant(400))
            np.testing.assert_allclose(out["boxes"][v] * [300, 400, 300, 400], want, atol=1e-3)


def test_same_crop_shares_box_and_flip():
    """views.same_crop: the two views are the same pixels, box and flip."""
    out = augment.make_views(encoded(coordinate_image(50, 60)), tf.constant([1, 2], tf.int64),
                             size=16, num_views=2, same_crop=True)
    np.testing.assert_array_equal(out["views"][0], out["views"][1])
    np.testing.assert_array_equal(out["boxes"][0], out["boxes"][1])


def test_views_are_reversed_only_when_flipped():
    """The flip is a branch: no uint8 select, which would reverse and copy every view."""
    graph = tf.function(lambda data, seed: augment.make_views(
        data, seed, size=16, num_views=2, same_crop=False)).get_concrete_function(
        tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)).graph.as_graph_def()
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    assert any(n.op == "ReverseV2" for n in nodes)
    assert not [n.name for n in nodes if n.op in ("Select", "SelectV2")
                and n.attr["T"].type == tf.uint8.as_datatype_enum]


def test_random_resized_crop_matches_torchvision():
    """Box statistics match torchvision's RandomResizedCrop(scale=(0.2, 1)) on a 300x400 image."""
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    count = 4000
    seeds = tf.stack([tf.range(count, dtype=tf.int64), tf.zeros(count, tf.int64)], axis=1)
    ours = tf.function(lambda s: tf.map_fn(
        lambda seed: augment.random_resized_crop_box(seed, tf.constant(300), tf.constant(400)),
        s, fn_output_signature=tf.int32))(seeds).numpy()
    torch.manual_seed(0)
    image = torch.zeros(3, 300, 400)
    theirs = np.array([transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])
                       for _ in range(count)])
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert np.all((top >= 0) & (left >= 0) & (top + h <= 300) & (left + w <= 400))
    def stats(boxes):
        top, left, h, w = boxes.T.astype(np.float64)
        area = h * w / (300 * 400)
        return np.array([area.mean(), area.std(), np.log(w / h).mean(), np.log(w / h).std(),
                         (top / np.maximum(300 - h, 1)).mean()])
    np.testing.assert_allclose(stats(ours), stats(theirs), atol=0.02)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("restart_after", [2, 6])
def test_restart_reproduces_the_batches_exactly(digits_dir, restart_after):
    """Resuming at batch k's stream position yields batches k+1, ... bit for bit, also across
    an epoch boundary (5 batches of 256 per epoch of 1437)."""
    config = digits_config(digits_dir)
    source = ip.make_source(config)
    straight = _take(ip.host_train_batches(config, source, 256), 9)
    resumed = _take(ip.host_train_batches(config, source, 256,
                                          straight[restart_after].next_position),
                    9 - restart_after - 1)
    for want, got in zip(straight[restart_after + 1:], resumed, strict=True):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    epochs = [b["index"] for b in straight[:5]]
    assert len(set(np.concatenate(epochs))) == 5 * 256  # no repeats inside an epoch
    assert straight[5].next_position > source.host_size  # the 6th batch is in epoch 1


def test_batches_depend_on_the_seed(digits_dir):
    """Different seeds give different orders and views; the same seed the same ones."""
    a = next(ip.host_train_batches(digits_config(digits_dir, seed=1), ip.make_source(
        digits_config(digits_dir)), 32))
    b = next(ip.host_train_batches(digits_config(digits_dir, seed=1), ip.make_source(
        digits_config(digits_dir)), 32))
    c = next(ip.host_train_batches(digits_config(digits_dir, seed=2), ip.make_source(
        digits_config(digits_dir)), 32))
    np.testing.assert_array_equal(a["views"], b["views"])
    assert not np.array_equal(a["index"], c["index"])


def test_broken_files_are_skipped_and_named(tmp_path, caplog):
    """Two broken files: the others all come through, both are logged by name and counted."""
    broken = write_image_folder(tmp_path)
    source = sources.ImageFolderSource(str(tmp_path))
    assert source.num_examples == 20 and source.class_names == ["class_0", "class_1"]
    config = tiny_config(batch_size=6)
    with caplog.at_level(logging.WARNING):
        batches = _take(ip.host_train_batches(config, source, 6), 6)  # 2 epochs of 3 batches
    assert sorted(set(source.bad_images.names)) == sorted(broken)
    assert source.bad_images.count >= 2
    assert all(name in caplog.text for name in broken)
    seen = set(np.concatenate([b["index"] for b in batches[:3]]))
    broken_indices = {i for i, f in enumerate(source.files) if str(f) in broken}
    assert seen == set(range(20)) - broken_indices
    for batch in batches:
        assert batch["views"].dtype == np.uint8


def test_mixed_formats_decode_to_rgb(tmp_path):
    """JPEG (grey, CMYK), PNG (RGBA, palette, LA), BMP, GIF, WebP, odd-case extensions → RGB."""
    write_image_folder(tmp_path, classes=1, per_class=len(MIXED_FORMATS), broken=False)
    source = sources.ImageFolderSource(str(tmp_path))
    assert source.num_examples == len(MIXED_FORMATS)
    for name, element in zip(source.files, source.elements(seed=None, epoch=0), strict=True):
        image = source.decode(element["encoded"])
        want = np.asarray(Image.open(name).convert("RGB"))
        assert image.dtype == tf.uint8 and image.shape == want.shape, name
        if Image.open(name).format == "JPEG":  # JPEG decoders may differ by a few levels
            assert np.abs(image.numpy().astype(int) - want).mean() < 1.5, name
        else:
            np.testing.assert_array_equal(image, want, err_msg=name)


def test_small_images_are_upsampled():
    """A 5x7 image still gives full-size views and evaluation crops."""
    image = tf.constant(coordinate_image(5, 7))
    out = augment.make_views(encoded(coordinate_image(5, 7)), tf.constant([0, 0], tf.int64),
                             size=32, num_views=2, same_crop=False)
    assert out["views"].shape == (2, 32, 32, 3)
    assert augment.centre_crop(image, 32, 0.875).shape == (32, 32, 3)
    assert augment.whole_image(image, 32).shape == (32, 32, 3)


def test_flat_folder_has_no_labels(tmp_path):
    """A folder without class sub-folders: every image, label -1."""
    for i, crop in enumerate(photo_crops(3, np.random.default_rng(1))):
        Image.fromarray(crop).save(tmp_path / f"{i}.png")
    source = sources.ImageFolderSource(str(tmp_path))
    assert source.num_examples == 3 and source.num_classes is None
    assert {int(e["label"]) for e in source.elements(seed=None, epoch=0)} == {-1}


def test_clear_errors_at_start(tmp_path):
    """Missing path, empty folder, unprepared tfds data set: one message that says what to do."""
    with pytest.raises(sources.DataError, match="does not exist"):
        sources.ImageFolderSource(str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(sources.DataError, match="no images found"):
        sources.ImageFolderSource(str(tmp_path / "empty"))
    with pytest.raises(sources.DataError, match=r"tfds build mnist --data_dir="):
        sources.TfdsSource("mnist", str(tmp_path / "tfds"), "train")
    with pytest.raises(sources.DataError, match="unknown tfds data set 'no_such_set'"):
        sources.TfdsSource("no_such_set", str(tmp_path / "tfds"), "train")
    with pytest.raises(sources.DataError, match="has no split"):
        sources.TfdsSource("digits", str(tmp_path / "tfds2"), "validation")


@pytest.mark.parametrize("process_count", [1, 3])
def test_evaluation_covers_every_example_once(digits_dir, process_count):
    """Padded eval batches: every test example exactly once, same batch count on all hosts."""
    config = digits_config(digits_dir)
    seen, counts = [], set()
    for process in range(process_count):
        source = sources.TfdsSource("digits", digits_dir, "test", process, process_count)
        batches = list(ip.host_eval_batches(config, source, 32, process_count))
        counts.add(len(batches))
        for batch in batches:
            assert batch["image"].shape == (32, 16, 16, 3)
            valid = batch["valid"]
            assert np.all(batch["index"][~valid] == -1) and np.all(batch["label"][~valid] == -1)
            seen += list(batch["index"][valid])
    assert len(counts) == 1
    assert sorted(seen) == list(range(360))


def test_bank_batches_show_the_whole_image(tmp_path):
    """mode='bank': the whole image resized (no crop), in order, padding index -1."""
    Image.fromarray(coordinate_image(40, 80)).save(tmp_path / "x.png")
    source = sources.ImageFolderSource(str(tmp_path))
    config = tiny_config(**{"input.mean": RAW["mean"], "input.std": RAW["std"]})
    (batch,) = list(ip.host_eval_batches(config, source, 4, 1, mode="bank"))
    assert list(batch["index"]) == [0, -1, -1, -1]
    image = batch["image"][0]
    np.testing.assert_allclose(image[8, 2:-2, 1], ((np.arange(16) + 0.5) * 5 - 0.5)[2:-2],
                               atol=0.6)
    np.testing.assert_allclose(image[2:-2, 8, 0], ((np.arange(16) + 0.5) * 2.5 - 0.5)[2:-2],
                               atol=0.6)


def test_global_batches_on_the_mesh(digits_dir):
    """The prefetcher assembles host batches into global arrays split over the 8 devices."""
    config = digits_config(digits_dir, batch_size=16)
    mesh = sharding.make_mesh(jax.devices()[:8])
    batches = ip.train_batches(config, mesh, ip.make_source(config))
    batch, position = next(batches)
    batches.close()
    assert batch["views"].shape == (16, 2, 16, 16, 3)
    assert batch["views"].sharding == sharding.batch_sharding(mesh)
    assert position == 16
