"""What users see from a trained run stays the same: captions printed by launch/caption.py and the
metrics of launch/evaluate.py, pinned to the values they had before decoding was refactored.

The run is tests/pinned_run: the demo config shrunk (600 synthetic training images of 32x32, units 64,
embed_dim 32, data.deterministic_input=True), trained with launch/train.py for 600 steps, its checkpoint
re-saved with the model weights and step only (no optimizer slots). It is stored rather than trained
here because training is not portable: float32 kernels that differ in their last bits (oneDNN on or off,
another CPU) grow into other weights (measured: 5e-6 apart after 2 steps, 30% after 60) and other
captions. Decoding stored weights is portable: with oneDNN on and off the captions and scores printed
below are identical, and the closest two beam hypotheses of an image are 6e-4 apart in score, far above
float32 noise. The records are prepared here from the synthetic dataset the run was trained on
(generated from its seed), so their vocabulary is the run's.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # four launcher processes: about 45 s of CPU

from tiny_setup import REPO_ROOT

PINNED_RUN = os.path.join(REPO_ROOT, "tests", "pinned_run")
NUM_TEST_IMAGES = 12

GREEDY = [
    "a little purple square between a small purple triangle and a little purple circle",
    "a little blue triangle to the left of a big blue triangle",
    "a single small purple triangle",
    "a single large blue circle",
    "a little yellow triangle to the right of a big red square",
    "a small yellow triangle to the right of a big red square",
    "a large yellow triangle to the left of a big green square",
    "three shapes with a big red square on the right",
    "a big blue square a little blue triangle and a little purple triangle",
    "a little yellow triangle to the right of a big green square",
    "a single small purple triangle",
    "three shapes with a big red square on the right",
]

# (caption, score) of the 3 best beams (the run's eval.beam_width) of each image, best first.
BEAM_TOP3 = [
    [("three shapes with a small blue triangle on the right", -0.4605),
     ("three shapes with a small blue circle on the right", -0.4612),
     ("three shapes with a small purple circle on the right", -0.4625)],
    [("a little purple triangle to the left of a big blue circle", -0.5735),
     ("a little purple triangle to the left of a big blue square", -0.5781),
     ("a little purple triangle to the left of a big blue triangle", -0.5832)],
    [("there is only one shape a little purple triangle", -0.4271),
     ("there is only one shape a little blue triangle", -0.4277),
     ("there is only one shape a small purple triangle", -0.4320)],
    [("there is only one shape a large blue circle", -0.3812),
     ("there is only one shape a large blue square", -0.3906),
     ("there is only one shape a big blue circle", -0.4241)],
    [("a little yellow triangle to the right of a big red square", -0.5700),
     ("a little yellow triangle to the right of a large red square", -0.5722),
     ("a little yellow triangle to the right of a big red circle", -0.5729)],
    [("a small yellow triangle to the right of a large green square", -0.5606),
     ("a small yellow triangle to the right of a large green circle", -0.5622),
     ("a small yellow triangle to the right of a big red square", -0.5624)],
    [("two shapes a large yellow square and a big yellow square", -0.6494),
     ("two shapes a large yellow circle and a big yellow square", -0.6545),
     ("two shapes a large yellow square and a large yellow square", -0.6547)],
    [("three shapes with a big red square on the right", -0.4104),
     ("three shapes with a large red square on the right", -0.4152),
     ("three shapes with a big red triangle on the right", -0.4182)],
    [("three shapes with a big blue circle on the right", -0.4410),
     ("three shapes with a little blue circle on the right", -0.4444),
     ("three shapes with a large blue circle on the right", -0.4470)],
    [("a little yellow triangle to the right of a big green square", -0.5517),
     ("a little yellow triangle to the right of a large green square", -0.5529),
     ("a little yellow triangle to the right of a big green circle", -0.5542)],
    [("there is only one shape a little blue triangle", -0.4184),
     ("there is only one shape a little purple triangle", -0.4220),
     ("there is only one shape a small purple triangle", -0.4256)],
    [("three shapes with a big red square on the right", -0.4074),
     ("three shapes with a large red square on the right", -0.4111),
     ("three shapes with a big red triangle on the right", -0.4193)],
]

# --beam_width=5 --remove_bad_endings --block_trigrams: this run's beam-5 captions end on no function word and
# repeat no trigram, so the constraints keep them as they are.
CONSTRAINED = [
    "three shapes with a small blue triangle on the right",
    "a little purple triangle to the left of a big blue circle",
    "there is only one shape a little purple triangle",
    "there is only one shape a large blue circle",
    "a little yellow triangle to the right of a big red square",
    "a little yellow triangle to the right of a large green square",
    "a large yellow triangle to the right of a big green circle",
    "three shapes with a big red square on the right",
    "three shapes with a big blue circle on the right",
    "a little yellow triangle to the right of a big green square",
    "there is only one shape a little blue triangle",
    "three shapes with a big red square on the right",
]

# launch/evaluate.py on the 12 test images, the run's eval settings (beam 3, average length normalisation).
METRICS = {"BLEU-1": 0.833333, "BLEU-2": 0.745356, "BLEU-3": 0.639425, "BLEU-4": 0.529203, "METEOR": 0.362039,
           "ROUGE-L": 0.708086, "CIDEr-D": 1.729546}


def _run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", script), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    """(model_dir, records_dir, test image paths): a copy of the pinned run and its prepared data."""
    import ml_collections

    from showtell_dist.data.prepare import ensure_prepared

    root = tmp_path_factory.mktemp("pinned")
    model_dir = str(root / "run")
    shutil.copytree(PINNED_RUN, model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.data.source_dir = str(root / "raw")
    config.data.records_dir = str(root / "records")
    ensure_prepared(config, log=lambda *_: None)
    with open(os.path.join(config.data.records_dir, "vocab.json")) as a, \
            open(os.path.join(model_dir, "vocab.json")) as b:
        assert json.load(a)["words"] == json.load(b)["words"], "the regenerated dataset is not the pinned run's"
    images = [str(root / "raw" / "images" / f"test_{i:05d}.jpg") for i in range(NUM_TEST_IMAGES)]
    return model_dir, config.data.records_dir, images


def _captions(stdout):
    return [line.split("\t")[1] for line in stdout.splitlines()]


def test_greedy_captions_are_pinned(pinned):
    model_dir, _, images = pinned
    assert _captions(_run("caption.py", f"--model_dir={model_dir}", "--beam_width=1", *images)) == GREEDY


def test_beam_captions_and_scores_are_pinned(pinned):
    model_dir, _, images = pinned
    lines = [line.split("\t") for line in _run("caption.py", f"--model_dir={model_dir}", "--top_k=3",
                                               *images).splitlines()]
    got = [[(caption, float(score)) for _, caption, score in lines[i:i + 3]] for i in range(0, len(lines), 3)]
    assert [[c for c, _ in image] for image in got] == [[c for c, _ in image] for image in BEAM_TOP3]
    for image, expected in zip(got, BEAM_TOP3):
        assert [s for _, s in image] == pytest.approx([s for _, s in expected], abs=2e-4)


def test_constrained_beam_captions_are_pinned(pinned):
    model_dir, _, images = pinned
    stdout = _run("caption.py", f"--model_dir={model_dir}", "--beam_width=5", "--remove_bad_endings",
                  "--block_trigrams", *images)
    assert _captions(stdout) == CONSTRAINED


def test_evaluate_metrics_are_pinned(pinned, tmp_path):
    model_dir, records_dir, _ = pinned
    _run("evaluate.py", f"--model_dir={model_dir}", f"--records_dir={records_dir}", f"--output_dir={tmp_path}",
         "--noprogress")
    with open(tmp_path / "metrics.json") as f:
        summary = json.load(f)
    assert summary["num_images"] == NUM_TEST_IMAGES and summary["step"] == 600
    assert {name: summary["metrics"][name] for name in METRICS} == pytest.approx(METRICS, abs=1e-4)
