"""prepare_dataset end to end (records, vocabulary, manifest, bad input) and the tf.data pipeline."""

import csv
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from showtell_dist.data import pipeline, records
from showtell_dist.data.dataset_dir import load_manifest, shard_files
from showtell_dist.data.prepare import PrepareOptions, prepare_dataset, summarize
from showtell_dist.data.tokenizer import END_ID, START_ID, Tokenizer
from showtell_dist.errors import ConfigError, DataError
from tiny_setup import mirrored

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
                                 shuffle_buffer=16, **kw)


def test_train_pipeline_shapes_and_determinism(tiny_dataset):
    records_dir, manifest = tiny_dataset
    spec = _spec(records_dir, manifest)
    ctx = tf.distribute.InputContext()
    batches = list(pipeline.train_input_fn(manifest, spec)(ctx).take(7))  # 56 > 48 images: crosses an epoch
    b = batches[0]
    assert b["images"].shape == (8, 32, 32, 3) and b["images"].dtype == tf.uint8  # cast on the device
    assert b["captions"].shape == (8, 3, manifest["max_len"]) and b["captions"].dtype == tf.int32
    caps = b["captions"].numpy()
    assert (caps[:, :, 0] == START_ID).all()  # synthetic images have 4 captions: 3 real rows each
    assert ((caps == END_ID).sum(-1) == 1).all()
    # Resuming at step 3 continues the very same stream.
    resumed = list(pipeline.train_input_fn(manifest, spec, start_step=3)(ctx).take(4))
    for x, y in zip(batches[3:], resumed):
        np.testing.assert_array_equal(x["captions"], y["captions"])
        np.testing.assert_array_equal(x["images"], y["images"])


def _counting_reads(monkeypatch) -> list:
    """Counts the records the pipelines read (one list entry per record), one group at a time."""
    read = []
    original = pipeline._read_files

    def counted(files):
        def count(record):
            read.append(1)
            return record
        return original(files).map(lambda r: tf.py_function(count, [r], tf.string))

    monkeypatch.setattr(pipeline, "_read_files", counted)
    monkeypatch.setattr(pipeline, "GROUPS_IN_FLIGHT", None)  # no read-ahead: count what a resume must read
    return read


@pytest.mark.parametrize("pipelines", [2, 4])  # 3 shards: by file (2 pipelines) and by record (4)
def test_resume_reads_one_shard_and_continues_the_stream(tiny_dataset, monkeypatch, pipelines):
    records_dir, manifest = tiny_dataset
    spec = _spec(records_dir, manifest)  # 3 shards of 16 records, shuffle_buffer 16: one shard per group
    shard = max(s["records"] for s in manifest["splits"]["train"]["shards"])
    read = _counting_reads(monkeypatch)
    first_epochs = []
    for index in range(pipelines):
        ctx = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=index,
                                         num_replicas_in_sync=pipelines)
        order = pipeline.train_order(manifest, spec, ctx)
        length = order.epoch_length
        if index:
            first_epochs += list(pipeline._train_records(order, 0).take(length).as_numpy_iterator())
            continue
        full = list(pipeline._train_records(order, 0).take(4 * length).as_numpy_iterator())
        first_epochs += full[:length]
        assert full[:length] != full[length:2 * length]  # each epoch has its own order
        for position in (13, 2 * length + 5):
            read.clear()
            resumed = pipeline._train_records(order, position)
            assert next(iter(resumed)).numpy() == full[position]
            assert 0 < len(read) <= shard, (position, len(read))  # not the `position` records before it
            assert list(resumed.take(length).as_numpy_iterator()) == full[position:position + length]
        # Whole batches too, through parsing (the captions a resumed run trains on).
        batches = list(pipeline.train_input_fn(manifest, spec)(ctx).take(8))
        for x, y in zip(batches[6:], pipeline.train_input_fn(manifest, spec, start_step=6)(ctx).take(2)):
            np.testing.assert_array_equal(x["captions"], y["captions"])
            np.testing.assert_array_equal(x["images"], y["images"])
    # The pipelines' first epochs share out the split: each record once.
    files = shard_files(records_dir, manifest, spec.split)
    assert sorted(first_epochs) == sorted(r.numpy() for r in tf.data.TFRecordDataset(files))


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
    files = shard_files(records_dir, manifest, spec.split)
    in_order = [records.parse_example(r)["image_id"].numpy().decode() for r in tf.data.TFRecordDataset(files)]
    assert pipeline.eval_image_ids(manifest, spec, num_input_pipelines=2) == dict(enumerate(in_order))


