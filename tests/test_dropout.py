"""Stateless dropout: every replica (and worker) draws its own masks, a pure function of (seed, step, replica)."""

import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.model.show_and_tell import StatelessDropout, build_model, dropout_seed
from showtell_dist.training.trainer import Trainer
from tiny_setup import VOCAB, tiny_config, mirrored


def _mirrored(n):
    return mirrored(n)


def _masks(strategy, trainer, model):
    """Each replica's dropout mask of a [6, 16] block of ones, as the train step's seed gives it."""
    ones = tf.ones([6, 16])

    @tf.function
    def per_replica():
        return strategy.run(lambda: model.init_dropout(ones, training=True, seed=trainer.replica_dropout_seed()))

    return [t.numpy() != 0 for t in strategy.experimental_local_results(per_replica())]


def test_replicas_draw_different_masks_that_depend_only_on_seed_step_and_replica():
    strategy = _mirrored(2)
    config = tiny_config("unused")
    config.model.dropout = 0.5
    with strategy.scope():
        model = build_model(config.model, VOCAB)
    trainer = Trainer(strategy, model, config.train)
    first = _masks(strategy, trainer, model)
    assert len(first) == 2 and 0 < first[0].mean() < 1
    assert (first[0] != first[1]).any(), "both replicas drew the same dropout mask"
    again = _masks(strategy, trainer, model)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)  # no hidden state: same step, same masks
    trainer.step.assign(1)
    later = _masks(strategy, trainer, model)
    assert (later[0] != first[0]).any() and (later[1] != first[1]).any()
    # Replica 1 at step 1 draws what (seed, 1, 1) gives outside any strategy: nothing else enters.
    outside = model.init_dropout(tf.ones([6, 16]), training=True, seed=dropout_seed(config.train.seed, 1, 1))
    np.testing.assert_array_equal(later[1], outside.numpy() != 0)
    assert (dropout_seed(0, 1, 1).numpy() != dropout_seed(0, 1, 0).numpy()).any()
    assert (dropout_seed(0, 1, 1).numpy() != dropout_seed(1, 1, 1).numpy()).any()


def test_the_model_s_dropout_layers_draw_different_masks_under_one_seed():
    seed = dropout_seed(0, 0, 0)
    a = StatelessDropout(0.5, salt=0)(tf.ones([8, 32]), training=True, seed=seed)
    b = StatelessDropout(0.5, salt=1)(tf.ones([8, 32]), training=True, seed=seed)
    assert (a.numpy() != b.numpy()).any()
    np.testing.assert_allclose(np.unique(a.numpy()), [0.0, 2.0])  # kept units scaled by 1 / (1 - rate)
    np.testing.assert_array_equal(StatelessDropout(0.5, salt=0)(tf.ones([8, 32]), training=False), tf.ones([8, 32]))


def test_training_with_dropout_but_no_seed_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a seed"):
        StatelessDropout(0.5, salt=0)(tf.ones([2, 2]), training=True)
