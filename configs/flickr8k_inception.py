"""Flickr8k with a frozen ImageNet InceptionV3 (299x299, 2048 features), trained from a features cache.

    python launch/train.py --config=configs/flickr8k_inception.py

As flickr8k_mobilenet.py, with Keras' ImageNet InceptionV3 weights: "imagenet"
downloads them on first use (needs internet); offline, pass a local file with
--config.model.encoder_weights=/path/inception_v3_notop.weights.h5.
"""

import os

from configs import flickr8k_mobilenet


def get_config():
    c = flickr8k_mobilenet.get_config()
    c.data.features_dir = os.path.join(flickr8k_mobilenet.REPO_ROOT, "data_cache", "flickr8k", "features_inception_v3")
    c.model.encoder = "inception_v3"
    c.model.encoder_weights = "imagenet"
    c.model.image_size = 299
    return c
