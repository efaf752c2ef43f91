"""How captions are decoded: one frozen `DecodeOptions`, validated once when it is made.

    options = DecodeOptions.from_config(run_config)                  # the run's `eval` section
    options = DecodeOptions.from_config(run_config, beam_width=5)     # a flag overrides it (None: not given)
    decode = build_decoder(members, options, tokenizer)               # decoding/decoder.py

Evaluation, captioning, export, the TensorBoard and held-out samples, checkpoint selection and the
self-critical greedy baseline all decode through `build_decoder` with such an object, so a decoding
option is defined here, applied in beam_search.py, and named nowhere else. To add a decoding
constraint: add a field and its rule below (the config field `eval.<name>` and its validation follow)
and apply it in `beam_search._constrain`, then pass it on in decoder.py.

This module imports no TensorFlow: config validation (config_validation.py) reads the rules below. The
rules are config_fields.py's kinds, the length normalisations its choices.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from showtell_dist.config_fields import LENGTH_NORMALIZATIONS, POSITIVE_INT, Bool, Choice, Field, Float
from showtell_dist.errors import ConfigError

CONFIG_SECTION = "eval"  # the config section whose fields of the same names set the options

# The single rule of each option.
_RULES: dict[str, Field] = {
    "beam_width": POSITIVE_INT,
    "length_normalization": Choice(LENGTH_NORMALIZATIONS),
    "alpha": Float(min=0),
    "remove_bad_endings": Bool(),
    "block_trigrams": Bool(),
    "max_new_tokens": Field(object, "None (the vocabulary's longest caption) or an integer >= 1",
                            lambda v: v is None or POSITIVE_INT.problem(v) is None),
}


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings; every instance is valid (checked in __post_init__).

    beam_width: hypotheses kept per image; 1 is greedy decoding.
    length_normalization, alpha: how hypotheses are ranked ("none", "average" or "gnmt" with exponent
      alpha; see beam_search.length_penalty).
    remove_bad_endings: no caption ends on a function word (beam_search.BAD_ENDINGS).
    block_trigrams: no caption repeats a trigram.
    max_new_tokens: tokens generated at most, <end> included; None: the vocabulary's max_len - 1
      (the longest training caption without <start>). Not a config field: export's --max_len sets it.
    """

    beam_width: int = 3
    length_normalization: str = "average"
    alpha: float = 0.6
    remove_bad_endings: bool = False
    block_trigrams: bool = False
    max_new_tokens: int | None = None

    def __post_init__(self):
        found = problems(dataclasses.asdict(self))
        if found:
            raise ConfigError("invalid decoding options: " + "; ".join(found) + ". Fix the flag, or the run's "
                              f"{CONFIG_SECTION}.* setting it defaults to.")

    @classmethod
    def from_config(cls, config, **overrides) -> "DecodeOptions":
        """The options of a run's config (its `eval` section; older runs without one get the defaults),
        each replaced by its override unless that is None (a flag not given)."""
        section = config.get(CONFIG_SECTION, None) or {}
        values = {name: section[name] for name in CONFIG_KEYS if name in section}
        values.update({name: value for name, value in overrides.items() if value is not None})
        unknown = sorted(set(values) - set(_RULES))
        if unknown:
            raise ConfigError(f"unknown decoding option(s) {', '.join(unknown)}; the options are {', '.join(_RULES)}.")
        return cls(**values)

    def replace(self, **changes) -> "DecodeOptions":
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict:
        """The options a run's config holds, by name (as metrics.json records them)."""
        return {name: getattr(self, name) for name in CONFIG_KEYS}


def rule(name: str) -> Field:
    """The rule of option `name`, for config validation."""
    return _RULES[name]


def problems(values: Mapping, prefix: str = "") -> list[str]:
    """One message per bad option of `values` (name -> value), e.g. "eval.beam_width = 0: must be ...";
    names prefixed with `prefix`."""
    out = []
    for name, value in values.items():
        problem = _RULES[name].problem(value)
        if problem:
            out.append(f"{prefix}{name} = {value!r}: {problem}")
    return out


# The options a config's `eval` section may set (all but max_new_tokens).
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(DecodeOptions) if f.name != "max_new_tokens")
# Plain greedy decoding, without constraints: the held-out and TensorBoard greedy captions, the
# self-critical baseline.
GREEDY = DecodeOptions(beam_width=1)
