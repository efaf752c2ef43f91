"""spaCy-based caption tokenizer with a JSON vocabulary.

Words are spaCy tokens, lower-cased, with punctuation and whitespace dropped.
spaCy's tokenizer is adjusted (`ptb_compatible`) to split words where the
Stanford PTB tokenizer of the caption metrics does, so that every word the
metrics compare is one the model can write: hyphenated words stay whole
("t-shirt", "black-and-white"), as do "a/b", "5km" and "id" or "wed";
contractions split as in the Penn Treebank ("do n't", "dog 's", "can not").
The rules' version (`TOKENIZER_RULES`) is stored in vocab.json: a vocabulary
made by other rules is refused for encoding and training (prepare again).
benchmarks/tokenizer_agreement.py measures the agreement on Flickr8k.

The vocabulary is fitted on training captions only. Ids:

    0 <pad>   padding, never generated
    1 <start> first input token of every caption
    2 <end>   last target token of every caption
    3 <unk>   any word outside the vocabulary
    4...      words by decreasing training count (ties alphabetical)

`max_len` is the encoded length (every word plus <start> and <end>) that
covers 99.9% of the training captions (`DEFAULT_MAX_LEN_QUANTILE`), so that a
few run-on captions do not pad every batch to their length; a configured
max_len replaces it (capped at the longest training caption). Longer captions
are cut to `max_len - 1` tokens and closed with <end>; prepare counts them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import re
from typing import Iterable, Sequence

from showtell_dist.errors import ConfigError, DataError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

# The default max_len covers this fraction of the training captions' lengths.
DEFAULT_MAX_LEN_QUANTILE = 0.999

_FORMAT = "showtell_dist.vocabulary"
_FORMAT_VERSION = 1

# Version of the word-splitting rules. Bump it whenever a change to `ptb_compatible` or
# `_is_dropped` may split a caption differently: vocabularies of other rules are then refused.
TOKENIZER_RULES = "ptb-1"
# What a vocab.json without a "tokenizer_rules" entry was made with: plain spacy.blank("en"),
# which split hyphenated words ("t-shirt" -> "t", "shirt").
LEGACY_RULES = "spacy-default"

# Tokens made only of these characters are punctuation and dropped: what pycocoevalcap's PTB
# tokenizer drops (its PUNCTUATIONS, in the raw characters they come from), plus brackets (the
# metric means to drop them too, but its list has -LRB- while the lower-cased tokens are -lrb-).
_PUNCTUATION_CHARS = frozenset(".,;:!?'\"`-()[]{}\u2018\u2019\u201c\u201d\u2013\u2014\u2026")
# Words PTB splits although no apostrophe or period marks them.
_PTB_SPLITS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
               "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
# Words PTB keeps whole that spaCy's defaults split or cut.
_PTB_WHOLE = ("'n'", "c'mon", "c\u2019mon")
# spaCy exceptions (with a period or apostrophe) that PTB splits differently; found by probing
# every exception with both tokenizers (benchmarks/tokenizer_agreement.py --exceptions).
_SPACY_EXCEPTIONS_PTB_SPLITS = frozenset({"ak.", "ia.", "id.", "nebr.", "\u00e4.", "\u00f6.", "\u00fc.",
                                          "i'ma", "how'd'y", "how\u2019d\u2019y"})


# PTB writes the apostrophe of "it\u2019s" and "don\u2019t" as "'" (but keeps "o\u2019clock").
_CURLY_CONTRACTION = re.compile(r"^(?=\u2019(?:s|re|ll|ve|d|m)$|n\u2019t$)(n?)\u2019")


def _is_dropped(text: str) -> bool:
    return not text.strip() or all(c in _PUNCTUATION_CHARS for c in text)


def _keep_spacy_exception(text: str, pieces) -> bool:
    """Whether PTB splits `text` as spaCy's exception table does (see `ptb_compatible`)."""
    plain = text.replace("\u2019", "'")
    if not re.fullmatch(r"'?[^\W\d_]+(?:[.'][^\W\d_]*)*\.?", plain) or not any(c.isalpha() for c in plain):
        return False  # emoticons and times like "10a.m." ("10am" stays whole in PTB)
    if plain.lower() in _SPACY_EXCEPTIONS_PTB_SPLITS:
        return False
    if plain.startswith("'") and plain[1:].lower() not in ("s", "re", "ll", "ve", "d", "m", "em", "t", "cause"):
        return False  # "'cos", "'bout": PTB splits the leading apostrophe off
    if plain.endswith("'"):
        return False  # "doin'": PTB splits the trailing apostrophe off
    # "dont" -> "do", "nt" and "wed" -> "we", "d" are spaCy guesses; PTB splits only with an apostrophe.
    return len(pieces) == 1 or "'" in plain or "." in plain


