"""Captioning throughput: the toolkit's batched beam search vs the tutorial's per-hypothesis re-runs.

    python benchmarks/beam_search.py                        # Flickr8k images from ../shared/data/flickr8k
    python benchmarks/beam_search.py --images=DIR --batch=32 --batches=2 --reference_images=1
    python benchmarks/beam_search.py --scenarios=realistic

One random-weights ShowAndTell (InceptionV3 encoder at 299x299, LSTM 512,
embedding 512, vocabulary 8000) and one set of decoded images serve every
measurement:

  (a) toolkit: one tf.function encodes a batch once and runs `beam_search` (beam 3);
  (b) the tutorial's `predict` (reference/show-and-tell-tutorial.md): batch 1, and for
      every step and live hypothesis the WHOLE model (encoder + LSTM over the padded
      sequence) is called eagerly, then numpy argsort and Python lists;
  (c) the encoder alone in a tf.function;
  (d) the same batched code with beam 1 (greedy) and, for the breakdown, the decoder
      alone (beam 3 and greedy) from precomputed features.
Image decoding and resizing happen once, before any timing, for all of them.

Two scenarios, each measured in full (a to d) in the same run:

  max_len    the random weights as they are. Their next-word distribution is
             near-uniform, so the end token never wins and every hypothesis
             runs to max_len: the tutorial makes 1 + 34 x 3 = 103 whole-model
             calls per image at max_len 35 (its loop generates up to max_len
             tokens, as the toolkit does). This is the setting the issue
             calibrated its reference on (100 calls, 0.74 s each: the same
             loop with one token fewer) and set the >= 300x target against.
  realistic  the weights edited into a realistic decoder (see
             `make_decoder_realistic`): word logits scaled so the greedy word
             has log-prob about -1.5, and LSTM unit 0 turned into a counter that
             raises the end logit until captions end after about 12 tokens, as a
             trained model's do. The tutorial then makes about a third of the
             calls while the toolkit, already encoder-bound, barely changes, so
             this ratio is lower by about the caption-length ratio.

Everything printed is measured in this run; (b) is extrapolated only when
--reference_max_len is below --max_len, and then says so.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from showtell_dist.data.pipeline import decode_image  # noqa: E402
from showtell_dist.data.tokenizer import END_ID, START_ID, UNK_ID  # noqa: E402
from showtell_dist.decoding.beam_search import beam_search  # noqa: E402
from showtell_dist.model.show_and_tell import ShowAndTell  # noqa: E402

IMAGE_SIZE = 299
FORBIDDEN = (START_ID, UNK_ID)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=os.path.join(REPO_ROOT, "..", "shared", "data", "flickr8k", "images"),
                   help="Directory of JPEG images (default: ../shared/data/flickr8k/images from the repo root). "
                        "Random images are used, with a note, when it has none.")
    p.add_argument("--batch", type=int, default=32, help="Images per batch for (a), (c), (d).")
    p.add_argument("--batches", type=int, default=2, help="Timed batches per measurement (after one warm-up).")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--max_len", type=int, default=35, help="Maximum generated tokens incl. <end>.")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--caption_len", type=float, default=12.0, help="Target mean caption length in tokens incl. <end>.")
    p.add_argument("--reference_images", type=int, default=2, help="Images timed with the tutorial's algorithm.")
    p.add_argument("--reference_max_len", type=int, default=None,
                   help="Max length for (b) (default --max_len); smaller values are extrapolated.")
    p.add_argument("--scenarios", default="max_len,realistic",
                   help="Comma-separated: max_len (random weights, no caption ends early: the issue's "
                        "calibration) and/or realistic (captions end after ~--caption_len tokens).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = [x for x in args.scenarios if x not in SCENARIOS]
    if unknown or not args.scenarios:
        p.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.reference_images < 1:
        p.error("--reference_images must be at least 1")
    return args


# ----------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------


def load_images(directory: str, count: int, seed: int) -> tuple[np.ndarray, str]:
    """[count, 299, 299, 3] float32 0..255, decoded and resized like the input pipeline."""
    files = sorted(glob.glob(os.path.join(directory, "*.jpg")) + glob.glob(os.path.join(directory, "*.jpeg")))
    if not files:
        note = (f"NOTE: no JPEG images in {os.path.abspath(directory)}; using {count} uniformly random "
                "images (timings of the encoder do not depend on the content).")
        rng = np.random.default_rng(seed)
        return rng.uniform(0, 255, [count, IMAGE_SIZE, IMAGE_SIZE, 3]).astype(np.float32), note
    files = [files[i % len(files)] for i in range(count)]
    images = np.stack([decode_image(tf.io.read_file(f), IMAGE_SIZE).numpy() for f in files])
    repeated = " (repeated)" if count > len(set(files)) else ""
    return images, f"images: {len(set(files))} files from {os.path.abspath(directory)}{repeated}"


def greedy_word_log_prob(logits: np.ndarray, scale: float, end_id: int) -> float:
    """Mean log-prob of the arg-max word (end excluded) after multiplying logits by `scale`."""
    x = logits.astype(np.float64) * scale
    x = np.delete(x, end_id, axis=1)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return float(np.mean(x.max(axis=1) - lse))


def make_decoder_realistic(model: ShowAndTell, features: tf.Tensor, caption_len: float, seed: int,
                           target_word_log_prob: float = -1.5, end_steepness: float = 100.0) -> dict:
    """Edits random weights so that greedy and beam search produce ~caption_len-token captions.

    0. Random InceptionV3 features are tiny and nearly alike (the feature
       norm's epsilon dominates their variance), which makes every image's
       caption the same; the standardisation of the normalised features over
       `features` is folded into the init-state Dense, as a trained model's
       statistics would be, so h0 differs per image.
    1. LSTM unit 0 becomes a counter: input, forget and output gates saturated
       open and nothing recurrent feeds it, so its cell adds
       tanh(atanh(0.05) + v . embedding(token)) ~ 0.05 +- 0.015 per token.
    2. The remaining logit weights are scaled so that the arg-max word's
       log-prob is about `target_word_log_prob` over the first caption_len
       greedy steps (a trained captioner's range; random weights give
       ~ -9 = log(1 / 8000)).
    3. The end logit reads unit 0: end_steepness * tanh(c0) + bias, the bias
       putting the end token level with the best word where the counter stands
       between greedy steps caption_len - 1 and caption_len: P(end) is
       negligible early, then rises by ~3.5 logits per step (tanh is still
       steep at c0 ~ 0.6) and saturates ~45 logits above the words. Other words ignore unit 0.
    Returns calibration numbers for the printout.
    """
    units, vocab = model.units, model.logits.units
    rng = np.random.default_rng(seed)

    normed = model.feature_norm(features, training=False) if model.feature_norm is not None else features
    normed = normed.numpy().astype(np.float64)
    mu, sigma = normed.mean(axis=0), normed.std(axis=0) + 1e-12
    w, b = (v.numpy().astype(np.float64) for v in (model.init_dense.kernel, model.init_dense.bias))
    model.init_dense.kernel.assign((w / sigma[:, None]).astype(np.float32))
    model.init_dense.bias.assign((b - (mu / sigma) @ w).astype(np.float32))

    cell = model.lstm.cell
    kernel, recurrent, bias = (v.numpy() for v in (cell.kernel, cell.recurrent_kernel, cell.bias))
    gate = {name: k * units for k, name in enumerate("ifco")}  # Keras LSTM gate order i, f, c, o
    emb_std = float(np.std(model.embedding.embeddings.numpy()))
    for col in gate.values():
        recurrent[:, col] = 0.0
        kernel[:, col] = 0.0
        bias[col] = 20.0
    kernel[:, gate["c"]] = rng.normal(0.0, 0.015 / (math.sqrt(kernel.shape[0]) * emb_std), kernel.shape[0])
    bias[gate["c"]] = math.atanh(0.05)
    cell.kernel.assign(kernel)
    cell.recurrent_kernel.assign(recurrent)
    cell.bias.assign(bias)

    out_kernel = model.logits.kernel.numpy()
    out_bias = np.zeros(vocab, np.float32)
    out_kernel[0, :] = 0.0  # words ignore the counter
    model.logits.kernel.assign(out_kernel)
    model.logits.bias.assign(out_bias)

    # Greedy path without the end token: word logits and counter cell per step.
    steps = int(math.ceil(caption_len)) + 1
    state = model.initial_state(features)
    tokens = tf.fill([features.shape[0]], START_ID)
    logits_per_step, counter = [], []
    for _ in range(steps):
        logits, state = model.decode_step(tokens, state)
        logits = logits.numpy()
        logits[:, END_ID] = -np.inf
        logits_per_step.append(logits)
        counter.append(float(np.mean(state[1].numpy()[:, 0])))
        tokens = tf.constant(np.argmax(logits, axis=-1).astype(np.int32))
    collected = np.concatenate(logits_per_step[:steps - 1])
    lo, hi = 1.0, 1e7  # bisection on log(scale): the arg-max log-prob rises with the scale
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if greedy_word_log_prob(collected, mid, END_ID) < target_word_log_prob:
            lo = mid
        else:
            hi = mid
    scale = math.sqrt(lo * hi)
    end_step = int(round(caption_len)) - 1  # 0-based step that should emit <end>
    threshold = 0.5 * (counter[end_step - 1] + counter[end_step])
    best_word = float(np.mean(np.max(logits_per_step[end_step], axis=1))) * scale

    out_kernel[1:, :] *= scale
    out_kernel[0, END_ID] = end_steepness
    out_bias[END_ID] = best_word - end_steepness * math.tanh(threshold)
    model.logits.kernel.assign(out_kernel)
    model.logits.bias.assign(out_bias)
    h0 = model.initial_state(features)[0].numpy()
    return {"logit_scale": scale, "greedy_word_log_prob": greedy_word_log_prob(collected, scale, END_ID),
            "end_threshold_cell": threshold, "h0_std_across_images": float(h0.std(axis=0).mean())}


# ----------------------------------------------------------------------------
# The toolkit (a, c, d) and the tutorial (b)
# ----------------------------------------------------------------------------


def toolkit_functions(model: ShowAndTell, max_len: int, vocab: int):
    def search(features, beam):
        state = model.initial_state(features)
        r = beam_search(model.decode_step, state, beam_width=beam, max_len=max_len, start_id=START_ID,
                        end_id=END_ID, vocab_size=vocab, forbidden_ids=FORBIDDEN, length_normalization="average")
        return r.tokens, r.lengths, r.steps

    @tf.function
    def caption(images, beam):  # (a) / (d): encoder once, then beam search, one graph
        return search(model.encode(images), beam)

    @tf.function
    def encode(images):  # (c)
        return model.encode(images)

    @tf.function
    def decode_only(features, beam):  # breakdown: the decoder part of (a)
        return search(features, beam)

    return caption, encode, decode_only


def tutorial_predict(model: ShowAndTell, image: np.ndarray, caption_length: int, beam_width: int, counter: list):
    """The tutorial's `predict`, faithfully: per step and live hypothesis, the whole model on the padded sequence.

    Differences that do not change the work done: ids are not shifted by one
    (this model's outputs cover the whole vocabulary) and the token ids are
    returned instead of text.
    """
    next_token_idx = START_ID
    initial_hypothesis = {"seq": [next_token_idx], "score": 0.0, "norm_score": 0.0}
    beam = [initial_hypothesis]
    image_inp = tf.expand_dims(image, 0)

    for l in range(1, caption_length):
        candidates = []
        for hypo in beam:
            if hypo["seq"][-1] == END_ID:
                continue
            seq = hypo["seq"] + [0] * (caption_length - len(hypo["seq"]))
            seq_inp = tf.constant([seq], dtype=tf.int32)

            # The tutorial's model ends in a softmax; this one returns logits.
            distribution = tf.nn.softmax(model((image_inp, seq_inp), training=False))[0][l - 1].numpy()
            counter[0] += 1
            top_indices = np.argsort(distribution)[-beam_width:]
            top_words = [int(i) for i in top_indices]
            top_probs = distribution[top_indices]

            for word, prob in zip(top_words, top_probs):
                candidate_seq = hypo["seq"] + [word]
                candidate_score = hypo["score"] + np.log(prob)
                candidate_norm_score = candidate_score / l
                candidates.append({"seq": candidate_seq, "score": candidate_score,
                                   "norm_score": candidate_norm_score})

        beam = [hypo for hypo in beam if hypo["seq"][-1] == END_ID]
        beam = sorted(beam + candidates, key=lambda x: x["norm_score"], reverse=True)[:beam_width]

    return beam[0]["seq"][1:]


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else x, out)  # wait for the result
    return out, time.perf_counter() - start


def measure_toolkit(fns, batches, features0, beam: int) -> dict:
    """(a), (c), (d) over batches[1:] after tracing on batches[0]; interleaved so that load from other
    processes hits all measurements alike."""
    caption, encode, decode_only = fns
    for b in (beam, 1):  # warm-up: trace each function once (untimed)
        timed(caption, batches[0], b)
        timed(decode_only, features0, b)
    t = {"a": 0.0, "c": 0.0, "greedy": 0.0, "dec_beam": 0.0, "dec_greedy": 0.0}
    steps = {"beam": [], "greedy": []}
    lengths = {"beam": [], "greedy": []}
    beam_tokens = []
    for batch in batches[1:]:
        (tok, ln, st), dt = timed(caption, batch, beam)
        t["a"] += dt
        steps["beam"].append(int(st))
        lengths["beam"].append(ln.numpy()[:, 0])
        beam_tokens.append(tok.numpy()[:, 0])
        features, dt = timed(encode, batch)
        t["c"] += dt
        (_, ln, st), dt = timed(caption, batch, 1)
        t["greedy"] += dt
        steps["greedy"].append(int(st))
        lengths["greedy"].append(ln.numpy()[:, 0])
        _, dt = timed(decode_only, features, beam)
        t["dec_beam"] += dt
        _, dt = timed(decode_only, features, 1)
        t["dec_greedy"] += dt
    return {"t": t, "steps": steps, "len_beam": np.concatenate(lengths["beam"]),
            "len_greedy": np.concatenate(lengths["greedy"]), "beam_tokens": beam_tokens}


def measure_tutorial(model, ref_images, args, ref_max_len: int, longest_toolkit_caption: int) -> dict:
    """(b): the tutorial's algorithm on images the toolkit also captioned."""
    counter = [0]
    tutorial_predict(model, ref_images[0], 3, args.beam, [0])  # warm-up: first eager call builds kernels
    seqs = []
    start = time.perf_counter()
    for image in ref_images:
        seqs.append(tutorial_predict(model, image, ref_max_len + 1, args.beam, counter))
        print(f"  (b) image {len(seqs)}: {len(seqs[-1])} tokens, {counter[0]} whole-model calls so far, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    seconds = time.perf_counter() - start
    per_call = seconds / counter[0]
    calls_per_image = counter[0] / len(ref_images)
    extrapolated = ref_max_len < args.max_len
    if extrapolated:
        # Up to `beam` hypotheses stay live until all have ended, one whole-model call each per step.
        calls_per_image += args.beam * max(0, longest_toolkit_caption - ref_max_len)
    return {"seqs": seqs, "calls": counter[0], "seconds": seconds, "per_call": per_call,
            "calls_per_image": calls_per_image, "extrapolated": extrapolated,
            "ips": 1.0 / (calls_per_image * per_call)}


def report(title: str, args, ref_max_len: int, tk: dict, ref: dict) -> dict:
    t, steps, len_beam, len_greedy = tk["t"], tk["steps"], tk["len_beam"], tk["len_greedy"]
    ips = {k: args.batch * args.batches / v for k, v in t.items()}
    n_ref = len(ref["seqs"])
    same = sum(list(r) == list(t_[t_ > 0]) for r, t_ in zip(ref["seqs"], tk["beam_tokens"][0][:n_ref]))
    print()
    print(f"=== {title} (images/s; image decoding excluded everywhere) ===")
    print(f"captions: beam {args.beam} mean length {len_beam.mean():.1f} tokens incl. <end> "
          f"(min {len_beam.min()}, max {len_beam.max()}), while-loop steps per batch {steps['beam']}; "
          f"greedy mean {len_greedy.mean():.1f}, steps {steps['greedy']}")
    print(f"(a) toolkit, encoder + beam {args.beam} in one tf.function, batch {args.batch}: {ips['a']:8.2f} img/s")
    print(f"(b) tutorial predict, batch 1, whole model per hypothesis and step: {ref['ips']:8.4f} img/s")
    print(f"    measured: {n_ref} image(s), max_len {ref_max_len}, {ref['calls']} whole-model calls in "
          f"{ref['seconds']:.1f} s ({ref['per_call'] * 1000:.0f} ms per call); top caption equal to (a)'s for "
          f"{same} of {n_ref}")
    if ref["extrapolated"]:
        print(f"    EXTRAPOLATED to max_len {args.max_len}: {ref['calls_per_image']:.0f} calls per image = measured "
              f"calls + {args.beam} x (longest caption of (a) {int(np.max(len_beam))} - {ref_max_len}) at "
              f"{ref['per_call'] * 1000:.0f} ms each")
    print(f"(c) encoder alone, batch {args.batch}: {ips['c']:8.2f} img/s")
    print(f"(d) greedy (beam 1), same batched code: {ips['greedy']:8.2f} img/s; beam {args.beam}: {ips['a']:.2f} img/s")
    print(f"    decoder alone from features: beam {args.beam} {t['dec_beam'] / args.batches:.3f} s/batch, "
          f"greedy {t['dec_greedy'] / args.batches:.3f} s/batch")
    decoder_steps = sum(steps["beam"]) / args.batches
    print(f"    decoder cost per while-loop step: beam {args.beam} "
          f"{1000 * t['dec_beam'] / args.batches / decoder_steps:.1f} ms ({args.batch * args.beam} rows), greedy "
          f"{1000 * t['dec_greedy'] / args.batches / max(1.0, sum(steps['greedy']) / args.batches):.1f} ms "
          f"({args.batch} rows)")
    ratios = {"speedup": ips["a"] / ref["ips"], "beam_over_greedy": t["a"] / t["greedy"],
              "encoder_share": t["c"] / t["a"], "encoder_over_toolkit": ips["c"] / ips["a"]}
    print(f"(a)/(b) speed-up:              {ratios['speedup']:8.1f}x   (target >= 300x)")
    print(f"beam {args.beam} / greedy time:          {ratios['beam_over_greedy']:8.2f}    (target <= 1.3)")
    print(f"encoder share of (a)'s time:   {ratios['encoder_share']:8.1%}   (decoder {t['dec_beam'] / t['a']:.1%})")
    print(f"(c)/(a) images/s:              {ratios['encoder_over_toolkit']:8.2f}    (target <= 1.5)", flush=True)
    return ratios


SCENARIOS = {
    "max_len": ("random weights as they are: the end token never wins, every hypothesis runs to max_len "
                "(1 + {steps} x {beam} = {calls} whole-model calls per image for the tutorial; the issue calibrated "
                "its reference on 100 at max_len 35)"),
    "realistic": ("weights edited into a realistic decoder: captions end after ~{caption_len:g} tokens, as a "
                  "trained model's do, so the tutorial makes fewer calls"),
}


def main(argv=None):
    args = parse_args(argv)
    ref_max_len = args.reference_max_len or args.max_len
    keras.utils.set_random_seed(args.seed)
    n_batched = args.batch * (args.batches + 1)
    images, note = load_images(args.images, n_batched, args.seed)
    print(note, flush=True)
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU(s); batch {args.batch}, {args.batches} timed "
          f"batch(es) after 1 warm-up; beam {args.beam}, max_len {args.max_len}, vocabulary {args.vocab}; "
          f"scenarios: {', '.join(args.scenarios)}", flush=True)

    t0 = time.perf_counter()
    model = ShowAndTell(vocab_size=args.vocab, encoder="inception_v3", encoder_weights=None, units=512,
                        embed_dim=512).build_all()
    fns = toolkit_functions(model, args.max_len, args.vocab)
    batches = [tf.constant(images[i * args.batch:(i + 1) * args.batch]) for i in range(args.batches + 1)]
    features0 = fns[1](batches[0])  # traces the encoder; the features also calibrate the realistic decoder
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    ref_images = images[args.batch:args.batch + args.reference_images]  # the first images of timed batch 1

    summary = {}
    for name in args.scenarios:
        steps = args.max_len - 1  # the tutorial loops over range(1, max_len + 1); its first step has one hypothesis
        text = SCENARIOS[name].format(caption_len=args.caption_len, steps=steps, beam=args.beam,
                                      calls=1 + steps * args.beam)
        print(f"\n--- scenario {name}: {text}", flush=True)
        if name == "realistic":
            calib = make_decoder_realistic(model, features0, args.caption_len, args.seed)
            print("weights edited: images standardised into h0, word logits scaled, LSTM unit 0 counts tokens "
                  f"and drives the end logit: word logits x{calib['logit_scale']:.3g} (arg-max word log-prob "
                  f"{calib['greedy_word_log_prob']:.2f}), end logit rises past the best word when the counter cell "
                  f"reaches {calib['end_threshold_cell']:.2f}; h0 std across images "
                  f"{calib['h0_std_across_images']:.2f}", flush=True)
        tk = measure_toolkit(fns, batches, features0, args.beam)
        ref = measure_tutorial(model, ref_images, args, ref_max_len, int(np.max(tk["len_beam"])))
        summary[name] = report(f"scenario {name}", args, ref_max_len, tk, ref)

    if len(summary) > 1:
        print("\n=== summary ===")
        for name, r in summary.items():
            print(f"{name:10s} (a)/(b) {r['speedup']:7.1f}x   beam/greedy {r['beam_over_greedy']:.2f}   "
                  f"encoder share {r['encoder_share']:.0%}   (c)/(a) {r['encoder_over_toolkit']:.2f}")
        print("The issue's target (>= 300x) is set against its calibration, the max_len scenario. With captions "
              "that end early the tutorial does proportionally less work while the toolkit is already "
              "encoder-bound, so the realistic ratio is lower by about the caption-length ratio.")


if __name__ == "__main__":
    main()
