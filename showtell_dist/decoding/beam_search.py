"""Beam search and greedy decoding against a generic single-step decoder.

The caption model (not imported here) exposes one decoder step::

    step_fn(tokens, state) -> (logits, new_state)
    # tokens: [rows] int32, logits: [rows, vocab] float, state: any nest of
    # tensors whose leading dim is `rows` (e.g. the LSTM's (h, c)).

Both decoders below are plain TensorFlow graphs built around one
`tf.while_loop` with fixed-size buffers, so they run eagerly, inside a
`tf.function` (also with ``jit_compile=True``) and per replica inside
`tf.distribute.Strategy.run`. The decoder state of every row advances by one
token per loop iteration; a prefix is never re-run. In beam search the state
rows are re-ordered after every step by gathering them with the parent-beam
indices of the surviving hypotheses.

Beam search keeps two sets per image, as TF Model Garden's SequenceBeamSearch
does:

* ``alive`` (K hypotheses that have not produced the end token), ranked by
  their raw summed log-probability;
* ``finished`` (K hypotheses that produced the end token, or reached
  ``max_len``), ranked by their length-normalised score.

Each step expands the K alive hypotheses over the whole vocabulary and keeps
the best 2K of the K*V candidates (by raw log-probability). At most K of them
end (each alive hypothesis has a single end token), so at least K remain to
refill ``alive`` -- finished hypotheses never starve the live ones -- while
the ended ones compete for the K ``finished`` slots. The search stops early
once, for every image, no alive hypothesis can still beat the worst finished
one (see `_still_improvable`).

Token id 0 is padding: it is never generated and pads the outputs. Ids in
``forbidden_ids`` (e.g. the unknown token) are never generated either: their
logits are set to -inf before the softmax, so the remaining tokens' log-probs
are renormalised over the allowed vocabulary.

Two options counter the artefacts of CIDEr optimisation (self-critical
training), both off by default and both applied to the log-probs of every
step without renormalising, as self-critical.pytorch does:

* ``bad_ending_ids`` (`bad_ending_ids_of(words)`: the ids of `BAD_ENDINGS`,
  function words such as "a", "with", "the"): after such a word the end
  token's log-prob is -inf, so no caption ends on it (a hypothesis still alive
  at ``max_len`` is kept as it is);
* ``block_trigrams``: a hypothesis may not produce a token that repeats a
  trigram it already contains ("a dog on a dog on a ...").

Both keep every shape static (a scatter into a [rows, vocab] penalty), so the
decoders still compile with XLA.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import tensorflow as tf

from showtell_dist.config_fields import check_positive as _check_positive
from showtell_dist.decoding.options import LENGTH_NORMALIZATIONS
from showtell_dist.errors import ConfigError

PAD_ID = 0

_NEG_INF = float("-inf")
# Words a caption should not end on (self-critical.pytorch's bad_endings, plus conjunctions and possessives).
BAD_ENDINGS = ("a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon", "near", "to",
               "is", "are", "am", "and", "its", "his", "her", "their", "from", "by", "into", "onto", "as", "while")

StepFn = Callable[[tf.Tensor, Any], "tuple[tf.Tensor, Any]"]


class BeamSearchResult(NamedTuple):
    """Output of `beam_search`, best hypothesis first for every image.

    Rows that could not be filled with a real hypothesis (only possible when
    fewer than K distinct allowed sequences of length <= max_len exist) have
    score and log_prob -inf, length 0 and all-zero tokens.
    """

    tokens: tf.Tensor  # [batch, beam, time] int32; no start token, end token included, 0-padded
    scores: tf.Tensor  # [batch, beam] float32; ranking score after length normalisation
    log_probs: tf.Tensor  # [batch, beam] float32; raw summed log-probability
    lengths: tf.Tensor  # [batch, beam] int32; generated tokens incl. the end token
    steps: tf.Tensor  # [] int32; decoder steps (while-loop iterations) actually run


class _BeamLoopState(NamedTuple):
    """Loop variables of the beam-search `tf.while_loop` (all shapes fixed)."""

    t: tf.Tensor  # [] int32; steps done = length of every alive hypothesis
    alive_seq: tf.Tensor  # [batch, beam, time] int32
    alive_log_probs: tf.Tensor  # [batch, beam] float32
    alive_last: tf.Tensor  # [batch, beam] int32; token fed at the next step
    alive_state: Any  # nest of [batch * beam, ...]
    finished_seq: tf.Tensor  # [batch, beam, time] int32
    finished_scores: tf.Tensor  # [batch, beam] float32 (-inf = empty slot)
    finished_log_probs: tf.Tensor  # [batch, beam] float32
    finished_lengths: tf.Tensor  # [batch, beam] int32


class _GreedyLoopState(NamedTuple):
    """Loop variables of the greedy `tf.while_loop`."""

    t: tf.Tensor  # [] int32
    tokens: tf.Tensor  # [batch, time] int32
    lengths: tf.Tensor  # [batch] int32
    log_probs: tf.Tensor  # [batch] float32
    done: tf.Tensor  # [batch] bool; row has produced the end token
    last: tf.Tensor  # [batch] int32; token fed at the next step
    state: Any  # nest of [batch, ...]


# ----------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------


def length_penalty(lengths, length_normalization: str = "average", alpha: float = 0.6) -> tf.Tensor:
    """Divisor applied to a hypothesis' summed log-probability.

    Args:
      lengths: number of generated tokens (incl. the end token), any shape.
      length_normalization: "none" (1), "average" (the length) or "gnmt"
        (((5 + length) / 6) ** alpha, Wu et al. 2016).
      alpha: GNMT exponent.

    Returns:
      float32 tensor of the same shape as `lengths`.
    """
    _check_normalization(length_normalization)
    lengths = tf.cast(lengths, tf.float32)
    if length_normalization == "none":
        return tf.ones_like(lengths)
    if length_normalization == "average":
        return lengths
    return tf.pow((5.0 + lengths) / 6.0, tf.cast(alpha, tf.float32))


def normalized_score(log_probs, lengths, length_normalization: str = "average", alpha: float = 0.6) -> tf.Tensor:
    """Ranking score of hypotheses: log_probs / length_penalty(lengths)."""
    return tf.cast(log_probs, tf.float32) / length_penalty(lengths, length_normalization, alpha)


# ----------------------------------------------------------------------------
# Shape helpers (static where known, dynamic otherwise)
# ----------------------------------------------------------------------------


def _shape_list(x: tf.Tensor) -> list:
    """Shape of `x` as a list: Python ints where static, scalar tensors otherwise."""
    static = x.shape.as_list()
    if any(d is None for d in static):
        dynamic = tf.shape(x)
        return [d if d is not None else dynamic[i] for i, d in enumerate(static)]
    return static


def _tile_beams(x: tf.Tensor, beam: int) -> tf.Tensor:
    """[batch, ...] -> [batch * beam, ...], each row repeated `beam` times."""
    x = tf.expand_dims(x, 1)  # [batch, 1, ...]
    x = tf.tile(x, [1, beam] + [1] * (x.shape.rank - 2))  # [batch, beam, ...]
    return _merge_beams(x)


def _merge_beams(x: tf.Tensor) -> tf.Tensor:
    """[batch, beam, ...] -> [batch * beam, ...]."""
    shape = _shape_list(x)
    return tf.reshape(x, [shape[0] * shape[1]] + shape[2:])


def _split_beams(x: tf.Tensor, batch, beam: int) -> tf.Tensor:
    """[batch * beam, ...] -> [batch, beam, ...]."""
    return tf.reshape(x, [batch, beam] + _shape_list(x)[1:])


def _gather_beams(x: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """x [batch, n, ...], indices [batch, m] -> [batch, m, ...] (per-image gather)."""
    return tf.gather(x, indices, batch_dims=1)


def _like_structure(template: Any, new_state: Any) -> Any:
    """Repack `new_state` like `template` (list vs tuple) and pin static shapes."""
    new_state = tf.nest.pack_sequence_as(template, tf.nest.flatten(new_state))
    return tf.nest.map_structure(lambda new, old: tf.ensure_shape(new, old.shape), new_state, template)


def _batch_size(initial_state: Any):
    flat = tf.nest.flatten(initial_state)
    if not flat:
        raise ConfigError("initial_state is empty: pass the decoder's initial state, e.g. a tuple (h, c) of [batch, units] tensors.")
    first = tf.convert_to_tensor(flat[0])
    if first.shape.rank is None or first.shape.rank < 1:
        raise ConfigError("initial_state tensors need a known rank >= 1 with the batch as leading dim.")
    return _shape_list(first)[0]


def _mask_and_log_softmax(logits: tf.Tensor, banned_ids: Sequence[int], vocab_size=None) -> tf.Tensor:
    """Set banned tokens' logits to -inf and return float32 log-probs [rows, vocab]."""
    logits = tf.cast(logits, tf.float32)  # [rows, vocab]
    if vocab_size is not None and logits.shape[-1] is not None and logits.shape[-1] != vocab_size:
        raise ConfigError(f"step_fn returned logits with {logits.shape[-1]} classes but vocab_size={vocab_size}; pass the model's vocabulary size.")
    vocab = logits.shape[-1] if logits.shape[-1] is not None else tf.shape(logits)[-1]
    banned = tf.constant(sorted(set(banned_ids)), tf.int32)  # [n_banned]
    is_banned = tf.reduce_any(tf.equal(tf.range(vocab)[:, None], banned[None, :]), axis=1)  # [vocab]
    logits = tf.where(is_banned[None, :], tf.constant(_NEG_INF, tf.float32), logits)
    return tf.nn.log_softmax(logits, axis=-1)  # [rows, vocab]


