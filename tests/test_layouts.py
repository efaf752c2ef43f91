"""Tests for showtell_dist.data.layouts."""

import json
import os
import time

import pytest

from showtell_dist.data.layouts import SkippedItem, read_corpus
from showtell_dist.errors import ConfigError, DataError

FLICKR8K = "/work/shared/data/flickr8k"


def _touch_images(directory, names) -> None:
    """Creates image files. layouts.py never opens images, so they stay empty."""
    for name in names:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def _write_tutorial(root, csv_text: str, splits: dict[str, list[str]], images: list[str]):
    root.mkdir(exist_ok=True)
    (root / "captions.csv").write_text(csv_text, encoding="utf-8")
    for split, names in splits.items():
        (root / f"{split}_split_filenames.txt").write_text("".join(n + "\n" for n in names))
    (root / "images").mkdir()
    _touch_images(root / "images", images)
    return str(root)


def _write_flickr(root, token_lines: list[str], splits: dict[str, list[str]], images: list[str],
                  image_subdir: str = "Flicker8k_Dataset"):
    """Writes the original Flickr8k release; `splits` keys are train, dev, test."""
    root.mkdir(exist_ok=True)
    (root / "Flickr8k.token.txt").write_text("".join(line + "\n" for line in token_lines))
    for kind, names in splits.items():
        (root / f"Flickr_8k.{kind}Images.txt").write_text("".join(n + "\n" for n in names))
    (root / image_subdir).mkdir()
    _touch_images(root / image_subdir, images)
    return str(root)


def _coco_file(images: list[tuple[int, str]], annotations: list[tuple[int, str]]) -> dict:
    return {
        "info": {},
        "images": [{"id": i, "file_name": name, "height": 480, "width": 640} for i, name in images],
        "annotations": [
            {"id": n, "image_id": i, "caption": caption}
            for n, (i, caption) in enumerate(annotations)
        ],
    }


