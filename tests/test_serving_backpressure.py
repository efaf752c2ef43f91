"""The caption server under more work than it can take: bounded queue, deadlines, drain, /metrics.

A captioner whose calls wait at a gate (serving_testing.GatedCaptioner) makes
requests pile up exactly when the test wants, so every case is deterministic
and takes well under a second of model time.
"""

import asyncio

import aiohttp
import pytest

from showtell_dist.serving import BackgroundServer, ServerSettings, make_app
from serving_testing import (CLIENT_TIMEOUT, GatedCaptioner, get_metrics, requests_by_outcome, small_png,
                             wait_until)

ONE_AT_A_TIME = dict(max_batch_size=1, num_batch_threads=1, max_wait_ms=0)


async def _post(session, url, body):
    async with session.post(url + "/caption", data=body, headers={"Content-Type": "image/png"}) as response:
        return response.status, await response.json(), response.headers


async def _health(session, url):
    async with session.get(url + "/health") as response:
        return response.status, await response.json()


async def _queued(session, url, images):
    return (await _health(session, url))[1]["load"]["queued_images"] == images


def test_a_full_queue_answers_503_naming_the_limit_and_the_queue_drains():
    model = GatedCaptioner()
    settings = ServerSettings(max_queued_images=2, **ONE_AT_A_TIME)

    async def scenario(url):
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            running = asyncio.ensure_future(_post(session, url, small_png(0)))
            await model.wait_entered()
            queued = [asyncio.ensure_future(_post(session, url, small_png(seed))) for seed in (1, 2)]
            await wait_until(lambda: _queued(session, url, 2), "2 images queued")
            refused = await _post(session, url, small_png(3))
            during = await get_metrics(session, url)
            model.gate.set()
            answered = await asyncio.gather(running, *queued)
            return refused, answered, during, await get_metrics(session, url)

    with BackgroundServer(make_app(model, settings)) as server:
        (status, body, headers), answered, during, after = asyncio.run(scenario(server.url))
    assert status == 503
    error = body["error"]
    assert error["code"] == "queue_full_images" and error["limit"] == "max_queued_images"
    assert int(headers["Retry-After"]) >= 1
    assert "max_queued_images=2" in error["message"] and f"retry after {headers['Retry-After']} s" in error["message"]
    assert [s for s, _, _ in answered] == [200, 200, 200]
    assert during["showtell_caption_queue_images", ()] == 2
    assert during["showtell_caption_requests_in_flight", ()] == 3  # the /metrics GET is not a caption request
    assert requests_by_outcome(after) == {("shed", "queue_full_images"): 1, ("ok", "ok"): 3}
    assert after["showtell_caption_queue_images", ()] == 0 and after["showtell_caption_queue_bytes", ()] == 0
    assert after["showtell_caption_batch_size_count", ()] == 3
    assert after["showtell_caption_model_call_seconds_count", ()] == 3
    assert after["showtell_caption_queue_wait_seconds_count", ()] == 3
    assert after["showtell_caption_request_latency_seconds_count", (("outcome", "ok"),)] == 3
    assert after["showtell_caption_request_latency_seconds_count", (("outcome", "shed"),)] == 1


async def _raw_request(url, head: bytes, body_chunks=()):
    """Sends `head` (and `body_chunks`) on a raw connection; returns the status and the JSON error."""
    host, port = url.rsplit("/", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        for chunk in body_chunks:
            writer.write(chunk)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 60)
        headers = {}
        while (line := await asyncio.wait_for(reader.readline(), 60)) not in (b"\r\n", b""):
            name, value = line.decode().split(":", 1)
            headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 60)
        return int(status_line.split()[1]), body
    finally:
        writer.close()


def test_a_body_that_would_not_fit_is_refused_before_it_is_read():
    import json

    model = GatedCaptioner()
    image = small_png(0)
    settings = ServerSettings(max_request_bytes=100_000, max_queued_bytes=100_000 + len(image) // 2,
                              **ONE_AT_A_TIME)

    async def scenario(url):
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            running = asyncio.ensure_future(_post(session, url, image))  # holds len(image) bytes until answered
            await model.wait_entered()
            held = (await get_metrics(session, url))["showtell_caption_queue_bytes", ()]
            # Content-Length says 100000 bytes will not fit beside the held image: answered before any body is sent.
            before_body = await _raw_request(url, b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                                  b"Content-Length: 100000\r\n\r\n")
            # Without Content-Length the bytes are held as they arrive, and refused once they would not fit.
            chunk = b"\0" * 20_000
            chunked = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 5 + [b"0\r\n\r\n"]
            while_read = await _raw_request(url, b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                                 b"Transfer-Encoding: chunked\r\n\r\n", chunked)
            model.gate.set()
            return held, before_body, while_read, await running, await get_metrics(session, url)

    with BackgroundServer(make_app(model, settings)) as server:
        held, before_body, while_read, running, metrics = asyncio.run(scenario(server.url))
    assert held == len(image)
    for status, body in (before_body, while_read):
        error = json.loads(body)["error"]
        assert status == 503 and error["code"] == "queue_full_bytes" and error["limit"] == "max_queued_bytes", error
        assert f"max_queued_bytes={settings.max_queued_bytes}" in error["message"]
    assert running[0] == 200
    assert requests_by_outcome(metrics) == {("shed", "queue_full_bytes"): 2, ("ok", "ok"): 1}
    assert metrics["showtell_caption_queue_bytes", ()] == 0


