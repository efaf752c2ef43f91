"""The Show and Tell captioner: CNN features -> initial LSTM state -> words.

    features = encoder(images)                        # [batch, feature_dim]
    h0 = dropout(tanh(Dense(features))), c0 = 0       # [batch, units]
    logits = Dense(dropout(LSTM(embed(tokens), (h0, c0))))

Training calls `encode` once per image and `decode_sequence` on all captions
of those images (the state is repeated per caption). Dropout is stateless: its
masks are a function of a seed the train step passes (`dropout_seed(seed, step,
replica)`), so every replica and worker draws its own masks and a resumed run
draws the masks an uninterrupted one would. Decoding calls
`decode_step`, one token for every row, carrying (h, c): no prefix is re-run.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from showtell_dist.config_fields import FEATURE_NORMS
from showtell_dist.errors import ConfigError
from showtell_dist.model.encoders import build_encoder



def dropout_seed(base_seed: int, step, replica_id) -> tf.Tensor:
    """[2] int64: the seed of one replica's dropout masks at one train step.

    replica_id is the replica's id in the whole sync group (all workers), so no two replicas of
    a step share masks; a pure function of its arguments, so a resumed run draws the same ones.
    """
    seed = tf.random.experimental.stateless_fold_in(tf.constant([base_seed, 0], tf.int64),
                                                    tf.cast(step, tf.int64))
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))


def step_dropout_seed(seed, t) -> tf.Tensor:
    """[2] int64: the seed of the output-dropout mask at decoding step (time) t under `seed`: what a
    sampler's step t passes to `decode_step`, and what `decode_sequence(..., per_step_dropout=True)` uses
    at time t, so a teacher-forced pass over a sample sees the masks it was sampled under."""
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), tf.cast(t, tf.int64))


class StatelessDropout(keras.layers.Layer):
    """Dropout whose mask is drawn from an explicit seed (no random-generator state to mirror,
    which Keras's Dropout keeps in one variable that a strategy copies to every replica).

    `salt` tells the model's dropout layers apart under one seed.
    """

    def __init__(self, rate: float, salt: int, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.salt = int(salt)

    def call(self, x, training=False, seed=None):
        if not training or self.rate == 0.0:
            return x
        if seed is None:
            raise ValueError(f"{self.name}: dropout in training needs a seed ([2] int tensor, see dropout_seed); "
                             "the Trainer passes one per step and replica.")
        seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), self.salt)
        return tf.nn.experimental.stateless_dropout(x, rate=self.rate, seed=seed)


class ShowAndTell(keras.Model):
    def __init__(self, *, vocab_size: int, encoder: str = "small_cnn", encoder_weights: str | None = None,
                 encoder_trainable: bool = True, image_size: int | None = None, units: int = 512,
                 embed_dim: int = 512, dropout: float = 0.3, feature_norm: str = "batch", use_cudnn="auto",
                 **kwargs):
        super().__init__(**kwargs)
        self.encoder = build_encoder(encoder, image_size=image_size, weights=encoder_weights)
        self.encoder.trainable = encoder_trainable
        self.encoder_trainable = encoder_trainable
        self.image_size = self.encoder.input_shape[1]
        self.units = units
        if feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        # Raw CNN features share a large component across images; Dense(tanh) learns to use it as a
        # constant and saturates (|h0| -> 1 for every image), after which captions ignore the image.
        # Standardising each feature across the batch (synchronised over replicas, so N replicas
        # still equal one device) removes that shared component and keeps h0 image-specific.
        self.feature_norm = {
            "batch": lambda: keras.layers.BatchNormalization(synchronized=True, name="feature_norm"),
            "layer": lambda: keras.layers.LayerNormalization(name="feature_norm"),
            "none": lambda: None}[feature_norm]()
        self.init_dense = keras.layers.Dense(units, activation="tanh", name="init_state")
        self.init_dropout = StatelessDropout(dropout, salt=0, name="init_dropout")
        self.embedding = keras.layers.Embedding(vocab_size, embed_dim, name="embedding")
        # use_cudnn=False where the step is XLA-compiled on a GPU (distribute/precision.py).
        self.lstm = keras.layers.LSTM(units, return_sequences=True, use_cudnn=use_cudnn, name="lstm")
        self.out_dropout = StatelessDropout(dropout, salt=1, name="out_dropout")
        # Logits in float32 even under a mixed-precision policy, for a stable loss.
        mixed = keras.mixed_precision.global_policy().compute_dtype in ("float16", "bfloat16")
        self.logits = keras.layers.Dense(vocab_size, name="logits", dtype="float32" if mixed else None)

    def build_all(self) -> "ShowAndTell":
        """Creates every variable (before an optimizer or checkpoint needs them)."""
        images = tf.zeros([1, self.image_size, self.image_size, 3])
        state = self.initial_state(self.encode(images))
        self.decode_sequence(state, tf.zeros([1, 2], tf.int32))
        return self

    def encode(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        """[batch, H, W, 3] 0..255 (uint8 from the input pipelines, or float) -> [batch, feature_dim]."""
        if images.dtype.is_integer:  # uint8 from the input pipelines: cast on the device, a quarter of the bytes sent
            images = tf.cast(images, tf.float32)
        # A frozen encoder always runs in inference mode (batch-norm statistics fixed).
        return self.encoder(images, training=training and self.encoder_trainable)

    def batch_features(self, batch: dict, training: bool = False) -> tf.Tensor:
        """The encoder features of an input batch: its cached `features` when it has them (an input
        pipeline over a features cache: the encoder is skipped), else `encode(batch["images"])`."""
        if "features" in batch:
            return batch["features"]
        return self.encode(batch["images"], training=training)

    def initial_state(self, features: tf.Tensor, training: bool = False, repeats: int = 1, dropout_seed=None):
        """[batch, feature_dim] -> (h, c), each [batch * repeats, units]. Training with dropout
        needs dropout_seed ([2] int, see `dropout_seed`)."""
        if self.feature_norm is not None:
            features = self.feature_norm(features, training=training)
        h = self.init_dense(features)
        if repeats > 1:
            h = tf.repeat(h, repeats, axis=0)
        h = self.init_dropout(h, training=training, seed=dropout_seed)
        return h, tf.zeros_like(h)

    def decode_sequence(self, state, tokens: tf.Tensor, training: bool = False, positions=None,
                        dropout_seed=None, per_step_dropout: bool = False) -> tf.Tensor:
        """Teacher forcing: tokens [rows, time] -> logits [rows, time, vocab] float32.

        With positions ([n, 2] (row, time) indices) the logits are computed only
        there -> [n, vocab]: the output projection dominates a step at a large
        vocabulary, and most positions of a padded batch are padding.

        per_step_dropout (training, static time): the output-dropout mask at time t is the one
        `decode_step` draws with `step_dropout_seed(dropout_seed, t)` ([rows, units] per step), rather
        than one [rows, time, units] draw.
        """
        x = self.embedding(tokens)
        x = self.lstm(x, initial_state=list(state), training=training)  # [rows, time, units]
        if training and per_step_dropout:
            if x.shape[1] is None:
                raise ValueError("decode_sequence(per_step_dropout=True) needs tokens of a static length.")
            x = tf.stack([self.out_dropout(x[:, t], training=True, seed=step_dropout_seed(dropout_seed, t))
                          for t in range(x.shape[1])], axis=1)  # [rows, time, units], masks as decode_step's
            training = False  # applied
        if positions is not None:
            x = tf.gather_nd(x, positions)  # [n, units]
        return self.logits(self.out_dropout(x, training=training, seed=dropout_seed))

    def decode_step(self, tokens: tf.Tensor, state, dropout_seed=None):
        """One step for every row: tokens [rows], (h, c) -> logits [rows, vocab], (h, c).
        With dropout_seed ([2] int) the output dropout applies (self-critical sampling may use it)."""
        x = self.embedding(tokens)
        h, (h, c) = self.lstm.cell(x, list(state), training=False)
        return self.logits(self.out_dropout(h, training=dropout_seed is not None, seed=dropout_seed)), (h, c)

    def call(self, inputs, training=False, dropout_seed=None):
        """(images [batch, H, W, 3], tokens [batch, time]) -> logits [batch, time, vocab]."""
        images, tokens = inputs
        state = self.initial_state(self.encode(images, training), training, dropout_seed=dropout_seed)
        return self.decode_sequence(state, tokens, training, dropout_seed=dropout_seed)


def build_model(model_config, vocab_size: int, use_cudnn="auto") -> ShowAndTell:
    """Builds a ShowAndTell from the `model` part of an experiment config."""
    return ShowAndTell(vocab_size=vocab_size, encoder=model_config.encoder,
                       encoder_weights=model_config.encoder_weights or None,
                       encoder_trainable=model_config.encoder_trainable,
                       image_size=model_config.image_size or None, units=model_config.units,
                       embed_dim=model_config.embed_dim, dropout=model_config.dropout,
                       feature_norm=model_config.get("feature_norm", "batch"), use_cudnn=use_cudnn).build_all()
