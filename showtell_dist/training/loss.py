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
      (loss_sum [], num_tokens []) both float32.
    """
    mask = tf.cast(tf.not_equal(targets, 0), tf.float32)  # [rows, time]
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(xent * mask), tf.reduce_sum(mask)
