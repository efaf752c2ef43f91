"""Training throughput: the toolkit's train steps vs the tutorial's, in captions/s from one run.

    python benchmarks/train_throughput.py                     # default: 3 timed steps per path
    python benchmarks/train_throughput.py --steps=1 --skip_reference

One model shape for everything (vocabulary 8000, captions padded to 35 tokens,
LSTM 512, embedding 512, batch 32 images x 5 captions, or 32 captions for the
tutorial), random weights, random token ids with caption lengths uniform in
8..18 tokens (incl. <start> and <end>; real captions average ~12), so that the
share of padding is the same in every path:

  (a) toolkit, cached features: `Trainer.train_loop` on batches
      {"features": [32, 1280], "captions": [32, 5, 35]} (the encoder is skipped,
      as with a features cache; the model is the flickr8k_mobilenet config's,
      with vocabulary 8000 and random weights);
  (b) toolkit, images: `Trainer.train_loop` on batches
      {"images": [32, 299, 299, 3], "captions": [32, 5, 35]} with a frozen
      InceptionV3 (weights None) that runs once per image inside the step;
  (c) the tutorial (reference/show-and-tell-tutorial.md) ported to Keras 3: one
      (image, caption) pair per example, batch 32 captions, so InceptionV3 runs
      once per CAPTION; frozen InceptionV3 + MaxPool 5x5 + Flatten +
      Dense(512, tanh) as the LSTM's initial state, LSTM with the padding mask,
      TimeDistributed(Dense(vocab, softmax)), SparseCategoricalCrossentropy(
      ignore_class=-1), Adam, run by Keras' own `Model.train_step` (what
      `model.fit` compiles; jit_compile "auto" is off on a CPU) inside one
      tf.function loop like the toolkit's `train_loop`.

All three read in-memory batches (a few distinct ones, cycled), so image
decoding is excluded everywhere (the tutorial decodes once per image before its
flat_map, so it would add the same per-image cost to (b) and (c)). Timed steps
are interleaved (a, b, c, a, b, c, ...) after one warm-up step each, so that
load from other processes hits all of them alike.

Also printed, all measured in this run:
  * the decoder's achieved GFLOP/s in (a) -- LSTM 4*units*(embed+units)*2 and
    output projection units*vocab*2 FLOPs per token, x3 for forward+backward,
    over every padded position the step computes -- beside a float32
    tf.matmul [2048, 2048] in a tf.function, and a breakdown of (a) into
    LSTM forward+backward and projection+loss forward+backward;
  * the input pipeline alone (`pipeline.train_input_fn`: read, parse, shuffle,
    batch; no model) in images/s vs (a)'s step in images/s, over the Flickr8k
    features cache (data_cache/flickr8k/features_mobilenet_v2) when its
    manifest exists, else over a synthetic features cache written to a temp dir;
  * peak RSS (ru_maxrss) of (a) run in a fresh subprocess (model built as
    `build_experiment` builds it, encoder included, fed by that input pipeline
    through `distribute_datasets_from_function`, as `train` feeds it);
  * precision: (a)'s step in float32 and in mixed_bfloat16 (a second model
    built under that policy, as train.mixed_precision builds it), each beside a
    [2048, 2048] matmul in its own dtype (the ceiling), timed interleaved.
    Alone: `--only_precision`; skipped with `--skip_precision`;
  * self-critical: (a)'s cross-entropy step and the self-critical step
    (training/self_critical.py: K = 5 samples per image up to 20 tokens, CIDEr-D
    reward in the graph, mean baseline) on the same batches of 32 images, in
    images/s, timed interleaved; target: scst costs <= 3x xe. The output bias of
    <end> is raised so that samples average ~10 words, as a trained model's do
    (a random model would sample to the maximum length). Alone: `--only_scst`;
    skipped with `--skip_scst`.
  * fine-tuning: (a)'s cross-entropy step from cached features beside the
    finetune phase's step (training/trainer.py FineTuneTrainer: MobileNetV2 at
    224 trained too, inference-mode BatchNorm, from uint8 images) on the same
    captions, in images/s, timed interleaved; and what an hour of the finetune
    step buys on Flickr8k's 6000 train images (steps, epochs). Alone:
    `--only_finetune`; skipped with `--skip_finetune`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from configs import flickr8k_mobilenet  # noqa: E402
from showtell_dist.data import feature_cache, pipeline, records  # noqa: E402
from showtell_dist.data.tokenizer import END_ID, START_ID  # noqa: E402
from showtell_dist.model.show_and_tell import build_model  # noqa: E402
from showtell_dist.training.loss import masked_token_loss_sum  # noqa: E402
from showtell_dist.training.trainer import Trainer  # noqa: E402

DEFAULT_FEATURES_DIR = os.path.join(REPO_ROOT, "data_cache", "flickr8k", "features_mobilenet_v2")
FEATURE_DIM = 1280  # MobileNetV2, the flickr8k_mobilenet config's encoder
INCEPTION_SIZE = 299
CHILD_TAG = "MEMORY_CHILD_RESULT "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="Timed train steps per path, after one warm-up step each.")
    p.add_argument("--batch", type=int, default=32, help="Images per step for (a)/(b); captions per step for (c).")
    p.add_argument("--captions_per_image", type=int, default=5)
    p.add_argument("--max_len", type=int, default=35, help="Padded caption length incl. <start> and <end>.")
    p.add_argument("--min_caption_len", type=int, default=8)
    p.add_argument("--max_caption_len", type=int, default=18)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--units", type=int, default=512)
    p.add_argument("--embed_dim", type=int, default=512)
    p.add_argument("--matmul_size", type=int, default=2048)
    p.add_argument("--pipeline_batches", type=int, default=300, help="Timed batches of the input pipeline alone.")
    p.add_argument("--features_dir", default=DEFAULT_FEATURES_DIR,
                   help="A features cache for the pipeline and memory measurements; a synthetic one is written "
                        "to a temp dir when it has no manifest.json.")
    p.add_argument("--skip_reference", action="store_true", help="Skip (c), the tutorial's training.")
    p.add_argument("--skip_memory", action="store_true", help="Skip the peak-memory subprocess.")
    p.add_argument("--skip_precision", action="store_true", help="Skip the float32 vs mixed_bfloat16 section.")
    p.add_argument("--only_precision", action="store_true", help="Run only the float32 vs mixed_bfloat16 section.")
    p.add_argument("--skip_scst", action="store_true", help="Skip the self-critical vs cross-entropy section.")
    p.add_argument("--only_scst", action="store_true", help="Run only the self-critical vs cross-entropy section.")
    p.add_argument("--skip_finetune", action="store_true", help="Skip the fine-tune vs cross-entropy section.")
    p.add_argument("--only_finetune", action="store_true", help="Run only the fine-tune vs cross-entropy section.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory_child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def random_captions(rng, shape, args) -> np.ndarray:
    """int32 [*shape, max_len]: <start> words <end> 0..., lengths uniform in min..max_caption_len."""
    lengths = rng.integers(args.min_caption_len, args.max_caption_len + 1, size=shape)
    words = rng.integers(4, args.vocab, size=(*shape, args.max_len)).astype(np.int32)
    pos = np.arange(args.max_len)
    out = np.where(pos < lengths[..., None] - 1, words, 0)
    out[..., 0] = START_ID
    np.put_along_axis(out, (lengths - 1)[..., None], END_ID, axis=-1)
    return out.astype(np.int32)


def cycled(tensors) -> tf.data.Iterator:
    """An infinite iterator over the leading dimension of `tensors` (a few distinct in-memory batches)."""
    return iter(tf.data.Dataset.from_tensor_slices(tensors).repeat().prefetch(2))


def write_synthetic_features_cache(directory: str, args, num_images: int = 2000, num_shards: int = 4) -> dict:
    """A small features cache (records + manifest, no vocabulary) in the format of feature_cache.py."""
    rng = np.random.default_rng(args.seed + 1)
    captions = random_captions(rng, (num_images, args.captions_per_image), args)
    shards = []
    per_shard = -(-num_images // num_shards)
    for s in range(num_shards):
        name = records.shard_name("train", s, num_shards)
        ids = range(s * per_shard, min(num_images, (s + 1) * per_shard))
        with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
            for i in ids:
                token_ids = [[int(t) for t in row if t] for row in captions[i]]
                image = records.encode_example(f"{i}.jpg", b"", 0, 0, token_ids, [""] * len(token_ids))
                features = np.abs(rng.normal(0.0, 1.0, FEATURE_DIM))
                writer.write(records.features_example(image, features))
        shards.append({"file": name, "records": len(ids), "captions": len(ids) * args.captions_per_image})
    manifest = {"kind": feature_cache.KIND, "max_len": args.max_len,
                "features": {"encoder": "mobilenet_v2", "dim": FEATURE_DIM, "dtype": feature_cache.DTYPE},
                "splits": {"train": {"images": num_images, "captions": num_images * args.captions_per_image,
                                     "shards": shards}}}
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


def features_cache(args, tmp: str) -> tuple[str, dict, str]:
    """(directory, manifest, description) of the features cache the pipeline and memory measurements read."""
    if os.path.exists(os.path.join(args.features_dir, "manifest.json")):
        with open(os.path.join(args.features_dir, "manifest.json")) as f:
            manifest = json.load(f)
        n = manifest["splits"]["train"]["images"]
        return args.features_dir, manifest, (f"features cache {args.features_dir} ({n} train images, "
                                             f"dim {pipeline.feature_dim(manifest)}, real captions)")
    manifest = write_synthetic_features_cache(tmp, args)
    return tmp, manifest, (f"NOTE: no manifest.json in {args.features_dir}; a synthetic features cache of "
                           f"{manifest['splits']['train']['images']} images (dim {FEATURE_DIM}) written to {tmp}")


# ----------------------------------------------------------------------------
# Configs and models
# ----------------------------------------------------------------------------


def toolkit_config(args, encoder: str):
    """The flickr8k_mobilenet experiment at this benchmark's shape; random encoder weights."""
    config = flickr8k_mobilenet.get_config()
    config.model.encoder_weights = ""
    config.model.units = args.units
    config.model.embed_dim = args.embed_dim
    config.train.global_batch_size = args.batch
    config.data.captions_per_image = args.captions_per_image
    if encoder == "inception_v3":
        config.model.encoder = "inception_v3"
        config.model.image_size = INCEPTION_SIZE
    return config


