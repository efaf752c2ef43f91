"""Readers for image-caption datasets in the layouts they are distributed in.

`read_corpus` reads one of four layouts into a `CaptionCorpus`: for every
split, the images with their captions, in a deterministic order. Layouts:

  tutorial  captions.csv (header "image,caption"), {split}_split_filenames.txt
            (one image file name per line) and images/ (TensorFlow tutorial).
  flickr    the original Flickr8k/Flickr30k release: Flickr8k.token.txt (or
            Flickr30k.token.txt / results_20130124.token) with lines
            "<image>#<k><TAB><caption>", Flickr_8k.{train,dev,test}Images.txt
            and the images in Flicker8k_Dataset/ (or Flickr8k_Dataset/,
            flickr30k-images/, images/). The "dev" list becomes split "val".
  coco      MS COCO: annotations/captions_{train,val}{2014,2017}.json, images
            in {train,val}{2014,2017}/. The split comes from the file name.
  karpathy  Karpathy's splits: dataset_coco.json, dataset_flickr8k.json or
            dataset_flickr30k.json; "restval" images go to "train".

Image ids are file names relative to the image directory
("1000268201_693b08cb0e.jpg", "train2014/COCO_train2014_000000000009.jpg").
Images are not opened here; their presence is checked against one listing of
each image directory, so reading a 100k-image corpus takes seconds on local
disk or a remote file system.

Malformed input files raise `DataError` naming the file and line (or JSON key
path). Items that are well-formed but unusable are skipped, and every skipped
item is recorded in `CaptionCorpus.skipped` with its reason:

  "empty caption"                      a blank caption; the image keeps its
                                       other captions (item: file:line, or
                                       file:key path for JSON)
  "no captions"                        a split image without a non-empty caption
  "missing image file"                 a split image not in the image directory
  "image in splits A and B; kept in A" an image in several splits is kept in
                                       the first of train, val, test, then the
                                       other split names alphabetically
  "image listed twice in split A"      a repeated line of a split list
  "caption for image in no split"      captions of an image no split lists
                                       (one item per image)
  "caption for unknown image"          COCO captions whose image_id is not in
                                       the file's "images" (one item per id)

Captions are kept as written apart from stripping surrounding whitespace;
duplicate captions are real data and are kept. A hand-made captions.csv row
with unquoted commas in its caption ("a.jpg,A dog, running .") has more than
two fields: its first field is the image and the rest, joined by commas, the
caption; such rows are listed in `CaptionCorpus.joined_rows` ("file:line").
"""

import codecs
import csv
import dataclasses
import io
import json
import posixpath
import re
from collections.abc import Iterable

import tensorflow as tf

from showtell_dist.config_fields import LAYOUTS
from showtell_dist.errors import ConfigError, DataError

# What each layout expects in the input directory, for error messages.
_LAYOUT_FILES = {
    "tutorial": (
        "captions.csv (header image,caption), one {split}_split_filenames.txt "
        "per split and images/"
    ),
    "flickr": (
        "Flickr8k.token.txt (or Flickr30k.token.txt / results_20130124.token), "
        "Flickr_8k.{train,dev,test}Images.txt and Flicker8k_Dataset/"
    ),
    "coco": (
        "annotations/captions_{train,val}{2014,2017}.json and the image "
        "directories {train,val}{2014,2017}/"
    ),
    "karpathy": "dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json",
}

