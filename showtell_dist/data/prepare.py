"""Caption dataset -> vocabulary JSON + sharded TFRecords + manifest JSON.

`prepare_dataset` reads any supported layout (see `layouts.py`), fits the
tokenizer on the training captions only, and writes into `output_dir`
(a local path or any `tf.io.gfile` URL such as gs://bucket/prefix):

  vocab.json                              the tokenizer (see tokenizer.py)
  {split}-00000-of-000NN.tfrecord ...     one Example per image (records.py)
  cider_document_frequencies.npz          CIDEr-D n-gram document frequencies of
                                          the train references, without and with
                                          <end> (data/document_frequencies.py)
  manifest.json                           counts, shard sizes and checksums,
                                          and every skipped item with its reason

Shards are written in parallel, each to a temporary name then renamed, so a
reader never sees half a shard. Nothing is dropped silently: every skipped
caption or image is listed in the manifest and counted in the summary.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import struct
import uuid
from typing import Sequence

import google_crc32c
import tensorflow as tf

from showtell_dist.data import images as images_lib
from showtell_dist.data import layouts
from showtell_dist.data import pipeline
from showtell_dist.data import records
from showtell_dist.data.document_frequencies import write_document_frequencies
from showtell_dist.data.tokenizer import DEFAULT_MAX_LEN_QUANTILE, Tokenizer
from showtell_dist.errors import ConfigError, DataError

MANIFEST = "manifest.json"
VOCABULARY = "vocab.json"
FORMAT_VERSION = 1


@dataclasses.dataclass
class PrepareOptions:
    layout: str = "auto"
    image_dir: str | None = None
    lang: str = "en"
    spacy_model: str | None = None
    min_count: int = 1
    vocab_size: int | None = None
    max_len: int | None = None
    images_per_shard: int = 1000
    num_workers: int = 8
    # > 0: store every image resized to resize_to x resize_to exactly as training resizes it
    # (pipeline.resize_image), re-encoded as JPEG: training then decodes small JPEGs and skips the resize.
    resize_to: int = 0
    jpeg_quality: int = 95


def _md5_base64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def resized_jpeg(jpeg: bytes, size: int, quality: int = 95) -> bytes:
    """An RGB JPEG resized to [size, size] exactly as the training pipeline resizes it, re-encoded."""
    image = pipeline.decode_image_uint8(tf.constant(jpeg), size)  # [size, size, 3] uint8
    return tf.io.encode_jpeg(image, quality=quality, chroma_downsampling=False).numpy()


def _write_shard(path: str, entries: Sequence[layouts.ImageEntry], token_ids: dict[str, list[list[int]]],
                 options: PrepareOptions):
    """Writes one shard atomically. Returns (shard info, skipped items)."""
    skipped, serialized, num_captions = [], [], 0
    for entry in entries:
        try:
            jpeg, height, width = images_lib.load_image_as_jpeg(entry.path)
        except images_lib.ImageError as exc:
            skipped.append(layouts.SkippedItem(entry.image_id, exc.reason))
            continue
        if options.resize_to:
            jpeg = resized_jpeg(jpeg, options.resize_to, options.jpeg_quality)
            height = width = options.resize_to
        serialized.append(records.encode_example(entry.image_id, jpeg, height, width,
                                                 token_ids[entry.image_id], entry.captions))
        num_captions += len(entry.captions)
    size, md5 = write_records_atomically(path, serialized)
    info = {"file": path.rsplit("/", 1)[-1], "records": len(serialized),
            "captions": num_captions,
            "bytes": size, "md5": md5}
    return info, skipped


def _masked_crc32c(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_tfrecords(serialized: Sequence[bytes]) -> bytes:
    """The bytes of a TFRecord file holding `serialized`: per record, its length (uint64 LE), the
    length's masked crc32c, the data and the data's masked crc32c (TensorFlow's own format)."""
    out = bytearray()
    for record in serialized:
        length = struct.pack("<Q", len(record))
        out += length + _masked_crc32c(length) + record + _masked_crc32c(record)
    return bytes(out)


def write_records_atomically(path: str, serialized: Sequence[bytes]) -> tuple[int, str]:
    """Writes a TFRecord file under a temporary name, then renames it; returns (bytes, base64 md5).

    The file is framed in memory and written once, so its checksum costs no read-back (which,
    for a gs:// output, would download every shard again).
    """
    data = frame_tfrecords(serialized)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return len(data), _md5_base64(data)


def prepare_dataset(input_dir: str, output_dir: str, options: PrepareOptions | None = None,
                    progress=None) -> dict:
    """Prepares `input_dir` into `output_dir`; returns the manifest dict."""
    options = options or PrepareOptions()
    if isinstance(options.resize_to, bool) or not isinstance(options.resize_to, int) or options.resize_to < 0:
        raise ConfigError(f"resize_to must be an integer >= 0 (0: keep the original size), got {options.resize_to!r}.")
    corpus = layouts.read_corpus(input_dir, layout=options.layout, image_dir=options.image_dir)
    if "train" not in corpus.splits or not corpus.splits["train"]:
        raise DataError(f"{input_dir}: no 'train' split with images was found "
                        f"(splits: {sorted(corpus.splits) or 'none'}); the vocabulary is fitted on train.")
    train_captions = [c for e in corpus.splits["train"] for c in e.captions]
    tokenizer = Tokenizer.fit(train_captions, lang=options.lang, spacy_model=options.spacy_model,
                              min_count=options.min_count, vocab_size=options.vocab_size,
                              max_len=options.max_len)

    # Tokenise every caption of every split in one batched pass.
    order = [(split, e) for split, entries in corpus.splits.items() for e in entries]
    all_words = tokenizer.split_words([c for _, e in order for c in e.captions])
    token_ids: dict[str, list[list[int]]] = {}
    truncated = {split: 0 for split in corpus.splits}  # captions cut to max_len
    longest_train, pos = 0, 0
    for split, e in order:
        ids = []
        for words in all_words[pos: pos + len(e.captions)]:
            encoded, cut = tokenizer.encode_words(words)
            ids.append(encoded)
            truncated[split] += cut
            if split == "train":
                longest_train = max(longest_train, len(words) + 2)
        pos += len(e.captions)
        token_ids[e.image_id] = ids

    tf.io.gfile.makedirs(output_dir)
    jobs = []
    for split, entries in corpus.splits.items():
        count = max(1, math.ceil(len(entries) / options.images_per_shard))
        for i in range(count):
            chunk = entries[i::count]  # round-robin: shards of near-equal size
            jobs.append((split, f"{output_dir.rstrip('/')}/{records.shard_name(split, i, count)}", chunk))

    skipped = list(corpus.skipped)
    shards: dict[str, list[dict]] = {split: [] for split in corpus.splits}
    with concurrent.futures.ThreadPoolExecutor(max_workers=options.num_workers) as pool:
        futures = {pool.submit(_write_shard, path, chunk, token_ids, options): split
                   for split, path, chunk in jobs}
        for fut in concurrent.futures.as_completed(futures):
            info, shard_skipped = fut.result()
            shards[futures[fut]].append(info)
            skipped.extend(shard_skipped)
            if progress:
                progress(info)

    tokenizer.save(f"{output_dir.rstrip('/')}/{VOCABULARY}")
    unwritten = {s.item for s in skipped}
    train_refs = [token_ids[e.image_id] for e in corpus.splits["train"] if e.image_id not in unwritten]
    document_frequencies = write_document_frequencies(output_dir, train_refs, tokenizer.vocab_size)
    splits = {}
    for split, infos in shards.items():
        infos.sort(key=lambda s: s["file"])
        splits[split] = {"images": sum(s["records"] for s in infos),
                         "captions": sum(s["captions"] for s in infos), "shards": infos}
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": corpus.source,
        "vocabulary": {"file": VOCABULARY, "size": tokenizer.vocab_size, "fitted_on": "train",
                       "min_count": options.min_count, "vocab_size_cap": options.vocab_size,
                       "tokenizer_rules": tokenizer.rules},
        "max_len": tokenizer.max_len,
        "cider_document_frequencies": document_frequencies,
        # How max_len was chosen, and what it cut: --max_len, or the 99.9th percentile of train lengths.
        "max_len_from": ("max_len option" if options.max_len else
                         f"{DEFAULT_MAX_LEN_QUANTILE:.1%} of train captions (the default)"),
        "longest_train_caption": longest_train,  # in tokens, <start> and <end> included
        "truncated_captions": sum(truncated.values()),
        "truncated_by_split": truncated,
        # captions.csv rows with unquoted commas, read as image + the rest joined (layouts.py).
        "joined_rows": len(corpus.joined_rows),
        "joined_row_locations": corpus.joined_rows,
        # None: images at their original size; N: resized to N x N as training resizes them.
        "resized_to": options.resize_to or None,
        "splits": splits,
        "skipped": [dataclasses.asdict(s) for s in skipped],
    }
    # The manifest is written last: its presence means the dataset is complete.
    write_json_atomically(f"{output_dir.rstrip('/')}/{MANIFEST}", manifest)
    return manifest


