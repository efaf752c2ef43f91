"""Exports a trained captioner as a SavedModel that captions encoded images.

    export_saved_model([load_trained_model("runs/f8k")], "runs/f8k/export", DecodeOptions(beam_width=3))

    # in any process that has TensorFlow (no showtell_dist, no tensorflow_text):
    captioner = tf.saved_model.load("runs/f8k/export")
    out = captioner.signatures["serving_default"](images=tf.constant([jpeg_bytes, png_bytes]))
    out["captions"]  # tf.string [n, beam_width], best first
    out["scores"]    # float32  [n, beam_width], length-normalised log-probabilities, descending

Everything runs inside the serving graph: image decoding (JPEG, PNG, GIF's
first frame, BMP) and resizing as in training, the encoder, beam search (one
`tf.while_loop`, decoding/decoder.py's `build_decoder` as everywhere) and detokenisation (a `tf.gather` over the vocabulary, kept
as a graph constant, then `tf.strings.reduce_join` over a ragged tensor).
The export needs only core TensorFlow ops, so the loader imports nothing but
`tensorflow`. It loads with `tf.saved_model.load` and with the session-based
loader of TF Serving and `saved_model_cli run` (see `track_captured_variables`).
The vocabulary is also written to `assets/vocab.json`.

Decoding follows `Tokenizer.decode`: tokens after the first end token are
dropped, so are the padding and start ids; the start and unknown tokens are
never generated (they are forbidden in beam search). A row of `captions` that
beam search could not fill (fewer than beam_width distinct captions exist) is
the empty string with score -inf.

A bad image in the batch (bytes that are not an image) makes the whole call
fail with TensorFlow's `InvalidArgumentError` (e.g. "Unknown image file
format"); callers that take untrusted bytes should validate them first or
caption one image per call.
"""

from __future__ import annotations

import os
import tempfile

import tensorflow as tf

from showtell_dist.data.tokenizer import END_ID, PAD_ID, START_ID
from showtell_dist.decoding.decoder import Decoder, build_decoder
from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.errors import ConfigError
from showtell_dist.run.restore import TrainedModel, check_same_vocabulary

SIGNATURE_KEY = "serving_default"
INPUT_KEY = "images"


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image bytes (JPEG, PNG, GIF, BMP) -> [image_size, image_size, 3] float32 in 0..255.

    The same resize as `pipeline.decode_image` (bilinear with antialiasing,
    clipped to 0..255), so a JPEG is fed to the encoder as in training.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)  # [h, w, 3] uint8
    image = tf.image.resize(image, [image_size, image_size], antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def _detokenize(words: tf.Tensor, tokens: tf.Tensor) -> tf.Tensor:
    """tokens [batch, beam, time] int32 -> captions [batch, beam] tf.string (words joined by spaces)."""
    shape = tf.shape(tokens)
    flat = tf.reshape(tokens, [-1, shape[2]])  # [batch * beam, time]
    is_end = tf.equal(flat, END_ID)
    before_end = tf.equal(tf.cumsum(tf.cast(is_end, tf.int32), axis=1), 0)  # [batch * beam, time]
    keep = before_end & tf.not_equal(flat, PAD_ID) & tf.not_equal(flat, START_ID)
    # Ids outside the vocabulary cannot come out of the logits layer; clip anyway for a safe gather.
    ids = tf.clip_by_value(flat, 0, tf.shape(words)[0] - 1)
    kept = tf.ragged.boolean_mask(tf.gather(words, ids), keep)  # [batch * beam, (words)]
    joined = tf.strings.reduce_join(kept, axis=1, separator=" ")  # [batch * beam]
    return tf.reshape(joined, shape[:2])  # [batch, beam]


class CaptionModule(tf.Module):
    """The exported object: the members' variables, the vocabulary and the serving function."""

    def __init__(self, decoder: Decoder, words: list[str]):
        super().__init__(name="captioner")
        self.model = decoder.members[0]
        self.ensemble = decoder.members[1:]  # further models whose log-probs are averaged with model's at every step
        self.decoder = decoder
        self.image_size = int(self.model.image_size)
        self.beam_width = decoder.options.beam_width
        self._words = tf.constant(words, tf.string)  # [vocab]
        # Plain attributes for the loader (restored as tf.Variables, read with .numpy()).
        self.words = tf.Variable(self._words, trainable=False, name="words")
        self.config = {"beam_width": tf.Variable(self.beam_width, trainable=False, name="beam_width"),
                       "max_len": tf.Variable(decoder.max_new_tokens, trainable=False, name="max_len"),
                       "image_size": tf.Variable(self.image_size, trainable=False, name="image_size")}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_KEY)])
    def serve(self, images):
        """images: tf.string [n] encoded images -> {"captions": [n, K] tf.string, "scores": [n, K] float32}."""
        pixels = tf.map_fn(lambda b: decode_and_resize(b, self.image_size), images,
                           fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32))
        result = self.caption_pixels(pixels)
        captions = tf.ensure_shape(_detokenize(self._words, result.tokens), [None, self.beam_width])
        scores = tf.ensure_shape(result.scores, [None, self.beam_width])
        return {"captions": captions, "scores": scores}

    def caption_pixels(self, pixels: tf.Tensor):
        """[n, size, size, 3] float 0..255 -> BeamSearchResult (the same search the signature runs)."""
        return self.decoder(pixels)


