"""The in-graph CIDEr-D reward against pycocoevalcap's CiderScorer, under XLA and Mirrored, and its
document-frequency table (build, file, prepare, datasets prepared without it)."""

import collections
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from pycocoevalcap.cider.cider_scorer import CiderScorer

from showtell_dist.data.document_frequencies import (DOCUMENT_FREQUENCIES, KEY_BASE, DocumentFrequencies,
                                                     check_vocabulary_fits, load_or_compute_document_frequencies,
                                                     load_tables, save_tables, train_references, word_ids_np)
from showtell_dist.data.prepare import load_manifest
from showtell_dist.data.tokenizer import END_ID
from showtell_dist.errors import ConfigError, DataError
from showtell_dist.reward.cider_d import cider_d, word_ids
from tiny_setup import mirrored

T, R = 9, 4


def _random_sets(rng, num, vocab=7, train=False, words=(1, 2, 3, 4, 5, KEY_BASE - 2, KEY_BASE - 1)):
    """Candidates and reference sets with every edge case: repeated n-grams (a 7-word vocabulary), one-word and
    T-word captions, empty candidates, 1..R references, ids at both ends of the key range."""
    words = np.array(words[:vocab])

    def caption():
        length = rng.choice([1, T, rng.integers(1, T + 1)])
        return [int(w) for w in rng.choice(words, length)]

    refs = [[caption() for _ in range(rng.integers(1, R + 1))] for _ in range(num)]
    if train:
        return refs
    cands = [caption() for _ in range(num)]
    cands[0], cands[1] = [], list(refs[1][0])  # no words; a copy of a reference
    return cands, refs


def _dense(cands, refs):
    c = np.zeros([len(cands), T], np.int32)
    r = np.zeros([len(refs), R, T], np.int32)
    for i, words in enumerate(cands):
        c[i, : len(words)] = words
    for i, rs in enumerate(refs):
        for j, words in enumerate(rs):
            r[i, j, : len(words)] = words
    return c, r


def _text(words):
    return " ".join(f"w{w}" for w in words)


def _coco_scorer(cands, refs, scorer_class=CiderScorer):
    scorer = scorer_class(n=4, sigma=6.0)
    for c, rs in zip(cands, refs):
        scorer += (_text(c), [_text(r) for r in rs])
    return scorer


