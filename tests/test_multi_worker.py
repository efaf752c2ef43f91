"""MultiWorkerMirroredStrategy for real: two worker processes on 127.0.0.1."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tiny_setup import REPO_ROOT


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _final_weights(checkpoint_dir):
    path = tf.train.latest_checkpoint(checkpoint_dir)
    assert path, f"no checkpoint in {checkpoint_dir}"
    reader = tf.train.load_checkpoint(path)
    names = sorted(n for n in reader.get_variable_to_shape_map() if n.startswith("model/"))
    return int(path.rsplit("-", 1)[1]), {n: reader.get_tensor(n) for n in names}


@pytest.mark.slow
def test_two_workers_on_loopback_train_to_identical_weights(tiny_dataset, tmp_path):
    records, _ = tiny_dataset
    model_dir = str(tmp_path / "run")
    procs = _start_workers(model_dir, records, "--config.eval.select_metric=CIDEr-D", steps=6, steps_per_loop=2)
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    assert "final: step 6" in outputs[0] and "val_loss" in outputs[0]
    # Checkpoint selection under MultiWorker: both workers decode val (captions all-gathered), the chief
    # writes selection.json, and the final evaluation of the selected checkpoint runs on both too.
    selection = json.load(open(os.path.join(model_dir, "best", "selection.json")))
    assert selection["best"]["step"] == 6 and [h["step"] for h in selection["history"]] == [6]
    assert "selected checkpoint" in outputs[0] and "CIDEr-D" in outputs[0]
    assert "selected checkpoint" not in outputs[1]
    assert os.path.exists(os.path.join(model_dir, "eval_val", "metrics.json"))
    step0, chief = _final_weights(os.path.join(model_dir, "checkpoints"))
    assert step0 == 6 and chief
    # Worker 1 saved too (the save is collective) into a scratch dir, deleted right after.
    assert not os.path.exists(os.path.join(model_dir, "checkpoints_worker_1"))


def _start_workers(model_dir, records, *flags, steps=100000, steps_per_loop=1):
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        args = [sys.executable, os.path.join(REPO_ROOT, "launch", "train.py"), "--strategy=multi_worker",
                f"--model_dir={model_dir}", f"--config.data.records_dir={records}",
                "--config.data.generate_synthetic=False", "--config.model.image_size=32",
                "--config.model.units=16", "--config.model.embed_dim=8", "--config.train.global_batch_size=8",
                f"--config.train.steps={steps}", f"--config.train.steps_per_loop={steps_per_loop}",
                "--config.train.checkpoint_every=0", "--config.train.eval_every=0", "--num_examples=0", *flags]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _finish(procs, timeout=240):
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
        raise
    return [p.returncode for p in procs], outputs


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_the_same_step_and_they_resume_there(tiny_dataset, tmp_path):
    """A preempted non-chief: both workers save step N and exit 143 (no hang in a collective);
    relaunched, both restore the chief's step N and end where an uninterrupted run ends."""
    records, _ = tiny_dataset
    model_dir = str(tmp_path / "run")
    procs = _start_workers(model_dir, records)
    deadline = time.time() + 180
    while not os.path.exists(os.path.join(model_dir, "train")) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.5)
    time.sleep(3)
    procs[1].send_signal(signal.SIGTERM)
    codes, outputs = _finish(procs)
    assert codes == [143, 143], "\n---\n".join(o[-3000:] for o in outputs)
    saved = [re.findall(r"saved a checkpoint at step (\d+)", out) for out in outputs]
    assert len(saved[0]) == len(saved[1]) == 1 and saved[0] == saved[1], saved
    assert "SIGTERM (on another worker)" in outputs[0]
    step = int(saved[0][0])
    assert _final_weights(os.path.join(model_dir, "checkpoints"))[0] == step > 0
    assert not os.path.exists(os.path.join(model_dir, "checkpoints_worker_1"))

    end = f"--stop_at_step={step + 3}"
    codes, outputs = _finish(_start_workers(model_dir, records, end))
    assert codes == [0, 0], "\n---\n".join(o[-3000:] for o in outputs)
    for out in outputs:  # the non-chief too restores the chief's checkpoint
        assert f"checkpoints/ckpt-{step} at step {step}" in out, out[-3000:]
    resumed_step, resumed = _final_weights(os.path.join(model_dir, "checkpoints"))

    reference_dir = str(tmp_path / "uninterrupted")
    codes, outputs = _finish(_start_workers(reference_dir, records, end))
    assert codes == [0, 0], "\n---\n".join(o[-3000:] for o in outputs)
    reference_step, reference = _final_weights(os.path.join(reference_dir, "checkpoints"))
    assert resumed_step == reference_step == step + 3
    assert resumed.keys() == reference.keys() and resumed
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], atol=1e-6, err_msg=name)


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    from showtell_dist.distribute.strategy import create_strategy
    from showtell_dist.errors import ConfigError

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        create_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG is not valid"):
        create_strategy("multi_worker")


@pytest.mark.slow
def test_two_workers_decode_a_split_and_each_holds_all_captions(tiny_dataset, tiny_trained_dir, tmp_path):
    """Each worker decodes its share; the all-gather gives every worker (the chief writes) the whole split."""
    from showtell_dist.decoding.options import DecodeOptions
    from showtell_dist.evaluation.evaluator import decode_split
    from showtell_dist.run.restore import load_trained_model

    records, manifest = tiny_dataset
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs, outs = [], []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        outs.append(str(tmp_path / f"worker{index}.json"))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO_ROOT, "tests", "decode_worker_subprocess.py"), tiny_trained_dir,
             records, "test", outs[-1]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        try:
            out = p.communicate(timeout=240)[0]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out[-4000:]
    single = decode_split([load_trained_model(tiny_trained_dir)], records, "test", tf.distribute.get_strategy(),
                          DecodeOptions(beam_width=2), batch_size=4, progress=False)
    expected = {r["image_id"]: r for r in single}
    assert len(expected) == manifest["splits"]["test"]["images"] == 8
    for path in outs:
        got = {r["image_id"]: r for r in json.load(open(path))}
        assert got.keys() == expected.keys()
        for image_id, r in expected.items():
            assert got[image_id]["caption"] == r["caption"], image_id
            np.testing.assert_allclose(got[image_id]["score"], r["score"], atol=1e-5)
