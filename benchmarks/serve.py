"""Caption server throughput: images/s at 1, 8 and 32 concurrent loopback clients, micro-batching on and off,
and overload: requests offered at 2x the measured capacity, with the queue bound on and off.

    python benchmarks/serve.py                              # the demo config's model, random weights
    python benchmarks/serve.py --export_dir=runs/demo/export --seconds=10
    python benchmarks/serve.py --model_dir=runs/f8k         # serves runs/f8k/export

The server (showtell_dist.serving, the app launch/serve.py runs) listens on
127.0.0.1 in a background thread; the clients are aiohttp coroutines in the
main thread, each POSTing one JPEG per request (raw body) and sending the next
as soon as its answer arrives, for `--seconds` per cell after a warm-up. Every
cell starts a fresh server on the same loaded SavedModel; all cells are measured
once per round (--rounds) and the table shows each cell's median:

  batching on   concurrent requests are gathered into one call of the export's
                batched signature (at most --max_batch_size images, the first
                waiting at most --batch_timeout_ms; --num_batch_threads batches at
                once), as TF Serving's batching does;
  one at a time each request is its own signature call, one call at a time (the
                server's --nobatching default): one-at-a-time calls;
  concurrent    each request is its own call, up to --max_concurrent_calls at once
                in threads (TF Serving without batching also runs calls in parallel).

Overload (after the table): the server runs as launch/serve.py in its own
process (so the clients do not share its interpreter), micro-batching with
the settings above. Its capacity is measured closed-loop at the most clients;
then requests are sent open-loop (at fixed times, whatever the answers) at
--overload_factor (2) x that capacity for --overload_seconds. "bound on" sizes
the queue as README says, waiting at most half the deadline at that capacity
(--max_queued_images = capacity x --overload_deadline_s / 2,
--request_timeout_s = --overload_deadline_s); "bound off" is an unbounded queue
without deadline (the server before the bound). Each row: the rate requests
were actually sent, images/s served (answered 200, until the last answer), the
fraction answered 503, p50/p99 latency of the 200s from when each was sent,
and the p99 the server's own latency histogram (GET /metrics) shows for its
200s: from the handler's start, so without the time a request waited in the
kernel's and aiohttp's buffers for the server's event loop (the bucket bound
at or above the 99th percentile).

Without --export_dir/--model_dir the model is configs/demo.py's (small CNN at
64x64, LSTM 192) with random weights and a 40-word vocabulary, exported with
beam 3: random weights never emit the end token, so every caption runs to
max_len (16) -- the most expensive decode per image. It also prints the
signature alone at batch 1 and batch --max_batch_size, the ceiling batching
can reach. Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from showtell_dist.serving import BackgroundServer, SavedModelCaptioner, ServerSettings, make_app  # noqa: E402


def export_demo_model(export_dir: str, vocab_words: int = 40, max_len: int = 16, beam_width: int = 3) -> None:
    """configs/demo.py's model with random weights, exported as launch/export.py would."""
    import keras

    from configs import demo
    from showtell_dist.data.tokenizer import SPECIAL_TOKENS, Tokenizer
    from showtell_dist.decoding.options import DecodeOptions
    from showtell_dist.export import export_saved_model
    from showtell_dist.run.restore import TrainedModel
    from showtell_dist.model.show_and_tell import build_model

    keras.utils.set_random_seed(0)
    config = demo.get_config()
    tokenizer = Tokenizer(words=list(SPECIAL_TOKENS) + [f"word{i}" for i in range(vocab_words)],
                          max_len=max_len + 1)
    model = build_model(config.model, tokenizer.vocab_size)
    export_saved_model([TrainedModel(model, tokenizer, config, "random weights", 0)], export_dir,
                       DecodeOptions(beam_width=beam_width))


def make_jpegs(count: int, size: int = 128) -> list[bytes]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(count):
        pixels = np.stack([x, y, x + y], -1) * rng.uniform(0.5, 2.0, 3) + rng.normal(0, 20, [size, size, 3])
        out = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
        images.append(out.getvalue())
    return images


async def load(url: str, images: list[bytes], clients: int, seconds: float, warmup_s: float) -> float:
    """images/s answered with 200 by `clients` closed-loop clients over `seconds` (after `warmup_s`)."""
    done = 0
    counting = False
    stop_at = time.monotonic() + warmup_s + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def client(k):
            nonlocal done
            i = k
            while time.monotonic() < stop_at:
                async with session.post(url + "/caption", data=images[i % len(images)],
                                        headers={"Content-Type": "image/jpeg"}) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"server answered {response.status}: {body}")
                if counting:
                    done += 1
                i += clients

        async def clock():
            nonlocal counting, done
            await asyncio.sleep(warmup_s)
            counting, done = True, 0
            return time.monotonic()

        results = await asyncio.gather(clock(), *[client(k) for k in range(clients)])
        elapsed = time.monotonic() - results[0]
    return done / elapsed