def toolkit_trainer(args, encoder: str):
    config = toolkit_config(args, encoder)
    keras.mixed_precision.set_global_policy("float32")
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(config.model, args.vocab)
    return config, model, Trainer(strategy, model, config.train, jit_compile=False)


class TutorialShowAndTell(keras.Model):
    """The tutorial's model, ported to Keras 3 (`input_length` is gone from Embedding; weights None)."""

    def __init__(self, img_shape, caption_length, vocab_size, **kwargs):
        super().__init__(**kwargs)
        self.img_shape = img_shape
        self.caption_length = caption_length
        self.vocab_size = vocab_size
        self.inception1 = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=img_shape)
        self.inception1.trainable = False
        self.max_pool1 = keras.layers.MaxPool2D((5, 5), name="enc_max_pool1")
        self.flatten1 = keras.layers.Flatten(name="enc_flatten1")
        self.dense1 = keras.layers.Dense(512, activation="tanh", name="enc_dense1")
        self.dropout1 = keras.layers.Dropout(0.3)
        self.embedding1 = keras.layers.Embedding(input_dim=vocab_size + 1, output_dim=512, name="embedding1")
        self.lstm1 = keras.layers.LSTM(512, return_sequences=True, name="dec_lstm1")
        self.dropout2 = keras.layers.Dropout(0.5)
        self.output1 = keras.layers.TimeDistributed(keras.layers.Dense(vocab_size, activation="softmax"),
                                                    name="output1")

    def call(self, inputs):
        input_img, input_caption = inputs
        inception1 = self.inception1(input_img)
        max_pool1 = self.max_pool1(inception1)
        flatten1 = self.flatten1(max_pool1)
        dense1 = self.dense1(flatten1)
        dropout1 = self.dropout1(dense1)
        mask = tf.math.not_equal(input_caption, 0)
        embedding1 = self.embedding1(input_caption)
        lstm1 = self.lstm1(embedding1, mask=mask, initial_state=[dropout1, tf.zeros_like(dropout1)])
        dropout2 = self.dropout2(lstm1)
        return self.output1(dropout2, mask=mask)


