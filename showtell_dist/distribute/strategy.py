"""One function from a strategy name to a `tf.distribute.Strategy`.

  default       the default (no-op) strategy: one device, no distribution code
  one_device    OneDeviceStrategy on the first GPU, else the CPU
  mirrored      MirroredStrategy over this machine's GPUs, or over N logical
                CPU devices with num_cpu_devices=N (real all-reduce on a CPU)
  multi_worker  MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG
  tpu           TPUStrategy; `tpu` is a TPU name, "local", or grpc://host:port

Logical CPU devices must be configured before TensorFlow initialises its
devices, so launchers call `create_strategy` before building anything else.
"""

from __future__ import annotations

import json
import os
import socket
import threading

import tensorflow as tf

from showtell_dist.config_fields import STRATEGIES
from showtell_dist.errors import ConfigError

TPU_TIMEOUT_S = 20.0


def configure_cpu_devices(count: int) -> None:
    """Splits the first CPU into `count` logical devices (before TF initialises)."""
    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as exc:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != count:
            raise ConfigError(f"cannot split the CPU into {count} devices: TensorFlow already "
                              f"initialised {existing}. Create the strategy before using TensorFlow.") from exc


def _check_tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            "--strategy=multi_worker needs TF_CONFIG, e.g. TF_CONFIG='{\"cluster\": {\"worker\": "
            "[\"127.0.0.1:12345\", \"127.0.0.1:12346\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}' "
            "(see BUILD.md, multi-worker).")
    try:
        cfg = json.loads(raw)
        workers, task = cfg["cluster"]["worker"], cfg["task"]
        if task["type"] not in ("worker", "chief") or not 0 <= int(task["index"]) < len(workers) + 1:
            raise ValueError("task type must be worker/chief with an index in the cluster")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"TF_CONFIG is not valid ({exc}): {raw}") from exc
    return cfg


def _tpu_reachable(tpu: str) -> None:
    """Fails fast where no TPU can answer, instead of hanging in TF's connect."""
    if tpu.startswith("grpc://"):
        host, _, port = tpu[len("grpc://"):].rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no TPU answers at {tpu} ({exc}). Check the address, or run on a TPU VM "
                              "with --tpu=local.") from exc
    if tpu == "local" and not any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")):
        raise ConfigError("--tpu=local but this machine has no TPU device (/dev/accel* or /dev/vfio). "
                          "Run on a Cloud TPU VM, or pass the TPU's name or grpc:// address.")


def _run_with_timeout(fn, timeout_s: float, what: str):
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except Exception as exc:  # re-raised below in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ConfigError(f"{what} did not answer within {timeout_s:.0f} s; is the TPU up and reachable?")
    if "error" in result:
        raise ConfigError(f"{what} failed: {result['error']}") from result["error"]
    return result["value"]


def _tpu_strategy(tpu: str | None) -> tf.distribute.Strategy:
    if not tpu:
        raise ConfigError("--strategy=tpu needs --tpu: a TPU name, 'local' on a TPU VM, or grpc://host:port.")
    _tpu_reachable(tpu)

    def connect():
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)

    return _run_with_timeout(connect, TPU_TIMEOUT_S, f"TPU {tpu!r}")


def create_strategy(name: str, *, num_cpu_devices: int = 1, tpu: str | None = None) -> tf.distribute.Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    if num_cpu_devices < 1:
        raise ConfigError(f"num_cpu_devices must be >= 1, got {num_cpu_devices}")
    if name == "tpu":
        return _tpu_strategy(tpu)
    if name == "multi_worker":
        _check_tf_config()
        configure_cpu_devices(num_cpu_devices)
        return tf.distribute.MultiWorkerMirroredStrategy()
    configure_cpu_devices(num_cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints, summaries and reports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and \
        "chief" not in resolver.cluster_spec().as_dict()


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Workers (hosts) of the strategy's cluster: one input pipeline each."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return max(1, len(jobs.get("worker", [])) + len(jobs.get("chief", [])))


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns on every worker once all of them reached it (a one-number all-reduce)."""
    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(tf.function(lambda: tf.constant(1.0))), axis=None)


def require_single_host(strategy: tf.distribute.Strategy, what: str) -> None:
    """Refuses a multi-worker strategy for work one machine must do over the whole data."""
    if isinstance(strategy, tf.distribute.TPUStrategy) or num_workers(strategy) == 1:
        return
    raise ConfigError(f"{what} runs on one machine, but the strategy spans several workers (each would "
                      "see only its own share): use --strategy=mirrored, one_device or default.")
