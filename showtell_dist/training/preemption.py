"""SIGTERM (preemption) -> a flag the training loop checks between host calls."""

from __future__ import annotations

import signal
import threading


class PreemptionWatcher:
    """Context manager: while active, SIGTERM sets `requested` instead of killing.

    The loop saves a checkpoint at its next boundary and returns; the previous
    handler is restored on exit. Only the main thread can install handlers, so
    elsewhere the watcher is inert.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

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
