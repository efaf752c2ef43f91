"""Checkpoints: a run stopped after k steps and resumed ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.errors import ConfigError
from showtell_dist.training import train_loop
from tiny_setup import REPO_ROOT, tiny_config, mirrored

STRATEGY = tf.distribute.get_strategy()


def _config(records_dir):
    # Dropout on: its RNG state is part of the checkpoint and must resume too; so must the moving
    # average of the weights (the val loss is computed with it).
    c = tiny_config(records_dir, steps=8, steps_per_loop=1, checkpoint_every=3, weight_average_decay=0.7)
    c.model.dropout = 0.2
    return c


def _weights(exp):
    return [v.numpy() for v in exp.model.variables]


@pytest.mark.parametrize("replicas", [1, 2])
def test_stopped_and_resumed_equals_uninterrupted(tiny_dataset, tmp_path, replicas):
    """Also under Mirrored over 2 CPU devices, where each replica draws its own dropout masks."""
    records, _ = tiny_dataset
    config = _config(records)
    strategy = STRATEGY if replicas == 1 else mirrored(2)
    full_metrics, full = train_loop.train(config, strategy, str(tmp_path / "full"), show_progress=False)
    assert full_metrics["step"] == 8

    model_dir = str(tmp_path / "resumed")
    first, _ = train_loop.train(config, strategy, model_dir, show_progress=False, stop_at_step=5)
    assert first["step"] == 5 and "val_loss" not in first
    resumed_metrics, resumed = train_loop.train(config, strategy, model_dir, show_progress=False)
    assert resumed_metrics["step"] == 8
    for a, b in zip(_weights(full), _weights(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(full.trainer.weight_average.averages, resumed.trainer.weight_average.averages):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    np.testing.assert_allclose(resumed_metrics["val_loss"], full_metrics["val_loss"], atol=1e-6)
    assert json.load(open(os.path.join(model_dir, "config.json")))["train"]["steps"] == 8
    assert os.path.exists(os.path.join(model_dir, "vocab.json"))
    assert tf.io.gfile.glob(os.path.join(model_dir, "train", "events.*"))


def test_refuses_to_resume_with_a_different_config(tiny_dataset, tmp_path):
    records, _ = tiny_dataset
    config = _config(records)
    model_dir = str(tmp_path / "run")
    train_loop.train(config, STRATEGY, model_dir, show_progress=False, stop_at_step=1)
    config.model.units = 32
    config.train.learning_rate = 0.5
    with pytest.raises(ConfigError, match=r"model.units: saved 16, now 32") as err:
        train_loop.train(config, STRATEGY, model_dir, show_progress=False)
    assert "train.learning_rate" in str(err.value)
    # Operational settings may change.
    config = _config(records)
    config.train.checkpoint_every = 2
    metrics, _ = train_loop.train(config, STRATEGY, model_dir, show_progress=False, stop_at_step=2)
    assert metrics["step"] == 2


def test_refuses_to_resume_with_a_different_vocabulary(tiny_dataset, tmp_path):
    records, _ = tiny_dataset
    model_dir = tmp_path / "run"
    train_loop.train(_config(records), STRATEGY, str(model_dir), show_progress=False, stop_at_step=1)
    vocab = json.loads((model_dir / "vocab.json").read_text())
    vocab["words"][-1] = "zebra"
    (model_dir / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ConfigError, match="vocab.json differs"):
        train_loop.train(_config(records), STRATEGY, str(model_dir), show_progress=False)


def test_refuses_checkpoints_without_their_config(tiny_dataset, tmp_path):
    records, _ = tiny_dataset
    model_dir = tmp_path / "run"
    train_loop.train(_config(records), STRATEGY, str(model_dir), show_progress=False, stop_at_step=1)
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match="holds checkpoints but .*config.json is missing"):
        train_loop.train(_config(records), STRATEGY, str(model_dir), show_progress=False)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tiny_dataset, tmp_path):
    """A real preemption: SIGTERM to the launcher mid-run -> checkpoint, exit 143, then resume."""
    records, _ = tiny_dataset
    model_dir = str(tmp_path / "run")
    args = [sys.executable, os.path.join(REPO_ROOT, "launch", "train.py"), f"--model_dir={model_dir}",
            f"--config.data.records_dir={records}", "--config.data.generate_synthetic=False",
            "--config.model.image_size=32", "--config.model.units=16", "--config.model.embed_dim=8",
            "--config.train.global_batch_size=8", "--config.train.steps=100000",
            "--config.train.steps_per_loop=1", "--config.train.checkpoint_every=0",
            "--config.train.eval_every=0", "--num_examples=0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(model_dir, "train")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: saved a checkpoint" in out
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    assert latest and int(latest.rsplit("-", 1)[1]) > 0
