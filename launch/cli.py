"""Command-line glue shared by the launchers: the --config flag, strategy flags and user-error reporting."""

import contextlib
import importlib
import os
import re
import sys

from absl import app, flags

import _bootstrap  # noqa: F401
from showtell_dist.config_fields import LENGTH_NORMALIZATIONS, STRATEGIES

_STRATEGY = None
_CONFIG_DEFAULT = None


def define_strategy_flags():
    global _STRATEGY
    _STRATEGY = flags.DEFINE_enum("strategy", "default", list(STRATEGIES), "tf.distribute strategy.")
    flags.DEFINE_integer("num_cpu_devices", 1, "Split the CPU into N logical devices (for mirrored on a CPU).")
    flags.DEFINE_string("tpu", None, "With --strategy=tpu: a TPU name, 'local', or grpc://host:port.")


def define_decode_flags(beam_help: str = "Beam width (1 = greedy).") -> None:
    """--beam_width, --length_normalization, --alpha; unset, they take the run's eval.* settings."""
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


def define_config_flag(default: str | None, help_string: str):
    """--config (an experiment config file) and its --config.<field>=VALUE overrides; the flag's handle.

    An override of a field the config does not have exits 2 with one message naming the field, the
    close names and the shipped configs that have it, instead of ml_collections' traceback. The
    override is applied when the flag is parsed: here for the default config, else in `run`, which
    a launcher with this flag must use instead of app.run.
    """
    from ml_collections import config_flags

    global _CONFIG_DEFAULT
    _CONFIG_DEFAULT = default
    with _unknown_config_fields_exit(sys.argv):
        return config_flags.DEFINE_config_file("config", default, help_string)


def run(main) -> None:
    """app.run(main), with the --config overrides of unknown fields reported as `define_config_flag` says,
    and a --config file that does not exist refused (exit 2) before the flags are parsed."""
    def parse_flags(argv):
        path, _ = _config_arguments(argv)
        file = path.split(":", 1)[0] if path else None
        if file and not os.path.isfile(file):
            where = "" if os.path.abspath(os.getcwd()) == _bootstrap.REPO_ROOT else f" (in {_bootstrap.REPO_ROOT})"
            print(f"error: --config={path}: no such config file ({os.path.abspath(file)}); pass one of "
                  f"{', '.join(_shipped_configs())}{where}, or a file of your own with a get_config()",
                  file=sys.stderr, flush=True)
            sys.exit(2)
        with _unknown_config_fields_exit(argv):
            return app.parse_flags_with_usage(argv)

    app.run(main, flags_parser=parse_flags)


def _config_label(path: str) -> str:
    """configs/demo.py for a config of this checkout, else the path as given."""
    file = os.path.abspath(path.split(":", 1)[0])
    inside = os.path.relpath(file, _bootstrap.REPO_ROOT)
    return path if inside.startswith("..") else inside + path[len(path.split(":", 1)[0]):]


def _shipped_configs() -> dict:
    """{"configs/x.py": its config} of every config file of configs/ (the section modules have none)."""
    found = {}
    for name in sorted(os.listdir(os.path.join(_bootstrap.REPO_ROOT, "configs"))):
        if name.endswith(".py") and not name.startswith("_"):
            module = importlib.import_module(f"configs.{name[:-3]}")
            if hasattr(module, "get_config"):
                found[f"configs/{name}"] = module.get_config()
    return found


@contextlib.contextmanager
def _unknown_config_fields_exit(argv):
    """Exits 2 naming every --config.<field> of `argv` that the --config lacks, when loading it failed
    for that reason (ml_collections raises AttributeError or KeyError); other errors pass through."""
    try:
        yield
    except (AttributeError, KeyError):
        problems = _unknown_config_fields(argv)
        if not problems:
            raise
        print("error: " + "\n  ".join(problems) + "\n(--config.<field>=VALUE can only set a field the config "
              "already has.)", file=sys.stderr, flush=True)
        sys.exit(2)


def _config_arguments(argv) -> tuple:
    """(the --config path given in argv, else None; {field: its --config.<field> argument})."""
    path, overrides = None, {}
    for i, arg in enumerate(argv[1:], 1):
        if match := re.match(r"^--?config=(.*)$", arg):
            path = match.group(1)
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif match := re.match(r"^--?(?:no)?config\.([^=]+)", arg):
            overrides.setdefault(match.group(1), arg)
    return path, overrides


def _unknown_config_fields(argv) -> list[str]:
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser
    from showtell_dist.config_validation import unknown_field_problem

    path, overrides = _config_arguments(argv)
    path = path or _CONFIG_DEFAULT
    if not path or not overrides:
        return []
    try:
        config = ConfigFileFlagParser(name="config").parse(path).to_dict()
    except Exception:  # noqa: BLE001  (a config that does not load: its own error is the one to show)
        return []
    source = _config_label(path)
    others = None
    problems = []
    for name, arg in overrides.items():
        if unknown_field_problem(config, name) is None:
            continue
        others = _shipped_configs() if others is None else others
        problems.append(f"{arg}: " + unknown_field_problem(config, name, source=source, others=others))
    return problems


def validate_config(config, *, init_checkpoint: bool = False) -> None:
    """ConfigError listing every bad value of the --config (file and overrides), before any work.

    Fields without a rule of their own are type-checked against configs/demo.py's defaults.
    init_checkpoint: also check that the config's init_checkpoint (if set) names a checkpoint.
    """
    from configs import demo
    from showtell_dist.config_validation import validate_config as validate

    source = f"--config={flags.FLAGS['config'].config_filename} (with its --config.* overrides)"
    validate(config, source=source, reference=demo.get_config(),
             extra_checks=[_init_checkpoint_exists] if init_checkpoint else [])


def _init_checkpoint_exists(config) -> list[str]:
    path = config.get("init_checkpoint")
    if not path or not isinstance(path, str):
        return []
    from showtell_dist.errors import ConfigError
    from showtell_dist.run.run_dir import checkpoint_at

    try:
        checkpoint_at(path)
    except ConfigError as exc:
        return [f"init_checkpoint = {path!r}: {exc}"]
    return []


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
