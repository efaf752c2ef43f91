"""A features cache: the frozen encoder's output for every image, computed once.

With a frozen encoder (`model.encoder_trainable=False`) the features of an
image never change during training, so running the CNN on every step wastes
almost all of the compute. features/builder.py runs the configured encoder
once per image of prepared records and writes, into a directory (local or gs://)
of the layout of dataset_dir.py:

  vocab.json                              copied from the records
  cider_document_frequencies.npz          copied from the records when they have it
  {split}-00000-of-000NN.tfrecord ...     the same shards, records and order as
                                          the source; each example keeps image/id
                                          and the captions, and carries
                                          image/features (float16 [dim]) instead
                                          of the image (records.py)
  manifest.json                           written last: the source manifest with
                                          this directory's shard sizes and md5s,
                                          "kind": "features" and a "features"
                                          entry naming the encoder, its weights
                                          (and their sha256), image size and dim

Training and evaluation read a features cache like image records (the input
pipeline yields `features` instead of `images`; the train and eval steps skip
the encoder). The model still builds its encoder, from the same weights file,
so its checkpoints and exports are those of a model trained from images.

This module is the format (what data needs to read a cache); building one
and checking that it fits a model (same encoder, image size and weights by
sha256, frozen encoder) live in showtell_dist/features/, which may import
the model.
"""

from __future__ import annotations

import hashlib

import tensorflow as tf

from showtell_dist.data import dataset_dir
from showtell_dist.errors import ConfigError

KIND = "features"
DTYPE = "float16"
NO_WEIGHTS = ("", "none", None)


def weights_fingerprint(weights: str | None) -> str:
    """sha256 (hex) of a weights file; "imagenet" for Keras' ImageNet weights; "none" for no weights."""
    if weights in NO_WEIGHTS:
        return "none"
    if weights == "imagenet":
        return "imagenet"
    if not tf.io.gfile.exists(weights):
        raise ConfigError(f"encoder weights file {weights} does not exist; set model.encoder_weights to an "
                          "existing .weights.h5 file (or 'imagenet').")
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(weights, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def features_dir_of(config) -> str:
    """config.data.features_dir, "" when the config trains from image records."""
    return config.data.get("features_dir", "") or ""


def data_dir_of(config) -> str:
    """The directory training and evaluation read: the features cache when configured, else the records."""
    return features_dir_of(config) or config.data.records_dir


# Phases of a run (training/phases.py) that move the encoder: from their start on, cached features are stale.
ENCODER_TRAINING_PHASES = ("finetune",)


def phase_names(config) -> list[str]:
    """The names in config.phases, in order (default ["xe"])."""
    return [n.strip() for n in (config.get("phases", "xe") or "xe").split(",") if n.strip()]


def data_dir_for(config, phase: str | None = None) -> str:
    """The directory a run reads in `phase` (a name in config.phases), or with phase None what
    evaluates the run's checkpoints afterwards: data_dir_of(config) until a phase that trains the
    encoder (a "finetune" phase) has begun, the image records (data.records_dir) from then on, since
    the cached features are those of the encoder before it moved."""
    names = phase_names(config)
    if phase is not None and phase in names:
        names = names[:names.index(phase) + 1]
    if any(name in ENCODER_TRAINING_PHASES for name in names):
        return config.data.records_dir
    return data_dir_of(config)


def check_cache_serves_run(config, data_dir: str, manifest: dict) -> None:
    """Raises ConfigError when `data_dir` is a features cache but the run (config) fine-tuned its
    encoder: the cache holds the features of the encoder before it moved."""
    if dataset_dir.manifest_kind(manifest) == KIND and data_dir_for(config) != data_dir_of(config):
        raise ConfigError(f"{data_dir} is a features cache, but this run fine-tuned its encoder (config.phases="
                          f"{config.get('phases', '')!r}), so the cached features are stale; decode from the image "
                          f"records ({config.data.records_dir}).")


def check_feature_dim(manifest: dict, model, features_dir: str) -> None:
    """Raises ConfigError when the cache's feature dimension is not the model encoder's."""
    dim = dataset_dir.feature_dim(manifest)
    if dim is not None and dim != int(model.encoder.output_shape[-1]):
        raise ConfigError(f"{features_dir} holds {dim}-dimensional features but the model's encoder outputs "
                          f"{model.encoder.output_shape[-1]}: re-run launch/cache_features.py for this model.")
