"""The training controller: it runs a run's phases and fires actions between host loops.

`train(config, strategy, model_dir)` restores the latest checkpoint of
model_dir if there is one (model, optimizer state, step), continues the input
stream where it stopped, runs `steps_per_loop` steps per host call, writes
tf.summary scalars, and fires the actions of actions.py: it saves checkpoints
every `checkpoint_every` steps, on SIGTERM and at the end, and evaluates the
validation loss every `eval_every` steps and at the end. With eval.select_metric
set it also captions the validation split then and keeps the best-scoring
checkpoint in model_dir/best (checkpoint_selection.py).

A run may chain phases (phases.py): config.phases = "xe,finetune,scst" trains
with cross-entropy (config.train), then with the encoder fine-tuned
(config.finetune), then self-critically (config.scst), in one global step
counter, a new optimizer per phase, and selection across all. Each phase reads
phases.data_dir_for(config, phase, model_dir): in a finetune phase the image
records, for training, validation, selection and caption samples alike. When
a features cache is configured, the phases after a finetune phase read the
features re-cached with the fine-tuned encoder (`enter_phase` makes them when
the phase begins, into model_dir; features/builder.py), so they train from
features again. config.init_checkpoint starts a new run from another run's
weights (e.g. runs/x/best).
"""

from __future__ import annotations

import dataclasses
import json
import time

import keras
import tensorflow as tf

from showtell_dist.data import feature_cache, pipeline
from showtell_dist.data.dataset_dir import is_prepared, load_manifest, validate, vocabulary_path
from showtell_dist.data.tokenizer import Tokenizer
from showtell_dist.distribute.precision import (cpu_has_fast_bf16, device_kind, resolve_precision,
                                                resolve_use_cudnn)
from showtell_dist.distribute.strategy import barrier, is_chief, num_workers
from showtell_dist.errors import ConfigError, UserError
from showtell_dist.features.builder import FineTunedEncoder, cache_features
from showtell_dist.features.compatibility import check_features_compatible, check_recache_fits
from showtell_dist.model.show_and_tell import ShowAndTell, build_model
from showtell_dist.training import actions
from showtell_dist.training.caption_summaries import CaptionSummaries
from showtell_dist.run.run_dir import RunDir, checkpoint_at
from showtell_dist.training.checkpoint_selection import CheckpointSelector
from showtell_dist.training.phases import (Phase, TrainerSetup, data_dir_for, phase_at, phases_of,
                                           recached_after)
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
    data_dir: str  # what the current phase reads: phases.data_dir_for(config, phase.name, model_dir)
    manifests: dict = dataclasses.field(default_factory=dict)  # data dir -> its manifest, loaded once
    model_dir: str | None = None  # the run's (where re-cached features go); None outside train()

    def read(self, data_dir: str) -> None:
        """Makes `data_dir` (the current phase's data) the experiment's data: its manifest too."""
        if data_dir not in self.manifests:
            self.manifests[data_dir] = load_manifest(data_dir)
        self.data_dir, self.manifest = data_dir, self.manifests[data_dir]


def pipeline_spec(config, manifest: dict, split: str, phase: Phase | None = None,
                  data_dir: str | None = None) -> pipeline.PipelineSpec:
    """The input of `split`; for training, that of `phase` (its batch size; its own shuffle seed; its
    data: phases.data_dir_for). data_dir: the directory `manifest` describes, default that of
    `phase` (of the first phase without one)."""
    batch = phase.section.global_batch_size if phase else config.train.global_batch_size
    if data_dir is None:
        data_dir = data_dir_for(config, (phase or phases_of(config)[0]).name)
    return pipeline.PipelineSpec(
        data_dir=data_dir, split=split, image_size=config.model.image_size,
        captions_per_image=config.data.captions_per_image, max_len=manifest["max_len"],
        global_batch_size=batch, seed=config.train.seed + (phase.index if phase else 0),
        shuffle_buffer=config.data.shuffle_buffer,
        # Teacher forcing runs over each batch's own caption bucket; a kind without caption buckets
        # (self-critical steps) takes the references at the static max_len.
        caption_buckets=(pipeline.caption_buckets(manifest["max_len"], config.data.get("caption_buckets", 0))
                         if phase is None or phase.kind.caption_buckets else ()),
        deterministic=config.data.get("deterministic_input", True))


def build_trainer(config, manifest: dict, phase: Phase, strategy: tf.distribute.Strategy, model,
                  run_state: RunState, log=print) -> Trainer:
    """The trainer of a phase (its kind's): a new optimizer over the run's model, step and weight average."""
    policy = keras.mixed_precision.global_policy().name  # set by build_experiment (resolve_precision)
    options = dict(mixed_precision=None if policy == "float32" else policy, jit_compile=config.train.jit_compile,
                   run_state=run_state, seed=config.train.seed)
    return phase.kind.build_trainer(TrainerSetup(strategy, model, phase.section, config, manifest, options, log))


