import json
import time

import pytest

from showtell_dist.data.tokenizer import END_ID, PAD_ID, START_ID, UNK_ID, Tokenizer
from showtell_dist.errors import ConfigError, DataError

TRAIN = ["A dog runs on the grass.", "Two dogs, running!", "A dog sleeps on a very long red couch near the window"]


def test_special_ids_and_punctuation_dropped():
    tok = Tokenizer.fit(TRAIN)
    assert tok.words[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    assert "," not in tok.words and "." not in tok.words and "!" not in tok.words
    assert tok.words[4] in ("a", "dog")  # most frequent first
    assert tok.split_words(["Two DOGS, running!"]) == [["two", "dogs", "running"]]


def test_round_trip_and_unknown_words():
    tok = Tokenizer.fit(TRAIN)
    ids = tok.encode(["a dog runs on the grass"])[0]
    assert ids[0] == START_ID and ids[-1] == END_ID and UNK_ID not in ids
    assert tok.decode(ids) == "a dog runs on the grass"
    assert tok.decode(tok.encode(["a purple dog"])[0]) == "a <unk> dog"
    assert tok.decode([START_ID, 5, END_ID, 6, PAD_ID]) == tok.words[5]


def test_max_len_counts_every_word_plus_start_and_end():
    tok = Tokenizer.fit(TRAIN)
    longest = len("A dog sleeps on a very long red couch near the window".split())
    assert tok.max_len == longest + 2
    capped = Tokenizer.fit(TRAIN, max_len=5)
    ids, cut = capped.encode_words(["a", "dog", "sleeps", "on", "a", "couch"])
    assert cut and len(ids) == 5 and ids[-1] == END_ID


def test_vocabulary_fitted_on_given_captions_with_caps():
    tok = Tokenizer.fit(TRAIN, min_count=2)
    assert set(tok.words[4:]) == {"a", "dog", "on", "the"}
    capped = Tokenizer.fit(TRAIN, vocab_size=6)
    assert capped.vocab_size == 6 and capped.words[4:] == ["a", "dog"]
    with pytest.raises(ConfigError):
        Tokenizer.fit(TRAIN, vocab_size=4)
    with pytest.raises(DataError):
        Tokenizer.fit([])


def test_json_save_load(tmp_path):
    tok = Tokenizer.fit(TRAIN)
    path = str(tmp_path / "vocab.json")
    tok.save(path)
    assert json.loads(open(path).read())["format"] == "showtell_dist.vocabulary"
    again = Tokenizer.load(path)
    assert again.words == tok.words and again.max_len == tok.max_len
    assert again.encode(TRAIN) == tok.encode(TRAIN)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        Tokenizer.load(str(tmp_path / "bad.json"))
    with pytest.raises(DataError, match="missing.json"):
        Tokenizer.load(str(tmp_path / "missing.json"))


def test_tokenizing_40000_captions_takes_seconds():
    captions = [f"a man in a red shirt number {i} is riding a bike down the street ." for i in range(40000)]
    start = time.perf_counter()
    tok = Tokenizer.fit(captions)
    tok.encode(captions)
    # Not a timing assertion on speed targets: a guard against an accidental per-caption pipeline
    # (spacy.load per call, full pipelines) that would take minutes.
    assert time.perf_counter() - start < 60
