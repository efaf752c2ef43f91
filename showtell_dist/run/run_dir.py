"""What a run directory (a training run's model_dir) holds, and how to read it.

  model_dir/config.json              the resolved experiment config of the run
  model_dir/vocab.json               the vocabulary the model's ids refer to
  model_dir/checkpoints/ckpt-N.*     tf.train.CheckpointManager checkpoints
  model_dir/best/ckpt-<step>.*       the checkpoint selected by eval.select_metric (only the latest best is kept)
  model_dir/best/selection.json      {"metric", "best": {"step", "value", "checkpoint", "metrics"},
                                      "history": [{"step", "metrics"}, ...]}
  model_dir/train/, eval/            tf.summary event files
  model_dir/eval_<split>/            launch/evaluate.py's metrics, captions and report

Training writes it (training/model_dir.py, training/checkpoint_selection.py);
evaluation, export and the launchers read it through this module and
restore.py, so none of them imports the training package.
"""

from __future__ import annotations

import json

import ml_collections
import tensorflow as tf

from showtell_dist.config_fields import SELECTABLE_METRICS
from showtell_dist.config_validation import validate_config
from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.errors import ConfigError

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
SELECTION_FILE = "selection.json"


def join(model_dir: str, *names: str) -> str:
    return "/".join([model_dir.rstrip("/"), *names])


def read_config(model_dir: str) -> ml_collections.ConfigDict:
    """model_dir/config.json; a ConfigError when `model_dir` is not a run directory."""
    path = join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        raise ConfigError(f"{path} does not exist: {model_dir} is not a model directory written by "
                          "launch/train.py.")
    with tf.io.gfile.GFile(path) as f:
        config = ml_collections.ConfigDict(json.loads(f.read()))
    # A hand-edited config.json fails here, not mid-decoding.
    validate_config(config, source=path, fix="Restore the values the run was trained with.")
    return config


def _eval_section(config):
    """The run's `eval` config section; runs from before it existed have none."""
    return config.get("eval", None) or {}


def eval_options(config) -> DecodeOptions:
    """The decoding options of a run's config (its `eval` section), with defaults for older runs."""
    return DecodeOptions.from_config(config)


def select_metric_of(config) -> str:
    metric = _eval_section(config).get("select_metric", "")
    if metric and metric not in SELECTABLE_METRICS:
        raise ConfigError(f"eval.select_metric={metric!r} is not a selection metric; use one of "
                          f"{', '.join(SELECTABLE_METRICS)}, or '' to keep only the latest checkpoints.")
    return metric


def read_selection(model_dir: str) -> dict | None:
    """model_dir/best/selection.json, or None when the run selected no checkpoint."""
    path = join(model_dir, BEST_DIR, SELECTION_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        try:
            selection = json.loads(f.read())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); delete it (and {BEST_DIR}/) to fall back to "
                              "the latest checkpoint.") from exc
    return selection if selection.get("best") else None


def best_checkpoint(model_dir: str) -> str | None:
    """The selected checkpoint's prefix, or None when there is none."""
    selection = read_selection(model_dir)
    if selection is None:
        return None
    prefix = selection["best"]["checkpoint"]
    if not tf.io.gfile.exists(prefix + ".index"):
        # The run directory was moved: the checkpoint sits next to selection.json.
        prefix = join(model_dir, BEST_DIR, prefix.rsplit("/", 1)[-1])
    if not tf.io.gfile.exists(prefix + ".index"):
        raise ConfigError(f"{join(model_dir, BEST_DIR, SELECTION_FILE)} names checkpoint {prefix}, which does "
                          "not exist; pass --checkpoint=latest (or a checkpoint prefix) instead.")
    return prefix


def resolve_checkpoint(model_dir: str, checkpoint: str | None = None) -> str:
    """The checkpoint prefix `checkpoint` names in the run `model_dir`.

    `checkpoint` may be a checkpoint prefix (model_dir/checkpoints/ckpt-500),
    a directory holding checkpoints (its latest), "best" (the one selected by
    a validation metric during training), "latest" (the run's latest), or
    None: the selected one when the run selected one, else the latest.
    """
    path = None
    if checkpoint in (None, "best"):
        path = best_checkpoint(model_dir)
        if path is None and checkpoint == "best":
            raise ConfigError(f"{model_dir} has no selected checkpoint (its run had no eval.select_metric or has "
                              "not evaluated yet); pass --checkpoint=latest or a checkpoint prefix.")
    if path is None:
        path = join(model_dir, CHECKPOINTS_DIR) if checkpoint in (None, "latest") else checkpoint
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise ConfigError(f"no checkpoint in {path}; train first or pass --checkpoint=PREFIX.")
        return latest
    if not tf.io.gfile.glob(path + ".index"):
        raise ConfigError(f"checkpoint {path} does not exist (no {path}.index).")
    return path


def checkpoint_at(path: str) -> str:
    """The checkpoint prefix `path` names, found without knowing its run: a checkpoint prefix (with its
    .index), a run directory (its selected checkpoint, else its latest: `resolve_checkpoint`) or a
    directory holding checkpoints (its latest, e.g. runs/x/best). E.g. config.init_checkpoint."""
    path = path.rstrip("/")
    if tf.io.gfile.exists(path + ".index"):
        return path
    if tf.io.gfile.exists(join(path, CONFIG_FILE)):
        return resolve_checkpoint(path)
    found = tf.train.latest_checkpoint(path) if tf.io.gfile.isdir(path) else None
    if found:
        return found
    raise ConfigError(f"{path!r} is neither a checkpoint prefix (no {path}.index), a run directory (no "
                      f"{CONFIG_FILE}) nor a directory holding checkpoints; pass e.g. runs/x/best, runs/x or "
                      "runs/x/checkpoints/ckpt-3500.")
