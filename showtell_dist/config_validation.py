"""Checks every value of an experiment config before any work, and lists all that are wrong.

    problems = config_problems(config)      # ["train.steps = -5: must be an integer >= 1", ...]
    validate_config(config, source="configs/demo.py")  # ConfigError listing every problem

A field is checked by its rule in `FIELDS` (dotted name -> `Field`: a type and
a range or a set of choices). A field without a rule is checked against the
same field of `reference` (the shipped defaults, when the caller passes them):
its value must have the default's type (an int passes for a float). Fields
absent from the config are not checked, so the config.json of an older run
validates. Cross-field rules (`CROSS_CHECKS`) see the whole config.

To validate a new field, add a line to `FIELDS` (or call `register_field` from
the module that introduces it), e.g.

    FIELDS["finetune.learning_rate"] = Float(min=0, min_open=True)

This module imports no TensorFlow: launchers call it before building anything.
The lists of choices repeat the library's (encoders, layouts, ...) for that
reason; tests/test_config_validation.py checks that they agree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from showtell_dist.decoding import options as decoding_options
from showtell_dist.errors import ConfigError

# The library's choices (see the module docstring): model/encoders.py IMAGE_SIZES, data/layouts.py
# LAYOUTS, model/show_and_tell.py FEATURE_NORMS, distribute/precision.py REQUESTS,
# run/run_dir.py SELECTABLE_METRICS,
# training/phases.py SECTIONS, training/self_critical.py BASELINES.
ENCODER_MIN_IMAGE_SIZE = {"small_cnn": 16, "mobilenet_v2": 32, "inception_v3": 75}
LAYOUT_CHOICES = ("auto", "tutorial", "flickr", "coco", "karpathy")
FEATURE_NORM_CHOICES = ("batch", "layer", "none")
MIXED_PRECISION_CHOICES = ("", "float32", "auto", "mixed_bfloat16", "mixed_float16")
SELECT_METRIC_CHOICES = ("", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")
PHASE_SECTIONS = {"xe": "train", "finetune": "finetune", "scst": "scst"}
SCST_BASELINE_CHOICES = ("mean", "greedy")


@dataclasses.dataclass(frozen=True)
class Field:
    """A field's type and allowed values. `expect` completes "must be ..." in messages."""

    kind: type  # int, float, bool or str
    expect: str
    allowed: Callable[[Any], bool] = lambda value: True

    def problem(self, value) -> str | None:
        if not _has_kind(value, self.kind) or not self.allowed(value):
            return f"must be {self.expect}"
        return None


def _has_kind(value, kind: type) -> bool:
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


FIELDS: dict[str, Field] = {
    # data
    "data.source_dir": Str(),
    "data.records_dir": Str(nonempty=True, what="where prepared records are, or are written"),
    "data.features_dir": Str(what='"" to train on images'),
    "data.layout": Choice(LAYOUT_CHOICES),
    "data.image_dir": Str(),
    "data.generate_synthetic": Bool(),
    "data.synthetic.num_train": Int(min=1),
    "data.synthetic.num_val": Int(min=0),
    "data.synthetic.num_test": Int(min=0),
    "data.synthetic.image_size": Int(min=16),
    "data.synthetic.seed": Int(min=0),
    "data.images_per_shard": Int(min=1),
    "data.captions_per_image": Int(min=1),
    "data.shuffle_buffer": Int(min=1),
    "data.caption_buckets": Int(min=1, zero="pad every batch to max_len"),
    "data.deterministic_input": Bool(),
    "data.resize_to": Int(min=1, zero="images kept at their original size"),
    # tokenizer
    "tokenizer.lang": Str(nonempty=True, what="a spaCy language code such as 'en'"),
    "tokenizer.spacy_model": Str(),
    "tokenizer.min_count": Int(min=1),
    "tokenizer.vocab_size": Int(min=5, zero="no cap"),
    "tokenizer.max_len": Int(min=3, zero="the length covering 99.9% of train captions"),
    # model
    "model.encoder": Choice(tuple(ENCODER_MIN_IMAGE_SIZE)),
    "model.encoder_weights": Str(),
    "model.encoder_trainable": Bool(),
    "model.image_size": Int(min=1, zero="the encoder's own size"),  # and the encoder's least: see below
    "model.units": Int(min=1),
    "model.embed_dim": Int(min=1),
    "model.dropout": Float(min=0, max=1, max_open=True),
    "model.feature_norm": Choice(FEATURE_NORM_CHOICES),
    # train
    "train.global_batch_size": Int(min=1),
    "train.steps": Int(min=1),
    "train.steps_per_loop": Int(min=1),
    "train.learning_rate": Float(min=0, min_open=True),
    "train.warmup_steps": Int(min=0),
    "train.final_lr_ratio": Float(min=0, max=1),
    "train.clip_norm": Float(min=0),
    "train.seed": Int(min=0, max=2**32 - 1),
    "train.checkpoint_every": Int(min=1, zero="only at the end"),
    "train.keep_checkpoints": Int(min=1),
    "train.eval_every": Int(min=1, zero="never"),
    "train.eval_max_images": Int(min=1, zero="the whole validation split"),
    "train.summary_images": Int(min=1, zero="off"),
    "train.mixed_precision": Choice(MIXED_PRECISION_CHOICES),
    "train.jit_compile": Bool(),
    "train.weight_average_decay": Float(min=0, max=1, min_open=True, max_open=True, zero="no moving average"),
    # eval
    # the decoding options' rules are theirs (decoding/options.py)
    **{f"{decoding_options.CONFIG_SECTION}.{name}": Field(object, *decoding_options.rule(name))
       for name in decoding_options.CONFIG_KEYS},
    "eval.select_metric": Choice(SELECT_METRIC_CHOICES),
    # demo
    "demo.num_examples": Int(min=0),
    # phases and the self-critical phase (configs/scst.py)
    "phases": Field(str, "a comma-separated list of " + ", ".join(repr(p) for p in PHASE_SECTIONS) + ", e.g. 'xe,scst'",
                    lambda v: all(p.strip() in PHASE_SECTIONS for p in v.split(","))),
    # the encoder fine-tuning phase (configs/finetune.py)
    "finetune.steps": Int(min=1),
    "finetune.global_batch_size": Int(min=1),
    "finetune.learning_rate": Float(min=0, min_open=True),
    "finetune.encoder_learning_rate": Float(min=0),
    "finetune.warmup_steps": Int(min=0),
    "finetune.final_lr_ratio": Float(min=0, max=1),
    "finetune.clip_norm": Float(min=0),
    "scst.steps": Int(min=1),
    "scst.global_batch_size": Int(min=1),
    "scst.samples_per_image": Int(min=1),
    "scst.baseline": Choice(SCST_BASELINE_CHOICES),
    "scst.max_len": Int(min=1),
    "scst.temperature": Float(min=0, min_open=True),
    "scst.dropout": Bool(),
    "scst.xe_weight": Float(min=0),
    "scst.learning_rate": Float(min=0, min_open=True),
    "scst.warmup_steps": Int(min=0),
    "scst.final_lr_ratio": Float(min=0, max=1),
    "scst.clip_norm": Float(min=0),
}