def _write_json(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _ids(corpus) -> dict[str, list[str]]:
    return {split: [e.image_id for e in entries] for split, entries in corpus.splits.items()}


def _reasons(corpus) -> list[tuple[str, str]]:
    return [(s.item, s.reason) for s in corpus.skipped]


# --- tutorial ---


def test_tutorial_layout(tmp_path):
    root = _write_tutorial(
        tmp_path / "ds",
        "image,caption\n"
        "b.jpg,A dog runs .\n"
        'a.jpg,"A dog, brown, runs ."\n'
        'a.jpg,"A ""quoted"" dog ."\n'
        "c.jpg,A cat .\n"
        "b.jpg,A dog runs .\n",  # an exact duplicate row: kept
        {"val": ["c.jpg"], "train": ["b.jpg", "a.jpg"]},
        ["a.jpg", "b.jpg", "c.jpg"],
    )

    corpus = read_corpus(root, layout="tutorial")

    assert corpus.source == f"tutorial:{root}"
    assert list(corpus.splits) == ["train", "val"]
    assert _ids(corpus) == {"train": ["b.jpg", "a.jpg"], "val": ["c.jpg"]}  # split-file order
    b, a = corpus.splits["train"]
    assert b.captions == ["A dog runs .", "A dog runs ."]
    assert a.captions == ["A dog, brown, runs .", 'A "quoted" dog .']
    assert a.path == os.path.join(root, "images", "a.jpg")
    assert corpus.skipped == []


def test_tutorial_accepts_bom_crlf_and_blank_lines(tmp_path):
    root = tmp_path / "ds"
    _write_tutorial(root, "", {}, ["a.jpg"])
    (root / "captions.csv").write_bytes(b"\xef\xbb\xbfimage,caption\r\na.jpg,A dog .\r\n\r\n")
    (root / "train_split_filenames.txt").write_bytes(b"a.jpg\r\n\r\n")

    corpus = read_corpus(str(root))

    assert corpus.splits["train"][0].captions == ["A dog ."]
    assert corpus.skipped == []


def test_tutorial_image_dir_argument(tmp_path):
    root = _write_tutorial(
        tmp_path / "ds", "image,caption\na.jpg,A dog .\n", {"train": ["a.jpg"]}, []
    )
    _touch_images(tmp_path / "elsewhere", ["a.jpg"])

    corpus = read_corpus(root, image_dir=str(tmp_path / "elsewhere"))

    assert corpus.splits["train"][0].path == str(tmp_path / "elsewhere" / "a.jpg")


@pytest.mark.skipif(not os.path.isdir(FLICKR8K), reason=f"{FLICKR8K} not present")
def test_real_flickr8k_tutorial_layout_is_read_quickly():
    start = time.monotonic()
    corpus = read_corpus(FLICKR8K)
    elapsed = time.monotonic() - start

    assert corpus.source == f"tutorial:{FLICKR8K}"
    assert {split: len(entries) for split, entries in corpus.splits.items()} == {
        "train": 6000, "val": 1000,
    }
    assert all(len(e.captions) == 5 for entries in corpus.splits.values() for e in entries)
    assert corpus.splits["train"][0].image_id == "1000268201_693b08cb0e.jpg"
    assert corpus.skipped == []
    assert elapsed < 5, f"reading took {elapsed:.1f} s"


# --- flickr ---


def test_flickr_layout(tmp_path):
    root = _write_flickr(
        tmp_path / "ds",
        ["a.jpg#0\tA dog .", "a.jpg#1\tA brown dog , running .", "b.jpg#0\tA cat .",
         "c.jpg#0\tA bird ."],
        {"train": ["a.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]},
        ["a.jpg", "b.jpg", "c.jpg"],
    )

    corpus = read_corpus(root)

    assert corpus.source == f"flickr:{root}"
    assert _ids(corpus) == {"train": ["a.jpg"], "val": ["b.jpg"], "test": ["c.jpg"]}
    assert corpus.splits["train"][0].captions == ["A dog .", "A brown dog , running ."]
    assert corpus.splits["val"][0].path == os.path.join(root, "Flicker8k_Dataset", "b.jpg")
    assert corpus.skipped == []


@pytest.mark.parametrize("image_subdir", ["Flickr8k_Dataset", "images"])
def test_flickr_alternative_image_dirs(tmp_path, image_subdir):
    root = _write_flickr(tmp_path / "ds", ["a.jpg#0\tA dog ."],
                         {"train": ["a.jpg"], "dev": [], "test": []}, ["a.jpg"], image_subdir)

    corpus = read_corpus(root, layout="flickr")

    assert corpus.splits["train"][0].path == os.path.join(root, image_subdir, "a.jpg")


def test_flickr_empty_caption_and_captions_in_no_split(tmp_path):
    root = _write_flickr(
        tmp_path / "ds",
        ["a.jpg#0\tA dog .", "a.jpg#1\t   ", "stray.jpg#0\tOne .", "stray.jpg#1\tTwo ."],
        {"train": ["a.jpg"], "dev": [], "test": []},
        ["a.jpg", "stray.jpg"],
    )

    corpus = read_corpus(root)

    assert corpus.splits["train"][0].captions == ["A dog ."]
    token = os.path.join(root, "Flickr8k.token.txt")
    assert _reasons(corpus) == [
        (f"{token}:2", "empty caption"),
        ("stray.jpg", "caption for image in no split"),  # one item for both captions
    ]


@pytest.mark.parametrize("line", ["a.jpg A dog .", "a.jpg\tA dog .", "a.jpg#x\tA dog ."])
def test_flickr_malformed_token_line(tmp_path, line):
    root = _write_flickr(tmp_path / "ds", ["b.jpg#0\tA cat .", line],
                         {"train": ["b.jpg"], "dev": [], "test": []}, ["b.jpg"])

    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:2: expected '<image>#<k><TAB>"):
        read_corpus(root)


def test_flickr_missing_split_list(tmp_path):
    root = _write_flickr(tmp_path / "ds", ["a.jpg#0\tA dog ."],
                         {"train": ["a.jpg"], "test": []}, ["a.jpg"])

    with pytest.raises(DataError) as info:
        read_corpus(root)
    assert str(info.value).startswith(os.path.join(root, "Flickr_8k.devImages.txt"))
    assert "flickr layout expects" in str(info.value)


def test_flickr_without_image_dir(tmp_path):
    root = _write_flickr(tmp_path / "ds", ["a.jpg#0\tA dog ."],
                         {"train": ["a.jpg"], "dev": [], "test": []}, [])
    os.rmdir(os.path.join(root, "Flicker8k_Dataset"))

    with pytest.raises(DataError, match="Flicker8k_Dataset/.*pass image_dir"):
        read_corpus(root)


# --- coco ---


def _write_coco(root, year: str = "2014"):
    _write_json(root / "annotations" / f"captions_val{year}.json", _coco_file(
        [(7, f"COCO_val{year}_7.jpg")], [(7, "A bus .")]))
    _write_json(root / "annotations" / f"captions_train{year}.json", _coco_file(
        [(9, f"COCO_train{year}_9.jpg"), (3, f"COCO_train{year}_3.jpg")],
        [(3, "A cat ."), (9, "A dog ."), (3, "A cat sleeps .")]))
    _touch_images(root, [
        f"train{year}/COCO_train{year}_9.jpg",
        f"train{year}/COCO_train{year}_3.jpg",
        f"val{year}/COCO_val{year}_7.jpg",
    ])
    return str(root)


def test_coco_layout(tmp_path):
    root = _write_coco(tmp_path / "ds")

    corpus = read_corpus(root)

    assert corpus.source == f"coco:{root}"
    assert _ids(corpus) == {
        "train": ["train2014/COCO_train2014_9.jpg", "train2014/COCO_train2014_3.jpg"],
        "val": ["val2014/COCO_val2014_7.jpg"],
    }
    assert corpus.splits["train"][1].captions == ["A cat .", "A cat sleeps ."]
    assert corpus.splits["val"][0].path == os.path.join(root, "val2014", "COCO_val2014_7.jpg")
    assert corpus.skipped == []


def test_coco_2017_and_image_dir_argument(tmp_path):
    root = _write_coco(tmp_path / "ds", year="2017")
    os.rename(os.path.join(root, "train2017"), tmp_path / "train2017")
    os.rename(os.path.join(root, "val2017"), tmp_path / "val2017")

    corpus = read_corpus(root, layout="coco", image_dir=str(tmp_path))

    assert corpus.splits["val"][0].path == str(tmp_path / "val2017" / "COCO_val2017_7.jpg")
    assert corpus.skipped == []


def test_coco_bad_annotations(tmp_path):
    root = tmp_path / "ds"
    path = root / "annotations" / "captions_train2014.json"
    _write_json(path, _coco_file(
        [(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg")],
        [(1, "A dog ."), (1, " "), (2, ""), (99, "Lost ."), (99, "Lost again ."), (98, "Lost .")]))
    _touch_images(root / "train2014", ["a.jpg", "b.jpg"])

    corpus = read_corpus(str(root))

    assert _ids(corpus) == {"train": ["train2014/a.jpg"]}
    assert _reasons(corpus) == [
        (f"{path}:annotations[1]", "empty caption"),
        (f"{path}:annotations[2]", "empty caption"),
        (f"{path}:image_id=99", "caption for unknown image"),
        (f"{path}:image_id=98", "caption for unknown image"),
        ("train2014/b.jpg", "no captions"),  # its only caption was empty
        ("train2014/c.jpg", "no captions"),
    ]


def test_coco_several_releases_is_an_error(tmp_path):
    root = _write_coco(tmp_path / "ds")
    _write_coco(tmp_path / "ds", year="2017")

    with pytest.raises(DataError, match="2014, 2017.*keep only one release"):
        read_corpus(root)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"annotations": []}, r": images is missing; expected an array"),
        ({"images": [{"id": 1}], "annotations": []}, r": images\[0\]\.file_name is missing"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]},
         r": annotations\[0\]\.caption is missing; expected a string"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}],
          "annotations": [{"image_id": 1, "caption": 5}]},
         r": annotations\[0\]\.caption is 5, expected a string"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
          "annotations": []}, r": images\[1\]\.id: duplicate image id 1"),
        ([], r": the top level is \[\], expected an object"),
    ],
)
def test_coco_json_missing_keys(tmp_path, data, message):
    path = tmp_path / "annotations" / "captions_train2014.json"
    _write_json(path, data)

    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + message):
        read_corpus(str(tmp_path))


