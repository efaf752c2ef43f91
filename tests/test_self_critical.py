"""The self-critical step: replica-count independent, XLA-compilable, and its gradient raises the reward."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

if __name__ == "__main__":  # run as a script (see the end): the repository and tests/ on the path
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

from configs import scst
from showtell_dist.decoding.sampling import banned_mask, global_uniforms, sample_captions
from showtell_dist.errors import ConfigError
from showtell_dist.model.show_and_tell import build_model
from showtell_dist.training.self_critical import SelfCriticalTrainer
from tiny_setup import VOCAB, global_batch, tiny_config

POLICY = "float64"  # exact comparisons across replica counts (see tiny_setup.train_tiny)


def overlap_reward(samples, captions):
    """A toy reward: the fraction of a sample's words (ids >= 4) found among its references' words,
    times a length factor that prefers 3 words. samples [rows, T], captions [rows, C, L] -> [rows]."""
    words = samples >= 4  # [rows, T]
    refs = tf.reshape(captions, [captions.shape[0], -1])  # [rows, C * L]
    found = tf.reduce_any(tf.equal(samples[:, :, None], refs[:, None, :]), axis=2)  # [rows, T]
    n = tf.reduce_sum(tf.cast(words, tf.float32), axis=1)
    hits = tf.reduce_sum(tf.cast(tf.logical_and(words, found), tf.float32), axis=1)
    return hits / tf.maximum(n, 1.0) * tf.exp(-tf.square(n - 3.0) / 8.0)


def _train(strategy, steps=2, dtype_policy=POLICY, jit_compile=False, batch=None, **scst_overrides):
    config = tiny_config("unused")
    section = scst.section(**{"max_len": 6, "learning_rate": 1e-2, "global_batch_size": 8, **scst_overrides})
    keras.mixed_precision.set_global_policy(dtype_policy)
    try:
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(config.model, VOCAB)
        trainer = SelfCriticalTrainer(strategy, model, section, overlap_reward, seed=7, jit_compile=jit_compile)
        ds = tf.data.Dataset.from_tensors(batch or global_batch()).repeat()
        iterator = iter(strategy.experimental_distribute_dataset(ds))
        metrics = [trainer.train_loop(iterator, 1) for _ in range(steps)]
        return metrics, [v.numpy() for v in model.trainable_variables]
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def single_device():
    return _train(tf.distribute.get_strategy())


def _train_mirrored_in_subprocess(tmp_path, replicas):
    """Mirrored in a fresh process: in one process, a Mirrored strategy made earlier (another test's, in
    float32) leaves collective instances that clash with this float64 one's."""
    out = str(tmp_path / f"scst_r{replicas}.npz")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(replicas), out], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(out)
    return json.loads(str(data["metrics"])), [data[f"w{i}"] for i in range(len(data.files) - 1)]


def test_mirrored_equals_one_device(single_device, tmp_path):
    metrics_1, weights_1 = single_device
    metrics_2, weights_2 = _train_mirrored_in_subprocess(tmp_path, 2)
    for a, b in zip(metrics_1, metrics_2):
        assert a["samples"] == b["samples"] == 8 * 5
        # The same samples: the same rewards and lengths, to the last bit of float32 sums.
        np.testing.assert_allclose(a["reward"], b["reward"], atol=1e-6)
        assert a["sample_length"] == b["sample_length"]
        np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(weights_1, single_device_initial()))  # it trained
    for a, b in zip(weights_1, weights_2):
        np.testing.assert_allclose(a, b, atol=1e-6)


def single_device_initial():
    keras.mixed_precision.set_global_policy(POLICY)
    try:
        keras.utils.set_random_seed(0)
        return [v.numpy() for v in build_model(tiny_config("unused").model, VOCAB).trainable_variables]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_jit_compiled_step_matches_on_the_default_strategy(single_device):
    metrics, weights = _train(tf.distribute.get_strategy(), jit_compile=True)
    for a, b in zip(metrics, single_device[0]):
        np.testing.assert_allclose(a["reward"], b["reward"], atol=1e-6)
    for a, b in zip(weights, single_device[1]):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("baseline,xe_weight", [("mean", 0.0), ("greedy", 0.1)])
def test_steps_raise_the_mean_reward(baseline, xe_weight):
    metrics, _ = _train(tf.distribute.get_strategy(), steps=40, dtype_policy="float32", baseline=baseline,
                        xe_weight=xe_weight, learning_rate=2e-2)
    rewards = [m["reward"] for m in metrics]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.1, rewards
    if xe_weight:
        assert all(np.isfinite(m["xe_loss"]) for m in metrics)


