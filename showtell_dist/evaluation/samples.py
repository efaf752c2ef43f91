"""Greedy captions for a few held-out images, printed beside their references."""

from __future__ import annotations

import tensorflow as tf

from showtell_dist.data import dataset_dir, pipeline
from showtell_dist.data.tokenizer import END_ID, START_ID, UNK_ID, Tokenizer
from showtell_dist.decoding.beam_search import greedy_decode


def sample_captions(model, tokenizer: Tokenizer, manifest: dict, spec: pipeline.PipelineSpec,
                    num_examples: int) -> list[dict]:
    """The first num_examples images of spec.split: id, greedy caption, references."""
    examples = dataset_dir.first_examples(spec.data_dir, manifest, spec.split, num_examples)
    dim = pipeline.feature_dim(manifest)
    if dim is None:
        inputs = tf.stack([pipeline.decode_image(e["jpeg"], spec.image_size) for e in examples])  # [n, size, size, 3]
    else:  # a features cache: the encoder's features of each image, [n, dim]
        inputs = tf.stack([e["features"] for e in examples])

    @tf.function
    def caption(inputs):
        features = inputs if dim is not None else model.encode(inputs)
        state = model.initial_state(features)
        return greedy_decode(model.decode_step, state, max_len=spec.max_len - 1, start_id=START_ID,
                             end_id=END_ID, forbidden_ids=(UNK_ID,))

    tokens, _ = caption(inputs)
    return [{"image_id": e["image_id"].numpy().decode(), "caption": tokenizer.decode(t),
             "references": [r.decode() for r in e["caption_text"].numpy()]}
            for e, t in zip(examples, tokens.numpy())]


def format_samples(samples: list[dict]) -> str:
    lines = []
    for s in samples:
        lines.append(f"{s['image_id']}\n  predicted: {s['caption']}")
        lines.extend(f"  reference: {r}" for r in s["references"])
    return "\n".join(lines)
