"""coco-caption scores through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

    corpus, per_image = score_captions({"img1": "a red circle"},
                                       {"img1": ["a small red circle", "a red circle on the left"]})
    corpus["CIDEr-D"], per_image["img1"]["BLEU-4"]

Predictions and references are first tokenized by the Stanford PTB tokenizer
(lower-cased, punctuation dropped), exactly as the COCO caption evaluation
server does; the scorers are pycocoevalcap's (its `Cider` is CIDEr-D: clipped
n-gram counts, Gaussian length penalty, x10). BLEU is corpus-level (n-gram
statistics summed over all images, closest reference length); the other
corpus scores are means over images (METEOR's is its own corpus aggregate).
CIDEr-D's document frequencies come from the references of the scored images,
so its values depend on the set of images scored together (a single image
always scores 0). SPICE is not computed (it needs a model download).

The PTB tokenizer and METEOR run on Java: `java` must be on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Hashable, Mapping, Sequence

from showtell_dist.errors import DataError, UserError

BLEU = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METRICS = BLEU + ("METEOR", "ROUGE-L", "CIDEr-D")

_JRE_HINT = ("Install a Java runtime (e.g. `apt-get install default-jre-headless` on Debian/Ubuntu, "
             "or a JRE from https://adoptium.net) and make sure `java` is on PATH")


def check_java() -> str:
    """Path of the `java` executable; UserError saying how to install one if there is none."""
    java = shutil.which("java")
    if java is None:
        raise UserError(f"caption metrics need Java: the PTB tokenizer and METEOR of pycocoevalcap are Java "
                        f"programs, but no `java` is on PATH. {_JRE_HINT}.")
    return java


def _pycocoevalcap_dir(subpackage: str) -> str:
    import importlib

    module = importlib.import_module(f"pycocoevalcap.{subpackage}")
    return os.path.dirname(os.path.abspath(module.__file__))


def ptb_tokenize(sentences: Sequence[str], java: str | None = None) -> list[str]:
    """Stanford PTB tokenization of each sentence, lower-cased, punctuation tokens removed.

    The same jar, options and punctuation list as pycocoevalcap's PTBTokenizer,
    but the temporary file goes to the system temp dir (pycocoevalcap writes
    it next to the jar, which fails where site-packages is read-only), and the
    output is checked to have one line per sentence.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    java = java or check_java()
    if not sentences:
        return []
    jar = os.path.join(_pycocoevalcap_dir("tokenizer.ptbtokenizer"), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    # One sentence per line; a non-empty sentinel last line keeps trailing empty sentences countable.
    lines = [" ".join(s.split()) for s in sentences] + ["end"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write("\n".join(lines))
        path = f.name
    try:
        proc = subprocess.run([java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", "-encoding", "utf-8", path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        raise UserError(f"the PTB tokenizer ({java} -cp {jar}) failed with status {proc.returncode}: "
                        f"{proc.stderr.decode('utf-8', 'replace').strip()[-2000:]}. Check the Java installation "
                        f"({_JRE_HINT}).")
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) < len(sentences) + 1:
        raise RuntimeError(f"the PTB tokenizer returned {len(out)} lines for {len(sentences) + 1}")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in punctuation)
            for line in out[: len(sentences)]]


def _check_inputs(predictions: Mapping, references: Mapping) -> list:
    if not predictions:
        raise DataError("no predictions to score: the captions dict is empty.")
    ids = list(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} predicted image(s) have no reference captions ({shown}); "
                        "score predictions only for images of the references' split.")
    for i in ids:
        if not isinstance(predictions[i], str):
            raise DataError(f"prediction for image {i!r} is {type(predictions[i]).__name__}, not a string.")
        refs = references[i]
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise DataError(f"references for image {i!r} must be a list of strings, got {refs!r}.")
    return ids


