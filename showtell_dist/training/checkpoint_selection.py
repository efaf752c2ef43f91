"""Model selection by a validation caption metric, during training.

The checkpoint with the lowest validation loss is not the one that writes the
best captions, so a run with `eval.select_metric` set (e.g. "CIDEr-D") decodes
the validation split every `train.eval_every` steps with the run's beam search
(`eval.beam_width`, `eval.length_normalization`, `eval.alpha`), scores it and,
when the metric improves, saves that checkpoint into model_dir/best/:

  model_dir/best/ckpt-<step>.*       the selected checkpoint (only the latest best is kept)
  model_dir/best/selection.json      {"metric", "best": {"step", "value", "checkpoint", "metrics"},
                                      "history": [{"step", "metrics"}, ...]}

`load_trained_model` and launch/evaluate.py then default to that checkpoint.
METEOR is left out of the selection scores (its JVM costs ~10 s a call); the
final evaluation (`evaluate_selected`) computes every metric. Selection runs
on one host (default, one_device or mirrored strategies); under MultiWorker it
is switched off with a message, and launch/evaluate.py --checkpoint scores
the kept checkpoints afterwards.
"""

from __future__ import annotations

import json

import tensorflow as tf

from showtell_dist.distribute.strategy import is_chief, num_workers
from showtell_dist.errors import ConfigError

BEST_DIR = "best"
SELECTION_FILE = "selection.json"
# METEOR is not offered: the selection scores leave it out (see the module docstring).
SELECTABLE_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")


def _eval_section(config):
    """The run's `eval` config section; runs from before it existed have none."""
    return config.get("eval", None) or {}


def eval_options(config) -> dict:
    """The decoding options of a run's config (its `eval` section), with defaults for older runs."""
    section = _eval_section(config)
    return {"beam_width": section.get("beam_width", 3),
            "length_normalization": section.get("length_normalization", "average"),
            "alpha": section.get("alpha", 0.6)}


def select_metric_of(config) -> str:
    metric = _eval_section(config).get("select_metric", "")
    if metric and metric not in SELECTABLE_METRICS:
        raise ConfigError(f"eval.select_metric={metric!r} is not a selection metric; use one of "
                          f"{', '.join(SELECTABLE_METRICS)}, or '' to keep only the latest checkpoints.")
    return metric


def read_selection(model_dir: str) -> dict | None:
    """model_dir/best/selection.json, or None when the run selected no checkpoint."""
    path = f"{model_dir.rstrip('/')}/{BEST_DIR}/{SELECTION_FILE}"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        try:
            selection = json.loads(f.read())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); delete it (and {BEST_DIR}/) to fall back to "
                              "the latest checkpoint.") from exc
    return selection if selection.get("best") else None


def best_checkpoint(model_dir: str) -> str | None:
    """The selected checkpoint's prefix, or None when there is none."""
    selection = read_selection(model_dir)
    if selection is None:
        return None
    prefix = selection["best"]["checkpoint"]
    if not tf.io.gfile.exists(prefix + ".index"):
        # The run directory was moved: the checkpoint sits next to selection.json.
        prefix = f"{model_dir.rstrip('/')}/{BEST_DIR}/{prefix.rsplit('/', 1)[-1]}"
    if not tf.io.gfile.exists(prefix + ".index"):
        raise ConfigError(f"{model_dir}/{BEST_DIR}/{SELECTION_FILE} names checkpoint {prefix}, which does not "
                          "exist; pass --checkpoint=latest (or a checkpoint prefix) instead.")
    return prefix


