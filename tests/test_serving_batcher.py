"""MicroBatcher and UnbatchedCaller with a fake model: batches form, are capped, and route results back."""

import asyncio
import threading

import pytest

from showtell_dist.serving.micro_batcher import MicroBatcher, UnbatchedCaller


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


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda items: items, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(lambda items: items, max_wait_ms=-1)
    with pytest.raises(ValueError, match="num_batch_threads"):
        MicroBatcher(lambda items: items, num_batch_threads=0)