def tutorial_examples(images: np.ndarray, captions: np.ndarray, batch: int, num_batches: int):
    """The tutorial's flat_map: (image, caption) pairs image-major, batched by `batch` captions.

    images [n, 299, 299, 3] 0..255 -> inception_v3.preprocess_input (as its pipeline does);
    targets = caption rolled left by one, last 0, minus 1 (padding -> -1, ignored by the loss).
    Returns ((images [k, batch, 299, 299, 3], captions [k, batch, T]), targets [k, batch, T]).
    """
    pairs = batch * num_batches
    image_index = np.arange(pairs) // captions.shape[1]
    caption_rows = captions.reshape(-1, captions.shape[-1])[:pairs]
    x_img = images[image_index] / 127.5 - 1.0
    targets = np.roll(caption_rows, -1, axis=1)
    targets[:, -1] = 0
    targets = targets - 1
    shape = lambda a: a.reshape(num_batches, batch, *a.shape[1:])  # noqa: E731
    return (shape(x_img.astype(np.float32)), shape(caption_rows)), shape(targets.astype(np.int32))


def build_tutorial(args, sample):
    model = TutorialShowAndTell((INCEPTION_SIZE, INCEPTION_SIZE, 3), args.max_len, args.vocab)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=-1),
                  optimizer=keras.optimizers.Adam(learning_rate=1e-3), jit_compile=False)
    model(sample)  # builds the variables
    model.optimizer.build(model.trainable_variables)

    @tf.function
    def train(iterator, num_steps):  # Keras' own train step, the one model.fit compiles, n per host call
        loss = tf.constant(0.0)
        for _ in tf.range(num_steps):
            loss = tf.cast(model.train_step(next(iterator))["loss"], tf.float32)
        return {"loss": loss}

    return model, train


# ----------------------------------------------------------------------------
# Peak memory of (a) in a fresh process
# ----------------------------------------------------------------------------


