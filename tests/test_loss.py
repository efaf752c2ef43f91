import numpy as np
import tensorflow as tf

from showtell_dist.training.loss import masked_token_loss_sum


def test_masked_loss_matches_hand_computation():
    logits = np.array([[[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [5.0, 5.0, 5.0]],
                       [[0.0, 1.0, 0.0], [1.0, 1.0, 3.0], [0.0, 0.0, 0.0]]], np.float32)  # [2, 3, 3]
    targets = np.array([[1, 2, 0], [2, 0, 0]], np.int32)  # 0 = padding

    def nll(row, label):
        return -(row[label] - np.log(np.exp(row).sum()))

    expected = nll(logits[0, 0], 1) + nll(logits[0, 1], 2) + nll(logits[1, 0], 2)
    loss_sum, tokens = masked_token_loss_sum(tf.constant(targets), tf.constant(logits))
    assert tokens.numpy() == 3.0
    np.testing.assert_allclose(loss_sum.numpy(), expected, rtol=1e-6)


def test_padding_logits_do_not_matter():
    targets = tf.constant([[3, 0, 0]])
    a = tf.random.stateless_normal([1, 3, 5], seed=[1, 2])
    b = tf.concat([a[:, :1], 100.0 * tf.ones([1, 2, 5])], axis=1)
    np.testing.assert_allclose(masked_token_loss_sum(targets, a)[0], masked_token_loss_sum(targets, b)[0])
