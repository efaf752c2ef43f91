"""A self-contained HTML page of an evaluation: scores, training curves, caption statistics, best and worst images.

Sections, each shown when its data is given:
  - the scores of the evaluated checkpoint;
  - validation scores during training (a run with checkpoint selection: the
    history of model_dir/best/selection.json, passed in by the caller): the
    selection metric, then every other val metric, against the step, the
    selected step marked;
  - caption soundness (summary["caption_soundness"], evaluation/caption_soundness.py):
    how many captions end on a function word, and how many are distinct;
  - caption statistics (`caption_statistics`): the distribution of caption
    lengths of the model's captions against the references', and vocabulary
    use (distinct words written, out of the vocabulary);
  - the best and worst images by CIDEr-D.

One file, no external resources: plain inline CSS, charts as inline SVG and
thumbnails embedded as base64 JPEG data URIs (downscaled, so the page stays
small). Every caption, reference, word and id is HTML-escaped. This module
renders data only: it imports nothing from the rest of the package.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import math
from typing import Callable, Mapping, Sequence

RANK_METRIC = "CIDEr-D"
THUMBNAIL_SIDE = 160
MAX_LENGTH_BIN = 30        # the length histogram's last bin holds every longer caption
TOP_WORDS = 12             # words listed in the vocabulary section
MODEL_COLOR, REFERENCE_COLOR, SELECTED_COLOR = "#2f6db5", "#a0a0a0", "#2a9d4a"

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 60em;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
.meta { color: #555; font-size: .9em; }
.meta code { background: #f4f4f4; padding: 0 .3em; border-radius: 3px; }
table.metrics { border-collapse: collapse; margin: 1em 0; }
table.metrics th, table.metrics td { padding: .3em 1em; border-bottom: 1px solid #eee; text-align: left; }
table.metrics td.v { text-align: right; font-variant-numeric: tabular-nums; }
.card { display: flex; gap: 1em; padding: .8em 0; border-bottom: 1px solid #eee; }
.card img { width: 128px; height: 128px; object-fit: contain; background: #f4f4f4; border-radius: 4px;
            image-rendering: pixelated; flex: none; }
.card .noimg { width: 128px; height: 128px; background: #f4f4f4; flex: none; }
.id { font-size: .8em; color: #777; word-break: break-all; }
.pred { font-size: 1.1em; margin: .2em 0; }
.scores { font-size: .85em; color: #444; }
.scores b { font-variant-numeric: tabular-nums; }
ul { margin: .3em 0; padding-left: 1.2em; }
.refs li { color: #333; }
.alts { font-size: .85em; color: #666; }
.good { border-left: 4px solid #3a3; padding-left: .6em; }
.bad { border-left: 4px solid #c33; padding-left: .6em; }
.charts { display: flex; flex-wrap: wrap; gap: .8em 1.2em; margin: .6em 0; }
svg.chart { background: #fff; overflow: visible; }
svg.chart text { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; fill: #333; }
svg.chart .axis { stroke: #888; stroke-width: 1; }
svg.chart .grid { stroke: #eee; stroke-width: 1; }
svg.chart .tick { font-size: 11px; fill: #666; }
svg.chart .title { font-size: 13px; font-weight: 600; }
.legend { font-size: .9em; color: #444; }
.swatch { display: inline-block; width: .9em; height: .9em; border-radius: 2px; vertical-align: -.1em;
          margin-right: .3em; }
.words { font-size: .9em; color: #333; }
.words span { display: inline-block; background: #f4f4f4; border-radius: 3px; padding: 0 .35em; margin: .1em; }
"""


def best_and_worst(entries: Sequence[dict], n: int, metric: str = RANK_METRIC) -> tuple[list[dict], list[dict]]:
    """The n best entries by entry["scores"][metric] (best first) and the n worst (worst first).

    The two lists never share an entry: with fewer than 2n entries they split
    them in halves.
    """
    if n <= 0 or not entries:
        return [], []
    ranked = sorted(entries, key=lambda e: -e["scores"].get(metric, 0.0))
    k = min(n, math.ceil(len(ranked) / 2))
    return ranked[:k], ranked[k:][::-1][:n]


