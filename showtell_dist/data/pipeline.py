"""tf.data input pipelines over prepared shards (local or gs://).

One element per image, with all its captions, so that the train step encodes
each image once and its captions share that encoding:

  images    [batch, height, width, 3] uint8 (a quarter of float32's bytes to
            send; the model's encode casts them on the device)
  captions  [batch, captions_per_image, time] int32, 0-padded; a row of
            zeros is a missing caption and carries no loss. time is max_len,
            or in training with caption_buckets the smallest bucket length
            that holds the batch's longest caption (a few static shapes, so
            an XLA/TPU step compiles a few programs, and no step computes
            the LSTM over a batch's common padding)

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
seed: each epoch reads its shards in an order drawn from (seed, epoch), a
group of shards at a time, and permutes each group's records (`TrainOrder`).
A resumed run therefore starts reading at the group it stopped in, whatever
the step, and sees exactly the stream an uninterrupted run sees (with
`deterministic`; without it parallel decoding may swap neighbouring images,
so batches near the resume point may differ by a few images).
"""

from __future__ import annotations

import dataclasses
import math
import os

import tensorflow as tf

from showtell_dist.data.dataset_dir import feature_dim, manifest_kind, record_parser, shard_files
from showtell_dist.errors import DataError


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline reads and how it batches it.

    shuffle_buffer: records mixed together in training: consecutive shards
      (of an epoch's shard order) holding at most this many records are read
      as one group and permuted (at least one shard per group). A resume
      reads the group it resumes in.
    caption_buckets: training pads each batch's captions to the smallest of
      these lengths that holds them (max_len is always one); () pads to
      max_len.
    deterministic: training elements in input order (exact resume; tests);
      False lets parallel decoding hand over whichever image is ready first.
    """

    data_dir: str
    split: str
    image_size: int
    captions_per_image: int
    max_len: int
    global_batch_size: int
    seed: int = 0
    shuffle_buffer: int = 1000
    caption_buckets: tuple[int, ...] = ()
    deterministic: bool = True


def caption_buckets(max_len: int, count: int) -> tuple[int, ...]:
    """`count` caption lengths spread evenly up to max_len (the last), e.g. (10, 20, 30, 40) for 40, 4."""
    if count < 1:
        return ()
    return tuple(sorted({max(2, math.ceil(max_len * i / count)) for i in range(1, count + 1)}))


def host_cores() -> int:
    """CPU cores this process may use: sizes the parallel reads and decoding."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resize_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """[height, width, 3] uint8 -> [image_size, image_size, 3] uint8, as training sees it.

    Bilinear with antialiasing, rounded; an image already at image_size
    passes through. prepare.py stores images resized by this same function.
    """
    shape = tf.shape(image)

    def resize():
        resized = tf.image.resize(image, [image_size, image_size], antialias=True)
        return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)

    same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    image = tf.cond(same, lambda: tf.cast(image, tf.uint8), resize)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def decode_image_uint8(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """JPEG bytes -> [image_size, image_size, 3] uint8: what the pipelines send to the replicas."""
    return resize_image(tf.io.decode_jpeg(jpeg, channels=3), image_size)


def decode_image(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """JPEG bytes -> [image_size, image_size, 3] float32 in 0..255, the pixels training sees."""
    return tf.cast(decode_image_uint8(jpeg, image_size), tf.float32)


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
        inputs = {"images": decode_image_uint8(parsed["jpeg"], spec.image_size)}
    return {**inputs, "captions": _caption_matrix(parsed["captions"], spec, seed)}


def _check_image_size(manifest: dict, spec: PipelineSpec) -> None:
    """Records stored resized (prepare --resize_to) must be at the size the model takes."""
    resized_to = manifest.get("resized_to")
    if manifest_kind(manifest) == "images" and resized_to and int(resized_to) != spec.image_size:
        raise DataError(f"the records at {spec.data_dir} hold images resized to {resized_to}x{resized_to} but the "
                        f"model takes {spec.image_size}x{spec.image_size} (model.image_size): prepare them again "
                        f"with --resize_to={spec.image_size} (or --resize_to=0 to keep the original sizes).")


def _empty_element(manifest: dict, spec: PipelineSpec) -> dict:
    """A padding element: no image (zeros), no captions, index -1."""
    dim = feature_dim(manifest)
    inputs = ({"images": tf.zeros([spec.image_size, spec.image_size, 3], tf.uint8)} if dim is None
              else {"features": tf.zeros([dim])})
    return {**inputs, "captions": tf.zeros([spec.captions_per_image, spec.max_len], tf.int32),
            "index": tf.constant(-1, tf.int32)}


def _read_files(files) -> tf.data.Dataset:
    """The serialized records of `files` (a string tensor), in a fixed order (several read at once)."""
    return tf.data.TFRecordDataset(files, num_parallel_reads=host_cores())


def _key(seed: int, *parts) -> tf.Tensor:
    """A stateless-random seed [2] int64 derived from the run's seed and `parts` (ints or scalar tensors)."""
    key = tf.constant([seed, 0], tf.int64)
    for part in parts:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(part, tf.int64))
    return key


