"""Runs of several phases (xe then scst): one step counter, exact resume across the boundary, init_checkpoint."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from configs import scst
from showtell_dist.errors import ConfigError
from showtell_dist.run.restore import load_trained_model
from showtell_dist.training import train_loop
from showtell_dist.training.phases import KINDS, SECTIONS, data_dir_for, phase_at, phases_of, total_steps
from tiny_setup import tiny_config

STRATEGY = tf.distribute.get_strategy()


def _config(records_dir):
    c = tiny_config(records_dir, steps=3, steps_per_loop=1, checkpoint_every=0)
    c.model.dropout = 0.2
    c.phases = "xe,scst"
    # Dropout on while sampling: its masks, like the samples, must resume exactly too.
    c.scst = scst.section(steps=3, global_batch_size=8, max_len=6, learning_rate=1e-3, dropout=True)
    return c


def _weights(exp):
    return [v.numpy() for v in exp.model.variables]


def test_phase_ranges_and_errors():
    c = _config("unused")
    phases = phases_of(c)
    assert [(p.name, p.start, p.end) for p in phases] == [("xe", 0, 3), ("scst", 3, 6)]
    assert total_steps(c) == 6
    assert phase_at(phases, 2).name == "xe" and phase_at(phases, 3).name == "scst" and phase_at(phases, 6).name == "scst"
    c.phases = "xe,rl"
    with pytest.raises(ConfigError, match="unknown phase"):
        phases_of(c)
    c.phases = "xe,scst"
    del c["scst"]
    with pytest.raises(ConfigError, match="no `scst` section"):
        phases_of(c)


def test_resume_across_the_phase_boundary_is_exact(tiny_dataset, tmp_path):
    records, _ = tiny_dataset
    config = _config(records)
    logs = []
    full_metrics, full = train_loop.train(config, STRATEGY, str(tmp_path / "full"), show_progress=False,
                                          log=logs.append)
    assert full_metrics["step"] == 6 and full_metrics["phase"] == "scst" and "reward" in full_metrics
    assert any(line.startswith("phase 2/2 'scst': global steps 3..6") for line in logs), logs

    model_dir = str(tmp_path / "resumed")
    first, _ = train_loop.train(config, STRATEGY, model_dir, show_progress=False, stop_at_step=3)
    assert first["step"] == 3 and first["phase"] == "xe"
    second, _ = train_loop.train(config, STRATEGY, model_dir, show_progress=False, stop_at_step=4)
    assert second["step"] == 4 and second["phase"] == "scst"
    resumed_metrics, resumed = train_loop.train(config, STRATEGY, model_dir, show_progress=False)
    assert resumed_metrics["step"] == 6
    np.testing.assert_allclose(resumed_metrics["reward"], full_metrics["reward"], atol=1e-6)
    for a, b in zip(_weights(full), _weights(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(resumed_metrics["val_loss"], full_metrics["val_loss"], atol=1e-6)


def test_init_checkpoint_starts_from_another_runs_weights(tiny_dataset, tiny_trained_dir, tmp_path):
    records, _ = tiny_dataset
    config = _config(records)
    config.phases = "scst"
    config.scst.learning_rate = 0.0  # the weights stay those of the checkpoint
    config.init_checkpoint = f"{tiny_trained_dir}/checkpoints"
    _, exp = train_loop.train(config, STRATEGY, str(tmp_path / "scst"), show_progress=False)
    source = load_trained_model(tiny_trained_dir, "latest")
    for a, b in zip(source.model.trainable_variables, exp.model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-7)
    assert exp.trainer.current_step() == 3

    config.init_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="init_checkpoint"):
        train_loop.train(config, STRATEGY, str(tmp_path / "other"), show_progress=False)


def test_the_registry_says_each_kinds_rules():
    from showtell_dist import config_fields

    # The TF-free validation's names (config_fields) are the registry's.
    assert set(SECTIONS) == set(KINDS) and SECTIONS is config_fields.PHASE_SECTIONS
    assert set(config_fields.PHASES_NEEDING_TRAINED_WEIGHTS) <= set(KINDS)
    assert [name for name, kind in KINDS.items() if kind.trains_encoder] == ["finetune"]
    assert [name for name, kind in KINDS.items() if not kind.caption_buckets] == ["scst"]
    c = _config("unused")
    assert [p.kind for p in phases_of(c)] == [KINDS["xe"], KINDS["scst"]]
    assert "samples per image" in phases_of(c)[1].describe(2)


def test_a_new_phase_is_one_registry_entry(tiny_dataset, tmp_path, monkeypatch):
    """A kind added to KINDS (here cross-entropy again, with its own section) is read, trained and logged."""
    records, _ = tiny_dataset
    monkeypatch.setitem(KINDS, "xe_again", dataclasses.replace(KINDS["xe"], name="xe_again",
                                                               description="cross-entropy, again"))
    monkeypatch.setitem(SECTIONS, "xe_again", "again")
    c = tiny_config(records, steps=2, steps_per_loop=1)
    c.phases = "xe,xe_again"
    c.again = c.train.copy_and_resolve_references()
    c.again.steps = 1
    assert [(p.name, p.start, p.end) for p in phases_of(c)] == [("xe", 0, 2), ("xe_again", 2, 3)]
    assert data_dir_for(c, "xe_again") == records
    logs = []
    metrics, exp = train_loop.train(c, STRATEGY, str(tmp_path / "run"), show_progress=False, log=logs.append)
    assert metrics["step"] == 3 and metrics["phase"] == "xe_again" and exp.phase.section.steps == 1
    assert any(line.startswith("phase 2/2 'xe_again': global steps 2..3") for line in logs), logs