def write_json_atomically(path: str, obj) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def load_manifest(data_dir: str) -> dict:
    path = f"{data_dir.rstrip('/')}/{MANIFEST}"
    if not tf.io.gfile.exists(path):
        raise DataError(f"{path} does not exist: {data_dir} is not a prepared dataset. "
                        "Run launch/prepare_data.py --input_dir=... --output_dir=" + data_dir)
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            manifest = json.loads(f.read())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); re-run launch/prepare_data.py.") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {manifest.get('format_version')}, this toolkit reads "
                        f"{FORMAT_VERSION}; re-run launch/prepare_data.py.")
    return manifest


def summarize(manifest: dict) -> str:
    """A few human-readable lines about a prepared dataset."""
    lines = [f"source: {manifest['source']}",
             "images: " + (f"resized to {manifest['resized_to']}x{manifest['resized_to']}"
                           if manifest.get("resized_to") else "original size"),
             f"vocabulary: {manifest['vocabulary']['size']} ids (fitted on train), max_len {manifest['max_len']}"
             + (f" (from the {manifest['max_len_from']}; longest train caption "
                f"{manifest['longest_train_caption']})" if "max_len_from" in manifest else "")
             + f", captions cut to max_len: {manifest['truncated_captions']}"
             + (" (" + ", ".join(f"{s} {n}" for s, n in manifest["truncated_by_split"].items()) + ")"
                if manifest.get("truncated_captions") and "truncated_by_split" in manifest else "")]
    for split, s in manifest["splits"].items():
        lines.append(f"{split}: {s['images']} images, {s['captions']} captions, {len(s['shards'])} shards")
    joined = manifest.get("joined_rows", 0)
    if joined:
        where = manifest.get("joined_row_locations", [])
        lines.append(f"captions.csv rows with unquoted commas, read as image + the rest as caption: {joined} "
                     f"(e.g. {', '.join(where[:3])}; listed in manifest.json joined_row_locations)")
    reasons: dict[str, int] = {}
    for item in manifest["skipped"]:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    lines.append(f"skipped: {len(manifest['skipped'])}" +
                 ("" if not reasons else " (" + ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())) + ")"))
    return "\n".join(lines)