def ptb_compatible(nlp):
    """Adjusts `nlp`'s tokenizer to split words as the coco-caption PTB tokenizer does.

    Changes to spaCy's English defaults: hyphens, slashes and "+-*^" between
    letters or digits no longer split ("t-shirt", "a/b", "5-4"); dashes ("--",
    en/em dash) and "&" between lower-case letters do ("at&t" -> "at & t", "AT&T"
    stays); a leading hyphen before a letter splits off; numbers keep their unit
    ("5km"); spaCy's emoticons and its apostrophe-less contractions ("dont" ->
    "do nt", "id" -> "i d") are gone; "gonna", "wanna" etc. split as in PTB.
    Returns `nlp`.
    """
    from spacy.lang.char_classes import (ALPHA, ALPHA_LOWER, ALPHA_UPPER, CONCAT_QUOTES, LIST_ELLIPSES,
                                         LIST_ICONS, UNITS)
    from spacy.attrs import ORTH
    from spacy.util import compile_infix_regex, compile_prefix_regex, compile_suffix_regex

    a, al = ALPHA, ALPHA_LOWER
    tokenizer = nlp.tokenizer
    infixes = LIST_ELLIPSES + LIST_ICONS + [
        r"(?<=[{al}{q}])\.(?=[{au}{q}])".format(al=al, au=ALPHA_UPPER, q=CONCAT_QUOTES),  # "end.Next"
        r"(?<=[{a}]),(?=[{a}])".format(a=a),  # "red,blue"
        r"(?<=[{a}0-9])(?:--+|\u2013|\u2014)(?=[{a}0-9])".format(a=a),  # "big--small"
        r"(?<=[{a}0-9])[:<>=](?=[{a}])".format(a=a),  # "a:b"; "a/b" stays whole
        r"(?<=[{al}])&(?=[{a}])|(?<=[{a}])&(?=[{al}])".format(a=a, al=al),  # "at&t"; "AT&T" stays
    ]
    units_rule = r"(?<=[0-9])(?:{u})".format(u=UNITS)
    # Contractions in any case ("DON'T" -> "DO", "N'T"); spaCy's table has lower and Title case only.
    contractions = [r"(?<=[{a}])(?i:n['\u2019]t)".format(a=a),
                    r"(?<=[{a}])(?i:['\u2019](?:s|re|ll|ve|d|m))".format(a=a)]
    suffixes = [s for s in nlp.Defaults.suffixes if s != units_rule] + contractions + [r"(?<=[0-9])%"]
    prefixes = list(nlp.Defaults.prefixes) + [r"-+(?=[{a}])".format(a=a)]
    tokenizer.infix_finditer = compile_infix_regex(infixes).finditer
    tokenizer.suffix_search = compile_suffix_regex(suffixes).search
    tokenizer.prefix_search = compile_prefix_regex(prefixes).search
    rules = {text: pieces for text, pieces in tokenizer.rules.items() if _keep_spacy_exception(text, pieces)}
    for text, pieces in list(rules.items()):  # "DR." and "MR." as "Dr." and "Mr."
        upper = [{**p, ORTH: p[ORTH].upper()} for p in pieces]  # exception pieces are keyed by attribute id
        if "".join(p[ORTH] for p in upper) == text.upper():
            rules.setdefault(text.upper(), upper)
    for word, pieces in _PTB_SPLITS.items():
        for variant, cased in ((word, pieces), (word.capitalize(), (pieces[0].capitalize(),) + pieces[1:]),
                               (word.upper(), tuple(p.upper() for p in pieces))):
            rules[variant] = [{ORTH: p} for p in cased]
    for word in _PTB_WHOLE:
        for variant in (word, word.capitalize(), word.upper()):
            rules[variant] = [{ORTH: variant}]
    tokenizer.rules = rules
    return nlp


