"""Flickr8k, MobileNetV2: cross-entropy from cached features, then the encoder fine-tuned with the LSTM.

    python launch/train.py --config=configs/flickr8k_mobilenet_finetune.py --model_dir=runs/f8k_finetune

Phase "xe" is flickr8k_mobilenet.py stopped at step 3500 of its 6000-step cosine (the schedule fix of
flickr8k_lite2_scst.py); phase "finetune" continues from those weights by cross-entropy on the image
records with MobileNetV2 trained too: 2 epochs (375 steps of 32 images), the encoder at 1e-5 and the rest
at 1e-4 (self-critical.pytorch's cnn_learning_rate with Adam), a 50-step warm-up and a cosine decay to
0.1x. The encoder's BatchNorm statistics stay frozen (training/trainer.py FineTuneTrainer). Validation
and the final evaluation then read the image records: the cached features are those of the encoder
before it moved.

Add a self-critical phase with --config.phases=xe,finetune,scst: it reads the features re-cached with the
fine-tuned encoder (made in the run directory when the phase begins), so it costs what it costs after
plain cross-entropy. To fine-tune an existing cross-entropy run instead of training one:

    python launch/train.py --config=configs/flickr8k_mobilenet_finetune.py --model_dir=runs/f8k_finetune \
        --config.phases=finetune --config.init_checkpoint=runs/f8k_xe
"""

import ml_collections

from configs import finetune, flickr8k_mobilenet_scst


def get_config() -> ml_collections.ConfigDict:
    c = flickr8k_mobilenet_scst.get_config()
    c.phases = "xe,finetune"
    c.train.steps = 3500
    c.train.schedule_steps = 6000     # flickr8k_mobilenet.py's cosine, stopped part-way down
    c.finetune = finetune.section(
        steps=375,                    # 2 epochs of 6000 images
        global_batch_size=32,
        learning_rate=1e-4,
        encoder_learning_rate=1e-5,
        warmup_steps=50,
        final_lr_ratio=0.1,
    )
    return c
