"""Checkpoint selection by a validation caption metric during training (checkpoint_selection.py)."""

import json
import os

import pytest
import tensorflow as tf

from showtell_dist.errors import ConfigError
from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.evaluation.evaluator import ReportOptions, SplitOptions, evaluate_split
from showtell_dist.run.restore import load_trained_model
from showtell_dist.training import train_loop
from showtell_dist.run.run_dir import BEST_DIR, SELECTION_FILE, read_selection
from tiny_setup import tiny_config

METRIC = "BLEU-1"  # a tiny model's captions score above 0 on it, so the choice between steps is real


def _selecting_config(records_dir, **train):
    # With a moving average of the weights: selection must score the weights that are restored later.
    c = tiny_config(records_dir, **{"steps": 6, "eval_every": 2, "checkpoint_every": 2, "keep_checkpoints": 5,
                                    "learning_rate": 3e-2, "weight_average_decay": 0.5, **train})
    c.eval.select_metric = METRIC
    c.eval.beam_width = 2
    return c


@pytest.fixture(scope="module")
def selected_run(tiny_dataset, tmp_path_factory):
    """A run stopped at step 2 and resumed to step 6: selection evaluates at steps 2, 4 and 6."""
    records_dir, _ = tiny_dataset
    model_dir = str(tmp_path_factory.mktemp("selected"))
    strategy = tf.distribute.get_strategy()
    config = _selecting_config(records_dir)
    logs = []
    train_loop.train(config, strategy, model_dir, show_progress=False, stop_at_step=2, log=logs.append)
    metrics, _ = train_loop.train(config, strategy, model_dir, show_progress=False, log=logs.append)
    return model_dir, config, metrics, logs


def test_selection_keeps_the_best_scoring_step_across_a_resume(selected_run):
    model_dir, _, metrics, logs = selected_run
    selection = read_selection(model_dir)
    history = selection["history"]
    assert [h["step"] for h in history] == [2, 4, 6]  # the history survives the resume
    values = [h["metrics"][METRIC] for h in history]
    assert len(set(values)) > 1, "the tiny run should score differently at different steps"
    best_index = values.index(max(values))  # the first of equal scores wins: later ones must be better
    best = selection["best"]
    assert (best["step"], best["value"]) == (history[best_index]["step"], max(values))
    assert metrics["best_step"] == best["step"] and metrics[f"best_val_{METRIC}"] == best["value"]
    # Only the best is kept in best/, and the run's own checkpoints are untouched.
    kept = sorted(f for f in os.listdir(f"{model_dir}/{BEST_DIR}") if f.endswith(".index"))
    assert kept == [f"ckpt-{best['step']}.index"]
    assert tf.train.latest_checkpoint(f"{model_dir}/checkpoints").endswith("ckpt-6")
    assert any(f"val {METRIC}" in line for line in logs)


def test_a_finished_run_launched_again_scores_nothing_twice(selected_run):
    model_dir, config, _, _ = selected_run
    before = read_selection(model_dir)
    metrics, _ = train_loop.train(config, tf.distribute.get_strategy(), model_dir, show_progress=False)
    assert read_selection(model_dir) == before
    assert metrics["best_step"] == before["best"]["step"]


def test_selected_checkpoint_scores_what_selection_recorded(selected_run, tmp_path):
    model_dir, config, _, _ = selected_run
    best = read_selection(model_dir)["best"]
    trained = load_trained_model(model_dir)  # default: the selected checkpoint
    assert trained.step == best["step"] and trained.checkpoint_path.startswith(f"{model_dir}/{BEST_DIR}/")
    summary = evaluate_split([trained], config.data.records_dir, "val", tf.distribute.get_strategy(), str(tmp_path),
                             DecodeOptions(beam_width=2), SplitOptions(progress=False), ReportOptions(use_meteor=False))
    for name, value in best["metrics"].items():
        assert summary["metrics"][name] == pytest.approx(value, abs=1e-9), name
    assert load_trained_model(model_dir, "latest").step == 6


