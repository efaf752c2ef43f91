"""Caption soundness: the figures that show the artefacts of CIDEr optimisation that the scores hide.

  soundness = caption_soundness(captions)   # captions: the model's captions (words joined by spaces)
  soundness["bad_endings"]                  # fraction ending on a function word ("... playing in a")
  soundness["distinct_captions"]            # fraction of the captions that are distinct

The function words are beam search's `BAD_ENDINGS` (decoding/beam_search.py), the list its
remove_bad_endings option keeps captions from ending on, so the figure counts what that option removes.
`as_metrics` gives both fractions under the names the metrics tables show (x100, like the COCO scores).
"""

from __future__ import annotations

import collections
from typing import Iterable

from showtell_dist.decoding.beam_search import BAD_ENDINGS

# Names in an evaluation's metrics (metrics.json "metrics", printed x100 like the scores).
BAD_ENDINGS_METRIC = "bad endings"
DISTINCT_METRIC = "distinct captions"


def caption_soundness(captions: Iterable[str]) -> dict:
    """{"num_captions", "bad_ending_captions" (how many end on a function word), "bad_endings" (their fraction),
    "distinct_captions" (how many different captions there are, over "num_captions"), "distinct_fraction",
    "most_repeated" ([caption, count] of the most written caption, or None), "function_words"}."""
    captions = [" ".join(c.split()) for c in captions]
    bad_words = frozenset(BAD_ENDINGS)
    bad = sum(1 for c in captions if c and c.rsplit(" ", 1)[-1] in bad_words)
    counts = collections.Counter(captions)
    n = len(captions)
    top = counts.most_common(1)
    return {"num_captions": n, "bad_ending_captions": bad, "bad_endings": bad / n if n else 0.0,
            "distinct_captions": len(counts), "distinct_fraction": len(counts) / n if n else 0.0,
            "most_repeated": list(top[0]) if top and top[0][1] > 1 else None,
            "function_words": list(BAD_ENDINGS)}


def as_metrics(soundness: dict) -> dict:
    """The two figures as fractions, named for a metrics table: {BAD_ENDINGS_METRIC, DISTINCT_METRIC}."""
    return {BAD_ENDINGS_METRIC: soundness["bad_endings"], DISTINCT_METRIC: soundness["distinct_fraction"]}


def describe(soundness: dict) -> str:
    """One line for a console: "bad endings: 82 of 1000 captions (8.2%) end on a function word; distinct
    captions: 368 of 1000 (36.8%)"."""
    n = soundness["num_captions"]
    return (f"bad endings: {soundness['bad_ending_captions']} of {n} captions ({100 * soundness['bad_endings']:.1f}%) "
            f"end on a function word; distinct captions: {soundness['distinct_captions']} of {n} "
            f"({100 * soundness['distinct_fraction']:.1f}%)")