def options_from_config(config) -> PrepareOptions:
    """PrepareOptions from the `data` and `tokenizer` parts of an experiment config."""
    tok = config.tokenizer
    return PrepareOptions(layout=config.data.layout, image_dir=config.data.image_dir or None,
                          lang=tok.lang, spacy_model=tok.spacy_model or None, min_count=tok.min_count,
                          vocab_size=tok.vocab_size or None, max_len=tok.max_len or None,
                          images_per_shard=config.data.images_per_shard,
                          resize_to=int(config.data.get("resize_to", 0) or 0))


def ensure_prepared(config, log=print) -> dict:
    """Generates the synthetic source if configured and absent, prepares records if absent.

    Returns the manifest of config.data.records_dir. Records that already exist
    are reused as they are (delete the directory to prepare again).
    """
    records_dir = config.data.records_dir
    if tf.io.gfile.exists(f"{records_dir.rstrip('/')}/{MANIFEST}"):
        manifest = load_manifest(records_dir)
        vocabulary = f"{records_dir.rstrip('/')}/{VOCABULARY}"
        Tokenizer.load(vocabulary).check_rules(vocabulary)  # before features are cached from old records
        return manifest
    source = config.data.source_dir
    if config.data.generate_synthetic:
        from showtell_dist.data import synthetic

        if synthetic.ensure_shapes_dataset(source, **config.data.synthetic.to_dict()):
            log(f"generated the synthetic shapes dataset in {source}")
    elif not tf.io.gfile.exists(source):
        raise DataError(f"data.source_dir {source} does not exist and data.records_dir {records_dir} "
                        "holds no prepared dataset; point them at your data (see README).")
    log(f"preparing records from {source} into {records_dir} ...")
    manifest = prepare_dataset(source, records_dir, options_from_config(config))
    log(summarize(manifest))
    return manifest