def test_coco_invalid_json(tmp_path):
    path = tmp_path / "annotations" / "captions_val2014.json"
    path.parent.mkdir()
    path.write_text('{"images": [],\n "annotations": [,]}')

    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + r":2:18: invalid JSON"):
        read_corpus(str(tmp_path))


# --- karpathy ---


def _karpathy_image(filename: str, split: str, raws: list[str], filepath: str | None = None):
    image = {"filename": filename, "split": split, "imgid": 0,
             "sentences": [{"raw": raw, "tokens": raw.split()} for raw in raws]}
    if filepath is not None:
        image["filepath"] = filepath
    return image


def test_karpathy_coco_layout(tmp_path):
    _write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        _karpathy_image("t.jpg", "test", ["A bus ."], "val2014"),
        _karpathy_image("r.jpg", "restval", ["A cat ."], "val2014"),
        _karpathy_image("a.jpg", "train", ["A dog .", "A dog ."], "train2014"),
        _karpathy_image("v.jpg", "val", ["A car ."], "val2014"),
    ]})
    _touch_images(tmp_path, ["val2014/t.jpg", "val2014/r.jpg", "train2014/a.jpg", "val2014/v.jpg"])

    corpus = read_corpus(str(tmp_path))

    assert corpus.source == f"karpathy:{tmp_path}"
    assert _ids(corpus) == {  # restval joins train, in JSON order
        "train": ["val2014/r.jpg", "train2014/a.jpg"],
        "val": ["val2014/v.jpg"],
        "test": ["val2014/t.jpg"],
    }
    assert corpus.splits["train"][1].captions == ["A dog .", "A dog ."]  # duplicates kept
    assert corpus.splits["test"][0].path == str(tmp_path / "val2014" / "t.jpg")
    assert corpus.skipped == []