def test_samples_follow_the_softmax_and_never_draw_banned_ids():
    vocab, rows = 6, 4000
    logits = tf.constant([[0.0, 5.0, 1.0, 2.0, 0.0, 3.0]])  # pad (0) and 1 banned below
    banned = banned_mask(vocab, (1,))

    def step_fn(tokens, state):
        return tf.tile(logits, [tf.shape(tokens)[0], 1]), state

    uniforms = global_uniforms(3, tf.constant(0), 1, tf.constant(0), rows)
    tokens, lengths = sample_captions(step_fn, (tf.zeros([rows, 1]),), uniforms, start_id=1, end_id=2,
                                      banned=banned)
    counts = np.bincount(tokens.numpy()[:, 0], minlength=vocab)
    assert counts[0] == counts[1] == 0
    p = np.exp([0, 0, 1, 2, 0, 3]) * np.array([0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(counts / rows, p / p.sum(), atol=0.03)
    assert lengths.numpy().max() == 1


def test_a_replicas_uniforms_are_its_slice_of_the_global_draw_with_or_without_xla():
    step = tf.Variable(12, dtype=tf.int64)
    full = global_uniforms(5, step, 4, tf.constant(0), 10).numpy()
    part = tf.function(lambda: global_uniforms(5, step, 4, tf.constant(6), 4), jit_compile=True)().numpy()
    np.testing.assert_array_equal(full[:, 6:], part)
    step.assign(13)
    assert not np.allclose(full, global_uniforms(5, step, 4, tf.constant(0), 10).numpy())
    many = global_uniforms(0, step, 50, tf.constant(0), 200).numpy()
    assert 0 <= many.min() and many.max() < 1 and abs(many.mean() - 0.5) < 0.01


@pytest.mark.parametrize("real_positions_only", [True, False])
def test_with_dropout_the_gradient_pass_scores_a_sample_under_the_masks_it_was_drawn_with(real_positions_only):
    """scst.dropout: the teacher-forced log p of each sample (the loss's) equals the log p accumulated while
    sampling it, token by token under that step's output-dropout mask; another seed's masks give another."""
    config = tiny_config("unused")
    config.model.dropout = 0.5
    keras.utils.set_random_seed(0)
    model = build_model(config.model, VOCAB)
    section = scst.section(max_len=6, dropout=True, temperature=0.8)
    trainer = SelfCriticalTrainer(tf.distribute.get_strategy(), model, section, overlap_reward, seed=7)
    trainer._real_positions_only = real_positions_only  # the eager path, and the XLA/TPU path's full logits
    state = model.initial_state(model.encode(tf.constant(global_batch()["images"])))  # (h, c) [8, units]
    rows = state[0].shape[0]
    seed = tf.constant([3, 4], tf.int64)
    uniforms = global_uniforms(7, tf.constant(0), 6, tf.constant(0), rows)  # [6, rows]
    samples, lengths, sampled_log_p = sample_captions(
        trainer._sampling_step_fn(seed), state + (tf.zeros([rows], tf.int32),), uniforms, start_id=1, end_id=2,
        banned=trainer._banned, temperature=0.8, with_log_probs=True)
    assert lengths.numpy().min() >= 1 and (lengths.numpy() > 1).any()
    teacher_forced = trainer._sample_log_probs(state, samples, seed).numpy()  # [rows]
    np.testing.assert_allclose(teacher_forced, sampled_log_p.numpy(), rtol=1e-5, atol=1e-5)
    other_masks = trainer._sample_log_probs(state, samples, tf.constant([3, 5], tf.int64)).numpy()
    assert np.abs(other_masks - sampled_log_p.numpy()).max() > 1e-3  # 100x the tolerance above
    trainer.dropout = False  # and the masks do act: without dropout the same samples score otherwise
    assert np.abs(trainer._sample_log_probs(state, samples, seed).numpy() - sampled_log_p.numpy()).max() > 1e-3


def test_mean_baseline_needs_two_samples():
    with pytest.raises(ConfigError, match="at least 2 samples"):
        _train(tf.distribute.get_strategy(), steps=1, samples_per_image=1)


if __name__ == "__main__":  # the Mirrored run of test_mirrored_equals_one_device: REPLICAS OUT.npz
    from showtell_dist.distribute.strategy import create_strategy

    replicas, out = int(sys.argv[1]), sys.argv[2]
    metrics, weights = _train(create_strategy("mirrored", num_cpu_devices=replicas))
    np.savez(out, metrics=json.dumps(metrics), **{f"w{i}": w for i, w in enumerate(weights)})