def start_phase(exp: Experiment, phase: Phase, strategy: tf.distribute.Strategy, log=print) -> None:
    """Makes `phase` the experiment's current phase: its trainer, and its optimizer in the checkpoint.
    (Its data: enter_phase, once the weights it starts from are restored.)"""
    if phase is exp.phase:
        return
    exp.trainer = build_trainer(exp.config, exp.manifest, phase, strategy, exp.model, exp.run_state, log)
    exp.checkpoint.optimizer = exp.trainer.optimizer
    exp.phase = phase


def enter_phase(exp: Experiment, phase: Phase, strategy: tf.distribute.Strategy, step: int, log=print) -> None:
    """Makes `phase`, at global step `step` (its start, or where a resumed run stands in it), the
    experiment's current phase, with its data.

    A phase after a finetune phase of a run with a features cache reads the features re-cached with the
    fine-tuned encoder (phases.recache_dir). When the phase begins they are made, unless the run directory
    holds them already for the encoder's current weights; a resumed phase makes them only when they are
    missing, and refuses a cache of other weights (stale)."""
    data_dir = data_dir_for(exp.config, phase.name, exp.model_dir)
    if phase is exp.phase and data_dir == exp.data_dir:
        return
    start_phase(exp, phase, strategy, log)
    if recached_after(exp.config, phase.name) and exp.model_dir:
        _ensure_recached(exp, data_dir, strategy, step, at_start=step == phase.start, log=log)
    exp.read(data_dir)


def _validate_training_splits(data_dir: str, manifest: dict) -> None:
    """A missing, extra or truncated train or val shard stops here, before step 1, not mid-epoch."""
    validate(data_dir, manifest, splits=[s for s in ("train", "val") if s in manifest["splits"]])


def _recache_fits(exp: Experiment, data_dir: str) -> bool:
    try:
        check_recache_fits(load_manifest(data_dir), exp.config.model, exp.model.encoder, data_dir)
        return True
    except UserError:  # stale, or an unreadable manifest
        return False


def _ensure_recached(exp: Experiment, data_dir: str, strategy, step: int, *, at_start: bool, log) -> None:
    """Re-caches the features of config.data.records_dir with the model's (fine-tuned) encoder into
    data_dir, when missing or, at the phase's start, of other weights; then checks them. Under MultiWorker
    the chief writes them and the others wait for it."""
    exists = is_prepared(data_dir)
    if is_chief(strategy) and (not exists or (at_start and not _recache_fits(exp, data_dir))):
        config = exp.config
        checkpoint = RunDir(exp.model_dir).latest_checkpoint() or ""
        log(f"re-caching the {config.model.encoder} features of {config.data.records_dir} with the encoder "
            f"fine-tuned up to step {step} ({checkpoint}) into {data_dir} ...")
        several = num_workers(strategy) > 1 and not isinstance(strategy, tf.distribute.TPUStrategy)
        local = None if several else strategy  # several workers: the chief's own device
        exp.manifests.pop(data_dir, None)
        cache_features(config.data.records_dir, data_dir, config.model, strategy=local, progress=False,
                       fine_tuned=FineTunedEncoder(exp.model.encoder.get_weights(), exp.model_dir, checkpoint, step))
    if num_workers(strategy) > 1:
        barrier(strategy)  # the other workers read the cache once the chief has written it
    manifest = load_manifest(data_dir)
    check_recache_fits(manifest, exp.config.model, exp.model.encoder, data_dir)  # stale: refused
    feature_cache.check_feature_dim(manifest, exp.model, data_dir)
    _validate_training_splits(data_dir, manifest)
    exp.manifests[data_dir] = manifest


def build_experiment(config, strategy: tf.distribute.Strategy, model_dir: str | None = None) -> Experiment:
    """model_dir: the run's, where features re-cached after a finetune phase go (checked when a phase reads
    them: enter_phase)."""
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
    # records from a finetune phase on (phases.data_dir_for), re-cached features after it.
    data_dir = data_dir_for(config, phases[0].name)
    manifests = {}
    for phase_data_dir in dict.fromkeys(data_dir_for(config, p.name) for p in phases):
        manifest = manifests[phase_data_dir] = load_manifest(phase_data_dir)
        check_features_compatible(manifest, config.model, phase_data_dir)
        # A missing, extra or truncated shard stops here, before step 1, not mid-epoch (or mid-run).
        _validate_training_splits(phase_data_dir, manifest)
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
                      manifests, model_dir)


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
    """Restores a checkpoint of this run into the phase it belongs to (its trainer; its data: enter_phase)."""
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
    return _loss_on(exp.config, exp.trainer, exp.data_dir, exp.manifest, strategy, split, max_images)