def bad_ending_ids_of(words: Sequence[str]) -> tuple:
    """The ids of the vocabulary `words` (id = position) that are in BAD_ENDINGS."""
    bad = set(BAD_ENDINGS)
    return tuple(i for i, w in enumerate(words) if w in bad)


def _repeated_trigram_penalty(seq: tf.Tensor, t: tf.Tensor, vocab) -> tf.Tensor:
    """[rows, vocab] float32: -inf for each token that would repeat a trigram of its row, else 0.

    seq [rows, time] holds the t tokens generated so far (zeros from t on).
    The next token x completes the trigram (seq[t-2], seq[t-1], x); it is
    blocked when some earlier position j (j + 2 <= t - 1) starts the bigram
    (seq[t-2], seq[t-1]) and x = seq[j+2].
    """
    rows, time = _shape_list(seq)
    if not isinstance(time, int):
        raise ConfigError("block_trigrams needs a static max_len.")
    if time < 4:  # a trigram can only repeat from the 4th token on
        return tf.zeros([rows, vocab], tf.float32)
    prev2 = tf.gather(seq, tf.maximum(t - 2, 0), axis=1)  # [rows]
    prev1 = tf.gather(seq, tf.maximum(t - 1, 0), axis=1)  # [rows]
    first, second, third = seq[:, :time - 2], seq[:, 1:time - 1], seq[:, 2:]  # [rows, time-2] each
    starts = tf.range(time - 2)  # [time-2]
    repeats = (tf.equal(first, prev2[:, None]) & tf.equal(second, prev1[:, None])
               & (starts[None, :] + 2 <= t - 1))  # [rows, time-2]; third is a generated token
    row = tf.broadcast_to(tf.range(rows)[:, None], tf.shape(third))  # [rows, time-2]
    indices = tf.reshape(tf.stack([row, third], axis=-1), [-1, 2])  # [rows*(time-2), 2]
    updates = tf.reshape(tf.where(repeats, _NEG_INF, 0.0), [-1])  # [rows*(time-2)]
    return tf.tensor_scatter_nd_min(tf.zeros([rows, vocab], tf.float32), indices, updates)  # [rows, vocab]


