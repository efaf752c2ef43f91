"""Batched, distributed beam-search captioning of a prepared split, scored with coco-caption.

    trained = load_trained_model(model_dir, strategy=strategy)   # variables in the strategy's scope
    results = decode_split(trained, records_dir, "test", strategy, beam_width=3)
    summary = evaluate_split(trained, records_dir, "test", strategy, output_dir)

`decode_split` streams the split's records through `pipeline.eval_input_fn`
(static-shape batches of numeric tensors only, the last one padded with empty
images whose index is -1) with `strategy.distribute_datasets_from_function`. Each batch is one call
of a compiled `tf.function` that, under `strategy.run`, encodes every image
once and beam-searches all of them together (`beam_search` over
`model.decode_step`, <unk> and <start> never generated). The per-replica
results are brought to the host with `strategy.experimental_local_results`,
padding rows dropped, each image's index mapped back to its image_id on the
host (`pipeline.eval_image_ids`), and token ids turned into words by the
tokenizer.

`records_dir` may also be a features cache (feature_cache.py) that fits the
model's frozen encoder: batches then carry the encoder's features and decoding
starts from them.

`evaluate_split` then reads the references (the records' caption/text) on the
host, scores the captions (`metrics.score_captions`) and writes into
output_dir (local or gs://):

  metrics.json   scores, split, beam width, checkpoint and step, images, images/s
  captions.json  COCO results format: [{"image_id": ..., "caption": ...}, ...]
  report.html    the scores, then the best and worst images by CIDEr-D

Evaluation runs on one machine (default, one_device, mirrored or tpu
strategies): with several workers each would only see its own share.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable, Iterable

import keras
import tensorflow as tf
from tqdm import tqdm

from showtell_dist.data import feature_cache, pipeline, records
from showtell_dist.data.prepare import MANIFEST, load_manifest
from showtell_dist.data.tokenizer import END_ID, START_ID, UNK_ID, Tokenizer
from showtell_dist.decoding.beam_search import BeamSearchResult, beam_search, check_decode_options
from showtell_dist.distribute.strategy import require_single_host
from showtell_dist.errors import ConfigError
from showtell_dist.model.restore import TrainedModel

METRICS_FILE = "metrics.json"
CAPTIONS_FILE = "captions.json"
REPORT_FILE = "report.html"
DEFAULT_PER_REPLICA_BATCH = 32


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------


def _check_positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _check_model_in_scope(trained: TrainedModel, strategy: tf.distribute.Strategy) -> None:
    variables = trained.model.variables
    if not variables:
        return
    v = variables[0]
    v = v.value if isinstance(v, keras.Variable) else v
    try:
        ok = strategy.extended.variable_created_in_scope(v)
    except (AttributeError, TypeError):  # a variable type the strategy cannot tell about
        return
    if not ok:
        raise ConfigError(f"the model's variables were not created under this {type(strategy).__name__}: load it "
                          "with load_trained_model(model_dir, checkpoint, strategy=strategy).")


def _global_batch_size(batch_size: int | None, replicas: int, num_images: int) -> int:
    if batch_size is None:
        per_replica = min(DEFAULT_PER_REPLICA_BATCH, max(1, math.ceil(num_images / replicas)))
        return per_replica * replicas
    _check_positive("batch_size", batch_size)
    if batch_size % replicas:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the {replicas} replicas of the strategy; "
                          f"use a multiple of {replicas}.")
    return batch_size


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------


def build_beam_decoder(trained: TrainedModel, *, beam_width: int = 3, length_normalization: str = "average",
                       alpha: float = 0.6, from_features: bool = False) -> Callable[[tf.Tensor], BeamSearchResult]:
    """fn(images [batch, H, W, 3] 0..255) -> BeamSearchResult; plain TF, for use in a tf.function.

    Each image is encoded once; its beams start from the LSTM state the
    encoding gives. <unk> and <start> are never generated; captions have at
    most tokenizer.max_len - 1 tokens after <start> (the <end> included).
    With from_features the function takes the encoder's features [batch, dim]
    (from a features cache) instead of images.
    """
    check_decode_options(beam_width, length_normalization, alpha)
    model, tokenizer = trained.model, trained.tokenizer

    def decode(inputs: tf.Tensor) -> BeamSearchResult:
        features = inputs if from_features else model.encode(inputs, training=False)
        state = model.initial_state(features)
        return beam_search(model.decode_step, state, beam_width=beam_width, max_len=tokenizer.max_len - 1,
                           start_id=START_ID, end_id=END_ID, vocab_size=tokenizer.vocab_size,
                           forbidden_ids=(UNK_ID, START_ID), length_normalization=length_normalization,
                           alpha=float(alpha))

    return decode


def detokenize(tokenizer: Tokenizer, tokens, scores) -> list[dict]:
    """tokens [batch, K, T], scores [batch, K] (numpy) -> per image {caption, score, top_k}.

    top_k lists (caption, score) for every real hypothesis, best first; slots
    beam search could not fill (score -inf) are left out.
    """
    out = []
    for beams, beam_scores in zip(tokens, scores):
        top_k = [(tokenizer.decode(t), float(s)) for t, s in zip(beams, beam_scores) if math.isfinite(s)]
        if not top_k:  # cannot happen with a real vocabulary; keep the entry well-formed anyway
            top_k = [("", float("-inf"))]
        out.append({"caption": top_k[0][0], "score": top_k[0][1], "top_k": top_k})
    return out


def split_size(manifest: dict, split: str, records_dir: str, max_images: int | None = None) -> int:
    if split not in manifest["splits"]:
        raise ConfigError(f"split {split!r} is not in the prepared dataset at {records_dir} "
                          f"(it has {', '.join(sorted(manifest['splits']))}).")
    images = manifest["splits"][split]["images"]
    return images if max_images is None else min(images, max_images)


def decode_split(trained: TrainedModel, records_dir: str, split: str, strategy: tf.distribute.Strategy, *,
                 beam_width: int = 3, max_images: int | None = None, batch_size: int | None = None,
                 length_normalization: str = "average", alpha: float = 0.6, progress: bool = True) -> list[dict]:
    """Beam-search captions for every image of a split (or its first max_images), each exactly once.

    Args:
      trained: from `load_trained_model(..., strategy=strategy)`.
      records_dir: prepared records (local or gs://) holding `split`, or a
        features cache made from them for this model's frozen encoder
        (feature_cache.py): then the encoder is skipped.
      strategy: the model's strategy; batches are split over its replicas.
      beam_width: K hypotheses kept per image (1 = greedy).
      max_images: caption only the first max_images images of the split.
      batch_size: global batch (a multiple of the replicas); default up to
        32 per replica, less when the split is smaller.
      length_normalization, alpha: how hypotheses are ranked (see beam_search).
      progress: show a tqdm bar with images/s.

    Returns:
      [{"image_id": str, "caption": str, "score": float,
        "top_k": [(caption, score), ...]}] in the split's record order.
    """
    return _decode_split_timed(trained, records_dir, split, strategy, beam_width=beam_width, max_images=max_images,
                               batch_size=batch_size, length_normalization=length_normalization, alpha=alpha,
                               progress=progress)[0]


def _decode_split_timed(trained, records_dir, split, strategy, *, beam_width, max_images, batch_size,
                        length_normalization, alpha, progress) -> tuple[list[dict], dict]:
    """decode_split, plus timing: total seconds, and images/s after the first batch (which traces)."""
    check_decode_options(beam_width, length_normalization, alpha)
    _check_positive("max_images", max_images, allow_none=True)
    require_single_host(strategy, "evaluation")
    _check_model_in_scope(trained, strategy)
    manifest = load_manifest(records_dir)
    from_features = pipeline.manifest_kind(manifest) == feature_cache.KIND
    if from_features:
        feature_cache.check_features_compatible(manifest, trained.config.model, records_dir)
        feature_cache.check_feature_dim(manifest, trained.model, records_dir)
    num_images = split_size(manifest, split, records_dir, max_images)
    replicas = strategy.num_replicas_in_sync
    spec = pipeline.PipelineSpec(
        data_dir=records_dir.rstrip("/"), split=split, image_size=trained.model.image_size,
        captions_per_image=max(1, int(trained.config.data.get("captions_per_image", 1))),
        max_len=int(manifest["max_len"]),
        global_batch_size=_global_batch_size(batch_size, replicas, num_images))
    steps = pipeline.eval_steps(manifest, spec, 1, max_images)
    dataset = strategy.distribute_datasets_from_function(pipeline.eval_input_fn(manifest, spec, max_images))
    image_ids = pipeline.eval_image_ids(manifest, spec, max_images)  # {index: image_id}; no strings on the device
    replica_decode = build_beam_decoder(trained, beam_width=beam_width, length_normalization=length_normalization,
                                        alpha=alpha, from_features=from_features)
    input_key = "features" if from_features else "images"  # a features cache: the encoder is skipped

    @tf.function
    def decode_batch(inputs):
        def replica_fn(x):
            result = replica_decode(x)
            return result.tokens, result.scores

        return strategy.run(replica_fn, args=(inputs,))

    results: list[dict] = []
    start = time.perf_counter()
    first_batch_end, first_batch_images = None, 0
    bar = tqdm(total=num_images, desc=f"caption {split}", unit="img", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    iterator = iter(dataset)
    try:
        for _ in range(steps):
            batch = next(iterator)
            tokens, scores = decode_batch(batch[input_key])
            for indices, t, s in zip(strategy.experimental_local_results(batch["index"]),
                                     strategy.experimental_local_results(tokens),
                                     strategy.experimental_local_results(scores)):
                indices = indices.numpy()
                real = [k for k, i in enumerate(indices) if i >= 0]  # padding rows have index -1
                if not real:
                    continue
                decoded = detokenize(trained.tokenizer, t.numpy()[real], s.numpy()[real])
                results.extend({"image_id": image_ids[int(indices[k])], **d} for k, d in zip(real, decoded))
                bar.update(len(real))
            if first_batch_end is None:
                first_batch_end, first_batch_images = time.perf_counter(), len(results)
    finally:
        bar.close()
    end = time.perf_counter()
    later = len(results) - first_batch_images
    timing = {"decode_seconds": end - start, "first_batch_seconds": first_batch_end - start,
              # steady-state throughput; the first batch also traces and compiles the function
              "images_per_s": (later / (end - first_batch_end) if later and end > first_batch_end
                               else len(results) / max(end - start, 1e-9))}
    return results, timing


# ----------------------------------------------------------------------------
# References and images from the records
# ----------------------------------------------------------------------------


def scan_records(records_dir: str, split: str, image_ids: Iterable[str], *, with_jpeg: bool = False) -> dict:
    """{image_id: {"references": [str], "jpeg": bytes (with_jpeg)}} for the wanted images of a split.

    Reads the split's records on the host in the eval pipeline's order and
    stops as soon as every wanted image was seen, so references of the first
    max_images images cost reading those images only. A features cache holds
    no images: with_jpeg reads the image records it was made from when they
    are still there, else the entries have no "jpeg".
    """
    wanted = set(image_ids)
    found: dict = {}
    if not wanted:
        return found
    manifest = load_manifest(records_dir)
    dim = pipeline.feature_dim(manifest)
    if dim is not None and with_jpeg:
        source = manifest["features"].get("source_records")
        if source and tf.io.gfile.exists(f"{source.rstrip('/')}/{MANIFEST}"):
            return scan_records(source, split, wanted, with_jpeg=True)
        with_jpeg = False
    spec = pipeline.PipelineSpec(data_dir=records_dir.rstrip("/"), split=split, image_size=1,
                                 captions_per_image=1, max_len=1, global_batch_size=1)
    files = pipeline.shard_files(manifest, spec)
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=min(8, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)

    def parse(serialized):
        ex = records.parse_example(serialized) if dim is None else records.parse_features_example(serialized, dim)
        out = {"image_id": ex["image_id"], "caption_text": ex["caption_text"]}
        if with_jpeg:
            out["jpeg"] = ex["jpeg"]
        return out

    for ex in ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(8):
        image_id = ex["image_id"].numpy().decode("utf-8")
        if image_id not in wanted or image_id in found:
            continue
        entry = {"references": [c.decode("utf-8") for c in ex["caption_text"].numpy()]}
        if with_jpeg:
            entry["jpeg"] = ex["jpeg"].numpy()
        found[image_id] = entry
        if len(found) == len(wanted):
            break
    return found


# ----------------------------------------------------------------------------
# Evaluation: decode, score, write
# ----------------------------------------------------------------------------


def _write_json(path: str, obj) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False))


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    name = type(strategy).__name__
    return "default" if name == "_DefaultDistributionStrategy" else name


def coco_results(results: list[dict]) -> list[dict]:
    """The COCO caption results format: [{"image_id": ..., "caption": ...}]."""
    return [{"image_id": r["image_id"], "caption": r["caption"]} for r in results]


def evaluate_split(trained: TrainedModel, records_dir: str, split: str, strategy: tf.distribute.Strategy,
                   output_dir: str, *, beam_width: int = 3, max_images: int | None = None,
                   batch_size: int | None = None, length_normalization: str = "average", alpha: float = 0.6,
                   use_meteor: bool = True, report_images: int = 10, progress: bool = True) -> dict:
    """Captions a split, scores it and writes metrics.json, captions.json and report.html to output_dir.

    Returns the metrics.json content: {"metrics": {name: score}, "split", "num_images", "beam_width",
    "length_normalization", "alpha", "checkpoint", "step", "images_per_s" (after the first batch,
    which also compiles), "decode_seconds", "first_batch_seconds", "strategy", "replicas",
    "records_dir", "files": {name: path}}.
    """
    from showtell_dist.evaluation import metrics as coco_metrics
    from showtell_dist.evaluation import report

    if isinstance(report_images, bool) or not isinstance(report_images, int) or report_images < 0:
        raise ConfigError(f"report_images must be an integer >= 0, got {report_images!r}.")
    coco_metrics.check_java()  # the PTB tokenizer needs it even without METEOR: fail before decoding
    results, timing = _decode_split_timed(trained, records_dir, split, strategy, beam_width=beam_width,
                                          max_images=max_images, batch_size=batch_size,
                                          length_normalization=length_normalization, alpha=alpha,
                                          progress=progress)
    refs = scan_records(records_dir, split, [r["image_id"] for r in results])
    references = {i: e["references"] for i, e in refs.items()}
    corpus, per_image = coco_metrics.score_captions({r["image_id"]: r["caption"] for r in results}, references,
                                                    use_meteor=use_meteor)
    output_dir = output_dir.rstrip("/")
    tf.io.gfile.makedirs(output_dir)
    files = {name: f"{output_dir}/{name}" for name in (METRICS_FILE, CAPTIONS_FILE, REPORT_FILE)}
    summary = {
        "metrics": corpus,
        "split": split,
        "num_images": len(results),
        "beam_width": beam_width,
        "length_normalization": length_normalization,
        "alpha": alpha,
        "checkpoint": trained.checkpoint_path,
        "step": trained.step,
        **timing,
        "strategy": strategy_name(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "records_dir": records_dir,
        "files": files,
    }
    _write_json(files[CAPTIONS_FILE], coco_results(results))

    entries = [{**r, "references": references[r["image_id"]], "scores": per_image[r["image_id"]]}
               for r in results]
    best, worst = report.best_and_worst(entries, report_images)
    shown = {e["image_id"] for e in best + worst}
    jpegs = {i: e["jpeg"] for i, e in scan_records(records_dir, split, shown, with_jpeg=True).items()
             if "jpeg" in e}
    with tf.io.gfile.GFile(files[REPORT_FILE], "w") as f:
        f.write(report.render_report(summary, best, worst, jpegs))
    _write_json(files[METRICS_FILE], summary)
    return summary
