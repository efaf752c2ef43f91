"""report.html: val curves of checkpoint selection, caption lengths and vocabulary use, rendered by Chromium."""

import ast
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from showtell_dist.evaluation import report

METRICS = ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D")
CHROMIUM = shutil.which("chromium")
NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed: `apt-get install chromium` (Debian's chromium package) "
                             "to check that report.html renders")


def _selection(steps=(100, 200, 300, 400), best_step=300):
    history = [{"step": s, "metrics": {m: 0.1 * k + 0.01 * j for j, m in enumerate(METRICS)}}
               for k, s in enumerate(steps, start=1)]
    best = next(h for h in history if h["step"] == best_step)
    return {"metric": "CIDEr-D", "best": {"step": best_step, "value": best["metrics"]["CIDEr-D"],
                                          "checkpoint": "x/best/ckpt-300", "metrics": best["metrics"]},
            "history": history}


VOCABULARY = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "the", "cat", "sits", "grass", "on"]
CAPTIONS = {"1": "a dog runs", "2": "a dog runs on the grass", "3": "a dog"}
REFERENCES = {"1": ["A dog runs.", "The dog is running!"], "2": ["A cat sits on the grass."], "3": ["Two dogs"]}


def _page(**kwargs):
    stats = report.caption_statistics(CAPTIONS, REFERENCES, vocabulary=VOCABULARY)
    summary = {"metrics": {m: 0.3 for m in METRICS}, "split": "val", "step": 400}
    entries = [{"image_id": i, "caption": c, "references": REFERENCES[i], "scores": {"CIDEr-D": float(k)}}
               for k, (i, c) in enumerate(CAPTIONS.items())]
    best, worst = report.best_and_worst(entries, 1)
    return report.render_report(summary, best, worst, {}, **{"selection": _selection(), "statistics": stats,
                                                             **kwargs})


def test_caption_statistics_counts_lengths_and_words():
    stats = report.caption_statistics(CAPTIONS, REFERENCES, vocabulary=VOCABULARY)
    assert stats["num_captions"] == {"model": 3, "references": 4}
    assert stats["lengths"]["model"] == {2: 1, 3: 1, 6: 1}
    assert stats["lengths"]["references"] == {2: 1, 3: 1, 4: 1, 6: 1}  # punctuation is not a word
    assert stats["mean_length"] == {"model": 11 / 3, "references": 15 / 4}
    assert stats["vocabulary_size"] == 8  # the special tokens are not words
    assert stats["distinct"] == {"model": 6, "references": 12}
    # the model's words are all vocabulary words; of the references' only a, dog, runs, the, cat, sits, on, grass
    assert stats["distinct_in_vocabulary"] == {"model": 6, "references": 8}
    assert stats["top_model_words"][:2] == [("a", 3), ("dog", 3)]
    assert stats["unused_reference_words"] == [("cat", 1), ("sits", 1)]  # in the vocabulary, never written
    # A tokenizer's own word splitting is used for the references when given.
    split = report.caption_statistics(CAPTIONS, REFERENCES, split_words=lambda texts: [["w"] for t in texts])
    assert split["lengths"]["references"] == {1: 4} and split["vocabulary_size"] is None


def test_report_draws_every_val_metric_against_the_step():
    page = _page()
    svgs = re.findall(r"<svg .*?</svg>", page, flags=re.S)
    # one chart per val metric, the length histogram and the vocabulary bars
    assert len(svgs) == len(METRICS) + 2
    assert "CIDEr-D (×100)" in svgs[0]  # the selection metric first, large
    assert [re.search(r'class="title"[^>]*>([^<]*)<', s).group(1) for s in svgs[1:len(METRICS)]] == [
        f"{m} (×100)" for m in METRICS if m != "CIDEr-D"]
    for svg in svgs[:len(METRICS)]:
        points = re.search(r'<polyline [^>]*points="([^"]+)"', svg).group(1).split()
        assert len(points) == 4
        xs = [float(p.split(",")[0]) for p in points]
        ys = [float(p.split(",")[1]) for p in points]
        assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # rising scores go up the page
        assert svg.count("(selected)") == 1 and "step 300" in svg and "stroke-dasharray" in svg
    assert "selected by CIDEr-D: step 300" in page and "this page evaluates the checkpoint of step 400" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_report_sections_need_their_data_and_escape_names():
    plain = _page(selection=None, statistics=None)
    assert "<svg" not in plain and "Validation scores" not in plain and "Vocabulary use" not in plain
    evil = {"metric": "<b>M</b>", "best": None, "history": [{"step": 5, "metrics": {"<b>M</b>": 0.5}}]}
    page = _page(selection=evil)
    assert "<b>M</b>" not in page and "&lt;b&gt;M&lt;/b&gt;" in page
    assert "dashed line" not in page.split("Caption lengths")[0]  # no selected step to mark
    one = _page(selection=_selection(steps=(100,), best_step=100))  # a single evaluation still draws
    assert re.search(r'<polyline [^>]*points="[^"]+"', one)


