"""The real caption server (launch/serve.py on the tiny export) under overload and under SIGTERM, on loopback.

Bounded: 64 clients x 3 requests, small limits, each test well under a minute.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest

from serving_testing import direct, export_dir, get_metrics, make_image, noisy_jpeg, requests_by_outcome  # noqa: F401
from tiny_setup import REPO_ROOT

CLIENTS, REQUESTS_PER_CLIENT = 64, 3
MAX_REQUEST_MB, MAX_QUEUED_MB, MAX_QUEUED_IMAGES, REQUEST_TIMEOUT_S = 1, 4, 16, 20
MiB = 2**20
# What the bounds allow the server to hold beyond its warmed-up peak: the bodies held and one copy of each
# (the batch tensor), one body being joined from its chunks, aiohttp's read buffer per connection
# (up to 2 x 64 KiB), and 64 MiB for allocator and thread-stack slack.
RSS_BOUND_BYTES = 2 * MAX_QUEUED_MB * MiB + MAX_REQUEST_MB * MiB + CLIENTS * 128 * 1024 + 64 * MiB


def _start_server(args, env=None):
    """Starts `args` (a server printing its URL on a line ending 'at http://...'); returns (process, url)."""
    env = dict(env or os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()[-3000:]}")
    return proc, line.strip().rsplit(" ", 1)[1]


def _memory_kib(pid: int) -> dict:
    """VmRSS and VmHWM (peak resident) of a process, in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


async def _post(session, url, image):
    start = time.monotonic()
    async with session.post(url + "/caption", data=image, headers={"Content-Type": "image/jpeg"}) as response:
        return response.status, await response.json(), time.monotonic() - start


def test_overload_sheds_with_503_within_memory_and_deadline_and_metrics_agree(export_dir, tmp_path):
    small = [make_image(seed) for seed in range(6)]
    large = [noisy_jpeg(seed, side=900) for seed in range(2)]  # about 0.96 MB each, under the 1 MB limit
    assert all(0.8 * MiB < len(image) < MAX_REQUEST_MB * MiB for image in large)
    images = small + large
    expected = direct(export_dir, images)
    # Client k's i-th request: every third one large.
    plan = [[(k * REQUESTS_PER_CLIENT + i) % len(images) if (k * REQUESTS_PER_CLIENT + i) % 3
             else len(small) + (k + i) % len(large) for i in range(REQUESTS_PER_CLIENT)] for k in range(CLIENTS)]

    proc, url = _start_server([sys.executable, os.path.join(REPO_ROOT, "launch", "serve.py"),
                               f"--export_dir={export_dir}", "--port=0", f"--max_request_mb={MAX_REQUEST_MB}",
                               f"--max_queued_mb={MAX_QUEUED_MB}", f"--max_queued_images={MAX_QUEUED_IMAGES}",
                               f"--request_timeout_s={REQUEST_TIMEOUT_S}", "--max_batch_size=8",
                               "--max_images_per_request=4"])

    async def scenario():
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            for image in (small[0], large[0]):  # warm-up: the peak below is measured from here on
                assert (await _post(session, url, image))[0] == 200
            warm = _memory_kib(proc.pid)

            async def client(indices):
                return [(index, await _post(session, url, images[index])) for index in indices]

            replies = await asyncio.gather(*[client(indices) for indices in plan], return_exceptions=True)
            peak = _memory_kib(proc.pid)
            metrics = await get_metrics(session, url)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as fresh:
                after = await _post(fresh, url, small[1])  # the next request, on a new connection, succeeds
            return warm, replies, peak, metrics, after

    try:
        warm, replies, peak, metrics, after = asyncio.run(scenario())
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    failures = [r for r in replies if isinstance(r, BaseException)]
    assert not failures, f"connection errors: {failures[:3]}"
    answers = [answer for client in replies for answer in client]
    assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT
    seen = {}
    accepted_latency = []
    for index, (status, body, seconds) in answers:
        if status == 200:
            want_captions, want_scores = expected[index]
            got = body["images"][0]["captions"]
            assert [c["caption"] for c in got] == want_captions
            np.testing.assert_allclose([c["score"] for c in got], want_scores, rtol=1e-5, atol=1e-5)
            accepted_latency.append(seconds)
            seen["ok", "ok"] = seen.get(("ok", "ok"), 0) + 1
        else:
            assert status == 503, (status, body)  # never a 500 or another error
            code = body["error"]["code"]
            assert code in ("queue_full_images", "queue_full_bytes", "deadline_exceeded"), body
            outcome = "deadline" if code == "deadline_exceeded" else "shed"
            seen[outcome, code] = seen.get((outcome, code), 0) + 1
    shed = sum(n for (outcome, _), n in seen.items() if outcome == "shed")
    assert shed, f"64 clients with {MAX_QUEUED_MB} MB for bodies were never refused: not an overload ({seen})"
    assert accepted_latency, seen
    assert np.percentile(accepted_latency, 99) < REQUEST_TIMEOUT_S
    # /metrics counts what the clients saw (plus the 2 warm-up requests), parsed with the client library.
    warmed = dict(seen)
    warmed["ok", "ok"] = warmed.get(("ok", "ok"), 0) + 2
    assert requests_by_outcome(metrics) == warmed
    assert metrics["showtell_caption_queue_images", ()] == 0 and metrics["showtell_caption_queue_bytes", ()] == 0
    assert metrics["showtell_caption_requests_in_flight", ()] == 0
    assert metrics["showtell_caption_request_latency_seconds_count", (("outcome", "ok"),)] == warmed["ok", "ok"]
    assert after[0] == 200
    growth = (peak["VmHWM"] - warm["VmHWM"]) * 1024
    assert growth < RSS_BOUND_BYTES, (f"peak RSS grew {growth / MiB:.0f} MiB over the warmed-up "
                                      f"{warm['VmHWM'] / 1024:.0f} MiB; the bound is {RSS_BOUND_BYTES / MiB:.0f} MiB")
    print(f"\noverload: {seen}; p99 of accepted {np.percentile(accepted_latency, 99):.2f} s; peak RSS "
          f"{peak['VmHWM'] / 1024:.0f} MiB, {growth / MiB:.1f} MiB over warm (bound {RSS_BOUND_BYTES / MiB:.0f})")
    assert returncode == 0, stderr[-3000:]


