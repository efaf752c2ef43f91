"""A procedural "shapes" captioning dataset, the toolkit's embedded default.

Every image shows one to three solid shapes (circle, square, triangle) in a
handful of clearly distinct colours and two sizes on a light, faintly noisy
background. The shapes never overlap and their centres are horizontally
separated, so "left of" / "right of" is always well defined. Each image gets
four differently worded captions, all true, covering colour, shape, size,
relative position and count, written with the small fixed `VOCABULARY`.

The dataset is written in the same on-disk layout as a real captioning
dataset (the "tutorial" layout), so every loader in the toolkit reads it
unchanged::

    out_dir/images/{image_id}.jpg         RGB JPEG, image_size x image_size
    out_dir/captions.csv                  header "image,caption", one row per caption
    out_dir/train_split_filenames.txt     one image file name per line
    out_dir/val_split_filenames.txt
    out_dir/test_split_filenames.txt

Generation is deterministic: the same seed and arguments produce
byte-identical files. Each image draws from its own random generator seeded
by ``(seed, split, index)``, so an image does not depend on how many images
the other splits hold.

`ensure_shapes_dataset` is the entry point for training scripts: it
generates the dataset once, atomically, and records the arguments in a
``GENERATED.json`` marker so later calls (or other workers) reuse it.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from showtell_dist.errors import ConfigError, DataError

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "VOCABULARY",
    "MARKER_FILENAME",
    "SceneObject",
    "Scene",
    "sample_scene",
    "render_scene",
    "describe_scene",
    "generate_shapes_dataset",
    "ensure_shapes_dataset",
]

#: Fill colour (RGB) of each colour word. The colours are far apart in RGB and
#: strongly saturated, so they stay unambiguous after JPEG compression.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 85, 220),
    "yellow": (240, 205, 20),
    "purple": (140, 50, 185),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Size classes, smallest first, with the words a caption may use for each.
SIZES: tuple[str, ...] = ("small", "large")
_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "large": ("large", "big"),
}

#: Radius range (inclusive, as fractions of the image side) of each size
#: class: about 6-7 px for small and 11-13 px for large shapes at 64x64.
_RADIUS_FRACTIONS: dict[str, tuple[float, float]] = {
    "small": (0.094, 0.110),
    "large": (0.172, 0.203),
}

#: Every word any caption can use (punctuation marks are separate words).
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {
            "a", "single", "one", "two", "three", "shape", "shapes",
            "on", "its", "own", "there", "is", "only", "and", "with",
            "to", "the", "left", "right", "of", "between", ":", ",",
            *COLOURS,
            *SHAPES,
            *(word for words in _SIZE_WORDS.values() for word in words),
        }
    )
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
MARKER_FILENAME = "GENERATED.json"
_LAYOUT_ENTRIES = (
    "images",
    "captions.csv",
    *(f"{split}_split_filenames.txt" for split in SPLITS),
    MARKER_FILENAME,
)

_MAX_OBJECTS = 3
_JPEG_QUALITY = 92
_BACKGROUND_LEVELS = (222, 246)  # inclusive range of the background grey level
_BACKGROUND_NOISE_STD = 3.0
_COLOUR_JITTER = 12  # each fill channel varies by at most this much
_BORDER_MARGIN = 1  # pixels kept free between a shape and the image border
_SHAPE_GAP = 2  # bounding boxes of two shapes are at least this far apart, edge to edge
_MIN_CENTRE_OFFSET = 2  # how far a centre lies horizontally beyond the other shape's edge
_PLACEMENT_ATTEMPTS = 1000
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SceneObject:
    """One shape: its caption attributes and where it is drawn.

    ``(x, y)`` is the centre in pixels and ``radius`` the half side of the
    shape's square bounding box.
    """

    colour: str
    shape: str
    size: str
    x: int
    y: int
    radius: int


@dataclass(frozen=True)
class Scene:
    """The content of one image: its objects sorted left to right."""

    image_size: int
    background_level: int
    objects: tuple[SceneObject, ...]


def sample_scene(rng: np.random.Generator, image_size: int) -> Scene:
    """Draws a random scene of one to three shapes.

    The number of shapes, the colours, the shapes and the sizes are each
    close to uniformly distributed, so a model that ignores the image cannot
    caption well. No two objects in a scene share both colour and shape, so
    even captions that leave out sizes name each object unambiguously.
    """
    num_objects = int(rng.integers(1, _MAX_OBJECTS + 1))
    kinds = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    chosen_kinds = rng.choice(len(kinds), size=num_objects, replace=False)
    sizes = [SIZES[i] for i in rng.integers(0, len(SIZES), size=num_objects)]
    radii = np.array([_sample_radius(rng, size, image_size) for size in sizes])
    xs, ys = _place(rng, radii, image_size)
    objects = [
        SceneObject(*kinds[kind], size, int(x), int(y), int(radius))
        for kind, size, x, y, radius in zip(chosen_kinds, sizes, xs, ys, radii)
    ]
    objects.sort(key=lambda obj: obj.x)
    background_level = int(rng.integers(_BACKGROUND_LEVELS[0], _BACKGROUND_LEVELS[1] + 1))
    return Scene(image_size, background_level, tuple(objects))


def _sample_radius(rng: np.random.Generator, size: str, image_size: int) -> int:
    low, high = (round(fraction * image_size) for fraction in _RADIUS_FRACTIONS[size])
    return int(rng.integers(low, high + 1))


def _place(rng: np.random.Generator, radii: np.ndarray, image_size: int) -> tuple[list[int], list[int]]:
    """Chooses centres for shapes of the given radii, one shape at a time.

    A layout is valid when every shape lies inside the image with a margin,
    no two bounding boxes come closer than `_SHAPE_GAP`, and each centre lies
    horizontally beyond the other shape's extent (so which of two shapes is
    further left is visually obvious); horizontally overlapping shapes are
    therefore stacked vertically. Each shape's centre is drawn uniformly from
    the positions still valid given the shapes already placed; if none is
    left, the layout starts over.
    """
    coords = np.arange(image_size)
    for _ in range(_PLACEMENT_ATTEMPTS):
        xs: list[int] = []
        ys: list[int] = []
        for radius in radii:
            inside = (coords >= radius + _BORDER_MARGIN) & (coords < image_size - radius - _BORDER_MARGIN)
            valid = inside[:, None] & inside[None, :]  # indexed [y, x]
            for x, y, other in zip(xs, ys, radii):
                dx = np.abs(coords - x)
                dy = np.abs(coords - y)
                reach = radius + other + _SHAPE_GAP
                valid &= (dx >= max(radius, other) + _MIN_CENTRE_OFFSET)[None, :]
                valid &= (dx >= reach)[None, :] | (dy >= reach)[:, None]
            cells = np.flatnonzero(valid)
            if cells.size == 0:
                break
            y, x = divmod(int(cells[rng.integers(cells.size)]), image_size)
            xs.append(x)
            ys.append(y)
        else:
            return xs, ys
    raise ConfigError(
        f"could not place {len(radii)} shapes in a {image_size}x{image_size} image; use a larger image_size"
    )


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draws the scene as an RGB image; `rng` supplies the background noise and colour jitter."""
    side = scene.image_size
    noise = rng.normal(0.0, _BACKGROUND_NOISE_STD, size=(side, side, 1))
    background = np.clip(np.rint(scene.background_level + noise), 0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(background, 3, axis=2), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255))
        left, top, right, bottom = obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(obj.x, top), (right, bottom), (left, bottom)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


