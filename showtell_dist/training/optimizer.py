"""Adam with warm-up and cosine decay, fed gradients the train step has already reduced.

A phase's section (train, finetune, scst) shapes its learning rate:

  warmup_steps     linear warm-up from 0 to learning_rate
  schedule_steps   the schedule's length (0: the phase's steps). Longer than steps, the phase stops
                   part-way down an unsqueezed schedule, e.g. at the step checkpoint selection found
                   best in a longer run
  decay_fraction   the cosine decay to learning_rate * final_lr_ratio spans this fraction of the
                   schedule after warm-up, at its end; before it the rate holds at learning_rate
                   (1.0: decay from the end of warm-up, 1/3: hold, then decay over the last third)

Keras' optimizers clip before they all-reduce, so clipping "by global norm"
would clip each replica's partial gradient. The train step instead all-reduces
the gradients itself, clips the global gradient, and hands the result to an
optimizer that must not reduce it a second time.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from showtell_dist.errors import ConfigError


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


class WarmupHoldCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over warmup_steps, `peak` for hold_steps, then cosine decay to
    peak * final_ratio over decay_steps, and that final rate after."""

    def __init__(self, peak: float, warmup_steps: int, hold_steps: int, decay_steps: int, final_ratio: float):
        self.peak, self.final_ratio = float(peak), float(final_ratio)
        self.warmup_steps, self.hold_steps, self.decay_steps = int(warmup_steps), int(hold_steps), int(decay_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * step / max(self.warmup_steps, 1)
        progress = tf.clip_by_value((step - self.warmup_steps - self.hold_steps) / max(self.decay_steps, 1), 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        decayed = self.peak * (self.final_ratio + (1.0 - self.final_ratio) * cosine)
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "hold_steps": self.hold_steps,
                "decay_steps": self.decay_steps, "final_ratio": self.final_ratio}


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, final_ratio: float,
                           decay_fraction: float = 1.0):
    """Linear warm-up from 0 to `peak`, then cosine decay to `peak * final_ratio` over the last
    `decay_fraction` of the steps after warm-up (holding `peak` before), ending at total_steps."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if decay_fraction >= 1.0:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup_steps else peak,
            decay_steps=max(total_steps - warmup_steps, 1), alpha=final_ratio,
            warmup_target=peak if warmup_steps else None, warmup_steps=warmup_steps)
    after_warmup = max(total_steps - warmup_steps, 1)
    decay_steps = max(int(round(decay_fraction * after_warmup)), 1)
    return WarmupHoldCosine(peak, warmup_steps, after_warmup - decay_steps, decay_steps, final_ratio)


def schedule_of(section):
    """The learning-rate schedule a phase's config section asks for (see the module docstring)."""
    steps = int(section.steps)
    total = int(section.get("schedule_steps", 0) or 0) or steps
    if total < steps:
        raise ConfigError(f"schedule_steps={total} is shorter than the phase's steps={steps}: its last "
                          f"{steps - total} steps would sit at the final learning rate. Set schedule_steps >= "
                          "steps, or 0 for a schedule as long as the phase.")
    decay_fraction = float(section.get("decay_fraction", 1.0))
    if not 0.0 < decay_fraction <= 1.0:
        raise ConfigError(f"decay_fraction={decay_fraction} must be in (0, 1] (1.0: decay from the end of "
                          "warm-up; 1/3: over the last third).")
    return learning_rate_schedule(section.learning_rate, section.warmup_steps, total, section.final_lr_ratio,
                                  decay_fraction)


def build_optimizer(train_config, mixed_precision: str | None,
                    rate_factors: list | None = None) -> keras.optimizers.Optimizer:
    """train_config: a phase's section (see the module docstring).
    rate_factors: [(variable, factor)] whose learning rate is `factor` times the schedule's."""
    schedule = schedule_of(train_config)
    optimizer = PerVariableRateAdam(schedule, rate_factors) if rate_factors else PreReducedAdam(schedule)
    if mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
