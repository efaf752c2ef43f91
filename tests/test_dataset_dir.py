"""The prepared-dataset directory (data/dataset_dir.py): its manifest, shards and records read by image id."""

import json
import os
import shutil

import pytest

from showtell_dist.data import dataset_dir
from showtell_dist.errors import DataError


def _copy(records_dir, tmp_path):
    copy = str(tmp_path / "records")
    shutil.copytree(records_dir, copy)
    return copy


def _rewrite_manifest(data_dir, text):
    with open(os.path.join(data_dir, dataset_dir.MANIFEST), "w") as f:
        f.write(text)


def test_the_prepared_layout_is_named_here(tiny_dataset):
    records_dir, manifest = tiny_dataset
    assert dataset_dir.is_prepared(records_dir) and not dataset_dir.is_prepared(os.path.dirname(records_dir))
    assert os.path.exists(dataset_dir.vocabulary_path(records_dir))
    assert manifest["vocabulary"]["file"] == dataset_dir.VOCABULARY
    assert manifest["cider_document_frequencies"]["file"] == dataset_dir.DOCUMENT_FREQUENCIES
    count = len(manifest["splits"]["train"]["shards"])
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == \
        [dataset_dir.shard_name("train", i, count) for i in range(count)]
    assert dataset_dir.load_manifest(records_dir + "/") == manifest
    dataset_dir.validate(records_dir, check_local_md5=True)


@pytest.mark.parametrize("text,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
    (json.dumps({"format_version": 99, "splits": {}}), "has format_version 99, this toolkit reads 1"),
])
def test_a_bad_manifest_names_the_file_and_the_fix(tiny_dataset, tmp_path, text, message):
    copy = _copy(tiny_dataset[0], tmp_path)
    _rewrite_manifest(copy, text)
    with pytest.raises(DataError, match=message) as e:
        dataset_dir.load_manifest(copy)
    assert f"{copy}/{dataset_dir.MANIFEST}" in str(e.value) and "prepare_data.py" in str(e.value)


def test_a_directory_without_a_manifest_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match=f"no manifest.json in {tmp_path}.*prepare_data.py") as e:
        dataset_dir.load_manifest(str(tmp_path))
    assert f"--output_dir={tmp_path}" in str(e.value)


def test_shard_files_of_a_split(tiny_dataset):
    records_dir, manifest = tiny_dataset
    files = dataset_dir.shard_files(records_dir + "/", manifest, "val")
    assert files == [f"{records_dir}/{s['file']}" for s in manifest["splits"]["val"]["shards"]]
    with pytest.raises(DataError, match=r"split 'dev' is not in the prepared dataset .*\['test', 'train', 'val'\]"):
        dataset_dir.shard_files(records_dir, manifest, "dev")
    empty = {"splits": {"val": {"shards": [{"file": "val-00000-of-00001.tfrecord", "records": 0}]}}}
    with pytest.raises(DataError, match="split 'val' at .* has no records"):
        dataset_dir.shard_files(records_dir, empty, "val")


def test_first_examples_are_the_first_records_in_order(tiny_dataset):
    records_dir, manifest = tiny_dataset
    first = dataset_dir.first_examples(records_dir, manifest, "val", 3)
    ids = [e["image_id"].numpy().decode() for e in first]
    assert len(ids) == 3 == len(set(ids))
    assert all(e["jpeg"].numpy()[:2] == b"\xff\xd8" for e in first)
    assert [e["image_id"].numpy().decode() for e in dataset_dir.first_examples(records_dir, manifest, "val", 1)] \
        == ids[:1]


def test_read_examples_by_image_id(tiny_dataset):
    records_dir, manifest = tiny_dataset
    first = dataset_dir.first_examples(records_dir, manifest, "test", 8)
    wanted = {e["image_id"].numpy().decode(): [c.decode() for c in e["caption_text"].numpy()] for e in first[-2:]}
    found = dataset_dir.read_examples(records_dir, "test", list(wanted) + ["not-an-image.jpg"])
    assert {i: e["references"] for i, e in found.items()} == wanted  # an unknown id is simply not found
    assert all("jpeg" not in e for e in found.values())
    with_jpeg = dataset_dir.read_examples(records_dir, "test", list(wanted), with_jpeg=True)
    assert all(e["jpeg"][:2] == b"\xff\xd8" for e in with_jpeg.values())
    assert dataset_dir.read_examples(records_dir, "test", []) == {}
