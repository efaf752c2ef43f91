"""The CIDEr-D document frequencies of a dataset's train references: a statistic of the dataset.

For each n-gram (n = 1..MAX_N) of word ids, the number of images (reference
sets) whose references contain it, and the log of the number of images:
pycocoevalcap's `document_frequency` and `ref_len`. The self-critical reward
(reward/cider_d.py) turns them into idf weights.

A table is counted either on the references' words only, or with `<end>` kept
as their last word (`end_token=True`, as Rennie et al. and self-critical.pytorch
score it: the reward then sees where a caption stops). prepare_data writes both
tables into one file next to the vocabulary (`DOCUMENT_FREQUENCIES`), and the
features cache copies it. A dataset prepared before that (no file, or a file
holding only the table without `<end>`) gets them counted once from its train
records and saved next to them when the directory is writable; the caller is
told either way.

An n-gram of word ids (w1, ..., wk), every id in [1, KEY_BASE), is the int64
key  w1 + w2 B + w3 B^2 + w4 B^3  (B = KEY_BASE, absent words 0). Base-B
digits are unique and words are never 0, so n-grams of different orders never
share a key, and B^4 < 2^63.
"""

from __future__ import annotations

import dataclasses
import io
import math
import uuid
from typing import Sequence

import numpy as np
import tensorflow as tf

from showtell_dist.data.tokenizer import END_ID, START_ID
from showtell_dist.errors import ConfigError, DataError

DOCUMENT_FREQUENCIES = "cider_document_frequencies.npz"
MAX_N = 4
KEY_BASE = 50_000  # word ids must be < KEY_BASE: KEY_BASE**4 < 2**63
_FILE_FORMAT = "showtell_dist.cider_document_frequencies"
# 1: one table, without <end>. 2: up to two tables, their fields prefixed by _TABLE_PREFIX[end_token].
_FILE_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_TABLE_PREFIX = {False: "", True: "with_end/"}


def check_vocabulary_fits(vocab_size: int) -> None:
    """Raises ConfigError when word ids up to vocab_size - 1 cannot be packed into CIDEr-D's n-gram keys."""
    if vocab_size > KEY_BASE:
        raise ConfigError(f"CIDEr-D packs 4 word ids into one int64 n-gram key, which allows at most {KEY_BASE} "
                          f"ids, but the vocabulary has {vocab_size}; prepare the data with a smaller vocabulary "
                          f"(tokenizer.vocab_size <= {KEY_BASE} or a larger tokenizer.min_count).")


def word_ids_np(tokens: Sequence[int], *, start_id: int = START_ID, end_id: int = END_ID,
                keep_end: bool = False) -> list[int]:
    """The words of a caption row: <start> and padding dropped, cut at the first <end> (kept as the last word
    with keep_end). The numpy/Python twin of reward/cider_d.py's `word_ids`."""
    out = []
    for t in tokens:
        t = int(t)
        if t == end_id:
            if keep_end:
                out.append(t)
            break
        if t not in (0, start_id):
            out.append(t)
    return out


def _ngram_keys_np(ids: np.ndarray) -> np.ndarray:
    """Keys of every 1..MAX_N-gram of each row of `ids` [rows, T] (left-aligned, 0-padded); [rows, MAX_N * T],
    -1 where there is no n-gram."""
    rows, t = ids.shape
    ids = ids.astype(np.int64)
    key = np.zeros([rows, t], np.int64)
    valid = np.ones([rows, t], bool)
    out = []
    for k in range(MAX_N):
        shifted = np.zeros([rows, t], np.int64)
        shifted[:, : max(t - k, 0)] = ids[:, k:]
        key = key + shifted * KEY_BASE ** k
        valid = valid & (shifted != 0)
        out.append(np.where(valid, key, -1))
    return np.concatenate(out, axis=1)


