"""The phases of a run: cross-entropy, then optionally encoder fine-tuning and self-critical training,
in one step counter.

    config.phases = "xe,finetune,scst"   # default "xe": config.train alone
    config.train                  # the xe phase: steps, learning-rate schedule, batch
    config.finetune               # the finetune phase (configs/finetune.py): the encoder trains too, from images
    config.scst                   # the scst phase (configs/scst.py): its own steps, schedule, batch, knobs

Each phase's `steps` are its own; the global step counts on across phases, so
with train.steps = 3500 and scst.steps = 1000 the scst phase runs global steps
3500..4499. Every phase starts a new optimizer (Adam restarted, its schedule
from the phase's step 0) and its own input stream. A checkpoint saved at a
phase's last step is where the next phase starts: resuming from it restores the
weights (and step, weight average, dropout RNG) but not the finished phase's
optimizer.

Which data a phase reads: feature_cache.data_dir_for(config, phase.name) (the features cache, if
configured, until a finetune phase begins; the image records from then on).
"""

from __future__ import annotations

import dataclasses

from showtell_dist.config_fields import PHASE_SECTIONS as SECTIONS  # phase name -> its config section
from showtell_dist.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    index: int
    start: int  # the global step at which it begins
    end: int  # the global step at which it has finished (exclusive)
    section: object  # its ConfigDict

    @property
    def steps(self) -> int:
        return self.end - self.start


def phases_of(config) -> list[Phase]:
    """The run's phases in order, with their global step ranges."""
    spec = config.get("phases", "xe") or "xe"
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise ConfigError(f"config.phases={spec!r}: unknown phase(s) {unknown}; use a comma-separated list of "
                          f"{', '.join(SECTIONS)}, e.g. 'xe,scst'.")
    if len(set(names)) != len(names):
        raise ConfigError(f"config.phases={spec!r} names a phase twice; each phase has one config section.")
    phases, start = [], 0
    for index, name in enumerate(names):
        section = config.get(SECTIONS[name], None)
        if section is None:
            raise ConfigError(f"config.phases={spec!r} has a {name} phase but the config has no "
                              f"`{SECTIONS[name]}` section; add one" +
                              (f" (e.g. configs/{name}.py: c.{name} = {name}.section())." if name != "xe" else "."))
        steps = int(section.steps)
        if steps < 1:
            raise ConfigError(f"{SECTIONS[name]}.steps={steps}: a phase needs at least one step.")
        phases.append(Phase(name, index, start, start + steps, section))
        start += steps
    return phases


def total_steps(config) -> int:
    """The run's last global step: the sum of its phases' steps."""
    return phases_of(config)[-1].end


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that runs global step `step` (the last phase once the run has finished)."""
    return next((p for p in phases if step < p.end), phases[-1])
