"""One decoder step for an ensemble: the members' log-probabilities averaged at every step.

    step, state = ensemble_step([m.decode_step for m in models], [m.initial_state(f) for m, f in ...])
    beam_search(step, state, ...)     # the state is the tuple of each member's state, e.g. ((h, c), (h, c))

The averaged log-probabilities are returned as the step's logits: the
decoders' softmax renormalises them over the allowed vocabulary (exp of the
average is a normalised geometric mean of the members' distributions). One
member is that member's step unchanged, so an ensemble of one decodes exactly
as the model alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf

from showtell_dist.decoding.beam_search import StepFn
from showtell_dist.errors import ConfigError


def ensemble_step(step_fns: Sequence[StepFn], initial_states: Sequence[Any]) -> tuple[StepFn, Any]:
    """(step_fn, initial_state) that decode the members of `step_fns` together."""
    step_fns, initial_states = list(step_fns), list(initial_states)
    if not step_fns or len(step_fns) != len(initial_states):
        raise ConfigError(f"an ensemble needs one initial state per member and at least one member; got "
                          f"{len(step_fns)} step functions and {len(initial_states)} states.")
    if len(step_fns) == 1:
        return step_fns[0], initial_states[0]

    def step(tokens, states):
        outputs = [fn(tokens, s) for fn, s in zip(step_fns, states)]  # [(logits [rows, vocab], state), ...]
        log_probs = [tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1) for logits, _ in outputs]
        return tf.add_n(log_probs) / float(len(log_probs)), tuple(s for _, s in outputs)

    return step, tuple(initial_states)
