"""Ensembles: several checkpoints decode together, their log-probabilities averaged at every step."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from showtell_dist.data.tokenizer import END_ID, PAD_ID, START_ID, UNK_ID
from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.errors import ConfigError
from showtell_dist.evaluation.captioner import caption_files
from showtell_dist.decoding.beam_search import beam_search
from showtell_dist.decoding.decoder import build_decoder
from showtell_dist.evaluation.evaluator import SplitDecoder, decode_split
from showtell_dist.export.saved_model import build_caption_module
from showtell_dist.run.restore import ensemble_members, load_ensemble, load_trained_model

SPLIT = "test"


@pytest.fixture(scope="module")
def trained(tiny_trained_dir):
    return load_trained_model(tiny_trained_dir)


@pytest.fixture(scope="module")
def perturbed(tiny_trained_dir):
    """The same run's model with every weight moved by seeded noise: a second, different member."""
    other = load_trained_model(tiny_trained_dir)
    rng = np.random.default_rng(7)
    for v in other.model.trainable_variables:
        v.assign(v.numpy() + rng.normal(0.0, 0.3, size=tuple(v.shape)).astype(v.dtype))
    return other


def _decoder(members, **options):
    return build_decoder([m.model for m in members], DecodeOptions(**options), members[0].tokenizer)


def _images(n=4, size=32, seed=3):
    return tf.constant(np.random.default_rng(seed).uniform(0, 255, size=(n, size, size, 3)).astype("float32"))


def test_an_ensemble_of_one_is_that_checkpoint(trained, tiny_dataset):
    records_dir, _ = tiny_dataset
    strategy = tf.distribute.get_strategy()
    ensemble = decode_split([trained], records_dir, SPLIT, strategy, DecodeOptions(beam_width=3), progress=False)
    # The model's own decode step, searched directly: what an ensemble of one must give, exactly.
    images = _images()
    alone = beam_search(trained.model.decode_step, trained.model.initial_state(trained.model.encode(images)),
                        beam_width=3, max_len=trained.tokenizer.max_len - 1, start_id=START_ID, end_id=END_ID,
                        vocab_size=trained.tokenizer.vocab_size, forbidden_ids=(UNK_ID, START_ID))
    one = build_decoder([trained.model], DecodeOptions(beam_width=3), trained.tokenizer)(images)
    np.testing.assert_array_equal(one.tokens.numpy(), alone.tokens.numpy())
    np.testing.assert_array_equal(one.scores.numpy(), alone.scores.numpy())
    assert len(ensemble) == 8 and all(r["top_k"] for r in ensemble)


def _numpy_greedy(members, images, max_len):
    """Reference: eager steps, each member's log-softmax in numpy, averaged by hand, arg-max."""
    states = [m.model.initial_state(m.model.encode(images, training=False)) for m in members]
    last = np.full([images.shape[0]], START_ID, np.int32)
    out = np.zeros([images.shape[0], max_len], np.int32)
    done = np.zeros([images.shape[0]], bool)
    for t in range(max_len):
        total = 0.0
        for k, m in enumerate(members):
            logits, states[k] = m.model.decode_step(tf.constant(last), states[k])
            logits = np.asarray(logits, np.float64)
            total = total + (logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
                             - logits.max(1, keepdims=True))
        average = total / len(members)
        average[:, [PAD_ID, UNK_ID, START_ID]] = -np.inf
        last = average.argmax(1).astype(np.int32)
        out[:, t] = np.where(done, PAD_ID, last)
        done |= last == END_ID
    return out


def test_an_ensemble_of_two_equals_a_hand_averaged_reference(trained, perturbed):
    images = _images()
    max_len = trained.tokenizer.max_len - 1
    greedy = _decoder([trained, perturbed], beam_width=1)(images)
    np.testing.assert_array_equal(greedy.tokens[:, 0].numpy(), _numpy_greedy([trained, perturbed], images, max_len))
    # The members alone caption differently: the average is not one of them.
    alone = [_decoder([m], beam_width=3)(images) for m in (trained, perturbed)]
    both = _decoder([trained, perturbed], beam_width=3)(images)
    assert not any(np.allclose(a.scores.numpy(), both.scores.numpy()) for a in alone)

    # Beam search over a step written out by hand: average of the two log-softmaxes.
    def step(tokens, states):
        (l1, s1), (l2, s2) = trained.model.decode_step(tokens, states[0]), perturbed.model.decode_step(tokens,
                                                                                                        states[1])
        return 0.5 * (tf.nn.log_softmax(l1) + tf.nn.log_softmax(l2)), (s1, s2)

    state = tuple(m.model.initial_state(m.model.encode(images, training=False)) for m in (trained, perturbed))
    reference = beam_search(step, state, beam_width=3, max_len=max_len, start_id=START_ID, end_id=END_ID,
                            vocab_size=trained.tokenizer.vocab_size, forbidden_ids=(UNK_ID, START_ID))
    np.testing.assert_array_equal(both.tokens.numpy(), reference.tokens.numpy())
    np.testing.assert_allclose(both.scores.numpy(), reference.scores.numpy(), atol=1e-5)