def thumbnail_data_uri(jpeg: bytes, max_side: int = THUMBNAIL_SIDE) -> str | None:
    """A data: URI of the image shrunk to fit max_side (JPEG), or None when it cannot be decoded."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(jpeg))
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=80)
    except Exception:  # a thumbnail is decoration: never fail the report over it
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _card(entry: dict, jpeg: bytes | None, css_class: str) -> str:
    e = html.escape
    uri = thumbnail_data_uri(jpeg) if jpeg else None
    image = (f'<img src="{uri}" alt="{e(entry["image_id"])}">' if uri else '<div class="noimg"></div>')
    scores = entry.get("scores", {})
    shown = [m for m in (RANK_METRIC, "BLEU-4", "METEOR", "ROUGE-L") if m in scores]
    score_line = " &middot; ".join(f"{e(m)} <b>{scores[m]:.3f}</b>" for m in shown)
    if "score" in entry:
        score_line += f" &middot; beam score <b>{entry['score']:.3f}</b>"
    refs = "".join(f"<li>{e(r)}</li>" for r in entry.get("references", []))
    alts = entry.get("top_k", [])[1:]
    alt_html = ""
    if alts:
        items = "".join(f"<li>{e(c)} <span>({s:.3f})</span></li>" for c, s in alts)
        alt_html = f'<div class="alts">other beams:<ul>{items}</ul></div>'
    return (f'<div class="card {css_class}">{image}<div>'
            f'<div class="id">{e(str(entry["image_id"]))}</div>'
            f'<div class="pred">{e(entry["caption"])}</div>'
            f'<div class="scores">{score_line}</div>'
            f'<div>references:<ul class="refs">{refs}</ul></div>{alt_html}</div></div>')



# ----------------------------------------------------------------------------
# Caption statistics
# ----------------------------------------------------------------------------


def caption_statistics(captions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                       vocabulary: Sequence[str] | None = None,
                       split_words: Callable[[Sequence[str]], list[list[str]]] | None = None) -> dict:
    """Lengths and vocabulary use of the model's captions and of their references.

    Args:
      captions: image_id -> the model's caption (its words joined by spaces,
        as the tokenizer decodes them).
      references: image_id -> reference captions (raw text).
      vocabulary: the model's words (special tokens like "<pad>" are left
        out), or None when unknown.
      split_words: turns raw captions into word lists the way the training
        data was tokenized (Tokenizer.split_words); default: lower-cased
        whitespace split with punctuation stripped.

    Returns {"num_captions", "lengths" ({length: count}), "mean_length",
    "distinct", "distinct_in_vocabulary" (each {"model": ..., "references": ...}),
    "vocabulary_size", "top_model_words", "unused_reference_words" ([(word, count)])}.
    """
    split_words = split_words or _plain_split
    model_words = [c.split() for c in captions.values()]
    reference_words = split_words([r for refs in references.values() for r in refs])
    vocab = {w for w in vocabulary if not (w.startswith("<") and w.endswith(">"))} if vocabulary else None
    counts = {"model": collections.Counter(w for ws in model_words for w in ws),
              "references": collections.Counter(w for ws in reference_words for w in ws)}
    stats: dict = {"num_captions": {"model": len(model_words), "references": len(reference_words)},
                   "lengths": {}, "mean_length": {}, "distinct": {}, "distinct_in_vocabulary": {},
                   "vocabulary_size": len(vocab) if vocab is not None else None}
    for name, lists in (("model", model_words), ("references", reference_words)):
        stats["lengths"][name] = dict(sorted(collections.Counter(len(ws) for ws in lists).items()))
        stats["mean_length"][name] = sum(map(len, lists)) / len(lists) if lists else 0.0
        stats["distinct"][name] = len(counts[name])
        stats["distinct_in_vocabulary"][name] = (len(set(counts[name]) & vocab) if vocab is not None else None)
    stats["top_model_words"] = counts["model"].most_common(TOP_WORDS)
    stats["unused_reference_words"] = [(w, n) for w, n in counts["references"].most_common()
                                       if w not in counts["model"] and (vocab is None or w in vocab)][:TOP_WORDS]
    return stats


def _plain_split(texts: Sequence[str]) -> list[list[str]]:
    out = []
    for t in texts:
        words = (w.strip(".,;:!?\"()[]{}").lower() for w in t.split())
        out.append([w for w in words if w])
    return out


# ----------------------------------------------------------------------------
# Inline SVG charts
# ----------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    t = first
    while t < hi + step * 0.999:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _tick_label(value: float) -> str:
    if abs(value) >= 10000 and value == int(value):
        return f"{value / 1000:g}k"
    return f"{value:g}"


class _Frame:
    """Maps data coordinates to an SVG plot area with margins for the axes' labels."""

    LEFT, RIGHT, TOP, BOTTOM = 46, 14, 26, 34

    def __init__(self, width: int, height: int, x_ticks: list[float], y_ticks: list[float]):
        self.width, self.height = width, height
        self.x0, self.x1 = x_ticks[0], x_ticks[-1]
        self.y0, self.y1 = y_ticks[0], y_ticks[-1]
        self.x_ticks, self.y_ticks = x_ticks, y_ticks

    def x(self, v: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.LEFT + (v - self.x0) / span * (self.width - self.LEFT - self.RIGHT)

    def y(self, v: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.height - self.BOTTOM - (v - self.y0) / span * (self.height - self.TOP - self.BOTTOM)

    def axes(self, title: str, x_label: str, x_labels: Sequence[tuple[float, str]] | None = None) -> list[str]:
        e = html.escape
        bottom, right = self.height - self.BOTTOM, self.width - self.RIGHT
        out = [f'<text class="title" x="{self.LEFT}" y="16">{e(title)}</text>']
        for t in self.y_ticks:
            y = self.y(t)
            out.append(f'<line class="grid" x1="{self.LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>')
            out.append(f'<text class="tick" x="{self.LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                       f"{e(_tick_label(t))}</text>")
        for x_value, label in (x_labels if x_labels is not None else [(t, _tick_label(t)) for t in self.x_ticks]):
            x = self.x(x_value)
            out.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}"/>')
            out.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{e(label)}</text>')
        out.append(f'<line class="axis" x1="{self.LEFT}" x2="{right}" y1="{bottom}" y2="{bottom}"/>')
        out.append(f'<line class="axis" x1="{self.LEFT}" x2="{self.LEFT}" y1="{self.TOP}" y2="{bottom}"/>')
        out.append(f'<text class="tick" x="{right}" y="{self.height - 4}" text-anchor="end">{e(x_label)}</text>')
        return out


def _svg(width: int, height: int, label: str, body: list[str]) -> str:
    return (f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{html.escape(label)}"><title>{html.escape(label)}</title>' + "".join(body) + "</svg>")


def metric_curve_svg(metric: str, points: Sequence[tuple[int, float]], *, selected_step: int | None = None,
                     width: int = 420, height: int = 220, color: str = MODEL_COLOR) -> str:
    """A line chart of one val metric (x100) against the training step; the selected step marked."""
    points = sorted(points)
    steps = [s for s, _ in points]
    values = [100 * v for _, v in points]
    y_ticks = _nice_ticks(min(values), max(values), 4)
    x_ticks = _nice_ticks(min(steps[0], 0), steps[-1], 5)
    frame = _Frame(width, height, x_ticks, y_ticks)
    body = frame.axes(f"{metric} (\u00d7100)", "step")
    if selected_step is not None and frame.x0 <= selected_step <= frame.x1:
        x = frame.x(selected_step)
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.TOP}" y2="{height - frame.BOTTOM}" '
                    f'stroke="{SELECTED_COLOR}" stroke-width="1.5" stroke-dasharray="4 3"/>')
    coords = " ".join(f"{frame.x(s):.1f},{frame.y(v):.1f}" for s, v in zip(steps, values))
    body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
    for s, v in zip(steps, values):
        chosen = s == selected_step
        body.append(f'<circle cx="{frame.x(s):.1f}" cy="{frame.y(v):.1f}" r="{4.5 if chosen else 3}" '
                    f'fill="{SELECTED_COLOR if chosen else color}"><title>step {s}: {html.escape(metric)} '
                    f"{v:.2f}{' (selected)' if chosen else ''}</title></circle>")
    return _svg(width, height, f"{metric} against the training step", body)


def length_histogram_svg(lengths: Mapping[str, Mapping[int, int]], *, width: int = 860, height: int = 260) -> str:
    """Grouped bars: the share of captions of each length (words), the model's beside the references'."""
    series = [(name, color, lengths.get(name, {})) for name, color in
              (("model", MODEL_COLOR), ("references", REFERENCE_COLOR))]
    shares = []
    for name, color, counts in series:
        binned = collections.Counter({min(int(n), MAX_LENGTH_BIN): 0 for n in counts})
        for n, c in counts.items():
            binned[min(int(n), MAX_LENGTH_BIN)] += c
        total = sum(binned.values()) or 1
        shares.append((name, color, {n: 100 * c / total for n, c in binned.items()}))
    all_lengths = sorted({n for _, _, s in shares for n in s}) or [0]
    lo, hi = min(all_lengths), max(all_lengths)
    y_ticks = _nice_ticks(0, max([v for _, _, s in shares for v in s.values()] or [1]), 4)
    frame = _Frame(width, height, [lo - 0.5, hi + 0.5], y_ticks)
    every = 1 if hi - lo < 20 else 2
    labels = [(n, f"{n}+" if n == MAX_LENGTH_BIN else str(n)) for n in range(lo, hi + 1) if (n - lo) % every == 0]
    body = frame.axes("caption length (words), % of captions", "words", labels)
    slot = frame.x(lo + 1) - frame.x(lo)
    bar = max(1.0, slot * 0.8 / len(shares))
    for k, (name, color, share) in enumerate(shares):
        for n, v in share.items():
            x = frame.x(n) - slot * 0.4 + k * bar
            y = frame.y(v)
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{frame.y(0) - y:.1f}" '
                        f'fill="{color}"><title>{name}: {v:.1f}% of captions have '
                        f"{n}{'+' if n == MAX_LENGTH_BIN else ''} words</title></rect>")
    return _svg(width, height, "distribution of caption lengths, model against references", body)


