"""Rebuilds a trained model from its model_dir: config.json + vocab.json + a checkpoint."""

from __future__ import annotations

import dataclasses
import json

import ml_collections
import tensorflow as tf

from showtell_dist.config_validation import validate_config
from showtell_dist.data.tokenizer import Tokenizer
from showtell_dist.errors import ConfigError
from showtell_dist.model.show_and_tell import ShowAndTell, build_model
from showtell_dist.training.checkpoint_selection import best_checkpoint
from showtell_dist.training.weight_average import make_average_variables


@dataclasses.dataclass
class TrainedModel:
    model: ShowAndTell
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict
    checkpoint_path: str
    step: int


def load_trained_model(model_dir: str, checkpoint: str | None = None,
                       strategy: tf.distribute.Strategy | None = None) -> TrainedModel:
    """The model of `model_dir` with the weights of `checkpoint`.

    `checkpoint` may be a checkpoint prefix (model_dir/checkpoints/ckpt-500),
    a directory holding checkpoints (its latest is used), "best" (the one
    selected by a validation metric during training, model_dir/best), "latest"
    (the run's latest), or None: the selected one when the run selected one,
    else the latest. Variables are created in `strategy`'s scope when one is
    given, so the model can decode under it.
    """
    config_path = f"{model_dir.rstrip('/')}/config.json"
    if not tf.io.gfile.exists(config_path):
        raise ConfigError(f"{config_path} does not exist: {model_dir} is not a model directory written by "
                          "launch/train.py.")
    with tf.io.gfile.GFile(config_path) as f:
        config = ml_collections.ConfigDict(json.loads(f.read()))
    # A hand-edited config.json fails here, not mid-decoding.
    validate_config(config, source=config_path, fix="Restore the values the run was trained with.")
    tokenizer = Tokenizer.load(f"{model_dir.rstrip('/')}/vocab.json")
    if checkpoint in (None, "best"):
        path = best_checkpoint(model_dir)
        if path is None and checkpoint == "best":
            raise ConfigError(f"{model_dir} has no selected checkpoint (its run had no eval.select_metric or has "
                              "not evaluated yet); pass --checkpoint=latest or a checkpoint prefix.")
    else:
        path = None
    if path is None:
        path = f"{model_dir.rstrip('/')}/checkpoints" if checkpoint in (None, "latest") else checkpoint
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise ConfigError(f"no checkpoint in {path}; train first or pass --checkpoint=PREFIX.")
        path = latest
    elif not tf.io.gfile.glob(path + ".index"):
        raise ConfigError(f"checkpoint {path} does not exist (no {path}.index).")
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
        raise ConfigError(f"checkpoint {path} does not fit the model described by {config_path} "
                          f"(was it written by another version or config?): {exc}") from exc
    if averaged:
        for v, average in zip(model.trainable_variables, averages):
            v.assign(average.read_value())
    return TrainedModel(model, tokenizer, config, path, int(step.numpy()))