def memory_child(args) -> None:
    """(a) as `train_loop.train` runs it: built like build_experiment, fed by the input pipeline."""
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Python + TensorFlow + Keras imported
    with open(os.path.join(args.features_dir, "manifest.json")) as f:
        manifest = json.load(f)
    config, model, trainer = toolkit_trainer(args, "mobilenet_v2")
    strategy = trainer.strategy
    spec = pipeline.PipelineSpec(
        data_dir=args.features_dir, split="train", image_size=config.model.image_size,
        captions_per_image=args.captions_per_image, max_len=args.max_len, global_batch_size=args.batch,
        seed=config.train.seed,
        shuffle_buffer=min(config.data.shuffle_buffer, manifest["splits"]["train"]["images"]))
    dataset = strategy.distribute_datasets_from_function(pipeline.train_input_fn(manifest, spec))
    iterator = iter(dataset)
    trainer.train_loop(iterator, 1)  # warm-up: traces the step
    start = time.perf_counter()
    trainer.train_loop(iterator, args.steps)
    elapsed = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(CHILD_TAG + json.dumps({
        "peak_kb": peak_kb, "baseline_kb": baseline_kb, "steps": args.steps,
        "captions_per_s": args.steps * args.batch * args.captions_per_image / elapsed}), flush=True)


def run_memory_child(args, features_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory_child", f"--features_dir={features_dir}"]
    for name in ("steps", "batch", "captions_per_image", "max_len", "vocab", "units", "embed_dim", "seed"):
        cmd.append(f"--{name}={getattr(args, name)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    raise RuntimeError(f"memory subprocess failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def decoder_breakdown_functions(model, rows: int, time_steps: int):
    """(a)'s decoder split in two, each forward + backward in its own tf.function."""
    units = model.units

    @tf.function
    def lstm_part(h0, tokens):
        with tf.GradientTape() as tape:
            tape.watch(h0)
            x = model.embedding(tokens)
            y = model.lstm(x, initial_state=[h0, tf.zeros_like(h0)], training=True)
            loss = tf.reduce_sum(y)
        grads = tape.gradient(loss, [h0] + model.lstm.trainable_variables + model.embedding.trainable_variables)
        return tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g)) for g in grads])

    @tf.function
    def projection_part(hidden, targets):
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss_sum, _ = masked_token_loss_sum(targets, model.logits(hidden))
        grads = tape.gradient(loss_sum, [hidden] + model.logits.trainable_variables)
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    h0 = tf.random.normal([rows, units])
    hidden = tf.random.normal([rows, time_steps, units])
    return lstm_part, projection_part, h0, hidden


def timed(fn, *args, outputs: dict | None = None, name: str = ""):
    start = time.perf_counter()
    out = fn(*args)
    out = tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else x, out)
    if outputs is not None:
        outputs[name] = out
    return time.perf_counter() - start


def target_line(name: str, value: float, ok: bool, target: str, fmt: str) -> str:
    return f"{name:<44s}{format(value, fmt):>10s}   target {target:<9s} {'MET' if ok else 'MISSED'}"


# ----------------------------------------------------------------------------
# Precision: float32 vs mixed_bfloat16, each beside its own matmul ceiling
# ----------------------------------------------------------------------------


def precision_trainer(args, policy: str):
    """(a)'s model and Trainer under a Keras dtype policy, built as build_experiment builds them."""
    config = toolkit_config(args, "mobilenet_v2")
    keras.mixed_precision.set_global_policy(policy)
    try:
        strategy = tf.distribute.get_strategy()
        with strategy.scope():
            model = build_model(config.model, args.vocab)
        trainer = Trainer(strategy, model, config.train, jit_compile=False,
                          mixed_precision=None if policy == "float32" else policy)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return trainer