class _MeteorProcess:
    """pycocoevalcap's Meteor (a java subprocess), shut down deterministically."""

    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor

        self.meteor = Meteor()

    def score(self, gts: dict, res: dict):
        try:
            return self.meteor.compute_score(gts, res)
        except (ValueError, BrokenPipeError, OSError) as exc:
            # The java process died (e.g. could not reserve its 2 GB heap): its stderr says why.
            self._stop()
            err = self.meteor.meteor_p.stderr.read().decode("utf-8", "replace").strip()[-2000:]
            raise UserError(f"METEOR (java -jar meteor-1.5.jar) failed: {err or exc}. It needs a working Java "
                            "runtime and about 2 GB of memory; or skip METEOR (use_meteor=False, "
                            "launch/evaluate.py --nometeor).") from exc
        finally:
            self._stop()

    def _stop(self):
        m = self.meteor
        if m.lock.locked():  # compute_score raised while holding it; Meteor.__del__ would deadlock
            m.lock.release()
        p = m.meteor_p
        if p.returncode is None:
            try:
                p.stdin.close()
            except OSError:
                pass
            p.kill()
            p.wait()


def score_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
                   use_meteor: bool = True) -> tuple[dict[str, float], dict[Hashable, dict[str, float]]]:
    """Scores one predicted caption per image against that image's references.

    Args:
      predictions: image_id -> predicted caption (raw text).
      references: image_id -> reference captions (raw text); must cover every
        predicted image (extra images are ignored).
      use_meteor: METEOR costs a JVM start and loading its paraphrase table
        (~10 s); False leaves it out.

    Returns:
      (corpus, per_image): corpus maps each metric name of `METRICS`
      (without METEOR when use_meteor=False) to its corpus score; per_image
      maps each image_id to the same metrics for that image alone (BLEU-n per
      image is pycocoevalcap's smoothed sentence BLEU).

    Raises:
      UserError: no `java` on PATH, or METEOR/the tokenizer failed.
      DataError: empty predictions, or predicted images without references.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java = check_java()
    ids = _check_inputs(predictions, references)
    keys = list(range(len(ids)))  # pycocoevalcap wants hashable keys with equal key sets; use positions
    flat = [predictions[i] for i in ids]
    ref_counts = [len(references[i]) for i in ids]
    for i in ids:
        flat.extend(references[i])
    tokens = ptb_tokenize(flat, java)
    res = {k: [tokens[k]] for k in keys}
    gts, pos = {}, len(ids)
    for k, n in zip(keys, ref_counts):
        gts[k] = tokens[pos: pos + n]
        pos += n
    if not any(r for refs in gts.values() for r in refs):
        raise DataError("every reference caption is empty after tokenization (punctuation only?); "
                        "nothing to score against.")

    corpus: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for n, name in enumerate(BLEU):
        corpus[name], per[name] = float(bleu[n]), [float(x) for x in bleu_per[n]]
    if use_meteor:
        meteor, meteor_per = _MeteorProcess().score(gts, res)
        corpus["METEOR"], per["METEOR"] = float(meteor), [float(x) for x in meteor_per]
    rouge, rouge_per = Rouge().compute_score(gts, res)
    corpus["ROUGE-L"], per["ROUGE-L"] = float(rouge), [float(x) for x in rouge_per]
    cider, cider_per = Cider().compute_score(gts, res)
    corpus["CIDEr-D"], per["CIDEr-D"] = float(cider), [float(x) for x in cider_per]

    names = [m for m in METRICS if m in corpus]
    per_image = {i: {m: per[m][k] for m in names} for k, i in enumerate(ids)}
    return {m: corpus[m] for m in names}, per_image


def format_metrics_table(corpus: Mapping[str, float]) -> str:
    """A two-column text table of corpus scores (x100 like the COCO leaderboard, CIDEr-D too)."""
    width = max(len(m) for m in corpus) if corpus else 6
    lines = [f"{'metric'.ljust(width)}  score"]
    lines += [f"{m.ljust(width)}  {100 * v:6.2f}" for m, v in corpus.items()]
    return "\n".join(lines)
