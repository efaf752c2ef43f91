"""gs:// end to end with the real TensorFlow filesystem and google-cloud-storage, against a
local emulator behind a loopback TLS proxy: prepare -> train -> stop -> resume -> evaluate."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from gcs_testing import gcs_emulator, gcs_proxy, tf_gcs_env  # noqa: F401  (fixtures)
from tiny_setup import REPO_ROOT

TINY_MODEL = ["--config.model.image_size=32", "--config.model.units=16", "--config.model.embed_dim=8",
              "--config.train.global_batch_size=8", "--config.train.steps=6", "--config.train.steps_per_loop=1",
              "--config.train.checkpoint_every=2", "--config.train.eval_every=0", "--num_examples=0",
              "--config.data.generate_synthetic=False"]


@pytest.fixture(scope="module")
def gs_env(gcs_emulator, gcs_proxy):
    env = tf_gcs_env(gcs_proxy)
    env["STORAGE_EMULATOR_HOST"] = gcs_emulator.endpoint  # google-cloud-storage goes straight there
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _launch(env, script, *args, timeout=300):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    return proc, proc.stdout + proc.stderr


def _objects(emulator, prefix):
    return {b.name for b in emulator.client().list_blobs(emulator.bucket, prefix=prefix)}


@pytest.fixture(scope="module")
def gs_records(tiny_dataset, gcs_emulator, gs_env):
    records, _ = tiny_dataset
    base = f"gs://{gcs_emulator.bucket}/e2e-{uuid.uuid4().hex[:8]}"
    proc, out = _launch(gs_env, "prepare_data.py", f"--input_dir={os.path.dirname(records)}/raw",
                        f"--output_dir={base}/records", "--images_per_shard=20")
    assert proc.returncode == 0, out[-4000:]
    assert "train: 48 images" in out
    return base


@pytest.mark.slow
def test_prepare_train_resume_evaluate_in_a_bucket(gs_records, gcs_emulator, gcs_proxy, gs_env):
    base = gs_records
    prefix = base.split("/", 3)[3]
    names = _objects(gcs_emulator, prefix + "/records/")
    assert {f"{prefix}/records/manifest.json", f"{prefix}/records/vocab.json",
            f"{prefix}/records/train-00000-of-00003.tfrecord"} <= names
    assert not [n for n in names if ".tmp-" in n]  # atomic writes left no temporaries

    train = ["train.py", f"--model_dir={base}/run", f"--config.data.records_dir={base}/records", *TINY_MODEL]
    proc, out = _launch(gs_env, *train, "--stop_at_step=3")
    assert proc.returncode == 0, out[-4000:]
    assert "final: step 3" in out
    proc, out = _launch(gs_env, *train)
    assert proc.returncode == 0, out[-4000:]
    assert f"resumed from {base}/run/checkpoints/ckpt-3 at step 3" in out and "final: step 6" in out
    run = _objects(gcs_emulator, prefix + "/run/")
    assert {f"{prefix}/run/checkpoints/ckpt-6.index", f"{prefix}/run/config.json",
            f"{prefix}/run/vocab.json"} <= run
    assert any(n.startswith(f"{prefix}/run/train/events.") for n in run)

    if os.path.exists(os.path.join(REPO_ROOT, "launch", "evaluate.py")):
        proc, out = _launch(gs_env, "evaluate.py", f"--model_dir={base}/run", "--split=val", "--max_images=4",
                            "--beam_width=2", f"--output_dir={base}/eval")
        assert proc.returncode == 0, out[-4000:]
        metrics = json.loads(gcs_emulator.client().bucket(gcs_emulator.bucket)
                             .blob(f"{prefix}/eval/metrics.json").download_as_bytes())
        assert "CIDEr-D" in json.dumps(metrics)
    assert gcs_proxy.refused == []  # nothing tried to leave loopback


@pytest.mark.slow
def test_manifest_mismatch_in_the_bucket_stops_training_before_step_one(gs_records, gcs_emulator, gs_env):
    prefix = gs_records.split("/", 3)[3]
    bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
    shard = f"{prefix}/records/train-00001-of-00003.tfrecord"
    data = bucket.blob(shard).download_as_bytes()
    bucket.blob(shard).upload_from_string(data[: len(data) // 2])  # truncated
    try:
        proc, out = _launch(gs_env, "train.py", f"--model_dir={gs_records}/run_bad",
                            f"--config.data.records_dir={gs_records}/records", *TINY_MODEL)
        assert proc.returncode == 2, out[-4000:]
        assert "train-00001-of-00003.tfrecord is truncated" in out and "Traceback" not in out
        assert not _objects(gcs_emulator, prefix + "/run_bad/checkpoints/")
    finally:
        bucket.blob(shard).upload_from_string(data)


def test_upload_data_launcher_resumes_and_validates(tiny_dataset, gcs_emulator, gs_env):
    records, manifest = tiny_dataset
    url = f"gs://{gcs_emulator.bucket}/upload-{uuid.uuid4().hex[:8]}"
    files = len(os.listdir(records))
    proc, out = _launch(gs_env, "upload_data.py", f"--local_dir={records}", f"--gs_url={url}")
    assert proc.returncode == 0, out[-4000:]
    assert f"uploaded {files} file(s), 0 already complete" in out and "matches its manifest" in out
    proc, out = _launch(gs_env, "upload_data.py", f"--local_dir={records}", f"--gs_url={url}")
    assert proc.returncode == 0 and f"uploaded 0 file(s), {files} already complete" in out
    proc, out = _launch(gs_env, "upload_data.py", f"--local_dir={records}/nothing", f"--gs_url={url}")
    assert proc.returncode == 2 and "manifest.json does not exist" in out
