"""The moving average of the weights: its update, its use for evaluation, and restoring it."""

import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.errors import ConfigError
from showtell_dist.run.restore import load_trained_model
from showtell_dist.training import train_loop
from showtell_dist.training.weight_average import WeightAverage
from tiny_setup import tiny_config


def test_update_follows_the_recurrence_and_swapping_restores_the_weights():
    strategy = tf.distribute.get_strategy()
    w = [tf.Variable([1.0, 2.0]), tf.Variable([[3.0]])]
    average = WeightAverage(strategy, w, decay=0.75)
    expected = [x.numpy().copy() for x in w]
    for step in range(1, 4):
        for x in w:
            x.assign(x * 2.0 + step)
        average.update()
        expected = [0.75 * e + 0.25 * x.numpy() for e, x in zip(expected, w)]
    for a, e in zip(average.averages, expected):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-6)
    raw = [x.numpy().copy() for x in w]
    with average.swapped_in():
        for x, e in zip(w, expected):
            np.testing.assert_allclose(x.numpy(), e, rtol=1e-6)
    for x, r in zip(w, raw):
        np.testing.assert_array_equal(x.numpy(), r)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_a_decay_outside_0_1_is_a_config_error(decay):
    with pytest.raises(ConfigError, match="weight_average_decay must be in"):
        WeightAverage(tf.distribute.get_strategy(), [tf.Variable(1.0)], decay)


def test_a_trained_model_is_restored_with_its_averaged_weights(tiny_dataset, tmp_path):
    records_dir, _ = tiny_dataset
    config = tiny_config(records_dir, steps=4, learning_rate=3e-2, weight_average_decay=0.6)
    model_dir = str(tmp_path / "run")
    _, exp = train_loop.train(config, tf.distribute.get_strategy(), model_dir, show_progress=False)
    averages = [a.numpy() for a in exp.trainer.weight_average.averages]
    raw = [v.numpy() for v in exp.model.trainable_variables]
    assert any(not np.allclose(a, r) for a, r in zip(averages, raw))
    trained = load_trained_model(model_dir)
    for v, a in zip(trained.model.trainable_variables, averages):
        np.testing.assert_allclose(v.numpy(), a, rtol=1e-6)
