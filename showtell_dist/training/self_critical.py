"""Self-critical sequence training (Rennie et al., 2017): the compiled policy-gradient step.

`SelfCriticalTrainer` shares the optimizer, clipping, weight average, step
counter and host loops of `Trainer` (trainer.py) and replaces its replica
step. For a per-replica batch of B images with C reference captions each:

  1. encode once (cached features or a frozen encoder; inference mode, so
     batch-norm statistics stay fixed) -> (h0, c0) [B, units];
  2. sample K captions per image (decoding/sampling.py) from the model's
     single-step decoder, rows image-major [B * K, max_len]; the random
     numbers are keyed by (seed, step, global row), so N replicas draw what
     one device draws for the same global batch and a resumed run draws
     what an uninterrupted one does;
  3. reward each sample in the graph (`reward_fn`: CIDEr-D against its image's
     references, with the train split's document frequencies; with
     scst.reward_end_token, <end> counts as a word of samples and references)
     -> [B * K];
  4. baseline: the mean reward of the image's other K - 1 samples ("mean"),
     or the reward of its greedy caption ("greedy");
  5. loss = -sum((reward - baseline) * log p(sample)) / (global number of
     samples), log p summed over the sample's real tokens incl. <end>, from a
     teacher-forced pass over the samples; plus xe_weight x the cross-entropy
     of the references (normalised by the global real tokens), when > 0.
     With scst.dropout the pass uses the output-dropout masks each token was
     sampled under (model.step_dropout_seed), so log p is the sampling policy's.

Everything is TensorFlow ops with static shapes, no py_function: it runs
under every strategy and with jit_compile on the default strategy.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from showtell_dist.data.tokenizer import END_ID, START_ID, UNK_ID
from showtell_dist.decoding.decoder import build_decoder
from showtell_dist.decoding.options import GREEDY
from showtell_dist.decoding.sampling import banned_mask, global_uniforms, sample_captions, sampling_log_probs
from showtell_dist.errors import ConfigError
from showtell_dist.config_fields import SCST_BASELINES as BASELINES
from showtell_dist.model.show_and_tell import step_dropout_seed
from showtell_dist.training.trainer import SUM, Trainer, _count_tokens, _flatten_captions

# reward_fn(samples [rows, T] generated ids (no <start>, <end> included, 0-padded),
#           captions [rows, C, L] the reference token rows as in the batch (<start> ... <end>, 0-padded))
#   -> [rows] float32
RewardFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def cider_d_reward(document_frequencies, caption_len: int) -> RewardFn:
    """CIDEr-D of each sample against its references (reward/cider_d.py), on word ids; <end> is a word of
    both when the document frequencies were counted with it (`document_frequencies.end_token`).

    caption_len: the dataset's padded caption length (manifest max_len); batches may hold
    shorter ones (caption buckets) and are padded to it, since the reward needs static shapes.
    """
    from showtell_dist.reward.cider_d import cider_d, word_ids

    keep_end = bool(document_frequencies.end_token)

    def reward(samples: tf.Tensor, captions: tf.Tensor) -> tf.Tensor:
        rows, refs = captions.shape[0], captions.shape[1]
        time = max(samples.shape[1], caption_len)
        candidates = word_ids(tf.pad(samples, [[0, 0], [0, time - samples.shape[1]]]),
                              start_id=START_ID, end_id=END_ID, keep_end=keep_end)  # [rows, time]
        flat = tf.reshape(captions, [rows * refs, -1])[:, :time]  # [rows * refs, <= time]
        flat = tf.ensure_shape(tf.pad(flat, [[0, 0], [0, time - tf.shape(flat)[1]]]), [rows * refs, time])
        references = tf.reshape(word_ids(flat, start_id=START_ID, end_id=END_ID, keep_end=keep_end),
                                [rows, refs, time])
        return tf.cast(cider_d(candidates, references, document_frequencies), tf.float32)

    return reward


def build_self_critical_trainer(strategy: tf.distribute.Strategy, model, section, data_dir: str, manifest: dict,
                                log=print, **trainer_kwargs) -> "SelfCriticalTrainer":
    """The self-critical phase's trainer, rewarded by CIDEr-D with the document frequencies of `data_dir`'s
    train split (whose manifest is `manifest`), counted with <end> when section.reward_end_token."""
    from showtell_dist.data.document_frequencies import check_vocabulary_fits, load_or_compute_document_frequencies

    check_vocabulary_fits(model.logits.units)
    end_token = bool(section.get("reward_end_token", False))
    df = load_or_compute_document_frequencies(data_dir, manifest, end_token=end_token, log=log)
    return SelfCriticalTrainer(strategy, model, section, cider_d_reward(df, manifest["max_len"]), **trainer_kwargs)


def check_scst_config(section) -> None:
    """Raises ConfigError for self-critical settings that cannot work."""
    if section.samples_per_image < 1 or (section.baseline == "mean" and section.samples_per_image < 2):
        raise ConfigError(f"scst.samples_per_image={section.samples_per_image}: the 'mean' baseline needs at least "
                          "2 samples per image (each is baselined by the others); use 5, or baseline='greedy'.")
    if section.baseline not in BASELINES:
        raise ConfigError(f"scst.baseline={section.baseline!r} is not one of {BASELINES}.")
    if section.max_len < 1:
        raise ConfigError(f"scst.max_len={section.max_len} must be >= 1 (tokens per sample incl. <end>).")
    if not section.temperature > 0:
        raise ConfigError(f"scst.temperature={section.temperature} must be > 0 (1.0 samples the model's softmax).")
    if section.xe_weight < 0:
        raise ConfigError(f"scst.xe_weight={section.xe_weight} must be >= 0.")


class SelfCriticalTrainer(Trainer):
    SUM_KEYS = ("loss_sum", "reward_sum", "baseline_sum", "samples", "sample_tokens", "xe_sum", "tokens")

    def __init__(self, strategy: tf.distribute.Strategy, model, scst_config, reward_fn: RewardFn, *, seed: int = 0,
                 mixed_precision: str | None = None, jit_compile: bool = False, run_state=None):
        """scst_config: the run's `scst` section (learning-rate schedule and clip_norm as in `train`, plus
        samples_per_image, baseline, max_len, temperature, xe_weight, dropout)."""
        check_scst_config(scst_config)
        self.samples_per_image = int(scst_config.samples_per_image)
        self.baseline = scst_config.baseline
        self.max_len = int(scst_config.max_len)
        self.temperature = float(scst_config.temperature)
        self.xe_weight = float(scst_config.xe_weight)
        self.dropout = bool(scst_config.dropout)
        self.reward_fn = reward_fn
        self._banned = banned_mask(model.logits.units, (START_ID, UNK_ID))
        super().__init__(strategy, model, scst_config, mixed_precision=mixed_precision, jit_compile=jit_compile,
                         run_state=run_state, seed=seed)

    def _sampling_step_fn(self, dropout_seed):
        """The sampler's step: the model's decode_step, with output dropout when self.dropout (the
        state then carries a step counter [rows]; step t's mask is keyed by step_dropout_seed(dropout_seed, t),
        as `_sample_log_probs` keys it)."""
        if not self.dropout:
            return self.model.decode_step

        def step_fn(tokens, state):
            h, c, t = state
            seed = step_dropout_seed(dropout_seed, t[0])
            logits, (h, c) = self.model.decode_step(tokens, (h, c), dropout_seed=seed)
            return logits, (h, c, t + 1)

        return step_fn

    def _sample_log_probs(self, state, samples: tf.Tensor, dropout_seed) -> tf.Tensor:
        """Teacher-forced log p of each sample under the sampling distribution: [rows, T] -> [rows].
        dropout_seed: the seed the samples were drawn under (`_sampling_step_fn`); with self.dropout each
        time step's output-dropout mask is the one its token was sampled with."""
        rows = samples.shape[0]
        inputs = tf.concat([tf.fill([rows, 1], START_ID), samples[:, :-1]], axis=1)  # [rows, T]
        if self._real_positions_only:
            positions = tf.where(tf.not_equal(samples, 0))  # [real tokens, 2]
            logits = self.model.decode_sequence(state, inputs, self.dropout, positions=positions,
                                                dropout_seed=dropout_seed, per_step_dropout=True)  # [n, vocab]
            log_probs = sampling_log_probs(logits, self._banned, self.temperature)
            token_log_probs = tf.gather(log_probs, tf.gather_nd(samples, positions), batch_dims=1)  # [n]
            return tf.math.unsorted_segment_sum(token_log_probs, positions[:, 0], rows)
        logits = self.model.decode_sequence(state, inputs, self.dropout, dropout_seed=dropout_seed,
                                            per_step_dropout=True)  # [rows, T, V]
        log_probs = sampling_log_probs(logits, self._banned, self.temperature)
        token_log_probs = tf.gather(log_probs, samples, batch_dims=2)  # [rows, T]
        return tf.reduce_sum(token_log_probs * tf.cast(tf.not_equal(samples, 0), token_log_probs.dtype), axis=1)

    def _replica_train_step_fn(self, batch):
        ctx = tf.distribute.get_replica_context()
        captions = batch["captions"]  # [B, C, L]
        images, refs_per_image = captions.shape[0], captions.shape[1]
        k = self.samples_per_image
        rows = images * k
        global_rows = rows * ctx.num_replicas_in_sync
        repeat = lambda state, n: tuple(tf.repeat(x, n, axis=0) for x in state)  # noqa: E731
        # Dropout (scst.dropout) masks: per replica and step, as in the cross-entropy step.
        dropout_seed = self.replica_dropout_seed()

        # Sampling and rewards: no gradient.
        features = self.model.batch_features(batch)  # [B, dim]; a frozen encoder in inference mode
        state = self.model.initial_state(features)  # (h, c) [B, units]; batch-norm statistics fixed
        uniforms = global_uniforms(self.seed, self.step, self.max_len, ctx.replica_id_in_sync_group * rows,
                                   rows)  # [max_len, rows]
        sample_state = repeat(state, k)
        if self.dropout:
            sample_state += (tf.zeros([rows], tf.int32),)
        sampling_seed = tf.random.experimental.stateless_fold_in(dropout_seed, 1)
        samples, _ = sample_captions(self._sampling_step_fn(sampling_seed), sample_state, uniforms, start_id=START_ID, end_id=END_ID,
                                     banned=self._banned, temperature=self.temperature)
        references = tf.repeat(captions, k, axis=0)  # [rows, C, L]
        rewards = self.reward_fn(samples, references)  # [rows]
        if self.baseline == "mean":
            per_image = tf.reshape(rewards, [images, k])
            baseline = (tf.reduce_sum(per_image, axis=1, keepdims=True) - per_image) / (k - 1)
            baseline = tf.reshape(baseline, [rows])
        else:
            greedy = build_decoder([self.model], GREEDY.replace(max_new_tokens=self.max_len),
                                   from_features=True)(features).tokens[:, 0]  # [B, max_len]
            baseline = tf.repeat(self.reward_fn(greedy, captions), k, axis=0)  # [rows]
        advantage = tf.stop_gradient(rewards - baseline)  # [rows]

        with tf.GradientTape() as tape:
            features = self.model.batch_features(batch)
            state = self.model.initial_state(features)
            log_p = self._sample_log_probs(repeat(state, k), samples, sampling_seed)  # [rows]; the sampling masks
            loss_sum = -tf.reduce_sum(tf.cast(advantage, log_p.dtype) * log_p)
            loss = loss_sum / float(global_rows)
            xe_sum, tokens = tf.constant(0.0), tf.constant(0.0)
            if self.xe_weight > 0:
                inputs, targets = _flatten_captions(captions)
                tokens = _count_tokens(targets)
                global_tokens = tf.maximum(ctx.all_reduce(SUM, tokens), 1.0)
                xe_sum = tf.cast(self._loss_sum(repeat(state, refs_per_image), inputs, targets, self.dropout,
                                                seed=tf.random.experimental.stateless_fold_in(dropout_seed, 2)),
                                 tf.float32)
                loss += tf.cast(self.xe_weight * xe_sum / global_tokens, loss.dtype)
            if self._loss_scaled:
                loss = self.optimizer.scale_loss(loss)
        norm = self._apply_gradients(tape, loss)
        sums = {"loss_sum": tf.cast(loss_sum, tf.float32), "reward_sum": tf.reduce_sum(rewards), "baseline_sum": tf.reduce_sum(baseline),
                "samples": tf.constant(float(rows)), "sample_tokens": _count_tokens(samples),
                "xe_sum": xe_sum, "tokens": tokens}
        return sums, norm

    def summarize(self, totals: dict) -> dict:
        """Mean policy-gradient loss and reward per sample, mean sample length (tokens incl. <end>),
        and the references' cross-entropy per token when it is mixed in."""
        samples = max(totals["samples"], 1.0)
        out = {"loss": totals["loss_sum"] / samples, "reward": totals["reward_sum"] / samples,
               "baseline": totals["baseline_sum"] / samples, "sample_length": totals["sample_tokens"] / samples,
               "samples": totals["samples"]}
        if totals["tokens"]:
            out["xe_loss"] = totals["xe_sum"] / totals["tokens"]
        return out
