"""Tiny configs and datasets for fast tests."""

import os

import keras
import numpy as np
import tensorflow as tf

from configs import demo
from showtell_dist.model.show_and_tell import build_model
from showtell_dist.training.trainer import Trainer
from showtell_dist.data import synthetic
from showtell_dist.data.prepare import PrepareOptions, prepare_dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tiny_dataset(root: str, num_train: int = 48, num_val: int = 12, num_test: int = 8):
    raw, records = os.path.join(root, "raw"), os.path.join(root, "records")
    synthetic.generate_shapes_dataset(raw, num_train=num_train, num_val=num_val, num_test=num_test,
                                      image_size=32, seed=1)
    manifest = prepare_dataset(raw, records, PrepareOptions(images_per_shard=16, num_workers=4))
    return records, manifest


def tiny_config(records_dir: str, **train_overrides):
    """The demo config shrunk to a model that trains a step in milliseconds."""
    c = demo.get_config()
    c.data.records_dir = records_dir
    c.data.source_dir = records_dir
    c.data.generate_synthetic = False
    c.data.shuffle_buffer = 16
    c.data.deterministic_input = True  # exact streams: resumed and uninterrupted runs compare equal
    c.model.image_size = 32
    c.model.units = 16
    c.model.embed_dim = 8
    c.model.dropout = 0.0
    c.train.global_batch_size = 8
    c.train.steps = 6
    c.train.steps_per_loop = 2
    c.train.warmup_steps = 2
    c.train.checkpoint_every = 0
    c.train.eval_every = 0
    c.train.summary_images = 0  # TensorBoard caption samples cost ~2 s a run; their tests turn them on
    c.demo.num_examples = 0
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


VOCAB = 11


def global_batch(batch=8, captions=2, time=6, image_size=32):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, [batch, image_size, image_size, 3]).astype(np.float32)
    tokens = np.zeros([batch, captions, time], np.int32)
    for b in range(batch):
        for c in range(captions):
            n = rng.integers(0, time - 1)  # some captions empty; real tokens fall unevenly across replicas
            if b == 0 and c == 1:
                n = 0
            if n:
                tokens[b, c, 0] = 1
                tokens[b, c, 1:n] = rng.integers(4, VOCAB, n - 1)
                tokens[b, c, n] = 2
    return {"images": images, "captions": tokens}


def train_tiny(strategy, steps=2, dtype_policy="float32", **overrides):
    """Trains the tiny model on one fixed global batch; returns metrics and trainable weights.

    dtype_policy="float64" takes float32 summation-order noise out of comparisons across
    replica counts: Adam divides each gradient by its own magnitude, so on weights whose
    gradient is near zero that noise becomes an update-sized difference.
    """
    config = tiny_config("unused", **overrides)
    keras.mixed_precision.set_global_policy(dtype_policy)
    try:
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(config.model, VOCAB)
        trainer = Trainer(strategy, model, config.train, jit_compile=config.train.jit_compile)
        ds = tf.data.Dataset.from_tensors(global_batch()).repeat()
        iterator = iter(strategy.experimental_distribute_dataset(ds))
        metrics = trainer.train_loop(iterator, steps)
        if trainer.weight_average is not None:
            metrics["averages"] = [a.numpy() for a in trainer.weight_average.averages]
        return metrics, [v.numpy() for v in model.trainable_variables]
    finally:
        keras.mixed_precision.set_global_policy("float32")


_MIRRORED: dict = {}


def mirrored(n: int = 2) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy over the first n logical CPUs for the whole test session.

    Every new strategy object numbers its collective instances from the start again, and the runtime
    refuses an instance key it has seen with another dtype ("Collective instance 101 expected ...
    data_type 2 but got ... data_type 1": a float64 test, then a float32 one). Sharing one strategy per
    device count keeps the keys unique across tests.
    """
    if n not in _MIRRORED:
        _MIRRORED[n] = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
    return _MIRRORED[n]
