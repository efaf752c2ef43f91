"""The on-disk record format: one `tf.train.Example` per image.

Features of an example:
  image/id           bytes   the image's id (file name relative to the image dir)
  image/encoded      bytes   RGB JPEG
  image/height|width int64
  caption/token_ids  int64[] the token ids of all captions, concatenated
  caption/lengths    int64[] one length per caption (sums to len(token_ids))
  caption/text       bytes[] the raw captions (references for evaluation)

Shards are named `{split}-{index:05d}-of-{count:05d}.tfrecord`.
"""

from __future__ import annotations

import re
from typing import Sequence

import tensorflow as tf

SHARD_PATTERN = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def shard_glob(data_dir: str, split: str) -> str:
    return f"{data_dir.rstrip('/')}/{split}-?????-of-?????.tfrecord"


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
