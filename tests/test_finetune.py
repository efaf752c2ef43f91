"""The encoder fine-tuning phase: frozen BatchNorm statistics, the encoder's own learning rate, exact resume
across xe -> finetune, and images (not the features cache) from the phase on."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import finetune
from showtell_dist.config_validation import config_problems
from showtell_dist.data import feature_cache
from showtell_dist.features import builder
from showtell_dist.model.encoders import build_encoder
from showtell_dist.model.show_and_tell import build_model
from showtell_dist.training import train_loop
from showtell_dist.training.phases import check_cache_serves_run, data_dir_for, decode_data_dir, recache_dir
from showtell_dist.training.trainer import FineTuneTrainer, encoder_variables
from tiny_setup import VOCAB, global_batch, tiny_config, mirrored

STRATEGY = tf.distribute.get_strategy()
MOVING = ("moving_mean", "moving_variance")


def _values(variables):
    return [v.numpy() for v in variables]


def _fine_tune(strategy, section, steps=2, policy="float32"):
    """A features-cache-style model (frozen encoder) fine-tuned on one fixed batch of images."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        config = tiny_config("unused")
        config.model.encoder_trainable = False
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(config.model, VOCAB)
        layout = [v.path for v in model.variables]
        trainable = [v.path for v in model.trainable_variables]
        before = _values(model.encoder.weights)
        decoder_before = _values(model.trainable_variables)
        trainer = FineTuneTrainer(strategy, model, section,
                                  mixed_precision=None if policy == "float32" else policy)
        iterator = iter(strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors(global_batch()).repeat()))
        first = trainer.train_loop(iterator, 1)
        later = trainer.train_loop(iterator, steps - 1) if steps > 1 else first
        # The model keeps its variables and (the moving average's) trainable list: the checkpoint layout.
        assert [v.path for v in model.variables] == layout
        assert [v.path for v in model.trainable_variables] == trainable and not model.encoder.trainable
        return model, before, decoder_before, first, later
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _changed(model, before):
    return {v.path: not np.array_equal(b, v.numpy()) for v, b in zip(model.encoder.weights, before)}


def test_fine_tuning_trains_encoder_weights_but_not_batchnorm_statistics():
    section = finetune.section(steps=3, global_batch_size=8, learning_rate=1e-2, encoder_learning_rate=1e-3)
    model, before, _, _, _ = _fine_tune(STRATEGY, section)
    changed = _changed(model, before)
    stats = {p: c for p, c in changed.items() if p.endswith(MOVING)}
    weights = {p: c for p, c in changed.items() if not p.endswith(MOVING)}
    assert len(stats) == 6 and not any(stats.values()), stats  # 3 BatchNorm layers, their statistics fixed
    assert all(weights.values()), weights  # kernels, gammas, betas all moved
    assert {v.path for v in encoder_variables(model)} == set(weights)


def test_the_encoder_learns_at_its_own_rate():
    section = finetune.section(steps=3, global_batch_size=8, learning_rate=1e-2, encoder_learning_rate=0.0)
    model, before, decoder_before, first, later = _fine_tune(STRATEGY, section)
    assert not any(_changed(model, before).values())  # encoder lr 0: the encoder stays put
    assert all(not np.array_equal(a, v.numpy()) for a, v in zip(decoder_before, model.trainable_variables))
    assert later["loss"] < first["loss"]


def test_mirrored_fine_tuning_step_equals_one_device_and_keeps_statistics():
    section = finetune.section(steps=3, global_batch_size=8, learning_rate=1e-2, encoder_learning_rate=1e-3)
    _, _, _, one, _ = _fine_tune(STRATEGY, section, steps=1)
    model, before, _, two, _ = _fine_tune(mirrored(2), section, steps=1)
    np.testing.assert_allclose(two["loss"], one["loss"], atol=1e-5)
    np.testing.assert_allclose(two["grad_norm"], one["grad_norm"], rtol=1e-4)  # encoder gradients included
    changed = _changed(model, before)
    assert not any(c for p, c in changed.items() if p.endswith(MOVING))
    assert all(c for p, c in changed.items() if not p.endswith(MOVING))