def describe_scene(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Returns four differently worded true captions of the scene.

    Captions are lower case, at most 15 words, with words (including the
    punctuation marks ":" and ",") separated by single spaces. `rng` picks
    the size synonyms ("large"/"big", "small"/"little").
    """

    def full(obj: SceneObject) -> str:
        size_word = _SIZE_WORDS[obj.size][int(rng.integers(0, len(_SIZE_WORDS[obj.size])))]
        return f"{size_word} {obj.colour} {obj.shape}"

    def plain(obj: SceneObject) -> str:
        return f"{obj.colour} {obj.shape}"

    objects = scene.objects
    if len(objects) == 1:
        (only,) = objects
        return [
            f"a {full(only)}",
            f"a single {full(only)}",
            f"one {full(only)} on its own",
            f"there is only one shape , a {full(only)}",
        ]
    if len(objects) == 2:
        left, right = objects
        return [
            f"a {full(left)} to the left of a {full(right)}",
            f"a {full(right)} to the right of a {full(left)}",
            f"two shapes : a {full(left)} and a {full(right)}",
            f"a {full(left)} on the left and a {full(right)} on the right",
        ]
    if len(objects) == 3:
        left, middle, right = objects
        return [
            f"three shapes : a {plain(left)} , a {plain(middle)} and a {plain(right)}",
            f"a {full(middle)} between a {full(left)} and a {full(right)}",
            f"a {full(left)} , a {full(middle)} and a {full(right)}",
            f"three shapes with a {full(right)} on the right",
        ]
    raise ValueError(f"scenes hold 1 to {_MAX_OBJECTS} objects, got {len(objects)}")


def generate_shapes_dataset(
    out_dir: str,
    *,
    num_train: int = 3000,
    num_val: int = 300,
    num_test: int = 300,
    image_size: int = 64,
    seed: int = 0,
) -> dict:
    """Writes the shapes dataset into `out_dir` (created if needed) and returns a summary.

    Image ``i`` of split ``s`` is ``images/{s}_{i:05d}.jpg``. The same
    arguments always produce byte-identical files. This function does not
    write the ``GENERATED.json`` marker; use `ensure_shapes_dataset` for an
    atomic, reusable generation.

    Returns:
      A dict with ``splits`` (number of images per split), ``num_images``,
      ``num_captions``, ``vocabulary`` (sorted words the captions use),
      ``image_size`` and ``seed``.
    """
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for name, value in (*((f"num_{split}", count) for split, count in counts.items()), ("seed", seed)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ConfigError(f"image_size must be an integer of at least 32, got {image_size!r}")

    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    rows: list[tuple[str, str]] = []
    for split_index, split in enumerate(SPLITS):
        filenames = []
        for index in range(counts[split]):
            rng = np.random.default_rng([seed, split_index, index])
            scene = sample_scene(rng, image_size)
            filename = f"{split}_{index:05d}.jpg"
            render_scene(scene, rng).save(
                os.path.join(images_dir, filename), format="JPEG", quality=_JPEG_QUALITY, subsampling=0
            )
            rows.extend((filename, caption) for caption in describe_scene(scene, rng))
            filenames.append(filename)
        with open(os.path.join(out_dir, f"{split}_split_filenames.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{filename}\n" for filename in filenames)

    with open(os.path.join(out_dir, "captions.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("image", "caption"))
        writer.writerows(rows)

    return {
        "splits": dict(counts),
        "num_images": sum(counts.values()),
        "num_captions": len(rows),
        "vocabulary": sorted({word for _, caption in rows for word in caption.split(" ")}),
        "image_size": image_size,
        "seed": seed,
    }


def ensure_shapes_dataset(out_dir: str, **kwargs) -> bool:
    """Makes sure `out_dir` holds the shapes dataset for these arguments; returns True if it generated it.

    `kwargs` are those of `generate_shapes_dataset`. A complete dataset is
    recognised by its ``GENERATED.json`` marker, written last, recording the
    arguments (defaults filled in). If the marker is missing or records other
    arguments, the dataset is generated into a temporary sibling directory
    and renamed into place, replacing a previous shapes dataset in `out_dir`,
    so readers never see a half-written dataset. If another process completes
    the same dataset first, its copy is kept.

    Raises:
      DataError: `out_dir` exists and holds files that are not part of a
        shapes dataset (it is never deleted).
    """
    out_dir = os.path.abspath(out_dir)
    bound = inspect.signature(generate_shapes_dataset).bind(out_dir, **kwargs)
    bound.apply_defaults()
    arguments = {name: value for name, value in bound.arguments.items() if name != "out_dir"}
    if _marker_matches(out_dir, arguments):
        return False
    _check_replaceable(out_dir)

    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        summary = generate_shapes_dataset(staging, **arguments)
        marker = {"format_version": _FORMAT_VERSION, "kwargs": arguments, "summary": summary}
        with open(os.path.join(staging, MARKER_FILENAME), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2, sort_keys=True)
            f.write("\n")
        _replace_directory(staging, out_dir, arguments)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _marker_matches(out_dir: str, arguments: dict) -> bool:
    """Whether `out_dir` holds a complete dataset generated with `arguments`."""
    try:
        with open(os.path.join(out_dir, MARKER_FILENAME), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format_version") == _FORMAT_VERSION
        and marker.get("kwargs") == arguments
    )


def _check_replaceable(out_dir: str) -> None:
    """Raises DataError unless `out_dir` is absent or holds only files of the dataset layout."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise DataError(f"{out_dir} is a file, not a dataset directory; remove it or choose another directory")
    unexpected = sorted(set(os.listdir(out_dir)) - set(_LAYOUT_ENTRIES))
    if unexpected:
        raise DataError(
            f"{out_dir} is not a shapes dataset (it holds {', '.join(unexpected[:3])}); "
            "remove it or choose another directory for the generated dataset"
        )


def _replace_directory(staging: str, out_dir: str, arguments: dict) -> None:
    """Renames `staging` to `out_dir`, moving any previous dataset aside and deleting it.

    Keeps `out_dir` as it is if another process has meanwhile completed the
    same dataset there.
    """
    if _marker_matches(out_dir, arguments):
        return
    if os.path.lexists(out_dir):
        parent, name = os.path.split(out_dir)
        retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        try:
            os.rename(out_dir, os.path.join(retired, name))
        except FileNotFoundError:
            pass  # another process moved it aside first
        finally:
            shutil.rmtree(retired, ignore_errors=True)
    try:
        os.rename(staging, out_dir)
    except OSError:
        # Another process put its dataset in place between our two renames.
        if not _marker_matches(out_dir, arguments):
            raise