def _constrain(log_probs: tf.Tensor, last: tf.Tensor, seq: tf.Tensor, t: tf.Tensor, end_id: int,
               bad_endings: Sequence[int], block_trigrams: bool) -> tf.Tensor:
    """log_probs [rows, vocab] with the end token at -inf after a bad ending and repeated trigrams at -inf.

    last [rows]: the token each row fed this step; seq [rows, time]: its tokens so far; t []: steps done.
    """
    vocab = _shape_list(log_probs)[1]
    if bad_endings:
        bad = tf.constant(sorted(set(bad_endings)), tf.int32)  # [n_bad]
        after_bad = tf.reduce_any(tf.equal(last[:, None], bad[None, :]), axis=1)  # [rows]
        is_end = tf.equal(tf.range(vocab), end_id)  # [vocab]
        log_probs = tf.where(after_bad[:, None] & is_end[None, :], _NEG_INF, log_probs)
    if block_trigrams:
        log_probs = log_probs + _repeated_trigram_penalty(seq, t, vocab)
    return log_probs


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def _check_normalization(length_normalization: str) -> None:
    if length_normalization not in LENGTH_NORMALIZATIONS:
        raise ConfigError(f"length_normalization={length_normalization!r} is not supported; use one of {', '.join(LENGTH_NORMALIZATIONS)}.")