def _load_spacy(lang: str, spacy_model: str | None):
    import spacy

    if spacy_model:
        try:
            # Only the tokenizer is used; the other pipes would cost time for nothing.
            return spacy.load(spacy_model, exclude=["tagger", "parser", "ner", "lemmatizer",
                                                    "attribute_ruler", "tok2vec", "senter"])
        except OSError as exc:
            raise ConfigError(
                f"spaCy pipeline {spacy_model!r} is not installed ({exc}). Install it "
                f"(python -m spacy download {spacy_model}) or leave spacy_model empty to "
                f"use spacy.blank({lang!r}), which has the same tokenizer rules."
            ) from exc
    try:
        return spacy.blank(lang)
    except (ImportError, KeyError) as exc:
        raise ConfigError(f"spaCy has no language {lang!r}: use a code such as 'en'.") from exc


@functools.lru_cache(maxsize=4)
def _load_ptb_compatible(lang: str, spacy_model: str | None):
    # Cached: building the adjusted rules takes a second or two; only the tokenizer is used, read-only.
    return ptb_compatible(_load_spacy(lang, spacy_model))


def default_max_len(word_counts: Sequence[int], quantile: float = DEFAULT_MAX_LEN_QUANTILE) -> int:
    """Encoded length (+2 for <start> and <end>) covering `quantile` of captions of these word counts.

    The smallest length L such that at least that fraction of the captions has
    at most L - 2 words: with fewer than 1000 captions, the longest one's.
    """
    if not word_counts:
        raise DataError("no captions to choose max_len from")
    ordered = sorted(word_counts)
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)] + 2


