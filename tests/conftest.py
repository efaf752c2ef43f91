"""Test-session setup: 4 logical CPU devices, so Mirrored runs for real on a CPU.

They must be configured before TensorFlow initialises its devices, hence at
conftest import. The default strategy still uses only the first of them.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared synthetic dataset (records dir, manifest), shared by the session."""
    from tiny_setup import make_tiny_dataset

    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny_data")))


@pytest.fixture(scope="session")
def tiny_trained_dir(tiny_dataset, tmp_path_factory):
    """A model_dir trained for a few steps on `tiny_dataset` with `tiny_config`, shared by the
    evaluation and export tests (one training run for both)."""
    from showtell_dist.training import train_loop
    from tiny_setup import tiny_config

    records_dir, _ = tiny_dataset
    model_dir = str(tmp_path_factory.mktemp("tiny_model"))
    train_loop.train(tiny_config(records_dir), tf.distribute.get_strategy(), model_dir, show_progress=False)
    return model_dir
