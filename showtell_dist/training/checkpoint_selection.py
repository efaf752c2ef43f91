"""Model selection by a validation caption metric, during training.

The checkpoint with the lowest validation loss is not the one that writes the
best captions, so a run with `eval.select_metric` set (e.g. "CIDEr-D") decodes
the validation split every `train.eval_every` steps with the run's decoding
options (its eval section, `run_dir.eval_options`), scores it and, when the
metric improves, saves that checkpoint into model_dir/best/ beside
best/selection.json (both described in run/run_dir.py, which reads them:
`load_trained_model` and launch/evaluate.py then default to that checkpoint).
METEOR is left out of the selection scores (its JVM costs ~10 s a call); the
final evaluation (`evaluate_selected`) computes every metric. The decode
function is built once (`SplitDecoder`) and reused at every evaluation. Under
MultiWorker every worker decodes its share of val and the captions are
all-gathered; the chief scores them and writes selection.json, and every
worker saves the best weights (a collective save; the others into
best_worker_<i>/, as training does with its checkpoints).
"""

from __future__ import annotations

import tensorflow as tf

from showtell_dist.distribute.strategy import barrier, is_chief, num_workers
from showtell_dist.errors import ConfigError
from showtell_dist.run.run_dir import RunDir, eval_options, select_metric_of

class CheckpointSelector:
    """Scores the validation split at each evaluation and keeps the best checkpoint in model_dir/best."""

    def __init__(self, exp, strategy: tf.distribute.Strategy, model_dir: str, *, log=print):
        self.metric = select_metric_of(exp.config)
        self.options = eval_options(exp.config)  # validated here, before step 1
        self.exp, self.strategy, self.log = exp, strategy, log
        self.run = RunDir(model_dir)
        self.enabled = bool(self.metric)
        self._references = None
        self._decoder = None  # SplitDecoder, built at the first evaluation and kept
        if not self.enabled:
            return
        from showtell_dist.evaluation.metrics import check_java

        if "val" not in exp.manifest["splits"]:
            raise ConfigError(f"eval.select_metric={self.metric!r} needs a val split, but the prepared dataset has "
                              f"{', '.join(sorted(exp.manifest['splits']))}; set --config.eval.select_metric=''.")
        check_java()  # before step 1, not at the first evaluation
        self.chief = is_chief(strategy)
        # Other workers save too (the save is collective), into a scratch directory.
        best_dir = self.run.best_save_dir(None if self.chief or num_workers(strategy) == 1
                                          else strategy.cluster_resolver.task_id)
        self.manager = tf.train.CheckpointManager(exp.checkpoint, best_dir, max_to_keep=1)
        self.selection = self.run.read_selection() or {"metric": self.metric, "best": None, "history": []}
        if self.selection["metric"] != self.metric:
            raise ConfigError(f"{self.run.best} selected checkpoints by {self.selection['metric']}, "
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

    def __call__(self, step: int, log=None, *, phase: str, data_dir: str | None = None) -> dict | None:
        """Scores the current weights on val; saves them into best/ when they beat the best so far.
        phase: the name of the run's phase at `step` (training/phases.py), recorded with the scores.
        data_dir: what that phase reads (phases.data_dir_for; default the experiment's current data)."""
        if not self.enabled:
            return None
        done = [h["metrics"] for h in self.selection["history"] if h["step"] == step]
        if done:  # a finished run launched again: that step was scored already
            return done[-1]
        from showtell_dist.data.dataset_dir import read_examples
        from showtell_dist.evaluation.evaluator import SplitDecoder
        from showtell_dist.evaluation.metrics import score_captions
        from showtell_dist.run.restore import TrainedModel

        data_dir = data_dir or self.exp.data_dir  # the phase's: images in a finetune phase
        max_images = self.exp.config.train.get("eval_max_images", 0) or None
        trained = TrainedModel(self.exp.model, self.exp.tokenizer, self.exp.config, checkpoint_path="", step=step)
        if self._decoder is None:
            self._decoder = SplitDecoder([trained], self.strategy, self.options)
        with self.exp.trainer.evaluation_weights():  # the moving average, when the run keeps one
            results, _ = self._decoder.decode(data_dir, "val", max_images=max_images, progress=False)
        if self._references is None:
            refs = read_examples(data_dir, "val", [r["image_id"] for r in results])
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
            self.run.write_selection(self.selection)
        if num_workers(self.strategy) > 1:
            barrier(self.strategy)  # the other workers go on once selection.json is written
        best = self.selection["best"]
        others = ", ".join(f"{m} {100 * corpus[m]:.2f}" for m in ("BLEU-1", "BLEU-4", "CIDEr-D") if m != self.metric)
        verdict = "new best, saved" if improved else f"best {100 * best['value']:.2f} at step {best['step']}"
        (log or self.log)(f"step {step}: val {self.metric} {100 * corpus[self.metric]:.2f} ({others}; "
                          f"{len(results)} images, beam {self.options.beam_width}) - {verdict}")
        return corpus


def evaluate_selected(model_dir: str, strategy: tf.distribute.Strategy, *, split: str = "val",
                      progress: bool = True) -> dict:
    """Every metric (METEOR too) of the selected checkpoint on `split`, written to model_dir/eval_<split>."""
    from showtell_dist.evaluation.evaluator import ReportOptions, SplitOptions, evaluate_split
    from showtell_dist.run.restore import load_trained_model
    from showtell_dist.training.phases import decode_data_dir

    run = RunDir(model_dir)
    trained = load_trained_model(model_dir, "best", strategy)
    data_dir = decode_data_dir([trained.config])  # what launch/evaluate.py reads: images after fine-tuning
    return evaluate_split([trained], data_dir, split, strategy, run.eval_output(split),
                          eval_options(trained.config), SplitOptions(progress=progress),
                          ReportOptions(selection=run.read_selection()))
