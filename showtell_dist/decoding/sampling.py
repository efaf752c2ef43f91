"""Multinomial sampling of captions with a single-step decoder, replica-count independent.

    tokens, lengths = sample_captions(model.decode_step, state, uniforms, max_len=..., start_id=1, end_id=2)

Every row draws its next token from softmax(logits / temperature) by the
inverse CDF: the first token whose cumulative probability exceeds the row's
uniform number for that step. The uniform numbers are an input ([time, rows]),
so the caller decides what keys them. `global_uniforms` hashes (seed, step,
time, the row's position in the GLOBAL batch), so N replicas sample exactly
what one device samples for the same global batch, XLA or not, and a resumed
run samples what an uninterrupted one does.

Like the greedy decoder (beam_search.py), the loop is a `tf.while_loop` with
fixed-size buffers: it runs eagerly, in a `tf.function`, with
``jit_compile=True`` and per replica inside `strategy.run`. Token 0 (padding)
and `forbidden_ids` are never drawn (probability 0 after renormalisation).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import tensorflow as tf

from showtell_dist.errors import ConfigError

PAD_ID = 0


class _SampleLoopState(NamedTuple):
    t: tf.Tensor  # [] int32
    tokens: tf.Tensor  # [rows, time] int32
    lengths: tf.Tensor  # [rows] int32
    done: tf.Tensor  # [rows] bool
    last: tf.Tensor  # [rows] int32; the token fed at the next step
    log_p: tf.Tensor  # [rows] float32; the summed log-probabilities of the tokens written
    state: Any  # nest of [rows, ...]


def banned_mask(vocab_size: int, forbidden_ids: Sequence[int]) -> tf.Tensor:
    """[vocab] bool: padding and the forbidden ids."""
    ids = sorted({PAD_ID, *(int(i) for i in forbidden_ids)})
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ConfigError(f"forbidden token id {i} is outside the vocabulary [0, {vocab_size}).")
    return tf.reduce_any(tf.equal(tf.range(vocab_size)[:, None], tf.constant(ids)[None, :]), axis=1)


def sampling_log_probs(logits: tf.Tensor, banned: tf.Tensor, temperature: float = 1.0) -> tf.Tensor:
    """The log-probabilities rows are sampled from: [..., vocab] logits -> [..., vocab] (float32, or
    float64 for float64 logits), banned ids at a very low value (not -inf: gradients stay finite)."""
    if logits.dtype in (tf.float16, tf.bfloat16):
        logits = tf.cast(logits, tf.float32)
    logits = logits / tf.cast(temperature, logits.dtype)
    logits = tf.where(banned, tf.constant(-1e9, logits.dtype), logits)
    return tf.nn.log_softmax(logits, axis=-1)


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32): uint32 -> uint32, avalanching every input bit."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16)) * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15)) * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def global_uniforms(seed: int, step: tf.Tensor, max_len: int, row_offset: tf.Tensor, rows: int) -> tf.Tensor:
    """The uniform numbers of rows row_offset .. row_offset + rows - 1 of the global batch:
    [max_len, rows] float32 in [0, 1), a hash of (seed, step, time, global row).

    They depend only on the row's global position, not on the replica count. An integer hash
    rather than tf.random: the stateless random kernels draw other numbers under XLA than without
    it, and the same step must sample the same captions either way.
    """
    key = _mix(tf.cast(step, tf.uint32) + _mix(tf.constant(seed % (1 << 32), tf.uint32)))  # []
    time = tf.cast(tf.range(max_len), tf.uint32)[:, None]  # [time, 1]
    global_rows = tf.cast(row_offset + tf.range(rows), tf.uint32)[None, :]  # [1, rows]
    bits = _mix(global_rows + _mix(time + key))  # [time, rows]
    return tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))


def _draw(log_probs: tf.Tensor, uniforms: tf.Tensor) -> tf.Tensor:
    """Inverse-CDF draw: [rows, vocab] log-probs, [rows] uniforms -> [rows] int32 ids of nonzero probability."""
    probs = tf.exp(log_probs)  # [rows, vocab]
    cdf = tf.cumsum(probs, axis=-1)  # [rows, vocab]
    threshold = tf.cast(uniforms, cdf.dtype) * cdf[:, -1]  # [rows]; scaled by the total, which rounding leaves near 1
    ids = tf.reduce_sum(tf.cast(cdf <= threshold[:, None], tf.int32), axis=-1)  # first id with cdf > threshold
    ids = tf.minimum(ids, tf.shape(probs)[-1] - 1)
    chosen = tf.gather(probs, ids, batch_dims=1)
    # Rounding at the top of the CDF can land on a zero-probability id: take the likeliest instead.
    return tf.where(chosen > 0, ids, tf.argmax(probs, axis=-1, output_type=tf.int32))


def sample_captions(step_fn: Callable, initial_state: Any, uniforms: tf.Tensor, *, start_id: int, end_id: int,
                    banned: tf.Tensor, temperature: float = 1.0, with_log_probs: bool = False) -> tuple:
    """Samples one caption per row of initial_state.

    Args:
      step_fn: `(tokens [rows] int32, state) -> (logits [rows, vocab], new_state)`.
      initial_state: nest of [rows, ...] tensors (e.g. the LSTM's (h, c)).
      uniforms: [max_len, rows] float32 in [0, 1): the random number of each step and row.
      banned: [vocab] bool (see `banned_mask`); must not contain end_id.
    Returns:
      tokens: [rows, max_len] int32, the end token included where drawn, then 0-padding.
      lengths: [rows] int32, tokens drawn incl. the end token.
      log_probs (with_log_probs): [rows] float32, the summed log-probability (under `sampling_log_probs`)
        of each row's tokens as they were drawn, <end> included.
    """
    max_len = uniforms.shape[0]
    rows = uniforms.shape[1]
    initial_state = tf.nest.map_structure(tf.convert_to_tensor, initial_state)

    def cond(s: _SampleLoopState):
        return tf.logical_and(s.t < max_len, tf.logical_not(tf.reduce_all(s.done)))

    def body(s: _SampleLoopState):
        logits, new_state = step_fn(s.last, s.state)  # [rows, vocab]
        new_state = tf.nest.pack_sequence_as(s.state, tf.nest.flatten(new_state))
        new_state = tf.nest.map_structure(lambda new, old: tf.ensure_shape(new, old.shape), new_state, s.state)
        log_probs = sampling_log_probs(logits, banned, temperature)  # [rows, vocab]
        token = _draw(log_probs, tf.gather(uniforms, s.t))  # [rows]
        live = tf.logical_not(s.done)
        token_log_p = tf.cast(tf.gather(log_probs, token, batch_dims=1), tf.float32)  # [rows]
        log_p = s.log_p + tf.where(live, token_log_p, 0.0)
        written = tf.where(live, token, PAD_ID)
        tokens = s.tokens + written[:, None] * tf.one_hot(s.t, max_len, dtype=tf.int32)[None, :]  # [rows, time]
        lengths = tf.where(live, s.t + 1, s.lengths)
        done = tf.logical_or(s.done, tf.equal(token, end_id))
        return (_SampleLoopState(s.t + 1, tokens, lengths, done, token, log_p, new_state),)

    init = _SampleLoopState(t=tf.constant(0, tf.int32), tokens=tf.zeros([rows, max_len], tf.int32),
                            lengths=tf.zeros([rows], tf.int32), done=tf.zeros([rows], tf.bool),
                            last=tf.fill([rows], tf.constant(start_id, tf.int32)),
                            log_p=tf.zeros([rows], tf.float32), state=initial_state)
    (final,) = tf.while_loop(cond, body, (init,))
    if with_log_probs:
        return final.tokens, final.lengths, final.log_p
    return final.tokens, final.lengths
