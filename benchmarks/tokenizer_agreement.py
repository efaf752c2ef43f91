"""Do the training tokenizer and the metrics' PTB tokenizer split captions into the same words?

    python benchmarks/tokenizer_agreement.py                  # all of ../shared/data/flickr8k/captions.csv
    python benchmarks/tokenizer_agreement.py --captions=my_captions.csv --examples=30
    python benchmarks/tokenizer_agreement.py --exceptions     # also probe spaCy's exception table

Every caption is split by (a) the toolkit's tokenizer (showtell_dist/data/tokenizer.py:
spaCy with `ptb_compatible` rules, lower-cased, punctuation dropped), (b) plain
spacy.blank("en") with its punctuation dropped (the rules before `ptb_compatible`), and
(c) the Stanford PTB tokenizer exactly as the caption metrics run it
(showtell_dist/evaluation/metrics.py `ptb_tokenize`: lower-cased, pycocoevalcap's
punctuation list dropped). A caption whose words differ between (a) and (c) holds a word
the model cannot write or the metric does not see as the model writes it.

Differences are counted per caption and per kind, with examples. One kind is reported
apart: brackets. PTB turns "(" into -LRB-, and pycocoevalcap's punctuation list has
-LRB-, but the tokens are lower-cased first (-lrb-), so the metric keeps brackets as words.
The toolkit drops them as the metric means to. With --exceptions, each entry of spaCy's
tokenizer exception table (and its lower/upper-case forms) is probed as "a X b" as well.

Needs Java (the PTB tokenizer is a Java program). Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import collections
import csv
import difflib
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from showtell_dist.data.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402
from showtell_dist.evaluation.metrics import ptb_tokenize  # noqa: E402

# What the PTB tokenizer makes of brackets, lower-cased (the metric keeps these; see above).
BRACKET_TOKENS = frozenset({"-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"})


def plain_spacy_words(captions: list[str]) -> list[list[str]]:
    """The rules before `ptb_compatible`: spacy.blank("en"), spaCy's punctuation and spaces dropped."""
    import spacy

    nlp = spacy.blank("en")
    return [[t.lower_ for t in doc if not (t.is_punct or t.is_space)]
            for doc in nlp.tokenizer.pipe(captions, batch_size=1000)]


def differences(ptb: list[str], ours: list[str]) -> list[tuple[str, str]]:
    """(PTB words, our words) of each differing stretch, brackets the metric keeps left out."""
    a = [w for w in ptb if w not in BRACKET_TOKENS]
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=ours, autojunk=False).get_opcodes():
        if op != "equal":
            out.append((" ".join(a[i1:i2]), " ".join(ours[j1:j2])))
    return out


def compare(name: str, captions: list[str], ptb: list[str], ours: list[list[str]], examples: int) -> int:
    """Prints the agreement of `ours` with PTB; returns the number of captions that differ."""
    kinds: collections.Counter = collections.Counter()
    example_of: dict = {}
    differing = brackets_only = 0
    for caption, p, words in zip(captions, ptb, ours):
        p = p.split()
        if p == words:
            continue
        diffs = differences(p, words)
        if not diffs:
            brackets_only += 1
            continue
        differing += 1
        for d in diffs:
            kinds[d] += 1
            example_of.setdefault(d, caption)
    total = len(captions)
    print(f"{name}: {differing} of {total} captions ({100 * differing / max(total, 1):.2f}%) split into other "
          f"words than PTB; {brackets_only} more differ only by brackets the metric keeps as -lrb-/-rrb-")
    for (ptb_words, our_words), n in kinds.most_common(examples):
        print(f"  {n:5d} x  PTB {ptb_words!r:24} ours {our_words!r:24} e.g. {example_of[(ptb_words, our_words)]!r}")
    if len(kinds) > examples:
        print(f"  ... and {len(kinds) - examples} more kinds ({sum(kinds.values())} differences in all)")
    return differing


def read_captions(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        if "caption" not in (rows.fieldnames or []):
            sys.exit(f"{path} has no 'caption' column (columns: {rows.fieldnames})")
        return [row["caption"] for row in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", default=os.path.join(REPO_ROOT, "..", "shared", "data", "flickr8k", "captions.csv"),
                   help="A CSV with a 'caption' column (default: Flickr8k's captions.csv).")
    p.add_argument("--examples", type=int, default=20, help="Kinds of difference to show with an example each.")
    p.add_argument("--exceptions", action="store_true", help="Also probe every spaCy tokenizer exception.")
    args = p.parse_args()

    captions = read_captions(args.captions)
    tokenizer = Tokenizer(words=list(SPECIAL_TOKENS), max_len=3)
    start = time.perf_counter()
    ptb = ptb_tokenize(captions)
    ptb_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = tokenizer.split_words(captions)
    ours_s = time.perf_counter() - start
    print(f"{len(captions)} captions from {args.captions}; PTB tokenizer {ptb_s:.1f} s, "
          f"toolkit tokenizer {ours_s:.1f} s")
    hyphenated = sum(any("-" in w.strip("-") for w in c.split()) for c in captions)
    print(f"captions with a hyphenated word: {hyphenated}")
    compare("plain spacy.blank('en') (before)", captions, ptb, plain_spacy_words(captions), args.examples)
    differing = compare(f"toolkit tokenizer, rules {tokenizer.rules!r}", captions, ptb, ours, args.examples)

    if args.exceptions:
        import spacy

        keys = sorted({v for k in spacy.blank("en").tokenizer.rules for v in (k, k.lower(), k.upper())})
        probes = [f"a {k} b" for k in keys]
        compare(f"spaCy's {len(keys)} tokenizer exceptions as 'a X b'", probes, ptb_tokenize(probes),
                tokenizer.split_words(probes), args.examples)
    return differing


if __name__ == "__main__":
    main()
