"""Tests for the procedural shapes dataset (showtell_dist.data.synthetic)."""

import collections
import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from showtell_dist.data import synthetic
from showtell_dist.data.synthetic import (
    COLOURS,
    MARKER_FILENAME,
    SHAPES,
    SPLITS,
    VOCABULARY,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    sample_scene,
)
from showtell_dist.errors import ConfigError, DataError

SMALL = dict(num_train=20, num_val=6, num_test=6)


def read_captions(out_dir):
    """Returns {image file name: [captions]} from captions.csv, checking its header."""
    with open(os.path.join(out_dir, "captions.csv"), encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["image", "caption"]
        captions = collections.defaultdict(list)
        for image, caption in reader:
            captions[image].append(caption)
    return captions


def read_split(out_dir, split):
    with open(os.path.join(out_dir, f"{split}_split_filenames.txt"), encoding="utf-8") as f:
        return f.read().splitlines()


def all_files(out_dir):
    """Returns {relative path: bytes} for every file under out_dir."""
    files = {}
    for root, _, names in os.walk(out_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, out_dir)] = f.read()
    return files


def colour_pixels(path):
    """Returns the (x, name) of every saturated pixel, named by the nearest palette colour."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    saturated = pixels.max(axis=2) - pixels.min(axis=2) > 60
    ys, xs = np.nonzero(saturated)
    palette_names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in palette_names], dtype=np.float64)
    distances = np.linalg.norm(pixels[ys, xs][:, None, :] - palette[None, :, :], axis=2)
    names = np.array(palette_names)[np.argmin(distances, axis=1)]
    return xs, ys, names


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("shapes"))
    summary = generate_shapes_dataset(out_dir, num_train=90, num_val=10, num_test=10, seed=7)
    return out_dir, summary


def generated_files(out_dir, **kwargs):
    """Generates a small dataset into out_dir and returns its files."""
    generate_shapes_dataset(out_dir, **SMALL, **kwargs)
    return all_files(out_dir)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    first = generated_files(str(tmp_path / "a"), seed=1)
    second = generated_files(str(tmp_path / "b"), seed=1)
    other = generated_files(str(tmp_path / "c"), seed=2)
    assert first == second
    assert first.keys() == other.keys()
    assert first["captions.csv"] != other["captions.csv"]
    image_names = [name for name in first if name.startswith("images")]
    assert all(first[name] != other[name] for name in image_names)


def test_layout_splits_and_summary(dataset):
    out_dir, summary = dataset
    captions = read_captions(out_dir)
    splits = {split: read_split(out_dir, split) for split in SPLITS}
    assert {split: len(names) for split, names in splits.items()} == {"train": 90, "val": 10, "test": 10}
    assert summary["splits"] == {"train": 90, "val": 10, "test": 10}
    listed = [name for names in splits.values() for name in names]
    assert len(listed) == len(set(listed)), "splits overlap"
    assert sorted(listed) == sorted(os.listdir(os.path.join(out_dir, "images")))
    assert sorted(captions) == sorted(listed)
    for name in listed:
        assert len(set(captions[name])) >= 3, name
    assert summary["num_images"] == 110
    assert summary["num_captions"] == sum(len(c) for c in captions.values())
    assert set(summary["vocabulary"]) <= set(VOCABULARY)


def test_captions_use_only_the_vocabulary_and_are_short(dataset):
    out_dir, _ = dataset
    for caption_list in read_captions(out_dir).values():
        for caption in caption_list:
            words = caption.split(" ")
            assert caption == caption.lower() and caption.strip() == caption
            assert all(word for word in words), f"double space in {caption!r}"
            assert set(words) <= set(VOCABULARY), caption
            assert len(words) <= 16, caption


def test_images_decode_as_rgb_jpeg_of_the_given_size(tmp_path):
    out_dir = str(tmp_path / "shapes48")
    generate_shapes_dataset(out_dir, num_train=8, num_val=2, num_test=2, image_size=48)
    for name in os.listdir(os.path.join(out_dir, "images")):
        data = tf.io.read_file(os.path.join(out_dir, "images", name))
        assert tf.io.is_jpeg(data)
        image = tf.io.decode_jpeg(data)
        assert image.shape == (48, 48, 3)
        assert image.dtype == tf.uint8


def test_single_shape_captions_name_the_colour_and_size_seen(dataset):
    out_dir, _ = dataset
    checked = 0
    for name, caption_list in read_captions(out_dir).items():
        single = [c for c in caption_list if c.startswith("a single ")]
        if not single:
            continue
        _, _, size_word, colour, shape = single[0].split(" ")
        assert shape in SHAPES
        xs, _, names = colour_pixels(os.path.join(out_dir, "images", name))
        counts = collections.Counter(names.tolist())
        assert counts.most_common(1)[0][0] == colour, (name, single[0], counts)
        shape_xs = xs[names == colour]
        width = shape_xs.max() - shape_xs.min() + 1
        if size_word in ("small", "little"):
            assert width <= 16, (name, single[0], width)
        else:
            assert width >= 22, (name, single[0], width)
        checked += 1
    assert checked >= 10


def test_two_shape_captions_name_colours_left_to_right(dataset):
    out_dir, _ = dataset
    checked = 0
    for name, caption_list in read_captions(out_dir).items():
        relations = [c for c in caption_list if " to the left of " in c]
        if not relations:
            continue
        left, right = (part.split(" ")[-2] for part in relations[0].split(" to the left of "))
        if left == right:
            continue
        xs, _, names = colour_pixels(os.path.join(out_dir, "images", name))
        assert np.sum(names == left) > 30 and np.sum(names == right) > 30, (name, relations[0])
        assert xs[names == left].mean() < xs[names == right].mean(), (name, relations[0])
        checked += 1
    assert checked >= 10


def test_scene_attributes_are_roughly_uniform():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, 64) for _ in range(600)]
    counts = collections.Counter(len(scene.objects) for scene in scenes)
    assert all(150 <= counts[n] <= 250 for n in (1, 2, 3)), counts
    objects = [obj for scene in scenes for obj in scene.objects]
    for attribute, values in (("colour", COLOURS), ("shape", SHAPES), ("size", ("small", "large"))):
        frequencies = collections.Counter(getattr(obj, attribute) for obj in objects)
        expected = len(objects) / len(values)
        assert all(0.8 * expected <= frequencies[v] <= 1.2 * expected for v in values), frequencies
    for scene in scenes:
        xs = [obj.x for obj in scene.objects]
        assert xs == sorted(xs)
        kinds = [(obj.colour, obj.shape) for obj in scene.objects]
        assert len(kinds) == len(set(kinds))


def test_ensure_generates_once_and_regenerates_when_arguments_change(tmp_path):
    out_dir = str(tmp_path / "data" / "shapes")
    assert ensure_shapes_dataset(out_dir, **SMALL, seed=0) is True
    with open(os.path.join(out_dir, MARKER_FILENAME), encoding="utf-8") as f:
        assert json.load(f)["kwargs"]["seed"] == 0
    before = all_files(out_dir)
    assert ensure_shapes_dataset(out_dir, **SMALL, seed=0) is False
    assert all_files(out_dir) == before

    assert ensure_shapes_dataset(out_dir, **SMALL, seed=5) is True
    after = all_files(out_dir)
    assert after["captions.csv"] != before["captions.csv"]
    assert ensure_shapes_dataset(out_dir, **SMALL, seed=5) is False
    assert sorted(os.listdir(tmp_path / "data")) == ["shapes"], "temporary directories left behind"


def test_ensure_regenerates_a_dataset_without_marker(tmp_path):
    out_dir = str(tmp_path / "shapes")
    generate_shapes_dataset(out_dir, **SMALL)
    assert ensure_shapes_dataset(out_dir, **SMALL) is True
    assert os.path.exists(os.path.join(out_dir, MARKER_FILENAME))


def test_ensure_refuses_to_replace_a_foreign_directory(tmp_path):
    out_dir = tmp_path / "precious"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="notes.txt"):
        ensure_shapes_dataset(str(out_dir), **SMALL)
    assert (out_dir / "notes.txt").read_text() == "keep me"


def test_ensure_rejects_unknown_arguments(tmp_path):
    with pytest.raises(TypeError):
        ensure_shapes_dataset(str(tmp_path / "shapes"), num_images=5)


@pytest.mark.parametrize(
    "kwargs", [dict(num_train=-1), dict(seed=-3), dict(image_size=16), dict(num_val=2.5)]
)
def test_invalid_arguments_raise_config_error(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        generate_shapes_dataset(str(tmp_path / "shapes"), **kwargs)


def test_vocabulary_is_small_and_fully_used(dataset):
    _, summary = dataset
    assert len(VOCABULARY) <= 40
    assert len(VOCABULARY) == len(set(VOCABULARY))
    assert set(summary["vocabulary"]) == set(VOCABULARY)
    assert synthetic.__all__ and all(hasattr(synthetic, name) for name in synthetic.__all__)
