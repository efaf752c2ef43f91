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
(`_lower_bound`). The document frequencies (data/document_frequencies.py,
`DocumentFrequencies`) count, for each n-gram, the images (reference sets)
whose references contain it, and `log_num_docs` is the log of the number of
images: pycocoevalcap's `document_frequency` and `ref_len`. pycocoevalcap
computes them from the references of the set being scored; for a training
reward they come from the training split (written by prepare_data).

N-grams are packed into int64 keys as the document frequencies pack them
(data/document_frequencies.py: w1 + w2 B + w3 B^2 + w4 B^3, B = KEY_BASE),
from the windows `tensorflow_text.sliding_window` cuts, which compiles under
XLA.

With the table's `end_token`, `<end>` is a word (the last one) of samples and
references, as in Rennie et al. and self-critical.pytorch: a caption cut off
mid-phrase ("a man in a") then lacks the reference n-grams that end in `<end>`.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

from showtell_dist.data.document_frequencies import KEY_BASE, MAX_N, DocumentFrequencies
from showtell_dist.data.tokenizer import END_ID, START_ID
from showtell_dist.errors import ConfigError

_SENTINEL = np.iinfo(np.int64).max  # never a key (every key < KEY_BASE**4)


# -- the graph function ----------------------------------------------------------------------------------------------


def word_ids(tokens: tf.Tensor, *, start_id: int = START_ID, end_id: int = END_ID,
             keep_end: bool = False) -> tf.Tensor:
    """[..., T] token rows -> [..., T] word rows: <start> and 0 dropped, everything from the first <end> on
    dropped (the first <end> kept as the last word with keep_end), the remaining words moved left in order
    and 0-padded.

    `[<start>, w1, w2, <end>, 0, ...]` and `[w1, w2, <end>, x, ...]` both become `[w1, w2, 0, ...]`, or
    `[w1, w2, <end>, 0, ...]` with keep_end.
    """
    tokens = tf.convert_to_tensor(tokens)
    ends_so_far = tf.cumsum(tf.cast(tokens == end_id, tf.int32), axis=-1)         # [..., T]
    keep = (tokens != 0) & (tokens != start_id) & (ends_so_far == 0)              # [..., T]
    if keep_end:
        keep |= (tokens == end_id) & (ends_so_far == 1)                           # the first <end>
    target = tf.cumsum(tf.cast(keep, tf.int32), axis=-1) - 1                      # where each kept word goes
    target = tf.where(keep, target, -1)                                           # -1: one_hot gives zeros
    moves = tf.one_hot(target, tf.shape(tokens)[-1], dtype=tokens.dtype)         # [..., T (from), T (to)]
    return tf.reduce_sum(tokens[..., :, None] * moves, axis=-2)


def _ngram_keys(ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """[..., T] word ids -> keys [..., MAX_N, T] int64 (n-gram of order k+1 starting at t) and valid [..., MAX_N, T]."""
    ids = tf.cast(ids, tf.int64)
    rank = ids.shape.rank
    keys, valids = [], []
    for n in range(1, MAX_N + 1):
        padded = tf.pad(ids, [[0, 0]] * (rank - 1) + [[0, n - 1]])        # [..., T + n - 1]: 0 past the end
        windows = tf_text.sliding_window(padded, width=n, axis=-1)         # [..., T, n]: words t .. t + n - 1
        place = tf.constant([KEY_BASE ** k for k in range(n)], tf.int64)  # [n]
        keys.append(tf.reduce_sum(windows * place, axis=-1))
        valids.append(tf.reduce_all(windows != 0, axis=-1))
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
