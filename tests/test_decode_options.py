"""DecodeOptions: built from a run's eval section and flags, validated once; the one decoder builder's checks."""

import dataclasses

import ml_collections
import pytest

from showtell_dist import config_validation
from showtell_dist.decoding.options import CONFIG_KEYS, GREEDY, DecodeOptions
from showtell_dist.errors import ConfigError


def _config(**eval_section):
    return ml_collections.ConfigDict({"eval": eval_section})


def test_from_config_takes_the_eval_section_then_the_given_flags():
    config = _config(beam_width=4, length_normalization="gnmt", alpha=0.7, block_trigrams=True, select_metric="")
    options = DecodeOptions.from_config(config, beam_width=None, alpha=1.0)  # None: the flag was not given
    assert options == DecodeOptions(beam_width=4, length_normalization="gnmt", alpha=1.0, block_trigrams=True)
    assert DecodeOptions.from_config(ml_collections.ConfigDict({})) == DecodeOptions()  # a run without eval
    assert DecodeOptions.from_config(config, max_new_tokens=7).max_new_tokens == 7
    assert GREEDY.beam_width == 1 and not GREEDY.remove_bad_endings and not GREEDY.block_trigrams


def test_every_bad_option_is_named_with_what_it_must_be():
    with pytest.raises(ConfigError) as info:
        DecodeOptions.from_config(_config(beam_width=0), length_normalization="sum", max_new_tokens=-1)
    message = str(info.value)
    for expected in ("beam_width = 0: must be an integer >= 1", "length_normalization = 'sum': must be one of",
                     "max_new_tokens = -1: must be None"):
        assert expected in message
    with pytest.raises(ConfigError, match="unknown decoding option"):
        DecodeOptions.from_config(_config(), beam=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DecodeOptions().beam_width = 2


def test_config_validation_applies_the_options_own_rules():
    assert {f"eval.{name}" for name in CONFIG_KEYS} <= set(config_validation.FIELDS)
    problems = config_validation.config_problems({"eval": {"alpha": -1, "remove_bad_endings": "no"}})
    assert problems == ["eval.alpha = -1: must be a number >= 0", "eval.remove_bad_endings = 'no': must be True or False"]


def test_the_builder_checks_members_once():
    import tensorflow as tf

    from showtell_dist.decoding.decoder import build_decoder

    class Member:  # the caption model's interface, as far as the builder's checks read it
        def __init__(self, image_size, classes):
            self.image_size, self.logits = image_size, tf.keras.layers.Dense(classes)

    class Vocabulary:
        words, vocab_size, max_len = ["<pad>", "<start>", "<end>", "<unk>", "a"], 5, 6

    with pytest.raises(ConfigError, match="list of models"):
        build_decoder(Member(32, 5), DecodeOptions(), Vocabulary())
    with pytest.raises(ConfigError, match="different sizes"):
        build_decoder([Member(32, 5), Member(64, 5)], DecodeOptions(), Vocabulary())
    assert build_decoder([Member(32, 5), Member(64, 5)], DecodeOptions(), Vocabulary(), from_features=True)
    with pytest.raises(ConfigError, match="vocab.json does not belong"):
        build_decoder([Member(32, 7)], DecodeOptions(), Vocabulary())
    with pytest.raises(ConfigError, match="pass the tokenizer"):
        build_decoder([Member(32, 5)], DecodeOptions())
    decoder = build_decoder([Member(32, 5)], DecodeOptions(remove_bad_endings=True), Vocabulary())
    assert decoder.max_new_tokens == 5 and decoder.bad_ending_ids == (4,)
    assert build_decoder([Member(32, 5)], GREEDY.replace(max_new_tokens=3)).max_new_tokens == 3