def vocabulary_svg(stats: Mapping, *, width: int = 860) -> str:
    """Horizontal bars: distinct words of the model's captions and of the references, out of the vocabulary."""
    size = stats.get("vocabulary_size")
    rows = [("model captions", MODEL_COLOR, "model"), ("references", REFERENCE_COLOR, "references")]
    counts = [(label, color, (stats["distinct_in_vocabulary"][key] if size else stats["distinct"][key]))
              for label, color, key in rows]
    full = size or max(c for _, _, c in counts) or 1
    left, right, row_h = 130, 150, 28
    height = 30 + row_h * len(rows)
    span = width - left - right
    body = [f'<text class="title" x="0" y="16">distinct words written'
            f"{' (out of the ' + format(size, ',') + '-word vocabulary)' if size else ''}</text>"]
    for k, (label, color, n) in enumerate(counts):
        y = 26 + k * row_h
        w = span * n / full
        body.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end" font-size="12">{html.escape(label)}</text>')
        body.append(f'<rect x="{left}" y="{y}" width="{span:.1f}" height="20" fill="#f0f0f0"/>')
        body.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="20" fill="{color}"/>')
        share = f" ({100 * n / size:.1f}%)" if size else ""
        body.append(f'<text x="{left + span + 8}" y="{y + 15}" font-size="12">{n:,}{share}</text>')
    return _svg(width, height, "vocabulary use, model against references", body)


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------


