"""The on-disk record format: one `tf.train.Example` per image.

Features of an example:
  image/id           bytes   the image's id (file name relative to the image dir)
  image/encoded      bytes   RGB JPEG
  image/height|width int64
  caption/token_ids  int64[] the token ids of all captions, concatenated
  caption/lengths    int64[] one length per caption (sums to len(token_ids))
  caption/text       bytes[] the raw captions (references for evaluation)

A features cache (`feature_cache.py`) holds the same examples with the image
replaced by the frozen encoder's output:
  image/id, caption/token_ids, caption/lengths, caption/text   as above
  image/features     bytes   float16 [dim], little-endian raw bytes

Shards are TFRecord files named by dataset_dir.shard_name, written whole by
`write_records_atomically`.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Sequence

import google_crc32c
import numpy as np
import tensorflow as tf

from showtell_dist.storage.atomic_files import write_bytes_atomically


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
    write_bytes_atomically(path, data)
    return len(data), base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def encode_example(image_id: str, jpeg: bytes, height: int, width: int,
                   token_ids: Sequence[Sequence[int]], captions: Sequence[str]) -> bytes:
    """Serialises one image with all its captions."""
    flat = [i for ids in token_ids for i in ids]
    feature = {
        "image/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode("utf-8")])),
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
        "image/height": tf.train.Feature(int64_list=tf.train.Int64List(value=[height])),
        "image/width": tf.train.Feature(int64_list=tf.train.Int64List(value=[width])),
        "caption/token_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=flat)),
        "caption/lengths": tf.train.Feature(int64_list=tf.train.Int64List(value=[len(x) for x in token_ids])),
        "caption/text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[c.encode("utf-8") for c in captions])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


_FEATURES = {
    "image/id": tf.io.FixedLenFeature([], tf.string),
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "caption/token_ids": tf.io.VarLenFeature(tf.int64),
    "caption/lengths": tf.io.VarLenFeature(tf.int64),
    "caption/text": tf.io.VarLenFeature(tf.string),
}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one serialized example (graph-friendly).

    Returns a dict with `image_id` [], `jpeg` [], `captions` (a RaggedTensor
    [num_captions, (len)] int32) and `caption_text` [num_captions] string.
    """
    ex = tf.io.parse_single_example(serialized, _FEATURES)
    ids = tf.cast(tf.sparse.to_dense(ex["caption/token_ids"]), tf.int32)
    lengths = tf.sparse.to_dense(ex["caption/lengths"])
    return {
        "image_id": ex["image/id"],
        "jpeg": ex["image/encoded"],
        "captions": tf.RaggedTensor.from_row_lengths(ids, lengths),  # [num_captions, (len)]
        "caption_text": tf.sparse.to_dense(ex["caption/text"], default_value=""),
    }


def features_example(image_example: bytes, features) -> bytes:
    """An image example with its image replaced by `features` (a float [dim] array, stored as float16).

    The id and captions are copied through unchanged.
    """
    src = tf.train.Example.FromString(image_example)
    out = tf.train.Example()
    for key in ("image/id", "caption/token_ids", "caption/lengths", "caption/text"):
        out.features.feature[key].CopyFrom(src.features.feature[key])
    raw = np.asarray(features, dtype="<f2").tobytes()
    out.features.feature["image/features"].bytes_list.value.append(raw)
    return out.SerializeToString()


_FEATURES_FEATURES = {
    "image/id": tf.io.FixedLenFeature([], tf.string),
    "image/features": tf.io.FixedLenFeature([], tf.string),
    "caption/token_ids": tf.io.VarLenFeature(tf.int64),
    "caption/lengths": tf.io.VarLenFeature(tf.int64),
    "caption/text": tf.io.VarLenFeature(tf.string),
}


def parse_features_example(serialized: tf.Tensor, dim: int) -> dict[str, tf.Tensor]:
    """Parses one features-cache example: like `parse_example`, with `features` [dim] float32 for `jpeg`."""
    ex = tf.io.parse_single_example(serialized, _FEATURES_FEATURES)
    ids = tf.cast(tf.sparse.to_dense(ex["caption/token_ids"]), tf.int32)
    lengths = tf.sparse.to_dense(ex["caption/lengths"])
    features = tf.io.decode_raw(ex["image/features"], tf.float16, little_endian=True)
    return {
        "image_id": ex["image/id"],
        "features": tf.ensure_shape(tf.cast(features, tf.float32), [dim]),
        "captions": tf.RaggedTensor.from_row_lengths(ids, lengths),
        "caption_text": tf.sparse.to_dense(ex["caption/text"], default_value=""),
    }
