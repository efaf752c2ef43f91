"""Greedy captions for a few held-out images, printed beside their references."""

from __future__ import annotations

import tensorflow as tf

from showtell_dist.data import pipeline
from showtell_dist.data.records import parse_example, parse_features_example
from showtell_dist.data.tokenizer import Tokenizer
from showtell_dist.decoding.decoder import build_decoder
from showtell_dist.decoding.options import GREEDY


def sample_captions(model, tokenizer: Tokenizer, manifest: dict, spec: pipeline.PipelineSpec,
                    num_examples: int) -> list[dict]:
    """The first num_examples images of spec.split: id, greedy caption, references."""
    files = pipeline.shard_files(manifest, spec)
    dim = pipeline.feature_dim(manifest)
    if dim is None:
        examples = list(tf.data.TFRecordDataset(files).take(num_examples).map(parse_example))
        inputs = tf.stack([pipeline.decode_image(e["jpeg"], spec.image_size) for e in examples])  # [n, size, size, 3]
    else:  # a features cache: the encoder's features of each image, [n, dim]
        examples = list(tf.data.TFRecordDataset(files).take(num_examples)
                        .map(lambda s: parse_features_example(s, dim)))
        inputs = tf.stack([e["features"] for e in examples])

    decode = tf.function(build_decoder([model], GREEDY, tokenizer, from_features=dim is not None))
    tokens = decode(inputs).tokens[:, 0]  # [n, time]
    return [{"image_id": e["image_id"].numpy().decode(), "caption": tokenizer.decode(t),
             "references": [r.decode() for r in e["caption_text"].numpy()]}
            for e, t in zip(examples, tokens.numpy())]


def format_samples(samples: list[dict]) -> str:
    lines = []
    for s in samples:
        lines.append(f"{s['image_id']}\n  predicted: {s['caption']}")
        lines.extend(f"  reference: {r}" for r in s["references"])
    return "\n".join(lines)
