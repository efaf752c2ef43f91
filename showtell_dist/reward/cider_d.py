"""CIDEr-D on token ids, inside the TensorFlow graph (the self-critical reward).

`cider_d` computes exactly what coco-caption's CIDEr (pycocoevalcap
`cider/cider_scorer.py`, which is CIDEr-D) computes for each candidate, but on
word ids instead of strings, with static shapes and no hash table or
py_function, so that it compiles with `tf.function(jit_compile=True)` and runs
per replica under any strategy:

  for n = 1..4: tf-idf vectors  g(x) = count_x(ngram) * (log_num_docs - log(max(1, df(ngram))))
  sim_n(c, r)  = sum_{ngram in c} min(g_c, g_r) * g_r / (|g_c| |g_r|)        (|.| over unique n-grams)
                 * exp(-(len(c) - len(r))**2 / (2 sigma**2))
  CIDEr-D(c)   = 10 * mean_r mean_n sim_n(c, r)

where, as in pycocoevalcap, the "length" of a caption is its number of
bigrams (max(words - 1, 0)), the norms are taken before clipping, and the
quotient is left undivided when a norm is 0 (its numerator is then 0 too).

The document-frequency lookup is a binary search in a sorted int64 table
(`_lower_bound`). Document frequencies (`DocumentFrequencies`) count, for
each n-gram, the images (reference sets) whose references contain it, and `log_num_docs` is
the log of the number of images: pycocoevalcap's `document_frequency` and
`ref_len`. pycocoevalcap computes them from the references of the set being
scored; for a training reward they come from the training split
(`DocumentFrequencies.from_references`, written by prepare_data).

An n-gram of word ids (w1, ..., wk), every id in [1, KEY_BASE), is the int64
key  w1 + w2 B + w3 B^2 + w4 B^3  (B = KEY_BASE, absent words 0). Base-B
digits are unique and words are never 0, so n-grams of different orders never
share a key, and B^4 < 2^63.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from showtell_dist.data.tokenizer import END_ID, START_ID
from showtell_dist.errors import ConfigError, DataError

MAX_N = 4
KEY_BASE = 50_000  # word ids must be < KEY_BASE: KEY_BASE**4 < 2**63
_FILE_FORMAT = "showtell_dist.cider_document_frequencies"
_FILE_VERSION = 1
_SENTINEL = np.iinfo(np.int64).max  # never a key (every key < KEY_BASE**4)


def check_vocabulary_fits(vocab_size: int) -> None:
    """Raises ConfigError when word ids up to vocab_size - 1 cannot be packed into CIDEr-D's n-gram keys."""
    if vocab_size > KEY_BASE:
        raise ConfigError(f"CIDEr-D packs 4 word ids into one int64 n-gram key, which allows at most {KEY_BASE} "
                          f"ids, but the vocabulary has {vocab_size}; prepare the data with a smaller vocabulary "
                          f"(tokenizer.vocab_size <= {KEY_BASE} or a larger tokenizer.min_count).")


