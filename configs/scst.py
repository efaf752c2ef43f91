"""The `scst` section of a config: a self-critical phase (training/self_critical.py).

A config runs it after cross-entropy with `c.phases = "xe,scst"` and `c.scst = scst.section()`;
see flickr8k_mobilenet_scst.py. `steps` are this phase's own updates; the run's global step counts on
from the previous phase. The learning-rate schedule restarts (a new Adam) at the phase start: warm-up
over `warmup_steps`, then, with final_lr_ratio < 1, a cosine decay over the last `decay_fraction` of the
schedule (`schedule_steps` long, 0: `steps`), holding `learning_rate` before it (training/optimizer.py).
"""

import ml_collections


def section(**overrides) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.steps = 1000
    s.global_batch_size = 32        # images per step; each gets samples_per_image samples
    s.samples_per_image = 5         # K
    s.baseline = "mean"             # "mean": the mean reward of the image's other K - 1 samples; "greedy"
    s.max_len = 20                  # tokens per sample, <end> included
    s.temperature = 1.0             # samples from softmax(logits / temperature)
    s.dropout = False               # the model's output dropout while sampling and in the gradient pass
                                    # (the same masks in both)
    s.reward_end_token = True       # CIDEr-D scores <end> as a word of samples and references (Rennie et
                                    # al.; penalises captions cut off mid-phrase). Measured on Flickr8k val
                                    # (README, Results): at least as good as without (44.2 vs 44.0 CIDEr-D)
    s.xe_weight = 0.0               # > 0 mixes in the references' cross-entropy
    s.learning_rate = 5e-5
    s.warmup_steps = 0
    s.final_lr_ratio = 1.0          # 1.0: constant learning rate
    s.decay_fraction = 1.0          # the decay spans this last fraction of the schedule (1/3: its last third)
    s.schedule_steps = 0            # the schedule's length; 0: steps
    s.clip_norm = 5.0
    for key, value in overrides.items():
        setattr(s, key, value)
    return s
