"""Precision and LSTM kernel per device kind: pure functions of the request and the device."""

import pytest
import tensorflow as tf

from showtell_dist.distribute.precision import (cpu_flags, cpu_has_fast_bf16, device_kind, resolve_precision,
                                                resolve_use_cudnn)
from showtell_dist.errors import ConfigError


@pytest.mark.parametrize("requested, kind, fast, expected", [
    ("", "cpu", False, "float32"),
    ("", "cpu", True, "float32"),            # the default stays float32 on CPUs, fast bf16 or not
    ("", "gpu", False, "float32"),
    ("", "tpu", False, "mixed_bfloat16"),    # a TPU computes in bfloat16 by default
    ("float32", "tpu", False, "float32"),    # asked for explicitly
    ("auto", "cpu", True, "mixed_bfloat16"),
    ("auto", "cpu", False, "float32"),
    ("auto", "gpu", True, "float32"),
    ("auto", "tpu", False, "mixed_bfloat16"),
    ("mixed_bfloat16", "cpu", False, "mixed_bfloat16"),
    ("mixed_float16", "gpu", False, "mixed_float16"),
    ("mixed_float16", "cpu", False, "mixed_float16"),
])
def test_resolve_precision(requested, kind, fast, expected):
    assert resolve_precision(requested, kind, cpu_fast_bf16=fast) == expected


def test_float16_on_a_tpu_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="mixed_float16.*TPU.*Use mixed_bfloat16"):
        resolve_precision("mixed_float16", "tpu")


def test_unknown_precision_names_the_choices():
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of .*'auto'.*got 'bf16'"):
        resolve_precision("bf16", "cpu")


def test_no_cudnn_lstm_under_xla_on_a_gpu():
    assert resolve_use_cudnn("gpu", jit_compile=True) is False
    assert resolve_use_cudnn("gpu", jit_compile=False) == "auto"
    assert resolve_use_cudnn("cpu", jit_compile=True) == "auto"
    assert resolve_use_cudnn("tpu", jit_compile=True) == "auto"


def test_fast_bf16_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(str(info)) >= {"avx512f", "avx512_bf16"}
    assert cpu_has_fast_bf16(cpu_flags(str(info)))
    assert cpu_has_fast_bf16(frozenset({"amx_bf16", "amx_tile"}))
    assert not cpu_has_fast_bf16(frozenset({"avx512f", "avx2"}))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_device_kind_of_this_machine():
    # The test machine has no GPU or TPU.
    assert device_kind(tf.distribute.get_strategy()) == "cpu"


def test_build_experiment_trains_in_the_resolved_policy(tiny_dataset):
    import keras

    from showtell_dist.training import train_loop
    from tiny_setup import tiny_config

    records, _ = tiny_dataset
    try:
        for requested, expected in (("auto", "bfloat16" if cpu_has_fast_bf16() else "float32"), ("", "float32")):
            exp = train_loop.build_experiment(tiny_config(records, mixed_precision=requested),
                                              tf.distribute.get_strategy())
            assert exp.model.lstm.compute_dtype == expected, requested
            assert exp.model.logits.compute_dtype == "float32"  # the loss stays in float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
