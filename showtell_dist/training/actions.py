"""What a training run does between host loops: small actions with their own state, in orbit's manner.

The controller (train_loop.train) runs a phase's steps in host loops of at most
train.steps_per_loop steps. A loop also ends where an action wants to fire
(`Action.every`), where a phase ends and where the invocation stops. There the
controller asks the preemption watcher (a collective under MultiWorker, so every
worker asks at every boundary) and hands each action a `Boundary`:

  SaveCheckpoint    every train.checkpoint_every steps, at a phase's end, where the
                    invocation stops (stop_at_step, the run's end) and on preemption
  ValidationLoss    every train.eval_every steps, at a phase's end and at the run's end
  SelectCheckpoint  likewise: scores val and keeps the best checkpoint (checkpoint_selection.py)
  CaptionSamples    likewise: val images and their captions in TensorBoard (caption_summaries.py)

(evaluations do not fire on preemption: the job is being stopped). A Boundary
carries the phase's trainer and data, so no action is rebuilt when a phase
begins (the evaluation weights are the run's: every phase's trainer shares its
moving average).

`RunRecord` is what the actions and the controller write to: the metrics that
train() returns, the train/ and eval/ TensorBoard writers and the progress bar.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf
from tqdm import tqdm

from showtell_dist.run.run_dir import RunDir
from showtell_dist.training.phases import Phase


@dataclasses.dataclass(frozen=True)
class Boundary:
    """Where the controller stands after a host loop."""

    step: int
    phase: Phase
    trainer: object  # the phase's trainer.Trainer
    data_dir: str  # what the phase reads (phases.data_dir_for)
    manifest: dict  # data_dir's
    phase_end: bool  # the phase's last step is done
    run_end: bool  # the run's last step is done
    stop: bool  # this invocation stops here: stop_at_step, the run's end, or preemption
    preempted: bool


class Action:
    """Fires at some boundaries. `every`: the steps (global, multiples of it) at which a loop must end for
    it, 0 for none."""

    every: int = 0

    def at_interval(self, b: Boundary) -> bool:
        return bool(self.every) and b.step % self.every == 0

    def fires(self, b: Boundary) -> bool:
        raise NotImplementedError

    def __call__(self, b: Boundary) -> None:
        raise NotImplementedError


class Evaluation(Action):
    """An action on the validation split: every `every` steps, at a phase's end and at the run's end."""

    def fires(self, b: Boundary) -> bool:
        return not b.preempted and (self.at_interval(b) or b.phase_end or b.run_end)


class RunRecord:
    """The run's outputs: metrics (what train() returns), TensorBoard writers, the progress bar and the log."""

    def __init__(self, model_dir: str, *, chief: bool, show_progress: bool, start: int, total: int, log=print):
        self.metrics: dict = {"step": start}
        self.train_writer = tf.summary.create_file_writer(RunDir(model_dir).summaries("train")) if chief \
            else tf.summary.create_noop_writer()
        self.eval_writer = tf.summary.create_file_writer(RunDir(model_dir).summaries("eval")) if chief \
            else tf.summary.create_noop_writer()
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not (chief and show_progress),
                        mininterval=2.0, dynamic_ncols=True)
        self._log = log

    def log(self, message: str) -> None:
        if self.bar.disable:
            self._log(message)
        else:
            self.bar.write(message)  # above the progress bar, which stays intact

    def loop(self, step: int, steps: int, phase: Phase, metrics: dict, learning_rate: float,
             images_per_s: float) -> None:
        """A host loop of `steps` steps ended at `step` with the trainer's `metrics` (xe: loss per token,
        perplexity; scst: loss and reward per sample, sample_length, ...)."""
        self.metrics.update(metrics, step=step, phase=phase.name, learning_rate=learning_rate,
                            images_per_s=images_per_s)
        with self.train_writer.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)
            tf.summary.scalar("learning_rate", learning_rate)
            tf.summary.scalar("images_per_s", images_per_s)
        self.bar.update(steps)
        postfix = {"loss": f"{metrics['loss']:.3f}", "lr": f"{learning_rate:.2e}", "img_s": f"{images_per_s:.0f}"}
        if "reward" in metrics:
            postfix["reward"] = f"{metrics['reward']:.3f}"
        self.bar.set_postfix(**postfix)

    def eval_scalars(self, step: int, values: dict) -> None:
        with self.eval_writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def close(self) -> None:
        self.bar.close()
        self.train_writer.flush()
        self.eval_writer.flush()


class SaveCheckpoint(Action):
    """Saves the run's checkpoint (save(step)) every `every` steps, at phase ends, at stops and on preemption."""

    def __init__(self, save: Callable[[int], None], every: int):
        self.save, self.every = save, int(every or 0)

    def fires(self, b: Boundary) -> bool:
        return self.at_interval(b) or b.phase_end or b.stop

    def __call__(self, b: Boundary) -> None:
        self.save(b.step)


class ValidationLoss(Evaluation):
    """The validation loss and perplexity (measure(boundary) -> {"loss", "perplexity", ...}), when there is a
    val split."""

    def __init__(self, measure: Callable[[Boundary], dict], record: RunRecord, every: int):
        self.measure, self.record, self.every = measure, record, int(every or 0)

    def __call__(self, b: Boundary) -> None:
        if "val" not in b.manifest["splits"]:
            return
        val = self.measure(b)
        self.record.metrics.update(val_loss=val["loss"], val_perplexity=val["perplexity"])
        self.record.eval_scalars(b.step, {"loss": val["loss"], "perplexity": val["perplexity"]})
        self.record.log(f"step {b.step}: val loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f}")


class SelectCheckpoint(Evaluation):
    """Scores val with the run's decoding and keeps the best checkpoint (a CheckpointSelector)."""

    def __init__(self, selector, record: RunRecord, every: int):
        self.selector, self.record, self.every = selector, record, int(every or 0)

    def __call__(self, b: Boundary) -> None:
        scores = self.selector(b.step, self.record.log, phase=b.phase.name, data_dir=b.data_dir)
        if scores is None:
            return
        self.record.eval_scalars(b.step, scores)
        metric, best = self.selector.metric, self.selector.best
        self.record.metrics.update({f"val_{metric}": scores[metric], "best_step": best["step"],
                                    f"best_val_{metric}": best["value"]})


class CaptionSamples(Evaluation):
    """The val sample images and their current captions in TensorBoard (a CaptionSummaries)."""

    def __init__(self, summaries, record: RunRecord, every: int):
        self.summaries, self.record, self.every = summaries, record, int(every or 0)

    def __call__(self, b: Boundary) -> None:
        self.summaries(self.record.eval_writer, b.step, data_dir=b.data_dir, manifest=b.manifest)
