"""The features cache of a frozen encoder: writing, reading, training and evaluating from it, refusals."""

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.data import pipeline, records
from showtell_dist.data.dataset_dir import load_manifest, validate
from showtell_dist.errors import ConfigError, DataError
from showtell_dist.features import builder
from showtell_dist.model.encoders import build_encoder
from showtell_dist.training import train_loop
from tiny_setup import REPO_ROOT, mirrored, tiny_config

SHARED = os.path.join(REPO_ROOT, "..", "shared")
FLICKR8K = os.path.join(SHARED, "data", "flickr8k")
MOBILENET_WEIGHTS = os.path.join(SHARED, "weights", "mobilenet_v2_1.0_224_imagenet_notop.weights.h5")
MOBILENET_SHA256 = "d1a8dbb4a817a18c42e9136fff72b622bac0b4571dc224129e6a6b5cac188404"
F16_TOL = dict(rtol=2e-3, atol=2e-3)  # float16 storage: 11 significant bits


def _frozen_config(records_dir, weights, features_dir="", **train):
    c = tiny_config(records_dir, **train)
    c.model.encoder_trainable = False
    c.model.encoder_weights = weights
    c.data.features_dir = features_dir
    return c


def _save_small_cnn(path, seed):
    keras.utils.set_random_seed(seed)
    build_encoder("small_cnn", image_size=32).save_weights(path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small_cnn encoder's weights file: the frozen "pretrained" encoder of these tests."""
    return _save_small_cnn(str(tmp_path_factory.mktemp("encoder") / "small_cnn.weights.h5"), seed=0)


@pytest.fixture(scope="module")
def cache(tiny_dataset, weights, tmp_path_factory):
    records_dir, _ = tiny_dataset
    out = str(tmp_path_factory.mktemp("features"))
    # batch 5: shards of 16, 12 and 8 images all end with a padded batch
    manifest = builder.cache_features(records_dir, out, _frozen_config(records_dir, weights).model,
                                            batch_size=5, progress=False)
    return out, manifest


def _examples(data_dir, manifest, split, parse):
    files = [os.path.join(data_dir, s["file"]) for s in manifest["splits"][split]["shards"]]
    return [parse(r) for f in files for r in tf.data.TFRecordDataset(f)]


def test_manifest_describes_the_cache(cache, tiny_dataset, weights):
    out, manifest = cache
    records_dir, source = tiny_dataset
    with open(weights, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert manifest["kind"] == "features" and "kind" not in source
    assert manifest["features"] == {"encoder": "small_cnn", "weights": weights, "weights_sha256": sha,
                                    "image_size": 32, "dim": 128 + 4 * 4 * 16, "dtype": "float16",
                                    "source_records": records_dir}
    for key in ("format_version", "source", "vocabulary", "max_len", "skipped", "truncated_captions"):
        assert manifest[key] == source[key]
    for split, s in source["splits"].items():
        cached = manifest["splits"][split]
        assert (cached["images"], cached["captions"]) == (s["images"], s["captions"])
        assert [(c["file"], c["records"], c["captions"]) for c in cached["shards"]] == \
               [(c["file"], c["records"], c["captions"]) for c in s["shards"]]  # the same sharding
        assert all(c["bytes"] < o["bytes"] for c, o in zip(cached["shards"], s["shards"]))  # no image bytes
    names = sorted(os.listdir(out))
    assert names == sorted([s["file"] for sp in manifest["splits"].values() for s in sp["shards"]]
                           + ["manifest.json", "vocab.json",
                              "cider_document_frequencies.npz"])  # no temporaries left
    assert load_manifest(out) == manifest
    validate(out, manifest, check_local_md5=True)  # sizes and md5s are those of the new shards
    with open(os.path.join(out, "vocab.json")) as a, open(os.path.join(records_dir, "vocab.json")) as b:
        assert a.read() == b.read()


def test_records_round_trip(cache, tiny_dataset, weights):
    out, manifest = cache
    records_dir, source = tiny_dataset
    dim = manifest["features"]["dim"]
    encoder = build_encoder("small_cnn", image_size=32, weights=weights)
    for split in source["splits"]:
        images = _examples(records_dir, source, split, records.parse_example)
        cached = _examples(out, manifest, split, lambda s: records.parse_features_example(s, dim))
        assert [e["image_id"].numpy() for e in cached] == [e["image_id"].numpy() for e in images]
        for c, i in zip(cached, images):
            assert c["captions"].to_list() == i["captions"].to_list()
            assert c["caption_text"].numpy().tolist() == i["caption_text"].numpy().tolist()
            assert c["features"].dtype == tf.float32 and c["features"].shape == [dim]
        expected = encoder(tf.stack([pipeline.decode_image(e["jpeg"], 32) for e in images]), training=False)
        got = np.stack([c["features"].numpy() for c in cached])
        np.testing.assert_allclose(got, expected.numpy(), **F16_TOL)
        assert np.std(got, axis=0).max() > 0.05  # the features differ across images
    raw = next(iter(tf.data.TFRecordDataset(os.path.join(out, manifest["splits"]["test"]["shards"][0]["file"]))))
    keys = set(tf.train.Example.FromString(raw.numpy()).features.feature)
    assert keys == {"image/id", "image/features", "caption/token_ids", "caption/lengths", "caption/text"}


def test_mirrored_caching_gives_the_same_features(cache, tiny_dataset, weights, tmp_path):
    out, manifest = cache
    records_dir, _ = tiny_dataset
    strategy = mirrored(2)
    cached = builder.cache_features(records_dir, str(tmp_path), _frozen_config(records_dir, weights).model,
                                    strategy=strategy, batch_size=6, splits=["val"], progress=False)
    assert list(cached["splits"]) == ["val"]
    dim = manifest["features"]["dim"]
    parse = lambda s: records.parse_features_example(s, dim)  # noqa: E731
    a = _examples(str(tmp_path), cached, "val", parse)
    b = _examples(out, manifest, "val", parse)
    assert [e["image_id"].numpy() for e in a] == [e["image_id"].numpy() for e in b]
    np.testing.assert_allclose(np.stack([e["features"] for e in a]), np.stack([e["features"] for e in b]),
                               **F16_TOL)
    with pytest.raises(ConfigError, match="not divisible"):
        builder.cache_features(records_dir, str(tmp_path), _frozen_config(records_dir, weights).model,
                                     strategy=strategy, batch_size=5, progress=False)


def test_a_recache_holds_the_fine_tuned_encoders_features_and_refuses_other_weights(cache, tiny_dataset, weights,
                                                                                     tmp_path):
    """A run's re-cache after fine-tuning (training/phases.py): the features of the weights it was given,
    fingerprinted; a cache of other weights is stale and refused."""
    from showtell_dist.features.compatibility import (check_features_compatible, check_recache_fits,
                                                      encoder_fingerprint)

    records_dir, source = tiny_dataset
    config = _frozen_config(records_dir, weights)
    tuned = build_encoder("small_cnn", image_size=32, weights=weights)
    tuned.set_weights([w * 1.1 + 0.01 for w in tuned.get_weights()])  # "fine-tuned": other weights
    out = str(tmp_path / "recache")
    origin = builder.FineTunedEncoder(tuned.get_weights(), "runs/x", "runs/x/checkpoints/ckpt-5", 5)
    manifest = builder.cache_features(records_dir, out, config.model, fine_tuned=origin, batch_size=8,
                                      progress=False)
    assert manifest["features"]["fine_tuned"] == {"run": "runs/x", "checkpoint": "runs/x/checkpoints/ckpt-5",
                                                  "step": 5}
    assert manifest["features"]["weights"] == "runs/x/checkpoints/ckpt-5"
    assert manifest["features"]["weights_sha256"] == encoder_fingerprint(tuned.get_weights())
    images = _examples(records_dir, source, "val", records.parse_example)
    cached = _examples(out, manifest, "val", lambda s: records.parse_features_example(s, manifest["features"]["dim"]))
    expected = tuned(tf.stack([pipeline.decode_image(e["jpeg"], 32) for e in images]), training=False).numpy()
    np.testing.assert_allclose(np.stack([c["features"] for c in cached]), expected, **F16_TOL)
    original = build_encoder("small_cnn", image_size=32, weights=weights)
    assert not np.allclose(expected, original(tf.stack([pipeline.decode_image(e["jpeg"], 32) for e in images])),
                           **F16_TOL)
    check_recache_fits(manifest, config.model, tuned, out)
    check_features_compatible(manifest, config.model, out, tuned)  # what decoding from it checks
    with pytest.raises(ConfigError, match="the cache is stale"):
        check_features_compatible(manifest, config.model, out, original)
    with pytest.raises(ConfigError, match="other weights .*the cache is stale; delete .*recache"):
        check_recache_fits(manifest, config.model, original, out)
    with pytest.raises(ConfigError, match="not a re-cache of a fine-tuned encoder"):
        check_recache_fits(cache[1], config.model, original, cache[0])
    # As a features cache for the config's (not fine-tuned) encoder it is refused as any other cache is.
    with pytest.raises(ConfigError, match="computed with encoder weights runs/x/checkpoints/ckpt-5"):
        train_loop.build_experiment(_frozen_config(records_dir, weights, out), tf.distribute.get_strategy())


def test_pipelines_yield_features_and_the_same_captions(cache, tiny_dataset, weights):
    out, manifest = cache
    records_dir, source = tiny_dataset
    config = _frozen_config(records_dir, weights)
    ctx = tf.distribute.InputContext()
    spec_i = train_loop.pipeline_spec(config, source, "train")
    config.data.features_dir = out
    spec_f = train_loop.pipeline_spec(config, manifest, "train")
    assert spec_f.data_dir == out
    a = next(iter(pipeline.train_input_fn(source, spec_i, start_step=3)(ctx)))
    b = next(iter(pipeline.train_input_fn(manifest, spec_f, start_step=3)(ctx)))
    assert set(b) == {"features", "captions"} and b["features"].shape == [8, manifest["features"]["dim"]]
    assert b["features"].dtype == tf.float32
    np.testing.assert_array_equal(a["captions"], b["captions"])  # same stream, same resume skip

    spec = dataclasses.replace(train_loop.pipeline_spec(config, manifest, "val"), global_batch_size=5)
    batches = list(pipeline.eval_input_fn(manifest, spec)(ctx).take(pipeline.eval_steps(manifest, spec, 1)))
    indices = [int(i) for b in batches for i in b["index"].numpy()]
    assert len(batches) == 3 and indices[12:] == [-1] * 3 and sorted(indices[:12]) == list(range(12))
    ids = pipeline.eval_image_ids(manifest, spec)
    assert sorted(ids) == list(range(12)) and len(set(ids.values())) == 12
    assert not np.any(batches[-1]["features"][2:]) and not np.any(batches[-1]["captions"][2:])


def test_same_weights_same_loss_from_images_and_from_features(cache, tiny_dataset, weights, monkeypatch):
    out, manifest = cache
    records_dir, _ = tiny_dataset
    strategy = tf.distribute.get_strategy()
    exp = train_loop.build_experiment(_frozen_config(records_dir, weights), strategy)
    from_images = train_loop.evaluate_loss(exp, strategy, "val")
    features_exp = dataclasses.replace(exp, config=_frozen_config(records_dir, weights, out), manifest=manifest,
                                       data_dir=out)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran on a features batch")

    monkeypatch.setattr(exp.model.encoder, "call", no_encoder)
    from_features = train_loop.evaluate_loss(features_exp, strategy, "val")
    assert from_images["tokens"] == from_features["tokens"] > 0
    assert abs(from_images["loss"] - from_features["loss"]) < 1e-3, (from_images, from_features)


def test_train_from_features_then_evaluate_and_restore(cache, tiny_dataset, weights, tmp_path):
    from showtell_dist.decoding.options import DecodeOptions
    from showtell_dist.evaluation.evaluator import decode_split
    from showtell_dist.run.restore import load_trained_model

    out, manifest = cache
    records_dir, _ = tiny_dataset
    strategy = tf.distribute.get_strategy()
    model_dir = str(tmp_path / "run")
    config = _frozen_config(records_dir, weights, out)
    metrics, exp = train_loop.train(config, strategy, model_dir, show_progress=False, log=lambda m: None)
    assert metrics["step"] == 6 and np.isfinite(metrics["loss"]) and np.isfinite(metrics["val_loss"])
    assert "greedy captions for 8 held-out test images" in train_loop.held_out_samples(exp, 8)

    # The checkpoint holds the encoder of the weights file: the model still captions images, as an export does.
    trained = load_trained_model(model_dir)
    reference = build_encoder("small_cnn", image_size=32, weights=weights)
    for a, b in zip(trained.model.encoder.weights, reference.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    from_images = decode_split([trained], records_dir, "test", strategy, DecodeOptions(beam_width=2), progress=False)
    from_features = decode_split([trained], out, "test", strategy, DecodeOptions(beam_width=2), progress=False)
    assert [r["image_id"] for r in from_images] == [r["image_id"] for r in from_features]
    assert [r["caption"] for r in from_images] == [r["caption"] for r in from_features]
    np.testing.assert_allclose([r["score"] for r in from_images], [r["score"] for r in from_features], atol=1e-3)

    # and so does its SavedModel, which takes encoded images
    from showtell_dist.export import export_saved_model

    export_dir = str(tmp_path / "export")
    export_saved_model([trained], export_dir, DecodeOptions(beam_width=2))
    test_images = _examples(records_dir, load_manifest(records_dir), "test", records.parse_example)[:3]
    served = tf.saved_model.load(export_dir).signatures["serving_default"](
        images=tf.stack([e["jpeg"] for e in test_images]))
    by_id = {r["image_id"]: r["caption"] for r in from_features}
    assert [c.decode() for c in served["captions"][:, 0].numpy()] == \
           [by_id[e["image_id"].numpy().decode()] for e in test_images]

    trained.config.model.encoder_trainable = True  # as if fine-tuned: the cached features are stale
    with pytest.raises(ConfigError, match="frozen encoder"):
        decode_split([trained], out, "test", strategy, progress=False)


def test_mismatched_cache_is_refused(cache, tiny_dataset, weights, tmp_path):
    out, manifest = cache
    records_dir, _ = tiny_dataset
    strategy = tf.distribute.get_strategy()

    other = _save_small_cnn(str(tmp_path / "other.weights.h5"), seed=1)
    with pytest.raises(ConfigError) as exc:
        train_loop.build_experiment(_frozen_config(records_dir, other, out), strategy)
    msg = str(exc.value)
    assert manifest["features"]["weights_sha256"] in msg and weights in msg and other in msg
    assert "cache_features.py" in msg

    config = _frozen_config(records_dir, weights, out)
    config.model.image_size = 64
    with pytest.raises(ConfigError, match=r"32x32 images but the model's encoder sees 64x64.*cache_features"):
        train_loop.build_experiment(config, strategy)

    edited = str(tmp_path / "edited")
    shutil.copytree(out, edited)
    with open(os.path.join(edited, "manifest.json")) as f:
        m = json.load(f)
    m["features"]["encoder"] = "mobilenet_v2"
    with open(os.path.join(edited, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(ConfigError, match=r"encoder 'mobilenet_v2' but model.encoder is 'small_cnn'"):
        train_loop.build_experiment(_frozen_config(records_dir, weights, edited), strategy)

    config = _frozen_config(records_dir, weights, out)
    config.model.encoder_trainable = True
    with pytest.raises(ConfigError, match="encoder_trainable is True"):
        train_loop.build_experiment(config, strategy)

    with pytest.raises(ConfigError, match="encoder_weights is empty"):
        train_loop.build_experiment(_frozen_config(records_dir, "", out), strategy)
    with pytest.raises(ConfigError, match="encoder_weights is empty"):
        builder.cache_features(records_dir, str(tmp_path / "x"), _frozen_config(records_dir, "").model)
    with pytest.raises(ConfigError, match="another directory"):
        builder.cache_features(records_dir, records_dir + "/", _frozen_config(records_dir, weights).model)
    with pytest.raises(DataError, match="already a features cache"):
        builder.cache_features(out, str(tmp_path / "y"), _frozen_config(records_dir, weights).model)


def test_ensure_features_builds_once(tiny_dataset, weights, tmp_path):
    records_dir, _ = tiny_dataset
    out = str(tmp_path / "features")
    assert builder.ensure_features(_frozen_config(records_dir, weights)) is None  # trains from images
    config = _frozen_config(records_dir, weights, out)
    logs = []
    made = builder.ensure_features(config, log=logs.append)
    assert made["kind"] == "features" and len(logs) == 2
    assert builder.ensure_features(config, log=logs.append) == made and len(logs) == 2  # reused


# ----------------------------------------------------------------------------
# Real data: a slice of Flickr8k with the real MobileNetV2 weights
# ----------------------------------------------------------------------------


def _flickr8k_slice(root, num_train=16, num_val=8):
    """The first images of the official splits, in the tutorial layout."""
    os.makedirs(os.path.join(root, "images"))
    chosen = {}
    for split, n in (("train", num_train), ("val", num_val)):
        with open(os.path.join(FLICKR8K, f"{split}_split_filenames.txt")) as f:
            names = [line.strip() for line in f if line.strip()][:n]
        chosen[split] = names
        with open(os.path.join(root, f"{split}_split_filenames.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
        for name in names:
            shutil.copy(os.path.join(FLICKR8K, "images", name), os.path.join(root, "images", name))
    wanted = set(chosen["train"]) | set(chosen["val"])
    with open(os.path.join(FLICKR8K, "captions.csv"), newline="") as f:
        rows = [r for r in csv.reader(f)]
    with open(os.path.join(root, "captions.csv"), "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if r[0] in wanted])
    return chosen


@pytest.mark.skipif(not (os.path.isdir(FLICKR8K) and os.path.isfile(MOBILENET_WEIGHTS)),
                    reason="../shared/data/flickr8k or ../shared/weights/mobilenet_v2_1.0_224_imagenet_notop"
                           ".weights.h5 is not present")
def test_flickr8k_slice_with_mobilenet_v2(tmp_path):
    from configs import flickr8k_mobilenet
    from showtell_dist.data.prepare import ensure_prepared

    chosen = _flickr8k_slice(str(tmp_path / "raw"))
    config = flickr8k_mobilenet.get_config()
    assert os.path.samefile(config.model.encoder_weights, MOBILENET_WEIGHTS)
    config.data.source_dir = str(tmp_path / "raw")
    config.data.records_dir = str(tmp_path / "records")
    config.data.features_dir = str(tmp_path / "features")
    config.data.images_per_shard = 8
    config.tokenizer.min_count = 1
    config.train.update(global_batch_size=8, steps=2, steps_per_loop=1, warmup_steps=1, checkpoint_every=0,
                        eval_every=0)

    ensure_prepared(config, log=lambda m: None)
    manifest = builder.ensure_features(config, log=lambda m: None)
    assert manifest["features"]["dim"] == 1280 and manifest["features"]["image_size"] == 224
    assert manifest["features"]["weights_sha256"] == MOBILENET_SHA256
    assert [len(manifest["splits"][s]["shards"]) for s in ("train", "val")] == [2, 1]
    cached = _examples(config.data.features_dir, manifest, "val",
                       lambda s: records.parse_features_example(s, 1280))
    assert sorted(e["image_id"].numpy().decode() for e in cached) == sorted(chosen["val"])
    features = np.stack([e["features"].numpy() for e in cached])
    assert np.isfinite(features).all() and features.min() >= 0  # ReLU6 then average pooling
    distances = np.linalg.norm(features[:, None] - features[None], axis=-1)[np.triu_indices(len(features), 1)]
    assert distances.min() > 0.1 * np.linalg.norm(features, axis=-1).mean()  # every image has its own features

    metrics, exp = train_loop.train(config, tf.distribute.get_strategy(), str(tmp_path / "run"),
                                    show_progress=False, log=lambda m: None)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    # the features are what the model's own MobileNetV2 computes from the images
    source = load_manifest(config.data.records_dir)
    images = _examples(config.data.records_dir, source, "val", records.parse_example)[:4]
    expected = exp.model.encode(tf.stack([pipeline.decode_image(e["jpeg"], 224) for e in images]))
    np.testing.assert_allclose(features[:4], expected.numpy(), rtol=1e-2, atol=1e-2)

    # the launcher writes the same cache
    out = str(tmp_path / "launcher_features")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "launch", "cache_features.py"),
         f"--config={os.path.join(REPO_ROOT, 'configs', 'flickr8k_mobilenet.py')}",
         f"--config.data.records_dir={config.data.records_dir}", f"--output_dir={out}", "--batch_size=8",
         "--splits=val", "--noprogress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dim 1280" in proc.stdout
    again = load_manifest(out)
    assert list(again["splits"]) == ["val"] and again["features"]["weights_sha256"] == MOBILENET_SHA256
    relaunched = _examples(out, again, "val", lambda s: records.parse_features_example(s, 1280))
    np.testing.assert_allclose(np.stack([e["features"] for e in relaunched]), features, **F16_TOL)
