"""Tests for showtell_dist.decoding.beam_search (tiny models, CPU, a few seconds each).

Module-level code must not initialise TensorFlow devices: the distributed
test imports this file in a subprocess that first configures 2 logical CPUs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import keras
import tensorflow as tf

from showtell_dist.decoding.beam_search import (
    BeamSearchResult,
    beam_search,
    greedy_decode,
    normalized_score,
)
from showtell_dist.errors import ConfigError

# Tiny vocabulary: 0 pad, 1 start, 2 end, 3..5 words, 6 unknown.
VOCAB = 7
PAD, START, END, UNK = 0, 1, 2, 6
FORBIDDEN = (START, UNK)
EMBED = 4
HIDDEN = 8


class TinyDecoder:
    """Embedding -> LSTMCell -> Dense single-step decoder with seeded weights."""

    def __init__(self, seed: int = 0, logit_scale: float = 2.5, end_bias: float = 0.0):
        self.embedding = keras.layers.Embedding(VOCAB, EMBED)
        self.cell = keras.layers.LSTMCell(HIDDEN)
        self.dense = keras.layers.Dense(VOCAB)
        self.embedding.build((None,))
        self.cell.build((None, EMBED))
        self.dense.build((None, HIDDEN))
        rng = np.random.default_rng(seed)
        for layer, scale in ((self.embedding, 1.0), (self.cell, 0.8), (self.dense, logit_scale)):
            for w in layer.weights:
                w.assign(rng.normal(0.0, scale, size=tuple(w.shape)).astype("float32"))
        bias = self.dense.bias.numpy()
        bias[END] += end_bias  # makes captions end early enough for early stopping to matter
        self.dense.bias.assign(bias)

    def step(self, tokens, state):
        """tokens [N] int32, state (h [N, H], c [N, H]) -> (logits [N, V], (h, c))."""
        h, c = state
        out, (h2, c2) = self.cell(self.embedding(tokens), [h, c])
        return self.dense(out), (h2, c2)


def initial_state(batch: int, seed: int = 1):
    """(h, c) as float32 numpy arrays [batch, HIDDEN] standing in for image encodings."""
    rng = np.random.default_rng(seed)
    h = rng.normal(0.0, 1.0, size=(batch, HIDDEN)).astype("float32")
    c = rng.normal(0.0, 1.0, size=(batch, HIDDEN)).astype("float32")
    return h, c


def run_beam(step, state, jit: bool = False, **kwargs) -> BeamSearchResult:
    """beam_search inside one tf.function; `state` is a tuple of numpy arrays. Returns numpy arrays."""
    kwargs.setdefault("start_id", START)
    kwargs.setdefault("end_id", END)
    kwargs.setdefault("vocab_size", VOCAB)
    kwargs.setdefault("forbidden_ids", FORBIDDEN)

    @tf.function(jit_compile=jit)
    def decode(*parts):
        return beam_search(step, tuple(parts), **kwargs)

    result = decode(*[tf.constant(x) for x in state])
    return BeamSearchResult(*[r.numpy() for r in result])


def bigram_step(probs: dict):
    """Step whose next-token distribution depends only on the fed token.

    probs maps a fed token to {next token: probability}; unlisted rows are
    uniform. The state (a dummy [N, 1] counter) just rides along.
    """
    table = np.zeros((VOCAB, VOCAB), np.float32)
    for fed, row in probs.items():
        table[fed] = -30.0
        for tok, p in row.items():
            table[fed, tok] = math.log(p)
    table_t = tf.constant(table)  # [V, V]

    def step(tokens, state):
        (count,) = state  # [N, 1]
        return tf.gather(table_t, tokens), (count + 1.0,)  # [N, V]

    return step


def _row(state, b):
    return tuple(x[b:b + 1] for x in state)


def _log_softmax_masked(logits: np.ndarray, banned) -> np.ndarray:
    logits = logits.astype(np.float64).copy()
    logits[:, list(banned)] = -np.inf
    m = logits.max(axis=1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))


def exhaustive_search(step, state_row, max_len, norm, alpha=0.6):
    """All sequences (ending at END or at max_len) for one image, best first.

    Returns a list of (tokens tuple, score, log_prob).
    """
    banned = (PAD,) + FORBIDDEN
    allowed = [t for t in range(VOCAB) if t not in banned]
    finished = []
    # frontier: (tokens, log_prob, h row, c row, last token)
    frontier = [((), 0.0, state_row[0][0], state_row[1][0], START)]
    for depth in range(max_len):
        tokens = tf.constant([f[4] for f in frontier], tf.int32)
        h = tf.constant(np.stack([f[2] for f in frontier]))
        c = tf.constant(np.stack([f[3] for f in frontier]))
        logits, (h2, c2) = step(tokens, (h, c))
        log_probs = _log_softmax_masked(np.asarray(logits), banned)
        h2, c2 = np.asarray(h2), np.asarray(c2)
        new_frontier = []
        for i, (seq, lp, _, _, _) in enumerate(frontier):
            for tok in allowed:
                seq2, lp2 = seq + (tok,), lp + log_probs[i, tok]
                if tok == END or depth == max_len - 1:
                    finished.append((seq2, lp2))
                else:
                    new_frontier.append((seq2, lp2, h2[i], c2[i], tok))
        frontier = new_frontier
    scored = []
    for seq, lp in finished:
        n = len(seq)
        pen = {"none": 1.0, "average": float(n), "gnmt": ((5.0 + n) / 6.0) ** alpha}[norm]
        scored.append((seq, lp / pen, lp))
    scored.sort(key=lambda x: -x[1])
    return scored


def reference_beam_search(step, state_row, beam, max_len, norm, alpha=0.6):
    """Alive/finished beam search in plain Python for one image, WITHOUT early stopping.

    state_row: tuple of numpy arrays [1, ...]. Returns [(tokens tuple, score, log_prob)], best first.
    """
    banned = (PAD,) + FORBIDDEN
    allowed = [t for t in range(VOCAB) if t not in banned]
    alive = [((), 0.0, tuple(x[0] for x in state_row), START)]
    finished = []
    for t in range(max_len):
        states = tuple(tf.constant(np.stack([a[2][j] for a in alive])) for j in range(len(state_row)))
        logits, new_states = step(tf.constant([a[3] for a in alive], tf.int32), states)
        log_probs = _log_softmax_masked(np.asarray(logits), banned)
        new_states = [np.asarray(x) for x in new_states]
        cands = [(a[0] + (tok,), a[1] + log_probs[i, tok], i, tok) for i, a in enumerate(alive) for tok in allowed]
        cands.sort(key=lambda x: -x[1])
        top = cands[:2 * beam]
        n = t + 1
        pen = {"none": 1.0, "average": float(n), "gnmt": ((5.0 + n) / 6.0) ** alpha}[norm]
        finished += [(seq, lp / pen, lp) for seq, lp, _, tok in top if tok == END or n == max_len]
        finished = sorted(finished, key=lambda x: -x[1])[:beam]
        alive = [(seq, lp, tuple(x[i] for x in new_states), tok) for seq, lp, i, tok in top if tok != END][:beam]
    return finished


def assert_matches_reference(result, b, expected):
    """Row b of a BeamSearchResult equals a reference list [(tokens, score, log_prob)]."""
    n = len(expected)
    got = [tuple(int(t) for t in result.tokens[b, k, :result.lengths[b, k]]) for k in range(n)]
    assert got == [seq for seq, _, _ in expected]
    np.testing.assert_allclose(result.scores[b, :n], [s for _, s, _ in expected], atol=1e-5)
    np.testing.assert_allclose(result.log_probs[b, :n], [lp for _, _, lp in expected], atol=1e-5)
    np.testing.assert_array_equal(result.lengths[b, :n], [len(seq) for seq, _, _ in expected])


def python_greedy(step, state_row, max_len):
    """Reference arg-max loop, one image, eager, step by step."""
    banned = (PAD,) + FORBIDDEN
    h, c = tf.constant(state_row[0]), tf.constant(state_row[1])
    last, out = START, []
    for _ in range(max_len):
        logits, (h, c) = step(tf.constant([last], tf.int32), (h, c))
        last = int(np.argmax(_log_softmax_masked(np.asarray(logits), banned)[0]))
        out.append(last)
        if last == END:
            break
    return out


# ----------------------------------------------------------------------------
# 1. Large K == exhaustive search
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["none", "average", "gnmt"])
def test_large_beam_equals_exhaustive_search(norm):
    max_len, beam = 3, 64  # 4 allowed tokens -> 1 + 3 + 9 + 27 = 40 sequences < 64
    decoder = TinyDecoder(seed=0)
    state = initial_state(2, seed=3)
    result = run_beam(decoder.step, state, beam_width=beam, max_len=max_len, length_normalization=norm)
    assert result.tokens.shape == (2, beam, max_len)
    for b in range(2):
        expected = exhaustive_search(decoder.step, _row(state, b), max_len, norm)
        n = len(expected)
        assert n == 40
        gaps = np.diff([s for _, s, _ in expected])
        assert np.all(np.abs(gaps) > 1e-4), "tie in the reference ranking: pick another seed"
        assert_matches_reference(result, b, expected)
        # Padding after the hypothesis, and empty rows beyond the 40 real ones.
        for k in range(n):
            assert np.all(result.tokens[b, k, result.lengths[b, k]:] == PAD)
        assert np.all(np.isneginf(result.scores[b, n:]))
        assert np.all(result.lengths[b, n:] == 0) and np.all(result.tokens[b, n:] == PAD)


def test_early_stopping_does_not_change_results():
    """Beam search with early stopping == the same search run to max_len (Python reference)."""
    max_len, beam = 7, 3
    stopped_early = set()
    for seed, norm in [(2, "none"), (2, "average"), (2, "gnmt"), (1, "gnmt"), (3, "none")]:
        decoder = TinyDecoder(seed=seed, end_bias=4.0)
        state = initial_state(2, seed=seed + 20)
        result = run_beam(decoder.step, state, beam_width=beam, max_len=max_len, length_normalization=norm)
        if result.steps < max_len:
            stopped_early.add(norm)
        for b in range(2):
            expected = reference_beam_search(decoder.step, _row(state, b), beam, max_len, norm)
            assert len(expected) == beam
            assert_matches_reference(result, b, expected)
    assert stopped_early == {"none", "average", "gnmt"}, stopped_early  # the comparison did exercise early stopping


def test_average_bound_uses_longest_length():
    """'average' must bound an alive hypothesis by log_prob / max_len, not / its current length.

    [5] is unlikely (-2.66) but continues almost surely, so the truncated
    [5 5 5 5 5 5] averages -0.444 and beats [3 END] (-0.46). After 2 steps
    the finished set {[3 END] -0.46, [END] -0.69} is full and the alive [5 5]
    has -2.66: dividing by the current length (-0.89) would wrongly stop.
    """
    step = bigram_step({
        START: {END: 0.5, 3: 0.42, 5: 0.07, 4: 0.01},
        3: {END: 0.95, 4: 0.05},
        4: {END: 0.6, 4: 0.4},
        5: {5: 0.999, END: 0.001},
    })
    state = (np.zeros((1, 1), np.float32),)
    result = run_beam(step, state, beam_width=2, max_len=6, length_normalization="average")
    assert list(result.tokens[0, 0]) == [5] * 6
    assert list(result.tokens[0, 1]) == [3, END, 0, 0, 0, 0]
    assert_matches_reference(result, 0, reference_beam_search(step, state, 2, 6, "average"))


@pytest.mark.parametrize("norm", ["none", "average", "gnmt"])
def test_frequent_end_tokens_do_not_starve_alive_beams(norm):
    """END is the likeliest token everywhere; alive beams must still be refilled from the 2K candidates."""
    step = bigram_step({
        START: {END: 0.4, 3: 0.33, 4: 0.17, 5: 0.1},
        3: {END: 0.45, 3: 0.15, 4: 0.25, 5: 0.15},
        4: {END: 0.5, 3: 0.3, 4: 0.12, 5: 0.08},
        5: {END: 0.95, 3: 0.03, 4: 0.01, 5: 0.01},  # [5 END] is top-3, but [5] ranks 4th at step 0
    })
    state = (np.zeros((1, 1), np.float32),)
    result = run_beam(step, state, beam_width=3, max_len=5, length_normalization=norm)
    assert_matches_reference(result, 0, reference_beam_search(step, state, 3, 5, norm))


# ----------------------------------------------------------------------------
# 2. K = 1 == greedy
# ----------------------------------------------------------------------------


def test_beam_width_one_equals_greedy():
    max_len = 5
    decoder = TinyDecoder(seed=4)
    state = initial_state(4, seed=5)

    @tf.function
    def greedy(h, c):
        return greedy_decode(decoder.step, (h, c), max_len=max_len, start_id=START, end_id=END,
                             forbidden_ids=FORBIDDEN)

    tokens, lengths = [x.numpy() for x in greedy(tf.constant(state[0]), tf.constant(state[1]))]
    assert tokens.shape == (4, max_len) and tokens.dtype == np.int32
    for b in range(4):
        ref = python_greedy(decoder.step, _row(state, b), max_len)
        assert lengths[b] == len(ref)
        assert list(tokens[b, :lengths[b]]) == ref
        assert np.all(tokens[b, lengths[b]:] == PAD)
    for norm in ("none", "average", "gnmt"):
        result = run_beam(decoder.step, state, beam_width=1, max_len=max_len, length_normalization=norm)
        np.testing.assert_array_equal(result.tokens[:, 0], tokens)
        np.testing.assert_array_equal(result.lengths[:, 0], lengths)
        np.testing.assert_allclose(result.scores[:, 0],
                                   normalized_score(result.log_probs[:, 0], lengths, norm).numpy(), atol=1e-6)


def test_beam_width_one_ignores_runner_up_end():
    """K=1 follows the arg-max path even when a runner-up END (kept by the 2K scheme) would score better."""
    step = bigram_step({START: {3: 0.55, END: 0.45}, 3: {3: 0.3, 4: 0.26, 5: 0.24, END: 0.2}})
    state = (np.zeros((2, 1), np.float32),)
    tokens, lengths = greedy_decode(step, (tf.constant(state[0]),), max_len=3, start_id=START, end_id=END,
                                    forbidden_ids=FORBIDDEN)
    np.testing.assert_array_equal(tokens.numpy(), [[3, 3, 3]] * 2)
    np.testing.assert_array_equal(lengths.numpy(), [3, 3])
    for norm in ("none", "average", "gnmt"):
        result = run_beam(step, state, beam_width=1, max_len=3, length_normalization=norm)
        np.testing.assert_array_equal(result.tokens[:, 0], [[3, 3, 3]] * 2)
        np.testing.assert_allclose(result.log_probs[:, 0], [math.log(0.55 * 0.3 * 0.3)] * 2, atol=1e-5)


# ----------------------------------------------------------------------------
# 3. Batch == each image alone; 4. XLA == no XLA
# ----------------------------------------------------------------------------


def _assert_same(a: BeamSearchResult, b: BeamSearchResult):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-5)


def test_batch_equals_single_images():
    decoder = TinyDecoder(seed=6)
    state = initial_state(3, seed=7)
    kwargs = dict(beam_width=3, max_len=5, length_normalization="average")
    batched = run_beam(decoder.step, state, **kwargs)
    for b in range(3):
        alone = run_beam(decoder.step, _row(state, b), **kwargs)
        _assert_same(BeamSearchResult(*[x[b:b + 1] for x in batched[:4]], alone.steps), alone)
    # Sorted best first, all rows real.
    assert np.all(np.diff(batched.scores, axis=1) <= 0)
    assert np.all(np.isfinite(batched.scores))


def test_unknown_batch_dimension():
    """A tf.function traced with batch None (e.g. a serving signature) decodes the same."""
    decoder = TinyDecoder(seed=6)
    state = initial_state(3, seed=7)
    spec = tf.TensorSpec([None, HIDDEN], tf.float32)

    @tf.function(input_signature=[spec, spec])
    def decode(h, c):
        return beam_search(decoder.step, (h, c), beam_width=3, max_len=5, start_id=START, end_id=END,
                           vocab_size=VOCAB, forbidden_ids=FORBIDDEN)

    dynamic = BeamSearchResult(*[x.numpy() for x in decode(tf.constant(state[0]), tf.constant(state[1]))])
    assert decode.get_concrete_function().structured_outputs.tokens.shape.as_list() == [None, 3, 5]
    _assert_same(dynamic, run_beam(decoder.step, state, beam_width=3, max_len=5))


def test_jit_compile_matches_graph():
    decoder = TinyDecoder(seed=8)
    state = initial_state(2, seed=9)
    kwargs = dict(beam_width=3, max_len=5, length_normalization="gnmt", alpha=0.7)
    _assert_same(run_beam(decoder.step, state, jit=True, **kwargs), run_beam(decoder.step, state, jit=False, **kwargs))


# ----------------------------------------------------------------------------
# 5. MirroredStrategy over 2 logical CPUs (subprocess: device setup must come first)
# ----------------------------------------------------------------------------

_DISTRIBUTED_SCRIPT = r"""
import importlib.util, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

