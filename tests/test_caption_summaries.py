"""Validation images with their current captions in TensorBoard (training/caption_summaries.py)."""

import glob
import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.features import builder
from showtell_dist.errors import ConfigError
from showtell_dist.model.encoders import build_encoder
from showtell_dist.training import train_loop
from showtell_dist.training.caption_summaries import IMAGE_TAG, TEXT_TAG, CaptionSummaries
from tiny_setup import tiny_config

SAMPLES = 3


def _read_eval_events(model_dir):
    """{step: {tag: (plugin, value)}} of model_dir/eval; images decoded to arrays, text to str."""
    out = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                plugin = v.metadata.plugin_data.plugin_name
                tensor = tf.make_ndarray(v.tensor) if v.HasField("tensor") else None
                if plugin == "images":  # [width, height, png...]
                    value = tf.io.decode_png(tensor[2]).numpy()
                elif plugin == "text":
                    value = tensor.item().decode("utf-8")
                else:
                    continue
                out.setdefault(event.step, {})[v.tag] = (plugin, value)
    return out


def _first_val(records_dir, n):
    """(image id, decoded picture) of the first n val records, in record order."""
    from showtell_dist.data import records
    from showtell_dist.data.prepare import load_manifest

    manifest = load_manifest(records_dir)
    files = [os.path.join(records_dir, s["file"]) for s in manifest["splits"]["val"]["shards"]]
    examples = tf.data.TFRecordDataset(files).take(n).map(records.parse_example)
    return [(e["image_id"].numpy().decode(), tf.io.decode_jpeg(e["jpeg"], channels=3).numpy()) for e in examples]


@pytest.fixture(scope="module")
def resumed_run(tiny_dataset, tmp_path_factory):
    """A run stopped at step 4 and resumed to step 6, validating every 2 steps."""
    records_dir, _ = tiny_dataset
    model_dir = str(tmp_path_factory.mktemp("samples"))
    config = tiny_config(records_dir, eval_every=2, summary_images=SAMPLES)
    config.eval.beam_width = 2
    strategy = tf.distribute.get_strategy()
    train_loop.train(config, strategy, model_dir, show_progress=False, stop_at_step=4, log=lambda m: None)
    first = _read_eval_events(model_dir)
    train_loop.train(config, strategy, model_dir, show_progress=False, log=lambda m: None)
    return records_dir, model_dir, first, _read_eval_events(model_dir)


def test_every_validation_writes_the_images_and_their_captions(resumed_run):
    records_dir, _, _, events = resumed_run
    expected = _first_val(records_dir, SAMPLES)
    for step in (2, 4, 6):
        tags = events[step]
        images = sorted(t for t, (p, _) in tags.items() if p == "images")
        assert len(images) == SAMPLES
        for k, (image_id, picture) in enumerate(expected):
            tag = images[k]
            assert tag.startswith(f"{IMAGE_TAG}/{k:02d}_") and image_id.split(".")[0] in tag
            np.testing.assert_array_equal(tags[tag][1], picture)  # the record's own picture, as stored
        texts = {t: v for t, (p, v) in tags.items() if p == "text"}
        caption_tags = [t.replace(IMAGE_TAG, TEXT_TAG, 1) for t in images]
        assert set(texts) == set(caption_tags) | {f"{TEXT_TAG}/all"}
        for tag in caption_tags:
            assert "**greedy:**" in texts[tag] and "**beam 2:**" in texts[tag] and "references:" in texts[tag]
        table = texts[f"{TEXT_TAG}/all"].splitlines()
        assert table[0] == "| image | greedy | beam 2 | first reference |" and len(table) == 2 + SAMPLES


def test_the_same_images_after_a_resume(resumed_run):
    _, _, first, events = resumed_run
    assert sorted(first) == [2, 4]
    image_tags = {step: sorted(t for t, (p, _) in tags.items() if p == "images") for step, tags in events.items()}
    assert image_tags[6] == image_tags[2] == image_tags[4]
    for tag in image_tags[6]:
        np.testing.assert_array_equal(events[6][tag][1], events[2][tag][1])


def test_references_are_the_records_captions(resumed_run, tiny_dataset):
    records_dir, _, _, events = resumed_run
    from showtell_dist.evaluation.evaluator import scan_records

    expected = _first_val(records_dir, SAMPLES)
    refs = scan_records(records_dir, "val", [i for i, _ in expected])
    for k, (image_id, _) in enumerate(expected):
        text = next(v for t, (p, v) in events[6].items() if p == "text" and t.startswith(f"{TEXT_TAG}/{k:02d}_"))
        for r in refs[image_id]["references"]:
            assert r.split()[0] in text