async def open_loop(url: str, images: list[bytes], rate: float, seconds: float) -> dict:
    """Requests sent at `rate` per second for `seconds` regardless of answers; what came back."""
    latencies, statuses, sent = [], [], []
    connector = aiohttp.TCPConnector(limit=4000)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.monotonic()

        async def one(i):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            sent_at = time.monotonic()
            sent.append(sent_at)
            async with session.post(url + "/caption", data=images[i % len(images)],
                                    headers={"Content-Type": "image/jpeg"}) as response:
                await response.read()
                statuses.append(response.status)
                if response.status == 200:
                    latencies.append(time.monotonic() - sent_at)
                elif response.status != 503:
                    raise RuntimeError(f"server answered {response.status}")

        count = int(rate * seconds)
        await asyncio.gather(*[one(i) for i in range(count)])
        elapsed = time.monotonic() - start
    served = statuses.count(200)
    return {"sent": count / (max(sent) - start), "served": served / elapsed, "shed": 1 - served / count,
            "p50": float(np.percentile(latencies, 50)) if latencies else float("nan"),
            "p99": float(np.percentile(latencies, 99)) if latencies else float("nan"), "elapsed": elapsed}


async def scrape(url: str) -> tuple[dict[float, float], dict[str, float]]:
    """From GET /metrics: the latency histogram of the server's 200s ({bucket upper bound: cumulative count})
    and its answers by outcome ({outcome: count})."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as response:
            text = await response.text()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    buckets = {float(s.labels["le"]): s.value for s in samples
               if s.name == "showtell_caption_request_latency_seconds_bucket" and s.labels.get("outcome") == "ok"}
    outcomes = {}
    for s in samples:
        if s.name == "showtell_caption_requests_total":
            outcomes[s.labels["outcome"]] = outcomes.get(s.labels["outcome"], 0.0) + s.value
    return buckets, outcomes


def p99_bucket(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the bucket holding the 99th percentile of what was observed between two scrapes."""
    counts = sorted((le, count - before.get(le, 0.0)) for le, count in after.items())
    total = counts[-1][1]
    return next(le for le, count in counts if count >= 0.99 * total)


async def overload_row(url: str, images: list[bytes], rate: float, seconds: float) -> dict:
    before, outcomes_before = await scrape(url)
    row = await open_loop(url, images, rate, seconds)
    after, outcomes_after = await scrape(url)
    row["server_p99"] = p99_bucket(before, after)
    for outcome in ("shed", "deadline"):  # how the 503s divide, as the server counted them
        row[outcome + "_503"] = outcomes_after.get(outcome, 0.0) - outcomes_before.get(outcome, 0.0)
    return row


