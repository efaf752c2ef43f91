"""What bounds the caption server's memory and waiting: bytes of request bodies held, and the 503 it answers.

Every POST /caption holds its body's bytes from the moment it is admitted
until it is answered: the whole Content-Length up front when the header gives
it (so a body that would not fit is refused before a byte of it is read), and
chunk by chunk as it arrives otherwise. Together with the bound on queued
images (micro_batcher.py) this bounds what a flood of requests can make the
server hold: at most `max_queued_bytes` of bodies, whatever the number of
clients.
"""

from __future__ import annotations

import math

from showtell_dist.serving.image_checks import Rejected


def retry_after_seconds(wait_s: float) -> int:
    """Retry-After's whole seconds for an expected wait: rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


class Unavailable(Rejected):
    """503: the server will not take this request now; `retry_after_s` goes out as Retry-After."""

    def __init__(self, code: str, message: str, *, retry_after_s: float, limit: str | None = None):
        super().__init__(503, code, message)
        self.retry_after_s = retry_after_seconds(retry_after_s)
        self.limit = limit


class BytesFull(Exception):
    """Holding `adding` more bytes would take the bodies held over `limit`."""

    def __init__(self, held: int, adding: int, limit: int):
        super().__init__(f"{held} bytes held + {adding} > max_queued_bytes={limit}")
        self.held, self.adding, self.limit = held, adding, limit


class HeldBytes:
    """The bytes of request bodies the server holds, bounded by `limit` (None: unbounded)."""

    def __init__(self, limit: int | None):
        if limit is not None and limit < 1:
            raise ValueError(f"max_queued_bytes={limit} must be at least 1 (None: unbounded)")
        self.limit = limit
        self.held = 0

    def hold(self) -> "BodyHold":
        return BodyHold(self)


class BodyHold:
    """One request's share of HeldBytes; `release()` when it is answered."""

    def __init__(self, pool: HeldBytes):
        self._pool = pool
        self.bytes = 0

    def grow_to(self, total: int) -> None:
        """Holds `total` bytes for this request (no-op if it holds that many already); raises BytesFull."""
        extra = total - self.bytes
        if extra <= 0:
            return
        pool = self._pool
        if pool.limit is not None and pool.held + extra > pool.limit:
            raise BytesFull(pool.held, extra, pool.limit)
        pool.held += extra
        self.bytes = total

    def release(self) -> None:
        self._pool.held -= self.bytes
        self.bytes = 0