def test_equals_pycocoevalcap_with_the_scored_references_document_frequencies():
    cands, refs = _random_sets(np.random.default_rng(0), 300)
    _, expected = _coco_scorer(cands, refs).compute_score()
    df = DocumentFrequencies.from_references(refs)
    assert df.num_docs == 300 and np.isclose(df.log_num_docs, np.log(300))
    got = cider_d(*_dense(cands, refs), df).numpy()
    assert got.shape == (300,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert got[0] == 0 and got[1] > 0 and (got > 1).sum() > 30  # the edge cases are there, and so are matches


def test_equals_pycocoevalcap_with_training_document_frequencies():
    """A table from another (training) reference set: pycocoevalcap's own document_frequency of the training
    references and ref_len = log(training images), patched into its scorer."""
    rng = np.random.default_rng(1)
    train = _random_sets(rng, 150, vocab=5, train=True)  # 2 of the 7 words never occur: df 0, idf log(150)
    cands, refs = _random_sets(rng, 200)
    counter = _coco_scorer([[]] * len(train), train)
    counter.compute_doc_freq()

    class TrainingTableScorer(CiderScorer):
        ref_len = property(lambda self: np.log(150.0), lambda self, value: None)  # compute_cider's value ignored

        def compute_doc_freq(self):
            self.document_frequency = collections.defaultdict(float, counter.document_frequency)

    scorer = _coco_scorer(cands, refs, TrainingTableScorer)
    scorer.compute_doc_freq()
    expected = np.array(scorer.compute_cider())
    got = cider_d(*_dense(cands, refs), DocumentFrequencies.from_references(train)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # and the table matters: the scored set's own table gives other scores
    own = cider_d(*_dense(cands, refs), DocumentFrequencies.from_references(refs)).numpy()
    assert np.abs(own - expected).max() > 0.1


def test_compiles_with_xla_and_runs_per_replica_with_identical_results():
    cands, refs = _random_sets(np.random.default_rng(2), 16)
    df = DocumentFrequencies.from_references(refs)
    c, r = _dense(cands, refs)
    eager = cider_d(c, r, df).numpy()
    compiled = tf.function(lambda c, r: cider_d(c, r, df), jit_compile=True)(c, r).numpy()
    np.testing.assert_allclose(compiled, eager, rtol=1e-6, atol=1e-6)

    strategy = mirrored(2)
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((c, r)))

    @tf.function
    def per_replica(batch):
        return strategy.run(lambda c, r: cider_d(c, r, df), args=batch)

    result = per_replica(next(iter(ds)))
    replica_scores = np.concatenate([x.numpy() for x in strategy.experimental_local_results(result)])
    np.testing.assert_allclose(replica_scores, eager, rtol=1e-6, atol=1e-6)


def test_references_beyond_r_columns_and_candidate_length_may_differ():
    """Candidates and references need not share T; a missing (all-zero) reference changes nothing."""
    cands, refs = _random_sets(np.random.default_rng(3), 20)
    df = DocumentFrequencies.from_references(refs)
    c, r = _dense(cands, refs)
    base = cider_d(c, r, df).numpy()
    wider = cider_d(np.pad(c, [[0, 0], [0, 5]]), np.pad(r, [[0, 0], [0, 2], [0, 3]]), df).numpy()
    np.testing.assert_allclose(wider, base, rtol=1e-6)
    no_refs = cider_d(c, np.zeros_like(r), df).numpy()
    assert (no_refs == 0).all()


WORDS_NOT_SPECIAL = (4, 5, 6, 7, 8, KEY_BASE - 2, KEY_BASE - 1)  # no <pad>, <start>, <end> or <unk> among them


def test_end_token_reward_equals_pycocoevalcap_with_end_appended_to_every_caption():
    """scst.reward_end_token: samples as the sampler writes them (<end> where drawn, then padding; some cut off
    without <end>) and reference rows as batches hold them (<start> ... <end>), scored by the training reward,
    equal pycocoevalcap's CIDEr-D with "<end>" appended as a word to every caption that has one."""
    from showtell_dist.training.self_critical import cider_d_reward

    rng = np.random.default_rng(5)
    cands, refs = _random_sets(rng, 200, words=WORDS_NOT_SPECIAL)
    ended = rng.random(len(cands)) < 0.8  # the others reached max_len without drawing <end>
    samples = np.zeros([len(cands), T + 1], np.int32)
    for i, words in enumerate(cands):
        row = list(words) + ([END_ID] if ended[i] else [])
        samples[i, : len(row)] = row
        samples[i, len(row):] = 0
    captions = np.zeros([len(refs), R, T + 2], np.int32)
    for i, rs in enumerate(refs):
        for j, words in enumerate(rs):
            captions[i, j, : len(words) + 2] = [1] + list(words) + [END_ID]

    def text(words, end):
        return " ".join([f"w{w}" for w in words] + (["<end>"] if end else []))

    scorer = CiderScorer(n=4, sigma=6.0)
    for i, (c, rs) in enumerate(zip(cands, refs)):
        scorer += (text(c, ended[i]), [text(r, True) for r in rs])
    _, expected = scorer.compute_score()

    df = DocumentFrequencies.from_references(refs, end_token=True)
    assert df.end_token
    reward = cider_d_reward(df, caption_len=T + 2)
    got = reward(tf.constant(samples), tf.constant(captions)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    compiled = tf.function(reward, jit_compile=True)(tf.constant(samples), tf.constant(captions)).numpy()
    np.testing.assert_allclose(compiled, expected, rtol=0, atol=1e-4)
    # and <end> matters: without it the same samples score otherwise
    plain = cider_d_reward(DocumentFrequencies.from_references(refs), caption_len=T + 2)
    assert np.abs(plain(tf.constant(samples), tf.constant(captions)).numpy() - expected).max() > 0.1


def test_ngram_keys_from_tensorflow_text_windows_match_the_document_frequency_keys():
    """The reward's n-gram keys (tensorflow_text.sliding_window, eager and XLA) are the document-frequency
    table's (numpy), slot for slot."""
    from showtell_dist.data.document_frequencies import _ngram_keys_np
    from showtell_dist.reward.cider_d import _ngram_keys

    cands, _ = _random_sets(np.random.default_rng(6), 30)
    c, _ = _dense(cands, [[]] * len(cands))
    expected = _ngram_keys_np(c)  # [rows, MAX_N * T], -1 where no n-gram
    for fn in (_ngram_keys, tf.function(_ngram_keys, jit_compile=True)):
        keys, valid = fn(tf.constant(c))  # [rows, MAX_N, T]
        got = np.where(valid.numpy(), keys.numpy(), -1).reshape(len(cands), -1)
        np.testing.assert_array_equal(got, expected)


def test_word_ids_drops_start_padding_and_everything_from_the_first_end():
    tokens = np.array([[1, 5, 6, 2, 0, 0],   # a caption row
                       [5, 6, 2, 7, 2, 8],   # a sampled row: words after <end> dropped
                       [1, 2, 0, 0, 0, 0],   # no words
                       [5, 6, 7, 8, 9, 4],   # no <end>
                       [1, 5, 0, 6, 2, 7]])  # a stray pad inside
    expected = [[5, 6, 0, 0, 0, 0], [5, 6, 0, 0, 0, 0], [0] * 6, [5, 6, 7, 8, 9, 4], [5, 6, 0, 0, 0, 0]]
    np.testing.assert_array_equal(word_ids(tf.constant(tokens)).numpy(), expected)
    np.testing.assert_array_equal(tf.function(word_ids, jit_compile=True)(tf.constant(tokens[None])).numpy()[0],
                                  expected)
    assert [word_ids_np(t) for t in tokens] == [[w for w in row if w] for row in expected]
    with_end = [[5, 6, 2, 0, 0, 0], [5, 6, 2, 0, 0, 0], [2, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 4], [5, 6, 2, 0, 0, 0]]
    np.testing.assert_array_equal(word_ids(tf.constant(tokens), keep_end=True).numpy(), with_end)
    assert [word_ids_np(t, keep_end=True) for t in tokens] == [[w for w in row if w] for row in with_end]


def test_document_frequencies_file_round_trip_and_bad_input(tmp_path):
    refs = [[[4, 5, 4, 5], [4]], [[6, 4, 5]], []]
    df = DocumentFrequencies.from_references(refs)
    key = {(4,): 4, (4, 5): 4 + 5 * KEY_BASE, (5, 4): 5 + 4 * KEY_BASE}
    table = dict(zip(df.keys.tolist(), df.frequencies.tolist()))
    assert table[key[(4,)]] == 2 and table[key[(4, 5)]] == 2 and table[key[(5, 4)]] == 1  # per image, not caption
    assert df.num_docs == 3  # the image without references counts
    path = str(tmp_path / "df.npz")
    df.save(path)
    loaded = DocumentFrequencies.load(path)
    np.testing.assert_array_equal(loaded.keys, df.keys)
    np.testing.assert_array_equal(loaded.frequencies, df.frequencies)
    assert loaded.log_num_docs == df.log_num_docs and os.listdir(tmp_path) == ["df.npz"]

    (tmp_path / "bad.npz").write_bytes(b"not a table")
    with pytest.raises(DataError, match="bad.npz is not a CIDEr-D document-frequency file"):
        DocumentFrequencies.load(str(tmp_path / "bad.npz"))
    with pytest.raises(DataError, match="does not exist"):
        DocumentFrequencies.load(str(tmp_path / "missing.npz"))
    with pytest.raises(DataError, match="word ids outside"):
        DocumentFrequencies.from_references([[[1, 2, 0]]])
    with pytest.raises(DataError, match="word ids outside"):
        DocumentFrequencies.from_references([[[KEY_BASE]]])
    empty = DocumentFrequencies.from_references([[], []])  # no n-grams: every idf is log 2
    assert len(empty) == 0 and empty.num_docs == 2
    # a one-word copy: unigram similarity 1, no bigrams or longer (0), no length penalty: 10 * mean = 2.5
    np.testing.assert_allclose(cider_d([[7, 0]], [[[7, 0], [0, 0]]], empty).numpy(), [2.5], rtol=1e-6)
    check_vocabulary_fits(KEY_BASE)
    with pytest.raises(ConfigError, match="at most 50000 ids"):
        check_vocabulary_fits(KEY_BASE + 1)


def test_prepare_writes_the_train_document_frequencies_without_and_with_end(tiny_dataset):
    records_dir, manifest = tiny_dataset
    entry = manifest["cider_document_frequencies"]
    assert entry["file"] == DOCUMENT_FREQUENCIES and entry["images"] == manifest["splits"]["train"]["images"]
    for end_token, count in ((False, entry["ngrams"]), (True, entry["ngrams_with_end"])):
        df = DocumentFrequencies.load(os.path.join(records_dir, DOCUMENT_FREQUENCIES), end_token=end_token)
        recount = DocumentFrequencies.from_references(train_references(records_dir, manifest), end_token=end_token)
        assert len(df) == count > 0 and df.end_token == end_token
        np.testing.assert_array_equal(df.keys, recount.keys)
        np.testing.assert_array_equal(df.frequencies, recount.frequencies)
        assert df.log_num_docs == pytest.approx(np.log(manifest["splits"]["train"]["images"]))
    assert entry["ngrams_with_end"] > entry["ngrams"]  # the n-grams ending in <end>


def test_a_file_of_an_older_prepare_still_serves_and_gets_the_end_table_added(tiny_dataset, tmp_path):
    """A version-1 file (one table, without <end>) is read as it is; asking for the <end> table counts both
    from the train records once and rewrites the file with both."""
    records_dir, _ = tiny_dataset
    old = str(tmp_path / "old")
    shutil.copytree(records_dir, old)
    path = os.path.join(old, DOCUMENT_FREQUENCIES)
    plain = DocumentFrequencies.load(path)
    with_end = DocumentFrequencies.load(path, end_token=True)
    np.savez_compressed(path, format=np.array("showtell_dist.cider_document_frequencies"), version=np.array(1),
                        key_base=np.array(KEY_BASE, np.int64), max_n=np.array(4), keys=plain.keys,
                        frequencies=plain.frequencies, log_num_docs=np.array(plain.log_num_docs, np.float64))
    assert list(load_tables(path)) == [False]
    messages = []
    df = load_or_compute_document_frequencies(old, load_manifest(old), log=messages.append)
    np.testing.assert_array_equal(df.keys, plain.keys)
    assert messages == []  # the old table serves as it is
    with pytest.raises(DataError, match="no CIDEr-D document frequencies counted with <end>.*delete it"):
        DocumentFrequencies.load(path, end_token=True)
    df = load_or_compute_document_frequencies(old, load_manifest(old), end_token=True, log=messages.append)
    np.testing.assert_array_equal(df.keys, with_end.keys)
    np.testing.assert_array_equal(df.frequencies, with_end.frequencies)
    assert len(messages) == 2 and "without the table with <end>" in messages[0] and "saved" in messages[1]
    assert sorted(load_tables(path)) == [False, True]
    with pytest.raises(ValueError, match="one table per end_token"):
        save_tables(str(tmp_path / "two.npz"), [plain, plain])


def test_a_dataset_prepared_without_the_table_gets_it_counted_once_with_a_message(tiny_dataset, tmp_path):
    records_dir, _ = tiny_dataset
    old = str(tmp_path / "old")
    shutil.copytree(records_dir, old)
    os.remove(os.path.join(old, DOCUMENT_FREQUENCIES))
    expected = DocumentFrequencies.load(os.path.join(records_dir, DOCUMENT_FREQUENCIES))
    messages = []
    df = load_or_compute_document_frequencies(old, load_manifest(old), log=messages.append)
    np.testing.assert_array_equal(df.keys, expected.keys)
    np.testing.assert_array_equal(df.frequencies, expected.frequencies)
    assert len(messages) == 2 and f"has no {DOCUMENT_FREQUENCIES}" in messages[0] and "saved" in messages[1]
    assert os.path.exists(os.path.join(old, DOCUMENT_FREQUENCIES))
    messages.clear()
    load_or_compute_document_frequencies(old, load_manifest(old), log=messages.append)
    assert messages == []  # loaded from the file written the first time

    os.remove(os.path.join(old, load_manifest(old)["splits"]["train"]["shards"][0]["file"]))
    os.remove(os.path.join(old, DOCUMENT_FREQUENCIES))
    with pytest.raises(DataError, match="does not exist; prepare the data again"):
        load_or_compute_document_frequencies(old, load_manifest(old), log=messages.append)
