"""Micro-batching: images of concurrent requests captioned in one call, as TF Serving's batching does.

    batcher = MicroBatcher(captioner.caption, max_batch_size=32, max_wait_ms=5, max_queued_images=1024)
    await batcher.start()
    results = await batcher.submit([jpeg_a, jpeg_b], deadline=loop.time() + 30)  # from concurrent handlers

A batch opens when an image is queued while one of `num_batch_threads` worker
threads is free. It is closed and captioned on that worker once it holds
`max_batch_size` images, or its first image has waited `max_wait_ms`, or no
other image is queued and nobody else is expected:
  - a request on its way (being read inside `arriving()`) is waited for;
  - with no other batch running and nothing on its way, nothing else is
    waiting: the batch runs at once, so a lone client never pays for batching
    (its next request cannot come before this one is answered);
  - while another batch runs (its clients will be back), the batch waits only
    for a request due at the recent rate, and not past twice the mean time
    between requests.
Images that arrive while the workers are busy queue up and form the next
batch, so under load batches fill without waiting. Two workers (TF Serving's num_batch_threads)
let one batch's sequential beam-search steps overlap another's on a CPU; the
event loop keeps accepting requests meanwhile. A request's images may be
split over consecutive batches; each request gets its own results back in
order.

Backpressure, as TF Serving's `max_enqueued_batches`: a request whose images
would take the queue over `max_queued_images` raises `QueueFull` at once,
before anything is queued. A request whose `deadline` passes while any of
its images is still queued raises `DeadlineExceeded`, and its queued images
leave the queue (images already in a model call finish). A request whose
handler is cancelled (the client went away) leaves the queue the same way.

`UnbatchedCaller` has the same interface and makes one call per request (the
"batching off" baseline), several at once in threads; requests waiting for a
call slot are its queue, bounded and given deadlines in the same way.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import enum
import math
import time
from typing import Any, Callable, Sequence

# run_batch(images) -> one result per image, in order; runs in a worker thread.
RunBatch = Callable[[list[Any]], Sequence[Any]]


class QueueFull(Exception):
    """Queuing the request's images would take the queue over `max_queued_images`."""

    def __init__(self, queued: int, adding: int, limit: int):
        super().__init__(f"{queued} images queued + {adding} > max_queued_images={limit}")
        self.queued, self.adding, self.limit = queued, adding, limit


class DeadlineExceeded(Exception):
    """The request's deadline passed while some of its images were still queued; they left the queue."""


class CallObserver:
    """What a caller reports as it works (the server's metrics implement it); by default nothing."""

    def queue_wait(self, seconds: float, images: int) -> None:
        """`images` images of one request left the queue for a model call after waiting `seconds`."""

    def model_call(self, batch_size: int, seconds: float) -> None:
        """One call of run_batch on `batch_size` images took `seconds`."""


@dataclasses.dataclass
class BatchingStats:
    calls: int = 0
    images: int = 0
    largest_batch: int = 0
    busy_seconds: float = 0.0  # summed over calls (calls on different workers overlap)
    dropped_images: int = 0  # left the queue at their request's deadline or when the client went away

    def record(self, batch_size: int, seconds: float) -> None:
        self.calls += 1
        self.images += batch_size
        self.largest_batch = max(self.largest_batch, batch_size)
        self.busy_seconds += seconds

    def as_dict(self) -> dict:
        return {"calls": self.calls, "images": self.images, "largest_batch": self.largest_batch,
                "mean_batch": round(self.images / self.calls, 2) if self.calls else 0.0,
                "dropped_images": self.dropped_images}


class _State(enum.Enum):
    QUEUED = 1
    TAKEN = 2  # in a batch (running or done)
    DROPPED = 3  # left the queue unanswered (deadline, client gone)


@dataclasses.dataclass(eq=False)
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued_at: float
    state: _State = _State.QUEUED