def _banned_ids(forbidden_ids: Sequence[int], end_id: int, vocab_size=None) -> tuple:
    ids = tuple(int(i) for i in forbidden_ids)
    if end_id in ids:
        raise ConfigError(f"end_id={end_id} is also in forbidden_ids; the end token must stay generatable.")
    if end_id == PAD_ID:
        raise ConfigError(f"end_id must not be the padding id {PAD_ID}.")
    for i in ids + (end_id,):
        if i < 0 or (vocab_size is not None and i >= vocab_size):
            raise ConfigError(f"token id {i} (end_id or forbidden_ids) is outside the vocabulary [0, {vocab_size}).")
    return (PAD_ID,) + ids


def _check_bad_endings(bad_ending_ids: Sequence[int], end_id: int, vocab_size=None) -> tuple:
    ids = tuple(int(i) for i in bad_ending_ids)
    if end_id in ids:
        raise ConfigError(f"end_id={end_id} is in bad_ending_ids; list the ids of words a caption may not end on.")
    for i in ids:
        if i < 0 or (vocab_size is not None and i >= vocab_size):
            raise ConfigError(f"bad ending id {i} is outside the vocabulary [0, {vocab_size}).")
    return ids


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}.")
    return value




# ----------------------------------------------------------------------------
# Greedy decoding
# ----------------------------------------------------------------------------


def _greedy_loop(step_fn: StepFn, initial_state: Any, max_len: int, start_id: int, end_id: int,
                 banned: Sequence[int], vocab_size=None, bad_endings: Sequence[int] = (),
                 block_trigrams: bool = False) -> _GreedyLoopState:
    """Arg-max decoding; returns the final loop state (tokens, lengths, log-probs, steps)."""
    initial_state = tf.nest.map_structure(tf.convert_to_tensor, initial_state)
    batch = _batch_size(initial_state)

    def cond(s: _GreedyLoopState):
        return tf.logical_and(s.t < max_len, tf.logical_not(tf.reduce_all(s.done)))

    def body(s: _GreedyLoopState):
        logits, new_state = step_fn(s.last, s.state)  # [batch, vocab]
        new_state = _like_structure(s.state, new_state)
        log_probs = _mask_and_log_softmax(logits, banned, vocab_size)  # [batch, vocab]
        log_probs = _constrain(log_probs, s.last, s.tokens, s.t, end_id, bad_endings, block_trigrams)
        next_token = tf.argmax(log_probs, axis=-1, output_type=tf.int32)  # [batch]
        next_log_prob = tf.gather(log_probs, next_token, batch_dims=1)  # [batch]
        live = tf.logical_not(s.done)  # [batch]
        written = tf.where(live, next_token, PAD_ID)  # [batch]
        at_t = tf.one_hot(s.t, max_len, dtype=tf.int32)  # [time]
        tokens = s.tokens + written[:, None] * at_t[None, :]  # [batch, time]
        lengths = tf.where(live, s.t + 1, s.lengths)  # [batch]
        total = tf.where(live, s.log_probs + next_log_prob, s.log_probs)  # [batch]
        done = tf.logical_or(s.done, tf.equal(next_token, end_id))  # [batch]
        return (_GreedyLoopState(s.t + 1, tokens, lengths, total, done, next_token, new_state),)

    init = _GreedyLoopState(
        t=tf.constant(0, tf.int32),
        tokens=tf.zeros([batch, max_len], tf.int32),  # [batch, time]
        lengths=tf.zeros([batch], tf.int32),  # [batch]
        log_probs=tf.zeros([batch], tf.float32),  # [batch]
        done=tf.zeros([batch], tf.bool),  # [batch]
        last=tf.fill([batch], tf.constant(start_id, tf.int32)),  # [batch]
        state=initial_state,
    )
    (final,) = tf.while_loop(cond, body, (init,))
    return final


