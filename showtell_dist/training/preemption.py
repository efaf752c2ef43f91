"""SIGTERM (preemption) -> a stop every worker agrees on, checked between host calls.

A preempted VM's SIGTERM reaches one process. Under MultiWorkerMirrored, if
that worker alone saved and left, the others would block in their next
collective and the job would hang. So at every host-loop boundary the workers
all-reduce their flags (`stop_requested`): when any worker got SIGTERM, all of
them save the same step and stop. Single-process strategies (default,
mirrored, TPU: one client drives every host) need no agreement.
"""

from __future__ import annotations

import signal
import threading

import tensorflow as tf


class PreemptionWatcher:
    """Context manager: while active, SIGTERM sets `requested` instead of killing.

    The loop asks `stop_requested()` at each boundary (on every worker at the
    same one), saves a checkpoint and returns; the previous handler is restored
    on exit. Only the main thread can install handlers, so elsewhere the
    watcher is inert.
    """

    def __init__(self, strategy: tf.distribute.Strategy | None = None):
        self.requested = False
        self._previous = None
        self._strategy = strategy
        self._any_worker = None
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            self._any_worker = tf.function(self._count_requests)

    def _count_requests(self, flag):
        """Flags summed over every replica of every worker (a collective all workers enter)."""
        per_replica = self._strategy.run(lambda: tf.identity(flag))
        return self._strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def stop_requested(self) -> bool:
        """True when this or any other worker got SIGTERM. Under MultiWorkerMirrored every worker
        must call it at the same boundary (it is a collective)."""
        if self._any_worker is None:
            return self.requested
        return float(self._any_worker(tf.constant(1.0 if self.requested else 0.0))) > 0

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