def non_numeric(element_spec) -> list[str]:
    """The tensors of a (distributed) dataset's element_spec that a TPU's infeed would refuse."""
    flat = tf.nest.flatten(element_spec, expand_composites=True)
    assert flat and all(isinstance(s, tf.TensorSpec) for s in flat)
    return [repr(s) for s in flat if not (s.dtype.is_floating or s.dtype.is_integer or s.dtype.is_bool)]


def test_strategy_run_gets_numbers_only_from_every_pipeline(tiny_dataset):
    """Every batch a pipeline yields goes whole into strategy.run: no strings (a TPU infeed refuses them)."""
    from showtell_dist.features import builder

    records_dir, manifest = tiny_dataset
    strategy = mirrored(2)
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
    files = shard_files(records_dir, manifest, "train")
    caching = strategy.experimental_distribute_dataset(
        builder._shard_batches(files[0], manifest["splits"]["train"]["shards"][0]["records"], 4, 32))
    assert non_numeric(caching.element_spec) == []


@pytest.mark.skipif(not os.path.isdir(FLICKR8K), reason="../shared/data/flickr8k is not present")
def test_flickr8k_layout_is_read_with_nothing_skipped():
    from showtell_dist.data.layouts import read_corpus

    corpus = read_corpus(FLICKR8K)
    assert {k: len(v) for k, v in corpus.splits.items()} == {"train": 6000, "val": 1000}
    assert sum(len(e.captions) for e in corpus.splits["train"]) == 30000
    assert corpus.skipped == []


def test_records_are_framed_exactly_as_tensorflow_writes_them(tmp_path):
    from showtell_dist.data.records import frame_tfrecords, write_records_atomically

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


def test_prepare_joins_unquoted_comma_rows_and_caps_max_len_at_the_999th_permille(tmp_path):
    root = tmp_path / "in"
    os.makedirs(root / "images")
    _jpeg(root / "images" / "a.jpg")
    _jpeg(root / "images" / "v.jpg")
    lines = ["image,caption"] + ["a.jpg,a red square on grey"] * 1999 + ["a.jpg," + " ".join(["red"] * 400)]
    lines += ["a.jpg,a red, square", "v.jpg,a square", "v.jpg," + " ".join(["big"] * 30)]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    (root / "train_split_filenames.txt").write_text("a.jpg\n")
    (root / "val_split_filenames.txt").write_text("v.jpg\n")

    manifest = prepare_dataset(str(root), str(tmp_path / "out"))
    assert manifest["joined_rows"] == 1 and manifest["joined_row_locations"] == [f"{root}/captions.csv:2002"]
    assert manifest["max_len"] == 7 and manifest["longest_train_caption"] == 402
    assert manifest["truncated_captions"] == 2 and manifest["truncated_by_split"] == {"train": 1, "val": 1}
    text = summarize(manifest)
    assert "unquoted commas" in text and ": 1 (" in text
    assert "max_len 7 (from the 99.9% of train captions (the default); longest train caption 402)" in text
    assert "captions cut to max_len: 2 (train 1, val 1)" in text

    explicit = prepare_dataset(str(root), str(tmp_path / "out2"), PrepareOptions(max_len=40))
    assert explicit["max_len"] == 40 and explicit["truncated_captions"] == 1
    assert "max_len option" in explicit["max_len_from"]