GATED_SERVER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from showtell_dist.serving import SavedModelCaptioner, ServerSettings, make_app, serve_forever

captioner = SavedModelCaptioner.load(sys.argv[2])
gate_file = sys.argv[3]
caption = captioner.caption


def gated(images):  # each model call waits until the test creates gate_file (at most 60 s)
    for _ in range(6000):
        if os.path.exists(gate_file):
            break
        time.sleep(0.01)
    return caption(images)


captioner.caption = gated
settings = ServerSettings(max_batch_size=1, num_batch_threads=1, max_wait_ms=0, drain_timeout_s=60)
serve_forever(make_app(captioner, settings), "127.0.0.1", 0, on_ready=lambda url: print("at", url, flush=True))
"""


def test_sigterm_drains_requests_in_flight_refuses_new_ones_and_exits_0(export_dir, tmp_path):
    images = [make_image(seed) for seed in (10, 11, 12)]
    expected = direct(export_dir, images)
    gate = tmp_path / "gate"
    proc, url = _start_server([sys.executable, "-c", GATED_SERVER, REPO_ROOT, export_dir, str(gate)])

    async def health(session):
        async with session.get(url + "/health") as response:
            return response.status, await response.json()

    async def poll(session, check, what):
        for _ in range(1200):  # bounded: 60 s
            status, body = await health(session)
            if check(status, body):
                return status, body
            await asyncio.sleep(0.05)
        raise AssertionError(f"never happened: {what}")

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            in_flight = [asyncio.ensure_future(_post(session, url, image)) for image in images]
            # One request waits at the gate inside the model call, two wait in the queue.
            await poll(session, lambda s, b: b["load"]["in_flight"] == 3 and b["load"]["queued_images"] == 2,
                       "3 requests in flight")
            proc.send_signal(signal.SIGTERM)
            draining = await poll(session, lambda s, b: s == 503, "health not ready")
            refused = await _post(session, url, images[0])
            gate.touch()
            return draining, refused, await asyncio.gather(*in_flight)

    try:
        draining, refused, answered = asyncio.run(scenario())
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert draining[1]["ready"] is False and draining[1]["status"] == "draining"
    assert refused[0] == 503 and refused[1]["error"]["code"] == "draining"
    for (status, body, _), (want_captions, _) in zip(answered, expected):
        assert status == 200 and [c["caption"] for c in body["images"][0]["captions"]] == want_captions
    assert returncode == 0, proc.stderr.read()[-3000:]


@pytest.mark.parametrize("flag, words", [
    ("--max_queued_mb=1", ["--max_queued_mb=1", "--max_request_mb=10"]),
    ("--request_timeout_s=0", ["--request_timeout_s=0", "positive"]),
    ("--max_queued_images=-1", ["--max_queued_images=-1", "0: unbounded"]),
    ("--max_queued_images=8", ["--max_queued_images=8", "--max_images_per_request=32"]),
])
def test_serve_launcher_refuses_bad_backpressure_flags(tmp_path, flag, words):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "serve.py"), f"--export_dir={tmp_path}",
                           flag], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-2000:])
