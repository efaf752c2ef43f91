"""The training controller: checkpoints, resume, summaries, progress, evaluation.

`train(config, strategy, model_dir)` restores the latest checkpoint of
model_dir if there is one (model, optimizer state, step), continues the input
stream where it stopped, runs `steps_per_loop` steps per host call, writes
tf.summary scalars, saves checkpoints every `checkpoint_every` steps, on
SIGTERM and at the end, and evaluates the validation loss every `eval_every`
steps and at the end. With eval.select_metric set it also captions the
validation split then and keeps the best-scoring checkpoint in model_dir/best
(checkpoint_selection.py).
"""

from __future__ import annotations

import dataclasses
import json
import time

import keras
import tensorflow as tf
from tqdm import tqdm

from showtell_dist.data import feature_cache, pipeline
from showtell_dist.data.prepare import VOCABULARY, load_manifest
from showtell_dist.data.tokenizer import Tokenizer
from showtell_dist.distribute.precision import (cpu_has_fast_bf16, device_kind, resolve_precision,
                                                resolve_use_cudnn)
from showtell_dist.distribute.strategy import is_chief, num_workers
from showtell_dist.errors import ConfigError
from showtell_dist.model.show_and_tell import ShowAndTell, build_model
from showtell_dist.storage.gcs import validate_dataset
from showtell_dist.training.caption_summaries import CaptionSummaries
from showtell_dist.training.checkpoint_selection import CheckpointSelector
from showtell_dist.training.model_dir import prepare_model_dir
from showtell_dist.training.preemption import PreemptionWatcher
from showtell_dist.training.trainer import Trainer


@dataclasses.dataclass
class Experiment:
    """Everything built from a config and a prepared dataset, ready to train or evaluate."""

    config: object
    manifest: dict
    tokenizer: Tokenizer
    model: ShowAndTell
    trainer: Trainer
    checkpoint: tf.train.Checkpoint


def pipeline_spec(config, manifest: dict, split: str) -> pipeline.PipelineSpec:
    return pipeline.PipelineSpec(
        data_dir=feature_cache.data_dir_of(config), split=split, image_size=config.model.image_size,
        captions_per_image=config.data.captions_per_image, max_len=manifest["max_len"],
        global_batch_size=config.train.global_batch_size, seed=config.train.seed,
        shuffle_buffer=config.data.shuffle_buffer)


def build_experiment(config, strategy: tf.distribute.Strategy) -> Experiment:
    # Precision and LSTM kernel per device kind (distribute/precision.py): bf16 on TPUs, no cuDNN under XLA.
    kind = device_kind(strategy)
    policy = resolve_precision(config.train.mixed_precision, kind,
                               cpu_fast_bf16=kind == "cpu" and cpu_has_fast_bf16())
    if config.train.global_batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(f"global_batch_size {config.train.global_batch_size} is not divisible by the "
                          f"{strategy.num_replicas_in_sync} replicas of the strategy.")
    # Image records, or the encoder's features cached from them (config.data.features_dir).
    data_dir = feature_cache.data_dir_of(config)
    manifest = load_manifest(data_dir)
    feature_cache.check_features_compatible(manifest, config.model, data_dir)
    # A missing, extra or truncated shard stops here, before step 1, not mid-epoch.
    validate_dataset(data_dir, manifest, splits=[s for s in ("train", "val") if s in manifest["splits"]])
    tokenizer = Tokenizer.load(f"{data_dir.rstrip('/')}/{VOCABULARY}")
    tokenizer.check_rules(f"{data_dir.rstrip('/')}/{VOCABULARY}")  # records of older word-splitting rules
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(config.train.seed)
    with strategy.scope():
        # The encoder is built (with its weights) even when training from cached features, so that
        # checkpoints and exports are those of a model trained from images.
        model = build_model(config.model, tokenizer.vocab_size,
                            use_cudnn=resolve_use_cudnn(kind, config.train.jit_compile))
    feature_cache.check_feature_dim(manifest, model, data_dir)
    trainer = Trainer(strategy, model, config.train, mixed_precision=None if policy == "float32" else policy,
                      jit_compile=config.train.jit_compile)
    extra = {"weight_average": trainer.weight_average.averages} if trainer.weight_average else {}
    # Dropout is stateless (seeded by step and replica): the step is all a resume needs of it.
    checkpoint = tf.train.Checkpoint(model=model, optimizer=trainer.optimizer, step=trainer.step, **extra)
    return Experiment(config, manifest, tokenizer, model, trainer, checkpoint)


