"""An exponential moving average of the trainable weights, for evaluation and export.

    average = WeightAverage(strategy, model.trainable_variables, decay=0.999)
    average.update()                  # in the replica step, after the optimizer's update
    with average.swapped_in():        # the model holds the averages while decoding or scoring
        ...

After every update, average <- decay * average + (1 - decay) * weights. The
averages start from the initial weights and are checkpointed with the run
(`tf.train.Checkpoint(..., weight_average=average.averages)`), so a resumed run
continues them exactly; `load_trained_model` restores them into the model of a
run that kept them. Averaging the last ~1/(1 - decay) updates smooths the noise
of the final steps, which usually scores a little better than the raw weights.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from showtell_dist.errors import ConfigError
from showtell_dist.run.restore import make_average_variables


class WeightAverage:
    def __init__(self, strategy: tf.distribute.Strategy, variables, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.weight_average_decay must be in (0, 1) (e.g. 0.999), or 0 for no moving "
                              f"average; got {decay}.")
        self.decay = float(decay)
        self.variables = list(variables)
        with strategy.scope():
            self.averages = make_average_variables(self.variables)

    def update(self) -> None:
        """average <- decay * average + (1 - decay) * weights; every replica holds the same weights."""
        for average, v in zip(self.averages, self.variables):
            average.assign(self.decay * average + (1.0 - self.decay) * tf.cast(tf.convert_to_tensor(v),
                                                                               average.dtype))

    @contextlib.contextmanager
    def swapped_in(self):
        """The model's variables hold the averages inside the block, their own values again after it."""
        saved = [tf.convert_to_tensor(v).numpy() for v in self.variables]
        for v, average in zip(self.variables, self.averages):
            v.assign(tf.cast(average.read_value(), v.dtype))
        try:
            yield
        finally:
            for v, value in zip(self.variables, saved):
                v.assign(value)
