"""The compiled train and eval steps of a Show and Tell model under a strategy.

A `Trainer` owns the model, the optimizer and a step counter, all created in
`strategy.scope()`. `train_loop(iterator, n)` runs n steps in one host call
(`steps_per_loop`); each step is `strategy.run` of a replica step that:

  1. flattens [batch, captions, time] captions into [batch * captions, time]
     rows; inputs are tokens[:-1], targets tokens[1:];
  2. encodes each image once (or takes its cached features, when the input
     is a features cache) and repeats its initial state per caption;
  3. sums the masked cross-entropy and divides by the number of real target
     tokens in the global batch (all-reduced);
  4. all-reduces the gradients, clips them by their global norm, and applies
     them with an optimizer that does not reduce again;
  5. with train.weight_average_decay > 0, updates an exponential moving
     average of the weights (weight_average.py), used for evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import tensorflow as tf

from showtell_dist.model.show_and_tell import dropout_seed
from showtell_dist.training.loss import masked_token_loss_sum
from showtell_dist.training.optimizer import build_optimizer
from showtell_dist.training.weight_average import WeightAverage

SUM = tf.distribute.ReduceOp.SUM


def _flatten_captions(captions: tf.Tensor):
    """[batch, captions, time] -> inputs, targets [batch * captions, time - 1]."""
    rows = tf.reshape(captions, [-1, tf.shape(captions)[-1]])  # time: a caption bucket's length
    return rows[:, :-1], rows[:, 1:]


def _count_tokens(targets: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(tf.not_equal(targets, 0), tf.float32))


@dataclasses.dataclass
class RunState:
    """What every phase of a run shares: the global step and the moving average of the weights."""

    step: tf.Variable
    weight_average: WeightAverage | None

    @classmethod
    def create(cls, strategy: tf.distribute.Strategy, model, weight_average_decay: float) -> "RunState":
        with strategy.scope():
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        decay = float(weight_average_decay or 0.0)
        return cls(step, WeightAverage(strategy, model.trainable_variables, decay) if decay else None)


class Trainer:
    """The cross-entropy trainer; subclasses (self_critical.py) replace the replica step."""

    # Per-replica sums that the host loop adds up over steps and replicas.
    SUM_KEYS = ("loss_sum", "tokens")

    def __init__(self, strategy: tf.distribute.Strategy, model, train_config, *,
                 mixed_precision: str | None = None, jit_compile: bool = False, run_state: RunState | None = None,
                 seed: int | None = None, rate_factors: list | None = None):
        """train_config: a phase's config section (learning_rate, warmup_steps, steps, final_lr_ratio,
        clip_norm). run_state: the run's step and weight average, shared across phases; by default
        a new one with train_config.weight_average_decay. seed: of dropout (default train_config.seed).
        rate_factors: [(variable, factor)]: those variables learn at factor x the learning rate."""
        self.strategy = strategy
        self.model = model
        self.clip_norm = float(train_config.clip_norm)
        self.seed = int(train_config.get("seed", 0) if seed is None else seed)
        self.jit_compile = jit_compile
        run_state = run_state or RunState.create(strategy, model, train_config.get("weight_average_decay", 0.0))
        self.step, self.weight_average = run_state.step, run_state.weight_average
        with strategy.scope():
            self.optimizer = build_optimizer(train_config, mixed_precision, rate_factors)
            # Built here, in scope, so that its slots are mirrored like the model's variables.
            self.optimizer.build(self.trainable_variables)
        self._loss_scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        # Logits only where targets are real: a data-dependent shape, so not under XLA or on TPUs,
        # which compute the padded positions too (and mask them in the loss).
        self._real_positions_only = not jit_compile and not isinstance(strategy, tf.distribute.TPUStrategy)
        self._train_loop = tf.function(self._train_loop_fn)
        self._eval_loop = tf.function(self._eval_loop_fn)
        self._replica_train_step = tf.function(self._replica_train_step_fn, jit_compile=jit_compile)
        self._replica_eval_step = tf.function(self._replica_eval_step_fn, jit_compile=jit_compile)

    @property
    def trainable_variables(self) -> list:
        return self.model.trainable_variables

    def evaluation_weights(self):
        """Context in which the model holds the weights to evaluate: the moving average when kept."""
        if self.weight_average is None:
            return contextlib.nullcontext()
        return self.weight_average.swapped_in()

    def current_step(self) -> int:
        return int(self.step.numpy())

    def learning_rate(self) -> float:
        """The learning rate the next step will use."""
        lr = self.optimizer.learning_rate
        return float(lr(self.current_step()) if callable(lr) else lr)

    # -- replica steps -------------------------------------------------------
    def replica_dropout_seed(self) -> tf.Tensor:
        """In a replica context: this replica's dropout seed for the coming step (from train.seed,
        the step and the replica's id across all workers)."""
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return dropout_seed(self.seed, self.step.read_value(), replica)

    def replica_features(self, batch) -> tf.Tensor:
        """The train step's encoder features of a batch (cached, or the encoder's in its training mode)."""
        return self.model.batch_features(batch, training=True)

    def _loss_sum(self, state, inputs, targets, training: bool = False, seed=None) -> tf.Tensor:
        """Summed cross-entropy over the real target tokens of [rows, time] inputs/targets."""
        if not self._real_positions_only:
            return masked_token_loss_sum(
                targets, self.model.decode_sequence(state, inputs, training, dropout_seed=seed))[0]
        positions = tf.where(tf.not_equal(targets, 0))  # [real tokens, 2]
        logits = self.model.decode_sequence(state, inputs, training, positions=positions,
                                            dropout_seed=seed)  # [real tokens, vocab]
        return masked_token_loss_sum(tf.gather_nd(targets, positions), logits)[0]

    def _replica_train_step_fn(self, batch):
        ctx = tf.distribute.get_replica_context()
        captions = batch["captions"]  # [batch, captions, time]
        inputs, targets = _flatten_captions(captions)
        local_tokens = _count_tokens(targets)
        global_tokens = tf.maximum(ctx.all_reduce(SUM, local_tokens), 1.0)
        seed = self.replica_dropout_seed()
        with tf.GradientTape() as tape:
            features = self.replica_features(batch)
            state = self.model.initial_state(features, training=True, repeats=captions.shape[1], dropout_seed=seed)
            loss_sum = tf.cast(self._loss_sum(state, inputs, targets, training=True, seed=seed), tf.float32)
            loss = loss_sum / global_tokens
            if self._loss_scaled:
                loss = self.optimizer.scale_loss(loss)
        return {"loss_sum": loss_sum, "tokens": local_tokens}, self._apply_gradients(tape, loss)

    def _apply_gradients(self, tape: tf.GradientTape, loss: tf.Tensor) -> tf.Tensor:
        """All-reduces, clips (by the global norm) and applies the gradients; advances the step
        and the weight average; returns the gradients' global norm."""
        ctx = tf.distribute.get_replica_context()
        variables = self.trainable_variables
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
        grads = ctx.all_reduce(SUM, grads)
        scale = tf.cast(self.optimizer.dynamic_scale, tf.float32) if self._loss_scaled else 1.0
        if self.clip_norm > 0:
            # Clipping the scaled gradient at clip_norm * scale clips the true one at clip_norm.
            grads, norm = tf.clip_by_global_norm(grads, self.clip_norm * scale)
        else:
            norm = tf.linalg.global_norm(grads)
        self.optimizer.apply_gradients(zip(grads, variables))
        if self.weight_average is not None:
            self.weight_average.update()
        self.step.assign_add(1)
        return tf.cast(norm, tf.float32) / scale

    def _replica_eval_step_fn(self, batch):
        captions = batch["captions"]
        inputs, targets = _flatten_captions(captions)
        features = self.model.batch_features(batch)
        state = self.model.initial_state(features, repeats=captions.shape[1])
        return tf.cast(self._loss_sum(state, inputs, targets), tf.float32), _count_tokens(targets)

    # -- host loops ------------------------------------------------------------
    def _train_loop_fn(self, iterator, num_steps):
        totals = {key: tf.constant(0.0) for key in self.SUM_KEYS}
        norm = tf.constant(0.0)
        for _ in tf.range(num_steps):
            sums, norm = self.strategy.run(self._replica_train_step, args=(next(iterator),))
            totals = {key: totals[key] + self.strategy.reduce(SUM, sums[key], axis=None) for key in self.SUM_KEYS}
            norm = self.strategy.experimental_local_results(norm)[0]  # the same on every replica
        return totals, norm

    def _eval_loop_fn(self, iterator, num_steps):
        loss_sum, tokens = tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(num_steps):
            step_loss, step_tokens = self.strategy.run(self._replica_eval_step, args=(next(iterator),))
            loss_sum += self.strategy.reduce(SUM, step_loss, axis=None)
            tokens += self.strategy.reduce(SUM, step_tokens, axis=None)
        return loss_sum, tokens

    def train_loop(self, iterator, num_steps: int) -> dict:
        """Runs num_steps train steps; returns their metrics (`summarize`) and the last grad norm."""
        totals, norm = self._train_loop(iterator, tf.constant(num_steps, tf.int32))
        return {**self.summarize({key: float(value) for key, value in totals.items()}), "grad_norm": float(norm)}

    def summarize(self, totals: dict) -> dict:
        """Host-side metrics from the summed SUM_KEYS: mean loss per token, perplexity, tokens."""
        loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
        return {"loss": loss, "perplexity": float(tf.exp(loss)), "tokens": totals["tokens"]}

    def evaluate(self, iterator, num_steps: int) -> dict:
        """Loss per real token and perplexity over num_steps eval batches."""
        loss_sum, tokens = self._eval_loop(iterator, tf.constant(num_steps, tf.int32))
        loss = float(loss_sum) / max(float(tokens), 1.0)
        return {"loss": loss, "perplexity": float(tf.exp(loss)), "tokens": float(tokens)}


