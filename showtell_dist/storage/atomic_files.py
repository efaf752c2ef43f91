"""Whole-file writes a reader never sees half done, local or at any tf.io.gfile URL (gs://...).

Each file is written under a temporary name next to its final one, then renamed over it.
"""

from __future__ import annotations

import json
import uuid

import tensorflow as tf


def write_bytes_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json_atomically(path: str, obj) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def copy_atomically(source: str, path: str) -> None:
    """Copies `source` to `path` under a temporary name, then renames it."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    tf.io.gfile.copy(source, tmp, overwrite=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)