def test_karpathy_flickr_layout_without_filepath(tmp_path):
    path = tmp_path / "dataset_flickr8k.json"
    _write_json(path, {"images": [
        _karpathy_image("a.jpg", "train", ["A dog .", ""]),
        _karpathy_image("b.jpg", "train", ["  "]),
        _karpathy_image("gone.jpg", "val", ["A bird ."]),
    ]})
    _touch_images(tmp_path / "Flicker8k_Dataset", ["a.jpg", "b.jpg"])

    corpus = read_corpus(str(tmp_path), layout="karpathy")

    assert _ids(corpus) == {"train": ["a.jpg"], "val": []}
    assert corpus.splits["train"][0].path == str(tmp_path / "Flicker8k_Dataset" / "a.jpg")
    assert _reasons(corpus) == [
        (f"{path}:images[0].sentences[1]", "empty caption"),
        (f"{path}:images[1].sentences[0]", "empty caption"),
        ("b.jpg", "no captions"),
        ("gone.jpg", "missing image file"),
    ]


def test_karpathy_missing_raw(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    _write_json(path, {"images": [{"filename": "a.jpg", "split": "train",
                                   "sentences": [{"tokens": ["a"]}]}]})

    with pytest.raises(DataError, match=r"images\[0\]\.sentences\[0\]\.raw is missing"):
        read_corpus(str(tmp_path))


# --- auto-detection and directories ---


def test_auto_detection_finds_nothing(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")

    with pytest.raises(DataError) as info:
        read_corpus(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: cannot detect the dataset layout")
    for looked_for in ["captions.csv", "Flickr8k.token.txt", "captions_", "dataset_coco.json"]:
        assert looked_for in message


def test_auto_detection_refuses_to_guess(tmp_path):
    root = _write_coco(tmp_path / "ds")
    _write_json(tmp_path / "ds" / "dataset_coco.json", {"images": []})

    with pytest.raises(DataError, match="several layouts \\(coco, karpathy\\); pass the layout"):
        read_corpus(root)
    assert _ids(read_corpus(root, layout="karpathy")) == {}


def test_unknown_layout_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Unknown dataset layout 'flickr8k'"):
        read_corpus(str(tmp_path), layout="flickr8k")


def test_missing_input_dir(tmp_path):
    with pytest.raises(DataError, match="absent: dataset directory does not exist"):
        read_corpus(str(tmp_path / "absent"))


def test_missing_image_dir_argument(tmp_path):
    root = _write_tutorial(
        tmp_path / "ds", "image,caption\na.jpg,A dog .\n", {"train": ["a.jpg"]}, []
    )

    with pytest.raises(DataError, match="nowhere: image directory does not exist"):
        read_corpus(root, image_dir=str(tmp_path / "nowhere"))


# --- bad input shared by all layouts (exercised through the tutorial layout) ---


def test_empty_captions_are_skipped_and_image_keeps_the_others(tmp_path):
    root = _write_tutorial(
        tmp_path / "ds",
        "image,caption\na.jpg,A dog .\na.jpg,\na.jpg,   \nb.jpg,\n",
        {"train": ["a.jpg", "b.jpg"]},
        ["a.jpg", "b.jpg"],
    )

    corpus = read_corpus(root)

    assert corpus.splits["train"][0].captions == ["A dog ."]
    csv_path = os.path.join(root, "captions.csv")
    assert _reasons(corpus) == [
        (f"{csv_path}:3", "empty caption"),
        (f"{csv_path}:4", "empty caption"),
        (f"{csv_path}:5", "empty caption"),
        ("b.jpg", "no captions"),
    ]


def test_image_in_several_splits_is_kept_in_the_earliest(tmp_path):
    root = _write_tutorial(
        tmp_path / "ds",
        "image,caption\na.jpg,A .\nb.jpg,B .\nc.jpg,C .\nd.jpg,D .\n",
        {
            "test": ["a.jpg", "b.jpg"],
            "val": ["a.jpg"],
            "train": ["b.jpg", "b.jpg"],
            "zeta": ["c.jpg", "d.jpg"],
            "alpha": ["c.jpg"],
        },
        ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
    )

    corpus = read_corpus(root)

    assert _ids(corpus) == {
        "train": ["b.jpg"], "val": ["a.jpg"], "test": [], "alpha": ["c.jpg"], "zeta": ["d.jpg"],
    }
    assert SkippedItem("b.jpg", "image listed twice in split train") in corpus.skipped
    assert _reasons(corpus) == [
        ("b.jpg", "image listed twice in split train"),
        ("a.jpg", "image in splits val and test; kept in val"),
        ("b.jpg", "image in splits train and test; kept in train"),
        ("c.jpg", "image in splits alpha and zeta; kept in alpha"),
    ]


def test_split_image_without_captions_or_file(tmp_path):
    root = _write_tutorial(
        tmp_path / "ds",
        "image,caption\na.jpg,A .\ngone.jpg,G .\nloose.jpg,L .\n",
        {"train": ["a.jpg", "nocap.jpg", "gone.jpg"]},
        ["a.jpg", "nocap.jpg", "loose.jpg"],
    )

    corpus = read_corpus(root)

    assert _ids(corpus) == {"train": ["a.jpg"]}
    assert _reasons(corpus) == [
        ("nocap.jpg", "no captions"),
        ("gone.jpg", "missing image file"),
        ("loose.jpg", "caption for image in no split"),
    ]


def test_non_utf8_caption_file(tmp_path):
    root = _write_tutorial(tmp_path / "ds", "", {"train": ["a.jpg"]}, ["a.jpg"])
    (tmp_path / "ds" / "captions.csv").write_bytes(
        "image,caption\na.jpg,A dog .\na.jpg,Un caf\u00e9 .\n".encode("latin-1"))

    with pytest.raises(DataError, match=r"captions\.csv:3: not valid UTF-8 \(byte 0xe9\).*UTF-8"):
        read_corpus(root)


@pytest.mark.parametrize(
    "csv_text, message",
    [
        ("image,caption\na.jpg\n", r"captions\.csv:2: expected 2 fields \(image,caption\), got 1"),
        ("name,text\na.jpg,A dog .\n", r"captions\.csv:1: expected the header 'image,caption'"),
        ("image,caption\na.jpg,A dog .\nb.jpg,\"A cat .\nc.jpg,A cow .\n",
         r"captions\.csv:3: malformed CSV"),
        ("image,caption\na.jpg,\"A dog\" runs\n", r"captions\.csv:2: malformed CSV"),
        ("image,caption\na.jpg,\"A\ndog\"\n", r"captions\.csv:2: caption spans lines 2-3"),
        ("image,caption\n,A dog .\n", r"captions\.csv:2: empty image file name"),
        ("", r"captions\.csv: empty file"),
    ],
)
def test_malformed_caption_csv(tmp_path, csv_text, message):
    root = _write_tutorial(tmp_path / "ds", csv_text, {"train": ["a.jpg"]}, ["a.jpg"])

    with pytest.raises(DataError, match=message):
        read_corpus(root)


def test_missing_caption_file(tmp_path):
    root = _write_tutorial(tmp_path / "ds", "", {"train": ["a.jpg"]}, ["a.jpg"])
    os.remove(os.path.join(root, "captions.csv"))

    with pytest.raises(DataError) as info:
        read_corpus(root, layout="tutorial")
    assert str(info.value).startswith(f"{root}/captions.csv: file not found")
    assert "the tutorial layout expects captions.csv" in str(info.value)


def test_missing_split_files(tmp_path):
    root = _write_tutorial(tmp_path / "ds", "image,caption\na.jpg,A .\n", {}, ["a.jpg"])

    with pytest.raises(DataError, match="no split file found.*train_split_filenames.txt"):
        read_corpus(root)


def test_missing_images_dir(tmp_path):
    root = _write_tutorial(tmp_path / "ds", "image,caption\na.jpg,A .\n", {"train": ["a.jpg"]}, [])
    os.rmdir(os.path.join(root, "images"))

    expected = "no image directory; the tutorial layout looks for images/"
    with pytest.raises(DataError, match=expected):
        read_corpus(root)


def test_caption_csv_row_with_unquoted_commas_is_joined_and_counted(tmp_path):
    csv_text = ('image,caption\na.jpg,A dog, running, fast .\na.jpg,"A quoted, dog ."\n'
                'b.jpg,A cat .\nb.jpg,"A ""big"" cat", sitting\n')
    root = _write_tutorial(tmp_path / "ds", csv_text, {"train": ["a.jpg", "b.jpg"]}, ["a.jpg", "b.jpg"])

    corpus = read_corpus(root)
    captions = {e.image_id: e.captions for e in corpus.splits["train"]}
    assert captions == {"a.jpg": ["A dog, running, fast .", "A quoted, dog ."],
                        "b.jpg": ["A cat .", 'A "big" cat, sitting']}
    assert corpus.joined_rows == [f"{root}/captions.csv:2", f"{root}/captions.csv:5"]
    assert corpus.skipped == []