def precision_section(args) -> None:
    """Prints (a)'s captions/s in float32 and mixed_bfloat16, each beside a matmul in its dtype."""
    from showtell_dist.distribute.precision import cpu_has_fast_bf16

    B, C, T, n = args.batch, args.captions_per_image, args.max_len, args.matmul_size
    rng = np.random.default_rng(args.seed + 2)
    captions = random_captions(rng, (2, B, C), args)
    features = np.abs(rng.normal(0.0, 1.0, (2, B, FEATURE_DIM))).astype(np.float32)
    real_fraction = float(np.mean(captions[..., 1:] != 0))
    policies = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16}
    mm_reps = 4
    fns = {}
    for policy, dtype in policies.items():
        trainer = precision_trainer(args, policy)
        it = cycled({"features": features, "captions": captions})
        fns[f"step {policy}"] = (lambda t, i: lambda: t.train_loop(i, 1))(trainer, it)
        x, y = tf.cast(tf.random.normal([n, n]), dtype), tf.cast(tf.random.normal([n, n]), dtype)

        @tf.function
        def matmul_loop(x, y):
            acc = tf.constant(0.0)
            for _ in tf.range(mm_reps):
                acc += tf.cast(tf.matmul(x, y)[0, 0], tf.float32)
            return acc

        fns[f"matmul {policy}"] = (lambda f, a, b: lambda: f(a, b))(matmul_loop, x, y)
    for fn in fns.values():
        timed(fn)  # warm-up: tracing + first step
    times = {name: [] for name in fns}
    for _ in range(max(args.steps, 3)):  # interleaved, so load from other processes hits all alike
        for name, fn in fns.items():
            times[name].append(timed(fn))
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows, steps_t = B * C, T - 1
    lstm_tok = 4 * args.units * (args.embed_dim + args.units) * 2
    proj_tok = args.units * args.vocab * 2
    computed_flops = 3 * rows * steps_t * (lstm_tok + real_fraction * proj_tok)
    print(f"precision (a), cached features, {B}x{C} captions/step; CPU fast bf16 (AMX/AVX512-BF16 in "
          f"/proc/cpuinfo): {cpu_has_fast_bf16()}; medians over {len(times['step float32'])} interleaved rounds:")
    result = {}
    for policy in policies:
        step_s, mm_s = med[f"step {policy}"], med[f"matmul {policy}"]
        mm_gflops = mm_reps * 2 * n ** 3 / mm_s / 1e9
        result[policy] = (B * C / step_s, mm_gflops)
        print(f"    {policy:<15s} {B * C / step_s:9.1f} captions/s ({step_s:.2f} s/step, decoder "
              f"{computed_flops / step_s / 1e9:.1f} GFLOP/s computed); matmul [{n}, {n}] in its dtype: "
              f"{mm_gflops:.1f} GFLOP/s")
    (c32, m32), (c16, m16) = result["float32"], result["mixed_bfloat16"]
    print(f"    mixed_bfloat16 / float32: train step {c16 / c32:.2f}x, matmul ceiling {m16 / m32:.2f}x")


# ----------------------------------------------------------------------------
# Self-critical vs cross-entropy step, same images
# ----------------------------------------------------------------------------


def scst_section(args) -> dict:
    """Prints the self-critical step's images/s beside the cross-entropy step's on the same batches."""
    from configs import scst
    from showtell_dist.data.document_frequencies import DocumentFrequencies, word_ids_np
    from showtell_dist.training.self_critical import SelfCriticalTrainer, cider_d_reward
    from showtell_dist.training.trainer import RunState

    B, C = args.batch, args.captions_per_image
    rng = np.random.default_rng(args.seed + 3)
    captions = random_captions(rng, (2, B, C), args)
    features = np.abs(rng.normal(0.0, 1.0, (2, B, FEATURE_DIM))).astype(np.float32)
    df = DocumentFrequencies.from_references(
        [[word_ids_np(c) for c in image] for image in random_captions(rng, (2000, C), args)])
    config = toolkit_config(args, "mobilenet_v2")
    section = scst.section(global_batch_size=B)
    keras.mixed_precision.set_global_policy("float32")
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(config.model, args.vocab)
    # P(<end>) ~ 1/10 per step: ~10-token samples, like a trained model's (mean Flickr8k caption: ~11 words).
    bias = model.logits.bias.numpy()
    bias[END_ID] += np.log(args.vocab / 9.0)
    model.logits.bias.assign(bias)
    run_state = RunState.create(strategy, model, 0.0)
    xe = Trainer(strategy, model, config.train, jit_compile=False, run_state=run_state)
    sc = SelfCriticalTrainer(strategy, model, section, cider_d_reward(df, args.max_len), run_state=run_state)
    it_xe = cycled({"features": features, "captions": captions})
    it_sc = cycled({"features": features, "captions": captions})
    fns = {"xe": lambda: xe.train_loop(it_xe, 1), "scst": lambda: sc.train_loop(it_sc, 1)}
    outputs = {}
    for name, fn in fns.items():
        timed(fn)  # warm-up: tracing + first step
    times = {name: [] for name in fns}
    for _ in range(max(args.steps, 3)):
        for name, fn in fns.items():
            times[name].append(timed(fn, outputs=outputs, name=name))
    med = {k: float(np.median(v)) for k, v in times.items()}
    ips = {k: B / v for k, v in med.items()}
    ratio = med["scst"] / med["xe"]
    print(f"self-critical vs cross-entropy, cached features [{B}, {FEATURE_DIM}], {B} images/step, medians over "
          f"{len(times['xe'])} interleaved rounds:")
    print(f"    xe   {ips['xe']:9.1f} images/s ({med['xe']:.2f} s/step): {B}x{C} reference captions")
    print(f"    scst {ips['scst']:9.1f} images/s ({med['scst']:.2f} s/step): {B}x{section.samples_per_image} "
          f"samples of mean length {outputs['scst']['sample_length']:.1f} tokens (max {section.max_len}), "
          f"CIDEr-D reward, {section.baseline} baseline")
    print(target_line("scst step cost / xe step cost", ratio, ratio <= 3, "<= 3x", "9.2f"))
    return {"xe_images_per_s": ips["xe"], "scst_images_per_s": ips["scst"], "ratio": ratio}


