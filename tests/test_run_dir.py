"""A run directory (run/run_dir.py): its paths, the check on reuse, and the one checkpoint resolver."""

import json
import os

import pytest
import tensorflow as tf

from showtell_dist.errors import ConfigError
from showtell_dist.run.run_dir import RunDir, checkpoint_at

CONFIG = {"model": {"units": 16}, "train": {"learning_rate": 0.1, "checkpoint_every": 2}}
VOCAB = json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "a"]})


def _save_checkpoints(directory, steps):
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), str(directory), max_to_keep=None)
    return [manager.save(checkpoint_number=step) for step in steps]


def _select(run: RunDir, prefix: str, step: int):
    run.write_selection({"metric": "BLEU-1", "best": {"step": step, "phase": "xe", "value": 0.5,
                                                      "checkpoint": prefix, "metrics": {"BLEU-1": 0.5}},
                         "history": [{"step": step, "phase": "xe", "metrics": {"BLEU-1": 0.5}}]})


def test_every_path_of_a_run(tmp_path):
    run = RunDir(f"{tmp_path}/run/")
    root = f"{tmp_path}/run"
    assert run.path == root
    assert (run.config_file, run.vocab_file) == (f"{root}/config.json", f"{root}/vocab.json")
    assert (run.checkpoints, run.best, run.selection_file) == \
        (f"{root}/checkpoints", f"{root}/best", f"{root}/best/selection.json")
    assert run.checkpoint_save_dir() == run.checkpoints
    assert run.checkpoint_save_dir(2) == f"{root}/checkpoints_worker_2"
    assert (run.best_save_dir(), run.best_save_dir(1)) == (run.best, f"{root}/best_worker_1")
    assert (run.summaries("train"), run.summaries("eval")) == (f"{root}/train", f"{root}/eval")
    assert run.eval_output("test") == f"{root}/eval_test"
    assert run.eval_output("val", ensemble=True) == f"{root}/eval_val_ensemble"
    assert run.export == f"{root}/export"


def test_reuse_keeps_the_config_and_vocabulary(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.prepare_for_training(CONFIG, VOCAB, write=False)  # a worker other than the chief writes nothing
    assert not os.path.exists(run.path)
    run.prepare_for_training(CONFIG, VOCAB, write=True)
    assert json.loads(open(run.config_file).read()) == CONFIG and open(run.vocab_file).read() == VOCAB
    # Operational settings may change; what is trained may not.
    run.prepare_for_training({**CONFIG, "train": {**CONFIG["train"], "checkpoint_every": 5}}, VOCAB, write=True)
    changed = {"model": {"units": 32}, "train": {"learning_rate": 0.5, "checkpoint_every": 2}}
    with pytest.raises(ConfigError, match=r"different config.*\n  model.units: saved 16, now 32\n  "
                                          r"train.learning_rate: saved 0.1, now 0.5"):
        run.prepare_for_training(changed, VOCAB, write=True)
    other_vocab = json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "b"]})
    with pytest.raises(ConfigError, match="vocab.json differs from the dataset's vocabulary"):
        run.prepare_for_training(CONFIG, other_vocab, write=True)


def test_checkpoints_without_their_config_are_refused(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    _save_checkpoints(run.checkpoints, [1])
    with pytest.raises(ConfigError, match="holds checkpoints but .*config.json is missing"):
        run.prepare_for_training(CONFIG, VOCAB, write=True)


def test_one_resolver_for_every_way_of_naming_a_checkpoint(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.prepare_for_training(CONFIG, VOCAB, write=True)
    with pytest.raises(ConfigError, match="no checkpoint in .*checkpoints"):
        run.resolve_checkpoint()
    first, latest = _save_checkpoints(run.checkpoints, [2, 4])
    assert run.latest_checkpoint() == latest
    assert run.resolve_checkpoint() == run.resolve_checkpoint("latest") == latest  # nothing selected yet
    with pytest.raises(ConfigError, match="no selected checkpoint.*--checkpoint=latest"):
        run.resolve_checkpoint("best")
    (best,) = _save_checkpoints(run.best, [2])
    _select(run, best, 2)
    assert run.resolve_checkpoint() == run.resolve_checkpoint("best") == best
    assert run.resolve_checkpoint("latest") == latest
    # A prefix, a directory of checkpoints or a run directory, with or without a run.
    assert checkpoint_at(first) == run.resolve_checkpoint(first) == first
    assert checkpoint_at(run.checkpoints + "/") == run.resolve_checkpoint(run.checkpoints) == latest
    assert checkpoint_at(run.path) == RunDir(str(tmp_path)).resolve_checkpoint(run.path) == best
    with pytest.raises(ConfigError, match=r"'.*nowhere' is neither a checkpoint prefix"):
        run.resolve_checkpoint(str(tmp_path / "nowhere"))


def test_a_moved_run_finds_its_selected_checkpoint_beside_selection_json(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    (best,) = _save_checkpoints(run.best, [3])
    _select(run, best, 3)
    os.rename(run.path, tmp_path / "moved")
    moved = RunDir(str(tmp_path / "moved"))
    assert moved.best_checkpoint() == f"{moved.best}/ckpt-3"
    os.remove(f"{moved.best}/ckpt-3.index")
    with pytest.raises(ConfigError, match="names checkpoint .*which does not exist; pass --checkpoint=latest"):
        moved.best_checkpoint()