def test_a_request_still_queued_at_its_deadline_gets_503_and_leaves_the_queue():
    model = GatedCaptioner()
    settings = ServerSettings(request_timeout_s=0.5, **ONE_AT_A_TIME)

    async def scenario(url):
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            running = asyncio.ensure_future(_post(session, url, small_png(0)))
            await model.wait_entered()
            late = await _post(session, url, small_png(1))  # queued behind the gated call for 0.5 s
            after_late = await _health(session, url)
            model.gate.set()
            return late, after_late, await running, await get_metrics(session, url)

    with BackgroundServer(make_app(model, settings)) as server:
        (status, body, headers), (_, health), running, metrics = asyncio.run(scenario(server.url))
    assert status == 503 and body["error"]["code"] == "deadline_exceeded", body
    assert "--request_timeout_s=0.5" in body["error"]["message"] and int(headers["Retry-After"]) >= 1
    assert health["load"]["queued_images"] == 0 and health["calls"]["dropped_images"] == 1
    # The gated request's own deadline passed while it was in the model call: it still gets its captions.
    assert running[0] == 200 and running[1]["images"][0]["captions"][0]["caption"] == f"{len(small_png(0))} bytes"
    assert model.batches == [1]  # the late image was never captioned
    assert requests_by_outcome(metrics) == {("deadline", "deadline_exceeded"): 1, ("ok", "ok"): 1}
    assert metrics["showtell_caption_dropped_images_total", ()] == 1


@pytest.mark.parametrize("bound_passes", [False, True], ids=["in_flight_finish", "drain_bound_passes"])
def test_draining_refuses_new_work_and_finishes_what_is_in_flight(bound_passes):
    model = GatedCaptioner()
    settings = ServerSettings(drain_timeout_s=0.3 if bound_passes else 60, **ONE_AT_A_TIME)

    async def scenario(server):
        url = server.url
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            before = await _health(session, url)
            in_flight = [asyncio.ensure_future(_post(session, url, small_png(0)))]
            await model.wait_entered()
            in_flight.append(asyncio.ensure_future(_post(session, url, small_png(1))))
            await wait_until(lambda: _queued(session, url, 1), "1 image queued")
            drained = loop.run_in_executor(None, server.drain)  # what SIGTERM does
            during = await wait_until(lambda: _draining_health(session, url), "health not ready")
            refused = await _post(session, url, small_png(2))
            if bound_passes:
                answered = await asyncio.gather(*in_flight)
                await drained
                model.gate.set()
            else:
                model.gate.set()
                answered = await asyncio.gather(*in_flight)
                await drained
            return before, during, refused, answered, await get_metrics(session, url)

    with BackgroundServer(make_app(model, settings)) as server:
        before, during, refused, answered, metrics = asyncio.run(scenario(server))
    assert before == (200, before[1]) and before[1]["ready"] is True and before[1]["status"] == "ok"
    assert during[0] == 503 and during[1]["ready"] is False and during[1]["status"] == "draining"
    assert refused[0] == 503 and refused[1]["error"]["code"] == "draining" and "Retry-After" in refused[2]
    if bound_passes:  # the drain bound passed with both still waiting: each gets a 503 naming the bound
        assert [(s, b["error"]["code"]) for s, b, _ in answered] == [(503, "shutting_down")] * 2
        assert "--drain_timeout_s=0.3" in answered[0][1]["error"]["message"]
        assert requests_by_outcome(metrics) == {("draining", "draining"): 1, ("draining", "shutting_down"): 2}
    else:
        assert [s for s, _, _ in answered] == [200, 200]
        assert requests_by_outcome(metrics) == {("draining", "draining"): 1, ("ok", "ok"): 2}


async def _draining_health(session, url):
    status, body = await _health(session, url)
    return (status, body) if status == 503 else None


def test_metrics_lists_every_family_with_help_and_type():
    model = GatedCaptioner(open_gate=True)

    async def scenario(url):
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            assert (await _post(session, url, small_png(0)))[0] == 200
            async with session.post(url + "/caption", data=b"not an image",
                                    headers={"Content-Type": "image/png"}) as response:
                assert response.status == 400
            async with session.get(url + "/metrics") as response:
                return await response.text()

    with BackgroundServer(make_app(model, ServerSettings())) as server:
        text = asyncio.run(scenario(server.url))
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f.type for f in text_string_to_metric_families(text)
                if not f.name.endswith("_created")}  # the client library's creation timestamps
    assert families == {
        "showtell_caption_requests": "counter", "showtell_caption_request_latency_seconds": "histogram",
        "showtell_caption_queue_wait_seconds": "histogram", "showtell_caption_model_call_seconds": "histogram",
        "showtell_caption_batch_size": "histogram", "showtell_caption_queue_images": "gauge",
        "showtell_caption_queue_bytes": "gauge", "showtell_caption_requests_in_flight": "gauge",
        "showtell_caption_queue_limit_images": "gauge", "showtell_caption_queue_limit_bytes": "gauge",
        "showtell_caption_dropped_images": "counter"}
    assert 'showtell_caption_requests_total{code="not_an_image",outcome="client_error"} 1.0' in text
    assert "showtell_caption_queue_limit_images 1024.0" in text


def test_bad_backpressure_settings_are_refused():
    for bad in (dict(max_queued_images=0), dict(max_queued_bytes=0), dict(request_timeout_s=0),
                dict(drain_timeout_s=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerSettings(**bad)
