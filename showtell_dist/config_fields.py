"""What a config value may be, named once: the library's choices and the kinds of field rules.

    ENCODER_IMAGE_SIZES["mobilenet_v2"]      # 224, the encoder's native input size
    LAYOUTS, FEATURE_NORMS, ...               # the values an enumerated setting may take
    Int(min=1).problem(0)                     # "must be an integer >= 1"
    check_positive("batch_size", 0)           # ConfigError naming the argument

config_validation.py checks every config field against these before any work,
and the library modules that act on a setting (model/encoders.py,
data/layouts.py, ...) take their choices from here, so a choice is added in
one place. The launchers build their flag choices from here too.

This module imports no TensorFlow (nor anything but errors.py): launchers
import it before building anything.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from showtell_dist.errors import ConfigError

# ----------------------------------------------------------------------------
# The library's choices
# ----------------------------------------------------------------------------

# model.encoder -> its native input size (model.image_size = 0 means this), and the least image size
# its layers accept.
# (efficientnet_lite2's 260 is model/efficientnet_lite.py's VARIANTS["lite2"].resolution; a test checks.)
ENCODER_IMAGE_SIZES = {"small_cnn": 64, "mobilenet_v2": 224, "inception_v3": 299, "efficientnet_lite2": 260}
ENCODER_MIN_IMAGE_SIZES = {"small_cnn": 16, "mobilenet_v2": 32, "inception_v3": 75, "efficientnet_lite2": 32}
# data.layout (besides "auto", which detects one of these): data/layouts.py reads each.
LAYOUTS = ("tutorial", "flickr", "coco", "karpathy")
LAYOUT_CHOICES = ("auto",) + LAYOUTS
# model.feature_norm: the normalisation of the image features before the decoder.
FEATURE_NORMS = ("batch", "layer", "none")
# train.mixed_precision: "" = the device's default (distribute/precision.py).
MIXED_PRECISION_CHOICES = ("", "float32", "auto", "mixed_bfloat16", "mixed_float16")
# eval.length_normalization: how beam hypotheses are ranked (decoding/beam_search.py).
LENGTH_NORMALIZATIONS = ("none", "average", "gnmt")
# eval.select_metric (besides "", no selection). METEOR is not offered: selection scores leave it out
# (its JVM costs ~10 s a call).
SELECTABLE_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")
SELECT_METRIC_CHOICES = ("",) + SELECTABLE_METRICS
# config.phases: phase name -> its config section (training/phases.py).
PHASE_SECTIONS = {"xe": "train", "finetune": "finetune", "scst": "scst"}
# The phases that continue from trained weights: an earlier xe phase's, or config.init_checkpoint's.
PHASES_NEEDING_TRAINED_WEIGHTS = ("finetune", "scst")
# scst.baseline (training/self_critical.py).
SCST_BASELINES = ("mean", "greedy")
# The launchers' --strategy (distribute/strategy.py).
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


# ----------------------------------------------------------------------------
# Kinds of field rules
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Field:
    """A field's type and allowed values. `expect` completes "must be ..." in messages."""

    kind: type  # int, float, bool or str
    expect: str
    allowed: Callable[[Any], bool] = lambda value: True

    def problem(self, value) -> str | None:
        if not has_kind(value, self.kind) or not self.allowed(value):
            return f"must be {self.expect}"
        return None


def has_kind(value, kind: type) -> bool:
    """Whether `value` is of `kind`: an int passes for a float (a finite one), a bool for neither."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def Int(min: int | None = None, max: int | None = None, *, zero: str | None = None) -> Field:  # noqa: A002
    """An integer in [min, max]; with `zero`, 0 is also allowed and means that."""
    bounds = (f"an integer >= {min}" if max is None else f"an integer in [{min}, {max}]") if min is not None \
        else (f"an integer <= {max}" if max is not None else "an integer")
    expect = f"0 ({zero}) or {bounds}" if zero else bounds
    return Field(int, expect, lambda v: (zero is not None and v == 0) or
                 ((min is None or v >= min) and (max is None or v <= max)))


def Float(min: float | None = None, max: float | None = None, *, min_open: bool = False,
          max_open: bool = False, zero: str | None = None) -> Field:  # noqa: A002
    """A finite number in the interval (open at an end when asked); with `zero`, 0 is also allowed."""
    parts = []
    if min is not None:
        parts.append(f"{'>' if min_open else '>='} {min}")
    if max is not None:
        parts.append(f"{'<' if max_open else '<='} {max}")
    bounds = "a number" + (" " + " and ".join(parts) if parts else "")
    expect = f"0 ({zero}) or {bounds}" if zero else bounds

    def allowed(v):
        if zero is not None and v == 0:
            return True
        if min is not None and (v <= min if min_open else v < min):
            return False
        return max is None or (v < max if max_open else v <= max)
    return Field(float, expect, allowed)


def Bool() -> Field:
    return Field(bool, "True or False")


def Str(*, nonempty: bool = False, what: str = "") -> Field:
    expect = "a non-empty string" if nonempty else "a string"
    return Field(str, expect + (f" ({what})" if what else ""), lambda v: bool(v) or not nonempty)


def Choice(choices: tuple[str, ...]) -> Field:
    return Field(str, "one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices)


POSITIVE_INT = Int(min=1)


def check_positive(name: str, value, *, allow_none: bool = False):
    """`value` if it is an integer >= 1 (or None, with allow_none); else a ConfigError naming `name`.

    For a library function's own arguments (a batch size, a length); config fields are checked by
    config_validation.py before they get there.
    """
    if value is None and allow_none:
        return None
    if POSITIVE_INT.problem(value):
        raise ConfigError(f"{name}={value!r} must be a positive integer.")
    return value