def test_selection_moves_with_the_run_directory(selected_run, tmp_path):
    import shutil

    model_dir, _, _, _ = selected_run
    moved = str(tmp_path / "moved")
    shutil.copytree(model_dir, moved)
    best = read_selection(moved)["best"]
    os.rename(f"{model_dir}/{BEST_DIR}", f"{model_dir}/best_hidden")  # the recorded path no longer exists
    try:
        assert load_trained_model(moved).checkpoint_path == f"{moved}/{BEST_DIR}/ckpt-{best['step']}"
    finally:
        os.rename(f"{model_dir}/best_hidden", f"{model_dir}/{BEST_DIR}")


def test_selection_config_errors(tiny_dataset, tiny_trained_dir, tmp_path):
    records_dir, _ = tiny_dataset
    config = _selecting_config(records_dir)
    config.eval.select_metric = "METEOR"
    with pytest.raises(ConfigError, match="select_metric='METEOR'.*CIDEr-D"):
        train_loop.train(config, tf.distribute.get_strategy(), str(tmp_path / "m"), show_progress=False)
    config.eval.select_metric = METRIC
    config.eval.length_normalization = "sideways"
    with pytest.raises(ConfigError, match="length_normalization = 'sideways': must be one of"):
        train_loop.train(config, tf.distribute.get_strategy(), str(tmp_path / "n"), show_progress=False)
    # A run without selection: "best" is refused with what to do instead; the default is the latest.
    with pytest.raises(ConfigError, match="no selected checkpoint.*--checkpoint=latest"):
        load_trained_model(tiny_trained_dir, "best")
    assert load_trained_model(tiny_trained_dir).checkpoint_path.startswith(f"{tiny_trained_dir}/checkpoints/")


def test_a_corrupt_selection_file_is_named(selected_run, tmp_path):
    import shutil

    model_dir, _, _, _ = selected_run
    copy = str(tmp_path / "copy")
    shutil.copytree(model_dir, copy)
    with open(f"{copy}/{BEST_DIR}/{SELECTION_FILE}", "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match=f"{SELECTION_FILE} is not valid JSON"):
        load_trained_model(copy)
    json.loads(open(f"{model_dir}/{BEST_DIR}/{SELECTION_FILE}").read())  # the original is intact


def test_evaluate_launcher_defaults_to_the_selected_checkpoint_and_the_runs_decoding(selected_run, tmp_path):
    import subprocess
    import sys

    from tiny_setup import REPO_ROOT

    model_dir, _, _, _ = selected_run
    best = read_selection(model_dir)["best"]
    out = str(tmp_path / "eval")
    args = [sys.executable, os.path.join(REPO_ROOT, "launch", "evaluate.py"), f"--model_dir={model_dir}",
            "--split=val", "--nometeor", "--noprogress", f"--output_dir={out}", "--length_normalization=none"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # beam width from the run's eval.beam_width (2), the flag overrides its length normalization
    assert f"{BEST_DIR}/ckpt-{best['step']} (step {best['step']})" in proc.stdout
    assert "beam width 2, length normalization none" in proc.stdout
    summary = json.load(open(os.path.join(out, "metrics.json")))
    assert (summary["beam_width"], summary["length_normalization"], summary["step"]) == (2, "none", best["step"])


def test_resuming_from_an_earlier_checkpoint_forgets_later_scores(selected_run, tmp_path):
    import shutil

    model_dir, config, _, _ = selected_run
    copy = str(tmp_path / "copy")
    shutil.copytree(model_dir, copy)
    for name in os.listdir(f"{copy}/checkpoints"):  # back to step 2, as if later checkpoints were lost
        if name.startswith(("ckpt-4", "ckpt-6")):
            os.remove(f"{copy}/checkpoints/{name}")
    with open(f"{copy}/checkpoints/checkpoint", "w") as f:
        f.write('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n')
    logs = []
    train_loop.train(config, tf.distribute.get_strategy(), copy, show_progress=False, log=logs.append)
    assert any("forgot the val scores of steps [4, 6]" in line for line in logs), logs
    rescored = [line for line in logs if line.startswith((f"step 4: val {METRIC}", f"step 6: val {METRIC}"))]
    assert len(rescored) == 2, logs  # scored again, not taken from the old history
    assert [h["step"] for h in read_selection(copy)["history"]] == [2, 4, 6]
    assert read_selection(copy)["best"]["step"] == read_selection(model_dir)["best"]["step"]  # deterministic
