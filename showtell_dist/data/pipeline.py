"""tf.data input pipelines over prepared shards (local or gs://).

One element per image, with all its captions, so that the train step encodes
each image once and its captions share that encoding:

  images    [batch, height, width, 3] float32, pixel values 0..255
  captions  [batch, captions_per_image, max_len] int32, 0-padded; a row of
            zeros is a missing caption and carries no loss

and, in evaluation pipelines only,

  index     [batch] int32, the image's position in its split (the records'
            order: shard after shard); -1 for padding

No element holds a string: everything an element carries is sent to the
replicas (`strategy.run` takes the whole batch) and a TPU's infeed takes no
string tensors. The host maps an evaluation `index` back to the image's id
with `eval_image_ids`.

Over a features cache (a manifest with "kind": "features", see
feature_cache.py) an element carries `features` [batch, dim] float32, the
frozen encoder's output, instead of `images`; everything else is the same.

Pipelines are built per input pipeline (one per worker) through
`strategy.distribute_datasets_from_function`, sharded by file when there are
enough files and by record otherwise. Training order is a pure function of the
seed, so a resumed run skips the serialized records it already consumed
(before any decoding) and sees exactly the stream an uninterrupted run sees.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from showtell_dist.data import records
from showtell_dist.errors import DataError


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    data_dir: str
    split: str
    image_size: int
    captions_per_image: int
    max_len: int
    global_batch_size: int
    seed: int = 0
    shuffle_buffer: int = 1000


def shard_files(manifest: dict, spec: PipelineSpec) -> list[str]:
    if spec.split not in manifest["splits"]:
        raise DataError(f"split {spec.split!r} is not in the prepared dataset at {spec.data_dir} "
                        f"(it has {sorted(manifest['splits'])}).")
    files = [f"{spec.data_dir.rstrip('/')}/{s['file']}" for s in manifest["splits"][spec.split]["shards"]
             if s["records"] > 0]
    if not files:
        raise DataError(f"split {spec.split!r} at {spec.data_dir} has no records.")
    return files


def decode_image(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """JPEG bytes -> [image_size, image_size, 3] float32 in 0..255."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    shape = tf.shape(image)

    def resize():
        return tf.clip_by_value(tf.image.resize(image, [image_size, image_size], antialias=True), 0.0, 255.0)

    # Records prepared at the encoder's size (the usual case) skip the resize entirely.
    same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    image = tf.cond(same, lambda: tf.cast(image, tf.float32), resize)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def manifest_kind(manifest: dict) -> str:
    """"images" (prepared records; their manifests have no "kind") or "features" (a features cache)."""
    return manifest.get("kind", "images")


def feature_dim(manifest: dict) -> int | None:
    """The features' dimension of a features cache, None for image records."""
    return int(manifest["features"]["dim"]) if manifest_kind(manifest) == "features" else None


def _caption_matrix(ragged: tf.RaggedTensor, spec: PipelineSpec, seed=None) -> tf.Tensor:
    """[num_captions, (len)] -> [captions_per_image, max_len], chosen at random when seed is given."""
    n = ragged.nrows(out_type=tf.int32)
    if seed is not None:
        order = tf.argsort(tf.random.stateless_uniform([n], seed=seed))
        ragged = tf.gather(ragged, order)
    dense = ragged[: spec.captions_per_image].to_tensor(shape=[None, spec.max_len])
    pad_rows = spec.captions_per_image - tf.shape(dense)[0]
    padded = tf.pad(dense, [[0, pad_rows], [0, 0]])
    return tf.ensure_shape(padded, [spec.captions_per_image, spec.max_len])


def _to_element(parsed: dict, spec: PipelineSpec, seed=None) -> dict:
    if "features" in parsed:
        inputs = {"features": parsed["features"]}
    else:
        inputs = {"images": decode_image(parsed["jpeg"], spec.image_size)}
    return {**inputs, "captions": _caption_matrix(parsed["captions"], spec, seed)}


def _parser(manifest: dict):
    """fn(serialized) -> parsed example, for the manifest's kind of records."""
    dim = feature_dim(manifest)
    if dim is None:
        return records.parse_example
    return lambda serialized: records.parse_features_example(serialized, dim)


def _empty_element(manifest: dict, spec: PipelineSpec) -> dict:
    """A padding element: no image (zeros), no captions, index -1."""
    dim = feature_dim(manifest)
    inputs = ({"images": tf.zeros([spec.image_size, spec.image_size, 3])} if dim is None
              else {"features": tf.zeros([dim])})
    return {**inputs, "captions": tf.zeros([spec.captions_per_image, spec.max_len], tf.int32),
            "index": tf.constant(-1, tf.int32)}