def _permutation(n, key) -> tf.Tensor:
    """A permutation of range(n) [n] int32, a pure function of key."""
    return tf.argsort(tf.random.stateless_uniform([n], seed=key), stable=True)


_FILE_ORDER, _RECORD_ORDER = 1, 2
# Groups of records read at the same time: the next one is read while the current one is consumed.
GROUPS_IN_FLIGHT = 2  # salts of the keys of the two permutations


@dataclasses.dataclass(frozen=True)
class TrainOrder:
    """The order in which one input pipeline of a training run reads its records, epoch after epoch.

    The pipeline owns `files` (every num_input_pipelines-th shard, or every
    shard when there are fewer shards than pipelines, and then keeps every
    `stride`-th record of the epoch's stream starting at `offset`). Epoch e
    reads its files in a permutation drawn from (seed, e), in groups of
    `files_per_group` consecutive files that together hold at most the
    shuffle buffer's worth of records; each group is read whole and its
    records permuted by (seed, e, group). So the position n of the stream
    names an epoch, a group and an offset, and a resumed run reads only the
    group it resumes in (`start`), nothing before it.
    """

    files: tuple[str, ...]
    counts: tuple[int, ...]  # records per file
    files_per_group: int
    stride: int  # 1 when sharded by file, else the number of pipelines
    offset: int  # 0 when sharded by file, else this pipeline's index
    key_part: int  # this pipeline's index when sharded by file (its own order), else 0 (a shared order)
    seed: int

    @property
    def num_groups(self) -> int:
        return math.ceil(len(self.files) / self.files_per_group)

    def _mine(self, begin: int, end: int) -> int:
        """How many of the epoch's stream positions [begin, end) this pipeline keeps."""
        def upto(x):
            return 0 if x <= self.offset else (x - self.offset - 1) // self.stride + 1
        return upto(end) - upto(begin)

    @property
    def epoch_length(self) -> int:
        """Records this pipeline yields per epoch."""
        return self._mine(0, sum(self.counts))

    def file_order(self, epoch) -> tf.Tensor:
        return _permutation(len(self.files), _key(self.seed, _FILE_ORDER, self.key_part, epoch))

    def start(self, position: int) -> tuple[int, int, int]:
        """(epoch, group, records of the group to skip) at which this pipeline's `position`-th record is."""
        epoch, rest = divmod(position, self.epoch_length)
        order = self.file_order(epoch).numpy()
        begin = 0
        for group in range(self.num_groups):
            size = sum(self.counts[i] for i in order[group * self.files_per_group:(group + 1) * self.files_per_group])
            mine = self._mine(begin, begin + size)
            if rest < mine:
                return epoch, group, rest
            rest -= mine
            begin += size
        raise AssertionError("unreachable: rest < epoch_length")

    def read_group(self, epoch, group, skip) -> tf.Tensor:
        """The records [n] string this pipeline yields of the epoch's group, after the first `skip`."""
        counts = tf.constant(self.counts, tf.int64)
        order = self.file_order(epoch)
        ordered = tf.gather(counts, order)
        begin = tf.reduce_sum(ordered[: group * self.files_per_group])  # stream position of the group
        chosen = order[group * self.files_per_group:(group + 1) * self.files_per_group]
        size = tf.reduce_sum(tf.gather(counts, chosen))
        batch = max(1, sum(self.counts))
        records = _read_files(tf.gather(tf.constant(self.files), chosen)).batch(batch).get_single_element()
        records = tf.ensure_shape(records, [None])
        records = tf.gather(records, _permutation(size, _key(self.seed, _RECORD_ORDER, self.key_part, epoch, group)))
        if self.stride > 1:
            positions = begin + tf.range(size, dtype=tf.int64)
            records = tf.boolean_mask(records, tf.equal(positions % self.stride, self.offset))
        return records[skip:]


