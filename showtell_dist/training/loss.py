"""Masked token cross-entropy.

The loss of a step is the sum over real (non-padding) target tokens divided by
the number of real tokens in the *global* batch, so that N replicas, whose
gradients are summed, make exactly the update one device makes on the same
global batch, however unevenly the real tokens fall across replicas.
"""

from __future__ import annotations

import tensorflow as tf


def masked_token_loss_sum(targets: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Summed cross-entropy over real tokens, and their count.

    Args:
      targets: [rows, time] int32; 0 is padding.
      logits: [rows, time, vocab] float32.
    Returns:
      (loss_sum [], num_tokens []) in the logits' dtype (at least float32).
    """
    if logits.dtype in (tf.float16, tf.bfloat16):
        logits = tf.cast(logits, tf.float32)
    mask = tf.cast(tf.not_equal(targets, 0), logits.dtype)  # [rows, time]
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    return tf.reduce_sum(xent * mask), tf.reduce_sum(mask)
