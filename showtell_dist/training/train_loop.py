"""The training controller: checkpoints, resume, summaries, progress, evaluation.

`train(config, strategy, model_dir)` restores the latest checkpoint of
model_dir if there is one (model, optimizer state, step), continues the input
stream where it stopped, runs `steps_per_loop` steps per host call, writes
tf.summary scalars, saves checkpoints every `checkpoint_every` steps, on
SIGTERM and at the end, and evaluates the validation loss every `eval_every`
steps and at the end. With eval.select_metric set it also captions the
validation split then and keeps the best-scoring checkpoint in model_dir/best
(checkpoint_selection.py).

A run may chain phases (phases.py): config.phases = "xe,finetune,scst" trains
with cross-entropy (config.train), then with the encoder fine-tuned
(config.finetune), then self-critically (config.scst), in one global step
counter, a new optimizer per phase, and selection across all. Each phase reads
feature_cache.data_dir_for(config, phase): from a finetune phase on, the image
records, for training, validation, selection and caption samples alike.
config.init_checkpoint starts a new run from another run's weights (e.g.
runs/x/best).
"""

from __future__ import annotations

import dataclasses
import json
import time

import keras
import tensorflow as tf
from tqdm import tqdm

from showtell_dist.data import feature_cache, pipeline
from showtell_dist.data.dataset_dir import load_manifest, validate, vocabulary_path
from showtell_dist.data.tokenizer import Tokenizer
from showtell_dist.distribute.precision import (cpu_has_fast_bf16, device_kind, resolve_precision,
                                                resolve_use_cudnn)
from showtell_dist.distribute.strategy import is_chief, num_workers
from showtell_dist.errors import ConfigError
from showtell_dist.features.compatibility import check_features_compatible
from showtell_dist.model.show_and_tell import ShowAndTell, build_model
from showtell_dist.training.caption_summaries import CaptionSummaries
from showtell_dist.run.run_dir import RunDir, checkpoint_at
from showtell_dist.training.checkpoint_selection import CheckpointSelector
from showtell_dist.training.phases import Phase, phase_at, phases_of
from showtell_dist.training.preemption import PreemptionWatcher
from showtell_dist.training.trainer import RunState, Trainer
from showtell_dist.training.weight_average import make_average_variables


@dataclasses.dataclass
class Experiment:
    """Everything built from a config and a prepared dataset, ready to train or evaluate."""

    config: object
    manifest: dict  # data_dir's
    tokenizer: Tokenizer
    model: ShowAndTell
    trainer: Trainer  # the current phase's
    checkpoint: tf.train.Checkpoint
    phase: Phase
    run_state: RunState
    data_dir: str  # what the current phase reads: feature_cache.data_dir_for(config, phase.name)
    manifests: dict = dataclasses.field(default_factory=dict)  # data dir -> its manifest, loaded once

    def read(self, data_dir: str) -> None:
        """Makes `data_dir` (the current phase's data) the experiment's data: its manifest too."""
        if data_dir not in self.manifests:
            self.manifests[data_dir] = load_manifest(data_dir)
        self.data_dir, self.manifest = data_dir, self.manifests[data_dir]


def pipeline_spec(config, manifest: dict, split: str, phase: Phase | None = None,
                  data_dir: str | None = None) -> pipeline.PipelineSpec:
    """The input of `split`; for training, that of `phase` (its batch size; its own shuffle seed; its
    data: feature_cache.data_dir_for). data_dir: the directory `manifest` describes, default that of
    `phase` (of the first phase without one)."""
    batch = phase.section.global_batch_size if phase else config.train.global_batch_size
    if data_dir is None:
        data_dir = feature_cache.data_dir_for(config, phase.name if phase else feature_cache.phase_names(config)[0])
    return pipeline.PipelineSpec(
        data_dir=data_dir, split=split, image_size=config.model.image_size,
        captions_per_image=config.data.captions_per_image, max_len=manifest["max_len"],
        global_batch_size=batch, seed=config.train.seed + (phase.index if phase else 0),
        shuffle_buffer=config.data.shuffle_buffer,
        # Teacher forcing runs over each batch's own caption bucket; self-critical steps take the references
        # at the static max_len.
        caption_buckets=(pipeline.caption_buckets(manifest["max_len"], config.data.get("caption_buckets", 0))
                         if phase is None or phase.name in ("xe", "finetune") else ()),
        deterministic=config.data.get("deterministic_input", True))


