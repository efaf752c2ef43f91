"""Launchers as a user runs them: clear messages and non-zero exits for user errors."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tiny_setup import REPO_ROOT


def _run(script, *args, timeout=120):
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    return proc, time.time() - start


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("tpu_args, message", [
    ([], "needs --tpu"),
    (["--tpu=local"], "no TPU device"),
    ([f"--tpu=grpc://127.0.0.1:{_closed_port()}"], "no TPU answers at grpc://127.0.0.1"),
])
def test_tpu_without_a_tpu_fails_fast_with_a_clear_message(tpu_args, message, tmp_path):
    proc, seconds = _run("train.py", "--strategy=tpu", f"--model_dir={tmp_path}", *tpu_args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 60


def test_prepare_data_on_a_missing_directory_names_it(tmp_path):
    proc, _ = _run("prepare_data.py", f"--input_dir={tmp_path}/nowhere", f"--output_dir={tmp_path}/out")
    assert proc.returncode == 2 and f"{tmp_path}/nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_train_on_records_that_are_not_there_says_how_to_prepare(tmp_path):
    proc, _ = _run("train.py", f"--model_dir={tmp_path}/run", f"--config.data.records_dir={tmp_path}/none",
                   f"--config.data.source_dir={tmp_path}/raw", "--config.data.generate_synthetic=False")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_prepare_data_launcher_prints_the_summary(tiny_dataset, tmp_path):
    records, _ = tiny_dataset
    raw = os.path.join(os.path.dirname(records), "raw")
    proc, _ = _run("prepare_data.py", f"--input_dir={raw}", f"--output_dir={tmp_path}/out", "--images_per_shard=20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: 48 images, 192 captions, 3 shards" in proc.stdout and "skipped: 0" in proc.stdout