def build_caption_module(members, options: DecodeOptions = DecodeOptions()) -> CaptionModule:
    """The module `export_saved_model` saves (also usable in-process); `members` is a list of TrainedModels
    (several: an ensemble)."""
    if isinstance(members, TrainedModel) or not isinstance(members, (list, tuple)) or not members:
        raise ConfigError("pass a non-empty list of TrainedModels (one model is a list of one).")
    check_same_vocabulary(members)
    tokenizer = members[0].tokenizer
    return CaptionModule(build_decoder([m.model for m in members], options, tokenizer), list(tokenizer.words))


def export_saved_model(members, export_dir: str, options: DecodeOptions = DecodeOptions()) -> None:
    """Writes a SavedModel of `members` (a list of `TrainedModel`s; several: an ensemble) to `export_dir`.

    Signature "serving_default": images tf.string [None] (encoded JPEG/PNG
    bytes) -> captions tf.string [None, beam_width] (best first) and scores
    float32 [None, beam_width] (descending).

    Args:
      members: from `showtell_dist.run.restore.load_trained_model` / `load_ensemble`.
      export_dir: output directory; an existing SavedModel there is overwritten.
      options: how to decode, baked into the graph: beam_width (captions per image), max_new_tokens
        (default the tokenizer's max_len - 1, the longest training caption), length normalisation and
        the constraints (see decoding/options.py).
    """
    module = build_caption_module(members, options)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path = os.path.join(tmp, "vocab.json")
        members[0].tokenizer.save(vocab_path)  # the members share it
        module.vocab_file = tf.saved_model.Asset(vocab_path)
        try:
            tf.io.gfile.makedirs(export_dir)
        except tf.errors.OpError as exc:
            raise ConfigError(f"cannot create export directory {export_dir}: {exc.message}") from exc
        signature = module.serve.get_concrete_function()
        track_captured_variables(module, signature)
        tf.saved_model.save(module, export_dir, signatures={SIGNATURE_KEY: signature})


def track_captured_variables(module: tf.Module, signature) -> None:
    """Makes the `tf.Variable`s the signature reads direct children of `module`, as Keras'
    `ExportArchive` does, so that the session-based loader (TF Serving, `saved_model_cli run`,
    `tf.compat.v1.saved_model.loader.load`) restores them.

    A Keras 3 variable wraps a `tf.Variable`. Reached only through the Keras model, it is
    saved as a *copy* of that variable (`keras.Variable._export_to_saved_model_graph`), so
    the MetaGraph's restore op fills the copy while the graph reads the original, which a
    session then finds uninitialised ("Could not find variable ..."). Tracked directly, the
    original variable gets its own entry in the restore op. `tf.saved_model.load` works
    either way.
    """
    module.serving_variables = list(signature.variables)