def train_order(manifest: dict, spec: PipelineSpec, context: tf.distribute.InputContext) -> TrainOrder:
    """The record order of the training input pipeline of `context`."""
    files = shard_files(spec.data_dir, manifest, spec.split)
    counts = [s["records"] for s in manifest["splits"][spec.split]["shards"] if s["records"] > 0]
    pipelines, index = context.num_input_pipelines, context.input_pipeline_id
    if len(files) >= pipelines:  # shard by file: each pipeline reads its own files
        files, counts, stride, offset, key_part = files[index::pipelines], counts[index::pipelines], 1, 0, index
    else:  # too few files: every pipeline reads them all and keeps every pipelines-th record
        stride, offset, key_part = pipelines, index, 0
    per_group = max(1, spec.shuffle_buffer // max(counts))
    return TrainOrder(files=tuple(files), counts=tuple(counts), files_per_group=min(per_group, len(files)),
                      stride=stride, offset=offset, key_part=key_part, seed=spec.seed)


def _train_records(order: TrainOrder, start_position: int) -> tf.data.Dataset:
    """This pipeline's infinite stream of serialized records from its `start_position`-th one on."""
    epoch, group, skip = order.start(start_position)
    first = tf.data.Dataset.from_tensors((tf.constant(epoch, tf.int64), tf.constant(group, tf.int64),
                                          tf.constant(skip, tf.int64)))
    rest_of_epoch = tf.data.Dataset.range(group + 1, order.num_groups).map(
        lambda g: (tf.constant(epoch, tf.int64), g, tf.constant(0, tf.int64)))
    later = tf.data.Dataset.counter(epoch + 1).flat_map(
        lambda e: tf.data.Dataset.range(order.num_groups).map(lambda g: (e, g, tf.constant(0, tf.int64))))
    groups = first.concatenate(rest_of_epoch).concatenate(later)
    groups = groups.map(order.read_group, num_parallel_calls=GROUPS_IN_FLIGHT,
                        deterministic=True if GROUPS_IN_FLIGHT else None)
    return groups.unbatch()


def _pad_to_bucket(captions: tf.Tensor, spec: PipelineSpec) -> tf.Tensor:
    """[batch, captions, max_len] -> [batch, captions, bucket]: the smallest bucket that holds every caption."""
    buckets = tf.constant(sorted(set(spec.caption_buckets) | {spec.max_len}), tf.int32)
    real = tf.reduce_any(tf.not_equal(captions, 0), axis=[0, 1])  # [max_len]: a token somewhere in the batch
    longest = tf.reduce_max(tf.where(real, tf.range(1, spec.max_len + 1), 0))
    bucket = buckets[tf.searchsorted(buckets, longest[tf.newaxis], side="left")[0]]
    return captions[:, :, :bucket]


def train_input_fn(manifest: dict, spec: PipelineSpec, start_step: int = 0):
    """Returns fn(InputContext) -> infinite shuffled dataset of per-replica batches.

    A run resumed at start_step reads from the group of records it stopped in
    (`TrainOrder`), not the records before it, and yields exactly the batches
    an uninterrupted run yields from that step on.
    """
    _check_image_size(manifest, spec)
    parse_example = record_parser(manifest)

    def input_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = context.get_per_replica_batch_size(spec.global_batch_size)
        replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
        consumed = start_step * batch * replicas_per_pipeline
        order = train_order(manifest, spec, context)
        ds = _train_records(order, consumed).enumerate(start=consumed)

        def parse(position, serialized):
            seed = tf.stack([tf.constant(spec.seed, tf.int64), position])
            return _to_element(parse_example(serialized), spec, seed)

        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.deterministic)
        ds = ds.batch(batch, drop_remainder=True)
        if spec.caption_buckets:
            ds = ds.map(lambda b: {**b, "captions": _pad_to_bucket(b["captions"], spec)})
        return ds.prefetch(tf.data.AUTOTUNE)

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
    files = shard_files(spec.data_dir, manifest, spec.split)
    counts = [s["records"] for s in manifest["splits"][spec.split]["shards"] if s["records"] > 0]
    firsts = [sum(counts[:i]) for i in range(len(counts))]

    def read(path, first):
        return tf.data.TFRecordDataset(path).enumerate().map(
            lambda i, serialized: (tf.cast(first + i, tf.int32), serialized))

    ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(firsts, tf.int64))).interleave(
        read, cycle_length=min(host_cores(), len(files)), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
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
    _check_image_size(manifest, spec)
    parse_example = record_parser(manifest)

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