def test_off_and_bad_values(tiny_dataset, tmp_path):
    records_dir, _ = tiny_dataset
    strategy = tf.distribute.get_strategy()
    config = tiny_config(records_dir, summary_images=0)
    exp = train_loop.build_experiment(config, strategy)
    off = CaptionSummaries(exp, strategy)
    writer = tf.summary.create_file_writer(str(tmp_path / "eval"))
    assert off.samples == [] and off(writer, 1) == []
    writer.flush()
    assert not _read_eval_events(str(tmp_path))
    exp.config.train.summary_images = -1  # (ConfigDict refuses other types itself)
    with pytest.raises(ConfigError, match="train.summary_images must be an integer >= 0"):
        CaptionSummaries(exp, strategy)


def test_beam_captions_are_what_evaluation_writes_with_every_decoding_option(tiny_dataset):
    """The TensorBoard beam captions decode with the run's whole eval section, constraints included."""
    from showtell_dist.decoding.options import DecodeOptions
    from showtell_dist.evaluation.evaluator import decode_split
    from showtell_dist.run.restore import TrainedModel

    records_dir, _ = tiny_dataset
    strategy = tf.distribute.get_strategy()
    config = tiny_config(records_dir, summary_images=4)
    config.eval.beam_width, config.eval.remove_bad_endings, config.eval.block_trigrams = 2, True, True
    exp = train_loop.build_experiment(config, strategy)
    samples = CaptionSummaries(exp, strategy)
    assert samples.options == DecodeOptions(beam_width=2, remove_bad_endings=True, block_trigrams=True)
    evaluated = decode_split([TrainedModel(exp.model, exp.tokenizer, config, "", 0)], records_dir, "val", strategy,
                             samples.options, max_images=4, progress=False)
    captions = {r["image_id"]: r["caption"] for r in evaluated}
    assert {c["image_id"]: c["beam"] for c in samples.captions()} == captions


@pytest.fixture(scope="module")
def features_cache(tiny_dataset, tmp_path_factory):
    records_dir, _ = tiny_dataset
    weights = str(tmp_path_factory.mktemp("encoder") / "small_cnn.weights.h5")
    keras.utils.set_random_seed(0)
    build_encoder("small_cnn", image_size=32).save_weights(weights)
    config = tiny_config(records_dir, summary_images=SAMPLES)
    config.model.encoder_trainable = False
    config.model.encoder_weights = weights
    out = str(tmp_path_factory.mktemp("features"))
    builder.cache_features(records_dir, out, config.model, batch_size=8, progress=False)
    config.data.features_dir = out
    return config


def test_over_a_features_cache_the_pictures_come_from_the_image_records(features_cache, tiny_dataset, tmp_path):
    records_dir, _ = tiny_dataset
    strategy = tf.distribute.get_strategy()
    exp = train_loop.build_experiment(features_cache, strategy)
    samples = CaptionSummaries(exp, strategy)
    expected = _first_val(records_dir, SAMPLES)
    assert samples.image_ids == [i for i, _ in expected]
    writer = tf.summary.create_file_writer(str(tmp_path / "eval"))
    captions = samples(writer, 7)
    writer.flush()
    assert [c["image_id"] for c in captions] == samples.image_ids
    events = _read_eval_events(str(tmp_path))[7]
    pictures = [v for t, (p, v) in sorted(events.items()) if p == "images"]
    assert len(pictures) == SAMPLES
    for picture, (_, want) in zip(pictures, expected):
        np.testing.assert_array_equal(picture, want)


def test_a_features_cache_without_its_image_records_writes_text_and_says_so(features_cache, tmp_path):
    cache = str(tmp_path / "moved_cache")
    shutil.copytree(features_cache.data.features_dir, cache)
    manifest_path = os.path.join(cache, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["features"]["source_records"] = str(tmp_path / "gone")
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    config = features_cache.copy_and_resolve_references()
    config.data.features_dir = cache
    config.data.records_dir = str(tmp_path / "also_gone")
    strategy = tf.distribute.get_strategy()
    logs = []
    samples = CaptionSummaries(train_loop.build_experiment(config, strategy), strategy, log=logs.append)
    assert len(logs) == 1 and f"{SAMPLES} of the {SAMPLES} val pictures" in logs[0] and "gone" in logs[0]
    writer = tf.summary.create_file_writer(str(tmp_path / "eval"))
    samples(writer, 1)
    writer.flush()
    plugins = [p for p, _ in _read_eval_events(str(tmp_path))[1].values()]
    assert plugins.count("text") == SAMPLES + 1 and "images" not in plugins
