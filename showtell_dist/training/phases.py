"""The phases of a run, as kinds in one registry (`KINDS`), in one step counter.

    config.phases = "xe,finetune,scst"   # default "xe": config.train alone

Each kind names its config section, builds its trainer, and says whether it
trains the encoder and whether teacher forcing runs over caption buckets:

    xe        config.train      cross-entropy (trainer.Trainer)
    finetune  config.finetune   cross-entropy with the encoder trained too, from images
                                (trainer.FineTuneTrainer; configs/finetune.py)
    scst      config.scst       self-critical training, reward CIDEr-D
                                (self_critical.SelfCriticalTrainer; configs/scst.py)

Adding a phase is one module (its Trainer subclass, with its config section in
configs/) plus one entry in `KINDS`, whose name and config section also go in
config_fields.PHASE_SECTIONS: config validation runs before TensorFlow is
imported, below training/ in the import layers, so it reads the names there
(tests/test_phases.py fails until both agree). Nothing else names a phase.

Each phase's `steps` are its own; the global step counts on across phases, so
with train.steps = 3500 and scst.steps = 1000 the scst phase runs global steps
3500..4499. Every phase starts a new optimizer (Adam restarted, its schedule
from the phase's step 0) and its own input stream. A checkpoint saved at a
phase's last step is where the next phase starts: resuming from it restores the
weights (and step, weight average, dropout RNG) but not the finished phase's
optimizer.

Which data a phase reads (`data_dir_for`): the features cache, if configured,
until a phase that trains the encoder begins; the image records in such a
phase; and in the phases after it the features re-cached with the fine-tuned
encoder into the run directory (`recache_dir`), so that they train from
features again. The run's checkpoints are evaluated afterwards from the image
records: the selected one may come from before the re-cache.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from showtell_dist.config_fields import PHASE_SECTIONS as SECTIONS  # phase name -> its config section
from showtell_dist.data import feature_cache
from showtell_dist.data.dataset_dir import is_prepared, load_manifest, manifest_kind
from showtell_dist.errors import ConfigError
from showtell_dist.run.run_dir import RunDir
from showtell_dist.training.self_critical import build_self_critical_trainer
from showtell_dist.training.trainer import FineTuneTrainer, Trainer


@dataclasses.dataclass(frozen=True)
class TrainerSetup:
    """What a kind's trainer factory gets: the run's model, step and options, and the phase's section."""

    strategy: object
    model: object
    section: object  # the phase's ConfigDict
    config: object  # the whole experiment config
    manifest: dict  # of the data the run reads (its max_len)
    options: dict  # keyword arguments of every trainer: mixed_precision, jit_compile, run_state, seed
    log: Callable[[str], None] = print


@dataclasses.dataclass(frozen=True)
class PhaseKind:
    name: str  # as written in config.phases
    description: str
    build_trainer: Callable[[TrainerSetup], Trainer]
    trains_encoder: bool = False  # cached features are stale from its start on
    caption_buckets: bool = True  # teacher forcing over each batch's caption bucket, else the static max_len
    details: Callable[[object], str] = lambda section: ""  # what the phase's log line adds, from its section

    @property
    def section(self) -> str:
        """Its config section: config_fields.PHASE_SECTIONS[name], where the TF-free validation reads it."""
        return SECTIONS[self.name]


def _cross_entropy(setup: TrainerSetup) -> Trainer:
    return Trainer(setup.strategy, setup.model, setup.section, **setup.options)


def _fine_tune(setup: TrainerSetup) -> Trainer:
    return FineTuneTrainer(setup.strategy, setup.model, setup.section, **setup.options)


def _self_critical(setup: TrainerSetup) -> Trainer:
    # The train split's references: the reward of the dataset the run trains from (records or features).
    reward_dir = feature_cache.data_dir_of(setup.config)
    return build_self_critical_trainer(setup.strategy, setup.model, setup.section, reward_dir,
                                       load_manifest(reward_dir), setup.log, **setup.options)


KINDS: dict[str, PhaseKind] = {kind.name: kind for kind in (
    PhaseKind("xe", "cross-entropy (teacher forcing)", _cross_entropy),
    PhaseKind("finetune", "cross-entropy with the encoder fine-tuned, from images", _fine_tune,
              trains_encoder=True,
              details=lambda s: (f"; the encoder trains too, at learning rate {s.encoder_learning_rate:g} "
                                 "(BatchNorm statistics frozen), from the image records")),
    PhaseKind("scst", "self-critical sequence training, reward CIDEr-D", _self_critical,
              caption_buckets=False,  # the reward takes the references at the static max_len
              details=lambda s: (f"; {s.samples_per_image} samples per image up to {s.max_len} tokens, baseline "
                                 f"{s.baseline}, temperature {s.temperature:g}, dropout "
                                 f"{'on' if s.dropout else 'off'}, xe_weight {s.xe_weight:g}")),
)}
DEFAULT = next(iter(KINDS))  # the phase of a config without `phases`


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

    @property
    def kind(self) -> PhaseKind:
        return KINDS[self.name]

    def describe(self, num_phases: int) -> str:
        s = self.section
        return (f"phase {self.index + 1}/{num_phases} '{self.name}': global steps {self.start}..{self.end} "
                f"({self.steps} steps of {s.global_batch_size} images), learning rate {s.learning_rate:g} "
                f"(warm-up {s.warmup_steps}, final ratio {s.final_lr_ratio:g}), new optimizer"
                + self.kind.details(s))


