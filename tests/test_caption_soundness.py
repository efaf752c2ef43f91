"""Caption soundness: bad endings (a caption's last word a function word) and distinct captions, counted
once, shown in metrics.json, by evaluate.py and in report.html."""

import pytest

from showtell_dist.decoding.beam_search import BAD_ENDINGS
from showtell_dist.evaluation import caption_soundness, report

CAPTIONS = ["a young boy is playing in a",          # bad ending
            "a man is riding a bike on a dirt",     # a dropped noun, but "dirt" is not a function word
            "a man is riding a bike on a dirt",
            "a man is riding a bike on a dirt",
            "a dog runs through the grass",
            "a girl in a blue shirt is standing in the ",  # bad ending; trailing space
            "",                                      # no words: not a bad ending, but a caption
            "two dogs play with"]                    # bad ending


def test_counts_bad_endings_and_distinct_captions():
    s = caption_soundness.caption_soundness(CAPTIONS)
    assert s["num_captions"] == 8
    assert s["bad_ending_captions"] == 3 and s["bad_endings"] == pytest.approx(3 / 8)
    assert s["distinct_captions"] == 6 and s["distinct_fraction"] == pytest.approx(6 / 8)
    assert s["most_repeated"] == ["a man is riding a bike on a dirt", 3]
    assert s["function_words"] == list(BAD_ENDINGS)  # beam search's remove_bad_endings list, not a copy
    assert {"a", "an", "the", "in", "on", "of", "with", "and", "at", "to", "is", "are"} <= set(BAD_ENDINGS)
    assert caption_soundness.as_metrics(s) == {"bad endings": pytest.approx(3 / 8),
                                               "distinct captions": pytest.approx(6 / 8)}
    assert caption_soundness.describe(s) == ("bad endings: 3 of 8 captions (37.5%) end on a function word; "
                                             "distinct captions: 6 of 8 (75.0%)")


def test_no_captions_and_no_repeats():
    empty = caption_soundness.caption_soundness([])
    assert empty["bad_endings"] == 0.0 and empty["distinct_captions"] == 0 and empty["most_repeated"] is None
    unique = caption_soundness.caption_soundness(["a cat", "a dog sits on the mat"])
    assert unique["most_repeated"] is None and unique["distinct_fraction"] == 1.0 and unique["bad_endings"] == 0


def test_report_shows_both_figures_escaped():
    s = caption_soundness.caption_soundness(CAPTIONS + ["<b>x</b> on", "<b>x</b> on", "<b>x</b> on", "<b>x</b> on"])
    page = report.render_report({"metrics": {"CIDEr-D": 0.5, **caption_soundness.as_metrics(s)},
                                 "caption_soundness": s}, [], [])
    assert "Caption soundness" in page
    assert "<b>7</b> of 12 captions (58.3%) end on a function word" in page
    assert "<b>7</b> of 12 captions (58.3%) are distinct" in page
    assert "&ldquo;&lt;b&gt;x&lt;/b&gt; on&rdquo;, is written for 4 images" in page and "<b>x</b>" not in page
    assert "Caption soundness" not in report.render_report({"metrics": {"CIDEr-D": 0.5}}, [], [])
