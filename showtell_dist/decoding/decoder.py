"""The one way captions are decoded: members (one model, or an ensemble) and `DecodeOptions` -> a function.

    decode = build_decoder([model], options, tokenizer)                      # images [batch, H, W, 3] 0..255
    result = decode(images)                                                  # BeamSearchResult, best first
    decode = build_decoder([a, b], options, tokenizer, from_features=True)  # a features cache's [batch, dim]

Each input is encoded once by each member (unless it is already the encoder's features), the members'
LSTM states start the search, and `beam_search` runs over their averaged log-probabilities
(ensemble.py; one member decodes as the model alone). <unk> and <start> are never generated. A member is
anything with the caption model's `encode`, `initial_state`, `decode_step`, `image_size` and `logits`
(model/show_and_tell.py). The returned `Decoder` is plain TensorFlow, for use inside a `tf.function`,
`strategy.run` or an exported SavedModel.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from showtell_dist.data.tokenizer import END_ID, START_ID, UNK_ID
from showtell_dist.decoding.beam_search import BeamSearchResult, bad_ending_ids_of, beam_search
from showtell_dist.decoding.ensemble import ensemble_step
from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.errors import ConfigError

FORBIDDEN_IDS = (UNK_ID, START_ID)  # never generated


class Decoder:
    """inputs -> BeamSearchResult (tokens [batch, K, max_new_tokens], scores [batch, K], ...)."""

    def __init__(self, members: list, options: DecodeOptions, vocab_size: int, max_new_tokens: int,
                 bad_ending_ids: tuple, from_features: bool):
        self.members, self.options = members, options
        self.vocab_size, self.max_new_tokens = vocab_size, max_new_tokens
        self.bad_ending_ids, self.from_features = bad_ending_ids, from_features

    def __call__(self, inputs: tf.Tensor) -> BeamSearchResult:
        states = [m.initial_state(inputs if self.from_features else m.encode(inputs, training=False),
                                  training=False) for m in self.members]
        step, state = ensemble_step([m.decode_step for m in self.members], states)
        o = self.options
        return beam_search(step, state, beam_width=o.beam_width, max_len=self.max_new_tokens, start_id=START_ID,
                           end_id=END_ID, vocab_size=self.vocab_size, forbidden_ids=FORBIDDEN_IDS,
                           length_normalization=o.length_normalization, alpha=float(o.alpha),
                           bad_ending_ids=self.bad_ending_ids, block_trigrams=o.block_trigrams)


def build_decoder(members: Sequence, options: DecodeOptions, tokenizer=None, *,
                  from_features: bool = False) -> Decoder:
    """The decoder of `members` (a list of caption models; one model is a list of one) with `options`.

    tokenizer: the members' vocabulary; its words give the bad endings (options.remove_bad_endings) and its
      max_len the default number of new tokens (max_len - 1: the longest caption without <start>). Without
      one, options.max_new_tokens must be set and remove_bad_endings off.
    from_features: the decoder takes the encoder's features [batch, dim] (a features cache) instead of
      images; the members then need not share an image size.
    """
    if not isinstance(members, (list, tuple)) or not members:
        raise ConfigError(f"members must be a non-empty list of models (one model is a list of one), got "
                          f"{type(members).__name__}.")
    if not isinstance(options, DecodeOptions):
        raise ConfigError(f"options must be a DecodeOptions, got {type(options).__name__}.")
    members = list(members)
    sizes = sorted({int(m.image_size) for m in members})
    if not from_features and len(sizes) > 1:
        raise ConfigError(f"the ensemble's models see images of different sizes ({sizes}); ensemble models of one "
                          "image size.")
    classes = sorted({int(m.logits.units) for m in members})
    if len(classes) > 1 or (tokenizer is not None and classes[0] != tokenizer.vocab_size):
        vocabulary = f"its vocabulary has {tokenizer.vocab_size} words" if tokenizer is not None else "one vocabulary"
        raise ConfigError(f"the models have {classes} output classes but {vocabulary}: the model_dir's vocab.json "
                          "does not belong to its checkpoint; restore both from the same training run.")
    if tokenizer is None and (options.max_new_tokens is None or options.remove_bad_endings):
        raise ConfigError("decoding without the vocabulary needs options.max_new_tokens and no remove_bad_endings; "
                          "pass the tokenizer.")
    max_new_tokens = options.max_new_tokens or tokenizer.max_len - 1
    bad_endings = bad_ending_ids_of(tokenizer.words) if options.remove_bad_endings else ()
    return Decoder(members, options, classes[0], max_new_tokens, bad_endings, from_features)
