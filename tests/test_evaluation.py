"""Offline evaluation: distributed beam-search decoding of a split, coco-caption metrics, outputs, launchers.

A tiny model is trained once for the module (seconds); its captions are
nonsense, but decoding, bookkeeping and scoring are what is tested here.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.errors import ConfigError, UserError
from showtell_dist.evaluation import metrics, report
from showtell_dist.evaluation.captioner import caption_files
from showtell_dist.evaluation.evaluator import (ReportOptions, SplitOptions, decode_split, evaluate_split,
                                                scan_records)
from showtell_dist.run.restore import load_trained_model
from tiny_setup import REPO_ROOT, mirrored

SPLIT = "test"  # 8 images in the tiny dataset


@pytest.fixture(scope="module")
def trained_dir(tiny_trained_dir):
    return tiny_trained_dir


@pytest.fixture(scope="module")
def trained(trained_dir):
    return load_trained_model(trained_dir)


@pytest.fixture(scope="module")
def split_ids(tiny_dataset):
    records_dir, manifest = tiny_dataset
    files = [f"{records_dir}/{s['file']}" for s in manifest["splits"][SPLIT]["shards"] if s["records"]]
    from showtell_dist.data.records import parse_example

    ids = [e["image_id"].numpy().decode() for e in tf.data.TFRecordDataset(files).map(parse_example)]
    assert len(ids) == manifest["splits"][SPLIT]["images"] == 8
    return ids


@pytest.fixture(scope="module")
def default_results(trained, tiny_dataset):
    records_dir, _ = tiny_dataset
    # batch 3: 3 batches, the last with one padding row
    return decode_split([trained], records_dir, SPLIT, tf.distribute.get_strategy(), DecodeOptions(beam_width=3),
                        batch_size=3,
                        progress=False)


def _by_id(results):
    return {r["image_id"]: r for r in results}


def test_decode_split_covers_each_image_once(default_results, split_ids, trained):
    ids = [r["image_id"] for r in default_results]
    assert sorted(ids) == sorted(split_ids)  # every image, exactly once, no padding row ("")
    for r in default_results:
        assert isinstance(r["caption"], str) and np.isfinite(r["score"])
        assert 1 <= len(r["top_k"]) <= 3
        assert r["top_k"][0] == (r["caption"], r["score"])
        assert [s for _, s in r["top_k"]] == sorted((s for _, s in r["top_k"]), reverse=True)
        words = set(r["caption"].split())
        assert not words & {"<unk>", "<start>", "<end>", "<pad>"}
        assert words <= set(trained.tokenizer.words)


def test_decode_split_mirrored_matches_default(trained_dir, trained, default_results, tiny_dataset):
    records_dir, _ = tiny_dataset
    strategy = mirrored(2)
    trained_m = load_trained_model(trained_dir, strategy=strategy)
    # 3 images per replica as above; 2 steps of 6 -> 4 padding rows to drop
    results = decode_split([trained_m], records_dir, SPLIT, strategy, DecodeOptions(beam_width=3), batch_size=6,
                           progress=False)
    assert sorted(r["image_id"] for r in results) == sorted(r["image_id"] for r in default_results)
    replicated, default = _by_id(results), _by_id(default_results)
    for image_id, r in default.items():
        assert replicated[image_id]["caption"] == r["caption"]
        np.testing.assert_allclose(replicated[image_id]["score"], r["score"], atol=1e-5)
    with pytest.raises(ConfigError, match="divisible"):
        decode_split([trained_m], records_dir, SPLIT, strategy, batch_size=3, progress=False)
    with pytest.raises(ConfigError, match="strategy=strategy"):  # loaded outside the strategy's scope
        decode_split([trained], records_dir, SPLIT, strategy, batch_size=6, progress=False)


def test_decode_split_max_images_and_checks(trained, default_results, tiny_dataset):
    records_dir, _ = tiny_dataset
    results = decode_split([trained], records_dir, SPLIT, tf.distribute.get_strategy(), DecodeOptions(beam_width=3),
                           max_images=5, progress=False)
    assert len(results) == 5 and len({r["image_id"] for r in results}) == 5
    default = _by_id(default_results)
    for r in results:
        assert r["caption"] == default[r["image_id"]]["caption"]
    with pytest.raises(ConfigError, match="split 'nope'"):
        decode_split([trained], records_dir, "nope", tf.distribute.get_strategy(), progress=False)
    with pytest.raises(ConfigError, match="beam_width"):
        decode_split([trained], records_dir, SPLIT, tf.distribute.get_strategy(), DecodeOptions(beam_width=0),
                     progress=False)
    with pytest.raises(ConfigError, match="list"):  # one model is a list of one
        decode_split(trained, records_dir, SPLIT, tf.distribute.get_strategy(), progress=False)


REFS = {
    "a": ["A red circle on the left.", "a small red circle beside a square"],
    "b": ["two blue squares", "blue squares side by side"],
    "c": ["a green triangle at the top", "one green triangle"],
    "d": ["a big yellow star", "a yellow star in the middle"],
}


def test_metrics_on_hand_made_captions():
    predictions = {"a": "a red circle on the left", "b": "a green triangle at the top",
                   "c": "a green triangle", "d": "a purple hexagon"}
    corpus, per_image = metrics.score_captions(predictions, REFS)  # with METEOR (java is installed)
    assert list(corpus) == list(metrics.METRICS)
    assert set(per_image) == set(predictions)
    exact, wrong = per_image["a"], per_image["b"]
    assert exact["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert exact["ROUGE-L"] == pytest.approx(1.0)
    assert exact["CIDEr-D"] > 2.0  # CIDEr-D is x10; an exact match to a reference scores high
    assert exact["METEOR"] > 0.5
    for name in ("BLEU-4", "CIDEr-D", "METEOR", "ROUGE-L"):
        assert wrong[name] < exact[name]
        assert per_image["d"][name] < exact[name]
    assert per_image["c"]["CIDEr-D"] > wrong["CIDEr-D"]  # partly right beats wrong
    assert all(0.0 <= corpus[m] <= 1.0 for m in metrics.METRICS if m != "CIDEr-D")
    # all predictions identical to a reference: corpus BLEU-4 ~ 1
    same = {k: v[0] for k, v in REFS.items()}
    corpus_same, _ = metrics.score_captions(same, REFS, use_meteor=False)
    assert "METEOR" not in corpus_same
    assert corpus_same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert corpus_same["CIDEr-D"] > corpus["CIDEr-D"]


def test_metrics_input_errors():
    with pytest.raises(UserError, match="no reference captions"):
        metrics.score_captions({"a": "x", "zzz": "y"}, REFS, use_meteor=False)
    with pytest.raises(UserError, match="empty"):
        metrics.score_captions({}, REFS, use_meteor=False)


def test_missing_java_is_a_user_error(monkeypatch, trained, tiny_dataset, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(UserError, match="default-jre-headless") as info:
        metrics.score_captions({"a": "a red circle"}, REFS, use_meteor=False)
    assert "java" in str(info.value)
    records_dir, _ = tiny_dataset
    with pytest.raises(UserError, match="java"):  # refused before decoding anything
        evaluate_split([trained], records_dir, SPLIT, tf.distribute.get_strategy(), str(tmp_path / "out"),
                       images=SplitOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_evaluate_split_writes_outputs(trained, tiny_dataset, split_ids, tmp_path):
    records_dir, _ = tiny_dataset
    out = str(tmp_path / "eval")
    summary = evaluate_split([trained], records_dir, SPLIT, tf.distribute.get_strategy(), out,
                             DecodeOptions(beam_width=2), SplitOptions(progress=False),
                             ReportOptions(use_meteor=False, report_images=3))
    for name in ("metrics.json", "captions.json", "report.html"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["metrics"] == summary["metrics"]
    assert set(saved["metrics"]) == set(metrics.METRICS) - {"METEOR"} | {"bad endings", "distinct captions"}
    soundness = saved["caption_soundness"]
    assert soundness["num_captions"] == 8 and 1 <= soundness["distinct_captions"] <= 8
    assert saved["metrics"]["distinct captions"] == soundness["distinct_captions"] / 8
    assert saved["split"] == SPLIT and saved["beam_width"] == 2 and saved["num_images"] == 8
    assert saved["checkpoint"] == trained.checkpoint_path and saved["step"] == trained.step == 6
    assert saved["images_per_s"] > 0
    with open(os.path.join(out, "captions.json")) as f:
        captions = json.load(f)
    assert isinstance(captions, list) and len(captions) == 8
    assert all(set(c) == {"image_id", "caption"} and isinstance(c["caption"], str) for c in captions)
    assert sorted(c["image_id"] for c in captions) == sorted(split_ids)
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert page.count("data:image/jpeg;base64,") == 6  # best 3 + worst 3 thumbnails
    assert "CIDEr-D" in page and "Caption soundness" in page
    assert "http://" not in page and "https://" not in page  # self-contained: no external resources


def test_scan_records_stops_at_wanted(tiny_dataset, split_ids):
    records_dir, _ = tiny_dataset
    found = scan_records(records_dir, SPLIT, split_ids[:2], with_jpeg=True)
    assert set(found) == set(split_ids[:2])
    for entry in found.values():
        assert entry["references"] and entry["jpeg"][:2] == b"\xff\xd8"


def test_report_escapes_captions():
    evil = "<script>alert('x')</script> & more"
    entry = {"image_id": "img<1>.jpg", "caption": evil, "score": -1.0, "top_k": [(evil, -1.0), ("b<i>", -2.0)],
             "references": ["a <b>bold</b> reference"], "scores": {"CIDEr-D": 0.5, "BLEU-4": 0.1}}
    other = dict(entry, image_id="other", caption="fine", scores={"CIDEr-D": 0.0, "BLEU-4": 0.0})
    best, worst = report.best_and_worst([other, entry], 5)
    assert best == [entry] and worst == [other]
    page = report.render_report({"metrics": {"BLEU-4": 0.1, "CIDEr-D": 0.5}, "split": "<test>"}, best, worst,
                                {"img<1>.jpg": b"not a jpeg"})
    assert "<script>" not in page and "<b>bold" not in page and "b<i>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "a &lt;b&gt;bold&lt;/b&gt; reference" in page and "img&lt;1&gt;.jpg" in page
    assert "&lt;test&gt;" in page


def _write_images(tmp_path):
    rng = np.random.default_rng(0)
    good = []
    for k, fmt in enumerate(("jpg", "png")):
        path = tmp_path / f"good{k}.{fmt}"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        good.append(str(path))
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image\n")
    return good, str(bad)


def test_caption_files_in_process(trained, tmp_path):
    good, bad = _write_images(tmp_path)
    results, errors = caption_files([trained], [str(tmp_path / "good*"), bad, str(tmp_path / "missing.jpg"),
                                              str(tmp_path / "nomatch*.jpg")], DecodeOptions(beam_width=3), top_k=2)
    assert [r["path"] for r in results] == good
    assert all(len(r["top_k"]) == 2 and r["top_k"][0][0] == r["caption"] for r in results)
    assert [p for p, _ in errors] == [str(tmp_path / "nomatch*.jpg"), bad, str(tmp_path / "missing.jpg")]
    assert "not an image" in errors[1][1] and "missing" in errors[2][1]
    with pytest.raises(ConfigError, match="beam_width"):
        caption_files([trained], good, DecodeOptions(beam_width=2), top_k=3)


def _run(script, *args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", script), *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_evaluate_launcher(trained_dir, tmp_path):
    out = str(tmp_path / "cli_eval")
    proc = _run("evaluate.py", f"--model_dir={trained_dir}", "--max_images=8", "--beam_width=2", "--nometeor",
                f"--output_dir={out}", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("metrics.json", "captions.json", "report.html"):
        assert os.path.exists(os.path.join(out, name)), name
        assert f"wrote {out}/{name}" in proc.stdout
    assert "CIDEr-D" in proc.stdout and "BLEU-4" in proc.stdout
    assert "bad endings: " in proc.stdout and "distinct captions: " in proc.stdout
    assert json.load(open(os.path.join(out, "metrics.json")))["num_images"] == 8


def test_caption_launcher(trained_dir, tmp_path):
    good, bad = _write_images(tmp_path)
    proc = _run("caption.py", f"--model_dir={trained_dir}", good[0], bad, good[1])
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stdout.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == good
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and bad in errors[0] and "not an image" in errors[0]
    assert "Traceback" not in proc.stderr
