"""Image encoders: images [batch, H, W, 3] in 0..255 -> features [batch, dim].

Each encoder carries its own input scaling, so the input pipeline only decodes
and resizes. Weights: "imagenet" (downloaded by Keras, needs internet), a local
weights file (e.g. mobilenet_v2_1.0_224_imagenet_notop.weights.h5), or None.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from showtell_dist.errors import ConfigError

# Native input size of each encoder.
IMAGE_SIZES = {"small_cnn": 64, "mobilenet_v2": 224, "inception_v3": 299}


def _small_cnn(image_size: int) -> keras.Model:
    """Four strided convolutions, flattened so that position survives (for the demo)."""
    inputs = keras.Input([image_size, image_size, 3])
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    for filters in (32, 64, 64, 64):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    return keras.Model(inputs, keras.layers.Flatten()(x), name="small_cnn")


def _application(name: str, image_size: int, weights: str | None) -> keras.Model:
    constructor = {"mobilenet_v2": keras.applications.MobileNetV2,
                   "inception_v3": keras.applications.InceptionV3}[name]
    local_file = weights not in (None, "imagenet")
    if local_file and not tf.io.gfile.exists(weights):
        raise ConfigError(f"encoder weights file {weights} does not exist; pass an existing "
                          ".weights.h5 file, 'imagenet' (needs internet) or none.")
    backbone = constructor(include_top=False, weights=None if local_file else weights,
                           input_shape=(image_size, image_size, 3), pooling="avg")
    if local_file:
        try:
            backbone.load_weights(weights)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"encoder weights file {weights} does not fit {name} at "
                              f"{image_size}x{image_size} without top: {exc}") from exc
    inputs = keras.Input([image_size, image_size, 3])
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)  # both expect [-1, 1]
    return keras.Model(inputs, backbone(x), name=name)


def build_encoder(name: str, *, image_size: int | None = None, weights: str | None = None) -> keras.Model:
    if name not in IMAGE_SIZES:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {sorted(IMAGE_SIZES)}.")
    image_size = image_size or IMAGE_SIZES[name]
    if name == "small_cnn":
        if weights not in (None, "none", ""):
            raise ConfigError("the small_cnn encoder has no pretrained weights; set encoder_weights to none.")
        return _small_cnn(image_size)
    return _application(name, image_size, None if weights in ("none", "") else weights)
