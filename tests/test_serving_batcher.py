"""MicroBatcher and UnbatchedCaller with a fake model: batches form, are capped, and route results back."""

import asyncio
import threading

import pytest

from showtell_dist.serving.micro_batcher import DeadlineExceeded, MicroBatcher, QueueFull, UnbatchedCaller


class BlockingModel:
    """run_batch that records its batches and, while `gate` is clear, blocks (so requests pile up)."""

    def __init__(self):
        self.batches = []
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)  # released once per call that entered

    def __call__(self, items):
        self.batches.append(list(items))
        self.entered.release()
        assert self.gate.wait(timeout=30), "test never opened the gate"
        if "boom" in items:
            raise ValueError("model failed")
        return [f"result:{item}" for item in items]


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_requests_that_arrive_while_the_model_runs_form_capped_batches():
    model = BlockingModel()

    async def scenario():
        batcher = MicroBatcher(model, max_batch_size=4, max_wait_ms=200, num_batch_threads=1)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.sleep(0)  # "a" is queued before the rest, so its batch opens first
        # Wait (in a thread, not blocking the loop) until the model runs the first batch, then queue more.
        assert await asyncio.get_running_loop().run_in_executor(None, model.entered.acquire, True, 30)
        later = [asyncio.ensure_future(batcher.submit(items))
                 for items in (["b", "c"], ["d"], ["e", "f", "g"], ["h"])]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *later)
        stats = batcher.describe()
        await batcher.stop()
        return results, stats

    results, stats = _run(scenario())
    # Each request gets its own results, in order, even when its items span two batches (e, f | g).
    assert results == [["result:a"], ["result:b", "result:c"], ["result:d"],
                       ["result:e", "result:f", "result:g"], ["result:h"]]
    assert model.batches[0] == ["a"]
    assert model.batches[1:] == [["b", "c", "d", "e"], ["f", "g", "h"]]  # queued items, at most 4 per call
    assert stats["calls"] == 3 and stats["images"] == 8 and stats["largest_batch"] == 4


def test_a_second_worker_runs_the_next_batch_while_the_first_is_busy():
    model = BlockingModel()

    async def scenario():
        batcher = MicroBatcher(model, max_batch_size=4, max_wait_ms=1, num_batch_threads=2)
        await batcher.start()
        acquire = asyncio.get_running_loop().run_in_executor
        first = asyncio.ensure_future(batcher.submit(["a"]))
        assert await acquire(None, model.entered.acquire, True, 30)
        second = asyncio.ensure_future(batcher.submit(["b", "c"]))
        # The second batch enters the model although the first has not returned (the gate is still closed).
        assert await acquire(None, model.entered.acquire, True, 30)
        assert not first.done()
        model.gate.set()
        results = await asyncio.gather(first, second)
        await batcher.stop()
        return results

    assert _run(scenario()) == [["result:a"], ["result:b", "result:c"]]
    assert model.batches == [["a"], ["b", "c"]]


def test_a_batch_waits_for_a_request_on_its_way_but_not_for_nobody():
    model = BlockingModel()
    model.gate.set()

    async def scenario():
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_ms=60_000)
        await batcher.start()
        # Nobody else is arriving: the lone request runs at once, not after 60 s.
        alone = await asyncio.wait_for(batcher.submit(["x"]), timeout=30)
        with batcher.arriving():  # a second request is being read
            first = asyncio.ensure_future(batcher.submit(["a"]))
            await asyncio.sleep(0.05)
            waited = model.batches[1:] == []
        second = await asyncio.wait_for(batcher.submit(["b"]), timeout=30)
        results = alone, await first, second
        await batcher.stop()
        return results, waited

    results, waited = _run(scenario())
    assert results == (["result:x"], ["result:a"], ["result:b"])
    assert waited
    assert model.batches == [["x"], ["a", "b"]]


def test_a_failing_batch_fails_its_requests_and_the_next_batch_still_runs():
    model = BlockingModel()
    model.gate.set()

    async def scenario():
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_ms=1)
        await batcher.start()
        with pytest.raises(ValueError, match="model failed"):
            await batcher.submit(["boom"])
        result = await batcher.submit(["ok"])
        await batcher.stop()
        return result

    assert _run(scenario()) == ["result:ok"]


