"""Whether a features cache holds what a model's frozen encoder computes."""

from __future__ import annotations

import hashlib

import numpy as np

from showtell_dist.data import feature_cache, pipeline
from showtell_dist.data.feature_cache import NO_WEIGHTS
from showtell_dist.errors import ConfigError
from showtell_dist.model.encoders import IMAGE_SIZES


def encoder_image_size(model_config) -> int:
    """The image size the model's encoder sees (model.image_size, else the encoder's native size)."""
    if model_config.encoder not in IMAGE_SIZES:
        raise ConfigError(f"unknown encoder {model_config.encoder!r}; choose one of {sorted(IMAGE_SIZES)}.")
    return int(model_config.image_size or IMAGE_SIZES[model_config.encoder])


def require_weights(model_config) -> None:
    if model_config.encoder_weights in NO_WEIGHTS:
        raise ConfigError(
            f"model.encoder_weights is empty: a features cache needs an encoder that can be built again with the "
            f"same weights, not a randomly initialised {model_config.encoder}. Set model.encoder_weights to a "
            ".weights.h5 file (or 'imagenet'), or train from the image records (data.features_dir='').")


def check_features_compatible(manifest: dict, model_config, features_dir: str, encoder=None) -> None:
    """Raises ConfigError unless the features cache `manifest` holds what `model_config`'s encoder computes.

    encoder: the model's encoder, when it is at hand. A run's re-cache after fine-tuning (a "fine_tuned"
    entry) fits only an encoder with the weights it was computed with (check_recache_fits)."""
    if pipeline.manifest_kind(manifest) != feature_cache.KIND:
        return
    if encoder is not None and manifest["features"].get("fine_tuned"):
        check_recache_fits(manifest, model_config, encoder, features_dir)
        return
    fix = (f"re-run the caching for this model (python launch/cache_features.py --config=... "
           f"--output_dir={features_dir}, or delete {features_dir} and launch/train.py rebuilds it), "
           "or point data.features_dir at a cache made for it")
    if model_config.encoder_trainable:
        raise ConfigError(f"{features_dir} is a features cache, valid only for a frozen encoder, but "
                          "model.encoder_trainable is True. Set model.encoder_trainable=False, or train from the "
                          "image records (data.features_dir='').")
    cached = manifest["features"]
    image_size = encoder_image_size(model_config)
    if cached["encoder"] != model_config.encoder:
        raise ConfigError(f"{features_dir} holds features of encoder {cached['encoder']!r} but model.encoder is "
                          f"{model_config.encoder!r}: {fix}.")
    if int(cached["image_size"]) != image_size:
        raise ConfigError(f"{features_dir} holds features of {cached['image_size']}x{cached['image_size']} images "
                          f"but the model's encoder sees {image_size}x{image_size} (model.image_size): {fix}.")
    require_weights(model_config)
    sha = feature_cache.weights_fingerprint(model_config.encoder_weights)
    if cached["weights_sha256"] != sha:
        raise ConfigError(f"{features_dir} holds features computed with encoder weights {cached['weights']} "
                          f"(sha256 {cached['weights_sha256']}) but model.encoder_weights is "
                          f"{model_config.encoder_weights} (sha256 {sha}): {fix}.")


def encoder_fingerprint(weights: list) -> str:
    """sha256 (hex) of an encoder's weights (encoder.get_weights(): shapes and float32 values, in order)."""
    digest = hashlib.sha256()
    for w in weights:
        w = np.ascontiguousarray(np.asarray(w, np.float32))
        digest.update(repr(w.shape).encode())
        digest.update(w.tobytes())
    return digest.hexdigest()


def check_recache_fits(manifest: dict, model_config, encoder, features_dir: str) -> None:
    """Raises ConfigError unless the features cache `manifest` was computed by model_config's encoder with
    `encoder`'s current weights (a run's re-cache after fine-tuning: its "weights_sha256" is
    encoder_fingerprint of them)."""
    cached = manifest.get("features") or {}
    origin = cached.get("fine_tuned") or {}
    fix = f"delete {features_dir} and launch the run again: it re-caches the features with its encoder"
    if pipeline.manifest_kind(manifest) != feature_cache.KIND or not origin:
        raise ConfigError(f"{features_dir} is not a re-cache of a fine-tuned encoder (its manifest names no "
                          f"run and checkpoint): {fix}.")
    image_size = encoder_image_size(model_config)
    if cached["encoder"] != model_config.encoder or int(cached["image_size"]) != image_size:
        raise ConfigError(f"{features_dir} holds features of {cached['encoder']} at {cached['image_size']}x"
                          f"{cached['image_size']}, but the model's encoder is {model_config.encoder} at "
                          f"{image_size}x{image_size}: {fix}.")
    sha = encoder_fingerprint(encoder.get_weights())
    if cached["weights_sha256"] != sha:
        raise ConfigError(f"{features_dir} holds features of the encoder of run {origin['run']} at checkpoint "
                          f"{origin['checkpoint']} (step {origin['step']}, sha256 {cached['weights_sha256'][:12]}), "
                          f"but this run's encoder now has other weights (sha256 {sha[:12]}): the cache is stale; "
                          f"{fix}.")
