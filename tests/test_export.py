"""SavedModel export: a process with only TensorFlow captions JPEG/PNG bytes like the toolkit does."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.data import pipeline
from showtell_dist.data.tokenizer import END_ID, START_ID, UNK_ID
from showtell_dist.decoding.beam_search import beam_search
from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.errors import ConfigError
from showtell_dist.export import export_saved_model
from showtell_dist.run.restore import load_trained_model
from tiny_setup import REPO_ROOT

BEAM = 3

# Runs in a fresh interpreter: nothing but TensorFlow may be needed to serve.
SERVE_SCRIPT = r"""
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
images = [open(p, "rb").read() for p in sys.argv[2:]]
out = loaded.signatures["serving_default"](images=tf.constant(images))
print(json.dumps({
    "captions": [[c.decode() for c in row] for row in out["captions"].numpy()],
    "scores": out["scores"].numpy().tolist(),
    "dtypes": [out["captions"].dtype.name, out["scores"].dtype.name],
    "toolkit_imported": [m for m in sys.modules if m.split(".")[0] in ("showtell_dist", "tensorflow_text")],
}))
"""


@pytest.fixture(scope="module")
def trained_dir(tiny_trained_dir):
    return tiny_trained_dir


def _test_images(tmp_path):
    """A JPEG and an RGBA PNG of sizes other than the model's, written to files."""
    y, x = np.mgrid[0:40, 0:56]
    jpeg_pixels = np.stack([x * 4, y * 6, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)  # [40, 56, 3]
    png_pixels = np.zeros([24, 24, 4], np.uint8)
    png_pixels[4:20, 6:18] = [250, 30, 30, 255]
    png_pixels[..., 3] = 255
    jpeg = tf.io.encode_jpeg(jpeg_pixels).numpy()
    png = tf.io.encode_png(png_pixels).numpy()
    paths = [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    for path, data in zip(paths, (jpeg, png)):
        with open(path, "wb") as f:
            f.write(data)
    return paths, jpeg, png


def _in_process_captions(trained, jpeg, png):
    """beam_search on model.encode of the same decoded + resized images, detokenised by the Tokenizer."""
    model, tokenizer = trained.model, trained.tokenizer
    size = model.image_size
    png_image = tf.clip_by_value(tf.image.resize(tf.io.decode_png(png, channels=3), [size, size], antialias=True),
                                 0.0, 255.0)
    images = tf.stack([pipeline.decode_image(jpeg, size), png_image])  # [2, size, size, 3]

    @tf.function
    def search(images):
        state = model.initial_state(model.encode(images))
        return beam_search(model.decode_step, state, beam_width=BEAM, max_len=tokenizer.max_len - 1,
                           start_id=START_ID, end_id=END_ID, vocab_size=tokenizer.vocab_size,
                           forbidden_ids=(START_ID, UNK_ID), length_normalization="average")

    result = search(images)
    captions = [[tokenizer.decode(t) for t in row] for row in result.tokens.numpy()]
    return captions, result.scores.numpy()


def test_saved_model_serves_with_tensorflow_only(trained_dir, tmp_path):
    trained = load_trained_model(trained_dir)
    export_dir = str(tmp_path / "export")
    export_saved_model([trained], export_dir, DecodeOptions(beam_width=BEAM))
    assert os.path.exists(os.path.join(export_dir, "saved_model.pb"))
    assert os.path.exists(os.path.join(export_dir, "assets", "vocab.json"))

    paths, jpeg, png = _test_images(tmp_path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, export_dir, *paths], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])

    assert served["toolkit_imported"] == []
    assert served["dtypes"] == ["string", "float32"]
    scores = np.array(served["scores"])
    assert scores.shape == (2, BEAM)
    assert np.all(np.diff(scores, axis=1) <= 0), scores  # best first

    expected_captions, expected_scores = _in_process_captions(trained, jpeg, png)
    assert served["captions"] == expected_captions
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert all(c for row in served["captions"] for c in row[:1]), served["captions"]


