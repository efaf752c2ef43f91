"""The `finetune` section of a config: an encoder fine-tuning phase (training/trainer.py FineTuneTrainer).

A config runs it after cross-entropy with `c.phases = "xe,finetune"` (or "xe,finetune,scst") and
`c.finetune = finetune.section()`. The phase continues from the previous phase's weights (or
config.init_checkpoint) with the encoder trained too, by cross-entropy on the image records
(data.records_dir, never the features cache: cached features are stale once the encoder moves; every
later phase, validation and evaluation of the run reads images as well). BatchNorm statistics stay
frozen: the encoder runs in inference mode while its weights train. The encoder's variables learn at
`encoder_learning_rate`, the rest at `learning_rate`, under one warm-up/cosine schedule shape.
"""

import ml_collections


def section(**overrides) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.steps = 1000
    s.global_batch_size = 32        # images per step (all their captions)
    s.learning_rate = 1e-4          # decoder (everything but the encoder)
    s.encoder_learning_rate = 1e-5  # the encoder's variables; 0 keeps the encoder fixed
    s.warmup_steps = 0
    s.final_lr_ratio = 0.1
    s.schedule_steps = 0            # the schedule's length; 0: steps
    s.decay_fraction = 1.0          # the decay spans this last fraction of the schedule after warm-up
    s.clip_norm = 5.0
    for key, value in overrides.items():
        setattr(s, key, value)
    return s
