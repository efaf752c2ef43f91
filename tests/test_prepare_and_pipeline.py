"""prepare_dataset end to end (records, vocabulary, manifest, bad input) and the tf.data pipeline."""

import csv
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from showtell_dist.data import pipeline, records
from showtell_dist.data.prepare import PrepareOptions, load_manifest, prepare_dataset, summarize
from showtell_dist.data.tokenizer import END_ID, START_ID, Tokenizer
from showtell_dist.errors import DataError

FLICKR8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "flickr8k")


def _jpeg(path, color=(200, 10, 10), mode="RGB", fmt="JPEG"):
    Image.new(mode, (20, 16), color if mode == "RGB" else 128).save(path, fmt)


def _tutorial_dataset(root):
    """Every kind of bad input next to good ones."""
    os.makedirs(root / "images")
    _jpeg(root / "images" / "a.jpg")
    _jpeg(root / "images" / "b.jpg", mode="L")                  # greyscale: converted
    _jpeg(root / "images" / "c.png", fmt="PNG")                 # PNG: converted
    Image.new("CMYK", (20, 16)).save(root / "images" / "d.jpg")  # CMYK: converted
    _jpeg(root / "images" / "e.jpg")
    data = (root / "images" / "e.jpg").read_bytes()
    (root / "images" / "e.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (root / "images" / "f.jpg").write_bytes(b"not an image at all")  # corrupt
    _jpeg(root / "images" / "v.jpg")
    _jpeg(root / "images" / "w.jpg")
    rows = [("a.jpg", "A red square."), ("a.jpg", "a red box"), ("a.jpg", "   "),
            ("b.jpg", "a grey thing"), ("c.png", "a red square again"), ("d.jpg", "a black square"),
            ("e.jpg", "half an image"), ("f.jpg", "no image"), ("g.jpg", "the image is missing"),
            ("v.jpg", "a val square"), ("w.jpg", "in two splits"), ("zzz.jpg", "caption of unknown image")]
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption")] + rows)
    (root / "train_split_filenames.txt").write_text("a.jpg\nb.jpg\nc.png\nd.jpg\ne.jpg\nf.jpg\ng.jpg\nw.jpg\n")
    (root / "val_split_filenames.txt").write_text("v.jpg\nw.jpg\n")


def test_prepare_reports_every_bad_input_and_writes_only_good_records(tmp_path):
    _tutorial_dataset(tmp_path / "in")
    out = str(tmp_path / "out")
    manifest = prepare_dataset(str(tmp_path / "in"), out, PrepareOptions(images_per_shard=2))
    reasons = {s["item"].split(":")[-1].split("/")[-1]: s["reason"] for s in manifest["skipped"]}
    assert reasons["e.jpg"] == "corrupt or truncated"
    assert reasons["f.jpg"] in ("not an image", "corrupt or truncated")
    assert "g.jpg" in str(manifest["skipped"]) and "missing image file" in str(manifest["skipped"])
    assert any("empty caption" == s["reason"] for s in manifest["skipped"])
    assert any("kept in train" in s["reason"] for s in manifest["skipped"])
    assert any("zzz.jpg" in s["item"] for s in manifest["skipped"])
    train = manifest["splits"]["train"]
    assert train["images"] == 5 and train["captions"] == 6  # a(2) b c d w
    assert manifest["splits"]["val"]["images"] == 1
    assert len(train["shards"]) == 4 and all(s["file"].startswith("train-") for s in train["shards"])
    assert sorted(os.listdir(out)) == sorted([s["file"] for sp in manifest["splits"].values() for s in sp["shards"]]
                                             + ["manifest.json", "vocab.json",
                                                "cider_document_frequencies.npz"])  # no temporaries left
    assert load_manifest(out) == manifest
    assert "skipped: " in summarize(manifest)

    tok = Tokenizer.load(os.path.join(out, "vocab.json"))
    assert "val" not in tok.words and "square" in tok.words  # fitted on train only
    seen = {}
    for shard in train["shards"]:
        for raw in tf.data.TFRecordDataset(os.path.join(out, shard["file"])):
            ex = records.parse_example(raw)
            image = tf.io.decode_jpeg(ex["jpeg"])
            assert image.shape == (16, 20, 3)
            seen[ex["image_id"].numpy().decode()] = [tok.decode(c) for c in ex["captions"].to_list()]
    assert seen["a.jpg"] == ["a red square", "a red box"]
    assert set(seen) == {"a.jpg", "b.jpg", "c.png", "d.jpg", "w.jpg"}


def test_unreadable_caption_file_names_file_and_line(tmp_path):
    _tutorial_dataset(tmp_path / "in")
    with open(tmp_path / "in" / "captions.csv", "ab") as f:
        f.write(b"a.jpg,\xff\xfe broken utf8\n")
    with pytest.raises(DataError, match=r"captions.csv:14"):
        prepare_dataset(str(tmp_path / "in"), str(tmp_path / "out"))


def test_record_round_trip():
    serialized = records.encode_example("x.jpg", b"jpegbytes", 3, 4, [[1, 5, 2], [1, 6, 7, 2]], ["a", "b c"])
    ex = records.parse_example(tf.constant(serialized))
    assert ex["image_id"].numpy() == b"x.jpg" and ex["jpeg"].numpy() == b"jpegbytes"
    assert ex["captions"].to_list() == [[1, 5, 2], [1, 6, 7, 2]]
    assert list(ex["caption_text"].numpy()) == [b"a", b"b c"]


def _spec(records_dir, manifest, split="train", **kw):
    return pipeline.PipelineSpec(data_dir=records_dir, split=split, image_size=32, captions_per_image=kw.pop("c", 3),
                                 max_len=manifest["max_len"], global_batch_size=kw.pop("batch", 8), seed=0,
                                 shuffle_buffer=16)


def test_train_pipeline_shapes_and_determinism(tiny_dataset):
    records_dir, manifest = tiny_dataset
    spec = _spec(records_dir, manifest)
    ctx = tf.distribute.InputContext()
    batches = list(pipeline.train_input_fn(manifest, spec)(ctx).take(7))  # 56 > 48 images: crosses an epoch
    b = batches[0]
    assert b["images"].shape == (8, 32, 32, 3) and b["images"].dtype == tf.float32
    assert b["captions"].shape == (8, 3, manifest["max_len"]) and b["captions"].dtype == tf.int32
    caps = b["captions"].numpy()
    assert (caps[:, :, 0] == START_ID).all()  # synthetic images have 4 captions: 3 real rows each
    assert ((caps == END_ID).sum(-1) == 1).all()
    # Resuming at step 3 continues the very same stream.
    resumed = list(pipeline.train_input_fn(manifest, spec, start_step=3)(ctx).take(4))
    for x, y in zip(batches[3:], resumed):
        np.testing.assert_array_equal(x["captions"], y["captions"])
        np.testing.assert_array_equal(x["images"], y["images"])


def test_missing_captions_are_zero_rows(tiny_dataset):
    records_dir, manifest = tiny_dataset
    spec = _spec(records_dir, manifest, c=6)
    caps = next(iter(pipeline.train_input_fn(manifest, spec)(tf.distribute.InputContext())))["captions"].numpy()
    assert (caps[:, 4:] == 0).all() and (caps[:, :4, 0] == START_ID).all()


def test_eval_pipeline_covers_every_image_once_across_pipelines(tiny_dataset):
    records_dir, manifest = tiny_dataset
    spec = _spec(records_dir, manifest, split="val", batch=8)  # 12 val images
    indices = []
    for index in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index, num_replicas_in_sync=2)
        steps = pipeline.eval_steps(manifest, spec, 2)
        for batch in pipeline.eval_input_fn(manifest, spec)(ctx).take(steps):
            indices += [i for i in batch["index"].numpy().tolist() if i >= 0]
    assert sorted(indices) == list(range(12))
    # The host maps each index to the id of the record at that position of the split (shard after shard).
    files = pipeline.shard_files(manifest, spec)
    in_order = [records.parse_example(r)["image_id"].numpy().decode() for r in tf.data.TFRecordDataset(files)]
    assert pipeline.eval_image_ids(manifest, spec, num_input_pipelines=2) == dict(enumerate(in_order))