def _selection_section(selection: Mapping, evaluated_step) -> list[str]:
    e = html.escape
    history = selection.get("history") or []
    metric = selection.get("metric", "")
    best = selection.get("best") or {}
    names = list(dict.fromkeys(m for h in history for m in h.get("metrics", {})))
    if not history or not names:
        return []
    selected = best.get("step")
    first = metric if metric in names else names[0]

    def points(name):
        return [(int(h["step"]), float(h["metrics"][name])) for h in history if name in h.get("metrics", {})]

    main = metric_curve_svg(first, points(first), selected_step=selected, width=860, height=280)
    others = "".join(metric_curve_svg(name, points(name), selected_step=selected) for name in names if name != first)
    charts = [f'<div class="charts">{main}</div>'] + ([f'<div class="charts">{others}</div>'] if others else [])
    note = (f"selected by {e(metric)}: step {e(str(selected))}, {e(metric)} {100 * best['value']:.2f}"
            if best and "value" in best else f"selection metric: {e(metric)}")
    if evaluated_step is not None and evaluated_step != selected:
        note += f"; this page evaluates the checkpoint of step {e(str(evaluated_step))}"
    return ["<h2>Validation scores during training</h2>",
            f'<p class="meta">{len(history)} evaluations of the val split while training; {note}'
            + (f' (<span class="swatch" style="background:{SELECTED_COLOR}"></span>dashed line). '
               if selected is not None else ". ") +
            "Every metric is computed on the same images with the run's beam search, METEOR left out.</p>",
            *charts]


def _statistics_section(stats: Mapping) -> list[str]:
    e = html.escape
    mean, num = stats["mean_length"], stats["num_captions"]
    legend = (f'<p class="legend"><span class="swatch" style="background:{MODEL_COLOR}"></span>model: '
              f"{num['model']:,} captions, mean {mean['model']:.1f} words &nbsp; "
              f'<span class="swatch" style="background:{REFERENCE_COLOR}"></span>references: '
              f"{num['references']:,} captions, mean {mean['references']:.1f} words</p>")
    size = stats.get("vocabulary_size")
    if size:
        vocab_note = (f"The model writes {stats['distinct_in_vocabulary']['model']:,} distinct words of its "
                      f"{size:,}-word vocabulary; the references use {stats['distinct_in_vocabulary']['references']:,} "
                      f"of them ({stats['distinct']['references']:,} distinct words in all, counting words "
                      "outside the vocabulary).")
    else:
        vocab_note = (f"The model writes {stats['distinct']['model']:,} distinct words; the references "
                      f"{stats['distinct']['references']:,}.")
    top = "".join(f"<span>{e(w)} {n:,}</span>" for w, n in stats["top_model_words"])
    unused = "".join(f"<span>{e(w)} {n:,}</span>" for w, n in stats["unused_reference_words"])
    return ["<h2>Caption lengths</h2>", legend, f'<div class="charts">{length_histogram_svg(stats["lengths"])}</div>',
            "<h2>Vocabulary use</h2>", f'<p class="meta">{vocab_note}</p>',
            f'<div class="charts">{vocabulary_svg(stats)}</div>',
            f'<p class="words">most frequent words of the model: {top or "none"}</p>',
            f'<p class="words">most frequent reference words the model never writes: {unused or "none"}</p>']