def test_export_and_caption_files_decode_the_ensemble(trained, perturbed, tmp_path):
    images = _images(n=2)
    options = DecodeOptions(beam_width=2, remove_bad_endings=True, block_trigrams=True)
    module = build_caption_module([trained, perturbed], options)
    exported = module.caption_pixels(images)
    evaluated = _decoder([trained, perturbed], **options.summary())(images)
    np.testing.assert_array_equal(exported.tokens.numpy(), evaluated.tokens.numpy())
    from PIL import Image

    path = str(tmp_path / "a.png")
    Image.fromarray(np.zeros([40, 40, 3], np.uint8)).save(path)
    both, _ = caption_files([trained, perturbed], [path], options)
    from showtell_dist.data import pipeline
    from showtell_dist.data.images import load_image_as_jpeg

    pixels = pipeline.decode_image(tf.constant(load_image_as_jpeg(path)[0]), 32)[None]  # as caption_files reads it
    expected = _decoder([trained, perturbed], **options.summary())(pixels)
    assert both[0]["caption"] == trained.tokenizer.decode(expected.tokens[0, 0].numpy())


def test_a_split_decoder_traces_once(trained, perturbed, tiny_dataset):
    records_dir, _ = tiny_dataset
    decoder = SplitDecoder([trained, perturbed], tf.distribute.get_strategy(), DecodeOptions(beam_width=2))
    first, _ = decoder.decode(records_dir, SPLIT, batch_size=4, progress=False)
    before = [v.numpy() for v in perturbed.model.trainable_variables]
    for v in perturbed.model.trainable_variables:
        v.assign(v * 1.5)  # other weights, the same variables: as checkpoint selection sees them
    try:
        second, _ = decoder.decode(records_dir, SPLIT, batch_size=4, progress=False)
        third, _ = decoder.decode(records_dir, "val", batch_size=4, progress=False)
    finally:
        for v, value in zip(perturbed.model.trainable_variables, before):
            v.assign(value)
    assert decoder.traces == 1
    assert len(first) == len(second) == 8 and len(third) == 12
    assert [r["score"] for r in first] != [r["score"] for r in second]


def test_members_and_vocabularies(tiny_trained_dir, tmp_path):
    assert ensemble_members(["a"], ["x", "y"]) == [("a", "x"), ("a", "y")]
    assert ensemble_members(["a", "b"], []) == [("a", None), ("b", None)]
    assert ensemble_members(["a", "b"], ["best"]) == [("a", "best"), ("b", "best")]
    assert ensemble_members(["a", "b"], ["x", "y"]) == [("a", "x"), ("b", "y")]
    with pytest.raises(ConfigError, match="one checkpoint for every model directory"):
        ensemble_members(["a", "b", "c"], ["x", "y"])
    other = str(tmp_path / "other_run")
    shutil.copytree(tiny_trained_dir, other)
    vocab_path = os.path.join(other, "vocab.json")
    vocab = json.load(open(vocab_path))
    vocab["words"][-1] = "zebra-that-is-not-there"
    json.dump(vocab, open(vocab_path, "w"))
    with pytest.raises(ConfigError, match="one vocabulary"):
        load_ensemble([(tiny_trained_dir, None), (other, None)])


def test_evaluate_launcher_decodes_an_ensemble_with_the_decoding_options(tiny_trained_dir, trained, tiny_dataset,
                                                                         tmp_path):
    import subprocess
    import sys

    from tiny_setup import REPO_ROOT

    copy = str(tmp_path / "copy_of_run")
    shutil.copytree(tiny_trained_dir, copy)
    out = str(tmp_path / "eval")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "evaluate.py"),
                           f"--model_dir={tiny_trained_dir},{copy}", "--beam_width=2", "--remove_bad_endings",
                           "--block_trigrams", "--nometeor", "--noprogress", f"--output_dir={out}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "metrics.json")))
    assert len(summary["checkpoint"]) == 2 and summary["remove_bad_endings"] and summary["block_trigrams"]
    # Two copies of one model average to that model: the captions of the model alone, with the same options.
    records_dir, _ = tiny_dataset
    alone = decode_split([trained], records_dir, SPLIT, tf.distribute.get_strategy(), DecodeOptions(beam_width=2, remove_bad_endings=True, block_trigrams=True),
                         progress=False)
    captions = {c["image_id"]: c["caption"] for c in json.load(open(os.path.join(out, "captions.json")))}
    assert captions == {r["image_id"]: r["caption"] for r in alone}