def non_numeric(element_spec) -> list[str]:
    """The tensors of a (distributed) dataset's element_spec that a TPU's infeed would refuse."""
    flat = tf.nest.flatten(element_spec, expand_composites=True)
    assert flat and all(isinstance(s, tf.TensorSpec) for s in flat)
    return [repr(s) for s in flat if not (s.dtype.is_floating or s.dtype.is_integer or s.dtype.is_bool)]


def test_strategy_run_gets_numbers_only_from_every_pipeline(tiny_dataset):
    """Every batch a pipeline yields goes whole into strategy.run: no strings (a TPU infeed refuses them)."""
    from showtell_dist.data import feature_cache

    records_dir, manifest = tiny_dataset
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    specs = {
        "train": pipeline.train_input_fn(manifest, _spec(records_dir, manifest)),
        "val loss / decoding": pipeline.eval_input_fn(manifest, _spec(records_dir, manifest, split="val")),
    }
    for name, input_fn in specs.items():
        dataset = strategy.distribute_datasets_from_function(input_fn)
        assert non_numeric(dataset.element_spec) == [], name
        batch = next(iter(dataset))
        got = strategy.run(lambda b: tf.nest.map_structure(tf.identity, b), args=(batch,))
        assert non_numeric(tf.nest.map_structure(tf.type_spec_from_value,
                                                 strategy.experimental_local_results(got))) == [], name
    files = pipeline.shard_files(manifest, _spec(records_dir, manifest))
    caching = strategy.experimental_distribute_dataset(
        feature_cache._shard_batches(files[0], manifest["splits"]["train"]["shards"][0]["records"], 4, 32))
    assert non_numeric(caching.element_spec) == []