def _soundness_section(soundness: Mapping) -> list[str]:
    e = html.escape
    n = soundness["num_captions"]
    words = ", ".join(soundness.get("function_words", []))
    repeated = soundness.get("most_repeated")
    lines = [f"<b>{soundness['bad_ending_captions']:,}</b> of {n:,} captions "
             f"({100 * soundness['bad_endings']:.1f}%) end on a function word"
             + (f' <span class="words">({e(words)})</span>' if words else ""),
             f"<b>{soundness['distinct_captions']:,}</b> of {n:,} captions "
             f"({100 * soundness['distinct_fraction']:.1f}%) are distinct"
             + (f"; the most repeated, &ldquo;{e(repeated[0])}&rdquo;, is written for {repeated[1]:,} images"
                if repeated else "")]
    return ["<h2>Caption soundness</h2>", "<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"]


def render_report(summary: Mapping, best: Sequence[dict], worst: Sequence[dict],
                  jpegs: Mapping[str, bytes] | None = None, *, title: str = "Caption evaluation",
                  selection: Mapping | None = None, statistics: Mapping | None = None) -> str:
    """The HTML page.

    Args:
      summary: the metrics.json content; "metrics" maps names to scores, the
        other keys (split, checkpoint, step, beam_width, ...) are shown above;
        "caption_soundness", when there, gets its own section.
      best, worst: entries {"image_id", "caption", "score", "top_k",
        "references", "scores": {metric: value}} (see `best_and_worst`).
      jpegs: image_id -> JPEG bytes for the thumbnails (missing: no picture).
      selection: the run's checkpoint selection (model_dir/best/selection.json:
        {"metric", "best": {"step", "value"}, "history": [{"step", "metrics"}]}),
        drawn as val curves; None: no such section.
      statistics: `caption_statistics` of the evaluated captions; None: no
        length and vocabulary sections.
    """
    e = html.escape
    jpegs = jpegs or {}
    metrics = summary.get("metrics", {})
    rows = "".join(f'<tr><td>{e(m)}</td><td class="v">{100 * v:.2f}</td><td class="v">{v:.4f}</td></tr>'
                   for m, v in metrics.items())
    meta_keys = ("split", "num_images", "beam_width", "length_normalization", "checkpoint", "step",
                 "images_per_s", "strategy", "replicas", "records_dir")
    meta = "<br>".join(f"{e(k.replace('_', ' '))}: <code>{e(_fmt(summary[k]))}</code>"
                       for k in meta_keys if summary.get(k) is not None)
    split = e(str(summary.get("split", "")))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}{(' &ndash; ' + split) if split else ''}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}{(' &ndash; ' + split) if split else ''}</h1>",
        f'<p class="meta">{meta}</p>',
        "<h2>Scores</h2>",
        '<table class="metrics"><tr><th>metric</th><th>&times;100</th><th>raw</th></tr>'
        f"{rows}</table>",
        '<p class="meta">coco-caption (pycocoevalcap) with the PTB tokenizer; BLEU is corpus-level, '
        "CIDEr-D uses the document frequencies of the evaluated images.</p>",
    ]
    if summary.get("caption_soundness"):
        parts += _soundness_section(summary["caption_soundness"])
    if selection:
        parts += _selection_section(selection, summary.get("step"))
    if statistics:
        parts += _statistics_section(statistics)
    if best:
        parts.append(f"<h2>Best {len(best)} images by {e(RANK_METRIC)}</h2>")
        parts += [_card(x, jpegs.get(x["image_id"]), "good") for x in best]
    if worst:
        parts.append(f"<h2>Worst {len(worst)} images by {e(RANK_METRIC)}</h2>")
        parts += [_card(x, jpegs.get(x["image_id"]), "bad") for x in worst]
    parts.append("</body></html>\n")
    return "\n".join(parts)