def test_captions_are_padded_per_batch_to_a_bucket(tiny_dataset):
    records_dir, manifest = tiny_dataset
    max_len = manifest["max_len"]
    buckets = pipeline.caption_buckets(max_len, 8)
    assert buckets[-1] == max_len and len(buckets) == 8 and list(buckets) == sorted(buckets)
    ctx = tf.distribute.InputContext()
    padded = pipeline.train_input_fn(manifest, _spec(records_dir, manifest, c=1, batch=4))(ctx).take(12)
    bucketed_fn = pipeline.train_input_fn(manifest, _spec(records_dir, manifest, c=1, batch=4,
                                                          caption_buckets=buckets))
    bucketed = bucketed_fn(ctx)
    assert bucketed.element_spec["captions"].shape.as_list() == [4, 1, None]
    lengths = set()
    for full, b in zip(padded, bucketed.take(12)):
        time = b["captions"].shape[-1]
        lengths.add(time)
        longest = int(np.max(np.nonzero(full["captions"].numpy())[-1])) + 1
        assert time in buckets and time >= longest  # the smallest bucket that holds the longest caption
        assert all(t < longest for t in buckets if t < time)
        np.testing.assert_array_equal(b["captions"], full["captions"][:, :, :time])
        assert not np.any(full["captions"][:, :, time:])
    assert min(lengths) < max_len  # some batches are shorter than the longest caption


def test_nondeterministic_decoding_yields_the_same_images(tiny_dataset):
    records_dir, manifest = tiny_dataset
    ctx = tf.distribute.InputContext()
    steps = 6  # one epoch: 48 images
    a = pipeline.train_input_fn(manifest, _spec(records_dir, manifest))(ctx).take(steps)
    b = pipeline.train_input_fn(manifest, _spec(records_dir, manifest, deterministic=False))(ctx).take(steps)
    key = lambda batches: sorted(x.tobytes() for batch in batches for x in batch["images"].numpy())
    assert key(a) == key(b)


def test_prepare_can_store_images_resized_as_training_resizes_them(tmp_path):
    raw = tmp_path / "raw"
    os.makedirs(raw / "images")
    y, x = np.mgrid[0:75, 0:100]
    names = []
    for i in range(4):  # smooth pictures, which a JPEG keeps well
        pixels = np.stack([127 + 100 * np.sin(x / (30 + 5 * i) + c) * np.cos(y / 25) for c in range(3)], -1)
        name = f"i{i}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(raw / "images" / name, quality=98)
        names.append(name)
    with open(raw / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption")] + [(n, f"a picture number {i}") for i, n in enumerate(names)])
    (raw / "train_split_filenames.txt").write_text("\n".join(names) + "\n")
    original = prepare_dataset(str(raw), str(tmp_path / "original"), PrepareOptions(images_per_shard=2))
    resized = prepare_dataset(str(raw), str(tmp_path / "resized"), PrepareOptions(images_per_shard=2, resize_to=32))
    assert original["resized_to"] is None and resized["resized_to"] == 32
    assert "resized to 32x32" in summarize(resized)

    def images(out):
        found = {}
        for r in tf.data.TFRecordDataset(shard_files(str(out), load_manifest(str(out)), "train")):
            ex = records.parse_example(r)
            found[ex["image_id"].numpy()] = (tf.io.decode_jpeg(ex["jpeg"]).shape,
                                             pipeline.decode_image_uint8(ex["jpeg"], 32).numpy().astype(float))
        return found

    a, b = images(tmp_path / "original"), images(tmp_path / "resized")
    for image_id, (shape, pixels) in a.items():
        assert shape == (75, 100, 3) and b[image_id][0] == (32, 32, 3)
        assert np.abs(pixels - b[image_id][1]).mean() < 2.0  # the same pixels, up to the JPEG re-encoding
    with pytest.raises(ConfigError, match="resize_to"):
        prepare_dataset(str(raw), str(tmp_path / "bad"), PrepareOptions(resize_to=-1))
    spec = pipeline.PipelineSpec(data_dir=str(tmp_path / "resized"), split="train", image_size=64,
                                 captions_per_image=1, max_len=resized["max_len"], global_batch_size=4)
    with pytest.raises(DataError, match="--resize_to=64"):
        pipeline.train_input_fn(resized, spec)