def register_field(name: str, field: Field) -> None:
    """Adds (or replaces) the rule of a dotted field name, e.g. "finetune.learning_rate"."""
    FIELDS[name] = field


def _image_size_fits_encoder(config: Mapping) -> list[str]:
    model = config.get("model")
    if not isinstance(model, Mapping):
        return []
    encoder, size = model.get("encoder"), model.get("image_size")
    least = ENCODER_MIN_IMAGE_SIZE.get(encoder) if isinstance(encoder, str) else None
    if least is None or FIELDS["model.image_size"].problem(size) or size == 0 or size >= least:
        return []
    return [f"model.image_size = {size!r}: the {encoder} encoder needs images of at least {least} pixels "
            "(or 0 for its own size)"]


def _phases_have_sections(config: Mapping) -> list[str]:
    spec = config.get("phases")
    if not isinstance(spec, str) or FIELDS["phases"].problem(spec):
        return []
    return [f"phases = {spec!r}: the {name} phase needs a `{PHASE_SECTIONS[name]}` section, which the config lacks"
            + (f" (add one: c.{name} = configs.{name}.section())" if name in ("scst", "finetune") else "")
            for name in dict.fromkeys(p.strip() for p in spec.split(","))
            if not isinstance(config.get(PHASE_SECTIONS[name]), Mapping)]


def _scst_mean_baseline_has_samples(config: Mapping) -> list[str]:
    scst = config.get("scst")
    if not isinstance(scst, Mapping) or scst.get("baseline") != "mean":
        return []
    samples = scst.get("samples_per_image")
    if FIELDS["scst.samples_per_image"].problem(samples) or samples >= 2:
        return []
    return [f"scst.samples_per_image = {samples!r}: the 'mean' baseline needs at least 2 samples per image "
            "(each is baselined by the others); use 5, or scst.baseline='greedy'"]


# Rules between fields: config (a plain nested dict) -> messages.
CROSS_CHECKS: list[Callable[[Mapping], list[str]]] = [_image_size_fits_encoder, _phases_have_sections,
                                                      _scst_mean_baseline_has_samples]


def _as_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _leaves(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaves(value, name + ".")
        else:
            yield name, value


def _lookup(tree: Mapping, name: str):
    node: Any = tree
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


_KIND_NAMES = {int: "an integer", float: "a number", bool: "True or False", str: "a string",
               list: "a list", tuple: "a list"}


def config_problems(config, reference=None) -> list[str]:
    """One message per bad field of `config` (a ConfigDict or nested dict); [] if all are fine.

    reference: a config of defaults (e.g. configs/demo.py's); fields without a
      rule in FIELDS must have the type of its same-named field.
    """
    tree = _as_dict(config)
    ref = _as_dict(reference) if reference is not None else {}
    problems = []
    for name in sorted(FIELDS):
        found, value = _lookup(tree, name)
        if found and isinstance(value, Mapping):
            problems.append(f"{name}: must be a value, not a section")
        elif found and (problem := FIELDS[name].problem(value)):
            problems.append(f"{name} = {value!r}: {problem}")
    for name, value in _leaves(tree):
        if name in FIELDS:
            continue
        found, default = _lookup(ref, name)
        if not found or default is None:
            continue
        if isinstance(default, Mapping):
            problems.append(f"{name} = {value!r}: must be a section like the default's")
        elif not _has_kind(value, float if isinstance(default, float) else type(default)):
            kind = _KIND_NAMES.get(float if isinstance(default, float) else type(default),
                                   f"a {type(default).__name__}")
            problems.append(f"{name} = {value!r}: must be {kind}, like its default {default!r}")
    for check in CROSS_CHECKS:
        problems.extend(check(tree))
    return problems


def validate_config(config, *, source: str = "the config", reference=None,
                    fix: str = "Fix them in the config file, or override them with --config.<field>=VALUE.") -> None:
    """ConfigError listing every bad field of `config` (see `config_problems`), naming `source`.

    fix: the last line of the message, saying how to correct the values.
    """
    problems = config_problems(config, reference)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} invalid value(s):\n  " + "\n  ".join(problems) + "\n" + fix)