def build_trainer(config, manifest: dict, phase: Phase, strategy: tf.distribute.Strategy, model,
                  run_state: RunState, log=print) -> Trainer:
    """The trainer of a phase: a new optimizer over the run's model, step and weight average."""
    policy = keras.mixed_precision.global_policy().name  # set by build_experiment (resolve_precision)
    common = dict(mixed_precision=None if policy == "float32" else policy, jit_compile=config.train.jit_compile,
                  run_state=run_state, seed=config.train.seed)
    if phase.name == "xe":
        return Trainer(strategy, model, config.train, **common)
    if phase.name == "finetune":
        from showtell_dist.training.trainer import FineTuneTrainer

        return FineTuneTrainer(strategy, model, phase.section, **common)
    from showtell_dist.training.self_critical import build_self_critical_trainer

    # The train split's references: the reward of the dataset the run trains from (records or features).
    reward_dir = feature_cache.data_dir_of(config)
    return build_self_critical_trainer(strategy, model, phase.section, reward_dir, load_manifest(reward_dir), log,
                                       **common)


def start_phase(exp: Experiment, phase: Phase, strategy: tf.distribute.Strategy, log=print) -> None:
    """Makes `phase` the experiment's current phase: its trainer, and its optimizer in the checkpoint."""
    if phase is exp.phase:
        return
    exp.trainer = build_trainer(exp.config, exp.manifest, phase, strategy, exp.model, exp.run_state, log)
    exp.checkpoint.optimizer = exp.trainer.optimizer
    exp.phase = phase
    exp.read(feature_cache.data_dir_for(exp.config, phase.name))


def _describe(phase: Phase, num_phases: int) -> str:
    s = phase.section
    text = (f"phase {phase.index + 1}/{num_phases} '{phase.name}': global steps {phase.start}..{phase.end} "
            f"({phase.steps} steps of {s.global_batch_size} images), learning rate {s.learning_rate:g} "
            f"(warm-up {s.warmup_steps}, final ratio {s.final_lr_ratio:g}), new optimizer")
    if phase.name == "finetune":
        text += (f"; the encoder trains too, at learning rate {s.encoder_learning_rate:g} (BatchNorm statistics "
                 f"frozen), from the image records")
    if phase.name == "scst":
        text += (f"; {s.samples_per_image} samples per image up to {s.max_len} tokens, baseline {s.baseline}, "
                 f"temperature {s.temperature:g}, dropout {'on' if s.dropout else 'off'}, xe_weight {s.xe_weight:g}")
    return text


