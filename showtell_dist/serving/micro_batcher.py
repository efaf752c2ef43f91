"""Micro-batching: images of concurrent requests captioned in one call, as TF Serving's batching does.

    batcher = MicroBatcher(captioner.caption, max_batch_size=32, max_wait_ms=5)
    await batcher.start()
    results = await batcher.submit([jpeg_a, jpeg_b])   # from any number of concurrent handlers

A batch opens when an image arrives while one of `num_batch_threads` worker
threads is free; it is closed and captioned on that worker once it holds
`max_batch_size` images, or its first image has waited `max_wait_ms`, or
-- when no request is on its way (being read inside `arriving()`) -- the next
request is not due before then at the recent rate, or is overdue (twice the
mean time between requests has passed since the last one): a lone client's
request does not wait for company that is not coming. Images
that arrive while the workers are busy queue up and form the next batch, so
under load batches fill without waiting. Two workers (TF Serving's
num_batch_threads) let one batch's sequential beam-search steps overlap
another's on a CPU; the event loop keeps accepting requests meanwhile. A
request's images may be split over consecutive batches; each request gets its
own results back in order.

`UnbatchedCaller` has the same interface and makes one call per request (the
"batching off" baseline), several at once in threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Sequence

# run_batch(images) -> one result per image, in order; runs in a worker thread.
RunBatch = Callable[[list[Any]], Sequence[Any]]


@dataclasses.dataclass
class BatchingStats:
    calls: int = 0
    images: int = 0
    largest_batch: int = 0

    def record(self, batch_size: int) -> None:
        self.calls += 1
        self.images += batch_size
        self.largest_batch = max(self.largest_batch, batch_size)

    def as_dict(self) -> dict:
        return {"calls": self.calls, "images": self.images, "largest_batch": self.largest_batch,
                "mean_batch": round(self.images / self.calls, 2) if self.calls else 0.0}


@dataclasses.dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued_at: float


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 num_batch_threads: int = 2):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be at least 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms} must not be negative")
        if num_batch_threads < 1:
            raise ValueError(f"num_batch_threads={num_batch_threads} must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.num_batch_threads = num_batch_threads
        self._arriving = 0  # requests being read that will submit soon
        self._last_submit = -math.inf  # time.monotonic() of the latest submit
        self._mean_gap_s = math.inf  # moving average of the time between submits
        self.stats = BatchingStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(num_batch_threads, thread_name_prefix="micro-batch")

    def describe(self) -> dict:
        return {"batching": True, "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait_s * 1000.0,
                "num_batch_threads": self.num_batch_threads, **self.stats.as_dict()}

    async def start(self) -> None:
        """Starts the batching task on the running event loop."""
        self._queue = asyncio.Queue()
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

    @contextlib.contextmanager
    def arriving(self):
        """Marks a request that is being read and will (probably) submit: a forming batch waits for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def submit(self, items: list[Any]) -> list[Any]:
        """The results of `items`, computed in the next batches."""
        if self._worker is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        gap = now - self._last_submit
        self._mean_gap_s = gap if math.isinf(self._mean_gap_s) else 0.8 * self._mean_gap_s + 0.2 * gap
        self._last_submit = now
        futures = []
        for item in items:
            future = loop.create_future()
            self._queue.put_nowait(_Pending(item, future, now))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = batch[0].enqueued_at + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            wait_until = deadline
            if not self._arriving:  # no request is being read: wait only for one due at the recent rate
                if math.isinf(self._mean_gap_s) or self._last_submit + self._mean_gap_s >= deadline:
                    break
                wait_until = min(deadline, self._last_submit + 2 * self._mean_gap_s)
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _serve_batches(self) -> None:
        """Forms a batch whenever one of the `num_batch_threads` workers is free, and runs it there."""
        free_workers = asyncio.Semaphore(self.num_batch_threads)
        running = set()
        try:
            while True:
                await free_workers.acquire()
                batch = [p for p in await self._next_batch() if not p.future.done()]  # done: the client went away
                if not batch:
                    free_workers.release()
                    continue
                self.stats.record(len(batch))
                task = asyncio.get_running_loop().create_task(self._run(batch))
                running.add(task)
                task.add_done_callback(lambda t: (running.discard(t), free_workers.release()))
        finally:
            for task in running:
                task.cancel()

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001  (every waiting request gets the failure)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        for pending, result in zip(batch, results):
            if not pending.future.done():
                pending.future.set_result(result)


class UnbatchedCaller:
    """Batching off: each request's items in their own call, up to `max_concurrent_calls` calls at once."""

    def __init__(self, run_batch: RunBatch, *, max_concurrent_calls: int = 1):
        if max_concurrent_calls < 1:
            raise ValueError(f"max_concurrent_calls={max_concurrent_calls} must be at least 1")
        self._run_batch = run_batch
        self.max_concurrent_calls = max_concurrent_calls
        self.stats = BatchingStats()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_concurrent_calls, thread_name_prefix="caption")

    def describe(self) -> dict:
        return {"batching": False, "max_concurrent_calls": self.max_concurrent_calls, **self.stats.as_dict()}

    @contextlib.contextmanager
    def arriving(self):
        yield

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._executor.shutdown(wait=True)

    async def submit(self, items: list[Any]) -> list[Any]:
        self.stats.record(len(items))
        results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, list(items))
        return list(results)