def _chromium(args, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def _color_pixels(png: np.ndarray, color: str) -> int:
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(png[..., :3].astype(int) - rgb).max(-1) <= 8).sum())


@NEEDS_CHROMIUM
def test_chromium_renders_the_charts(tmp_path):
    path = tmp_path / "report.html"
    path.write_text(_page(), encoding="utf-8")
    dom = _chromium(["--dump-dom", f"file://{path}"], tmp_path).stdout
    assert dom.count("<svg") == len(METRICS) + 2 and dom.count("<polyline") == len(METRICS)
    assert dom.count("<rect") >= 7  # histogram bars and the vocabulary bars
    shot = tmp_path / "report.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,2000", f"file://{path}"], tmp_path)
    png = np.asarray(Image.open(shot).convert("RGB"))
    assert png.shape == (2000, 1200, 3)
    # The drawn lines, bars and the selected step's marker are on screen, not just in the DOM.
    assert _color_pixels(png, report.MODEL_COLOR) > 2000
    assert _color_pixels(png, report.REFERENCE_COLOR) > 500
    assert _color_pixels(png, report.SELECTED_COLOR) > 50


def test_report_module_imports_nothing_of_the_package():
    tree = ast.parse(open(report.__file__, encoding="utf-8").read())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("showtell_dist")]


def test_evaluate_split_draws_the_runs_curves_with_the_tokenizers_words(tiny_trained_dir, tiny_dataset, tmp_path):
    from showtell_dist.decoding.options import DecodeOptions
    from showtell_dist.evaluation.evaluator import ReportOptions, SplitOptions, evaluate_split
    from showtell_dist.run.restore import load_trained_model

    strategy = tf.distribute.get_strategy()
    trained = load_trained_model(tiny_trained_dir, strategy=strategy)
    summary = evaluate_split([trained], tiny_dataset[0], "val", strategy, str(tmp_path / "eval"),
                             DecodeOptions(beam_width=2), SplitOptions(progress=False),
                             ReportOptions(use_meteor=False, report_images=2,
                                           selection=_selection(steps=(2, 4, 6), best_step=6)))
    page = open(summary["files"]["report.html"], encoding="utf-8").read()
    assert "Validation scores during training" in page and "selected by CIDEr-D: step 6" in page
    assert len(re.findall(r"<polyline ", page)) == len(METRICS)
    assert f"{trained.tokenizer.vocab_size - 4:,}-word vocabulary" in page
    assert f"model: {summary['num_images']:,} captions" in page


def test_evaluating_the_selected_checkpoint_passes_the_selection_on(tmp_path, monkeypatch):
    """evaluate_selected hands model_dir/best/selection.json to evaluate_split (for report.html)."""
    from showtell_dist.evaluation import evaluator
    from showtell_dist.run import restore
    from showtell_dist.training.checkpoint_selection import evaluate_selected
    from tiny_setup import tiny_config

    os.makedirs(tmp_path / "best")
    (tmp_path / "best" / "selection.json").write_text(json.dumps(_selection()))
    trained = type("Trained", (), {"config": tiny_config("records")})()
    monkeypatch.setattr(restore, "load_trained_model", lambda model_dir, checkpoint, strategy: trained)
    calls = []
    monkeypatch.setattr(evaluator, "evaluate_split", lambda *args: calls.append(args) or {})
    evaluate_selected(str(tmp_path), tf.distribute.get_strategy(), progress=False)
    members, *_, report = calls[0]
    assert members == [trained] and report.selection == _selection()