spec = importlib.util.spec_from_file_location("beam_tests", sys.argv[1])
T = importlib.util.module_from_spec(spec)
spec.loader.exec_module(T)
from showtell_dist.decoding.beam_search import beam_search

batch = 4
kwargs = dict(beam_width=3, max_len=5, start_id=T.START, end_id=T.END, vocab_size=T.VOCAB,
              forbidden_ids=T.FORBIDDEN, length_normalization="average")
h0, c0 = T.initial_state(batch, seed=11)
reference = T.run_beam(T.TinyDecoder(seed=10).step, (h0, c0), **{k: v for k, v in kwargs.items()
                       if k not in ("start_id", "end_id", "vocab_size", "forbidden_ids")})

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # its own process: no shared strategy
assert strategy.num_replicas_in_sync == 2
with strategy.scope():
    decoder = T.TinyDecoder(seed=10)

@tf.function
def decode(h, c):
    r = beam_search(decoder.step, (h, c), **kwargs)
    return r.tokens, r.scores, r.log_probs, r.lengths

dataset = tf.data.Dataset.from_tensor_slices((h0, c0)).batch(batch, drop_remainder=True)
(h, c), = list(strategy.experimental_distribute_dataset(dataset))
per_replica = strategy.run(decode, args=(h, c))
local = strategy.experimental_local_results(per_replica[0])
assert len(local) == 2 and [int(x.shape[0]) for x in local] == [2, 2], [x.shape for x in local]
gathered = [strategy.gather(x, axis=0).numpy() for x in per_replica]
np.testing.assert_array_equal(gathered[0], reference.tokens)
np.testing.assert_allclose(gathered[1], reference.scores, atol=1e-5)
np.testing.assert_allclose(gathered[2], reference.log_probs, atol=1e-5)
np.testing.assert_array_equal(gathered[3], reference.lengths)
print("DISTRIBUTED_OK")
"""


def test_mirrored_strategy_matches_single_device():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _DISTRIBUTED_SCRIPT, os.path.abspath(__file__)],
                          capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert proc.returncode == 0 and "DISTRIBUTED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


# ----------------------------------------------------------------------------
# 6. Finished hypotheses are not pushed out by live ones
# ----------------------------------------------------------------------------


def _scripted_step(first_logits, later_logits):
    """Pure-TF step whose logits depend only on the step index (state = counter [N, 1])."""
    first = tf.constant(first_logits, tf.float32)  # [V]
    later = tf.constant(later_logits, tf.float32)  # [V]

    def step(tokens, state):
        (count,) = state  # [N, 1]
        is_first = tf.equal(count, 0.0)  # [N, 1]
        logits = tf.where(is_first, first[None, :], later[None, :])  # [N, V]
        return logits, (count + 1.0,)

    return step


@pytest.mark.parametrize("norm", ["none", "average", "gnmt"])
def test_early_finished_hypothesis_survives(norm):
    # Step 0: ending is very likely; afterwards every continuation is poor.
    step = _scripted_step(first_logits=[0, 0, 4.0, 0.5, 0.3, 0.1, 0],
                          later_logits=[0, 0, -1.0, 0.2, 0.1, 0.0, 0])
    counter = np.zeros((2, 1), np.float32)

    @tf.function
    def decode(count):
        return beam_search(step, (count,), beam_width=2, max_len=6, start_id=START, end_id=END,
                           vocab_size=VOCAB, forbidden_ids=FORBIDDEN, length_normalization=norm)

    result = BeamSearchResult(*[x.numpy() for x in decode(tf.constant(counter))])
    for b in range(2):
        assert list(result.tokens[b, 0]) == [END, 0, 0, 0, 0, 0]
        assert result.lengths[b, 0] == 1
        assert result.scores[b, 0] > result.scores[b, 1] > -np.inf
        assert result.lengths[b, 1] >= 2  # the runner-up is a longer, live-grown hypothesis


# ----------------------------------------------------------------------------
# 7. Forbidden ids never produced; early stopping
# ----------------------------------------------------------------------------


def test_forbidden_ids_never_generated_and_early_stop():
    max_len = 20
    # Pad (0), start (1) and unknown (6) get the largest logits: they must be masked.
    # Step 0 strongly prefers word 3; every later step strongly prefers END.
    step = _scripted_step(first_logits=[20, 20, -5, 10, 0.5, 0.2, 20],
                          later_logits=[20, 20, 10, 0.3, 0.2, 0.1, 20])
    counter = np.zeros((3, 1), np.float32)
    steps = {}
    for norm in ("none", "average", "gnmt"):
        @tf.function
        def decode(count):
            return beam_search(step, (count,), beam_width=2, max_len=max_len, start_id=START, end_id=END,
                               vocab_size=VOCAB, forbidden_ids=FORBIDDEN, length_normalization=norm)

        result = BeamSearchResult(*[x.numpy() for x in decode(tf.constant(counter))])
        steps[norm] = int(result.steps)
        for b in range(3):
            assert list(result.tokens[b, 0, :2]) == [3, END]
            for k in range(2):
                n = result.lengths[b, k]
                assert n >= 1 and np.all(np.isin(result.tokens[b, k, :n], [END, 3, 4, 5]))
                assert np.all(result.tokens[b, k, n:] == PAD)
                assert result.tokens[b, k, n - 1] == END
    assert steps["none"] <= 3, steps
    assert steps["gnmt"] <= 5, steps
    assert steps["average"] < max_len, steps

    # Greedy decoding masks them too.
    tokens, lengths = greedy_decode(step, (tf.constant(counter),), max_len=max_len, start_id=START,
                                    end_id=END, forbidden_ids=FORBIDDEN)
    np.testing.assert_array_equal(tokens.numpy()[:, :3], [[3, END, 0]] * 3)
    np.testing.assert_array_equal(lengths.numpy(), [2, 2, 2])


def test_bad_arguments_raise_config_error():
    step = _scripted_step([0] * VOCAB, [0] * VOCAB)
    state = (tf.zeros([1, 1]),)
    common = dict(max_len=3, start_id=START, end_id=END, vocab_size=VOCAB)
    with pytest.raises(ConfigError):
        beam_search(step, state, beam_width=2, length_normalization="sum", **common)
    with pytest.raises(ConfigError):
        beam_search(step, state, beam_width=0, **common)
    with pytest.raises(ConfigError):
        beam_search(step, state, beam_width=2, forbidden_ids=(END,), **common)
    with pytest.raises(ConfigError):
        beam_search(step, state, beam_width=2, forbidden_ids=(VOCAB,), **common)