def kinds_of(config) -> list[PhaseKind]:
    """The kinds named in config.phases, in order."""
    spec = config.get("phases", DEFAULT) or DEFAULT
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names:
        raise ConfigError(f"config.phases={spec!r}: unknown phase(s) {unknown}; use a comma-separated list of "
                          f"{', '.join(KINDS)}, e.g. 'xe,scst'.")
    if len(set(names)) != len(names):
        raise ConfigError(f"config.phases={spec!r} names a phase twice; each phase has one config section.")
    return [KINDS[n] for n in names]


def phases_of(config) -> list[Phase]:
    """The run's phases in order, with their global step ranges."""
    phases, start = [], 0
    for index, kind in enumerate(kinds_of(config)):
        section = config.get(kind.section, None)
        if section is None:
            raise ConfigError(f"config.phases={config.phases!r} has a {kind.name} phase but the config has no "
                              f"`{kind.section}` section; add one" +
                              (f" (e.g. configs/{kind.name}.py: c.{kind.name} = {kind.name}.section())."
                               if kind.section == kind.name else "."))
        steps = int(section.steps)
        if steps < 1:
            raise ConfigError(f"{kind.section}.steps={steps}: a phase needs at least one step.")
        phases.append(Phase(kind.name, index, start, start + steps, section))
        start += steps
    return phases


def total_steps(config) -> int:
    """The run's last global step: the sum of its phases' steps."""
    return phases_of(config)[-1].end


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that runs global step `step` (the last phase once the run has finished)."""
    return next((p for p in phases if step < p.end), phases[-1])


# -- which data a phase reads ------------------------------------------------------------------------------

def recache_dir(model_dir: str, encoder_phase: str) -> str:
    """Where a run keeps the features re-cached with its encoder as `encoder_phase` left it."""
    return RunDir(model_dir).recached_features(encoder_phase)


def recached_after(config, phase: str) -> PhaseKind | None:
    """The kind of the phase whose fine-tuned encoder `phase` reads re-cached features of: the last one
    before it that trains the encoder, when the config has a features cache and `phase` does not train
    the encoder itself; else None."""
    kinds = kinds_of(config)
    names = [k.name for k in kinds]
    if phase not in names or kinds[names.index(phase)].trains_encoder or not feature_cache.features_dir_of(config):
        return None
    return next((k for k in reversed(kinds[:names.index(phase)]) if k.trains_encoder), None)


def data_dir_for(config, phase: str | None = None, model_dir: str | None = None) -> str:
    """The directory a run reads in `phase` (a name in config.phases), or with phase None what
    evaluates the run's checkpoints afterwards.

    data_dir_of(config) (the features cache, when configured) until a phase that trains the encoder has
    begun; from then on the image records, since the cached features are those of the encoder before it
    moved -- except, given the run's model_dir, in a later phase that does not train the encoder: the
    features re-cached with the fine-tuned encoder (recache_dir; train_loop makes them)."""
    kinds = kinds_of(config)
    names = [k.name for k in kinds]
    if phase is not None and phase in names:
        kinds = kinds[:names.index(phase) + 1]
    if not any(k.trains_encoder for k in kinds):
        return feature_cache.data_dir_of(config)
    source = recached_after(config, phase) if phase is not None and model_dir else None
    return recache_dir(model_dir, source.name) if source else config.data.records_dir


def decode_data_dir(configs) -> str:
    """What evaluating the checkpoints of these runs (one, or an ensemble's members) reads: the features
    cache they all read, when it exists; else the image records, where each member runs its own encoder
    (members of different encoders, or a run that fine-tuned its encoder, data_dir_for)."""
    data_dirs = {data_dir_for(config) for config in configs}
    records_dir = configs[0].data.records_dir
    if len(data_dirs) == 1:
        data_dir = data_dirs.pop()
        if data_dir != records_dir and is_prepared(data_dir):
            return data_dir  # the encoder's features, cached: decoding skips the encoder
    return records_dir


def trains_encoder(config) -> bool:
    """Whether a phase of the run moves the encoder (so a features cache of config.model is stale after it)."""
    return any(k.trains_encoder for k in kinds_of(config))


def check_cache_serves_run(config, data_dir: str, manifest: dict) -> None:
    """Raises ConfigError when `data_dir` is a features cache but the run (config) fine-tuned its
    encoder: the cache holds the features of the encoder before it moved. (The run's own re-cache after
    fine-tuning may serve its later checkpoints: decoding checks its fingerprint against the model's encoder.)"""
    fine_tuned = (manifest.get("features") or {}).get("fine_tuned")
    if manifest_kind(manifest) == feature_cache.KIND and trains_encoder(config) and not fine_tuned:
        raise ConfigError(f"{data_dir} is a features cache, but this run fine-tuned its encoder (config.phases="
                          f"{config.get('phases', '')!r}), so the cached features are stale; decode from the image "
                          f"records ({config.data.records_dir}).")
