"""What a run directory (a training run's model_dir) holds, and how to read and write it: `RunDir`.

  model_dir/config.json              the resolved experiment config of the run
  model_dir/vocab.json               the vocabulary the model's ids refer to
  model_dir/checkpoints/ckpt-N.*     tf.train.CheckpointManager checkpoints (the chief's)
  model_dir/checkpoints_worker_N/    scratch of worker N > 0 of a multi-worker run: a save is collective,
                                     so every worker saves; the others into this, deleted right after
  model_dir/best/ckpt-<step>.*       the checkpoint selected by eval.select_metric (only the latest best is kept)
  model_dir/best_worker_N/           scratch of worker N > 0 for the selected checkpoint, as for checkpoints
  model_dir/best/selection.json      the selection (schema below)
  model_dir/train/, eval/            tf.summary event files
  model_dir/eval_<split>/            launch/evaluate.py's metrics, captions and report (eval_<split>_ensemble
                                     for an ensemble); checkpoint_selection.evaluate_selected's too
  model_dir/export/                  launch/export.py's SavedModel, which launch/serve.py serves

best/selection.json (training/checkpoint_selection.py writes it at every scored evaluation):

  {"metric":  the eval.select_metric it selects by, e.g. "CIDEr-D",
   "best":    {"step", "phase", "value", "checkpoint", "metrics"} of the best scored step, or null,
   "history": [{"step", "phase", "metrics"}, ...]}    every scored step, in order

  "phase" is the name of the run's phase at that step (training/phases.py; absent in selections written
  before phases existed), "value" the selection metric's score, "checkpoint" the prefix saved into best/
  and "metrics" {metric name: corpus score} of the val split.

Training writes a run directory through `RunDir` (`prepare_for_training`, the checkpoint and scratch
directories, `write_selection`); evaluation, export and the launchers read it through `RunDir` and
restore.py, so none of them imports the training package. Reusing a run directory (resuming) with another
config or vocabulary is refused with the differences listed (`prepare_for_training`): only operational
settings (`OPERATIONAL_KEYS`: how often to log, save or evaluate, the data's location, decoding) may change
between a run and its resumption.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections
import tensorflow as tf

from showtell_dist.config_fields import SELECTABLE_METRICS
from showtell_dist.config_validation import validate_config
from showtell_dist.decoding.options import CONFIG_KEYS as DECODE_CONFIG_KEYS, CONFIG_SECTION, DecodeOptions
from showtell_dist.errors import ConfigError
from showtell_dist.storage.atomic_files import write_json_atomically

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
SELECTION_FILE = "selection.json"
EXPORT_DIR = "export"
SUMMARY_DIRS = ("train", "eval")

# Settings that do not change what is trained: they may differ when a run directory is reused.
OPERATIONAL_KEYS = frozenset({
    "data.source_dir", "data.records_dir", "data.features_dir", "data.image_dir", "data.generate_synthetic",
    "data.resize_to",  # how the records store images: resized at prepare time exactly as training resizes them
    "train.steps_per_loop", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "train.eval_max_images", "train.summary_images", "train.jit_compile", "train.log_every", "demo.num_examples",
    # How validation captions are decoded and which checkpoint is kept: not what is trained.
    "eval.select_metric", *(f"{CONFIG_SECTION}.{name}" for name in DECODE_CONFIG_KEYS),
})


def join(model_dir: str, *names: str) -> str:
    return "/".join([model_dir.rstrip("/"), *names])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """The settings, other than OPERATIONAL_KEYS, in which two configs (as dicts) differ."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if k not in OPERATIONAL_KEYS and a.get(k) != b.get(k)]


