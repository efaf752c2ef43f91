"""The Show and Tell captioner: CNN features -> initial LSTM state -> words.

    features = encoder(images)                        # [batch, feature_dim]
    h0 = dropout(tanh(Dense(features))), c0 = 0       # [batch, units]
    logits = Dense(dropout(LSTM(embed(tokens), (h0, c0))))

Training calls `encode` once per image and `decode_sequence` on all captions
of those images (the state is repeated per caption). Decoding calls
`decode_step`, one token for every row, carrying (h, c): no prefix is re-run.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from showtell_dist.errors import ConfigError
from showtell_dist.model.encoders import build_encoder


FEATURE_NORMS = ("batch", "layer", "none")


class ShowAndTell(keras.Model):
    def __init__(self, *, vocab_size: int, encoder: str = "small_cnn", encoder_weights: str | None = None,
                 encoder_trainable: bool = True, image_size: int | None = None, units: int = 512,
                 embed_dim: int = 512, dropout: float = 0.3, feature_norm: str = "batch", **kwargs):
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
        self.init_dropout = keras.layers.Dropout(dropout)
        self.embedding = keras.layers.Embedding(vocab_size, embed_dim, name="embedding")
        self.lstm = keras.layers.LSTM(units, return_sequences=True, name="lstm")
        self.out_dropout = keras.layers.Dropout(dropout)
        # Logits in float32 even under a mixed-precision policy, for a stable loss.
        mixed = keras.mixed_precision.global_policy().compute_dtype in ("float16", "bfloat16")
        self.logits = keras.layers.Dense(vocab_size, name="logits", dtype="float32" if mixed else None)

    def build_all(self) -> "ShowAndTell":
        """Creates every variable (before an optimizer or checkpoint needs them)."""
        images = tf.zeros([1, self.image_size, self.image_size, 3])
        state = self.initial_state(self.encode(images))
        self.decode_sequence(state, tf.zeros([1, 2], tf.int32))
        return self

    def rng_state_variables(self) -> list:
        """Dropout's random-generator states: Keras does not expose them to tf.train.Checkpoint
        through the model, so they are checkpointed explicitly for an exact resume."""
        return [v for v in self.variables if v.path.endswith("seed_generator_state")]

    def encode(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        """[batch, H, W, 3] 0..255 -> [batch, feature_dim]."""
        # A frozen encoder always runs in inference mode (batch-norm statistics fixed).
        return self.encoder(images, training=training and self.encoder_trainable)

    def batch_features(self, batch: dict, training: bool = False) -> tf.Tensor:
        """The encoder features of an input batch: its cached `features` when it has them (an input
        pipeline over a features cache: the encoder is skipped), else `encode(batch["images"])`."""
        if "features" in batch:
            return batch["features"]
        return self.encode(batch["images"], training=training)

    def initial_state(self, features: tf.Tensor, training: bool = False, repeats: int = 1):
        """[batch, feature_dim] -> (h, c), each [batch * repeats, units]."""
        if self.feature_norm is not None:
            features = self.feature_norm(features, training=training)
        h = self.init_dense(features)
        if repeats > 1:
            h = tf.repeat(h, repeats, axis=0)
        h = self.init_dropout(h, training=training)
        return h, tf.zeros_like(h)

    def decode_sequence(self, state, tokens: tf.Tensor, training: bool = False, positions=None) -> tf.Tensor:
        """Teacher forcing: tokens [rows, time] -> logits [rows, time, vocab] float32.

        With positions ([n, 2] (row, time) indices) the logits are computed only
        there -> [n, vocab]: the output projection dominates a step at a large
        vocabulary, and most positions of a padded batch are padding.
        """
        x = self.embedding(tokens)
        x = self.lstm(x, initial_state=list(state), training=training)  # [rows, time, units]
        if positions is not None:
            x = tf.gather_nd(x, positions)  # [n, units]
        return self.logits(self.out_dropout(x, training=training))

    def decode_step(self, tokens: tf.Tensor, state, training: bool = False):
        """One step for every row: tokens [rows], (h, c) -> logits [rows, vocab], (h, c).
        training=True applies the output dropout (self-critical sampling may use it)."""
        x = self.embedding(tokens)
        h, (h, c) = self.lstm.cell(x, list(state), training=training)
        return self.logits(self.out_dropout(h, training=training)), (h, c)

    def call(self, inputs, training=False):
        """(images [batch, H, W, 3], tokens [batch, time]) -> logits [batch, time, vocab]."""
        images, tokens = inputs
        return self.decode_sequence(self.initial_state(self.encode(images, training), training),
                                    tokens, training)


def build_model(model_config, vocab_size: int) -> ShowAndTell:
    """Builds a ShowAndTell from the `model` part of an experiment config."""
    return ShowAndTell(vocab_size=vocab_size, encoder=model_config.encoder,
                       encoder_weights=model_config.encoder_weights or None,
                       encoder_trainable=model_config.encoder_trainable,
                       image_size=model_config.image_size or None, units=model_config.units,
                       embed_dim=model_config.embed_dim, dropout=model_config.dropout,
                       feature_norm=model_config.get("feature_norm", "batch")).build_all()