def test_mixed_bfloat16_fine_tuning_trains():
    section = finetune.section(steps=3, global_batch_size=8, learning_rate=1e-2, encoder_learning_rate=1e-3)
    model, before, _, first, later = _fine_tune(STRATEGY, section, steps=6, policy="mixed_bfloat16")
    assert np.isfinite(first["loss"]) and later["loss"] < first["loss"]
    assert not any(c for p, c in _changed(model, before).items() if p.endswith(MOVING))


def test_data_dir_for_and_validation(tmp_path):
    c = tiny_config("records")
    c.data.features_dir = "features"
    c.phases = "xe,finetune,scst"
    assert data_dir_for(c, "xe") == "features"
    assert data_dir_for(c, "finetune") == data_dir_for(c, "scst") == "records"
    assert data_dir_for(c) == "records"  # evaluating the run's checkpoints afterwards
    # Given the run's directory: after the finetune phase, the features re-cached with its encoder.
    assert data_dir_for(c, "xe", "runs/x") == "features" and data_dir_for(c, "finetune", "runs/x") == "records"
    assert data_dir_for(c, "scst", "runs/x") == recache_dir("runs/x", "finetune") == "runs/x/features_after_finetune"
    assert data_dir_for(c, None, "runs/x") == "records"
    c.data.features_dir = ""  # no features cache: the records after fine-tuning too
    assert data_dir_for(c, "scst", "runs/x") == "records"
    c.data.features_dir = "features"
    c.phases = "xe,scst"
    assert data_dir_for(c) == data_dir_for(c, "scst") == data_dir_for(c, "scst", "runs/x") == "features"

    # Decoding afterwards (launch/evaluate.py's default): the cache the runs share, if it exists; else images.
    mobilenet, lite2 = tiny_config("records"), tiny_config("records")
    mobilenet.data.features_dir, lite2.data.features_dir = str(tmp_path / "f_mobilenet"), str(tmp_path / "f_lite2")
    assert decode_data_dir([mobilenet]) == "records"  # no cache made yet
    for features_dir in (mobilenet.data.features_dir, lite2.data.features_dir):
        os.makedirs(features_dir)
        open(os.path.join(features_dir, "manifest.json"), "w").write("{}")
    assert decode_data_dir([mobilenet]) == decode_data_dir([mobilenet, mobilenet]) == mobilenet.data.features_dir
    assert decode_data_dir([mobilenet, lite2]) == "records"  # across encoders: each member encodes the images
    tuned = tiny_config("records")
    tuned.data.features_dir, tuned.phases = mobilenet.data.features_dir, "xe,finetune"
    assert decode_data_dir([tuned]) == decode_data_dir([tuned, mobilenet]) == "records"  # a fine-tuned encoder

    config = tiny_config("records").to_dict()
    config["phases"] = "xe,finetune"
    assert config_problems(config) == ["phases = 'xe,finetune': the finetune phase needs a `finetune` section, which "
                                       "the config lacks (add one: c.finetune = configs.finetune.section())"]
    config["finetune"] = finetune.section(learning_rate=0.0, encoder_learning_rate=-1.0).to_dict()
    assert sorted(config_problems(config)) == ["finetune.encoder_learning_rate = -1.0: must be a number >= 0",
                                               "finetune.learning_rate = 0.0: must be a number > 0"]


# -- a features-cache xe run followed by fine-tuning ---------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = str(tmp_path_factory.mktemp("encoder") / "small_cnn.weights.h5")
    build_encoder("small_cnn", image_size=32).save_weights(path)
    return path


