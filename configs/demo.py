"""The default experiment: the embedded synthetic shapes dataset and a small CNN.

Learns in a few minutes on 2 CPU cores. Used by `python launch/train.py` with
no flags: generates the dataset if absent, prepares records, trains, prints
greedy captions for held-out images.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.source_dir = "data_cache/shapes/raw"       # a dataset in any supported layout
    c.data.records_dir = "data_cache/shapes/records"  # prepared shards (local or gs://)
    c.data.features_dir = ""                          # a frozen encoder's features cache, "" to train on images
    c.data.layout = "auto"
    c.data.image_dir = ""
    c.data.generate_synthetic = True                  # generate source_dir if it is absent
    c.data.synthetic = ml_collections.ConfigDict(
        dict(num_train=4000, num_val=300, num_test=300, image_size=64, seed=0))
    c.data.images_per_shard = 500
    c.data.resize_to = 0                              # > 0: prepare stores images resized to NxN (model.image_size)
    c.data.captions_per_image = 4
    c.data.shuffle_buffer = 2000                      # records read as one group and permuted (>= a shard)
    c.data.caption_buckets = 4                        # pad each batch's captions to one of 4 lengths; 0: max_len
    c.data.deterministic_input = False                # True: batches in input order (exact resume), slower

    c.tokenizer = ml_collections.ConfigDict(
        dict(lang="en", spacy_model="", min_count=1, vocab_size=0, max_len=0))

    c.model = ml_collections.ConfigDict()
    c.model.encoder = "small_cnn"
    c.model.encoder_weights = ""
    c.model.encoder_trainable = True
    c.model.image_size = 64
    c.model.units = 192
    c.model.embed_dim = 128
    c.model.dropout = 0.1
    c.model.feature_norm = "batch"    # "batch" (synchronised), "layer" or "none"

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 32
    c.train.steps = 3500
    c.train.steps_per_loop = 50
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 100
    c.train.final_lr_ratio = 0.05
    c.train.schedule_steps = 0       # the cosine schedule's length; 0: steps (longer: stop part-way down it)
    c.train.decay_fraction = 1.0     # the decay spans this last fraction of the schedule after warm-up
    c.train.clip_norm = 5.0
    c.train.seed = 0
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.eval_every = 500
    c.train.eval_max_images = 0      # 0: the whole validation split
    c.train.summary_images = 8       # val images captioned into TensorBoard (model_dir/eval) at each eval; 0: off
    c.train.mixed_precision = ""     # "" (float32; bf16 on TPU), "float32", "auto", "mixed_float16", "mixed_bfloat16"
    c.train.jit_compile = False
    c.train.weight_average_decay = 0.0  # > 0: evaluate and export a moving average of the weights

    # How launch/evaluate.py (and the selection below) decode: beam search over each image's captions.
    c.eval = ml_collections.ConfigDict()
    c.eval.beam_width = 3
    c.eval.length_normalization = "average"   # "none", "average" (the tutorial's) or "gnmt"
    c.eval.alpha = 0.6                         # GNMT length-penalty exponent
    c.eval.remove_bad_endings = False          # True: no caption ends on "a", "with", "the", ... (CIDEr-trained runs)
    c.eval.block_trigrams = False              # True: no caption repeats a trigram
    c.eval.select_metric = ""                  # e.g. "CIDEr-D": keep the best checkpoint by it in model_dir/best

    c.demo = ml_collections.ConfigDict(dict(num_examples=10))
    return c