def greedy_decode(step_fn: StepFn, initial_state: Any, *, max_len: int, start_id: int, end_id: int,
                  forbidden_ids: Sequence[int] = (), bad_ending_ids: Sequence[int] = (),
                  block_trigrams: bool = False) -> tuple:
    """Greedy (arg-max) decoding of a whole batch.

    Args:
      step_fn: `(tokens [N] int32, state) -> (logits [N, V], new_state)`.
      initial_state: nest of tensors with leading dim = batch.
      max_len: maximum number of generated tokens (incl. the end token).
      start_id: token fed at the first step.
      end_id: token that ends a caption.
      forbidden_ids: ids never generated (the padding id 0 never is either).
      bad_ending_ids: ids after which the end token is never generated.
      block_trigrams: never repeat a trigram within a caption.

    Returns:
      tokens: [batch, max_len] int32 -- generated tokens, the end token
        included where produced, then 0-padding.
      lengths: [batch] int32 -- number of generated tokens incl. the end token.
    """
    max_len = _check_positive("max_len", max_len)
    banned = _banned_ids(forbidden_ids, end_id)
    bad_endings = _check_bad_endings(bad_ending_ids, end_id)
    final = _greedy_loop(step_fn, initial_state, max_len, start_id, end_id, banned,
                         bad_endings=bad_endings, block_trigrams=_check_bool("block_trigrams", block_trigrams))
    return final.tokens, final.lengths


# ----------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------


