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


# Captions whose words spaCy's default rules split differently from the metrics' PTB tokenizer.
PTB_CASES = [
    "A boy in a t-shirt and a black-and-white dog .",
    "The dog's ball ; the dogs' toys , don't , can't , won't , I'm , they're , we've , she'll , he'd .",
    "A man cannot go , gonna go , wanna play on a merry-go-round .",
    "A girl with an id badge , a newly wed wife , a man at 5km near the U.S. flag , St. Mary's .",
    "Sooners # 28 , AT&T and at&t , a green hoodie & a jacket , a/b , 50% , $5 , 3.5 , 10:30 .",
    "A slip 'n' slide , a \"quoted\" word , a sign saying \" -ependent \" , DON'T STOP .",
    "It\u2019s a dog\u2019s o\u2019clock , don\u2019t !",
]


def test_words_split_as_the_metrics_ptb_tokenizer():
    from showtell_dist.evaluation import metrics
    from showtell_dist.errors import UserError

    try:
        metrics.check_java()
    except UserError:
        pytest.skip("no java on PATH: the PTB tokenizer of the metrics is a Java program")
    ptb = [s.split() for s in metrics.ptb_tokenize(PTB_CASES)]
    ours = Tokenizer.fit(["a"]).split_words(PTB_CASES)
    for sentence, expected, words in zip(PTB_CASES, ptb, ours):
        assert words == expected, sentence
    assert "t-shirt" in ours[0] and "black-and-white" in ours[0]
    assert ours[1][:4] == ["the", "dog", "'s", "ball"] and " do n't " in " ".join(ours[1])


def test_words_a_hyphen_or_apostrophe_keeps_or_splits():
    tok = Tokenizer.fit(["a"])
    assert tok.split_words(["A t-shirt, black-and-white dog's don't cannot gonna (red) wed id."]) == [
        ["a", "t-shirt", "black-and-white", "dog", "'s", "do", "n't", "can", "not", "gon", "na", "red", "wed", "id"]]
    fitted = Tokenizer.fit(["a man in a t-shirt", "a t-shirt"])
    assert "t-shirt" in fitted.words and "shirt" not in fitted.words
    assert fitted.decode(fitted.encode(["A T-shirt."])[0]) == "a t-shirt"


def test_vocabulary_of_older_word_splitting_rules_is_refused_for_encoding(tmp_path):
    from showtell_dist.data.tokenizer import LEGACY_RULES, TOKENIZER_RULES

    tok = Tokenizer.fit(TRAIN)
    saved = json.loads(tok.to_json())
    assert saved["tokenizer_rules"] == TOKENIZER_RULES
    del saved["tokenizer_rules"]  # as vocab.json files written before the rules were versioned
    (tmp_path / "vocab.json").write_text(json.dumps(saved))
    old = Tokenizer.load(str(tmp_path / "vocab.json"))
    assert old.rules == LEGACY_RULES
    assert old.decode([START_ID, 4, END_ID]) == tok.words[4]  # decoding an old model's output still works
    with pytest.raises(DataError, match="spacy-default.*prepare the dataset again"):
        old.encode(["a dog"])
    with pytest.raises(DataError, match="vocab.json"):
        old.check_rules(str(tmp_path / "vocab.json"))
    tok.check_rules("fresh")  # current rules: no error


def test_default_max_len_covers_999_in_1000_captions_so_one_run_on_caption_does_not_set_it():
    from showtell_dist.data.tokenizer import default_max_len

    assert default_max_len([5] * 998 + [400]) == 402  # under 1000 captions: the longest
    assert default_max_len([5] * 1999 + [400]) == 7
    assert default_max_len([5] * 1997 + [400] * 3) == 402  # 3 in 2000 is more than 0.1%
    captions = ["a dog runs on the grass"] * 1999 + [" ".join(["word"] * 400)]
    tok = Tokenizer.fit(captions)
    assert tok.max_len == 8
    ids, cut = tok.encode_words(["word"] * 400)
    assert cut and len(ids) == 8
    assert Tokenizer.fit(captions, max_len=50).max_len == 50  # an explicit max_len wins
    assert Tokenizer.fit(captions, max_len=500).max_len == 402  # never beyond the longest caption
