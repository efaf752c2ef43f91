"""A phase's learning-rate schedule: its length apart from the phase's steps, and a hold before a decay
over the schedule's last part; the defaults give the schedule every phase had before."""

import math

import keras
import ml_collections
import numpy as np
import pytest

from configs import scst
from showtell_dist.errors import ConfigError
from showtell_dist.training.optimizer import build_optimizer, learning_rate_schedule, schedule_of


def _section(**fields):
    s = ml_collections.ConfigDict({"steps": 3500, "learning_rate": 1e-3, "warmup_steps": 200,
                                   "final_lr_ratio": 0.05, "clip_norm": 5.0})
    for k, v in fields.items():
        setattr(s, k, v)
    return s


def _rates(schedule, steps):
    return np.array([float(schedule(step)) for step in steps])


STEPS = [0, 100, 200, 1000, 2000, 3000, 3499, 3500]


def test_defaults_are_the_cosine_schedule_as_long_as_the_phase():
    before = learning_rate_schedule(1e-3, 200, 3500, 0.05)  # what build_optimizer used for every phase
    assert isinstance(before, keras.optimizers.schedules.CosineDecay)
    for section in (_section(), _section(schedule_steps=0, decay_fraction=1.0)):
        np.testing.assert_array_equal(_rates(schedule_of(section), STEPS), _rates(before, STEPS))
    assert float(before(3500)) == pytest.approx(0.05e-3)


def test_a_phase_stopped_early_keeps_the_longer_schedule_unsqueezed():
    """train.steps=3500 with schedule_steps=6000 runs at a 6000-step phase's rates; plain 3500 decays faster."""
    stopped = _rates(schedule_of(_section(schedule_steps=6000)), [2000, 3000, 3500])
    full = _rates(schedule_of(_section(steps=6000)), [2000, 3000, 3500])
    squeezed = _rates(schedule_of(_section()), [2000, 3000, 3500])
    np.testing.assert_allclose(stopped, full, rtol=1e-6)
    # the figures (flickr8k_mobilenet.py's peak 1e-3, warm-up 200, final ratio 0.05)
    np.testing.assert_allclose(stopped, [7.9e-4, 5.5e-4, 4.2e-4], rtol=0.02)
    np.testing.assert_allclose(squeezed, [4.6e-4, 1.0e-4, 0.5e-4], rtol=0.03)
    assert stopped[-1] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 3300 / 5800))),
                                        rel=1e-5)
    optimizer = build_optimizer(_section(schedule_steps=6000), None)
    optimizer.iterations.assign(3500)
    assert float(optimizer.learning_rate) == pytest.approx(stopped[-1], rel=1e-6)


def test_warm_up_hold_and_a_decay_over_the_last_third():
    section = scst.section(steps=1300, learning_rate=1e-4, warmup_steps=100, final_lr_ratio=0.1,
                           decay_fraction=1 / 3)
    schedule = schedule_of(section)
    # warm-up 0..100, hold 100..900, cosine 900..1300 (a third of the 1200 steps after warm-up)
    assert _rates(schedule, [0, 50, 100]) == pytest.approx([0.0, 0.5e-4, 1e-4])
    np.testing.assert_allclose(_rates(schedule, [100, 500, 900]), 1e-4, rtol=1e-6)
    assert float(schedule(1100)) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5), rel=1e-5)
    assert float(schedule(1300)) == pytest.approx(1e-5, rel=1e-5)
    assert float(schedule(2000)) == pytest.approx(1e-5, rel=1e-5)  # the final rate after the schedule
    decay = _rates(schedule, range(900, 1301, 50))
    assert (np.diff(decay) < 0).all()


def test_the_default_scst_section_keeps_its_constant_rate():
    schedule = schedule_of(scst.section())
    np.testing.assert_allclose(_rates(schedule, [0, 500, 999, 1000]), scst.section().learning_rate, rtol=1e-6)


@pytest.mark.parametrize("fields,match", [
    ({"schedule_steps": 3000}, "schedule_steps=3000 is shorter than the phase's steps=3500"),
    ({"decay_fraction": 0.0}, r"decay_fraction=0.0 must be in \(0, 1\]"),
    ({"decay_fraction": 1.5}, r"decay_fraction=1.5 must be in \(0, 1\]"),
])
def test_a_schedule_that_cannot_work_is_refused_with_the_fix(fields, match):
    with pytest.raises(ConfigError, match=match):
        schedule_of(_section(**fields))


def test_config_validation_names_the_schedule_fields():
    from showtell_dist.config_validation import config_problems

    config = {"train": {"steps": 3500, "schedule_steps": 3000, "decay_fraction": 0.0},
              "scst": {"steps": 100, "schedule_steps": 0, "decay_fraction": 1 / 3, "reward_end_token": "yes"}}
    problems = config_problems(config)
    assert any(p.startswith("train.schedule_steps = 3000: shorter than train.steps = 3500") for p in problems)
    assert any(p.startswith("train.decay_fraction = 0.0: must be") for p in problems)
    assert any(p.startswith("scst.reward_end_token = 'yes': must be True or False") for p in problems)
    assert len(problems) == 3, problems