def test_bad_image_fails_the_call_with_tensorflows_error(trained_dir, tmp_path):
    trained = load_trained_model(trained_dir)
    export_dir = str(tmp_path / "export")
    export_saved_model([trained], export_dir, DecodeOptions(beam_width=2, max_new_tokens=4))
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    _, jpeg, _ = _test_images(tmp_path)
    out = serve(images=tf.constant([jpeg]))
    assert out["captions"].shape == (1, 2)
    assert max(len(c.split()) for c in out["captions"].numpy()[0].astype(str)) <= 4  # at most max_len tokens
    with pytest.raises(tf.errors.InvalidArgumentError):
        serve(images=tf.constant([jpeg, b"not an image"]))


def test_export_rejects_bad_settings(trained_dir, tmp_path):
    trained = load_trained_model(trained_dir)
    with pytest.raises(ConfigError, match="beam_width"):
        export_saved_model([trained], str(tmp_path / "e"), DecodeOptions(beam_width=0))
    with pytest.raises(ConfigError, match="length_normalization"):
        export_saved_model([trained], str(tmp_path / "e"), DecodeOptions(length_normalization="mean"))
    with pytest.raises(ConfigError, match="list"):  # one model is a list of one
        export_saved_model(trained, str(tmp_path / "e"))


def test_export_launcher(trained_dir, tmp_path):
    export_dir = str(tmp_path / "launched")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "export.py"),
                           f"--model_dir={trained_dir}", f"--export_dir={export_dir}", "--beam_width=2"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(export_dir, "saved_model.pb"))
    assert "serving_default" in proc.stdout


# Runs in a fresh interpreter: the TF1 session loader (TF Serving's and saved_model_cli's) against tf.saved_model.load.
SESSION_LOADER_SCRIPT = r"""
import json, sys
import tensorflow as tf
export_dir, images = sys.argv[1], [open(p, "rb").read() for p in sys.argv[2:]]

out = tf.saved_model.load(export_dir).signatures["serving_default"](images=tf.constant(images))
eager = {"captions": out["captions"].numpy().astype(str).tolist(), "scores": out["scores"].numpy().tolist()}

with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
    meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir)
    signature = meta_graph.signature_def["serving_default"]
    fetched = session.run({k: v.name for k, v in signature.outputs.items()},
                          feed_dict={signature.inputs["images"].name: images})
session_out = {"captions": fetched["captions"].astype(str).tolist(), "scores": fetched["scores"].tolist()}
print(json.dumps({"eager": eager, "session": session_out,
                  "toolkit_imported": [m for m in sys.modules if m.split(".")[0] == "showtell_dist"]}))
"""


@pytest.fixture(scope="module")
def exported(trained_dir, tmp_path_factory):
    export_dir = str(tmp_path_factory.mktemp("session_export") / "export")
    export_saved_model([load_trained_model(trained_dir)], export_dir, DecodeOptions(beam_width=BEAM))
    return export_dir


def _clean_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    return env


def test_session_loader_of_tf_serving_gives_the_same_captions(exported, tmp_path):
    paths, _, _ = _test_images(tmp_path)
    proc = subprocess.run([sys.executable, "-c", SESSION_LOADER_SCRIPT, exported, *paths], cwd=str(tmp_path),
                          env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["toolkit_imported"] == []
    assert len(result["eager"]["captions"]) == 2
    assert result["session"]["captions"] == result["eager"]["captions"]
    np.testing.assert_allclose(result["session"]["scores"], result["eager"]["scores"], rtol=1e-5, atol=1e-5)


def test_saved_model_cli_run_prints_captions(exported, tmp_path):
    _, jpeg, _ = _test_images(tmp_path)
    inputs = str(tmp_path / "images.npy")
    np.save(inputs, np.array([jpeg], dtype=object))
    expected = tf.saved_model.load(exported).signatures["serving_default"](images=tf.constant([jpeg]))
    proc = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "run",
                           "--dir", exported, "--tag_set", "serve", "--signature_def", "serving_default",
                           "--inputs", f"images={inputs}"],
                          cwd=str(tmp_path), env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Result for output key captions" in proc.stdout, proc.stdout
    best = expected["captions"].numpy()[0, 0]
    assert repr(best) in proc.stdout, (best, proc.stdout)