@dataclasses.dataclass(frozen=True)
class DocumentFrequencies:
    """For each n-gram key (sorted, int64 [n_keys]) the number of images whose references contain it
    (float32 [n_keys]); `log_num_docs` is the log of the number of images counted. `end_token`: the
    references were counted with <end> as their last word (score candidates the same way)."""

    keys: np.ndarray         # [n_keys] int64, strictly increasing
    frequencies: np.ndarray  # [n_keys] float32, >= 1
    log_num_docs: float
    end_token: bool = False

    def __post_init__(self):
        keys, freqs = np.asarray(self.keys), np.asarray(self.frequencies)
        if keys.ndim != 1 or freqs.shape != keys.shape:
            raise DataError(f"document frequencies need keys and frequencies of one shape [n_keys], got "
                            f"{keys.shape} and {freqs.shape}.")
        if keys.size and (keys.dtype != np.int64 or np.any(np.diff(keys) <= 0) or keys[0] < 1):
            raise DataError("document-frequency keys must be positive, strictly increasing int64 n-gram keys "
                            "(build them with DocumentFrequencies.from_references).")

    @property
    def num_docs(self) -> int:
        return int(round(math.exp(self.log_num_docs)))

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    def from_references(cls, refs_per_image: Sequence[Sequence[Sequence[int]]], *,
                        end_token: bool = False) -> "DocumentFrequencies":
        """Counts the n-grams of each image's references once per image, as pycocoevalcap does.

        Args:
          refs_per_image: for each image, its reference captions, each a list of
            word ids (no <start>, <end> or padding; every id in [1, KEY_BASE)).
            An image without references still counts in the number of images.
          end_token: count each reference with END_ID appended as its last word.
        """
        num_images = len(refs_per_image)
        if num_images == 0:
            raise DataError("no reference captions to count document frequencies on (0 images).")
        flat = [list(r) for refs in refs_per_image for r in refs]
        bad = [r for r in flat if any(not 1 <= w < KEY_BASE for w in r)]
        if bad:
            raise DataError(f"{len(bad)} reference captions hold word ids outside [1, {KEY_BASE}) (e.g. {bad[0]}): "
                            "pass word ids only (strip <start>, <end> and padding, see word_ids_np) from a "
                            f"vocabulary of at most {KEY_BASE} ids.")
        if end_token:
            flat = [r + [END_ID] for r in flat]
        image_of = np.repeat(np.arange(num_images, dtype=np.int64), [len(refs) for refs in refs_per_image])
        longest = max((len(r) for r in flat), default=0)
        ids = np.zeros([len(flat), max(longest, 1)], np.int64)
        for i, r in enumerate(flat):
            ids[i, : len(r)] = r
        keys = _ngram_keys_np(ids)                                     # [refs, MAX_N * T]
        images = np.broadcast_to(image_of[:, None], keys.shape)
        real = keys >= 0
        pairs = np.unique(np.stack([images[real], keys[real]], axis=1), axis=0)  # each (image, n-gram) once
        unique_keys, counts = np.unique(pairs[:, 1], return_counts=True)
        return cls(keys=unique_keys.astype(np.int64), frequencies=counts.astype(np.float32),
                   log_num_docs=float(np.log(float(num_images))), end_token=end_token)

    def save(self, path: str) -> None:
        """Writes this table alone to `path` (see `save_tables`)."""
        save_tables(path, [self])

    @classmethod
    def load(cls, path: str, *, end_token: bool = False) -> "DocumentFrequencies":
        """The table of `path` counted with (end_token) or without <end>."""
        tables = load_tables(path)
        if end_token not in tables:
            raise DataError(f"{path} holds no CIDEr-D document frequencies counted "
                            f"{'with' if end_token else 'without'} <end> (it was written by an older "
                            "prepare_data); delete it and it is counted again from the training records "
                            "(load_or_compute_document_frequencies does that by itself).")
        return tables[end_token]


# -- the file ---------------------------------------------------------------------------------------------------------


def tables_to_bytes(tables: Sequence[DocumentFrequencies]) -> bytes:
    ends = [t.end_token for t in tables]
    if len(set(ends)) != len(ends):
        raise ValueError(f"one document-frequency file holds at most one table per end_token, got {ends}.")
    fields = {"format": np.array(_FILE_FORMAT), "version": np.array(_FILE_VERSION),
              "key_base": np.array(KEY_BASE, np.int64), "max_n": np.array(MAX_N)}
    for t in tables:
        prefix = _TABLE_PREFIX[t.end_token]
        fields.update({f"{prefix}keys": t.keys, f"{prefix}frequencies": t.frequencies,
                       f"{prefix}log_num_docs": np.array(t.log_num_docs, np.float64)})
    buf = io.BytesIO()
    np.savez_compressed(buf, **fields)
    return buf.getvalue()