def _records(files: list[str], context: tf.distribute.InputContext, spec: PipelineSpec, shuffle: bool):
    """Serialized records for this input pipeline, repeated and shuffled when `shuffle`."""
    pipelines, index = context.num_input_pipelines, context.input_pipeline_id
    ds = tf.data.Dataset.from_tensor_slices(files)
    by_file = len(files) >= pipelines and shuffle
    if by_file:
        ds = ds.shard(pipelines, index)
    if shuffle:
        ds = ds.shuffle(len(files), seed=spec.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(8, len(files)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not by_file and pipelines > 1:
        ds = ds.shard(pipelines, index)
    if shuffle:
        ds = ds.shuffle(spec.shuffle_buffer, seed=spec.seed + 1, reshuffle_each_iteration=True)
    return ds


def train_input_fn(manifest: dict, spec: PipelineSpec, start_step: int = 0):
    """Returns fn(InputContext) -> infinite shuffled dataset of per-replica batches."""
    files = shard_files(manifest, spec)
    parse_example = _parser(manifest)

    def input_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = context.get_per_replica_batch_size(spec.global_batch_size)
        replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
        consumed = start_step * batch * replicas_per_pipeline
        ds = _records(files, context, spec, shuffle=True).enumerate().skip(consumed)

        def parse(position, serialized):
            seed = tf.stack([tf.constant(spec.seed, tf.int64), position])
            return _to_element(parse_example(serialized), spec, seed)

        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    return input_fn


def eval_steps(manifest: dict, spec: PipelineSpec, num_input_pipelines: int,
               max_images: int | None = None) -> int:
    """Distributed steps that cover every image of the split (or the first max_images) once."""
    images = manifest["splits"][spec.split]["images"]
    if max_images is not None:
        images = min(images, max_images)
    per_pipeline = math.ceil(images / num_input_pipelines)
    return max(1, math.ceil(per_pipeline / (spec.global_batch_size // num_input_pipelines)))


def _indexed_records(manifest: dict, spec: PipelineSpec, num_input_pipelines: int, input_pipeline_id: int,
                     max_images: int | None) -> tf.data.Dataset:
    """(index int32, serialized) of one evaluation input pipeline's share of the split, in order.

    index is the record's position in the split (shard after shard, as the
    manifest lists them); the stream interleaves the shards and each
    pipeline takes every num_input_pipelines-th record of it.
    """
    files = shard_files(manifest, spec)
    counts = [s["records"] for s in manifest["splits"][spec.split]["shards"] if s["records"] > 0]
    firsts = [sum(counts[:i]) for i in range(len(counts))]

    def read(path, first):
        return tf.data.TFRecordDataset(path).enumerate().map(
            lambda i, serialized: (tf.cast(first + i, tf.int32), serialized))

    ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(firsts, tf.int64))).interleave(
        read, cycle_length=min(8, len(files)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if num_input_pipelines > 1:
        ds = ds.shard(num_input_pipelines, input_pipeline_id)
    if max_images is not None:
        ds = ds.take(math.ceil(max_images / num_input_pipelines))
    return ds


def eval_input_fn(manifest: dict, spec: PipelineSpec, max_images: int | None = None):
    """Returns fn(InputContext) -> finite dataset of static-shape per-replica batches.

    Each pipeline yields its share of the split in order, the last batch padded
    with empty images (no captions, so no loss, index -1) and then all-padding
    batches, so that every worker runs the same number of steps (`eval_steps`).
    """
    parse_example = _parser(manifest)

    def input_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = context.get_per_replica_batch_size(spec.global_batch_size)
        ds = _indexed_records(manifest, spec, context.num_input_pipelines, context.input_pipeline_id, max_images)
        ds = ds.map(lambda index, s: {**_to_element(parse_example(s), spec), "index": index},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(_empty_element(manifest, spec)).repeat())
        return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    return input_fn


def eval_image_ids(manifest: dict, spec: PipelineSpec, max_images: int | None = None,
                   num_input_pipelines: int = 1) -> dict[int, str]:
    """{index: image_id} of every image the evaluation pipelines yield (`eval_input_fn`), read on the host.

    Only the image ids are parsed, and only of the records the pipelines take.
    """
    ids: dict[int, str] = {}
    only_id = {"image/id": tf.io.FixedLenFeature([], tf.string)}
    for pipeline_id in range(num_input_pipelines):
        ds = _indexed_records(manifest, spec, num_input_pipelines, pipeline_id, max_images).map(
            lambda index, s: (index, tf.io.parse_single_example(s, only_id)["image/id"]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        for index, image_id in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
            ids[int(index)] = image_id.decode("utf-8")
    return ids
