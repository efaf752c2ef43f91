"""What a model directory holds besides checkpoints, and the resume guard.

  model_dir/config.json     the resolved experiment config of the run
  model_dir/vocab.json      the vocabulary the model's ids refer to
  model_dir/checkpoints/    tf.train.CheckpointManager checkpoints
  model_dir/train/, eval/   tf.summary event files

Resuming into a model_dir whose config or vocabulary differs from the run's
would silently mix two experiments, so it is refused with the differences
listed. Only operational settings (how often to log, save or evaluate, the
data's location) may change between a run and its resumption.
"""

from __future__ import annotations

import json

import tensorflow as tf

from showtell_dist.data.prepare import write_json_atomically
from showtell_dist.decoding.options import CONFIG_KEYS as DECODE_CONFIG_KEYS, CONFIG_SECTION
from showtell_dist.errors import ConfigError

# Settings that do not change what is trained.
OPERATIONAL_KEYS = frozenset({
    "data.source_dir", "data.records_dir", "data.features_dir", "data.image_dir", "data.generate_synthetic",
    "data.resize_to",  # how the records store images: resized at prepare time exactly as training resizes them
    "train.steps_per_loop", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "train.eval_max_images", "train.summary_images", "train.jit_compile", "train.log_every", "demo.num_examples",
    # How validation captions are decoded and which checkpoint is kept: not what is trained.
    "eval.select_metric", *(f"{CONFIG_SECTION}.{name}" for name in DECODE_CONFIG_KEYS),
})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if k not in OPERATIONAL_KEYS and a.get(k) != b.get(k)]


def _read(path: str) -> str | None:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def prepare_model_dir(model_dir: str, config: dict, vocab_json: str, *, write: bool) -> None:
    """Saves config and vocabulary into model_dir, or checks them against a saved run."""
    config_path, vocab_path = f"{model_dir}/config.json", f"{model_dir}/vocab.json"
    saved_config, saved_vocab = _read(config_path), _read(vocab_path)
    if saved_config is None and tf.train.latest_checkpoint(f"{model_dir}/checkpoints"):
        # Checkpoints of unknown origin (config.json deleted, or saved into a directory being emptied):
        # restoring them could mix two experiments, or fail deep in TensorFlow on a shape mismatch.
        raise ConfigError(f"{model_dir}/checkpoints holds checkpoints but {config_path} is missing, so they cannot "
                          "be checked against this run's config. Use a new --model_dir, delete "
                          f"{model_dir}/checkpoints to start afresh, or put back the config.json and vocab.json "
                          "of the run that wrote them.")
    if saved_config is not None:
        diffs = config_differences(json.loads(saved_config), config)
        if diffs:
            raise ConfigError(f"{model_dir} holds a run with a different config; refusing to resume into it. "
                              "Use a new --model_dir, or restore the saved settings:\n  " + "\n  ".join(diffs))
    if saved_vocab is not None and json.loads(saved_vocab)["words"] != json.loads(vocab_json)["words"]:
        raise ConfigError(f"{vocab_path} differs from the dataset's vocabulary: the checkpoints in {model_dir} "
                          "were trained on other token ids. Use a new --model_dir or the original dataset.")
    if write:
        tf.io.gfile.makedirs(model_dir)
        write_json_atomically(config_path, config)
        if saved_vocab is None:
            with tf.io.gfile.GFile(vocab_path, "w") as f:
                f.write(vocab_json)
