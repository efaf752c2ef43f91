"""Caption server throughput: images/s at 1, 8 and 32 concurrent loopback clients, micro-batching on and off.

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
import io
import os
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
    from showtell_dist.export import export_saved_model
    from showtell_dist.run.restore import TrainedModel
    from showtell_dist.model.show_and_tell import build_model

    keras.utils.set_random_seed(0)
    config = demo.get_config()
    tokenizer = Tokenizer(words=list(SPECIAL_TOKENS) + [f"word{i}" for i in range(vocab_words)],
                          max_len=max_len + 1)
    model = build_model(config.model, tokenizer.vocab_size)
    export_saved_model(TrainedModel(model, tokenizer, config, "random weights", 0), export_dir,
                       beam_width=beam_width)


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

    names = list(modes)
    print()
    print(f"images/s, median of {args.rounds} rounds:")
    print("| clients | " + " | ".join(names) + " | micro-batching / one at a time |")
    print("| ---: " * (len(names) + 2) + "|")
    for n in clients:
        ratio = table["micro-batching", n] / table["one at a time", n]
        print(f"| {n} | " + " | ".join(f"{table[m, n]:.1f}" for m in names) + f" | {ratio:.2f}x |")
    top = max(clients)
    print(f"\nat {top} clients micro-batching serves {table['micro-batching', top] / table['one at a time', top]:.1f}x "
          f"the images/s of one-at-a-time calls and {table['micro-batching', top] / table[names[1], top]:.1f}x "
          f"those of {names[1]}.")


if __name__ == "__main__":
    main()
