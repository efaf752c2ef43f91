"""Checks every value of an experiment config before any work, and lists all that are wrong.

    problems = config_problems(config)      # ["train.steps = -5: must be an integer >= 1", ...]
    validate_config(config, source="configs/demo.py")  # ConfigError listing every problem
    unknown_field_problem(config, "train.stpes")  # "the config has no field train.stpes; did you mean train.steps?"

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
The choices (encoders, layouts, ...) and the kinds of rules (Int, Float, ...)
come from config_fields.py, which the library modules take theirs from too.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable, Mapping

from showtell_dist.config_fields import (ENCODER_MIN_IMAGE_SIZES, FEATURE_NORMS, LAYOUT_CHOICES,
                                         MIXED_PRECISION_CHOICES, PHASE_SECTIONS,
                                         PHASES_NEEDING_TRAINED_WEIGHTS, SCST_BASELINES, SELECT_METRIC_CHOICES,
                                         Bool, Choice, Field, Float, Int, Str, has_kind)
from showtell_dist.decoding import options as decoding_options
from showtell_dist.errors import ConfigError

__all__ = ["FIELDS", "CROSS_CHECKS", "Field", "Int", "Float", "Bool", "Str", "Choice", "register_field",
           "config_problems", "validate_config", "unknown_field_problem"]

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
    "model.encoder": Choice(tuple(ENCODER_MIN_IMAGE_SIZES)),
    "model.encoder_weights": Str(),
    "model.encoder_trainable": Bool(),
    "model.image_size": Int(min=1, zero="the encoder's own size"),  # and the encoder's least: see below
    "model.units": Int(min=1),
    "model.embed_dim": Int(min=1),
    "model.dropout": Float(min=0, max=1, max_open=True),
    "model.feature_norm": Choice(FEATURE_NORMS),
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
    # the decoding options' own rules (decoding/options.py)
    **{f"{decoding_options.CONFIG_SECTION}.{name}": decoding_options.rule(name) for name in decoding_options.CONFIG_KEYS},
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
    "scst.baseline": Choice(SCST_BASELINES),
    "scst.max_len": Int(min=1),
    "scst.temperature": Float(min=0, min_open=True),
    "scst.dropout": Bool(),
    "scst.xe_weight": Float(min=0),
    "scst.learning_rate": Float(min=0, min_open=True),
    "scst.warmup_steps": Int(min=0),
    "scst.final_lr_ratio": Float(min=0, max=1),
    "scst.clip_norm": Float(min=0),
    "scst.reward_end_token": Bool(),
    # every phase's schedule (training/optimizer.py)
    **{f"{section}.{name}": field for section in PHASE_SECTIONS.values() for name, field in (
        ("schedule_steps", Int(min=1, zero="as long as the phase's steps")),
        ("decay_fraction", Float(min=0, max=1, min_open=True)))},
}


def register_field(name: str, field: Field) -> None:
    """Adds (or replaces) the rule of a dotted field name, e.g. "finetune.learning_rate"."""
    FIELDS[name] = field


def _image_size_fits_encoder(config: Mapping) -> list[str]:
    model = config.get("model")
    if not isinstance(model, Mapping):
        return []
    encoder, size = model.get("encoder"), model.get("image_size")
    least = ENCODER_MIN_IMAGE_SIZES.get(encoder) if isinstance(encoder, str) else None
    if least is None or FIELDS["model.image_size"].problem(size) or size == 0 or size >= least:
        return []
    return [f"model.image_size = {size!r}: the {encoder} encoder needs images of at least {least} pixels "
            "(or 0 for its own size)"]


def _phases_have_sections(config: Mapping) -> list[str]:
    spec = config.get("phases")
    if not isinstance(spec, str) or FIELDS["phases"].problem(spec):
        return []
    return [f"phases = {spec!r}: the {name} phase needs a `{PHASE_SECTIONS[name]}` section, which the config lacks"
            + (f" (add one: c.{name} = configs.{name}.section())" if PHASE_SECTIONS[name] == name else "")
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


def _phases_start_from_trained_weights(config: Mapping) -> list[str]:
    """A finetune or scst phase continues from trained weights: an earlier xe phase's, or init_checkpoint's.
    From random weights, self-critical sampling earns next to no reward (seen: 0.003 after 50 steps)."""
    spec = config.get("phases")
    if not isinstance(spec, str) or FIELDS["phases"].problem(spec) or config.get("init_checkpoint"):
        return []
    names = list(dict.fromkeys(p.strip() for p in spec.split(",")))
    if names[0] not in PHASES_NEEDING_TRAINED_WEIGHTS:
        return []  # the first phase is xe: every later phase starts from its weights
    first = next(n for n in PHASE_SECTIONS if n not in PHASES_NEEDING_TRAINED_WEIGHTS)  # from random weights
    in_order = ",".join([first] + [n for n in names if n != first])
    return [f"phases = {spec!r}: the {names[0]} phase would start from random weights (no xe phase before it and "
            f"no init_checkpoint); put an xe phase first (--config.phases={in_order}), or start from a trained "
            "run's weights (--config.init_checkpoint=runs/<run>/best, a checkpoint prefix, or a run directory)"]


def _schedules_cover_their_phases(config: Mapping) -> list[str]:
    problems = []
    for section in PHASE_SECTIONS.values():
        s = config.get(section)
        if not isinstance(s, Mapping) or not s.get("schedule_steps"):
            continue
        total, steps = s["schedule_steps"], s.get("steps")
        if not FIELDS[f"{section}.schedule_steps"].problem(total) and isinstance(steps, int) and total < steps:
            problems.append(f"{section}.schedule_steps = {total}: shorter than {section}.steps = {steps}; set it "
                            ">= steps, or 0 for a schedule as long as the phase")
    return problems


# Rules between fields: config (a plain nested dict) -> messages.
CROSS_CHECKS: list[Callable[[Mapping], list[str]]] = [_image_size_fits_encoder, _phases_have_sections,
                                                      _scst_mean_baseline_has_samples,
                                                      _phases_start_from_trained_weights, _schedules_cover_their_phases]


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
        elif not has_kind(value, float if isinstance(default, float) else type(default)):
            kind = _KIND_NAMES.get(float if isinstance(default, float) else type(default),
                                   f"a {type(default).__name__}")
            problems.append(f"{name} = {value!r}: must be {kind}, like its default {default!r}")
    for check in CROSS_CHECKS:
        problems.extend(check(tree))
    return problems


def validate_config(config, *, source: str = "the config", reference=None,
                    fix: str = "Fix them in the config file, or override them with --config.<field>=VALUE.",
                    extra_checks: Iterable[Callable[[Mapping], list[str]]] = ()) -> None:
    """ConfigError listing every bad field of `config` (see `config_problems`), naming `source`.

    fix: the last line of the message, saying how to correct the values.
    extra_checks: more rules like CROSS_CHECKS (config as a nested dict -> messages) that only this
      caller applies, e.g. a launcher's check that a path exists.
    """
    problems = config_problems(config, reference)
    tree = _as_dict(config)
    for check in extra_checks:
        problems.extend(check(tree))
    if problems:
        raise ConfigError(f"{source}: {len(problems)} invalid value(s):\n  " + "\n  ".join(problems) + "\n" + fix)


def unknown_field_problem(config, name: str, *, source: str = "the config",
                          others: Mapping | None = None) -> str | None:
    """Why the dotted field `name` (e.g. "train.bogus") cannot be set in `config`, or None when it can.

    The message names the field and `source`, suggests the close names of its section (difflib),
    and, from `others` ({source: config} of other configs, e.g. the shipped ones), says which
    configs have the field.
    """
    node: Any = _as_dict(config)
    parts = name.split(".")
    for depth, part in enumerate(parts):
        section = ".".join(parts[:depth])
        if not isinstance(node, Mapping):
            return (f"{source}: {section} is a value ({node!r}), not a section with fields; "
                    f"override it as --config.{section}=VALUE")
        if part not in node:
            break
        node = node[part]
    else:
        return None
    missing = ".".join(parts[:depth + 1])
    prefix = section + "." if section else ""
    names = sorted(str(key) for key in node)
    message = f"{source} has no field {missing}"
    close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
    if close:
        message += "; did you mean " + " or ".join(prefix + c for c in close) + "?"
    else:
        message += f" ({'section ' + section if section else 'the config'} has: {', '.join(names)})"
    having = [other for other, other_config in (others or {}).items()
              if other != source and unknown_field_problem(other_config, missing) is None]
    if having:
        message += (f". {missing} is a field of {', '.join(having)}: start from "
                    f"{'that config' if len(having) == 1 else 'one of them'} (--config={having[0]}), "
                    "or add the field to yours")
    return message
