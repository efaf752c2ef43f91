"""Trains a Show and Tell captioner under a tf.distribute strategy.

  python launch/train.py --strategy=mirrored                      # the demo
  python launch/train.py --config=configs/flickr8k_mobilenet.py --model_dir=runs/f8k
  python launch/train.py --config.train.steps=500 --strategy=mirrored --num_cpu_devices=2

With the default config it generates the synthetic shapes dataset if absent,
prepares records, trains, and prints greedy captions for held-out images. A
config with data.features_dir (e.g. flickr8k_mobilenet.py) also caches the
frozen encoder's features there if absent, and trains from them. With
eval.select_metric set, it keeps the checkpoint that scores best on the val
split in <model_dir>/best and ends by printing all its val metrics.
"""

import os
import sys

import _bootstrap  # noqa: F401  (puts the repo on sys.path)
from absl import flags

import cli
from showtell_dist.config_fields import MIXED_PRECISION_CHOICES

_CONFIG = cli.define_config_flag(os.path.join(_bootstrap.REPO_ROOT, "configs", "demo.py"), "Experiment config file.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoints, summaries and config (local or gs://). "
                                 "Default: runs/<config name>.")
_JIT = flags.DEFINE_bool("jit_compile", None, "XLA-compile the train step (overrides the config).")
_MIXED = flags.DEFINE_enum("mixed_precision", None, [choice or "none" for choice in MIXED_PRECISION_CHOICES],
                           "Precision (overrides the config): none = the device's default (mixed_bfloat16 on a "
                           "TPU, else float32); auto = mixed_bfloat16 where the device multiplies bf16 fast (TPU, "
                           "CPU with AMX/AVX512-BF16), else float32.")
_SAMPLES = flags.DEFINE_integer("num_examples", None, "Held-out images to caption at the end.")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None, "End this run (with a checkpoint) at this step; "
                                "a later run resumes. For time-sliced jobs.")
cli.define_strategy_flags()


def main(argv):
    del argv
    config = _CONFIG.value
    if _JIT.value is not None:
        config.train.jit_compile = _JIT.value
    if _MIXED.value is not None:
        config.train.mixed_precision = "" if _MIXED.value == "none" else _MIXED.value
    model_dir = _MODEL_DIR.value or cli.default_model_dir(flags.FLAGS["config"].config_filename)
    with cli.user_errors():
        cli.validate_config(config, init_checkpoint=True)  # every bad value in one message, before any work
        strategy = cli.strategy_from_flags()
        from showtell_dist.features.builder import ensure_features
        from showtell_dist.data.prepare import ensure_prepared
        from showtell_dist.distribute.strategy import is_chief
        from showtell_dist.training import train_loop

        ensure_prepared(config)
        ensure_features(config, strategy)  # with config.data.features_dir: the frozen encoder's features, once
        print(f"strategy: {type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s); "
              f"model_dir: {model_dir}", flush=True)
        metrics, experiment = train_loop.train(config, strategy, model_dir, stop_at_step=_STOP_AT.value)
        if is_chief(strategy):
            print(cli.format_metrics(metrics), flush=True)
        if metrics.get("preempted"):
            sys.exit(143)  # on every worker: all saved the same step and stopped
        from showtell_dist.training.phases import total_steps

        summary = None
        if "best_step" in metrics and metrics["step"] == total_steps(config):
            from showtell_dist.training.checkpoint_selection import evaluate_selected

            # Every worker decodes its share (the captions are gathered collectively); the chief scores them.
            summary = evaluate_selected(model_dir, strategy, split="val")
        if not is_chief(strategy):
            return
        if summary:
            from showtell_dist.evaluation.metrics import format_metrics_table

            print(f"selected checkpoint {summary['checkpoint']} (step {summary['step']}, best val "
                  f"{config.eval.select_metric}); every metric on the {summary['num_images']} val images, beam "
                  f"{summary['beam_width']}, length normalization {summary['length_normalization']}:\n"
                  f"{format_metrics_table(summary['metrics'])}\nwrote {summary['files']['report.html']}", flush=True)
        num = config.demo.num_examples if _SAMPLES.value is None else _SAMPLES.value
        if num:
            print(train_loop.held_out_samples(experiment, num), flush=True)


if __name__ == "__main__":
    cli.run(main)
