"""spaCy-based caption tokenizer with a JSON vocabulary.

Words are spaCy tokens, lower-cased, with punctuation and whitespace dropped.
The vocabulary is fitted on training captions only. Ids:

    0 <pad>   padding, never generated
    1 <start> first input token of every caption
    2 <end>   last target token of every caption
    3 <unk>   any word outside the vocabulary
    4...      words by decreasing training count (ties alphabetical)

`max_len` is the length of the longest encoded training caption, counting
every word plus <start> and <end>, unless a smaller cap is configured; longer
captions are cut to `max_len - 1` tokens and closed with <end>.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Iterable, Sequence

from showtell_dist.errors import ConfigError, DataError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

_FORMAT = "showtell_dist.vocabulary"
_FORMAT_VERSION = 1


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


@dataclasses.dataclass
class Tokenizer:
    """Maps captions to token ids and back. Build with `fit` or `load`."""

    words: list[str]  # id -> word, including the special tokens at 0..3
    max_len: int
    lang: str = "en"
    spacy_model: str | None = None
    min_count: int = 1
    vocab_size_cap: int | None = None

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
            self._nlp = _load_spacy(self.lang, self.spacy_model)
        return self._nlp

    def split_words(self, captions: Sequence[str]) -> list[list[str]]:
        """Lower-cased words of each caption, punctuation and spaces dropped."""
        nlp = self._spacy()
        return [
            [t.lower_ for t in doc if not (t.is_punct or t.is_space)]
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
          max_len: cap on encoded length; by default the longest training
            caption's word count + 2.
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
                  max_len=min(longest, max_len) if max_len else longest,
                  lang=lang, spacy_model=spacy_model, min_count=min_count, vocab_size_cap=vocab_size)
        tok._nlp = probe._nlp
        return tok

    # -- persistence -------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "format": _FORMAT, "version": _FORMAT_VERSION, "lang": self.lang,
            "spacy_model": self.spacy_model, "min_count": self.min_count,
            "vocab_size_cap": self.vocab_size_cap, "max_len": self.max_len,
            "words": self.words,
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
                   vocab_size_cap=d.get("vocab_size_cap"))

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
