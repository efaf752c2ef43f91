"""Builds a features cache (data/feature_cache.py): runs a frozen encoder once per image of prepared records.

    manifest = cache_features(records_dir, output_dir, config.model, strategy=strategy)
    ensure_features(config, strategy)   # into config.data.features_dir, when set and not cached yet
    cache_features(records_dir, output_dir, config.model, fine_tuned=FineTunedEncoder(...))  # a run's re-cache
"""

from __future__ import annotations

import dataclasses
import datetime

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from showtell_dist.data import feature_cache, pipeline, records
from showtell_dist.data.dataset_dir import (DOCUMENT_FREQUENCIES, MANIFEST, VOCABULARY, is_prepared, join,
                                            load_manifest, manifest_kind, shard_glob, validate)
from showtell_dist.storage.atomic_files import copy_atomically, write_json_atomically
from showtell_dist.distribute.strategy import require_single_host
from showtell_dist.errors import ConfigError, DataError
from showtell_dist.features.compatibility import encoder_fingerprint, encoder_image_size, require_weights
from showtell_dist.model.encoders import build_encoder


def _shard_batches(path: str, num_records: int, global_batch: int, image_size: int) -> tf.data.Dataset:
    """{"index" [batch] int64 (-1: padding), "images" [batch, size, size, 3] uint8} in record order, static
    shapes, numbers only (they go whole into strategy.run)."""
    def decode(index, serialized):
        return {"index": index,
                "images": pipeline.decode_image_uint8(records.parse_example(serialized)["jpeg"], image_size)}

    ds = tf.data.TFRecordDataset(path).enumerate().map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                                                         deterministic=True)
    padding = {"index": tf.constant(-1, tf.int64), "images": tf.zeros([image_size, image_size, 3], tf.uint8)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat((-num_records) % global_batch))
    return ds.batch(global_batch, drop_remainder=True).prefetch(2)


@dataclasses.dataclass(frozen=True)
class FineTunedEncoder:
    """The encoder as a run's fine-tuning left it: its weights (encoder.get_weights() order) and where they are."""

    weights: list  # of numpy arrays
    run: str  # the run directory
    checkpoint: str  # the checkpoint holding them
    step: int


