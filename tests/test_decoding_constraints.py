"""remove_bad_endings and block_trigrams in beam search and greedy decoding (tiny decoders, CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.decoding.beam_search import BAD_ENDINGS, bad_ending_ids_of, beam_search, greedy_decode
from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.errors import ConfigError
from test_beam_search import (END, FORBIDDEN, PAD, START, VOCAB, TinyDecoder, _log_softmax_masked, _row,
                              bigram_step, initial_state, run_beam)

BAD = (3,)  # word 3 plays "a": no caption may end right after it


def _repeats_trigram(seq) -> bool:
    trigrams = [tuple(seq[i:i + 3]) for i in range(len(seq) - 2)]
    return len(trigrams) != len(set(trigrams))


def _allowed(seq, tok, bad_endings, block_trigrams) -> bool:
    if tok == END and seq and seq[-1] in bad_endings:
        return False
    return not (block_trigrams and _repeats_trigram(seq + (tok,)))


def constrained_exhaustive(step, state_row, max_len, bad_endings, block_trigrams):
    """Every sequence the constraints allow (ending at END or at max_len), scored by average log-prob."""
    banned = (PAD,) + FORBIDDEN
    words = [t for t in range(VOCAB) if t not in banned]
    finished = []
    frontier = [((), 0.0, state_row[0][0], state_row[1][0], START)]
    for depth in range(max_len):
        logits, (h2, c2) = step(tf.constant([f[4] for f in frontier], tf.int32),
                                (tf.constant(np.stack([f[2] for f in frontier])),
                                 tf.constant(np.stack([f[3] for f in frontier]))))
        log_probs = _log_softmax_masked(np.asarray(logits), banned)
        h2, c2 = np.asarray(h2), np.asarray(c2)
        new_frontier = []
        for i, (seq, lp, _, _, _) in enumerate(frontier):
            for tok in words:
                if not _allowed(seq, tok, bad_endings, block_trigrams):
                    continue
                seq2, lp2 = seq + (tok,), lp + log_probs[i, tok]
                if tok == END or depth == max_len - 1:
                    finished.append((seq2, lp2 / len(seq2)))
                else:
                    new_frontier.append((seq2, lp2, h2[i], c2[i], tok))
        frontier = new_frontier
    return sorted(finished, key=lambda x: -x[1])


@pytest.mark.parametrize("bad_endings,block_trigrams", [(BAD, False), ((), True), (BAD, True)])
def test_large_beam_equals_the_constrained_exhaustive_search(bad_endings, block_trigrams):
    max_len, beam = 5, 400  # 3 words + end: 364 sequences unconstrained, fewer allowed
    decoder = TinyDecoder(seed=0)
    state = initial_state(2, seed=3)
    result = run_beam(decoder.step, state, beam_width=beam, max_len=max_len, length_normalization="average",
                      bad_ending_ids=bad_endings, block_trigrams=block_trigrams)
    for b in range(2):
        expected = constrained_exhaustive(decoder.step, _row(state, b), max_len, bad_endings, block_trigrams)
        assert 100 < len(expected) < 364
        n = len(expected)
        got = {tuple(int(t) for t in result.tokens[b, k, :result.lengths[b, k]]): result.scores[b, k]
               for k in range(n)}
        assert set(got) == {seq for seq, _ in expected}
        np.testing.assert_allclose([got[seq] for seq, _ in expected], [s for _, s in expected], atol=1e-5)
        assert np.all(np.isneginf(result.scores[b, n:]))  # nothing else is reachable


def python_greedy(step, state_row, max_len, bad_endings, block_trigrams):
    banned = (PAD,) + FORBIDDEN
    h, c = tf.constant(state_row[0]), tf.constant(state_row[1])
    last, out = START, ()
    for _ in range(max_len):
        logits, (h, c) = step(tf.constant([last], tf.int32), (h, c))
        log_probs = _log_softmax_masked(np.asarray(logits), banned)[0]
        for tok in range(VOCAB):
            if not _allowed(out, tok, bad_endings, block_trigrams):
                log_probs[tok] = -np.inf
        last = int(np.argmax(log_probs))
        out += (last,)
        if last == END:
            break
    return out


def _looping_step():
    """3 -> 4 -> 5 -> 3 ... with <end> likely after 3: unconstrained, captions loop and end on "a" (3)."""
    return bigram_step({START: {3: 0.9, 4: 0.1}, 3: {END: 0.6, 4: 0.3, 5: 0.1}, 4: {5: 0.8, END: 0.2},
                        5: {3: 0.7, 4: 0.2, END: 0.1}})


def test_greedy_follows_the_constraints_step_by_step():
    decoder = TinyDecoder(seed=5, end_bias=-1.0)
    state = initial_state(3, seed=6)
    for bad_endings, block in [((), False), (BAD, False), ((), True), ((3, 4), True)]:
        tokens, lengths = tf.function(lambda h, c: greedy_decode(
            decoder.step, (h, c), max_len=9, start_id=START, end_id=END, forbidden_ids=FORBIDDEN,
            bad_ending_ids=bad_endings, block_trigrams=block))(*[tf.constant(x) for x in state])
        beam1 = run_beam(decoder.step, state, beam_width=1, max_len=9, bad_ending_ids=bad_endings,
                         block_trigrams=block)
        for b in range(3):
            expected = python_greedy(decoder.step, _row(state, b), 9, bad_endings, block)
            assert tuple(tokens.numpy()[b, :lengths.numpy()[b]]) == expected
            assert tuple(beam1.tokens[b, 0, :beam1.lengths[b, 0]]) == expected


@pytest.mark.parametrize("jit", [False, True])
def test_no_caption_ends_on_a_bad_word_or_repeats_a_trigram(jit):
    step = _looping_step()
    state = (np.zeros([2, 1], np.float32),)
    plain = run_beam(step, state, jit=jit, beam_width=3, max_len=10)
    constrained = run_beam(step, state, jit=jit, beam_width=3, max_len=10, bad_ending_ids=BAD, block_trigrams=True)

    def captions(result):
        return [tuple(int(t) for t in result.tokens[b, k, :result.lengths[b, k]])
                for b in range(2) for k in range(3) if np.isfinite(result.scores[b, k])]

    assert captions(plain)[0] == (3, END)  # without the options the best caption ends on "a"
    assert any(_repeats_trigram(c) for c in captions(plain))  # ... and some loop 3 4 5 3 4 5
    for caption in captions(constrained):
        assert not (caption[-1] == END and caption[-2] in BAD), caption
        assert not _repeats_trigram(caption), caption
    # 3 4 5 3 4 <end> (average log-prob -0.78) beats 3 4 <end> (-0.97); 3 4 5 3 4 5 would repeat "3 4 5".
    assert captions(constrained)[0] == (3, 4, 5, 3, 4, END)


def test_options_compile_with_xla_and_match_the_graph():
    decoder = TinyDecoder(seed=8, end_bias=-2.0)  # long captions: trigram blocking gets to act
    state = initial_state(2, seed=9)
    kwargs = dict(beam_width=3, max_len=12, length_normalization="gnmt", alpha=0.7, bad_ending_ids=(3, 5),
                  block_trigrams=True)
    graph, xla = run_beam(decoder.step, state, **kwargs), run_beam(decoder.step, state, jit=True, **kwargs)
    np.testing.assert_array_equal(graph.tokens, xla.tokens)
    np.testing.assert_allclose(graph.scores, xla.scores, atol=1e-5)


def test_bad_ending_ids_and_option_checks():
    words = ["<pad>", "<start>", "<end>", "a", "dog", "with", "ball", "the"]
    assert bad_ending_ids_of(words) == (3, 5, 7)
    assert {"a", "an", "the", "with", "of", "on", "in", "and", "at", "to", "for", "its", "his", "her",
            "their"} <= set(BAD_ENDINGS)
    DecodeOptions(3, "average", 0.6, remove_bad_endings=True, block_trigrams=False)
    with pytest.raises(ConfigError, match="remove_bad_endings = 'yes': must be True or False"):
        DecodeOptions(3, "average", 0.6, remove_bad_endings="yes")
    with pytest.raises(ConfigError, match="block_trigrams = 1: must be True or False"):
        DecodeOptions(3, "average", 0.6, block_trigrams=1)
    with pytest.raises(ConfigError, match="end_id"):
        beam_search(lambda t, s: (tf.zeros([2, VOCAB]), s), (tf.zeros([1, 1]),), beam_width=2, max_len=3,
                    start_id=START, end_id=END, vocab_size=VOCAB, bad_ending_ids=(END,))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        beam_search(lambda t, s: (tf.zeros([2, VOCAB]), s), (tf.zeros([1, 1]),), beam_width=2, max_len=3,
                    start_id=START, end_id=END, vocab_size=VOCAB, bad_ending_ids=(VOCAB,))


def test_the_run_config_carries_the_options():
    import ml_collections

    from configs import demo
    from showtell_dist.run.run_dir import eval_options

    config = demo.get_config()
    assert eval_options(config).remove_bad_endings is False and eval_options(config).block_trigrams is False
    config.eval.remove_bad_endings, config.eval.block_trigrams = True, True
    assert eval_options(config).remove_bad_endings and eval_options(config).block_trigrams
    old_run = ml_collections.ConfigDict({"eval": {"beam_width": 2}})  # a run from before the options existed
    assert eval_options(old_run) == DecodeOptions(beam_width=2)
    assert eval_options(old_run).summary() == {"beam_width": 2, "length_normalization": "average", "alpha": 0.6,
                                               "remove_bad_endings": False, "block_trigrams": False}
