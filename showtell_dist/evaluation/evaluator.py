"""Batched, distributed beam-search captioning of a prepared split, scored with coco-caption.

    members = [load_trained_model(model_dir, strategy=strategy)]   # variables in the strategy's scope
    results = decode_split(members, records_dir, "test", strategy, DecodeOptions(beam_width=3))
    summary = evaluate_split(members, records_dir, "test", strategy, output_dir, options)

`decode_split` streams the split's records through `pipeline.eval_input_fn`
(static-shape batches of numeric tensors only, the last one padded with empty
images whose index is -1) with `strategy.distribute_datasets_from_function`. Each batch is one call
of a compiled `tf.function` that, under `strategy.run`, encodes every image
once and beam-searches all of them together (decoding/decoder.py's `build_decoder`,
the one decoding recipe: <unk> and <start> never generated). The per-replica
results are brought to the host with `strategy.experimental_local_results`
(under a multi-worker strategy: all-gathered, so every worker holds the whole
split's captions; see `SplitDecoder`), padding rows dropped, each image's index mapped back to its image_id on the
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

The members are always a list of TrainedModels: one model is a list of one,
several checkpoints (one run's or several runs' with one vocabulary) decode
as an ensemble (`run.restore.load_ensemble`).
`SplitDecoder` builds the compiled decode function once and reuses it for
every later split and checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Callable, Sequence

import keras
import tensorflow as tf
from tqdm import tqdm

from showtell_dist.config_fields import check_positive as _check_positive
from showtell_dist.data import feature_cache, pipeline
from showtell_dist.data.dataset_dir import load_manifest, read_examples
from showtell_dist.data.tokenizer import Tokenizer
from showtell_dist.decoding.decoder import build_decoder
from showtell_dist.decoding.options import DecodeOptions
from showtell_dist.distribute.strategy import is_chief, num_workers
from showtell_dist.errors import ConfigError
from showtell_dist.features.compatibility import check_features_compatible
from showtell_dist.run.restore import TrainedModel, check_same_vocabulary

METRICS_FILE = "metrics.json"
CAPTIONS_FILE = "captions.json"
REPORT_FILE = "report.html"
DEFAULT_PER_REPLICA_BATCH = 32


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------


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


def members_of(members: Sequence[TrainedModel]) -> list[TrainedModel]:
    """The members of a model or an ensemble, a non-empty list of TrainedModels with one vocabulary."""
    if isinstance(members, TrainedModel) or not isinstance(members, (list, tuple)) or not members:
        raise ConfigError("pass a non-empty list of TrainedModels (one model is a list of one), got "
                          f"{type(members).__name__}.")
    members = list(members)
    check_same_vocabulary(members)
    return members


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


class SplitDecoder:
    """Beam-search captions of prepared splits with one compiled function, built once.

        decoder = SplitDecoder(members, strategy, DecodeOptions(beam_width=3))
        results, timing = decoder.decode(records_dir, "val")     # later calls reuse the traced function

    Checkpoint selection keeps one for the whole run, so evaluating another
    step's weights (the same variables) does not trace the beam search again.
    Under a multi-worker strategy each worker decodes its share of the split
    and every batch's token ids, scores and per-image indices (numbers only)
    are all-gathered (`strategy.gather`), so every worker -- the chief writes
    the results -- holds the captions of the whole split; the indices are
    mapped to image ids on the host.
    """

    def __init__(self, members: Sequence[TrainedModel], strategy: tf.distribute.Strategy,
                 options: DecodeOptions = DecodeOptions()):
        self.members = members_of(members)
        for member in self.members:
            _check_model_in_scope(member, strategy)
        self.strategy = strategy
        self.options = options
        self.workers = 1 if isinstance(strategy, tf.distribute.TPUStrategy) else num_workers(strategy)
        self._functions: dict[bool, Callable] = {}  # from_features -> tf.function
        self.traces = 0  # how often a decode function was traced (for tests)

    def _function(self, from_features: bool):
        if from_features not in self._functions:
            replica_decode = build_decoder([m.model for m in self.members], self.options, self.members[0].tokenizer,
                                           from_features=from_features)
            strategy = self.strategy

            @tf.function
            def decode_batch(inputs):
                self.traces += 1  # Python: runs only while tracing

                def replica_fn(x):
                    result = replica_decode(x)
                    return result.tokens, result.scores

                return strategy.run(replica_fn, args=(inputs,))

            self._functions[from_features] = decode_batch
        return self._functions[from_features]

    def _check_data(self, manifest: dict, records_dir: str) -> bool:
        """True when records_dir is a features cache (that fits every member)."""
        from_features = pipeline.manifest_kind(manifest) == feature_cache.KIND
        if from_features:
            for member in self.members:
                check_features_compatible(manifest, member.config.model, records_dir, member.model.encoder)
                feature_cache.check_feature_dim(manifest, member.model, records_dir)
        return from_features

    def decode(self, records_dir: str, split: str, *, max_images: int | None = None,
               batch_size: int | None = None, progress: bool = True) -> tuple[list[dict], dict]:
        """(results, timing): results as `decode_split` returns them; timing has decode_seconds,
        first_batch_seconds and images_per_s (after the first batch, which may trace)."""
        _check_positive("max_images", max_images, allow_none=True)
        strategy, first = self.strategy, self.members[0]
        manifest = load_manifest(records_dir)
        from_features = self._check_data(manifest, records_dir)
        decode_batch = self._function(from_features)  # checks the members fit together, before reading data
        num_images = split_size(manifest, split, records_dir, max_images)
        replicas = strategy.num_replicas_in_sync
        spec = pipeline.PipelineSpec(
            data_dir=records_dir.rstrip("/"), split=split, image_size=first.model.image_size,
            captions_per_image=max(1, int(first.config.data.get("captions_per_image", 1))),
            max_len=int(manifest["max_len"]),
            global_batch_size=_global_batch_size(batch_size, replicas, num_images))
        steps = pipeline.eval_steps(manifest, spec, self.workers, max_images)
        dataset = strategy.distribute_datasets_from_function(pipeline.eval_input_fn(manifest, spec, max_images))
        # {index: image_id} of every worker's share, read on the host: no strings on the device
        image_ids = pipeline.eval_image_ids(manifest, spec, max_images, num_input_pipelines=self.workers)
        input_key = "features" if from_features else "images"  # a features cache: the encoder is skipped

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
                if self.workers > 1:  # all-gather: every worker gets every worker's captions of this step
                    parts = [(strategy.gather(batch["index"], axis=0), strategy.gather(tokens, axis=0),
                              strategy.gather(scores, axis=0))]
                else:
                    parts = zip(strategy.experimental_local_results(batch["index"]),
                                strategy.experimental_local_results(tokens),
                                strategy.experimental_local_results(scores))
                for indices, t, s in parts:
                    indices = indices.numpy()
                    real = [k for k, i in enumerate(indices) if i >= 0]  # padding rows have index -1
                    if not real:
                        continue
                    decoded = detokenize(first.tokenizer, t.numpy()[real], s.numpy()[real])
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


def decode_split(members: Sequence[TrainedModel], records_dir: str, split: str, strategy: tf.distribute.Strategy,
                 options: DecodeOptions = DecodeOptions(), *, max_images: int | None = None,
                 batch_size: int | None = None, progress: bool = True) -> list[dict]:
    """Beam-search captions for every image of a split (or its first max_images), each exactly once.

    Args:
      members: [TrainedModel] from `load_trained_model(..., strategy=strategy)`, or several (an ensemble
        with one vocabulary, `load_ensemble`).
      records_dir: prepared records (local or gs://) holding `split`, or a
        features cache made from them for this model's frozen encoder
        (data/feature_cache.py): then the encoder is skipped.
      strategy: the model's strategy; batches are split over its replicas
        (and workers: see `SplitDecoder`).
      options: how to decode (beam width, length normalisation, constraints).
      max_images: caption only the first max_images images of the split.
      batch_size: global batch (a multiple of the replicas); default up to
        32 per replica, less when the split is smaller.
      progress: show a tqdm bar with images/s.

    Returns:
      [{"image_id": str, "caption": str, "score": float,
        "top_k": [(caption, score), ...]}] in the order the batches were decoded.
    """
    decoder = SplitDecoder(members, strategy, options)
    return decoder.decode(records_dir, split, max_images=max_images, batch_size=batch_size, progress=progress)[0]


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


@dataclasses.dataclass(frozen=True)
class SplitOptions:
    """Which images of a split are decoded, and how: max_images (None: all), batch_size (None: up to 32
    per replica), progress (a tqdm bar)."""

    max_images: int | None = None
    batch_size: int | None = None
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """What evaluate_split writes beside the scores: METEOR (use_meteor, ~10 s of JVM), the best and worst
    report_images images of report.html, and selection (the run's model_dir/best/selection.json, whose val
    history report.html draws as curves)."""

    use_meteor: bool = True
    report_images: int = 10
    selection: dict | None = None

    def __post_init__(self):
        if isinstance(self.report_images, bool) or not isinstance(self.report_images, int) or self.report_images < 0:
            raise ConfigError(f"report_images must be an integer >= 0, got {self.report_images!r}.")


def evaluate_split(members: Sequence[TrainedModel], records_dir: str, split: str, strategy: tf.distribute.Strategy,
                   output_dir: str, options: DecodeOptions = DecodeOptions(), images: SplitOptions = SplitOptions(),
                   report: ReportOptions = ReportOptions()) -> dict:
    """Captions a split, scores it and writes metrics.json, captions.json and report.html to output_dir.

    `members` is a list of TrainedModels (several: an ensemble). Under a multi-worker strategy every worker
    must call this; the chief writes the files and returns the summary, the others return {}.

    Returns the metrics.json content: {"metrics": {name: score}, "split", "num_images", the decoding options
    of a run's eval section (`DecodeOptions.summary`: "beam_width", "length_normalization", ...),
    "checkpoint", "step" (lists for an ensemble), "images_per_s" (after the first batch,
    which also compiles), "decode_seconds", "first_batch_seconds", "strategy", "replicas",
    "records_dir", "files": {name: path}}. The metrics end with the fractions of captions that end on a
    function word and that are distinct ("bad endings", "distinct captions"); "caption_soundness" holds
    their counts (caption_soundness.py).
    """
    from showtell_dist.evaluation import caption_soundness
    from showtell_dist.evaluation import metrics as coco_metrics
    from showtell_dist.evaluation import report as html_report

    coco_metrics.check_java()  # the PTB tokenizer needs it even without METEOR: fail before decoding
    decoder = SplitDecoder(members, strategy, options)
    results, timing = decoder.decode(records_dir, split, max_images=images.max_images, batch_size=images.batch_size,
                                     progress=images.progress)
    members = decoder.members
    if not is_chief(strategy):  # every worker decoded (collectively) and holds the captions; the chief writes
        return {}
    refs = read_examples(records_dir, split, [r["image_id"] for r in results])
    references = {i: e["references"] for i, e in refs.items()}
    corpus, per_image = coco_metrics.score_captions({r["image_id"]: r["caption"] for r in results}, references,
                                                    use_meteor=report.use_meteor)
    soundness = caption_soundness.caption_soundness(r["caption"] for r in results)
    output_dir = output_dir.rstrip("/")
    tf.io.gfile.makedirs(output_dir)
    files = {name: f"{output_dir}/{name}" for name in (METRICS_FILE, CAPTIONS_FILE, REPORT_FILE)}
    summary = {
        "metrics": {**corpus, **caption_soundness.as_metrics(soundness)},  # bad endings, distinct captions
        "caption_soundness": soundness,
        "split": split,
        "num_images": len(results),
        **options.summary(),
        # an ensemble lists its members' checkpoints and steps
        "checkpoint": members[0].checkpoint_path if len(members) == 1 else [m.checkpoint_path for m in members],
        "step": members[0].step if len(members) == 1 else [m.step for m in members],
        **timing,
        "strategy": strategy_name(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "records_dir": records_dir,
        "files": files,
    }
    _write_json(files[CAPTIONS_FILE], coco_results(results))

    entries = [{**r, "references": references[r["image_id"]], "scores": per_image[r["image_id"]]}
               for r in results]
    best, worst = html_report.best_and_worst(entries, report.report_images)
    shown = {e["image_id"] for e in best + worst}
    jpegs = {i: e["jpeg"] for i, e in read_examples(records_dir, split, shown, with_jpeg=True).items()
             if "jpeg" in e}
    with tf.io.gfile.GFile(files[REPORT_FILE], "w") as f:
        stats = html_report.caption_statistics({r["image_id"]: r["caption"] for r in results}, references,
                                          vocabulary=members[0].tokenizer.words,
                                          split_words=members[0].tokenizer.split_words)
        f.write(html_report.render_report(summary, best, worst, jpegs, selection=report.selection, statistics=stats))
    _write_json(files[METRICS_FILE], summary)
    return summary