def cache_features(records_dir: str, output_dir: str, model_config, *, strategy: tf.distribute.Strategy | None = None,
                   batch_size: int = 64, splits=None, progress: bool = True,
                   fine_tuned: FineTunedEncoder | None = None) -> dict:
    """Runs `model_config`'s frozen encoder once per image of `records_dir` into a features cache.

    Args:
      records_dir: prepared image records (local or gs://).
      output_dir: where to write the cache (local or gs://); not records_dir.
        A manifest already there is removed first, and shards of the written
        splits that the new manifest does not list are deleted.
      model_config: the `model` part of an experiment config; the encoder is
        built as the model builds it (encoder, image_size, encoder_weights),
        frozen, in inference mode.
      strategy: the encoder's variables are created in its scope and each
        batch is split over its replicas (one machine). Default: the current
        strategy.
      batch_size: global batch (a multiple of the replicas).
      splits: the splits to cache (default: all of the records).
      progress: show a tqdm bar.
      fine_tuned: cache the features of these weights instead of
        model_config.encoder_weights' (a run's re-cache after fine-tuning,
        training/phases.py). The manifest's "features" then names the run and
        checkpoint in "fine_tuned", and "weights_sha256" fingerprints the
        weights themselves (compatibility.encoder_fingerprint).

    Returns:
      The cache's manifest (also written to output_dir/manifest.json, last).
    """
    strategy = strategy or tf.distribute.get_strategy()
    require_single_host(strategy, "caching features")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the {replicas} replicas of the strategy; "
                          f"use a multiple of {replicas}.")
    if records_dir.rstrip("/") == output_dir.rstrip("/"):
        raise ConfigError(f"the features cache must go to another directory than the records it reads "
                          f"({records_dir}): its shards have the same names.")
    require_weights(model_config)
    source = load_manifest(records_dir)
    if manifest_kind(source) != "images":
        raise DataError(f"{records_dir} is already a features cache; cache the image records it was made from "
                        f"({source.get('features', {}).get('source_records', '?')}).")
    splits = sorted(source["splits"]) if splits is None else ([splits] if isinstance(splits, str) else list(splits))
    unknown = [s for s in splits if s not in source["splits"]]
    if unknown:
        raise DataError(f"split(s) {', '.join(unknown)} are not in {records_dir} "
                        f"(it has {', '.join(sorted(source['splits']))}).")
    validate(records_dir, source, splits=splits)

    image_size = encoder_image_size(model_config)
    weights = model_config.encoder_weights if fine_tuned is None else fine_tuned.checkpoint
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # features as exact as the encoder computes them
    try:
        with strategy.scope():
            if fine_tuned is None:
                encoder = build_encoder(model_config.encoder, image_size=image_size, weights=weights)
            else:
                encoder = build_encoder(model_config.encoder, image_size=image_size)
                encoder.set_weights(fine_tuned.weights)
            encoder.trainable = False
    finally:
        keras.mixed_precision.set_global_policy(policy)
    sha = (feature_cache.weights_fingerprint(weights) if fine_tuned is None
           else encoder_fingerprint(fine_tuned.weights))
    dim = int(encoder.output_shape[-1])

    def replica_fn(b):
        return b["index"], encoder(tf.cast(b["images"], tf.float32), training=False)

    @tf.function
    def encode(batch):
        return strategy.run(replica_fn, args=(batch,))

    # Remove the manifest first: while shards are rewritten the directory is not a complete cache.
    tf.io.gfile.makedirs(output_dir)
    if tf.io.gfile.exists(join(output_dir, MANIFEST)):
        tf.io.gfile.remove(join(output_dir, MANIFEST))
    total = sum(source["splits"][s]["images"] for s in splits)
    bar = tqdm(total=total, desc=f"{model_config.encoder} features", unit="img", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    new_splits = {}
    try:
        for split in splits:
            infos = []
            for shard in source["splits"][split]["shards"]:
                src_path = join(records_dir, shard["file"])
                serialized = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(src_path)]
                if len(serialized) != shard["records"]:
                    raise DataError(f"{src_path} holds {len(serialized)} records but {records_dir}/{MANIFEST} "
                                    f"lists {shard['records']}; prepare the records again.")
                features = np.zeros([len(serialized), dim], np.float16)
                done = np.zeros([len(serialized)], bool)
                if serialized:
                    batches = strategy.experimental_distribute_dataset(
                        _shard_batches(src_path, len(serialized), batch_size, image_size))
                    for batch in batches:
                        index, out = encode(batch)
                        for i, f in zip(strategy.experimental_local_results(index),
                                        strategy.experimental_local_results(out)):
                            i, f = i.numpy(), f.numpy()
                            real = i >= 0
                            features[i[real]] = f[real].astype(np.float16)
                            done[i[real]] = True
                            bar.update(int(real.sum()))
                if not done.all():  # cannot happen: every record is in exactly one batch
                    raise DataError(f"{src_path}: {int((~done).sum())} records got no features.")
                if not np.isfinite(features).all():
                    raise DataError(f"{model_config.encoder} features of {src_path} are not finite in float16 "
                                    "(NaN, or beyond 65504): this encoder's features cannot be cached.")
                out_records = [records.features_example(s, f) for s, f in zip(serialized, features)]
                size, md5 = records.write_records_atomically(join(output_dir, shard["file"]), out_records)
                infos.append({"file": shard["file"], "records": len(out_records), "captions": shard["captions"],
                              "bytes": size, "md5": md5})
            new_splits[split] = {"images": source["splits"][split]["images"],
                                 "captions": source["splits"][split]["captions"], "shards": infos}
            listed = {s["file"] for s in infos}
            for stale in tf.io.gfile.glob(shard_glob(output_dir, split)):
                if stale.rsplit("/", 1)[-1] not in listed:  # a leftover of a cache with other sharding
                    tf.io.gfile.remove(stale)
    finally:
        bar.close()

    copy_atomically(join(records_dir, source["vocabulary"]["file"]), join(output_dir, VOCABULARY))
    if (source.get("cider_document_frequencies") or {}).get("file"):
        copy_atomically(join(records_dir, source["cider_document_frequencies"]["file"]),
                        join(output_dir, DOCUMENT_FREQUENCIES))
    elif tf.io.gfile.exists(join(output_dir, DOCUMENT_FREQUENCIES)):  # an earlier cache's, not these records'
        tf.io.gfile.remove(join(output_dir, DOCUMENT_FREQUENCIES))
    manifest = dict(source)
    manifest.update(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        vocabulary={**source["vocabulary"], "file": VOCABULARY},
        splits=new_splits,
        kind=feature_cache.KIND,
        features={"encoder": model_config.encoder, "weights": weights, "weights_sha256": sha,
                  "image_size": image_size, "dim": dim, "dtype": feature_cache.DTYPE,
                  "source_records": records_dir,
                  **({"fine_tuned": {"run": fine_tuned.run, "checkpoint": fine_tuned.checkpoint,
                                     "step": fine_tuned.step}} if fine_tuned else {})},
    )
    # The manifest is written last: its presence means the cache is complete.
    write_json_atomically(join(output_dir, MANIFEST), manifest)
    return manifest


def summarize(manifest: dict) -> str:
    f = manifest["features"]
    lines = [f"features: {f['encoder']} at {f['image_size']}x{f['image_size']}, weights {f['weights']} "
             f"(sha256 {f['weights_sha256'][:12]}), dim {f['dim']} {f['dtype']}, from {f['source_records']}"]
    lines += [f"{split}: {s['images']} images, {len(s['shards'])} shards" for split, s in manifest["splits"].items()]
    return "\n".join(lines)


def ensure_features(config, strategy: tf.distribute.Strategy | None = None, log=print) -> dict | None:
    """Caches the encoder's features into config.data.features_dir if it is set and holds no cache.

    Call after `prepare.ensure_prepared(config)` (the records are the source).
    Returns the cache's manifest, or None when the config trains from images.
    A cache that is already there is reused as it is; training checks that it
    fits the model (`check_features_compatible`).
    """
    features_dir = feature_cache.features_dir_of(config)
    if not features_dir:
        return None
    if is_prepared(features_dir):
        return load_manifest(features_dir)
    if strategy is not None:
        resolver = getattr(strategy, "cluster_resolver", None)
        if resolver is not None and not isinstance(strategy, tf.distribute.TPUStrategy):
            strategy = None  # several workers: each caches on its own device (the results are identical)
    log(f"caching {config.model.encoder} features of {config.data.records_dir} into {features_dir} ...")
    manifest = cache_features(config.data.records_dir, features_dir, config.model, strategy=strategy)
    log(summarize(manifest))
    return manifest
