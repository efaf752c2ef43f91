"""Config validation: every bad value named in one message, exit 2 from the launchers before any work."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import demo, flickr8k_inception, flickr8k_mobilenet
from showtell_dist import config_fields, config_validation
from showtell_dist.config_validation import Int, config_problems, register_field, validate_config
from showtell_dist.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [demo, flickr8k_mobilenet, flickr8k_inception])
def test_shipped_configs_validate(module):
    assert config_problems(module.get_config(), reference=demo.get_config()) == []


def _with(name, value):
    config = demo.get_config().to_dict()
    section, _, field = name.rpartition(".")
    node = config
    for part in section.split("."):
        node = node[part]
    node[field] = value
    return config


@pytest.mark.parametrize("name, value, message", [
    ("train.steps", -5, "train.steps = -5: must be an integer >= 1"),
    ("train.steps", 0, "train.steps = 0: must be an integer >= 1"),
    ("train.global_batch_size", 0, "train.global_batch_size = 0: must be an integer >= 1"),
    ("train.steps", "100", "train.steps = '100': must be an integer >= 1"),
    ("train.steps", True, "train.steps = True: must be an integer"),
    ("train.learning_rate", 0.0, "train.learning_rate = 0.0: must be a number > 0"),
    ("train.learning_rate", float("nan"), "train.learning_rate = nan: must be a number > 0"),
    ("train.final_lr_ratio", 1.5, "must be a number >= 0 and <= 1"),
    ("train.clip_norm", -1.0, "train.clip_norm = -1.0: must be a number >= 0"),
    ("train.seed", -1, "train.seed = -1: must be an integer in [0, 4294967295]"),
    ("train.checkpoint_every", -1, "must be 0 (only at the end) or an integer >= 1"),
    ("train.eval_every", -10, "must be 0 (never) or an integer >= 1"),
    ("train.mixed_precision", "float16", "train.mixed_precision = 'float16': must be one of ''"),
    ("train.weight_average_decay", 1.0, "must be 0 (no moving average) or a number > 0 and < 1"),
    ("train.jit_compile", "yes", "train.jit_compile = 'yes': must be True or False"),
    ("model.dropout", 1.0, "model.dropout = 1.0: must be a number >= 0 and < 1"),
    ("model.units", 0, "model.units = 0: must be an integer >= 1"),
    ("model.encoder", "resnet", "model.encoder = 'resnet': must be one of 'small_cnn'"),
    ("model.feature_norm", "group", "must be one of 'batch', 'layer', 'none'"),
    ("model.image_size", -1, "model.image_size = -1: must be 0 (the encoder's own size) or an integer >= 1"),
    ("model.image_size", 8, "model.image_size = 8: the small_cnn encoder needs images of at least 16 pixels"),
    ("data.layout", "csv", "data.layout = 'csv': must be one of 'auto', 'tutorial'"),
    ("data.records_dir", "", "data.records_dir = '': must be a non-empty string"),
    ("data.images_per_shard", 0, "must be an integer >= 1"),
    ("data.shuffle_buffer", 0, "data.shuffle_buffer = 0: must be an integer >= 1"),
    ("data.synthetic.num_train", 0, "data.synthetic.num_train = 0: must be an integer >= 1"),
    ("tokenizer.min_count", 0, "tokenizer.min_count = 0: must be an integer >= 1"),
    ("tokenizer.vocab_size", 3, "must be 0 (no cap) or an integer >= 5"),
    ("tokenizer.max_len", 2, "must be 0 (the length covering 99.9% of train captions) or an integer >= 3"),
    ("train.summary_images", -1, "train.summary_images = -1: must be 0 (off) or an integer >= 1"),
    ("eval.beam_width", 0, "eval.beam_width = 0: must be an integer >= 1"),
    ("eval.length_normalization", "sum", "must be one of 'none', 'average', 'gnmt'"),
    ("eval.alpha", -0.5, "eval.alpha = -0.5: must be a number >= 0"),
    ("eval.select_metric", "METEOR", "eval.select_metric = 'METEOR': must be one of"),
    ("demo.num_examples", -1, "demo.num_examples = -1: must be an integer >= 0"),
    ("data.caption_buckets", -1, "must be 0 (pad every batch to max_len) or an integer >= 1"),
    ("eval.block_trigrams", 1, "eval.block_trigrams = 1: must be True or False"),
])
def test_each_bad_value_is_named_with_what_it_must_be(name, value, message):
    problems = config_problems(_with(name, value), reference=demo.get_config())
    assert len(problems) == 1 and message in problems[0], problems


def test_every_problem_is_listed_in_one_config_error():
    config = _with("train.steps", -5)
    config["train"]["global_batch_size"] = 0
    config["model"]["encoder"], config["model"]["image_size"] = "inception_v3", 64
    with pytest.raises(ConfigError) as info:
        validate_config(config, source="my.py")
    text = str(info.value)
    assert text.startswith("my.py: 3 invalid value(s):")
    assert "train.steps = -5" in text and "train.global_batch_size = 0" in text
    assert "model.image_size = 64: the inception_v3 encoder needs images of at least 75 pixels" in text
    assert "--config.<field>=VALUE" in text


def test_fields_without_a_rule_take_the_type_of_the_reference_default():
    reference = demo.get_config()
    reference.distill = ml_collections.ConfigDict({"steps": 100, "learning_rate": 1e-3, "name": "x"})
    reference.init_checkpoint = ""
    config = reference.to_dict()
    assert config_problems(config, reference) == []
    config["distill"] = {"steps": "many", "learning_rate": 1, "name": "y"}  # an int passes for a float
    config["init_checkpoint"] = 5
    assert config_problems(config, reference) == [
        "distill.steps = 'many': must be an integer, like its default 100",
        "init_checkpoint = 5: must be a string, like its default ''"]
    assert config_problems(config) == []  # no reference: only the registered rules


def test_phases_and_the_self_critical_section():
    from configs import scst

    config = demo.get_config().to_dict()
    config["phases"] = "xe,scst"
    assert config_problems(config) == [
        "phases = 'xe,scst': the scst phase needs a `scst` section, which the config lacks "
        "(add one: c.scst = configs.scst.section())"]
    config["scst"] = scst.section().to_dict()
    assert config_problems(config) == []
    config["phases"] = "xe,rl"
    config["scst"].update(samples_per_image=1, temperature=0.0, baseline="max")
    assert config_problems(config) == [
        "phases = 'xe,rl': must be a comma-separated list of 'xe', 'finetune', 'scst', e.g. 'xe,scst'",
        "scst.baseline = 'max': must be one of 'mean', 'greedy'",
        "scst.temperature = 0.0: must be a number > 0"]
    config["phases"], config["scst"]["baseline"], config["scst"]["temperature"] = "xe,scst", "mean", 1.0
    assert config_problems(config) == [
        "scst.samples_per_image = 1: the 'mean' baseline needs at least 2 samples per image (each is baselined "
        "by the others); use 5, or scst.baseline='greedy'"]


def test_registered_rule_and_missing_sections_of_older_runs():
    assert config_problems({"model": {"units": 8}}) == []  # absent fields are not checked
    try:
        register_field("finetune.num_layers", Int(min=1))
        assert config_problems({"finetune": {"num_layers": 0}}) == ["finetune.num_layers = 0: must be an integer >= 1"]
    finally:
        del config_validation.FIELDS["finetune.num_layers"]


def test_the_library_takes_its_choices_from_config_fields():
    from showtell_dist.data.layouts import LAYOUTS
    from showtell_dist.decoding.options import LENGTH_NORMALIZATIONS
    from showtell_dist.distribute.precision import REQUESTS
    from showtell_dist.distribute.strategy import STRATEGIES
    from showtell_dist.model import efficientnet_lite
    from showtell_dist.model.encoders import IMAGE_SIZES
    from showtell_dist.model.show_and_tell import FEATURE_NORMS
    from showtell_dist.run.run_dir import SELECTABLE_METRICS
    from showtell_dist.training.phases import SECTIONS
    from showtell_dist.training.self_critical import BASELINES

    assert IMAGE_SIZES is config_fields.ENCODER_IMAGE_SIZES
    assert IMAGE_SIZES["efficientnet_lite2"] == efficientnet_lite.VARIANTS["lite2"].resolution
    assert set(config_fields.ENCODER_MIN_IMAGE_SIZES) == set(IMAGE_SIZES)
    assert LAYOUTS is config_fields.LAYOUTS and config_fields.LAYOUT_CHOICES == ("auto",) + LAYOUTS
    assert FEATURE_NORMS is config_fields.FEATURE_NORMS
    assert REQUESTS is config_fields.MIXED_PRECISION_CHOICES
    assert SELECTABLE_METRICS is config_fields.SELECTABLE_METRICS
    assert SECTIONS is config_fields.PHASE_SECTIONS
    assert BASELINES is config_fields.SCST_BASELINES
    assert STRATEGIES is config_fields.STRATEGIES
    assert LENGTH_NORMALIZATIONS is config_fields.LENGTH_NORMALIZATIONS


def test_check_positive_names_the_argument():
    assert config_fields.check_positive("batch_size", 3) == 3
    assert config_fields.check_positive("max_images", None, allow_none=True) is None
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ConfigError, match=rf"^batch_size={bad!r} must be a positive integer\.$"):
            config_fields.check_positive("batch_size", bad)


def test_a_hand_edited_run_config_is_refused_when_loaded(tmp_path):
    from showtell_dist.run.restore import load_trained_model

    (tmp_path / "config.json").write_text(json.dumps(_with("eval.beam_width", -1)))
    with pytest.raises(ConfigError, match=r"(?s)config.json: 1 invalid value.*eval.beam_width = -1.*Restore the"):
        load_trained_model(str(tmp_path))


def _launch(script, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_launchers_exit_2_with_every_bad_value_before_any_work(tmp_path):
    records = str(tmp_path / "records")
    train = _launch("train.py", "--config.train.steps=-5", "--config.train.global_batch_size=0",
                    "--config.model.dropout=1.5", "--config.eval.length_normalization=sum",
                    f"--config.data.records_dir={records}", f"--model_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert train.returncode == 2, train.stderr[-3000:]
    for message in ("4 invalid value(s)", "train.steps = -5: must be an integer >= 1",
                    "train.global_batch_size = 0: must be an integer >= 1",
                    "model.dropout = 1.5", "eval.length_normalization = 'sum'"):
        assert message in train.stderr
    assert "Traceback" not in train.stderr
    assert not os.path.exists(records) and not os.path.exists(tmp_path / "run")  # nothing was done

    cache = _launch("cache_features.py", f"--config={os.path.join(REPO, 'configs', 'demo.py')}",
                    "--config.data.images_per_shard=0", f"--config.data.records_dir={records}",
                    f"--output_dir={tmp_path / 'features'}", cwd=tmp_path)
    assert cache.returncode == 2, cache.stderr[-3000:]
    assert "data.images_per_shard = 0: must be an integer >= 1" in cache.stderr
    assert not os.path.exists(records) and not os.path.exists(tmp_path / "features")


# --- mistakes a new user makes (issue 15): one clear message and exit 2, before any work ---


def test_an_unknown_field_is_named_with_the_close_names_and_the_configs_that_have_it():
    from configs import flickr8k_mobilenet_scst

    config = demo.get_config()
    assert config_validation.unknown_field_problem(config, "train.steps") is None
    assert config_validation.unknown_field_problem(config, "train.stpes", source="configs/demo.py") == (
        "configs/demo.py has no field train.stpes; did you mean train.steps?")
    bogus = config_validation.unknown_field_problem(config, "train.bogus", source="configs/demo.py")
    assert bogus.startswith("configs/demo.py has no field train.bogus (section train has: checkpoint_every, ")
    assert config_validation.unknown_field_problem(config, "train.steps.x") == (
        "the config: train.steps is a value (3500), not a section with fields; override it as "
        "--config.train.steps=VALUE")
    others = {"configs/demo.py": config, "configs/flickr8k_mobilenet_scst.py": flickr8k_mobilenet_scst.get_config()}
    for name, missing in (("phases", "phases"), ("init_checkpoint", "init_checkpoint"), ("scst.steps", "scst")):
        message = config_validation.unknown_field_problem(config, name, source="configs/demo.py", others=others)
        assert message.startswith(f"configs/demo.py has no field {missing} (the config has: data, demo, eval, ")
        assert message.endswith(f". {missing} is a field of configs/flickr8k_mobilenet_scst.py: start from that "
                                "config (--config=configs/flickr8k_mobilenet_scst.py), or add the field to yours")


@pytest.mark.parametrize("phases, init_checkpoint, fix", [
    ("scst,xe", "", "--config.phases=xe,scst"),
    ("scst", "", "--config.phases=xe,scst"),
    ("finetune,scst", "", "--config.phases=xe,finetune,scst"),
    ("scst", "runs/x/best", None),
    ("xe,finetune,scst", "", None),
])
def test_a_phase_that_continues_from_trained_weights_needs_an_xe_phase_or_init_checkpoint(phases, init_checkpoint,
                                                                                           fix):
    from configs import finetune, flickr8k_mobilenet_scst

    config = flickr8k_mobilenet_scst.get_config()
    config.finetune = finetune.section()
    config.phases, config.init_checkpoint = phases, init_checkpoint
    problems = config_problems(config, reference=demo.get_config())
    if fix is None:
        assert problems == []
        return
    first = phases.split(",")[0]
    assert problems == [
        f"phases = {phases!r}: the {first} phase would start from random weights (no xe phase before it and no "
        f"init_checkpoint); put an xe phase first ({fix}), or start from a trained run's weights "
        "(--config.init_checkpoint=runs/<run>/best, a checkpoint prefix, or a run directory)"]


def test_checkpoint_at_takes_a_prefix_a_directory_of_checkpoints_or_a_run_directory(tmp_path):
    import tensorflow as tf

    from showtell_dist.run.run_dir import checkpoint_at

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(demo.get_config().to_dict()))
    prefix = tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(run / "checkpoints" / "ckpt"))  # .../ckpt-1
    assert checkpoint_at(prefix) == prefix
    assert checkpoint_at(str(run / "checkpoints")) == prefix
    assert checkpoint_at(str(run) + "/") == prefix  # a run without a selection: its latest
    (tmp_path / "empty").mkdir()
    for path in ("/nonexistent/ckpt", str(tmp_path / "empty")):
        with pytest.raises(ConfigError) as info:
            checkpoint_at(path)
        assert str(info.value).startswith(f"'{path}' is neither a checkpoint prefix (no {path}.index), a run "
                                          "directory (no config.json) nor a directory holding checkpoints")


def _refused_before_any_work(result, *messages):
    assert result.returncode == 2, result.stderr[-3000:]
    for message in messages:
        assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_launchers_refuse_an_unknown_config_field_with_exit_2(tmp_path):
    records, run = str(tmp_path / "records"), str(tmp_path / "run")
    # The default config: its overrides are applied when the flag is defined.
    typo = _launch("train.py", "--config.train.bogus=1", "--config.train.stpes=5", f"--model_dir={run}",
                   cwd=tmp_path)
    _refused_before_any_work(typo, "error: --config.train.bogus=1: configs/demo.py has no field train.bogus "
                             "(section train has: checkpoint_every, clip_norm,",
                             "--config.train.stpes=5: configs/demo.py has no field train.stpes; did you mean "
                             "train.steps?")
    # A --config given: its overrides are applied when the flags are parsed.
    phases = _launch("train.py", f"--config={os.path.join(REPO, 'configs', 'demo.py')}", "--config.phases=xe,scst",
                     f"--config.data.records_dir={records}", f"--model_dir={run}", cwd=tmp_path)
    _refused_before_any_work(phases, "error: --config.phases=xe,scst: configs/demo.py has no field phases",
                             "phases is a field of configs/flickr8k_lite2_scst.py, configs/flickr8k_mobilenet_finetune.py, "
                             "configs/flickr8k_mobilenet_scst.py: "
                             "start from one of them (--config=configs/flickr8k_lite2_scst.py)")
    cache = _launch("cache_features.py", f"--config={os.path.join(REPO, 'configs', 'demo.py')}",
                    "--config.init_checkpoint=runs/x", f"--config.data.records_dir={records}",
                    f"--output_dir={tmp_path / 'features'}", cwd=tmp_path)
    _refused_before_any_work(cache, "error: --config.init_checkpoint=runs/x: configs/demo.py has no field "
                             "init_checkpoint", "init_checkpoint is a field of configs/flickr8k_lite2_scst.py, "
                             "configs/flickr8k_mobilenet_finetune.py, configs/flickr8k_mobilenet_scst.py")
    assert not os.listdir(tmp_path)  # no records, run or features directory


def _scst_recipe(tmp_path, *overrides):
    return _launch("train.py", f"--config={os.path.join(REPO, 'configs', 'flickr8k_mobilenet_scst.py')}",
                   f"--config.data.records_dir={tmp_path / 'records'}",
                   f"--config.data.features_dir={tmp_path / 'features'}", *overrides,
                   f"--model_dir={tmp_path / 'run'}", cwd=tmp_path)


def test_self_critical_training_from_random_weights_is_refused_with_exit_2(tmp_path):
    result = _scst_recipe(tmp_path, "--config.phases=scst,xe")
    _refused_before_any_work(result, "phases = 'scst,xe': the scst phase would start from random weights",
                             "--config.phases=xe,scst", "--config.init_checkpoint=runs/<run>/best")
    assert not os.listdir(tmp_path)


def test_a_wrong_init_checkpoint_is_refused_with_exit_2_before_records_are_prepared(tmp_path):
    result = _scst_recipe(tmp_path, "--config.phases=scst", "--config.init_checkpoint=/nonexistent/ckpt")
    _refused_before_any_work(result, "init_checkpoint = '/nonexistent/ckpt': '/nonexistent/ckpt' is neither a "
                             "checkpoint prefix (no /nonexistent/ckpt.index), a run directory")
    assert "phases =" not in result.stderr  # init_checkpoint is set: scst may come first (a path may hold "phases")
    assert not os.listdir(tmp_path)


def test_a_config_file_that_does_not_exist_is_refused_with_exit_2(tmp_path):
    result = _launch("train.py", "--config=configs/demos.py", "--config.train.steps=5",
                     f"--model_dir={tmp_path / 'run'}", cwd=tmp_path)
    _refused_before_any_work(result, f"error: --config=configs/demos.py: no such config file "
                             f"({tmp_path / 'configs' / 'demos.py'}); pass one of configs/demo.py, ",
                             f"configs/flickr8k_mobilenet_scst.py (in {REPO}), or a file of your own")
    assert not os.listdir(tmp_path)