def build_experiment(config, strategy: tf.distribute.Strategy) -> Experiment:
    # Precision and LSTM kernel per device kind (distribute/precision.py): bf16 on TPUs, no cuDNN under XLA.
    kind = device_kind(strategy)
    policy = resolve_precision(config.train.mixed_precision, kind,
                               cpu_fast_bf16=kind == "cpu" and cpu_has_fast_bf16())
    phases = phases_of(config)
    for phase in phases:
        if phase.section.global_batch_size % strategy.num_replicas_in_sync:
            raise ConfigError(f"{phase.name} phase: global_batch_size {phase.section.global_batch_size} is not "
                              f"divisible by the {strategy.num_replicas_in_sync} replicas of the strategy.")
    # Image records, or the encoder's features cached from them (config.data.features_dir); the
    # records from a finetune phase on (feature_cache.data_dir_for).
    data_dir = feature_cache.data_dir_for(config, phases[0].name)
    manifests = {}
    for phase_data_dir in dict.fromkeys(feature_cache.data_dir_for(config, p.name) for p in phases):
        manifest = manifests[phase_data_dir] = load_manifest(phase_data_dir)
        check_features_compatible(manifest, config.model, phase_data_dir)
        # A missing, extra or truncated shard stops here, before step 1, not mid-epoch (or mid-run).
        validate(phase_data_dir, manifest, splits=[s for s in ("train", "val") if s in manifest["splits"]])
    manifest = manifests[data_dir]
    tokenizer = Tokenizer.load(vocabulary_path(data_dir))
    tokenizer.check_rules(vocabulary_path(data_dir))  # records of older word-splitting rules
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(config.train.seed)
    with strategy.scope():
        # The encoder is built (with its weights) even when training from cached features, so that
        # checkpoints and exports are those of a model trained from images.
        model = build_model(config.model, tokenizer.vocab_size,
                            use_cudnn=resolve_use_cudnn(kind, config.train.jit_compile))
    for phase_data_dir, phase_manifest in manifests.items():
        feature_cache.check_feature_dim(phase_manifest, model, phase_data_dir)
    run_state = RunState.create(strategy, model, config.train.get("weight_average_decay", 0.0))
    trainer = build_trainer(config, manifest, phases[0], strategy, model, run_state)
    extra = {"weight_average": run_state.weight_average.averages} if run_state.weight_average else {}
    # Dropout is stateless (seeded by step and replica): the step is all a resume needs of it.
    checkpoint = tf.train.Checkpoint(model=model, optimizer=trainer.optimizer, step=run_state.step, **extra)
    return Experiment(config, manifest, tokenizer, model, trainer, checkpoint, phases[0], run_state, data_dir,
                      manifests)


def _weights_checkpoint(exp: Experiment) -> tf.train.Checkpoint:
    """The run's checkpoint without the optimizer: what carries over from one phase to the next."""
    extra = {"weight_average": exp.run_state.weight_average.averages} if exp.run_state.weight_average else {}
    return tf.train.Checkpoint(model=exp.model, step=exp.run_state.step, **extra)