def _read(path: str) -> str | None:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def checkpoint_at(path: str) -> str:
    """The checkpoint prefix `path` names, found without knowing its run: a checkpoint prefix (with its
    .index), a run directory (its selected checkpoint, else its latest: `RunDir.resolve_checkpoint`) or a
    directory holding checkpoints (its latest, e.g. runs/x/best). E.g. config.init_checkpoint."""
    path = path.rstrip("/")
    if tf.io.gfile.exists(path + ".index"):
        return path
    if tf.io.gfile.exists(join(path, CONFIG_FILE)):
        return RunDir(path).resolve_checkpoint()
    found = tf.train.latest_checkpoint(path) if tf.io.gfile.isdir(path) else None
    if found:
        return found
    raise ConfigError(f"{path!r} is neither a checkpoint prefix (no {path}.index), a run directory (no "
                      f"{CONFIG_FILE}) nor a directory holding checkpoints; pass e.g. runs/x/best, runs/x or "
                      "runs/x/checkpoints/ckpt-3500.")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (local or gs://), and what is read from and written to it."""

    path: str

    def __post_init__(self):
        object.__setattr__(self, "path", self.path.rstrip("/"))

    def join(self, *names: str) -> str:
        return join(self.path, *names)

    # -- paths ---------------------------------------------------------------

    @property
    def config_file(self) -> str:
        return self.join(CONFIG_FILE)

    @property
    def vocab_file(self) -> str:
        return self.join(VOCAB_FILE)

    @property
    def checkpoints(self) -> str:
        """The chief's checkpoints: what every worker restores from."""
        return self.join(CHECKPOINTS_DIR)

    @property
    def best(self) -> str:
        return self.join(BEST_DIR)

    @property
    def selection_file(self) -> str:
        return self.join(BEST_DIR, SELECTION_FILE)

    @property
    def export(self) -> str:
        return self.join(EXPORT_DIR)

    def summaries(self, kind: str) -> str:
        """The tf.summary directory of "train" or "eval"."""
        if kind not in SUMMARY_DIRS:
            raise ValueError(f"summaries are {SUMMARY_DIRS}, not {kind!r}")
        return self.join(kind)

    def recached_features(self, encoder_phase: str) -> str:
        """The features re-cached with the encoder as the phase `encoder_phase` (e.g. "finetune") left it."""
        return self.join(f"features_after_{encoder_phase}")

    def eval_output(self, split: str, *, ensemble: bool = False) -> str:
        return self.join(f"eval_{split}" + ("_ensemble" if ensemble else ""))

    @staticmethod
    def _scratch(directory: str, task_id: int | None) -> str:
        return directory if task_id is None else f"{directory}_worker_{task_id}"

    def checkpoint_save_dir(self, task_id: int | None = None) -> str:
        """Where a worker saves checkpoints: `checkpoints` for the chief (task_id None), a scratch
        directory for another worker (it must save too: the save is collective)."""
        return self._scratch(self.checkpoints, task_id)

    def best_save_dir(self, task_id: int | None = None) -> str:
        """Where a worker saves the selected checkpoint: `best` for the chief (task_id None), else scratch."""
        return self._scratch(self.best, task_id)

    # -- reading -------------------------------------------------------------

    def read_config(self) -> ml_collections.ConfigDict:
        """config.json; a ConfigError when this is not a run directory."""
        path = self.config_file
        if not tf.io.gfile.exists(path):
            raise ConfigError(f"{path} does not exist: {self.path} is not a model directory written by "
                              "launch/train.py.")
        with tf.io.gfile.GFile(path) as f:
            config = ml_collections.ConfigDict(json.loads(f.read()))
        # A hand-edited config.json fails here, not mid-decoding.
        validate_config(config, source=path, fix="Restore the values the run was trained with.")
        return config

    def read_selection(self) -> dict | None:
        """best/selection.json, or None when there is none or it selected no checkpoint (its "best" is null)."""
        path = self.selection_file
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            try:
                selection = json.loads(f.read())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON ({exc}); delete it (and {BEST_DIR}/) to fall back to "
                                  "the latest checkpoint.") from exc
        return selection if selection.get("best") else None

    def best_checkpoint(self) -> str | None:
        """The selected checkpoint's prefix, or None when there is none."""
        selection = self.read_selection()
        if selection is None:
            return None
        prefix = selection["best"]["checkpoint"]
        if not tf.io.gfile.exists(prefix + ".index"):
            # The run directory was moved: the checkpoint sits next to selection.json.
            prefix = self.join(BEST_DIR, prefix.rsplit("/", 1)[-1])
        if not tf.io.gfile.exists(prefix + ".index"):
            raise ConfigError(f"{self.selection_file} names checkpoint {prefix}, which does not exist; pass "
                              "--checkpoint=latest (or a checkpoint prefix) instead.")
        return prefix

    def latest_checkpoint(self) -> str | None:
        """The chief's latest checkpoint (what a resumed run restores), or None."""
        return tf.train.latest_checkpoint(self.checkpoints)

    def resolve_checkpoint(self, checkpoint: str | None = None) -> str:
        """The checkpoint prefix `checkpoint` names in this run; the one resolver of checkpoints.

          None        the selected checkpoint (best/) when the run selected one, else the latest
          "best"      the selected checkpoint
          "latest"    the latest of checkpoints/
          any path    `checkpoint_at(path)`: a checkpoint prefix (e.g. runs/x/checkpoints/ckpt-500), a
                      run directory or a directory holding checkpoints (its latest)
        """
        if checkpoint not in (None, "best", "latest"):
            return checkpoint_at(checkpoint)
        if checkpoint != "latest":
            best = self.best_checkpoint()
            if best is not None:
                return best
            if checkpoint == "best":
                raise ConfigError(f"{self.path} has no selected checkpoint (its run had no eval.select_metric or "
                                  "has not evaluated yet); pass --checkpoint=latest or a checkpoint prefix.")
        latest = self.latest_checkpoint()
        if latest is None:
            raise ConfigError(f"no checkpoint in {self.checkpoints}; train first or pass --checkpoint=PREFIX.")
        return latest

    # -- writing (training) --------------------------------------------------

    def prepare_for_training(self, config: dict, vocab_json: str, *, write: bool) -> None:
        """Checks a reused run directory against this run's config and vocabulary (raising ConfigError with
        the differences), then with `write` (the chief) saves both (the vocabulary only when absent)."""
        saved_config, saved_vocab = _read(self.config_file), _read(self.vocab_file)
        if saved_config is None and self.latest_checkpoint():
            # Checkpoints of unknown origin (config.json deleted, or saved into a directory being emptied):
            # restoring them could mix two experiments, or fail deep in TensorFlow on a shape mismatch.
            raise ConfigError(f"{self.checkpoints} holds checkpoints but {self.config_file} is missing, so they "
                              "cannot be checked against this run's config. Use a new --model_dir, delete "
                              f"{self.checkpoints} to start afresh, or put back the config.json and vocab.json "
                              "of the run that wrote them.")
        if saved_config is not None:
            diffs = config_differences(json.loads(saved_config), config)
            if diffs:
                raise ConfigError(f"{self.path} holds a run with a different config; refusing to resume into it. "
                                  "Use a new --model_dir, or restore the saved settings:\n  " + "\n  ".join(diffs))
        if saved_vocab is not None and json.loads(saved_vocab)["words"] != json.loads(vocab_json)["words"]:
            raise ConfigError(f"{self.vocab_file} differs from the dataset's vocabulary: the checkpoints in "
                              f"{self.path} were trained on other token ids. Use a new --model_dir or the original "
                              "dataset.")
        if write:
            tf.io.gfile.makedirs(self.path)
            write_json_atomically(self.config_file, config)
            if saved_vocab is None:
                with tf.io.gfile.GFile(self.vocab_file, "w") as f:
                    f.write(vocab_json)

    def write_selection(self, selection: dict) -> None:
        """best/selection.json (the schema in the module docstring)."""
        write_json_atomically(self.selection_file, selection)


def _eval_section(config):
    """The run's `eval` config section; runs from before it existed have none."""
    return config.get("eval", None) or {}


def eval_options(config) -> DecodeOptions:
    """The decoding options of a run's config (its `eval` section), with defaults for older runs."""
    return DecodeOptions.from_config(config)


def select_metric_of(config) -> str:
    metric = _eval_section(config).get("select_metric", "")
    if metric and metric not in SELECTABLE_METRICS:
        raise ConfigError(f"eval.select_metric={metric!r} is not a selection metric; use one of "
                          f"{', '.join(SELECTABLE_METRICS)}, or '' to keep only the latest checkpoints.")
    return metric
