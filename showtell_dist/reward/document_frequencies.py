"""The CIDEr-D document frequencies of a prepared dataset (records or features cache).

prepare_data writes them next to the vocabulary (`prepare.DOCUMENT_FREQUENCIES`,
from the train references) and the features cache copies them. A dataset
prepared before that has no such file: they are computed once from its train
records, saved next to the records when the directory is writable, and the
caller is told either way.
"""

from __future__ import annotations

import tensorflow as tf

from showtell_dist.data.prepare import DOCUMENT_FREQUENCIES, load_manifest
from showtell_dist.errors import DataError
from showtell_dist.reward.cider_d import DocumentFrequencies, word_ids_np


def train_references(data_dir: str, manifest: dict) -> list[list[list[int]]]:
    """The word ids of every caption of every train image of a prepared dataset ([image][caption][word])."""
    if "train" not in manifest["splits"]:
        raise DataError(f"{data_dir} has no train split (splits: {', '.join(sorted(manifest['splits']))}); "
                        "CIDEr-D document frequencies are counted on the train references.")
    refs = []
    for shard in manifest["splits"]["train"]["shards"]:
        path = f"{data_dir.rstrip('/')}/{shard['file']}"
        if not tf.io.gfile.exists(path):
            raise DataError(f"{path}, listed in {data_dir}'s manifest, does not exist; prepare the data again.")
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            feature = tf.train.Example.FromString(serialized).features.feature
            ids = list(feature["caption/token_ids"].int64_list.value)
            captions, start = [], 0
            for length in feature["caption/lengths"].int64_list.value:
                captions.append(word_ids_np(ids[start: start + length]))
                start += length
            refs.append(captions)
    expected = manifest["splits"]["train"]["images"]
    if len(refs) != expected:
        raise DataError(f"{data_dir} holds {len(refs)} train records but its manifest lists {expected}; "
                        "prepare the data again.")
    return refs


def load_or_compute_document_frequencies(data_dir: str, log=print) -> DocumentFrequencies:
    """The train split's CIDEr-D document frequencies of `data_dir`: loaded from its file, or, for a dataset
    prepared without one, computed from the train records (and saved there when possible), with a message."""
    path = f"{data_dir.rstrip('/')}/{DOCUMENT_FREQUENCIES}"
    if tf.io.gfile.exists(path):
        return DocumentFrequencies.load(path)
    manifest = load_manifest(data_dir)
    reason = (manifest.get("cider_document_frequencies") or {}).get("reason", "prepared before CIDEr-D rewards")
    log(f"{data_dir} has no {DOCUMENT_FREQUENCIES} ({reason}): counting CIDEr-D document frequencies on its "
        f"{manifest['splits'].get('train', {}).get('images', 0)} train images ...")
    df = DocumentFrequencies.from_references(train_references(data_dir, manifest))
    try:
        df.save(path)
        log(f"saved {len(df)} n-gram document frequencies of {df.num_docs} train images to {path}")
    except (tf.errors.OpError, OSError) as exc:
        log(f"could not save them to {path} ({exc}); they will be counted again next time "
            "(prepare the data again to keep them).")
    return df