def _check_queue_limit(max_queued_images: int | None) -> None:
    if max_queued_images is not None and max_queued_images < 1:
        raise ValueError(f"max_queued_images={max_queued_images} must be at least 1 (None: unbounded)")


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 num_batch_threads: int = 2, max_queued_images: int | None = None,
                 observer: CallObserver | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be at least 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms} must not be negative")
        if num_batch_threads < 1:
            raise ValueError(f"num_batch_threads={num_batch_threads} must be at least 1")
        _check_queue_limit(max_queued_images)
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.num_batch_threads = num_batch_threads
        self.max_queued_images = max_queued_images
        self.observer = observer or CallObserver()
        self.queued_images = 0  # images in the queue, not yet in a batch (dropped ones excluded)
        self._arriving = 0  # requests being read that will submit soon
        self._last_submit = -math.inf  # loop.time() of the latest submit
        self._mean_gap_s = math.inf  # moving average of the time between submits
        self._queue: collections.deque[_Pending] = collections.deque()  # may still hold DROPPED entries
        self._changed: asyncio.Event | None = None  # set when an image is queued or a request stops arriving
        self.stats = BatchingStats()
        self._worker: asyncio.Task | None = None
        self._running: dict[asyncio.Task, list[_Pending]] = {}  # model calls under way and their batches
        self._executor = concurrent.futures.ThreadPoolExecutor(num_batch_threads, thread_name_prefix="micro-batch")

    def describe(self) -> dict:
        return {"batching": True, "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait_s * 1000.0,
                "num_batch_threads": self.num_batch_threads, "max_queued_images": self.max_queued_images,
                "queued_images": self.queued_images, **self.stats.as_dict()}

    def seconds_per_image(self) -> float | None:
        """Mean model time per image so far, with the workers' overlap: a queue of n drains in about n x this."""
        if not self.stats.images:
            return None
        return self.stats.busy_seconds / self.stats.images / self.num_batch_threads

    async def start(self) -> None:
        """Starts the batching task on the running event loop."""
        self._changed = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._serve_batches(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._executor.shutdown(wait=True)

    def fail_waiting(self, exc: BaseException) -> int:
        """Fails every request still waiting (queued or in a model call) with `exc`; returns how many images."""
        failed = 0
        for pending in self._queue:
            if pending.state is _State.QUEUED:
                pending.state = _State.DROPPED
                self.queued_images -= 1
                self.stats.dropped_images += 1
            if not pending.future.done():
                pending.future.set_exception(exc)
                failed += 1
        self._queue.clear()
        for batch in self._running.values():
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
                    failed += 1
        return failed

    @contextlib.contextmanager
    def arriving(self):
        """Marks a request that is being read and will (probably) submit: a forming batch waits for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._changed is not None:
                self._changed.set()

    async def submit(self, items: list[Any], *, deadline: float | None = None) -> list[Any]:
        """The results of `items`, computed in the next batches.

        `deadline` is in the event loop's clock (loop.time()). Raises QueueFull or DeadlineExceeded.
        """
        if self._worker is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        if self.max_queued_images is not None and self.queued_images + len(items) > self.max_queued_images:
            raise QueueFull(self.queued_images, len(items), self.max_queued_images)
        loop = asyncio.get_running_loop()
        now = loop.time()
        gap = now - self._last_submit
        self._mean_gap_s = gap if math.isinf(self._mean_gap_s) else 0.8 * self._mean_gap_s + 0.2 * gap
        self._last_submit = now
        entries = [_Pending(item, loop.create_future(), now) for item in items]
        self._queue.extend(entries)
        self.queued_images += len(entries)
        self._changed.set()
        gathered = asyncio.gather(*(e.future for e in entries))
        try:
            if deadline is None:
                return list(await gathered)
            await asyncio.wait([gathered], timeout=max(0.0, deadline - loop.time()))
            if not gathered.done() and any(e.state is _State.QUEUED for e in entries):
                raise DeadlineExceeded()
            return list(await gathered)  # done, or every image already in a model call: it finishes soon
        finally:
            for e in entries:  # the deadline passed, or the handler was cancelled: leave the queue
                if e.state is _State.QUEUED:
                    e.state = _State.DROPPED
                    self.queued_images -= 1
                    self.stats.dropped_images += 1
            if not gathered.done():
                gathered.cancel()
            # Retrieved, so that a failure nobody awaits any more logs no "exception was never retrieved".
            gathered.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _take(self, batch: list[_Pending]) -> bool:
        """Moves the next queued image into `batch`; False when none is queued."""
        while self._queue:
            pending = self._queue.popleft()
            if pending.state is _State.QUEUED:
                pending.state = _State.TAKEN
                self.queued_images -= 1
                batch.append(pending)
                return True
        return False

    async def _next_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while not self._take(batch):
            self._changed.clear()
            await self._changed.wait()
        close_at = batch[0].enqueued_at + self.max_wait_s
        loop = asyncio.get_running_loop()
        while len(batch) < self.max_batch_size:
            if self._take(batch):
                continue
            wait_until = close_at
            if not self._arriving:
                if not self._running:  # nothing else queued, running or on its way: nobody to wait for
                    break
                if math.isinf(self._mean_gap_s) or self._last_submit + self._mean_gap_s >= close_at:
                    break  # the next request is not due before the batch would close anyway
                wait_until = min(close_at, self._last_submit + 2 * self._mean_gap_s)
            remaining = wait_until - loop.time()
            if remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _serve_batches(self) -> None:
        """Forms a batch whenever one of the `num_batch_threads` workers is free, and runs it there."""
        free_workers = asyncio.Semaphore(self.num_batch_threads)
        loop = asyncio.get_running_loop()
        try:
            while True:
                await free_workers.acquire()
                batch = await self._next_batch()
                now = loop.time()
                for pending in batch:
                    self.observer.queue_wait(now - pending.enqueued_at, 1)
                task = loop.create_task(self._run(batch))
                self._running[task] = batch
                task.add_done_callback(lambda t: (self._running.pop(t, None), free_workers.release()))
        finally:
            for task in list(self._running):
                task.cancel()

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001  (every waiting request gets the failure)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finally:
            seconds = time.monotonic() - start
            self.stats.record(len(batch), seconds)
            self.observer.model_call(len(batch), seconds)
        for pending, result in zip(batch, results):
            if not pending.future.done():
                pending.future.set_result(result)


class UnbatchedCaller:
    """Batching off: each request's items in their own call, up to `max_concurrent_calls` calls at once.

    Requests waiting for a call slot are the queue: bounded by `max_queued_images`, left at the deadline.
    """

    def __init__(self, run_batch: RunBatch, *, max_concurrent_calls: int = 1, max_queued_images: int | None = None,
                 observer: CallObserver | None = None):
        if max_concurrent_calls < 1:
            raise ValueError(f"max_concurrent_calls={max_concurrent_calls} must be at least 1")
        _check_queue_limit(max_queued_images)
        self._run_batch = run_batch
        self.max_concurrent_calls = max_concurrent_calls
        self.max_queued_images = max_queued_images
        self.observer = observer or CallObserver()
        self.queued_images = 0
        self.stats = BatchingStats()
        self._slots: asyncio.Semaphore | None = None
        self._waiting: dict[asyncio.Task, BaseException | None] = {}  # calls not finished; what fails them
        self._executor = concurrent.futures.ThreadPoolExecutor(max_concurrent_calls, thread_name_prefix="caption")

    def describe(self) -> dict:
        return {"batching": False, "max_concurrent_calls": self.max_concurrent_calls,
                "max_queued_images": self.max_queued_images, "queued_images": self.queued_images,
                **self.stats.as_dict()}

    def seconds_per_image(self) -> float | None:
        if not self.stats.images:
            return None
        return self.stats.busy_seconds / self.stats.images / self.max_concurrent_calls

    @contextlib.contextmanager
    def arriving(self):
        yield

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrent_calls)

    async def stop(self) -> None:
        self._executor.shutdown(wait=True)

    def fail_waiting(self, exc: BaseException) -> int:
        failed = 0
        for task in list(self._waiting):
            if not task.done():
                self._waiting[task] = exc
                task.cancel()
                failed += 1
        return failed

    async def submit(self, items: list[Any], *, deadline: float | None = None) -> list[Any]:
        if self.max_queued_images is not None and self.queued_images + len(items) > self.max_queued_images:
            raise QueueFull(self.queued_images, len(items), self.max_queued_images)
        loop = asyncio.get_running_loop()
        enqueued_at = loop.time()
        self.queued_images += len(items)
        task = loop.create_task(self._call(items, deadline, enqueued_at))
        self._waiting[task] = None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._waiting.get(task) is not None:  # failed by fail_waiting
                raise self._waiting[task] from None
            task.cancel()  # the handler was cancelled: the client went away
            raise
        finally:
            self._waiting.pop(task, None)

    async def _call(self, items: list[Any], deadline: float | None, enqueued_at: float) -> list[Any]:
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            except TimeoutError:
                self.stats.dropped_images += len(items)
                raise DeadlineExceeded() from None
        finally:
            self.queued_images -= len(items)
        try:
            self.observer.queue_wait(loop.time() - enqueued_at, len(items))
            start = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, list(items))
            finally:
                seconds = time.monotonic() - start
                self.stats.record(len(items), seconds)
                self.observer.model_call(len(items), seconds)
            return list(results)
        finally:
            self._slots.release()
