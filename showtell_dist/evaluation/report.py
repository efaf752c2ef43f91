"""A self-contained HTML page of an evaluation: scores, then the best and worst images.

One file, no external resources: plain inline CSS and thumbnails embedded as
base64 JPEG data URIs (downscaled, so the page stays small). Every caption,
reference and id is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Mapping, Sequence

RANK_METRIC = "CIDEr-D"
THUMBNAIL_SIDE = 160

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


def render_report(summary: Mapping, best: Sequence[dict], worst: Sequence[dict],
                  jpegs: Mapping[str, bytes] | None = None, *, title: str = "Caption evaluation") -> str:
    """The HTML page.

    Args:
      summary: the metrics.json content; "metrics" maps names to scores, the
        other keys (split, checkpoint, step, beam_width, ...) are shown above.
      best, worst: entries {"image_id", "caption", "score", "top_k",
        "references", "scores": {metric: value}} (see `best_and_worst`).
      jpegs: image_id -> JPEG bytes for the thumbnails (missing: no picture).
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
    if best:
        parts.append(f"<h2>Best {len(best)} images by {e(RANK_METRIC)}</h2>")
        parts += [_card(x, jpegs.get(x["image_id"]), "good") for x in best]
    if worst:
        parts.append(f"<h2>Worst {len(worst)} images by {e(RANK_METRIC)}</h2>")
        parts += [_card(x, jpegs.get(x["image_id"]), "bad") for x in worst]
    parts.append("</body></html>\n")
    return "\n".join(parts)
