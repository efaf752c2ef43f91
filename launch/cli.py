"""Command-line glue shared by the launchers: strategy flags and user-error reporting."""

import contextlib
import os
import sys

from absl import flags

import _bootstrap  # noqa: F401

_STRATEGY = None


def define_strategy_flags():
    global _STRATEGY
    from showtell_dist.distribute.strategy import STRATEGIES

    _STRATEGY = flags.DEFINE_enum("strategy", "default", list(STRATEGIES), "tf.distribute strategy.")
    flags.DEFINE_integer("num_cpu_devices", 1, "Split the CPU into N logical devices (for mirrored on a CPU).")
    flags.DEFINE_string("tpu", None, "With --strategy=tpu: a TPU name, 'local', or grpc://host:port.")


def define_decode_flags(beam_help: str = "Beam width (1 = greedy).") -> None:
    """--beam_width, --length_normalization, --alpha; unset, they take the run's eval.* settings."""
    from showtell_dist.decoding.options import LENGTH_NORMALIZATIONS

    flags.DEFINE_integer("beam_width", None, f"{beam_help} Default: the run's eval.beam_width, else 3.")
    flags.DEFINE_enum("length_normalization", None, list(LENGTH_NORMALIZATIONS),
                      "How beam hypotheses are ranked: summed log-prob, per token, or GNMT penalty. "
                      "Default: the run's eval.length_normalization, else average.")
    flags.DEFINE_float("alpha", None, "GNMT length-penalty exponent (with --length_normalization=gnmt). "
                       "Default: the run's eval.alpha, else 0.6.")
    flags.DEFINE_bool("remove_bad_endings", None, "Never end a caption on a function word ('a', 'with', 'the', "
                      "...). Default: the run's eval.remove_bad_endings, else False.")
    flags.DEFINE_bool("block_trigrams", None, "Never repeat a trigram within a caption. "
                      "Default: the run's eval.block_trigrams, else False.")


def define_model_flags() -> None:
    """--model_dir and --checkpoint, both lists: several checkpoints decode as an ensemble."""
    flags.DEFINE_list("model_dir", None, "Model directory written by launch/train.py (local or gs://); several "
                      "(comma-separated, one vocabulary) decode as an ensemble.", required=True)
    flags.DEFINE_list("checkpoint", None, "Checkpoint prefix (e.g. <model_dir>/checkpoints/ckpt-500), a directory "
                      "of checkpoints, 'best' (selected by a val metric during training) or 'latest'; several "
                      "(comma-separated) of one --model_dir, or one per --model_dir, decode as an ensemble "
                      "(their log-probabilities averaged at every step). Default: best if the run selected one, "
                      "else latest.")


def load_models(strategy=None) -> list:
    """The TrainedModels of --model_dir/--checkpoint: a list of one, or an ensemble's members."""
    from showtell_dist.run.restore import ensemble_members, load_ensemble

    return load_ensemble(ensemble_members(flags.FLAGS.model_dir, flags.FLAGS.checkpoint or ()), strategy)


def decode_options(run_config, **extra):
    """The DecodeOptions of the run's config (its eval section), overridden by the decode flags given
    (define_decode_flags) and by `extra` (e.g. max_new_tokens); validated."""
    from showtell_dist.decoding.options import CONFIG_KEYS, DecodeOptions

    given = {name: flags.FLAGS[name].value for name in CONFIG_KEYS if name in flags.FLAGS}
    return DecodeOptions.from_config(run_config, **given, **extra)


def validate_config(config) -> None:
    """ConfigError listing every bad value of the --config (file and overrides), before any work.

    Fields without a rule of their own are type-checked against configs/demo.py's defaults.
    """
    from configs import demo
    from showtell_dist.config_validation import validate_config as validate

    source = f"--config={flags.FLAGS['config'].config_filename} (with its --config.* overrides)"
    validate(config, source=source, reference=demo.get_config())


def strategy_from_flags():
    from showtell_dist.distribute.strategy import create_strategy

    return create_strategy(_STRATEGY.value, num_cpu_devices=flags.FLAGS.num_cpu_devices, tpu=flags.FLAGS.tpu)


def default_model_dir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    return os.path.join("runs", name)


@contextlib.contextmanager
def user_errors():
    """Prints a UserError's message (no stack trace) and exits with status 2."""
    from showtell_dist.errors import UserError

    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def format_metrics(metrics: dict) -> str:
    keys = ("step", "loss", "perplexity", "reward", "val_loss", "val_perplexity", "images_per_s")
    return "final: " + ", ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                                 for k in keys if k in metrics)
