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


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, final_ratio: float):
    """Linear warm-up from 0 to `peak`, then cosine decay to `peak * final_ratio`."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak,
        decay_steps=max(total_steps - warmup_steps, 1), alpha=final_ratio,
        warmup_target=peak if warmup_steps else None, warmup_steps=warmup_steps)


def build_optimizer(train_config, mixed_precision: str | None) -> keras.optimizers.Optimizer:
    optimizer = PreReducedAdam(learning_rate_schedule(
        train_config.learning_rate, train_config.warmup_steps, train_config.steps,
        train_config.final_lr_ratio))
    if mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
