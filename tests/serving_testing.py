"""Helpers of the caption server's tests: the tiny export, test images, a gated captioner, /metrics parsing."""

import asyncio
import io
import threading

import aiohttp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from showtell_dist.serving import ImageCaptions

BEAM = 3
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=120)


@pytest.fixture(scope="session")
def export_dir(tiny_trained_dir, tmp_path_factory):
    """The tiny trained model exported with beam 3 (import this fixture into a test module to use it)."""
    from showtell_dist.decoding.options import DecodeOptions
    from showtell_dist.export import export_saved_model
    from showtell_dist.run.restore import load_trained_model

    path = str(tmp_path_factory.mktemp("serving") / "export")
    export_saved_model([load_trained_model(tiny_trained_dir)], path, DecodeOptions(beam_width=BEAM))
    return path


def make_image(seed: int, fmt: str = "JPEG", size=(40, 56)) -> bytes:
    """A deterministic picture: a gradient with a coloured block whose place and colour depend on `seed`."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 4, y * 6, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)  # [h, w, 3]
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    pixels[top:top + h // 2, left:left + w // 2] = rng.integers(0, 256, 3)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def noisy_jpeg(seed: int, side: int, quality: int = 95) -> bytes:
    """Noise compresses badly: 900 x 900 at quality 95 is about 0.96 MB, a large image for a 1 MB limit."""
    pixels = np.random.default_rng(seed).integers(0, 256, [side, side, 3], dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def direct(export_dir, images):
    """What one call of the SavedModel per image returns: [(captions, scores)]."""
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    results = []
    for image in images:
        out = serve(images=tf.constant([image]))
        captions, scores = out["captions"].numpy()[0].astype(str), out["scores"].numpy()[0]
        kept = [(c, float(s)) for c, s in zip(captions, scores) if c and np.isfinite(s)]
        results.append(([c for c, _ in kept], [s for _, s in kept]))
    return results


def small_png(seed: int = 0, size=(12, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, [size[0], size[1], 3], dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class GatedCaptioner:
    """Stands in for SavedModelCaptioner: each call blocks until `gate` is set, so requests pile up on demand.

    Its caption names the image's size in bytes, so a test can tell whose answer is whose.
    """

    export_dir, beam_width, image_size, max_len = "gated-test-captioner", 2, 32, 8

    def __init__(self, open_gate: bool = False):
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.entered = threading.Semaphore(0)  # released once per call that entered
        self.batches: list[int] = []

    def caption(self, images: list[bytes]) -> list[ImageCaptions]:
        self.batches.append(len(images))
        self.entered.release()
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        return [ImageCaptions([f"{len(image)} bytes", "second"], [-0.5, -1.0]) for image in images]

    async def wait_entered(self) -> None:
        """Until one more call has entered (waits in a thread, so the event loop keeps serving)."""
        assert await asyncio.get_running_loop().run_in_executor(None, self.entered.acquire, True, 60)


def parse_metrics(text: str) -> dict:
    """{(sample name, ((label, value), ...)): value} from Prometheus' text format, with the client's parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def requests_by_outcome(samples: dict) -> dict:
    """{(outcome, code): count} of showtell_caption_requests_total."""
    return {(dict(labels)["outcome"], dict(labels)["code"]): int(value)
            for (name, labels), value in samples.items() if name == "showtell_caption_requests_total"}


async def get_metrics(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(await response.text())


async def wait_until(check, what: str, attempts: int = 600, pause_s: float = 0.05):
    """Polls the coroutine function `check` until it returns a true value (bounded: attempts x pause_s)."""
    for _ in range(attempts):
        value = await check()
        if value:
            return value
        await asyncio.sleep(pause_s)
    raise AssertionError(f"never happened: {what}")
