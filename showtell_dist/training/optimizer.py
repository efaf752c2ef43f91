"""Adam with warm-up and cosine decay, fed gradients the train step has already reduced.

Keras' optimizers clip before they all-reduce, so clipping "by global norm"
would clip each replica's partial gradient. The train step instead all-reduces
the gradients itself, clips the global gradient, and hands the result to an
optimizer that must not reduce it a second time.
"""

from __future__ import annotations

import keras


class PreReducedAdam(keras.optimizers.Adam):
    """Adam whose gradients arrive already summed across replicas."""

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


class PerVariableRateAdam(PreReducedAdam):
    """PreReducedAdam whose learning rate is multiplied, for some variables, by their own factor
    (`rate_factors`: (variable, factor) pairs), e.g. encoder_learning_rate / learning_rate for the encoder's
    variables while fine-tuning. Adam's update is invariant to the scale of a gradient, so scaling the
    gradient would not do; one optimizer keeps one step count, one loss scale and one checkpoint."""

    def __init__(self, learning_rate, rate_factors: dict, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self._rate_factors = {id(v): float(f) for v, f in rate_factors}

    def build(self, variables):
        super().build(variables)
        # The variables as update_step receives them (the tf.Variable under a Keras variable).
        self._factor_of_index = {self._get_variable_index(v): self._rate_factors.get(id(v), 1.0)
                                 for v in variables}

    def update_step(self, gradient, variable, learning_rate):
        factor = self._factor_of_index[self._get_variable_index(variable)]
        super().update_step(gradient, variable, learning_rate * factor if factor != 1.0 else learning_rate)


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, final_ratio: float):
    """Linear warm-up from 0 to `peak`, then cosine decay to `peak * final_ratio`."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak,
        decay_steps=max(total_steps - warmup_steps, 1), alpha=final_ratio,
        warmup_target=peak if warmup_steps else None, warmup_steps=warmup_steps)


def build_optimizer(train_config, mixed_precision: str | None,
                    rate_factors: list | None = None) -> keras.optimizers.Optimizer:
    """rate_factors: [(variable, factor)] whose learning rate is `factor` times the schedule's."""
    schedule = learning_rate_schedule(train_config.learning_rate, train_config.warmup_steps, train_config.steps,
                                      train_config.final_lr_ratio)
    optimizer = PerVariableRateAdam(schedule, rate_factors) if rate_factors else PreReducedAdam(schedule)
    if mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