@contextlib.contextmanager
def serve_subprocess(export_dir: str, flags: list[str]):
    """launch/serve.py on 127.0.0.1, a free port, in its own process; yields its URL."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "launch", "serve.py"),
                             f"--export_dir={export_dir}", "--port=0", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if " at http://" not in line:
            raise RuntimeError(f"launch/serve.py did not start: {line!r}")
        yield line.strip().rsplit(" ", 1)[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


async def health(url: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as response:
            return await response.json()


def signature_images_per_s(captioner: SavedModelCaptioner, images: list[bytes], batch: int, seconds: float) -> float:
    batch_images = (images * (batch // len(images) + 1))[:batch]
    captioner.caption(batch_images)  # warm-up
    calls, start = 0, time.monotonic()
    while time.monotonic() - start < seconds or calls < 2:
        captioner.caption(batch_images)
        calls += 1
    return calls * batch / (time.monotonic() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export_dir", help="SavedModel to serve (default: the demo model, random weights)")
    parser.add_argument("--model_dir", help="a training run whose model_dir/export is served")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="every cell is measured once per round; "
                        "the table shows medians")
    parser.add_argument("--warmup_seconds", type=float, default=1.5)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--batch_timeout_ms", type=float, default=5.0)
    parser.add_argument("--num_batch_threads", type=int, default=2, help="batches running at once (batching on)")
    parser.add_argument("--max_concurrent_calls", type=int, default=4, help="calls at once in the concurrent mode")
    parser.add_argument("--overload_factor", type=float, default=2.0, help="offered load / measured capacity")
    parser.add_argument("--overload_seconds", type=float, default=6.0, help="seconds of offered overload per row")
    parser.add_argument("--overload_deadline_s", type=float, default=2.0,
                        help="request_timeout_s with the bound on (the queue is sized for half of it)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir or (os.path.join(args.model_dir, "export") if args.model_dir else None)
        if export_dir is None:
            export_dir = os.path.join(tmp, "export")
            export_demo_model(export_dir)
            what = "configs/demo.py's model with random weights (captions run to max_len 16), beam 3"
        else:
            what = export_dir
        captioner = SavedModelCaptioner.load(export_dir)
        images = make_jpegs(64)
        clients = [int(c) for c in args.clients.split(",")]
        print(f"model: {what}; {len(images)} distinct 128x128 JPEGs, one per request; "
              f"{os.cpu_count()} CPUs; {args.rounds} rounds of {args.seconds:g} s per cell", flush=True)

        alone_1 = signature_images_per_s(captioner, images, 1, args.seconds / 2)
        alone_b = signature_images_per_s(captioner, images, args.max_batch_size, args.seconds / 2)
        print(f"signature alone: batch 1 {alone_1:.1f} images/s, batch {args.max_batch_size} {alone_b:.1f} "
              f"images/s ({alone_b / alone_1:.1f}x)", flush=True)

        modes = {"one at a time": dict(batching=False, max_concurrent_calls=1),
                 f"{args.max_concurrent_calls} calls at once": dict(batching=False,
                                                                   max_concurrent_calls=args.max_concurrent_calls),
                 "micro-batching": dict(batching=True, num_batch_threads=args.num_batch_threads)}
        # Rounds of every cell, medians reported: the load of a shared machine drifts less within a round.
        runs = {}
        for r in range(args.rounds):
            for mode, options in modes.items():
                for n in clients:
                    settings = ServerSettings(max_batch_size=args.max_batch_size, max_wait_ms=args.batch_timeout_ms,
                                              **options)
                    with BackgroundServer(make_app(captioner, settings)) as server:
                        rate = asyncio.run(load(server.url, images, n, args.seconds, args.warmup_seconds))
                        calls = asyncio.run(health(server.url))["calls"]
                    runs.setdefault((mode, n), []).append(rate)
                    print(f"  round {r + 1}: {mode:>16} {n:3d} clients: {rate:7.1f} images/s "
                          f"(mean {calls['mean_batch']:.1f} images per signature call)", flush=True)
        table = {cell: float(np.median(rates)) for cell, rates in runs.items()}

        top = max(clients)
        batching_flags = [f"--max_batch_size={args.max_batch_size}", f"--batch_timeout_ms={args.batch_timeout_ms}",
                          f"--num_batch_threads={args.num_batch_threads}", "--max_images_per_request=1"]
        unbounded = ["--max_queued_images=0", "--max_queued_mb=0", "--request_timeout_s=1e6"]
        overload = {}
        with serve_subprocess(export_dir, batching_flags + unbounded) as url:
            rates = [asyncio.run(load(url, images, top, args.seconds, args.warmup_seconds if r == 0 else 0.5))
                     for r in range(args.rounds)]
            capacity = float(np.median(rates))
            rate = args.overload_factor * capacity
            print(f"  capacity of launch/serve.py in its own process, {top} clients: {capacity:.1f} images/s "
                  f"(median of {[round(r, 1) for r in rates]})", flush=True)
            overload["off"] = asyncio.run(overload_row(url, images, rate, args.overload_seconds))
        queue_bound = max(1, round(capacity * args.overload_deadline_s / 2))
        bounded = [f"--max_queued_images={queue_bound}", f"--request_timeout_s={args.overload_deadline_s}"]
        with serve_subprocess(export_dir, batching_flags + bounded) as url:
            asyncio.run(load(url, images, top, 0.5, args.warmup_seconds))  # warm-up
            overload["on"] = asyncio.run(overload_row(url, images, rate, args.overload_seconds))
        for name, row in overload.items():
            print(f"  overload, bound {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)

    names = list(modes)
    print()
    print(f"images/s, median of {args.rounds} rounds:")
    print("| clients | " + " | ".join(names) + " | micro-batching / one at a time |")
    print("| ---: " * (len(names) + 2) + "|")
    for n in clients:
        ratio = table["micro-batching", n] / table["one at a time", n]
        print(f"| {n} | " + " | ".join(f"{table[m, n]:.1f}" for m in names) + f" | {ratio:.2f}x |")
    print(f"\nat {top} clients micro-batching serves {table['micro-batching', top] / table['one at a time', top]:.1f}x "
          f"the images/s of one-at-a-time calls and {table['micro-batching', top] / table[names[1], top]:.1f}x "
          f"those of {names[1]}.")
    print(f"\noverload: launch/serve.py in its own process, capacity {capacity:.1f} images/s ({top} clients); "
          f"requests scheduled open-loop at {args.overload_factor:g}x = {rate:.1f}/s for {args.overload_seconds:g} s; "
          f"bound on: --max_queued_images={queue_bound} --request_timeout_s={args.overload_deadline_s:g}:")
    print("| queue bound | sent req/s | served images/s | 503 (queue full + deadline) | p50 latency of 200s "
          "| p99 latency of 200s | p99 in the server |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("on", "off"):
        row = overload[name]
        print(f"| {name} | {row['sent']:.1f} | {row['served']:.1f} | {row['shed']:.1%} ({row['shed_503']:.0f} + "
              f"{row['deadline_503']:.0f}) | {row['p50']:.2f} s | {row['p99']:.2f} s | <= {row['server_p99']:g} s |")


if __name__ == "__main__":
    main()