@dataclasses.dataclass
class Tokenizer:
    """Maps captions to token ids and back. Build with `fit` or `load`."""

    words: list[str]  # id -> word, including the special tokens at 0..3
    max_len: int
    lang: str = "en"
    spacy_model: str | None = None
    min_count: int = 1
    vocab_size_cap: int | None = None
    rules: str = TOKENIZER_RULES  # the word-splitting rules the vocabulary was made with

    def __post_init__(self):
        if tuple(self.words[:4]) != SPECIAL_TOKENS:
            raise DataError(f"vocabulary must start with {SPECIAL_TOKENS}, got {self.words[:4]}")
        self._ids = {w: i for i, w in enumerate(self.words)}
        self._nlp = None

    # -- words ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the output layer's width)."""
        return len(self.words)

    def _spacy(self):
        if self._nlp is None:
            self._nlp = _load_ptb_compatible(self.lang, self.spacy_model)
        return self._nlp

    def check_rules(self, source: str) -> None:
        """DataError unless the vocabulary was made with this toolkit's word-splitting rules."""
        if self.rules != TOKENIZER_RULES:
            raise DataError(
                f"{source} was made with tokenizer rules {self.rules!r}, this version splits words with "
                f"{TOKENIZER_RULES!r} (as the caption metrics' PTB tokenizer does: 't-shirt' stays one word). "
                "Records and cached features made with the old rules cannot be mixed with new ones: prepare "
                "the dataset again (launch/prepare_data.py into a new or emptied directory; delete "
                "data.records_dir and data.features_dir for launch/train.py) and train into a new --model_dir.")

    def split_words(self, captions: Sequence[str]) -> list[list[str]]:
        """Lower-cased words of each caption, punctuation and spaces dropped."""
        self.check_rules("this vocabulary")
        nlp = self._spacy()
        return [
            [_CURLY_CONTRACTION.sub(r"\1'", t.lower_) for t in doc if not _is_dropped(t.text)]
            for doc in nlp.tokenizer.pipe(captions, batch_size=1000)
        ]

    # -- encode / decode -----------------------------------------------------
    def encode_words(self, words: Sequence[str]) -> tuple[list[int], bool]:
        """[<start>, ids..., <end>] cut to max_len; also whether it was cut."""
        ids = [START_ID] + [self._ids.get(w, UNK_ID) for w in words] + [END_ID]
        if len(ids) > self.max_len:
            return ids[: self.max_len - 1] + [END_ID], True
        return ids, False

    def encode(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption (unpadded, with <start> and <end>)."""
        return [self.encode_words(w)[0] for w in self.split_words(captions)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ids up to the first <end>; <start> and <pad> are left out."""
        out = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            out.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(out)

    # -- fitting ---------------------------------------------------------------
    @classmethod
    def fit(cls, train_captions: Sequence[str], *, lang: str = "en", spacy_model: str | None = None,
            min_count: int = 1, vocab_size: int | None = None, max_len: int | None = None) -> "Tokenizer":
        """Fits the vocabulary on training captions only.

        Args:
          train_captions: every training caption (raw text).
          min_count: words seen fewer times than this become <unk>.
          vocab_size: cap on the number of ids including the 4 special tokens.
          max_len: cap on encoded length (words + <start> + <end>); by default
            `default_max_len` of the training captions: their 99.9th percentile.
        """
        if not train_captions:
            raise DataError("no training captions to fit the vocabulary on: the train split is empty")
        if min_count < 1:
            raise ConfigError(f"min_count must be >= 1, got {min_count}")
        if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
            raise ConfigError(f"vocab_size must exceed {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}")
        probe = cls(words=list(SPECIAL_TOKENS), max_len=3, lang=lang, spacy_model=spacy_model)
        split = probe.split_words(train_captions)
        counts = collections.Counter(w for words in split for w in words)
        ranked = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                        key=lambda w: (-counts[w], w))
        if vocab_size is not None:
            ranked = ranked[: vocab_size - len(SPECIAL_TOKENS)]
        longest = max(len(w) for w in split) + 2
        if max_len is not None and max_len < 3:
            raise ConfigError(f"max_len must be >= 3 (<start>, a word, <end>), got {max_len}")
        tok = cls(words=list(SPECIAL_TOKENS) + ranked,
                  max_len=min(longest, max_len) if max_len else default_max_len([len(w) for w in split]),
                  lang=lang, spacy_model=spacy_model, min_count=min_count, vocab_size_cap=vocab_size)
        tok._nlp = probe._nlp
        return tok

    # -- persistence -------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "format": _FORMAT, "version": _FORMAT_VERSION, "lang": self.lang,
            "spacy_model": self.spacy_model, "min_count": self.min_count,
            "vocab_size_cap": self.vocab_size_cap, "max_len": self.max_len,
            "tokenizer_rules": self.rules, "words": self.words,
        }, indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<string>") -> "Tokenizer":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: not a vocabulary JSON file ({exc}); re-run prepare_data.") from exc
        if not isinstance(d, dict) or d.get("format") != _FORMAT or d.get("version") != _FORMAT_VERSION:
            raise DataError(f"{source}: not a showtell_dist vocabulary (format {_FORMAT} v{_FORMAT_VERSION}); "
                            "re-run prepare_data to write one.")
        return cls(words=list(d["words"]), max_len=int(d["max_len"]), lang=d["lang"],
                   spacy_model=d.get("spacy_model"), min_count=int(d.get("min_count", 1)),
                   vocab_size_cap=d.get("vocab_size_cap"), rules=d.get("tokenizer_rules", LEGACY_RULES))

    def save(self, path: str) -> None:
        import tensorflow as tf

        with tf.io.gfile.GFile(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        import tensorflow as tf

        if not tf.io.gfile.exists(path):
            raise DataError(f"vocabulary file {path} does not exist; run launch/prepare_data.py first.")
        with tf.io.gfile.GFile(path, "r") as f:
            return cls.from_json(f.read(), source=path)
