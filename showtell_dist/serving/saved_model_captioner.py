"""Captions encoded images with an exported SavedModel; imports TensorFlow, nothing of the toolkit's training.

    captioner = SavedModelCaptioner.load("runs/demo/export")
    results = captioner.caption([jpeg_bytes, png_bytes])  # one ImageCaptions or ImageDecodeError per image

One call of the export's batched `serving_default` signature captions the
whole list. That signature fails as a whole when one image in the batch
cannot be decoded, so a failed batch is captioned again image by image: the
good images get their captions and only the bad one its error.
"""

from __future__ import annotations

import dataclasses
import math
import os

import tensorflow as tf

from showtell_dist.errors import UserError

SIGNATURE_KEY = "serving_default"
INPUT_KEY = "images"


@dataclasses.dataclass(frozen=True)
class ImageCaptions:
    """An image's captions, best first, with their scores (length-normalised log-probabilities)."""

    captions: list[str]
    scores: list[float]


@dataclasses.dataclass(frozen=True)
class ImageDecodeError:
    """TensorFlow could not decode the image (its header looked fine, its data did not)."""

    message: str


class SavedModelCaptioner:
    """The export's serving signature and what it says about itself (beam width, image size)."""

    def __init__(self, signature, *, export_dir: str, beam_width: int, image_size: int | None,
                 max_len: int | None):
        self._signature = signature
        self.export_dir = export_dir
        self.beam_width = beam_width
        self.image_size = image_size
        self.max_len = max_len

    @classmethod
    def load(cls, export_dir: str) -> "SavedModelCaptioner":
        if not tf.io.gfile.exists(os.path.join(export_dir, "saved_model.pb")):
            raise UserError(f"no SavedModel in {export_dir} (saved_model.pb is missing): write one with "
                            f"`python launch/export.py --model_dir=MODEL_DIR --export_dir={export_dir}`.")
        loaded = tf.saved_model.load(export_dir)
        signatures = getattr(loaded, "signatures", {})
        if SIGNATURE_KEY not in signatures:
            raise UserError(f"the SavedModel in {export_dir} has no {SIGNATURE_KEY!r} signature (it has "
                            f"{sorted(signatures)}): export it with launch/export.py.")
        signature = signatures[SIGNATURE_KEY]
        outputs = signature.structured_outputs
        inputs = signature.structured_input_signature[1]
        if set(inputs) != {INPUT_KEY} or not {"captions", "scores"} <= set(outputs):
            raise UserError(f"the {SIGNATURE_KEY!r} signature of {export_dir} takes {sorted(inputs)} and returns "
                            f"{sorted(outputs)}, not images -> captions and scores: it is not a captioner "
                            "exported by launch/export.py.")
        config = getattr(loaded, "config", {})

        def setting(name):
            return int(config[name].numpy()) if name in config else None

        beam_width = outputs["captions"].shape[1] or setting("beam_width")
        # The loaded object must stay alive as long as its signature is used.
        captioner = cls(signature, export_dir=export_dir, beam_width=int(beam_width),
                        image_size=setting("image_size"), max_len=setting("max_len"))
        captioner._loaded = loaded
        return captioner

    def caption(self, images: list[bytes]) -> list[ImageCaptions | ImageDecodeError]:
        """One signature call for all `images`; image by image only if that call fails on bad image data."""
        if not images:
            return []
        try:
            return self._caption_batch(images)
        except tf.errors.InvalidArgumentError:
            if len(images) == 1:
                return [self._caption_one(images[0])]
            return [self._caption_one(image) for image in images]

    def _caption_one(self, image: bytes) -> ImageCaptions | ImageDecodeError:
        try:
            return self._caption_batch([image])[0]
        except tf.errors.InvalidArgumentError as exc:
            return ImageDecodeError(_cause(exc.message))

    def _caption_batch(self, images: list[bytes]) -> list[ImageCaptions]:
        out = self._signature(**{INPUT_KEY: tf.constant(images, tf.string)})
        captions = out["captions"].numpy()  # [n, beam_width] bytes, best first
        scores = out["scores"].numpy()  # [n, beam_width] float32, descending
        results = []
        for row_captions, row_scores in zip(captions, scores):
            # Rows beam search could not fill are empty with score -inf: not captions.
            kept = [(c.decode("utf-8"), float(s)) for c, s in zip(row_captions, row_scores)
                    if c and math.isfinite(s)]
            results.append(ImageCaptions([c for c, _ in kept], [s for _, s in kept]))
        return results


def _cause(message: str) -> str:
    """The line of a graph execution error that says what went wrong (e.g. "Invalid JPEG data ...")."""
    for line in message.splitlines():
        line = line.strip()
        if line and not line.startswith(("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")):
            return line
    return message.strip()