class CheckpointSelector:
    """Scores the validation split at each evaluation and keeps the best checkpoint in model_dir/best."""

    def __init__(self, exp, strategy: tf.distribute.Strategy, model_dir: str, *, log=print):
        self.metric = select_metric_of(exp.config)
        self.options = eval_options(exp.config)
        self.exp, self.strategy, self.log = exp, strategy, log
        self.model_dir = model_dir.rstrip("/")
        self.enabled = bool(self.metric)
        self._references = None
        if not self.enabled:
            return
        from showtell_dist.decoding.beam_search import check_decode_options
        from showtell_dist.evaluation.metrics import check_java

        check_decode_options(**self.options)
        if "val" not in exp.manifest["splits"]:
            raise ConfigError(f"eval.select_metric={self.metric!r} needs a val split, but the prepared dataset has "
                              f"{', '.join(sorted(exp.manifest['splits']))}; set --config.eval.select_metric=''.")
        if num_workers(strategy) > 1:
            log(f"eval.select_metric={self.metric!r}: checkpoint selection decodes on one host and is off under "
                "MultiWorker; score the kept checkpoints with launch/evaluate.py --checkpoint=... afterwards.")
            self.enabled = False
            return
        check_java()  # before step 1, not at the first evaluation
        self.chief = is_chief(strategy)
        self.manager = tf.train.CheckpointManager(exp.checkpoint, f"{self.model_dir}/{BEST_DIR}", max_to_keep=1)
        self.selection = read_selection(self.model_dir) or {"metric": self.metric, "best": None, "history": []}
        if self.selection["metric"] != self.metric:
            raise ConfigError(f"{self.model_dir}/{BEST_DIR} selected checkpoints by {self.selection['metric']}, "
                              f"this run by {self.metric}; use a new --model_dir or the same eval.select_metric.")

    def resume_at(self, step: int) -> None:
        """Forgets the scores of steps after `step`: the run continues from an earlier checkpoint, so
        they belong to weights that no longer exist."""
        if not self.enabled:
            return
        history = self.selection["history"]
        forgotten = [h["step"] for h in history if h["step"] > step]
        if not forgotten:
            return
        self.selection["history"] = [h for h in history if h["step"] <= step]
        best = self.selection["best"]
        if best and best["step"] > step:
            # best/ holds only that step's weights; the next evaluation's checkpoint replaces them.
            self.selection["best"] = None
        self.log(f"checkpoint selection: the run resumes at step {step}; forgot the val scores of steps "
                 f"{forgotten}" + (" and the best checkpoint among them" if best and best["step"] > step else ""))

    @property
    def best(self) -> dict | None:
        return self.selection["best"] if self.enabled else None

    def __call__(self, step: int, log=None, phase: str = "xe") -> dict | None:
        """Scores the current weights on val; saves them into best/ when they beat the best so far.
        phase: the run's phase at `step` (training/phases.py), recorded with the scores."""
        if not self.enabled:
            return None
        done = [h["metrics"] for h in self.selection["history"] if h["step"] == step]
        if done:  # a finished run launched again: that step was scored already
            return done[-1]
        from showtell_dist.data import feature_cache
        from showtell_dist.evaluation.evaluator import decode_split, scan_records
        from showtell_dist.evaluation.metrics import score_captions
        from showtell_dist.model.restore import TrainedModel

        data_dir = feature_cache.data_dir_of(self.exp.config)
        max_images = self.exp.config.train.get("eval_max_images", 0) or None
        trained = TrainedModel(self.exp.model, self.exp.tokenizer, self.exp.config, checkpoint_path="", step=step)
        with self.exp.trainer.evaluation_weights():  # the moving average, when the run keeps one
            results = decode_split(trained, data_dir, "val", self.strategy, max_images=max_images,
                                   progress=False, **self.options)
        if self._references is None:
            refs = scan_records(data_dir, "val", [r["image_id"] for r in results])
            self._references = {i: e["references"] for i, e in refs.items()}
        corpus, _ = score_captions({r["image_id"]: r["caption"] for r in results}, self._references,
                                   use_meteor=False)
        self.selection["history"].append({"step": step, "phase": phase, "metrics": corpus})
        best = self.selection["best"]
        improved = best is None or corpus[self.metric] > best["value"]
        if improved:
            prefix = self.manager.save(checkpoint_number=step)
            self.selection["best"] = {"step": step, "phase": phase, "value": corpus[self.metric],
                                      "checkpoint": prefix, "metrics": corpus}
        if self.chief:
            from showtell_dist.data.prepare import write_json_atomically

            write_json_atomically(f"{self.model_dir}/{BEST_DIR}/{SELECTION_FILE}", self.selection)
        best = self.selection["best"]
        others = ", ".join(f"{m} {100 * corpus[m]:.2f}" for m in ("BLEU-1", "BLEU-4", "CIDEr-D") if m != self.metric)
        verdict = "new best, saved" if improved else f"best {100 * best['value']:.2f} at step {best['step']}"
        (log or self.log)(f"step {step}: val {self.metric} {100 * corpus[self.metric]:.2f} ({others}; "
                          f"{len(results)} images, beam {self.options['beam_width']}) - {verdict}")
        return corpus


def evaluate_selected(model_dir: str, strategy: tf.distribute.Strategy, *, split: str = "val",
                      progress: bool = True) -> dict:
    """Every metric (METEOR too) of the selected checkpoint on `split`, written to model_dir/eval_<split>."""
    from showtell_dist.data import feature_cache
    from showtell_dist.evaluation.evaluator import evaluate_split
    from showtell_dist.model.restore import load_trained_model

    trained = load_trained_model(model_dir, "best", strategy)
    data_dir = feature_cache.data_dir_of(trained.config)
    return evaluate_split(trained, data_dir, split, strategy, f"{model_dir.rstrip('/')}/eval_{split}",
                          progress=progress, **eval_options(trained.config))