def _loss_on(config, trainer: Trainer, data_dir: str, manifest: dict, strategy, split: str,
             max_images: int | None = None) -> dict:
    spec = pipeline_spec(config, manifest, split, data_dir=data_dir)
    dataset = strategy.distribute_datasets_from_function(pipeline.eval_input_fn(manifest, spec, max_images=max_images))
    steps = pipeline.eval_steps(manifest, spec, num_workers(strategy), max_images)
    return trainer.evaluate(iter(dataset), steps)


def _validation_loss(config, strategy):
    """measure(boundary) of actions.ValidationLoss: with the moving average of the weights, when kept."""
    def measure(b: actions.Boundary) -> dict:
        with b.trainer.evaluation_weights():
            return _loss_on(config, b.trainer, b.data_dir, b.manifest, strategy, "val",
                            config.train.eval_max_images or None)

    return measure


def train(config, strategy: tf.distribute.Strategy, model_dir: str, *, show_progress: bool = True,
          stop_at_step: int | None = None, log=print) -> tuple[dict, Experiment]:
    """Trains (or resumes) the experiment; returns the final metrics and the experiment.

    stop_at_step: end this invocation (with a checkpoint) at that step, before
      config.train.steps; a later call resumes from there. For time-sliced jobs.
    """
    chief = is_chief(strategy)
    exp = build_experiment(config, strategy, model_dir)
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
    step = exp.trainer.current_step()
    selector.resume_at(step)
    total = phases[-1].end
    end = min(total, stop_at_step) if stop_at_step else total
    record = actions.RunRecord(model_dir, chief=chief, show_progress=show_progress, start=step, total=total, log=log)
    enter_phase(exp, phase_at(phases, step), strategy, step, record.log)
    save = actions.SaveCheckpoint(lambda at: _save(manager, at, scratch_dir), config.train.checkpoint_every)
    every_eval = config.train.eval_every
    evaluations = [actions.ValidationLoss(_validation_loss(config, strategy), record, every_eval),
                   actions.SelectCheckpoint(selector, record, every_eval),
                   # val images + captions in TensorBoard
                   actions.CaptionSamples(CaptionSummaries(exp, strategy, log=log), record, every_eval)]
    every = [a.every for a in (save, *evaluations) if a.every]

    def boundary(preempted: bool = False) -> actions.Boundary:
        return actions.Boundary(step, exp.phase, exp.trainer, exp.data_dir, exp.manifest,
                                phase_end=step == exp.phase.end, run_end=step == total,
                                stop=step == end or preempted, preempted=preempted)

    if step == total:  # a finished run launched again: evaluated at its end again (selection keeps its scores)
        _fire(evaluations, boundary())
    iterator = None
    with PreemptionWatcher(strategy) as preemption:
        while step < end:
            if iterator is None or step == exp.phase.end:
                # A phase starts (or resumes): its trainer and data, and its input stream where it left off.
                enter_phase(exp, phase_at(phases, step), strategy, step, record.log)
                if len(phases) > 1:
                    record.log(exp.phase.describe(len(phases)) + (f"; resumed at step {step}"
                                                                  if step > exp.phase.start else ""))
                spec = pipeline_spec(config, exp.manifest, "train", exp.phase, exp.data_dir)
                iterator = iter(strategy.distribute_datasets_from_function(
                    pipeline.train_input_fn(exp.manifest, spec, step - exp.phase.start)))
            n = min([config.train.steps_per_loop, end - step, exp.phase.end - step]
                    + [e - step % e for e in every])  # a loop ends where an action fires
            t0 = time.perf_counter()
            m = exp.trainer.train_loop(iterator, n)
            elapsed = time.perf_counter() - t0
            step += n
            record.loop(step, n, exp.phase, m, exp.trainer.learning_rate(), n * spec.global_batch_size / elapsed)
            preempted = preemption.stop_requested()  # on every worker alike: any worker's SIGTERM stops all
            _fire([save, *evaluations], boundary(preempted))
            if preempted:
                record.close()
                who = "" if preemption.requested else " (on another worker)"
                log(f"SIGTERM{who}: saved a checkpoint at step {step} in {model_dir}; stopping.")
                record.metrics["preempted"] = True
                return record.metrics, exp
    record.close()
    return record.metrics, exp


def _fire(fired: list[actions.Action], b: actions.Boundary) -> None:
    for action in fired:
        if action.fires(b):
            action(b)


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