FLICKR8K_TRAIN_IMAGES = 6000


def finetune_section(args) -> dict:
    """Prints the finetune step's images/s (MobileNetV2 at 224 trained from images) beside the
    cross-entropy step's from cached features, and what an hour of fine-tuning buys."""
    from configs import finetune
    from showtell_dist.training.trainer import FineTuneTrainer, RunState

    B, C = args.batch, args.captions_per_image
    rng = np.random.default_rng(args.seed + 4)
    captions = random_captions(rng, (2, B, C), args)
    features = np.abs(rng.normal(0.0, 1.0, (2, B, FEATURE_DIM))).astype(np.float32)
    images = rng.integers(0, 256, (2, B, 224, 224, 3), dtype=np.uint8)  # what the records pipeline yields
    config = toolkit_config(args, "mobilenet_v2")
    config.model.encoder_trainable = False  # a features-cache run, as flickr8k_mobilenet trains
    section = finetune.section(global_batch_size=B)
    keras.mixed_precision.set_global_policy("float32")
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(config.model, args.vocab)
    run_state = RunState.create(strategy, model, 0.0)
    xe = Trainer(strategy, model, config.train, jit_compile=False, run_state=run_state)
    ft = FineTuneTrainer(strategy, model, section, run_state=run_state)
    it_xe = cycled({"features": features, "captions": captions})
    it_ft = cycled({"images": images, "captions": captions})
    fns = {"xe": lambda: xe.train_loop(it_xe, 1), "finetune": lambda: ft.train_loop(it_ft, 1)}
    for fn in fns.values():
        timed(fn)  # warm-up: tracing + first step
    times = {name: [] for name in fns}
    for _ in range(max(args.steps, 2)):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    med = {k: float(np.median(v)) for k, v in times.items()}
    ips = {k: B / v for k, v in med.items()}
    steps_per_hour = 3600.0 / med["finetune"]
    epochs_per_hour = steps_per_hour * B / FLICKR8K_TRAIN_IMAGES
    print(f"fine-tuning vs cross-entropy from features, MobileNetV2 at 224, {B} images/step x {C} captions, "
          f"float32, medians over {len(times['xe'])} interleaved rounds:")
    print(f"    xe from cached features   {ips['xe']:9.1f} images/s ({med['xe']:.2f} s/step)")
    print(f"    finetune from images      {ips['finetune']:9.1f} images/s ({med['finetune']:.2f} s/step): encoder "
          f"forward + backward, BatchNorm in inference mode")
    print(f"    finetune step cost / xe step cost {med['finetune'] / med['xe']:.1f}x; one hour of finetune steps: "
          f"{steps_per_hour:.0f} steps = {epochs_per_hour:.2f} epochs of Flickr8k's {FLICKR8K_TRAIN_IMAGES} train "
          f"images (load average {os.getloadavg()[0]:.1f})")
    return {"xe_images_per_s": ips["xe"], "finetune_images_per_s": ips["finetune"],
            "finetune_steps_per_hour": steps_per_hour, "finetune_epochs_per_hour": epochs_per_hour}


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    wall = time.perf_counter()
    if args.only_precision:
        keras.utils.set_random_seed(args.seed)
        precision_section(args)
        print(f"total wall time {time.perf_counter() - wall:.0f} s")
        return
    if args.only_scst:
        keras.utils.set_random_seed(args.seed)
        scst_section(args)
        print(f"total wall time {time.perf_counter() - wall:.0f} s")
        return
    if args.only_finetune:
        keras.utils.set_random_seed(args.seed)
        finetune_section(args)
        print(f"total wall time {time.perf_counter() - wall:.0f} s")
        return
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    B, C, T = args.batch, args.captions_per_image, args.max_len
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU(s), load average "
          f"{os.getloadavg()[0]:.1f} at start; vocabulary {args.vocab}, captions padded to {T} "
          f"(lengths uniform {args.min_caption_len}..{args.max_caption_len}), LSTM {args.units}, embed "
          f"{args.embed_dim}; {args.steps} timed step(s) per path after 1 warm-up", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="train_throughput_")
    cache_dir, manifest, cache_note = features_cache(args, tmp.name)
    print(cache_note, flush=True)

    # Peak memory of (a) first, in its own process, while this one holds no model yet.
    child = None
    if not args.skip_memory:
        t0 = time.perf_counter()
        child = run_memory_child(args, cache_dir)
        print(f"memory subprocess done in {time.perf_counter() - t0:.0f} s", flush=True)

    # In-memory batches: 2 distinct ones per path, cycled.
    distinct = 2
    captions = random_captions(rng, (distinct, B, C), args)
    images = rng.uniform(0, 255, (distinct, B, INCEPTION_SIZE, INCEPTION_SIZE, 3)).astype(np.float32)
    features = np.abs(rng.normal(0.0, 1.0, (distinct, B, FEATURE_DIM))).astype(np.float32)
    real_fraction = float(np.mean(captions[..., 1:] != 0))

    t0 = time.perf_counter()
    _, model_a, trainer_a = toolkit_trainer(args, "mobilenet_v2")
    _, model_b, trainer_b = toolkit_trainer(args, "inception_v3")
    it_a = cycled({"features": features, "captions": captions})
    it_b = cycled({"images": images, "captions": captions})
    paths = {"a": lambda: trainer_a.train_loop(it_a, 1), "b": lambda: trainer_b.train_loop(it_b, 1)}
    if not args.skip_reference:
        (x_img, x_cap), y = tutorial_examples(images.reshape(-1, *images.shape[2:]), captions.reshape(-1, C, T),
                                              B, distinct)
        model_c, train_c = build_tutorial(args, (tf.constant(x_img[0]), tf.constant(x_cap[0])))
        it_c = cycled(((x_img, x_cap), y))
        paths["c"] = lambda: train_c(it_c, tf.constant(1))

    n = args.matmul_size
    mm_reps = 4
    mat_x, mat_y = tf.random.normal([n, n]), tf.random.normal([n, n])

    @tf.function
    def matmul_loop(x, y):
        acc = tf.constant(0.0)
        for _ in tf.range(mm_reps):
            acc += tf.matmul(x, y)[0, 0]
        return acc

    rows, steps_t = B * C, T - 1
    lstm_part, projection_part, h0, hidden = decoder_breakdown_functions(model_a, rows, steps_t)
    bd_tokens = tf.constant(captions[0].reshape(rows, T)[:, :-1])
    bd_targets = tf.constant(captions[0].reshape(rows, T)[:, 1:])
    extra = {"matmul": lambda: matmul_loop(mat_x, mat_y), "lstm": lambda: lstm_part(h0, bd_tokens),
             "proj": lambda: projection_part(hidden, bd_targets)}
    print(f"models built in {time.perf_counter() - t0:.0f} s", flush=True)

    t0 = time.perf_counter()
    warm = {}
    for name, fn in {**paths, **extra}.items():
        warm[name] = timed(fn)
    print("warm-up (tracing + first step): " + ", ".join(f"{k} {v:.1f} s" for k, v in warm.items()), flush=True)

    # Timed rounds, interleaved.
    times = {name: [] for name in {**paths, **extra}}
    last = {}
    for r in range(args.steps):
        for name, fn in {**paths, **extra}.items():
            times[name].append(timed(fn, outputs=last, name=name))
        print(f"  round {r + 1}/{args.steps}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)

    # Input pipeline alone over the features cache.
    spec = pipeline.PipelineSpec(
        data_dir=cache_dir, split="train", image_size=224, captions_per_image=C, max_len=T, global_batch_size=B,
        seed=0, shuffle_buffer=min(flickr8k_mobilenet.get_config().data.shuffle_buffer,
                                   manifest["splits"]["train"]["images"]))
    ds = pipeline.train_input_fn(manifest, spec)(tf.distribute.InputContext())
    pit = iter(ds)
    for _ in range(10):  # fills the shuffle buffer
        next(pit)
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(pit)
    pipeline_ips = args.pipeline_batches * B / (time.perf_counter() - start)
    del pit, ds

    # ---------------------------------------------------------------- results
    # Medians: robust to a step that another process slowed down (the per-path min and max are printed too).
    med = {k: float(np.median(v)) for k, v in times.items()}
    cps = {"a": B * C / med["a"], "b": B * C / med["b"]}
    if "c" in med:
        cps["c"] = B / med["c"]
    lstm_tok = 4 * args.units * (args.embed_dim + args.units) * 2
    proj_tok = args.units * args.vocab * 2
    step_flops = 3 * rows * steps_t * (lstm_tok + proj_tok)  # if every padded position were computed
    gflops_a = step_flops / med["a"] / 1e9
    # What the step really computes: the LSTM over every padded position, the output projection
    # and softmax only at real target tokens (the trainer gathers them first).
    computed_flops = 3 * rows * steps_t * (lstm_tok + real_fraction * proj_tok)
    gflops_computed = computed_flops / med["a"] / 1e9
    gflops_mm = mm_reps * 2 * n ** 3 / med["matmul"] / 1e9
    gflops_lstm = 3 * rows * steps_t * lstm_tok / med["lstm"] / 1e9
    gflops_proj = 3 * rows * steps_t * proj_tok / med["proj"] / 1e9
    step_ips = B / med["a"]

    print()
    print(f"=== results (load average {os.getloadavg()[0]:.1f} at the end: measured under load from other "
          "processes; medians over the timed steps) ===")
    print(f"(a) toolkit, cached features [{B}, {FEATURE_DIM}], {B}x{C} captions/step: {cps['a']:9.1f} captions/s "
          f"({med['a']:.2f} s/step, {step_ips:.1f} images/s; per step min {min(times['a']):.2f} "
          f"max {max(times['a']):.2f})")
    print(f"(b) toolkit, images {B}x{INCEPTION_SIZE}^2, InceptionV3 once per image:    {cps['b']:9.1f} captions/s "
          f"({med['b']:.2f} s/step; min {min(times['b']):.2f} max {max(times['b']):.2f})")
    if "c" in cps:
        print(f"(c) tutorial, {B} (image, caption) pairs/step, InceptionV3 per caption: {cps['c']:9.1f} captions/s "
              f"({med['c']:.2f} s/step; min {min(times['c']):.2f} max {max(times['c']):.2f})")
    print(f"    real target tokens: {real_fraction:.1%} of the {steps_t} positions (a)/(b) compute per caption "
          f"(the tutorial computes {T})")
    print("    train loss after the timed steps (random init: ~ln %d = %.2f): " % (args.vocab, np.log(args.vocab))
          + ", ".join(f"({k}) {float(last[k]['loss']):.3f}" for k in paths))
    print(f"    encoder estimate in (b): (b) - (a) = {med['b'] - med['a']:.2f} s/step of {med['b']:.2f} "
          f"({(med['b'] - med['a']) / med['b']:.0%})")
    print(f"decoder of (a): {step_flops / 1e9:.0f} GFLOP/step ({rows} rows x {steps_t} padded positions x "
          f"{(lstm_tok + proj_tok) / 1e6:.1f} MFLOP x 3) -> {gflops_a:.1f} GFLOP/s; float32 matmul "
          f"[{n}, {n}]: {gflops_mm:.1f} GFLOP/s")
    print(f"    work actually computed (LSTM on all positions, projection on real tokens only): "
          f"{computed_flops / 1e9:.0f} GFLOP/step -> {gflops_computed:.1f} GFLOP/s = "
          f"{gflops_computed / gflops_mm:.0%} of the matmul's")
    print(f"    useful work only (real target tokens, {real_fraction:.1%} of positions): "
          f"{real_fraction * gflops_a:.1f} GFLOP/s = {real_fraction * gflops_a / gflops_mm:.0%} of the matmul's")
    rest = med["a"] - med["lstm"] - med["proj"]
    print(f"    breakdown of (a), parts timed alone: LSTM fwd+bwd {med['lstm']:.2f} s ({gflops_lstm:.1f} GFLOP/s), "
          f"projection + softmax cross-entropy fwd+bwd {med['proj']:.2f} s ({gflops_proj:.1f} GFLOP/s), rest "
          + (f"(BN, init state, dropout, clipping, Adam) {rest:.2f} s" if rest > 0 else
             "not resolved (the parts timed alone took longer than the step: load noise)"))
    print(f"input pipeline alone (read, parse, shuffle, batch {B}): {pipeline_ips:9.0f} images/s over "
          f"{'the Flickr8k cache' if cache_dir == args.features_dir else 'the synthetic cache'}; (a)'s step "
          f"{step_ips:.1f} images/s")
    if child:
        print(f"peak RSS of (a) in a fresh process (built like build_experiment, fed by the pipeline): "
              f"{child['peak_kb'] / 2 ** 20:.2f} GB (after imports {child['baseline_kb'] / 2 ** 20:.2f} GB); "
              f"its {child['steps']} step(s): {child['captions_per_s']:.1f} captions/s")
    print()
    if "c" in cps:
        print(target_line("(a)/(c) captions/s", cps["a"] / cps["c"], cps["a"] / cps["c"] >= 15, ">= 15x", "9.1f"))
        print(target_line("(b)/(c) captions/s", cps["b"] / cps["c"], cps["b"] / cps["c"] >= 4, ">= 4x", "9.1f"))
    share = gflops_computed / gflops_mm
    print(target_line("(a) decoder GFLOP/s computed / matmul GFLOP/s", 100 * share, share >= 0.4, ">= 40%", "8.0f") + "  (%)")
    print(target_line("pipeline images/s / (a) step images/s", pipeline_ips / step_ips, pipeline_ips / step_ips >= 5,
                      ">= 5x", "9.0f"))
    if child:
        gb = child["peak_kb"] / 2 ** 20
        print(target_line("peak RSS of (a), GB", gb, gb < 4, "< 4 GB", "9.2f"))
    if not args.skip_precision:
        print()
        precision_section(args)
    if not args.skip_scst:
        print()
        scst_section(args)
    if not args.skip_finetune:
        print()
        finetune_section(args)
    print(f"total wall time {time.perf_counter() - wall:.0f} s")
    tmp.cleanup()


if __name__ == "__main__":
    main()