def beam_search(step_fn: StepFn, initial_state: Any, *, beam_width: int, max_len: int, start_id: int, end_id: int,
                vocab_size: int, forbidden_ids: Sequence[int] = (), length_normalization: str = "average",
                alpha: float = 0.6, bad_ending_ids: Sequence[int] = (), block_trigrams: bool = False
                ) -> BeamSearchResult:
    """Beam search over a batch of images with one `tf.while_loop`.

    Args:
      step_fn: `(tokens [N] int32, state) -> (logits [N, V], new_state)`,
        N = batch * beam_width inside the loop.
      initial_state: nest of tensors with leading dim = batch (e.g. the LSTM
        (h, c) computed from the image); tiled to batch * beam_width rows.
      beam_width: K, hypotheses returned per image. K = 1 is greedy decoding
        (arg-max each step; the result's score uses `length_normalization`).
      max_len: T, maximum number of generated tokens (incl. the end token).
        Hypotheses still alive at T compete as finished ones of length T.
      start_id: token fed at the first step (not part of the output).
      end_id: token that ends a caption (part of the output).
      vocab_size: V, number of logits per row.
      forbidden_ids: ids never generated (e.g. unknown token); the padding
        id 0 is always forbidden.
      length_normalization: "none" (sum of log-probs), "average" (divided by
        the number of generated tokens incl. end) or "gnmt" (divided by
        ((5 + length) / 6) ** alpha).
      alpha: GNMT exponent.
      bad_ending_ids: ids after which the end token is never generated
        (`bad_ending_ids_of(words)`); empty: any word may end a caption.
      block_trigrams: a hypothesis never repeats a trigram it contains.

    Returns:
      `BeamSearchResult` with tokens [batch, K, T], scores/log_probs/lengths
      [batch, K], best first per image, and the number of steps run.
    """
    beam = _check_positive("beam_width", beam_width)
    max_len = _check_positive("max_len", max_len)
    vocab_size = _check_positive("vocab_size", vocab_size)
    _check_normalization(length_normalization)
    if vocab_size < 2:
        raise ConfigError("vocab_size must be at least 2 (padding + end token).")
    banned = _banned_ids(forbidden_ids, end_id, vocab_size)
    bad_endings = _check_bad_endings(bad_ending_ids, end_id, vocab_size)
    block_trigrams = _check_bool("block_trigrams", block_trigrams)

    def penalty(lengths):
        return length_penalty(lengths, length_normalization, alpha)

    if beam == 1:
        return _greedy_as_beam(step_fn, initial_state, max_len, start_id, end_id, banned, vocab_size, penalty,
                               bad_endings, block_trigrams)

    initial_state = tf.nest.map_structure(tf.convert_to_tensor, initial_state)
    batch = _batch_size(initial_state)
    two_k = 2 * beam

    def still_improvable(s: _BeamLoopState) -> tf.Tensor:
        """[batch] bool: can some alive hypothesis still beat the worst finished one?

        An alive hypothesis has log-prob lp <= 0 after s.t tokens; anything it
        becomes has log-prob lp' <= lp and length L' in [s.t + 1, max_len], so
        its score lp' / pen(L') <= lp / pen(L') <= lp / max(pen(s.t + 1), pen(max_len))
        (pen is positive and monotone in L for every normalisation; dividing
        a non-positive number by the largest penalty gives the largest value).
        Empty finished slots score -inf, so an image keeps searching until it
        has K finished hypotheses; alive hypotheses at -inf can never improve.
        """
        best_alive = tf.reduce_max(s.alive_log_probs, axis=1)  # [batch]
        max_pen = tf.maximum(penalty(s.t + 1), penalty(max_len))  # []
        bound = best_alive / max_pen  # [batch]
        worst_finished = tf.reduce_min(s.finished_scores, axis=1)  # [batch]
        return bound > worst_finished

    def cond(s: _BeamLoopState):
        return tf.logical_and(s.t < max_len, tf.reduce_any(still_improvable(s)))

    def body(s: _BeamLoopState):
        active = still_improvable(s)  # [batch]; inactive images keep their finished set
        logits, new_state = step_fn(_merge_beams(s.alive_last), s.alive_state)  # [batch*beam, vocab]
        new_state = _like_structure(s.alive_state, new_state)  # nest of [batch*beam, ...]
        log_probs = _mask_and_log_softmax(logits, banned, vocab_size)  # [batch*beam, vocab]
        log_probs = _constrain(log_probs, _merge_beams(s.alive_last), _merge_beams(s.alive_seq), s.t, end_id,
                               bad_endings, block_trigrams)  # [batch*beam, vocab]
        log_probs = _split_beams(log_probs, batch, beam)  # [batch, beam, vocab]

        # Top 2K of the K*V expansions per image, by raw summed log-prob.
        cand_log_probs = s.alive_log_probs[:, :, None] + log_probs  # [batch, beam, vocab]
        cand_log_probs = tf.reshape(cand_log_probs, [batch, beam * vocab_size])  # [batch, beam*vocab]
        topk_log_probs, topk_index = tf.math.top_k(cand_log_probs, k=two_k)  # [batch, 2K]
        topk_parent = topk_index // vocab_size  # [batch, 2K]
        topk_token = topk_index % vocab_size  # [batch, 2K]
        at_t = tf.one_hot(s.t, max_len, dtype=tf.int32)  # [time]
        # Parents have zeros at positions >= t, so adding writes the new token at t.
        topk_seq = _gather_beams(s.alive_seq, topk_parent) + topk_token[:, :, None] * at_t  # [batch, 2K, time]
        topk_is_end = tf.equal(topk_token, end_id)  # [batch, 2K]

        # New alive set: best K candidates that did not end (at most K of 2K end).
        alive_rank = tf.where(topk_is_end, _NEG_INF, topk_log_probs)  # [batch, 2K]
        alive_log_probs, alive_pos = tf.math.top_k(alive_rank, k=beam)  # [batch, beam]
        alive_seq = _gather_beams(topk_seq, alive_pos)  # [batch, beam, time]
        alive_last = _gather_beams(topk_token, alive_pos)  # [batch, beam]
        alive_parent = _gather_beams(topk_parent, alive_pos)  # [batch, beam]
        alive_state = tf.nest.map_structure(
            lambda x: _merge_beams(_gather_beams(_split_beams(x, batch, beam), alive_parent)), new_state)

        # New finished set: old finished + candidates that ended (or hit max_len).
        length_now = s.t + 1  # []
        finishes = tf.logical_or(topk_is_end, length_now >= max_len)  # [batch, 2K]
        cand_scores = tf.where(finishes, topk_log_probs / penalty(length_now), _NEG_INF)  # [batch, 2K]
        all_scores = tf.concat([s.finished_scores, cand_scores], axis=1)  # [batch, 3K]
        all_seq = tf.concat([s.finished_seq, topk_seq], axis=1)  # [batch, 3K, time]
        all_log_probs = tf.concat([s.finished_log_probs, topk_log_probs], axis=1)  # [batch, 3K]
        all_lengths = tf.concat([s.finished_lengths, tf.fill(tf.shape(topk_token), length_now)], axis=1)  # [batch, 3K]
        finished_scores, finished_pos = tf.math.top_k(all_scores, k=beam)  # [batch, beam]
        keep_old = tf.logical_not(active)  # [batch]
        finished_scores = tf.where(keep_old[:, None], s.finished_scores, finished_scores)
        finished_seq = tf.where(keep_old[:, None, None], s.finished_seq, _gather_beams(all_seq, finished_pos))
        finished_log_probs = tf.where(keep_old[:, None], s.finished_log_probs, _gather_beams(all_log_probs, finished_pos))
        finished_lengths = tf.where(keep_old[:, None], s.finished_lengths, _gather_beams(all_lengths, finished_pos))

        return (_BeamLoopState(s.t + 1, alive_seq, alive_log_probs, alive_last, alive_state,
                               finished_seq, finished_scores, finished_log_probs, finished_lengths),)

    first_beam_only = tf.constant([[0.0] + [_NEG_INF] * (beam - 1)], tf.float32)  # [1, beam]
    init = _BeamLoopState(
        t=tf.constant(0, tf.int32),
        alive_seq=tf.zeros([batch, beam, max_len], tf.int32),  # [batch, beam, time]
        # All K copies start identical; only the first is expanded at step 0.
        alive_log_probs=tf.tile(first_beam_only, [batch, 1]),  # [batch, beam]
        alive_last=tf.fill([batch, beam], tf.constant(start_id, tf.int32)),  # [batch, beam]
        alive_state=tf.nest.map_structure(lambda x: _tile_beams(x, beam), initial_state),  # nest of [batch*beam, ...]
        finished_seq=tf.zeros([batch, beam, max_len], tf.int32),  # [batch, beam, time]
        finished_scores=tf.fill([batch, beam], tf.constant(_NEG_INF, tf.float32)),  # [batch, beam]
        finished_log_probs=tf.fill([batch, beam], tf.constant(_NEG_INF, tf.float32)),  # [batch, beam]
        finished_lengths=tf.zeros([batch, beam], tf.int32),  # [batch, beam]
    )
    (final,) = tf.while_loop(cond, body, (init,))

    # Slots never filled by a real hypothesis: blank them out.
    valid = tf.math.is_finite(final.finished_scores)  # [batch, beam]
    return BeamSearchResult(
        tokens=tf.where(valid[:, :, None], final.finished_seq, PAD_ID),  # [batch, beam, time]
        scores=final.finished_scores,  # [batch, beam]
        log_probs=tf.where(valid, final.finished_log_probs, _NEG_INF),  # [batch, beam]
        lengths=tf.where(valid, final.finished_lengths, 0),  # [batch, beam]
        steps=final.t,
    )


def _greedy_as_beam(step_fn, initial_state, max_len, start_id, end_id, banned, vocab_size, penalty, bad_endings,
                    block_trigrams) -> BeamSearchResult:
    """beam_width=1: greedy decoding packed as a `BeamSearchResult`.

    The alive/finished scheme with 2K candidates would, for K=1, keep the
    runner-up end token of an earlier step as a finished hypothesis and could
    return it instead of the arg-max path; K=1 is defined here as greedy.
    """
    final = _greedy_loop(step_fn, initial_state, max_len, start_id, end_id, banned, vocab_size, bad_endings,
                         block_trigrams)
    return BeamSearchResult(
        tokens=final.tokens[:, None, :],  # [batch, 1, time]
        scores=(final.log_probs / penalty(final.lengths))[:, None],  # [batch, 1]
        log_probs=final.log_probs[:, None],  # [batch, 1]
        lengths=final.lengths[:, None],  # [batch, 1]
        steps=final.t,
    )
