"""Numeric precision and LSTM kernel per device kind: pure functions, checked before anything is built.

  requested precision  cpu                       gpu             tpu
  ""  (the default)    float32                   float32         mixed_bfloat16
  "float32"            float32                   float32         float32
  "auto"               mixed_bfloat16 with fast  float32         mixed_bfloat16
                       bf16 dot products, else
                       float32
  "mixed_bfloat16"     mixed_bfloat16            mixed_bfloat16  mixed_bfloat16
  "mixed_float16"      mixed_float16             mixed_float16   refused: a TPU computes in bfloat16,
                                                                 float16 loss scaling is wrong there

"Fast bf16" on a CPU means instructions that multiply bfloat16 natively
(AMX-BF16 or AVX512-BF16 in /proc/cpuinfo); elsewhere oneDNN emulates
bfloat16 and it is slower than float32.

Keras's cuDNN LSTM kernel does not compile with XLA, so with jit_compile on a
GPU the LSTM runs without cuDNN (`use_cudnn=False`, the generic kernel XLA
can fuse); elsewhere Keras picks ("auto").
"""

from __future__ import annotations

import tensorflow as tf

from showtell_dist.config_fields import MIXED_PRECISION_CHOICES as REQUESTS
from showtell_dist.errors import ConfigError

DEVICE_KINDS = ("cpu", "gpu", "tpu")
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def device_kind(strategy: tf.distribute.Strategy) -> str:
    """"tpu" under a TPUStrategy; "gpu" where TensorFlow sees a GPU (every other strategy uses them
    when present); else "cpu"."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in FAST_BF16_CPU_FLAGS)


def resolve_precision(requested: str, device_kind: str, *, cpu_fast_bf16: bool = False) -> str:
    """The Keras dtype policy to train with: "float32", "mixed_bfloat16" or "mixed_float16"."""
    requested = requested or ""
    if requested not in REQUESTS:
        raise ConfigError(f"train.mixed_precision must be one of {REQUESTS} (\"\" = the device's default), "
                          f"got {requested!r}")
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"device_kind must be one of {DEVICE_KINDS}, got {device_kind!r}")
    if requested == "mixed_float16" and device_kind == "tpu":
        raise ConfigError("train.mixed_precision='mixed_float16' on a TPU: TPUs compute in bfloat16 and need "
                          "no loss scaling. Use mixed_bfloat16 (the TPU default, also chosen by \"\" or \"auto\").")
    if requested in ("float32", "mixed_bfloat16", "mixed_float16"):
        return requested
    if device_kind == "tpu":
        return "mixed_bfloat16"
    if requested == "auto" and device_kind == "cpu" and cpu_fast_bf16:
        return "mixed_bfloat16"
    return "float32"


def resolve_use_cudnn(device_kind: str, jit_compile: bool):
    """The `use_cudnn` argument of the model's keras LSTM: False for XLA on a GPU, else "auto"."""
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"device_kind must be one of {DEVICE_KINDS}, got {device_kind!r}")
    return False if (jit_compile and device_kind == "gpu") else "auto"
