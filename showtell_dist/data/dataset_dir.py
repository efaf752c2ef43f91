"""What a prepared dataset directory holds, and how to read it (local or gs://).

  manifest.json                           counts, shard sizes and checksums, skipped items (below);
                                          written last, so its presence means the directory is complete
  vocab.json                              the tokenizer (tokenizer.py)
  {split}-00000-of-000NN.tfrecord ...     one tf.train.Example per image (records.py)
  cider_document_frequencies.npz          CIDEr-D n-gram document frequencies of the train references,
                                          when the vocabulary fits CIDEr-D's keys

manifest.json (FORMAT_VERSION 1) holds "format_version", "source", "vocabulary" {"file", "size", ...},
"max_len", "cider_document_frequencies" {"file" (or None and a "reason"), ...}, "resized_to",
"splits" {split: {"images", "captions", "shards": [{"file", "records", "captions", "bytes", "md5"}]}}
and "skipped" (prepare.py writes it). A features cache (feature_cache.py) is a directory of the same
layout whose manifest adds "kind": "features" and a "features" entry; a manifest without "kind" is of
image records.

prepare.py writes image records and features/builder.py a features cache; everything else reads a
dataset directory through this module: `load_manifest`, `validate` (shards against the manifest),
`shard_files`, `first_examples` and `read_examples` (records by image id, on the host).
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Iterable

import tensorflow as tf

from showtell_dist.data import records
from showtell_dist.errors import DataError
from showtell_dist.storage import gcs

MANIFEST = "manifest.json"
VOCABULARY = "vocab.json"
DOCUMENT_FREQUENCIES = "cider_document_frequencies.npz"
FORMAT_VERSION = 1


def join(data_dir: str, name: str) -> str:
    return f"{data_dir.rstrip('/')}/{name}"


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def shard_glob(data_dir: str, split: str) -> str:
    return join(data_dir, f"{split}-?????-of-?????.tfrecord")


def is_prepared(data_dir: str) -> bool:
    """Whether data_dir holds a complete dataset (its manifest, written last)."""
    return tf.io.gfile.exists(join(data_dir, MANIFEST))


def vocabulary_path(data_dir: str) -> str:
    return join(data_dir, VOCABULARY)


# ----------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------


def _manifest_error(data_dir: str, what: str) -> DataError:
    return DataError(f"{join(data_dir, MANIFEST)} {what}: re-run launch/prepare_data.py to rewrite the dataset "
                     "and its manifest (and re-upload it for gs://).")


def _read_manifest_bytes(data_dir: str, client) -> bytes:
    path = join(data_dir, MANIFEST)
    try:
        if client is not None and gcs.is_gs_url(data_dir):
            return gcs.read_object(path, client=client)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(path)
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"no {MANIFEST} in {data_dir} ({path} does not exist): it is not a prepared dataset, or "
                        f"its preparation was interrupted ({MANIFEST} is written last). Run launch/prepare_data.py "
                        f"--input_dir=... --output_dir={data_dir}, or point at a prepared dataset.") from None


def check_format(data_dir: str, manifest) -> None:
    """Raises DataError unless `manifest` is a manifest this toolkit reads."""
    if not isinstance(manifest, dict):
        raise _manifest_error(data_dir, "is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise _manifest_error(data_dir, f"has format_version {version!r}, this toolkit reads {FORMAT_VERSION}")


def load_manifest(data_dir: str, *, client=None) -> dict:
    """data_dir/manifest.json, checked to be a manifest of this format.

    Read with tf.io.gfile (local or any of its URLs), or for gs:// with `client`
    (google-cloud-storage) when one is given.
    """
    raw = _read_manifest_bytes(data_dir, client)
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise _manifest_error(data_dir, f"is not valid JSON ({exc})") from exc
    check_format(data_dir, manifest)
    return manifest


def manifest_kind(manifest: dict) -> str:
    """"images" (prepared records; their manifests have no "kind") or "features" (a features cache)."""
    return manifest.get("kind", "images")


def feature_dim(manifest: dict) -> int | None:
    """The features' dimension of a features cache, None for image records."""
    return int(manifest["features"]["dim"]) if manifest_kind(manifest) == "features" else None


def record_parser(manifest: dict):
    """fn(serialized) -> parsed example (records.py), for the manifest's kind of records."""
    dim = feature_dim(manifest)
    if dim is None:
        return records.parse_example
    return lambda serialized: records.parse_features_example(serialized, dim)


# ----------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------


def shard_files(data_dir: str, manifest: dict, split: str) -> list[str]:
    """The paths of the split's shards that hold records, in the manifest's order."""
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} is not in the prepared dataset at {data_dir} "
                        f"(it has {sorted(manifest['splits'])}).")
    files = [join(data_dir, s["file"]) for s in manifest["splits"][split]["shards"] if s["records"] > 0]
    if not files:
        raise DataError(f"split {split!r} at {data_dir} has no records.")
    return files


def _listing(data_dir: str, client) -> dict[str, tuple[int, str | None]]:
    """{file name: (size, base64 md5 or None)} of the files directly in data_dir."""
    if gcs.is_gs_url(data_dir):
        return gcs.list_directory(data_dir, client=client)
    if not os.path.isdir(data_dir):
        raise DataError(f"dataset directory {data_dir} does not exist: run launch/prepare_data.py to create it, "
                        "or fix the directory given.")
    with os.scandir(data_dir) as it:
        return {entry.name: (entry.stat().st_size, None) for entry in it if entry.is_file()}


