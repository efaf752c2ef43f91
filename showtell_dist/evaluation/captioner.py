"""Captions image files (local or gs://, paths or globs) with a trained model.

    members = [load_trained_model(model_dir)]     # several: an ensemble
    results, errors = caption_files(members, ["photo.jpg", "shots/*.png"], DecodeOptions(beam_width=3), top_k=2)

Each file is read and converted to RGB JPEG by `images.load_image_as_jpeg`
(any format Pillow reads), resized by `pipeline.decode_image` exactly as in
training, and the images are beam-searched in batches by one compiled
function. A file that cannot be used (missing, not an image, corrupt, ...)
becomes an entry of `errors`; the others are still captioned.
"""

from __future__ import annotations

import glob as _glob
from typing import Iterable, Sequence

import tensorflow as tf

from showtell_dist.data import pipeline
from showtell_dist.data.images import load_image_as_jpeg
from showtell_dist.decoding.decoder import build_decoder
from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.errors import ConfigError, DataError
from showtell_dist.evaluation.evaluator import detokenize, members_of
from showtell_dist.run.restore import TrainedModel


def expand_paths(paths: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Paths with globs expanded (sorted, duplicates dropped); a glob matching nothing is an error."""
    out, errors, seen = [], [], set()
    for p in paths:
        if _glob.has_magic(p):
            matches = sorted(tf.io.gfile.glob(p))
            if not matches:
                errors.append((p, f"{p}: no file matches this pattern. Check the pattern and quote it "
                                  "so the shell does not expand it."))
        else:
            matches = [p]
        for m in matches:
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out, errors


def caption_files(members: Sequence[TrainedModel], paths: Iterable[str], options: DecodeOptions = DecodeOptions(),
                  top_k: int = 1, *, batch_size: int = 16) -> tuple[list[dict], list[tuple[str, str]]]:
    """Captions every image of `paths` (files or glob patterns) with the members (a list of TrainedModels;
    several: an ensemble).

    Returns:
      results: [{"path", "caption", "score", "top_k": [(caption, score)] (at
        most top_k, best first)}] in the order of the paths;
      errors: [(path, message)] for patterns matching nothing and files that
        are not usable images; each message names the file and the fix.
    """
    members = members_of(members)
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    if top_k > options.beam_width:
        raise ConfigError(f"top_k={top_k} exceeds beam_width={options.beam_width}: beam search keeps only beam_width "
                          f"captions per image; raise --beam_width to at least {top_k}.")
    decoder = build_decoder([m.model for m in members], options, members[0].tokenizer)
    files, errors = expand_paths(paths)
    size = members[0].model.image_size

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def decode(images):
        result = decoder(images)
        return result.tokens, result.scores

    images, loaded = [], []
    for path in files:
        try:
            jpeg, _, _ = load_image_as_jpeg(path)
            images.append(pipeline.decode_image(tf.constant(jpeg), size))  # [size, size, 3]
            loaded.append(path)
        except DataError as exc:
            errors.append((path, str(exc)))
        except tf.errors.InvalidArgumentError as exc:  # decodable by Pillow but not by TF
            errors.append((path, f"{path}: TensorFlow cannot decode the converted JPEG ({exc.message})."))
    results = []
    for start in range(0, len(images), batch_size):
        tokens, scores = decode(tf.stack(images[start:start + batch_size]))
        for path, d in zip(loaded[start:start + batch_size],
                           detokenize(members[0].tokenizer, tokens.numpy(), scores.numpy())):
            results.append({"path": path, "caption": d["caption"], "score": d["score"], "top_k": d["top_k"][:top_k]})
    return results, errors