_TUTORIAL_CAPTIONS = "captions.csv"
_TUTORIAL_SPLIT_SUFFIX = "_split_filenames.txt"
# Flickr token file -> prefix of its split lists.
_FLICKR_TOKEN_FILES = {
    "Flickr8k.token.txt": "Flickr_8k",
    "Flickr30k.token.txt": "Flickr_30k",
    "results_20130124.token": "Flickr_30k",
}
# Split list kind ("{prefix}.{kind}Images.txt") -> split name.
_FLICKR_SPLITS = {"train": "train", "dev": "val", "test": "test"}
_FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "images")
_COCO_ANNOTATIONS = "annotations"
_COCO_CAPTIONS = re.compile(r"captions_([a-z]+)(\d{4})\.json")
_KARPATHY_FILES = ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json")
# "" is input_dir itself, where COCO's train2014/ and val2014/ usually are.
_KARPATHY_IMAGE_DIRS = ("images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "")
_TOKEN_KEY = re.compile(r"(.+)#(\d+)")  # "<image>#<k>" of a Flickr token line
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer"}


@dataclasses.dataclass
class ImageEntry:
    """One image of a split with its captions."""

    image_id: str  # file name relative to the image directory
    path: str  # full path (or URL) of the image file
    captions: list[str]  # captions as written, stripped; never empty strings


@dataclasses.dataclass
class SkippedItem:
    """Something in the input that was left out of the corpus, and why."""

    item: str  # an image id, or "file:line" (JSON: "file:key path") for a caption
    reason: str  # one of the reasons listed in the module docstring


@dataclasses.dataclass
class CaptionCorpus:
    """A captioned image dataset split into train/val/test/..."""

    source: str  # "<layout>:<input_dir>"
    splits: dict[str, list[ImageEntry]]  # split name -> entries in input order
    skipped: list[SkippedItem]
    # "file:line" of each captions.csv row whose unquoted commas made extra fields, joined back.
    joined_rows: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Parsed:
    """What a layout reader extracts from its files, before the common checks."""

    image_dir: str
    # Image id -> its non-empty captions in file order; [] if all were empty.
    captions: dict[str, list[str]]
    # Split name -> image ids in listed order (may repeat within and across splits).
    splits: dict[str, list[str]]
    skipped: list[SkippedItem]  # empty captions, unknown COCO images
    joined_rows: list[str] = dataclasses.field(default_factory=list)  # see CaptionCorpus


def read_corpus(
    input_dir: str, layout: str = "auto", image_dir: str | None = None
) -> CaptionCorpus:
    """Reads a caption dataset in one of the supported layouts.

    Args:
      input_dir: local path or `tf.io.gfile` URL of the dataset directory.
      layout: "tutorial", "flickr", "coco", "karpathy", or "auto" to detect it
        from the files in input_dir.
      image_dir: directory the image ids are relative to; defaults to the
        layout's usual place inside input_dir.

    Returns:
      The corpus. Splits are ordered train, val, test, then other names
      alphabetically; entries keep the order of the split list (COCO and
      Karpathy: of the JSON "images" array).

    Raises:
      DataError: input_dir or the image directory does not exist, the layout
        cannot be detected or is ambiguous, a caption or split file is missing
        or malformed.
      ConfigError: layout is not a known layout name.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise ConfigError(
            f"Unknown dataset layout {layout!r}; use 'auto' or one of {', '.join(LAYOUTS)}."
        )
    if not tf.io.gfile.isdir(input_dir):
        raise DataError(
            f"{input_dir}: dataset directory does not exist; check the path."
        )
    names = _list_dir(input_dir)
    if layout == "auto":
        layout = _detect_layout(input_dir, names)
    reader = {
        "tutorial": _read_tutorial,
        "flickr": _read_flickr,
        "coco": _read_coco,
        "karpathy": _read_karpathy,
    }[layout]
    parsed = reader(input_dir, names, image_dir)
    return _assemble(f"{layout}:{input_dir}", parsed)


def _detect_layout(input_dir: str, names: set[str]) -> str:
    """Returns the single layout whose caption files are in input_dir."""
    matches = []
    if _TUTORIAL_CAPTIONS in names:
        matches.append("tutorial")
    if names.intersection(_FLICKR_TOKEN_FILES):
        matches.append("flickr")
    if _COCO_ANNOTATIONS in names and _coco_caption_files(input_dir):
        matches.append("coco")
    if names.intersection(_KARPATHY_FILES):
        matches.append("karpathy")
    if not matches:
        looked_for = "; ".join(f"{name}: {files}" for name, files in _LAYOUT_FILES.items())
        raise DataError(
            f"{input_dir}: cannot detect the dataset layout; looked for the "
            f"caption files of each layout ({looked_for}). Put the dataset's "
            "files there, or pass the layout explicitly."
        )
    if len(matches) > 1:
        raise DataError(
            f"{input_dir}: holds the caption files of several layouts "
            f"({', '.join(matches)}); pass the layout explicitly."
        )
    return matches[0]


# --- Layout readers: (input_dir, names in input_dir, image_dir) -> _Parsed ---


def _read_tutorial(input_dir: str, names: set[str], image_dir: str | None) -> _Parsed:
    """Reads captions.csv, {split}_split_filenames.txt and images/."""
    skipped: list[SkippedItem] = []
    joined_rows: list[str] = []
    captions_path = posixpath.join(input_dir, _TUTORIAL_CAPTIONS)
    captions = _parse_captions_csv(captions_path, _read_text(captions_path, "tutorial"), skipped, joined_rows)
    split_files = sorted(
        name for name in names
        if name.endswith(_TUTORIAL_SPLIT_SUFFIX) and len(name) > len(_TUTORIAL_SPLIT_SUFFIX)
    )
    if not split_files:
        raise DataError(
            f"{input_dir}: no split file found; the tutorial layout expects one "
            f"{{split}}{_TUTORIAL_SPLIT_SUFFIX} per split (e.g. train{_TUTORIAL_SPLIT_SUFFIX}) "
            "listing that split's image file names, one per line."
        )
    splits = {}
    for name in split_files:
        path = posixpath.join(input_dir, name)
        split = name[: -len(_TUTORIAL_SPLIT_SUFFIX)]
        splits[split] = _parse_split_list(_read_text(path, "tutorial"))
    return _Parsed(
        image_dir=_resolve_image_dir(input_dir, image_dir, ("images",), "tutorial"),
        captions=captions,
        splits=splits,
        skipped=skipped,
        joined_rows=joined_rows,
    )


def _read_flickr(input_dir: str, names: set[str], image_dir: str | None) -> _Parsed:
    """Reads the original Flickr8k/Flickr30k token file and split lists."""
    token_files = [name for name in _FLICKR_TOKEN_FILES if name in names]
    if not token_files:
        raise DataError(
            f"{input_dir}: no Flickr caption file; the flickr layout expects "
            f"{' or '.join(_FLICKR_TOKEN_FILES)} there."
        )
    if len(token_files) > 1:
        raise DataError(
            f"{input_dir}: several Flickr caption files ({', '.join(token_files)}); "
            "keep only the one for this dataset in the directory."
        )
    token_name = token_files[0]
    token_path = posixpath.join(input_dir, token_name)
    skipped: list[SkippedItem] = []
    captions = _parse_flickr_tokens(token_path, _read_text(token_path, "flickr"), skipped)
    prefix = _FLICKR_TOKEN_FILES[token_name]
    splits = {}
    for kind, split in _FLICKR_SPLITS.items():
        path = posixpath.join(input_dir, f"{prefix}.{kind}Images.txt")
        if not tf.io.gfile.exists(path):
            hint = (
                " Flickr30k has no official split lists: use dataset_flickr30k.json "
                "with the karpathy layout, or write the three lists yourself."
                if prefix == "Flickr_30k" else ""
            )
            raise DataError(
                f"{path}: split list not found; the flickr layout expects "
                f"{prefix}.trainImages.txt, {prefix}.devImages.txt and "
                f"{prefix}.testImages.txt next to {token_name}.{hint}"
            )
        splits[split] = _parse_split_list(_read_text(path, "flickr"))
    return _Parsed(
        image_dir=_resolve_image_dir(input_dir, image_dir, _FLICKR_IMAGE_DIRS, "flickr"),
        captions=captions,
        splits=splits,
        skipped=skipped,
    )


def _read_coco(input_dir: str, names: set[str], image_dir: str | None) -> _Parsed:
    """Reads annotations/captions_{split}{year}.json of one COCO release."""
    files = _coco_caption_files(input_dir)  # [(split, year, file name)]
    annotations_dir = posixpath.join(input_dir, _COCO_ANNOTATIONS)
    if not files:
        raise DataError(
            f"{annotations_dir}: no captions_<split><year>.json file; the coco "
            "layout expects e.g. annotations/captions_train2014.json and "
            "annotations/captions_val2014.json."
        )
    years = sorted({year for _, year, _ in files})
    if len(years) > 1:
        raise DataError(
            f"{annotations_dir}: caption files of several COCO releases ({', '.join(years)}) "
            "overlap; keep only one release's captions_*.json files there."
        )
    captions: dict[str, list[str]] = {}
    splits: dict[str, list[str]] = {}
    skipped: list[SkippedItem] = []
    for split, year, name in files:
        path = posixpath.join(annotations_dir, name)
        data = _as_object(_load_json(path, "coco"), path, "")
        # COCO image id (int) -> our image id "<split><year>/<file_name>".
        id_to_image: dict[int | str, str] = {}
        split_ids = splits.setdefault(split, [])
        for i, image in enumerate(_field(data, "images", list, path, "")):
            where = f"images[{i}]"
            image = _as_object(image, path, where)
            coco_id = _field(image, "id", (int, str), path, where)
            file_name = _nonempty(
                _field(image, "file_name", str, path, where), path, f"{where}.file_name"
            )
            if coco_id in id_to_image:
                raise DataError(
                    f"{path}: {where}.id: duplicate image id {coco_id!r}; each "
                    "entry of images must have its own id. Re-download the file."
                )
            image_id = f"{split}{year}/{file_name}"
            id_to_image[coco_id] = image_id
            split_ids.append(image_id)
        unknown: dict[int | str, None] = {}  # ordered set of unknown COCO ids
        for i, annotation in enumerate(_field(data, "annotations", list, path, "")):
            where = f"annotations[{i}]"
            annotation = _as_object(annotation, path, where)
            coco_id = _field(annotation, "image_id", (int, str), path, where)
            caption = _field(annotation, "caption", str, path, where)
            image_id = id_to_image.get(coco_id)
            if image_id is None:
                unknown[coco_id] = None
                continue
            _add_caption(captions, image_id, caption, f"{path}:{where}", skipped)
        skipped.extend(
            SkippedItem(f"{path}:image_id={coco_id}", "caption for unknown image")
            for coco_id in unknown
        )
    return _Parsed(
        image_dir=_resolve_image_dir(input_dir, image_dir, ("",), "coco"),
        captions=captions,
        splits=splits,
        skipped=skipped,
    )


def _read_karpathy(input_dir: str, names: set[str], image_dir: str | None) -> _Parsed:
    """Reads one of Karpathy's dataset_*.json split files."""
    found = [name for name in _KARPATHY_FILES if name in names]
    if not found:
        raise DataError(
            f"{input_dir}: no Karpathy split file; the karpathy layout expects "
            f"{_LAYOUT_FILES['karpathy']} there."
        )
    if len(found) > 1:
        raise DataError(
            f"{input_dir}: several Karpathy split files ({', '.join(found)}); keep "
            "only the one for this dataset in the directory."
        )
    path = posixpath.join(input_dir, found[0])
    data = _as_object(_load_json(path, "karpathy"), path, "")
    captions: dict[str, list[str]] = {}
    splits: dict[str, list[str]] = {}
    skipped: list[SkippedItem] = []
    for i, image in enumerate(_field(data, "images", list, path, "")):
        where = f"images[{i}]"
        image = _as_object(image, path, where)
        filename = _nonempty(_field(image, "filename", str, path, where), path, f"{where}.filename")
        filepath = _field(image, "filepath", str, path, where) if "filepath" in image else ""
        split = _field(image, "split", str, path, where)
        image_id = posixpath.join(filepath, filename) if filepath else filename
        captions.setdefault(image_id, [])
        for j, sentence in enumerate(_field(image, "sentences", list, path, where)):
            sentence_where = f"{where}.sentences[{j}]"
            sentence = _as_object(sentence, path, sentence_where)
            raw = _field(sentence, "raw", str, path, sentence_where)
            _add_caption(captions, image_id, raw, f"{path}:{sentence_where}", skipped)
        splits.setdefault("train" if split == "restval" else split, []).append(image_id)
    return _Parsed(
        image_dir=_resolve_image_dir(
            input_dir, image_dir, _KARPATHY_IMAGE_DIRS, "karpathy"
        ),
        captions=captions,
        splits=splits,
        skipped=skipped,
    )


# --- Common checks ---


def _split_order(split: str) -> tuple[int, str]:
    """Sort key: train, val, test, then other split names alphabetically."""
    return (_SPLIT_ORDER.get(split, len(_SPLIT_ORDER)), split)


def _assemble(source: str, parsed: _Parsed) -> CaptionCorpus:
    """Assigns images to splits, drops unusable ones and records why."""
    skipped = list(parsed.skipped)
    assigned: dict[str, str] = {}  # image id -> the split it is kept in
    split_ids: dict[str, list[str]] = {}  # split -> unique image ids, listed order
    for split in sorted(parsed.splits, key=_split_order):
        ids = split_ids[split] = []
        for image_id in parsed.splits[split]:
            kept_in = assigned.get(image_id)
            if kept_in is None:
                assigned[image_id] = split
                ids.append(image_id)
            elif kept_in == split:
                skipped.append(SkippedItem(image_id, f"image listed twice in split {split}"))
            else:
                skipped.append(
                    SkippedItem(
                        image_id, f"image in splits {kept_in} and {split}; kept in {kept_in}"
                    )
                )
    present = _existing_images(parsed.image_dir, assigned)
    splits: dict[str, list[ImageEntry]] = {}
    for split, ids in split_ids.items():
        entries = splits[split] = []
        for image_id in ids:
            captions = parsed.captions.get(image_id)
            if not captions:
                skipped.append(SkippedItem(image_id, "no captions"))
            elif image_id not in present:
                skipped.append(SkippedItem(image_id, "missing image file"))
            else:
                entries.append(
                    ImageEntry(image_id, posixpath.join(parsed.image_dir, image_id), captions)
                )
    skipped.extend(
        SkippedItem(image_id, "caption for image in no split")
        for image_id in parsed.captions
        if image_id not in assigned
    )
    return CaptionCorpus(source=source, splits=splits, skipped=skipped, joined_rows=list(parsed.joined_rows))


def _existing_images(image_dir: str, image_ids: Iterable[str]) -> set[str]:
    """Returns the image ids that exist as files, listing each directory once."""
    subdirs = {posixpath.dirname(image_id) for image_id in image_ids}
    present = set()
    for subdir in subdirs:
        directory = posixpath.join(image_dir, subdir) if subdir else image_dir
        if tf.io.gfile.isdir(directory):
            present.update(posixpath.join(subdir, name) for name in _list_dir(directory))
    return present


def _resolve_image_dir(
    input_dir: str, image_dir: str | None, candidates: tuple[str, ...], layout: str
) -> str:
    """Returns image_dir, or the first candidate subdirectory of input_dir that exists.

    The candidate "" stands for input_dir itself.
    """
    if image_dir is not None:
        if not tf.io.gfile.isdir(image_dir):
            raise DataError(f"{image_dir}: image directory does not exist; check the path.")
        return image_dir
    for candidate in candidates:
        directory = posixpath.join(input_dir, candidate) if candidate else input_dir
        if tf.io.gfile.isdir(directory):
            return directory
    raise DataError(
        f"{input_dir}: no image directory; the {layout} layout looks for "
        f"{', '.join(c + '/' for c in candidates)} there. Put the images in one "
        "of them, or pass image_dir."
    )


def _coco_caption_files(input_dir: str) -> list[tuple[str, str, str]]:
    """Returns (split, year, file name) of annotations/captions_*.json, train first."""
    annotations_dir = posixpath.join(input_dir, _COCO_ANNOTATIONS)
    if not tf.io.gfile.isdir(annotations_dir):
        return []
    files = []
    for name in _list_dir(annotations_dir):
        match = _COCO_CAPTIONS.fullmatch(name)
        if match:
            files.append((match.group(1), match.group(2), name))
    return sorted(files, key=lambda f: (_split_order(f[0]), f[1]))


def _list_dir(directory: str) -> set[str]:
    """Names in a directory (remote file systems mark subdirectories with '/')."""
    return {name.rstrip("/") for name in tf.io.gfile.listdir(directory)}


# --- File parsing ---


def _read_text(path: str, layout: str) -> str:
    """Reads a UTF-8 text file (a leading byte-order mark is dropped)."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except (tf.errors.NotFoundError, tf.errors.FailedPreconditionError):
        raise DataError(
            f"{path}: file not found (or not a file); the {layout} layout expects "
            f"{_LAYOUT_FILES[layout]}."
        ) from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
            "re-save the file with UTF-8 encoding."
        ) from None


def _add_caption(
    captions: dict[str, list[str]], image_id: str, caption: str, location: str,
    skipped: list[SkippedItem],
) -> None:
    """Appends a stripped caption to the image's list, or records it as empty."""
    image_captions = captions.setdefault(image_id, [])
    caption = caption.strip()
    if caption:
        image_captions.append(caption)
    else:
        skipped.append(SkippedItem(location, "empty caption"))


def _parse_captions_csv(path: str, text: str, skipped: list[SkippedItem],
                        joined_rows: list[str]) -> dict[str, list[str]]:
    """Parses the tutorial's captions.csv: header "image,caption", then one row per caption.

    A row of more than two fields is a caption with unquoted commas: the fields
    after the first are joined by commas into the caption and the row's
    "path:line" is appended to `joined_rows`.
    """
    captions: dict[str, list[str]] = {}
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    row_start = 1  # line on which the next row starts
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(
                f"{path}:{row_start}: malformed CSV ({e}); put captions containing "
                'commas or quotes in double quotes, doubling inner quotes: '
                'img.jpg,"A ""big"" dog, running ."'
            ) from None
        line, row_start = row_start, reader.line_num + 1
        if line == 1:
            if [field.strip() for field in row] != ["image", "caption"]:
                raise DataError(
                    f"{path}:1: expected the header 'image,caption', got "
                    f"{','.join(row)!r}; make the first line exactly image,caption."
                )
            continue
        if not row:  # a blank line
            continue
        if len(row) < 2:
            raise DataError(
                f"{path}:{line}: expected 2 fields (image,caption), got {len(row)}; "
                "add the caption after a comma, or delete the row."
            )
        if len(row) > 2:
            joined_rows.append(f"{path}:{line}")
        image_id, caption = row[0].strip(), ",".join(row[1:])
        if not image_id:
            raise DataError(f"{path}:{line}: empty image file name; fill it in or delete the row.")
        if "\n" in caption or "\r" in caption:
            raise DataError(
                f"{path}:{line}: caption spans lines {line}-{reader.line_num}; a "
                "caption must be on one line: check for an unbalanced double quote."
            )
        _add_caption(captions, image_id, caption, f"{path}:{line}", skipped)
    if row_start == 1:
        raise DataError(
            f"{path}: empty file; expected the header image,caption and one "
            "image,caption row per caption."
        )
    return captions


def _parse_flickr_tokens(path: str, text: str, skipped: list[SkippedItem]) -> dict[str, list[str]]:
    """Parses a Flickr token file: lines "<image>#<k><TAB><caption>"."""
    captions: dict[str, list[str]] = {}
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        match = _TOKEN_KEY.fullmatch(key.strip())
        if not tab or not match:
            raise DataError(
                f"{path}:{line_number}: expected '<image>#<k><TAB><caption>' "
                f"(e.g. '1000268201_693b08cb0e.jpg#0<TAB>A child ...'), got {line[:80]!r}; "
                "fix or delete the line."
            )
        _add_caption(captions, match.group(1), caption, f"{path}:{line_number}", skipped)
    return captions


def _parse_split_list(text: str) -> list[str]:
    """Parses a split list: one image file name per line, blank lines ignored."""
    return [name for name in (line.strip() for line in text.split("\n")) if name]


def _load_json(path: str, layout: str) -> object:
    """Reads and parses a JSON caption file of the given layout."""
    text = _read_text(path, layout)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); re-download or repair the file."
        ) from None