@pytest.mark.skipif(not os.path.isdir(FLICKR8K), reason="../shared/data/flickr8k is not present")
def test_flickr8k_layout_is_read_with_nothing_skipped():
    from showtell_dist.data.layouts import read_corpus

    corpus = read_corpus(FLICKR8K)
    assert {k: len(v) for k, v in corpus.splits.items()} == {"train": 6000, "val": 1000}
    assert sum(len(e.captions) for e in corpus.splits["train"]) == 30000
    assert corpus.skipped == []


def test_records_are_framed_exactly_as_tensorflow_writes_them(tmp_path):
    from showtell_dist.data.prepare import frame_tfrecords, write_records_atomically

    payloads = [b"", b"a", b"x" * 70000, records.encode_example("i.jpg", b"j", 1, 1, [[1, 2]], ["c"])]
    reference = str(tmp_path / "tf.tfrecord")
    with tf.io.TFRecordWriter(reference) as writer:
        for p in payloads:
            writer.write(p)
    assert frame_tfrecords(payloads) == open(reference, "rb").read()
    size, _ = write_records_atomically(str(tmp_path / "ours.tfrecord"), payloads)
    assert size == os.path.getsize(reference)
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))] == payloads


def test_records_of_older_word_splitting_rules_are_refused_before_training(tmp_path):
    import json

    import ml_collections

    from showtell_dist.data.prepare import ensure_prepared

    _tutorial_dataset(tmp_path / "in")
    out = tmp_path / "out"
    manifest = prepare_dataset(str(tmp_path / "in"), str(out), PrepareOptions())
    assert manifest["vocabulary"]["tokenizer_rules"] == Tokenizer.load(str(out / "vocab.json")).rules
    config = ml_collections.ConfigDict({"data": {"records_dir": str(out)}})
    assert ensure_prepared(config)["max_len"] == manifest["max_len"]  # current rules: reused as they are
    vocab = json.loads((out / "vocab.json").read_text())
    del vocab["tokenizer_rules"]  # as written before the rules were versioned
    (out / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(DataError, match="tokenizer rules 'spacy-default'.*prepare the dataset again"):
        ensure_prepared(config)