def test_unbatched_caller_makes_one_call_per_request():
    model = BlockingModel()
    model.gate.set()

    async def scenario():
        caller = UnbatchedCaller(model, max_concurrent_calls=2)
        await caller.start()
        results = await asyncio.gather(caller.submit(["a", "b"]), caller.submit(["c"]))
        stats = caller.describe()
        await caller.stop()
        return results, stats

    results, stats = _run(scenario())
    assert results == [["result:a", "result:b"], ["result:c"]]
    assert sorted(map(tuple, model.batches)) == [("a", "b"), ("c",)]
    assert stats["calls"] == 2 and not stats["batching"]


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no_batching"])
def test_a_full_queue_refuses_and_a_deadline_drops_queued_images(batching):
    model = BlockingModel()

    async def scenario():
        if batching:
            caller = MicroBatcher(model, max_batch_size=2, max_wait_ms=0, num_batch_threads=1, max_queued_images=3)
        else:
            caller = UnbatchedCaller(model, max_concurrent_calls=1, max_queued_images=3)
        await caller.start()
        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(caller.submit(["a"]))  # enters the model and blocks there
        assert await loop.run_in_executor(None, model.entered.acquire, True, 30)
        waiting = asyncio.ensure_future(caller.submit(["b", "c"]))
        await asyncio.sleep(0)
        assert caller.queued_images == 2
        with pytest.raises(QueueFull) as full:  # 2 queued + 2 > 3: refused, nothing queued
            await caller.submit(["d", "e"])
        assert (full.value.queued, full.value.adding, full.value.limit) == (2, 2, 3)
        assert caller.queued_images == 2
        # A request whose deadline passes while queued: refused, and its image leaves the queue at once.
        with pytest.raises(DeadlineExceeded):
            await caller.submit(["late"], deadline=loop.time() + 0.05)
        assert caller.queued_images == 2
        model.gate.set()
        results = await asyncio.gather(running, waiting)
        stats = caller.describe()
        await caller.stop()
        return results, stats

    results, stats = _run(scenario())
    assert results == [["result:a"], ["result:b", "result:c"]]
    assert "late" not in [item for batch in model.batches for item in batch]  # never captioned
    assert stats["dropped_images"] == 1 and stats["queued_images"] == 0


def test_a_deadline_does_not_fail_a_request_whose_images_are_all_in_a_model_call():
    model = BlockingModel()

    async def scenario():
        batcher = MicroBatcher(model, max_batch_size=4, max_wait_ms=0, num_batch_threads=1)
        await batcher.start()
        loop = asyncio.get_running_loop()
        request = asyncio.ensure_future(batcher.submit(["a", "b"], deadline=loop.time() + 0.05))
        assert await loop.run_in_executor(None, model.entered.acquire, True, 30)
        await asyncio.sleep(0.1)  # past the deadline, but its images are being captioned
        model.gate.set()
        result = await request
        await batcher.stop()
        return result

    assert _run(scenario()) == ["result:a", "result:b"]


def test_fail_waiting_answers_queued_and_running_requests():
    model = BlockingModel()

    async def scenario():
        batcher = MicroBatcher(model, max_batch_size=1, max_wait_ms=0, num_batch_threads=1)
        await batcher.start()
        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(batcher.submit(["a"]))
        assert await loop.run_in_executor(None, model.entered.acquire, True, 30)
        queued = asyncio.ensure_future(batcher.submit(["b"]))
        await asyncio.sleep(0)
        assert batcher.fail_waiting(RuntimeError("shutting down")) == 2
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        model.gate.set()
        await batcher.stop()
        return outcomes, batcher.queued_images

    outcomes, queued = _run(scenario())
    assert [str(o) for o in outcomes] == ["shutting down", "shutting down"] and queued == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda items: items, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(lambda items: items, max_wait_ms=-1)
    with pytest.raises(ValueError, match="num_batch_threads"):
        MicroBatcher(lambda items: items, num_batch_threads=0)
    with pytest.raises(ValueError, match="max_queued_images"):
        MicroBatcher(lambda items: items, max_queued_images=0)
    with pytest.raises(ValueError, match="max_queued_images"):
        UnbatchedCaller(lambda items: items, max_queued_images=0)