def _checkpoint_dir(model_dir: str, strategy) -> str:
    if is_chief(strategy):
        return f"{model_dir}/checkpoints"
    # Other workers must save too (the save is collective) but into a scratch dir.
    return f"{model_dir}/checkpoints_worker_{strategy.cluster_resolver.task_id}"


def evaluate_loss(exp: Experiment, strategy, split: str, max_images: int | None = None) -> dict:
    spec = pipeline_spec(exp.config, exp.manifest, split)
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
    prepare_model_dir(model_dir, json.loads(config.to_json()), exp.tokenizer.to_json(), write=chief)
    manager = tf.train.CheckpointManager(exp.checkpoint, _checkpoint_dir(model_dir, strategy),
                                         max_to_keep=config.train.keep_checkpoints)
    selector = CheckpointSelector(exp, strategy, model_dir, log=log)  # checks Java etc. before step 1
    if manager.latest_checkpoint:
        exp.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        log(f"resumed from {manager.latest_checkpoint} at step {exp.trainer.current_step()}")
    start = exp.trainer.current_step()
    selector.resume_at(start)
    caption_samples = CaptionSummaries(exp, strategy, log=log)  # val images + captions in TensorBoard
    total = config.train.steps
    spec = pipeline_spec(config, exp.manifest, "train")
    dataset = strategy.distribute_datasets_from_function(pipeline.train_input_fn(exp.manifest, spec, start))
    iterator = iter(dataset)
    writer = tf.summary.create_file_writer(f"{model_dir}/train") if chief else tf.summary.create_noop_writer()
    eval_writer = tf.summary.create_file_writer(f"{model_dir}/eval") if chief else tf.summary.create_noop_writer()
    captions_per_step = config.train.global_batch_size * config.data.captions_per_image
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
    with PreemptionWatcher() as preemption:
        while step < end:
            n = min(config.train.steps_per_loop, end - step)
            if config.train.checkpoint_every:
                n = min(n, config.train.checkpoint_every - step % config.train.checkpoint_every)
            if config.train.eval_every:
                n = min(n, config.train.eval_every - step % config.train.eval_every)
            t0 = time.perf_counter()
            m = exp.trainer.train_loop(iterator, n)
            elapsed = time.perf_counter() - t0
            step += n
            lr = exp.trainer.learning_rate()
            metrics.update(step=step, loss=m["loss"], perplexity=float(tf.exp(m["loss"])), learning_rate=lr,
                           grad_norm=m["grad_norm"], images_per_s=n * config.train.global_batch_size / elapsed)
            with writer.as_default(step=step):
                for name in ("loss", "perplexity", "learning_rate", "grad_norm"):
                    tf.summary.scalar(name, metrics[name])
                tf.summary.scalar("images_per_s", metrics["images_per_s"])
                tf.summary.scalar("captions_per_s", n * captions_per_step / elapsed)
            bar.update(n)
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{metrics['images_per_s']:.0f}")
            at_checkpoint = config.train.checkpoint_every and step % config.train.checkpoint_every == 0
            if at_checkpoint or step == end or preemption.requested:
                manager.save(checkpoint_number=step)
            if preemption.requested:
                bar.close()
                log(f"SIGTERM: saved a checkpoint at step {step} in {model_dir}; stopping.")
                metrics["preempted"] = True
                return metrics, exp
            if config.train.eval_every and step % config.train.eval_every == 0 and step < total:
                _log_eval(exp, strategy, eval_writer, step, metrics, loop_log)
                _select(selector, eval_writer, step, metrics, loop_log)
                caption_samples(eval_writer, step)
    bar.close()
    if step == total and "val" in exp.manifest["splits"]:
        _log_eval(exp, strategy, eval_writer, step, metrics, log)
        _select(selector, eval_writer, step, metrics, log)
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
                                  pipeline_spec(exp.config, exp.manifest, split), num_examples)
    return f"greedy captions for {len(samples)} held-out {split} images:\n" + format_samples(samples)


def _select(selector: CheckpointSelector, writer, step: int, metrics: dict, log) -> None:
    scores = selector(step, log)
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