@pytest.fixture(scope="module")
def run_config(tiny_dataset, weights, tmp_path_factory):
    records_dir, _ = tiny_dataset
    c = tiny_config(records_dir, steps=2, steps_per_loop=1)
    c.model.encoder_trainable = False
    c.model.encoder_weights = weights
    c.data.features_dir = str(tmp_path_factory.mktemp("features"))
    builder.cache_features(records_dir, c.data.features_dir, c.model, batch_size=8, progress=False)
    c.phases = "xe,finetune"
    c.finetune = finetune.section(steps=3, global_batch_size=8, learning_rate=1e-3, encoder_learning_rate=1e-3)
    c.train.summary_images = 2
    c.eval.select_metric = "CIDEr-D"
    return c


@pytest.mark.slow
def test_features_then_finetune_reads_images_and_resumes_exactly(run_config, weights, tmp_path):
    logs = []
    full_metrics, full = train_loop.train(run_config, STRATEGY, str(tmp_path / "full"), show_progress=False,
                                          log=logs.append)
    assert full_metrics["step"] == 5 and full_metrics["phase"] == "finetune"
    assert any(line.startswith("phase 2/2 'finetune': global steps 2..5") and "from the image records" in line
               for line in logs), logs
    # From the finetune phase on the run reads the records: training (FineTuneTrainer refuses features),
    # validation, selection and caption samples.
    assert full.data_dir == run_config.data.records_dir
    assert full.manifest is full.manifests[run_config.data.records_dir]
    assert full.manifests[run_config.data.features_dir]["kind"] == feature_cache.KIND
    assert data_dir_for(run_config) == run_config.data.records_dir  # evaluate_selected, evaluate.py
    reference = build_encoder("small_cnn", image_size=32, weights=weights)
    for v, r in zip(full.model.encoder.weights, reference.weights):
        moved = not np.array_equal(v.numpy(), r.numpy())
        assert moved != v.path.endswith(MOVING), v.path

    model_dir = str(tmp_path / "resumed")
    first, _ = train_loop.train(run_config, STRATEGY, model_dir, show_progress=False, stop_at_step=2)
    assert first["step"] == 2 and first["phase"] == "xe"
    second, exp = train_loop.train(run_config, STRATEGY, model_dir, show_progress=False, stop_at_step=3)
    assert second["step"] == 3 and second["phase"] == "finetune"
    resumed_metrics, resumed = train_loop.train(run_config, STRATEGY, model_dir, show_progress=False)
    assert resumed_metrics["step"] == 5 and resumed.data_dir == run_config.data.records_dir
    for a, b in zip(_values(full.model.variables), _values(resumed.model.variables)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(resumed_metrics["loss"], full_metrics["loss"], atol=1e-6)
    np.testing.assert_allclose(resumed_metrics["val_loss"], full_metrics["val_loss"], atol=1e-6)
    assert resumed_metrics["val_CIDEr-D"] == pytest.approx(full_metrics["val_CIDEr-D"], abs=1e-6)


def test_a_features_cache_cannot_serve_a_fine_tuned_run():
    from showtell_dist.errors import ConfigError

    c = tiny_config("records")
    c.data.features_dir = "features"
    cache, records = {"kind": feature_cache.KIND}, {}
    check_cache_serves_run(c, "features", cache)  # xe only: the cache is the encoder's
    c.phases = "xe,finetune"
    check_cache_serves_run(c, "records", records)
    with pytest.raises(ConfigError, match="fine-tuned its encoder.*decode from the image records"):
        check_cache_serves_run(c, "features", cache)


def test_an_encoder_trained_since_xe_is_listed_once():
    config = tiny_config("unused")  # encoder_trainable=True: a run from images
    model = build_model(config.model, VOCAB)
    trainer = FineTuneTrainer(STRATEGY, model, finetune.section(steps=2))
    ids = [id(v) for v in trainer.trainable_variables]
    assert len(ids) == len(set(ids)) == len(model.trainable_variables)
    assert {id(v) for v in encoder_variables(model)} <= set(ids)


# -- xe -> finetune -> scst over a features cache: the scst phase reads features re-cached after fine-tuning ---

def _recache_config(run_config):
    from configs import scst

    c = run_config.copy_and_resolve_references()
    c.phases = "xe,finetune,scst"
    c.scst = scst.section(steps=2, global_batch_size=8, max_len=6, learning_rate=1e-3)
    c.train.summary_images = 2
    c.train.keep_checkpoints = 5
    return c


def _cached_val(data_dir):
    from showtell_dist.data import records
    from showtell_dist.data.dataset_dir import load_manifest

    manifest = load_manifest(data_dir)
    files = [f"{data_dir}/{s['file']}" for s in manifest["splits"]["val"]["shards"]]
    dim = manifest["features"]["dim"] if "features" in manifest else None
    parse = records.parse_example if dim is None else (lambda s: records.parse_features_example(s, dim))
    return manifest, [parse(r) for f in files for r in tf.data.TFRecordDataset(f)]


@pytest.mark.slow
def test_after_fine_tuning_scst_trains_from_features_recached_with_the_fine_tuned_encoder(run_config, tmp_path):
    from showtell_dist.data import pipeline
    from showtell_dist.errors import ConfigError

    config = _recache_config(run_config)
    model_dir = str(tmp_path / "full")
    logs = []
    metrics, full = train_loop.train(config, STRATEGY, model_dir, show_progress=False, log=logs.append)
    assert metrics["step"] == 7 and metrics["phase"] == "scst" and "reward" in metrics
    recached = recache_dir(model_dir, "finetune")
    assert full.data_dir == recached and full.manifest["kind"] == feature_cache.KIND  # scst read features
    assert full.manifest["features"]["fine_tuned"] == {"run": model_dir, "step": 5,
                                                       "checkpoint": f"{model_dir}/checkpoints/ckpt-5"}
    assert sum("re-caching" in line for line in logs) == 1, logs
    # The re-cached features are the fine-tuned encoder's (the scst phase does not move it).
    _, cached = _cached_val(recached)
    _, images = _cached_val(config.data.records_dir)
    expected = full.model.encoder(tf.stack([pipeline.decode_image(e["jpeg"], 32) for e in images]), training=False)
    np.testing.assert_allclose(np.stack([c["features"] for c in cached]), expected.numpy(), rtol=2e-3, atol=2e-3)
    _, original = _cached_val(config.data.features_dir)
    assert not np.allclose(np.stack([c["features"] for c in cached]), np.stack([c["features"] for c in original]),
                           rtol=2e-3, atol=2e-3)

    # Stopped where fine-tuning ends and resumed: the next invocation re-caches, and ends where the full run does.
    resumed_dir = str(tmp_path / "resumed")
    first, _ = train_loop.train(config, STRATEGY, resumed_dir, show_progress=False, stop_at_step=5)
    assert first["step"] == 5 and not tf.io.gfile.exists(recache_dir(resumed_dir, "finetune"))
    resumed_metrics, resumed = train_loop.train(config, STRATEGY, resumed_dir, show_progress=False)
    assert resumed.data_dir == recache_dir(resumed_dir, "finetune")
    for a, b in zip(_values(full.model.variables), _values(resumed.model.variables)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(resumed_metrics["reward"], metrics["reward"], atol=1e-6)

    # A re-cache of other weights is stale: refused in the middle of the scst phase ...
    manifest_path = f"{recached}/manifest.json"
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["features"]["weights_sha256"] = "0" * 64
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ConfigError, match="the cache is stale"):
        train_loop.train(config, STRATEGY, model_dir, show_progress=False)
    # ... and made again when the phase begins (a run resumed from the end of fine-tuning).
    for name in os.listdir(f"{model_dir}/checkpoints"):
        if name.startswith("ckpt-7"):
            os.remove(f"{model_dir}/checkpoints/{name}")
    with open(f"{model_dir}/checkpoints/checkpoint", "w") as f:
        f.write('model_checkpoint_path: "ckpt-5"\nall_model_checkpoint_paths: "ckpt-5"\n')
    logs = []
    again, _ = train_loop.train(config, STRATEGY, model_dir, show_progress=False, log=logs.append)
    assert again["step"] == 7 and sum("re-caching" in line for line in logs) == 1, logs
    np.testing.assert_allclose(again["reward"], metrics["reward"], atol=1e-6)
