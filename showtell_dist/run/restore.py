"""Rebuilds a trained model from its run directory: config.json + vocab.json + a checkpoint.

    trained = load_trained_model(model_dir, "best", strategy)   # TrainedModel(model, tokenizer, config, ...)

A run that kept a moving average of its weights (train.weight_average_decay
> 0) checkpointed the averages next to the weights (`make_average_variables`,
also used by training/weight_average.py); the restored model holds the
averages, which is what evaluation and export use.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import ml_collections
import tensorflow as tf

from showtell_dist.data.tokenizer import Tokenizer
from showtell_dist.errors import ConfigError
from showtell_dist.model.show_and_tell import ShowAndTell, build_model
from showtell_dist.run.run_dir import RunDir


@dataclasses.dataclass
class TrainedModel:
    model: ShowAndTell
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict
    checkpoint_path: str
    step: int


def make_average_variables(variables, *, trainable=False) -> list:
    """Non-trainable copies of `variables` (same order and shapes), created in the current scope."""
    return [tf.Variable(tf.convert_to_tensor(v), trainable=trainable, name=f"average_{i}",
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for i, v in enumerate(variables)]


def load_trained_model(model_dir: str, checkpoint: str | None = None,
                       strategy: tf.distribute.Strategy | None = None) -> TrainedModel:
    """The model of `model_dir` with the weights of `checkpoint`.

    `checkpoint` is resolved by `RunDir.resolve_checkpoint`: a prefix, a
    directory of checkpoints, a run directory, "best", "latest" or None (the
    selected one when the run selected one, else the latest). Variables are created in
    `strategy`'s scope when one is given, so the model can decode under it.
    """
    run = RunDir(model_dir)
    config = run.read_config()
    tokenizer = Tokenizer.load(run.vocab_file)
    path = run.resolve_checkpoint(checkpoint)
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.encoder_weights = ""  # every weight comes from the checkpoint
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build_model(model_config, tokenizer.vocab_size)
    step = tf.Variable(0, dtype=tf.int64)
    # A run that kept a moving average of its weights is evaluated and exported with the average.
    averaged = float(config.train.get("weight_average_decay", 0.0) or 0.0) > 0
    with (strategy or tf.distribute.get_strategy()).scope():
        averages = make_average_variables(model.trainable_variables) if averaged else None
    extra = {"weight_average": averages} if averaged else {}
    try:
        tf.train.Checkpoint(model=model, step=step, **extra).restore(path).expect_partial() \
            .assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as exc:
        raise ConfigError(f"checkpoint {path} does not fit the model described by {run.config_file} "
                          f"(was it written by another version or config?): {exc}") from exc
    if averaged:
        for v, average in zip(model.trainable_variables, averages):
            v.assign(average.read_value())
    return TrainedModel(model, tokenizer, config, path, int(step.numpy()))


def ensemble_members(model_dirs: Sequence[str], checkpoints: Sequence[str | None] = ()) -> list[tuple[str, str | None]]:
    """(model_dir, checkpoint) of every ensemble member, from the launchers' --model_dir and --checkpoint lists.

    One run and N checkpoints: N members of that run. M runs and no or one
    checkpoint: that checkpoint (default: selected, else latest) of each run.
    M runs and M checkpoints: pairwise.
    """
    model_dirs, checkpoints = list(model_dirs), list(checkpoints) or [None]
    if not model_dirs:
        raise ConfigError("no model directory given: pass --model_dir=DIR (several, comma-separated, for an "
                          "ensemble).")
    if len(model_dirs) == 1:
        return [(model_dirs[0], c) for c in checkpoints]
    if len(checkpoints) == 1:
        return [(d, checkpoints[0]) for d in model_dirs]
    if len(checkpoints) != len(model_dirs):
        raise ConfigError(f"{len(model_dirs)} model directories but {len(checkpoints)} checkpoints: give one "
                          "checkpoint for every model directory (in the same order), one for all, or none.")
    return list(zip(model_dirs, checkpoints))


def load_ensemble(members: Sequence[tuple[str, str | None]],
                  strategy: tf.distribute.Strategy | None = None) -> list[TrainedModel]:
    """The trained models of `members` [(model_dir, checkpoint)], which must share one vocabulary."""
    models = [load_trained_model(model_dir, checkpoint, strategy) for model_dir, checkpoint in members]
    check_same_vocabulary(models)
    return models


def check_same_vocabulary(models: Sequence[TrainedModel]) -> None:
    """Raises ConfigError unless every member maps the same words to the same ids (and has the same max_len)."""
    first = models[0]
    for other in models[1:]:
        if list(other.tokenizer.words) != list(first.tokenizer.words) or \
                other.tokenizer.max_len != first.tokenizer.max_len:
            raise ConfigError(
                f"an ensemble needs one vocabulary, but {other.checkpoint_path} ({other.tokenizer.vocab_size} "
                f"words, max_len {other.tokenizer.max_len}) and {first.checkpoint_path} "
                f"({first.tokenizer.vocab_size} words, max_len {first.tokenizer.max_len}) were trained on "
                "different ones: ensemble only runs prepared from the same dataset (same vocab.json).")