def encoder_variables(model) -> list:
    """The encoder's weights that training may change (not its BatchNorm moving statistics), also
    when the model was built with a frozen encoder (model.encoder.trainable False)."""
    frozen = not model.encoder.trainable
    model.encoder.trainable = True
    try:
        return list(model.encoder.trainable_variables)
    finally:
        if frozen:
            model.encoder.trainable = False


class FineTuneTrainer(Trainer):
    """Cross-entropy from images with the encoder trained too (the finetune phase, configs/finetune.py).

    The encoder's weights learn at finetune.encoder_learning_rate, the rest at finetune.learning_rate
    (one Adam, a per-variable factor on its rate: optimizer.PerVariableRateAdam). The encoder runs in
    inference mode (training=False): its BatchNorm layers normalise with, and keep, their moving
    statistics, while their scale and offset train with the other weights -- batch statistics of a
    small batch would drift far from the ImageNet ones the weights were trained with. The model's
    encoder stays `trainable=False` when it was built so (a features-cache run): the trainer lists the
    encoder's variables itself, so the model's variables, its trainable_variables (which the moving
    average of the weights covers) and the checkpoint layout are those of the other phases. So with
    train.weight_average_decay > 0 the moving average covers the decoder only; evaluation uses it with
    the encoder's current weights.
    """

    def __init__(self, strategy: tf.distribute.Strategy, model, section, **kwargs):
        self._encoder_variables = encoder_variables(model)
        encoder_ids = {id(v) for v in self._encoder_variables}
        self._decoder_variables = [v for v in model.trainable_variables if id(v) not in encoder_ids]
        lr, encoder_lr = float(section.learning_rate), float(section.encoder_learning_rate)
        # The encoder's rate follows the schedule's shape (warm-up, cosine decay) at its own peak.
        factor = encoder_lr / lr
        super().__init__(strategy, model, section,
                         rate_factors=[(v, factor) for v in self._encoder_variables], **kwargs)

    @property
    def trainable_variables(self) -> list:
        return self._decoder_variables + self._encoder_variables

    def replica_features(self, batch) -> tf.Tensor:
        if "features" in batch:
            raise ValueError("the finetune phase trains the encoder: its input must be images, not cached features "
                             "(phases.data_dir_for gives the records).")
        return self.model.encoder(tf.cast(batch["images"], tf.float32), training=False)  # BatchNorm frozen
