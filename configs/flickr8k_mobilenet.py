"""Flickr8k with a frozen ImageNet MobileNetV2, trained from a features cache.

    python launch/train.py --config=configs/flickr8k_mobilenet.py

prepares ../shared/data/flickr8k (6000 train, 1000 val images, 5 captions each)
into data_cache/flickr8k/records, runs MobileNetV2 once per image into
data_cache/flickr8k/features_mobilenet_v2 (1280 float16 features per image),
then trains the LSTM from those features: 16 epochs of the 6000 training
images in 6000 updates of 16 images (80 captions). Every 500 steps it
captions the 1000 val images (beam 3, GNMT length penalty) and keeps the
checkpoint with the best CIDEr-D in <model_dir>/best; at the end it prints
every val metric of that checkpoint. The best-loss checkpoint is not the
best-scoring one, and 3000 updates (8 epochs) were still improving; a first
run with 750 updates of 64 images underfit (val BLEU-4 0.144). Paths are
relative to the repository root, so it runs from any directory. Set
--config.data.features_dir= to train from the images instead (the same model,
much slower: the CNN runs on every step).
"""

import os

import ml_collections

from configs import demo

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared"))


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()

    c.data.source_dir = os.path.join(SHARED, "data", "flickr8k")
    c.data.records_dir = os.path.join(REPO_ROOT, "data_cache", "flickr8k", "records")
    c.data.features_dir = os.path.join(REPO_ROOT, "data_cache", "flickr8k", "features_mobilenet_v2")
    c.data.layout = "tutorial"
    c.data.generate_synthetic = False
    c.data.images_per_shard = 500
    c.data.captions_per_image = 5
    c.data.shuffle_buffer = 6000      # cached features are small: shuffle the whole training split

    c.tokenizer.min_count = 5
    c.tokenizer.max_len = 24          # <start> + 22 words + <end>: 99% of Flickr8k captions are not cut

    c.model.encoder = "mobilenet_v2"
    c.model.encoder_weights = os.path.join(SHARED, "weights", "mobilenet_v2_1.0_224_imagenet_notop.weights.h5")
    c.model.encoder_trainable = False
    c.model.image_size = 224
    c.model.units = 512
    c.model.embed_dim = 512
    c.model.dropout = 0.3
    c.model.feature_norm = "batch"

    c.train.global_batch_size = 16    # images; x 5 captions = 80 captions per step
    c.train.steps = 6000              # 16 epochs x 6000 images / 16
    c.train.steps_per_loop = 50
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.final_lr_ratio = 0.05
    c.train.clip_norm = 5.0
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3      # the latest, to resume; the best by val CIDEr-D is kept in <model_dir>/best
    c.train.eval_every = 500
    c.train.eval_max_images = 0       # the whole validation split (1000 images)

    c.eval.beam_width = 3
    c.eval.length_normalization = "gnmt"  # longer captions than "none"; higher METEOR and CIDEr-D
    c.eval.alpha = 0.6
    c.eval.select_metric = "CIDEr-D"
    c.demo.num_examples = 5
    return c
