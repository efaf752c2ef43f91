"""The train step under strategies: same global batch -> same update, whatever the replica count."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.model.show_and_tell import build_model
from showtell_dist.training.trainer import Trainer
from tiny_setup import VOCAB, global_batch as _global_batch, tiny_config, train_tiny as _train, mirrored

HERE = os.path.dirname(os.path.abspath(__file__))
# Exact-equivalence comparisons run in float64 (see tiny_setup.train_tiny); float32 training under
# every strategy is exercised by the other tests.
POLICY = "float64"

def _mirrored(n):
    return mirrored(n)


def _train_in_subprocess(tmp_path, replicas, **overrides):
    """Collective group keys clash between two Mirrored strategies of different sizes in one
    process, so every size but 2 runs in a fresh process."""
    out = str(tmp_path / f"r{replicas}.npz")
    args = [sys.executable, os.path.join(HERE, "tiny_train_subprocess.py"), str(replicas), out]
    args += [f"{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(out)
    metrics = {"loss": float(data["loss"]), "tokens": float(data["tokens"]), "grad_norm": float(data["grad_norm"])}
    return metrics, [data[f"w{i}"] for i in range(len(data.files) - 3)]


@pytest.fixture(scope="module")
def single_device():
    return _train(tf.distribute.get_strategy(), dtype_policy=POLICY)


@pytest.mark.parametrize("replicas", [2, 4])
def test_mirrored_equals_one_device(single_device, replicas, tmp_path):
    loss_1, weights_1 = single_device
    loss_n, weights_n = (_train(_mirrored(2), dtype_policy=POLICY) if replicas == 2
                         else _train_in_subprocess(tmp_path, replicas, dtype_policy=POLICY))
    assert loss_n["tokens"] == loss_1["tokens"]
    np.testing.assert_allclose(loss_n["loss"], loss_1["loss"], atol=1e-5)
    np.testing.assert_allclose(loss_n["grad_norm"], loss_1["grad_norm"], rtol=1e-5)
    for a, b in zip(weights_1, weights_n):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_clipping_uses_the_global_norm(single_device):
    """With a tiny clip_norm every step is clipped; N replicas must still match one device."""
    _, w1 = _train(tf.distribute.get_strategy(), clip_norm=1e-3, dtype_policy=POLICY)
    _, w2 = _train(_mirrored(2), clip_norm=1e-3, dtype_policy=POLICY)
    _, unclipped = single_device
    assert any(not np.allclose(a, b, atol=1e-5) for a, b in zip(w1, unclipped))
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_weight_average_under_mirrored_equals_one_device():
    m1, w1 = _train(tf.distribute.get_strategy(), steps=3, weight_average_decay=0.5, dtype_policy=POLICY)
    m2, w2 = _train(_mirrored(2), steps=3, weight_average_decay=0.5, dtype_policy=POLICY)
    assert any(not np.allclose(a, w) for a, w in zip(m1["averages"], w1))  # the average lags the weights
    for a, b in zip(m1["averages"], m2["averages"]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_jit_compiled_step_matches_on_the_default_strategy(single_device):
    metrics, weights = _train(tf.distribute.get_strategy(), jit_compile=True, dtype_policy=POLICY)
    np.testing.assert_allclose(metrics["loss"], single_device[0]["loss"], atol=1e-5)
    for a, b in zip(weights, single_device[1]):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_step_trains(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        config = tiny_config("unused", mixed_precision=policy)
        keras.utils.set_random_seed(0)
        model = build_model(config.model, VOCAB)
        trainer = Trainer(tf.distribute.get_strategy(), model, config.train, mixed_precision=policy)
        iterator = iter(tf.data.Dataset.from_tensors(_global_batch()).repeat())
        first = trainer.train_loop(iterator, 1)["loss"]
        later = trainer.train_loop(iterator, 20)["loss"]
        assert np.isfinite(first) and later < first
        assert model.logits.compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