# -- document frequencies (Python / numpy) ----------------------------------------------------------------------------


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
    (float32 [n_keys]); `log_num_docs` is the log of the number of images counted."""

    keys: np.ndarray         # [n_keys] int64, strictly increasing
    frequencies: np.ndarray  # [n_keys] float32, >= 1
    log_num_docs: float

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
    def from_references(cls, refs_per_image: Sequence[Sequence[Sequence[int]]]) -> "DocumentFrequencies":
        """Counts the n-grams of each image's references once per image, as pycocoevalcap does.

        Args:
          refs_per_image: for each image, its reference captions, each a list of
            word ids (no <start>, <end> or padding; every id in [1, KEY_BASE)).
            An image without references still counts in the number of images.
        """
        num_images = len(refs_per_image)
        if num_images == 0:
            raise DataError("no reference captions to count document frequencies on (0 images).")
        flat = [list(r) for refs in refs_per_image for r in refs]
        image_of = np.repeat(np.arange(num_images, dtype=np.int64), [len(refs) for refs in refs_per_image])
        longest = max((len(r) for r in flat), default=0)
        ids = np.zeros([len(flat), max(longest, 1)], np.int64)
        for i, r in enumerate(flat):
            ids[i, : len(r)] = r
        bad = [r for r in flat if any(not 1 <= w < KEY_BASE for w in r)]
        if bad:
            raise DataError(f"{len(bad)} reference captions hold word ids outside [1, {KEY_BASE}) (e.g. {bad[0]}): "
                            "pass word ids only (strip <start>, <end> and padding, see word_ids_np) from a "
                            f"vocabulary of at most {KEY_BASE} ids.")
        keys = _ngram_keys_np(ids)                                     # [refs, MAX_N * T]
        images = np.broadcast_to(image_of[:, None], keys.shape)
        real = keys >= 0
        pairs = np.unique(np.stack([images[real], keys[real]], axis=1), axis=0)  # each (image, n-gram) once
        unique_keys, counts = np.unique(pairs[:, 1], return_counts=True)
        return cls(keys=unique_keys.astype(np.int64), frequencies=counts.astype(np.float32),
                   log_num_docs=float(np.log(float(num_images))))

    # -- persistence ------------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, format=np.array(_FILE_FORMAT), version=np.array(_FILE_VERSION),
                            key_base=np.array(KEY_BASE, np.int64), max_n=np.array(MAX_N),
                            keys=self.keys, frequencies=self.frequencies,
                            log_num_docs=np.array(self.log_num_docs, np.float64))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<bytes>") -> "DocumentFrequencies":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                fields = {k: f[k] for k in f.files}
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same fix
            raise DataError(f"{source} is not a CIDEr-D document-frequency file ({exc}); delete it and it is "
                            "computed again from the training records.") from exc
        expected = (_FILE_FORMAT, _FILE_VERSION, KEY_BASE, MAX_N)
        found = tuple(fields[k].item() if k in fields else None for k in ("format", "version", "key_base", "max_n"))
        if found != expected:
            raise DataError(f"{source} holds document frequencies in another format (format, version, key base, "
                            f"max n = {found}, this toolkit reads {expected}); delete it and it is computed again "
                            "from the training records.")
        return cls(keys=fields["keys"].astype(np.int64), frequencies=fields["frequencies"].astype(np.float32),
                   log_num_docs=float(fields["log_num_docs"]))

    def save(self, path: str) -> None:
        """Writes the table to `path` (local or gs://), under a temporary name first."""
        import uuid

        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(self.to_bytes())
        tf.io.gfile.rename(tmp, path, overwrite=True)

    @classmethod
    def load(cls, path: str) -> "DocumentFrequencies":
        if not tf.io.gfile.exists(path):
            raise DataError(f"CIDEr-D document-frequency file {path} does not exist; prepare the data again "
                            "(launch/prepare_data.py) or use load_or_compute_document_frequencies.")
        with tf.io.gfile.GFile(path, "rb") as f:
            return cls.from_bytes(f.read(), source=path)


def word_ids_np(tokens: Sequence[int], *, start_id: int = START_ID, end_id: int = END_ID) -> list[int]:
    """The words of a caption row: <start> and padding dropped, cut at the first <end> (numpy/Python twin of
    `word_ids`)."""
    out = []
    for t in tokens:
        t = int(t)
        if t == end_id:
            break
        if t not in (0, start_id):
            out.append(t)
    return out


# -- the graph function ----------------------------------------------------------------------------------------------


def word_ids(tokens: tf.Tensor, *, start_id: int = START_ID, end_id: int = END_ID) -> tf.Tensor:
    """[..., T] token rows -> [..., T] word rows: <start> and 0 dropped, everything from the first <end> on
    dropped, the remaining words moved left in order and 0-padded.

    `[<start>, w1, w2, <end>, 0, ...]` and `[w1, w2, <end>, x, ...]` both become `[w1, w2, 0, ...]`.
    """
    tokens = tf.convert_to_tensor(tokens)
    ended = tf.cumsum(tf.cast(tokens == end_id, tf.int32), axis=-1) > 0
    keep = (tokens != 0) & (tokens != start_id) & ~ended                          # [..., T]
    target = tf.cumsum(tf.cast(keep, tf.int32), axis=-1) - 1                      # where each kept word goes
    target = tf.where(keep, target, -1)                                           # -1: one_hot gives zeros
    moves = tf.one_hot(target, tf.shape(tokens)[-1], dtype=tokens.dtype)         # [..., T (from), T (to)]
    return tf.reduce_sum(tokens[..., :, None] * moves, axis=-2)


def _ngram_keys(ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """[..., T] word ids -> keys [..., MAX_N, T] int64 (n-gram of order k+1 starting at t) and valid [..., MAX_N, T]."""
    ids = tf.cast(ids, tf.int64)
    key = tf.zeros_like(ids)
    valid = tf.ones_like(ids, dtype=tf.bool)
    keys, valids = [], []
    for k in range(MAX_N):
        shifted = tf.concat([ids[..., k:], tf.zeros_like(ids[..., :k])], axis=-1)  # word t + k, 0 past the end
        key = key + shifted * (KEY_BASE ** k)
        valid = valid & (shifted != 0)
        keys.append(key)
        valids.append(valid)
    return tf.stack(keys, axis=-2), tf.stack(valids, axis=-2)


def _term_counts(keys: tf.Tensor, valid: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """For each n-gram slot of a row ([..., T]): how often its n-gram occurs in the row (float32), and whether
    it is the n-gram's first occurrence (so sums over first occurrences are sums over unique n-grams)."""
    same = (keys[..., :, None] == keys[..., None, :]) & valid[..., None, :]        # [..., T (i), T (j)]
    counts = tf.reduce_sum(tf.cast(same, tf.float32), axis=-1)
    t = keys.shape[-1]
    earlier = tf.constant(np.tril(np.ones([t, t], bool), k=-1))                  # j < i
    first = valid & ~tf.reduce_any(same & earlier, axis=-1)
    return counts, first


def _lower_bound(table: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """For each value ([m]), the first index of `table` ([size], sorted, last entry above every value) holding an
    entry >= it: a binary search of ceil(log2(size)) gathers.

    Not tf.searchsorted: XLA lowers that to a comparison of every value with every entry (O(m * size)), which for
    a table of a few 100k n-grams would cost more than the training step it rewards.
    """
    size = int(table.shape[0])
    lo = tf.zeros_like(values, dtype=tf.int32)
    hi = tf.fill(tf.shape(values), size - 1)
    for _ in range(max(1, math.ceil(math.log2(size)))):
        mid = (lo + hi) // 2
        below = tf.gather(table, mid) < values
        lo = tf.where(below, mid + 1, lo)
        hi = tf.where(below, hi, mid)
    return lo


def _idf(keys: tf.Tensor, df: DocumentFrequencies) -> tf.Tensor:
    """log_num_docs - log(max(1, df(key))) for every key ([...] int64 -> [...] float32); df 0 when absent."""
    table_keys = tf.constant(np.append(np.asarray(df.keys, np.int64), _SENTINEL))               # [n_keys + 1]
    table_log_df = tf.constant(np.append(np.log(np.maximum(1.0, np.asarray(df.frequencies, np.float64))),
                                         0.0).astype(np.float32))                                  # [n_keys + 1]
    flat = tf.reshape(keys, [-1])
    index = _lower_bound(table_keys, flat)  # <= n_keys: the sentinel exceeds every key
    found = tf.gather(table_keys, index) == flat
    log_df = tf.where(found, tf.gather(table_log_df, index), 0.0)
    return tf.reshape(tf.cast(df.log_num_docs, tf.float32) - log_df, tf.shape(keys))


def cider_d(candidates: tf.Tensor, references: tf.Tensor, df: DocumentFrequencies, *,
            sigma: float = 6.0) -> tf.Tensor:
    """coco-caption CIDEr-D of each candidate against its references, in the graph.

    Args:
      candidates: [n, Tc] int word ids, left-aligned and 0-padded (see `word_ids`);
        every id < KEY_BASE (check the vocabulary once with `check_vocabulary_fits`).
      references: [n, R, Tr] int word ids, 0-padded; an all-zero row is a
        missing reference and is left out of the mean over references.
      df: the document frequencies (and number of images) giving the idf.
      sigma: the length penalty's standard deviation (coco-caption: 6).

    Returns:
      [n] float32 CIDEr-D (x10, as coco-caption reports per image); 0 for a
      candidate without words or without any reference.
    """
    candidates = tf.convert_to_tensor(candidates)
    references = tf.convert_to_tensor(references)
    if candidates.shape.rank != 2 or references.shape.rank != 3:
        raise ConfigError(f"cider_d takes candidates [n, T] and references [n, R, T], got shapes "
                          f"{candidates.shape} and {references.shape}.")
    cand_keys, cand_valid = _ngram_keys(candidates)                      # [n, N, Tc]
    ref_keys, ref_valid = _ngram_keys(references)                        # [n, R, N, Tr]
    cand_counts, cand_first = _term_counts(cand_keys, cand_valid)
    ref_counts, ref_first = _term_counts(ref_keys, ref_valid)
    cand_idf = _idf(cand_keys, df)                                       # [n, N, Tc]
    ref_idf = _idf(ref_keys, df)                                         # [n, R, N, Tr]

    cand_vec = cand_counts * cand_idf                                    # [n, N, Tc] tf-idf per slot
    ref_vec = ref_counts * ref_idf                                       # [n, R, N, Tr]
    cand_norm = tf.sqrt(tf.reduce_sum(tf.where(cand_first, tf.square(cand_vec), 0.0), axis=-1))  # [n, N]
    ref_norm = tf.sqrt(tf.reduce_sum(tf.where(ref_first, tf.square(ref_vec), 0.0), axis=-1))     # [n, R, N]

    # How often each candidate n-gram occurs in each reference.
    match = ((cand_keys[:, None, :, :, None] == ref_keys[:, :, :, None, :])
             & ref_valid[:, :, :, None, :])                              # [n, R, N, Tc, Tr]
    counts_in_ref = tf.reduce_sum(tf.cast(match, tf.float32), axis=-1)   # [n, R, N, Tc]
    ref_vec_at_cand = counts_in_ref * cand_idf[:, None]                  # the reference's tf-idf of that n-gram
    clipped = tf.minimum(cand_vec[:, None], ref_vec_at_cand) * ref_vec_at_cand
    numerator = tf.reduce_sum(tf.where(cand_first[:, None], clipped, 0.0), axis=-1)   # [n, R, N]
    denominator = cand_norm[:, None] * ref_norm                                         # [n, R, N]
    similarity = tf.where((cand_norm[:, None] != 0) & (ref_norm != 0),
                          numerator / tf.where(denominator != 0, denominator, 1.0), numerator)

    # Lengths as pycocoevalcap counts them: the number of bigrams.
    cand_len = tf.reduce_sum(tf.cast(cand_valid[:, 1], tf.float32), axis=-1)           # [n]
    ref_len = tf.reduce_sum(tf.cast(ref_valid[:, :, 1], tf.float32), axis=-1)          # [n, R]
    delta = cand_len[:, None] - ref_len
    penalty = tf.exp(-tf.square(delta) / (2.0 * float(sigma) ** 2))                    # [n, R]
    per_ref = tf.reduce_mean(similarity, axis=-1) * penalty                            # [n, R]

    present = tf.cast(tf.reduce_any(references != 0, axis=-1), tf.float32)             # [n, R]
    num_refs = tf.reduce_sum(present, axis=-1)
    return 10.0 * tf.reduce_sum(per_ref * present, axis=-1) / tf.maximum(num_refs, 1.0)