def _shard_entries(data_dir: str, manifest: dict, split: str) -> list[dict]:
    entry = manifest["splits"][split]
    shards = entry.get("shards") if isinstance(entry, dict) else None
    if not isinstance(shards, list):
        raise _manifest_error(data_dir, f"has no shard list for split {split!r}")
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                and isinstance(shard.get("bytes"), int)):
            raise _manifest_error(data_dir, f"has a malformed shard entry #{i} in split {split!r} "
                                            "(needs 'file' and integer 'bytes')")
    return shards


def validate(data_dir: str, manifest: dict | None = None, *, client=None, splits=None,
             check_local_md5: bool = False) -> None:
    """Checks the shards in data_dir against its manifest; raises DataError if they differ.

    For each requested split (default: all in the manifest) every listed shard
    must exist with the listed byte size, and with the listed md5 where the
    store reports one (GCS does; for local directories only when
    `check_local_md5`). A `{split}-*.tfrecord` not in the manifest is an error
    too (a leftover of an earlier run with other sharding), and so is a missing
    vocabulary. gs:// uses a single object listing of the directory (with
    `client`, default a new google-cloud-storage client), not one request per shard.
    """
    gs = gcs.is_gs_url(data_dir)
    if gs and client is None:
        client = gcs.make_client()
    if manifest is None:
        manifest = load_manifest(data_dir, client=client)
    check_format(data_dir, manifest)
    all_splits = manifest.get("splits")
    if not isinstance(all_splits, dict) or not all_splits:
        raise _manifest_error(data_dir, "lists no splits")
    if splits is None:
        splits = sorted(all_splits)
    elif isinstance(splits, str):
        splits = [splits]
    unknown = [s for s in splits if s not in all_splits]
    if unknown:
        raise DataError(f"split(s) {', '.join(unknown)} not in {join(data_dir, MANIFEST)} (it has "
                        f"{', '.join(sorted(all_splits))}): re-run launch/prepare_data.py with those splits, or "
                        "request one of the listed splits.")

    listing = _listing(data_dir, client)
    fix = "re-run launch/prepare_data.py for this dataset" + (
        ", then re-upload it with launch/upload_data.py (it re-sends only missing or different files)" if gs else "")
    problems = []
    for split in splits:
        listed = set()
        for shard in _shard_entries(data_dir, manifest, split):
            name = shard["file"]
            listed.add(name)
            where = join(data_dir, name)
            if name not in listing:
                problems.append(f"shard {where} is missing")
                continue
            size, md5 = listing[name]
            if size != shard["bytes"]:
                kind = "truncated" if size < shard["bytes"] else "larger than listed"
                problems.append(f"shard {where} is {kind}: {size} bytes, manifest says {shard['bytes']}")
                continue
            want_md5 = shard.get("md5")
            if want_md5 and md5 is None and check_local_md5 and not gs:
                md5 = gcs.file_digest(os.path.join(data_dir, name)).md5
            if want_md5 and md5 and md5 != want_md5:
                problems.append(f"shard {where} is corrupt: md5 {md5}, manifest says {want_md5}")
        for name in sorted(listing):
            if fnmatch.fnmatchcase(name, f"{split}-*.tfrecord") and name not in listed:
                problems.append(f"shard {join(data_dir, name)} is not in the manifest (left over from an "
                                "earlier run?); delete it")

    vocab = manifest.get("vocabulary")
    if isinstance(vocab, dict) and isinstance(vocab.get("file"), str) and vocab["file"] not in listing:
        problems.append(f"vocabulary file {join(data_dir, vocab['file'])} is missing")
    if problems:
        raise DataError(f"dataset {data_dir} does not match its {MANIFEST}: " + "; ".join(problems) + f". Fix: {fix}")


# ----------------------------------------------------------------------------
# Records on the host
# ----------------------------------------------------------------------------


def first_examples(data_dir: str, manifest: dict, split: str, n: int) -> list[dict]:
    """The first n examples of a split in record order (shard after shard), parsed (records.py), eager."""
    ds = tf.data.TFRecordDataset(shard_files(data_dir, manifest, split)).take(n).map(record_parser(manifest))
    return list(ds)


def read_examples(data_dir: str, split: str, image_ids: Iterable[str], *, with_jpeg: bool = False) -> dict:
    """{image_id: {"references": [str], "jpeg": bytes (with_jpeg)}} for the wanted images of a split.

    Reads the split's records on the host in the evaluation pipeline's order
    and stops as soon as every wanted image was seen, so the references of the
    first max_images images cost reading those images only. A features cache
    holds no images: with_jpeg reads the image records it was made from when
    they are still there, else the entries have no "jpeg".
    """
    wanted = set(image_ids)
    found: dict = {}
    if not wanted:
        return found
    manifest = load_manifest(data_dir)
    if feature_dim(manifest) is not None and with_jpeg:
        source = manifest["features"].get("source_records")
        if source and is_prepared(source):
            return read_examples(source, split, wanted, with_jpeg=True)
        with_jpeg = False
    files = shard_files(data_dir, manifest, split)
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=min(8, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    parse_record = record_parser(manifest)

    def parse(serialized):
        ex = parse_record(serialized)
        out = {"image_id": ex["image_id"], "caption_text": ex["caption_text"]}
        if with_jpeg:
            out["jpeg"] = ex["jpeg"]
        return out

    for ex in ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(8):
        image_id = ex["image_id"].numpy().decode("utf-8")
        if image_id not in wanted or image_id in found:
            continue
        entry = {"references": [c.decode("utf-8") for c in ex["caption_text"].numpy()]}
        if with_jpeg:
            entry["jpeg"] = ex["jpeg"].numpy()
        found[image_id] = entry
        if len(found) == len(wanted):
            break
    return found