def tables_from_bytes(data: bytes, *, source: str = "<bytes>") -> dict[bool, DocumentFrequencies]:
    """end_token -> table, for each table the file holds."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            fields = {k: f[k] for k in f.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same fix
        raise DataError(f"{source} is not a CIDEr-D document-frequency file ({exc}); delete it and it is "
                        "computed again from the training records.") from exc
    found = tuple(fields[k].item() if k in fields else None for k in ("format", "version", "key_base", "max_n"))
    if found[0] != _FILE_FORMAT or found[1] not in _READABLE_VERSIONS or found[2:] != (KEY_BASE, MAX_N):
        raise DataError(f"{source} holds document frequencies in another format (format, version, key base, "
                        f"max n = {found}, this toolkit reads {(_FILE_FORMAT, _READABLE_VERSIONS, KEY_BASE, MAX_N)}"
                        "); delete it and it is computed again from the training records.")
    tables = {}
    for end_token, prefix in _TABLE_PREFIX.items():
        if f"{prefix}keys" in fields:
            tables[end_token] = DocumentFrequencies(
                keys=fields[f"{prefix}keys"].astype(np.int64),
                frequencies=fields[f"{prefix}frequencies"].astype(np.float32),
                log_num_docs=float(fields[f"{prefix}log_num_docs"]), end_token=end_token)
    return tables


def save_tables(path: str, tables: Sequence[DocumentFrequencies]) -> None:
    """Writes the tables (at most one per end_token) to `path` (local or gs://), under a temporary name first."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(tables_to_bytes(tables))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def load_tables(path: str) -> dict[bool, DocumentFrequencies]:
    if not tf.io.gfile.exists(path):
        raise DataError(f"CIDEr-D document-frequency file {path} does not exist; prepare the data again "
                        "(launch/prepare_data.py) or use load_or_compute_document_frequencies.")
    with tf.io.gfile.GFile(path, "rb") as f:
        return tables_from_bytes(f.read(), source=path)


# -- a prepared dataset's tables ---------------------------------------------------------------------------------------


def count_tables(train_words: Sequence[Sequence[Sequence[int]]]) -> list[DocumentFrequencies]:
    """Both tables (without and with <end>) of train references given as word ids ([image][caption][word])."""
    return [DocumentFrequencies.from_references(train_words, end_token=end) for end in (False, True)]


def write_document_frequencies(output_dir: str, train_refs: list[list[list[int]]], vocab_size: int) -> dict:
    """prepare_data's step: writes both CIDEr-D document-frequency tables of the train references (token ids
    per caption, per image) to `output_dir`/DOCUMENT_FREQUENCIES; returns the manifest entry, which says why
    when there is no file."""
    if vocab_size > KEY_BASE or not train_refs:
        reason = (f"vocabulary of {vocab_size} ids exceeds CIDEr-D's {KEY_BASE}" if train_refs
                  else "no train images")
        return {"file": None, "reason": reason}
    plain, with_end = count_tables([[word_ids_np(c) for c in caps] for caps in train_refs])
    save_tables(f"{output_dir.rstrip('/')}/{DOCUMENT_FREQUENCIES}", [plain, with_end])
    return {"file": DOCUMENT_FREQUENCIES, "split": "train", "images": plain.num_docs, "ngrams": len(plain),
            "ngrams_with_end": len(with_end)}


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


def load_or_compute_document_frequencies(data_dir: str, manifest: dict, *, end_token: bool = False,
                                         log=print) -> DocumentFrequencies:
    """The train split's CIDEr-D document frequencies of `data_dir` (whose manifest is `manifest`), counted with
    or without <end> (end_token): loaded from its file, or, for a dataset prepared without that table, counted
    from the train records (both tables, saved there when possible), with a message."""
    path = f"{data_dir.rstrip('/')}/{DOCUMENT_FREQUENCIES}"
    if tf.io.gfile.exists(path):
        tables = load_tables(path)
        if end_token in tables:
            return tables[end_token]
        reason = (f"has a {DOCUMENT_FREQUENCIES} without the table {'with' if end_token else 'without'} <end> "
                  "(written by an older prepare_data)")
    else:
        entry = manifest.get("cider_document_frequencies") or {}
        reason = f"has no {DOCUMENT_FREQUENCIES} ({entry.get('reason', 'prepared before CIDEr-D rewards')})"
    log(f"{data_dir} {reason}: counting CIDEr-D document frequencies on its "
        f"{manifest['splits'].get('train', {}).get('images', 0)} train images ...")
    tables = count_tables(train_references(data_dir, manifest))
    try:
        save_tables(path, tables)
        log(f"saved {' and '.join(str(len(t)) for t in tables)} n-gram document frequencies (without and with "
            f"<end>) of {tables[0].num_docs} train images to {path}")
    except (tf.errors.OpError, OSError) as exc:
        log(f"could not save them to {path} ({exc}); they will be counted again next time "
            "(prepare the data again to keep them).")
    return tables[int(end_token)]