def _resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix, a directory of checkpoints (e.g. runs/x/best) or a model_dir."""
    try:
        return checkpoint_at(path)
    except ConfigError as exc:
        raise ConfigError(f"init_checkpoint: {exc}") from exc


def load_init_checkpoint(exp: Experiment, path: str, log=print) -> None:
    """Starts the run from another run's weights: the moving average of them when that run kept one
    (what its evaluation and selection used), else its raw weights. Step and optimizer start afresh."""
    prefix = _resolve_checkpoint(path)
    try:
        tf.train.Checkpoint(model=exp.model).restore(prefix).expect_partial().assert_existing_objects_matched()
        averaged = any(name.startswith("weight_average/") for name, _ in tf.train.list_variables(prefix))
        if averaged:
            averages = make_average_variables(exp.model.trainable_variables)
            tf.train.Checkpoint(weight_average=averages).restore(prefix).expect_partial() \
                .assert_existing_objects_matched()
            for v, average in zip(exp.model.trainable_variables, averages):
                v.assign(average.read_value())
    except (ValueError, AssertionError, tf.errors.OpError) as exc:
        raise ConfigError(f"init_checkpoint {prefix} does not fit this run's model (another model config or "
                          f"vocabulary?): {exc}") from exc
    if exp.run_state.weight_average is not None:
        for average, v in zip(exp.run_state.weight_average.averages, exp.model.trainable_variables):
            average.assign(tf.convert_to_tensor(v))
    log(f"initialised the model from {prefix}" + (" (its moving average of the weights)" if averaged else ""))


def _restore(exp: Experiment, phases: list[Phase], prefix: str, strategy, log) -> None:
    """Restores a checkpoint of this run into the phase it belongs to."""
    step = int(tf.train.load_variable(prefix, "step/.ATTRIBUTES/VARIABLE_VALUE"))
    phase = phase_at(phases, step)
    start_phase(exp, phase, strategy, log)
    if step == phase.start and phase.index > 0:
        # Saved at the end of the previous phase: its optimizer is not this phase's, which starts afresh.
        _weights_checkpoint(exp).restore(prefix).expect_partial().assert_existing_objects_matched()
    else:
        exp.checkpoint.restore(prefix).assert_existing_objects_matched()


def _save(manager: tf.train.CheckpointManager, step: int, scratch_dir: str | None) -> None:
    manager.save(checkpoint_number=step)
    if scratch_dir and tf.io.gfile.exists(scratch_dir):
        tf.io.gfile.rmtree(scratch_dir)


def evaluate_loss(exp: Experiment, strategy, split: str, max_images: int | None = None) -> dict:
    spec = pipeline_spec(exp.config, exp.manifest, split, data_dir=exp.data_dir)
    dataset = strategy.distribute_datasets_from_function(
        pipeline.eval_input_fn(exp.manifest, spec, max_images=max_images))
    steps = pipeline.eval_steps(exp.manifest, spec, num_workers(strategy), max_images)
    return exp.trainer.evaluate(iter(dataset), steps)


def train(config, strategy: tf.distribute.Strategy, model_dir: str, *, show_progress: bool = True,
          stop_at_step: int | None = None, log=print) -> tuple[dict, Experiment]:
    """Trains (or resumes) the experiment; returns the final metrics and the experiment.

    stop_at_step: end this invocation (with a checkpoint) at that step, before
      config.train.steps; a later call resumes from there. For time-sliced jobs.
    """
    chief = is_chief(strategy)
    exp = build_experiment(config, strategy)
    run = RunDir(model_dir)
    run.prepare_for_training(json.loads(config.to_json()), exp.tokenizer.to_json(), write=chief)
    # Other workers save too (the save is collective), into a scratch dir they delete right after (_save).
    scratch_dir = None if chief else run.checkpoint_save_dir(strategy.cluster_resolver.task_id)
    manager = tf.train.CheckpointManager(exp.checkpoint, scratch_dir or run.checkpoints,
                                         max_to_keep=config.train.keep_checkpoints)
    selector = CheckpointSelector(exp, strategy, model_dir, log=log)  # checks Java etc. before step 1
    phases = phases_of(config)
    latest = run.latest_checkpoint()  # every worker resumes from the chief's
    if latest:
        _restore(exp, phases, latest, strategy, log)
        log(f"resumed from {latest} at step {exp.trainer.current_step()} ({exp.phase.name} phase)")
    elif config.get("init_checkpoint", ""):
        load_init_checkpoint(exp, config.init_checkpoint, log)
    start = exp.trainer.current_step()
    selector.resume_at(start)
    caption_samples = CaptionSummaries(exp, strategy, log=log)  # val images + captions in TensorBoard
    total = phases[-1].end
    writer = tf.summary.create_file_writer(run.summaries("train")) if chief else tf.summary.create_noop_writer()
    eval_writer = tf.summary.create_file_writer(run.summaries("eval")) if chief else tf.summary.create_noop_writer()
    metrics: dict = {"step": start}
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not (chief and show_progress),
               mininterval=2.0, dynamic_ncols=True)

    def loop_log(message: str) -> None:
        if bar.disable:
            log(message)
        else:
            bar.write(message)  # above the progress bar, which stays intact

    step = start
    end = min(total, stop_at_step) if stop_at_step else total
    iterator = None
    with PreemptionWatcher(strategy) as preemption:
        while step < end:
            if iterator is None or step == exp.phase.end:
                # A phase starts (or resumes): its trainer, and its input stream where it left off.
                data_dir = exp.data_dir
                start_phase(exp, phase_at(phases, step), strategy, loop_log)
                if exp.data_dir != data_dir:  # a finetune phase begins: the samples are captioned from images
                    caption_samples = CaptionSummaries(exp, strategy, log=loop_log)
                if len(phases) > 1:
                    loop_log(_describe(exp.phase, len(phases)) + (f"; resumed at step {step}"
                                                                  if step > exp.phase.start else ""))
                spec = pipeline_spec(config, exp.manifest, "train", exp.phase, exp.data_dir)
                iterator = iter(strategy.distribute_datasets_from_function(
                    pipeline.train_input_fn(exp.manifest, spec, step - exp.phase.start)))
                batch_images = spec.global_batch_size
            n = min(config.train.steps_per_loop, end - step, exp.phase.end - step)
            if config.train.checkpoint_every:
                n = min(n, config.train.checkpoint_every - step % config.train.checkpoint_every)
            if config.train.eval_every:
                n = min(n, config.train.eval_every - step % config.train.eval_every)
            t0 = time.perf_counter()
            m = exp.trainer.train_loop(iterator, n)
            elapsed = time.perf_counter() - t0
            step += n
            lr = exp.trainer.learning_rate()
            # xe: loss (per token), perplexity; scst: loss and reward per sample, sample_length, ...
            metrics.update(m, step=step, phase=exp.phase.name, learning_rate=lr,
                           images_per_s=n * batch_images / elapsed)
            with writer.as_default(step=step):
                for name, value in m.items():
                    tf.summary.scalar(name, value)
                tf.summary.scalar("learning_rate", lr)
                tf.summary.scalar("images_per_s", metrics["images_per_s"])
            bar.update(n)
            postfix = {"loss": f"{m['loss']:.3f}", "lr": f"{lr:.2e}", "img_s": f"{metrics['images_per_s']:.0f}"}
            if "reward" in m:
                postfix["reward"] = f"{m['reward']:.3f}"
            bar.set_postfix(**postfix)
            at_checkpoint = config.train.checkpoint_every and step % config.train.checkpoint_every == 0
            preempted = preemption.stop_requested()  # on every worker alike: any worker's SIGTERM stops all
            at_phase_end = step == exp.phase.end
            if at_checkpoint or at_phase_end or step == end or preempted:
                _save(manager, step, scratch_dir)
            if preempted:
                bar.close()
                who = "" if preemption.requested else " (on another worker)"
                log(f"SIGTERM{who}: saved a checkpoint at step {step} in {model_dir}; stopping.")
                metrics["preempted"] = True
                return metrics, exp
            at_eval = config.train.eval_every and step % config.train.eval_every == 0
            if (at_eval or at_phase_end) and step < total:
                _log_eval(exp, strategy, eval_writer, step, metrics, loop_log)
                _select(selector, eval_writer, step, metrics, loop_log, exp.phase.name)
                caption_samples(eval_writer, step)
    bar.close()
    if step == total and "val" in exp.manifest["splits"]:
        _log_eval(exp, strategy, eval_writer, step, metrics, log)
        _select(selector, eval_writer, step, metrics, log, exp.phase.name)
        caption_samples(eval_writer, step)
    writer.flush()
    eval_writer.flush()
    return metrics, exp


def held_out_samples(exp: Experiment, num_examples: int) -> str:
    """Greedy captions of the first images of the test (else val) split, with references."""
    from showtell_dist.evaluation.samples import format_samples, sample_captions

    split = next((s for s in ("test", "val") if s in exp.manifest["splits"]), None)
    if split is None:
        return "no held-out split (test or val) to caption"
    with exp.trainer.evaluation_weights():
        samples = sample_captions(exp.model, exp.tokenizer, exp.manifest,
                                  pipeline_spec(exp.config, exp.manifest, split, data_dir=exp.data_dir),
                                  num_examples)
    return f"greedy captions for {len(samples)} held-out {split} images:\n" + format_samples(samples)


def _select(selector: CheckpointSelector, writer, step: int, metrics: dict, log, phase: str) -> None:
    scores = selector(step, log, phase=phase)
    if scores is None:
        return
    with writer.as_default(step=step):
        for name, value in scores.items():
            tf.summary.scalar(name, value)
    metrics.update({f"val_{selector.metric}": scores[selector.metric],
                    "best_step": selector.best["step"], f"best_val_{selector.metric}": selector.best["value"]})


def _log_eval(exp: Experiment, strategy, writer, step: int, metrics: dict, log) -> None:
    if "val" not in exp.manifest["splits"]:
        return
    max_images = exp.config.train.eval_max_images or None
    with exp.trainer.evaluation_weights():  # the moving average of the weights, when the run keeps one
        val = evaluate_loss(exp, strategy, "val", max_images)
    metrics.update(val_loss=val["loss"], val_perplexity=val["perplexity"])
    with writer.as_default(step=step):
        tf.summary.scalar("loss", val["loss"])
        tf.summary.scalar("perplexity", val["perplexity"])
    log(f"step {step}: val loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f}")
