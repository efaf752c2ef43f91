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
                                          (and their sha256), image size and dim;
                                          a run's re-cache after fine-tuning
                                          (training/phases.py) names in it the
                                          run and checkpoint ("fine_tuned") and
                                          fingerprints the weights themselves

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
    """The directory training and evaluation read: the features cache when configured, else the records.
    (A run that fine-tunes its encoder reads the records from then on: training/phases.py data_dir_for.)"""
    return features_dir_of(config) or config.data.records_dir


def check_feature_dim(manifest: dict, model, features_dir: str) -> None:
    """Raises ConfigError when the cache's feature dimension is not the model encoder's."""
    dim = dataset_dir.feature_dim(manifest)
    if dim is not None and dim != int(model.encoder.output_shape[-1]):
        raise ConfigError(f"{features_dir} holds {dim}-dimensional features but the model's encoder outputs "
                          f"{model.encoder.output_shape[-1]}: re-run launch/cache_features.py for this model.")