def _json_type(kind: type | tuple[type, ...]) -> str:
    """JSON name of the Python type(s) accepted for a field, for error messages."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_JSON_NAMES[k] for k in kinds)


def _as_object(value: object, path: str, where: str) -> dict:
    """Checks that a JSON value (at key path `where`, "" for the root) is an object."""
    if not isinstance(value, dict):
        raise DataError(
            f"{path}: {where or 'the top level'} is {json.dumps(value)[:40]}, expected "
            "an object. Re-download or repair the file."
        )
    return value


def _field(obj: dict, key: str, kind: type | tuple[type, ...], path: str, where: str):
    """Returns obj[key], checking that it is present and has the expected JSON type."""
    key_path = f"{where}.{key}" if where else key
    if key not in obj:
        raise DataError(
            f"{path}: {key_path} is missing; expected {_json_type(kind)}. "
            "Re-download or repair the file."
        )
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DataError(
            f"{path}: {key_path} is {json.dumps(value)[:40]}, expected {_json_type(kind)}. "
            "Re-download or repair the file."
        )
    return value


def _nonempty(value: str, path: str, key_path: str) -> str:
    """Checks that a file name in a JSON file is not blank."""
    if not value.strip():
        raise DataError(f"{path}: {key_path} is empty; expected an image file name.")
    return value
