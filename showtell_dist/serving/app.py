"""The caption server's aiohttp application: POST /caption, GET /health, GET /metrics and the web page at /.

    app = make_app(SavedModelCaptioner.load(export_dir), ServerSettings())
    serve_forever(app, "127.0.0.1", 8080)      # showtell_dist.serving.server

POST /caption takes one image as the raw body (Content-Type image/* or
application/octet-stream) or several as multipart/form-data files, and an
optional `?top_k=N` (1..beam width; default all). It answers

    {"images": [{"name": "a.jpg", "format": "JPEG", "width": 640, "height": 480,
                 "captions": [{"caption": "a dog runs on the grass", "score": -0.41}, ...]}],
     "beam_width": 3}

with captions best first. Every bad request gets a 4xx answer
`{"error": {"status": 413, "code": "request_too_large", "message": "..."}}`
whose message names the problem and the fix; nothing a client sends stops the
server. Image headers are checked (format, dimensions) before any decoding.

Under load it sheds instead of swelling: a request that would take the queue
over `max_queued_images` images or `max_queued_bytes` bytes of bodies held is
answered 503 with Retry-After and `"limit"` naming the bound (before its body
is read when its Content-Length already does not fit); one still queued
`request_timeout_s` after it arrived is answered 503 `deadline_exceeded` and
its images leave the queue. While draining (SIGTERM, see server.py) new work
and GET /health get 503 (`"ready": false`) and requests in flight finish, for
at most `drain_timeout_s`. GET /metrics is Prometheus' text format (metrics.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

from aiohttp import web

from showtell_dist.serving.backpressure import BytesFull, HeldBytes, Unavailable, retry_after_seconds
from showtell_dist.serving.image_checks import Rejected, check_image
from showtell_dist.serving.metrics import ServingMetrics
from showtell_dist.serving.micro_batcher import DeadlineExceeded, MicroBatcher, QueueFull, UnbatchedCaller
from showtell_dist.serving.request_images import RequestRejected, read_request_images
from showtell_dist.serving.saved_model_captioner import ImageDecodeError, SavedModelCaptioner

PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    max_request_bytes: int = 10 * 2**20  # whole request body
    max_image_pixels: int = 40_000_000  # width x height declared by an image's header
    max_images_per_request: int = 32
    batching: bool = True  # micro-batch concurrent requests into one signature call
    max_batch_size: int = 32  # images per call
    max_wait_ms: float = 5.0  # how long a batch's first image waits for company
    num_batch_threads: int = 2  # batches running at once
    max_concurrent_calls: int = 1  # batching off: calls running at once (1: one at a time)
    # Backpressure (None: unbounded). 1024 images wait about 15 s at the Flickr8k export's 69 images/s on
    # 2 cores, half the default deadline; 256 MiB of bodies hold 25 requests at the 10 MB limit.
    max_queued_images: int | None = 1024  # images queued, not yet in a model call
    max_queued_bytes: int | None = 256 * 2**20  # bytes of request bodies held, from reading to answer
    request_timeout_s: float = 30.0  # deadline from arrival; still queued then: 503 deadline_exceeded
    drain_timeout_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish

    def __post_init__(self):
        for name in ("max_queued_images", "max_queued_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1 (None: unbounded)")
        for name in ("request_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")


DRAIN = web.AppKey("drain", object)  # app[DRAIN]: async () -> None, called by server.py on SIGTERM


def _error(status: int, code: str, message: str, **extra) -> web.Response:
    return web.json_response({"error": {"status": status, "code": code, "message": message, **extra}},
                             status=status)


def _error_response(request: web.Request, exc: Exception) -> tuple[web.Response, str]:
    """A failure as a JSON error and its code: the handlers' rejections, aiohttp's 404/405/413, bugs as 500."""
    if isinstance(exc, Unavailable):  # 503: overloaded, past the deadline, draining
        response = _error(exc.status, exc.code, exc.message, **({"limit": exc.limit} if exc.limit else {}))
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response, exc.code
    if isinstance(exc, Rejected):  # a bad request or a bad image
        return _error(exc.status, exc.code, exc.message), exc.code
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        code = exc.reason.lower().replace(" ", "_")
        return _error(exc.status, code, f"{exc.reason}: {request.method} {request.path}" + (
            " (the API is POST /caption, GET /health and GET /metrics)" if exc.status in (404, 405) else "")), code
    _log.error("error while handling %s %s", request.method, request.path, exc_info=exc)
    return _error(500, "internal_error", "the server failed on this request; see its log."), "internal_error"


def _top_k(request: web.Request, beam_width: int) -> int:
    raw = request.query.get("top_k")
    if raw is None:
        return beam_width
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= beam_width:
        raise RequestRejected(400, "bad_top_k", f"top_k={raw!r} must be an integer from 1 to {beam_width} "
                              "(the export's beam width).")
    return value


class CaptionService:
    """The handlers, sharing the captioner and the batcher (created on the server's event loop)."""

    def __init__(self, captioner: SavedModelCaptioner, settings: ServerSettings):
        self.captioner = captioner
        self.settings = settings
        self.held_bytes = HeldBytes(settings.max_queued_bytes)
        self.in_flight = 0  # POST /caption requests being handled
        self.draining = False
        self._idle: asyncio.Event | None = None  # set while nothing is in flight
        self.metrics = ServingMetrics(
            queued_images=lambda: self.caller.queued_images, held_bytes=lambda: self.held_bytes.held,
            in_flight=lambda: self.in_flight, dropped_images=lambda: self.caller.stats.dropped_images,
            max_queued_images=settings.max_queued_images, max_queued_bytes=settings.max_queued_bytes)
        if settings.batching:
            self.caller = MicroBatcher(captioner.caption, max_batch_size=settings.max_batch_size,
                                       max_wait_ms=settings.max_wait_ms, num_batch_threads=settings.num_batch_threads,
                                       max_queued_images=settings.max_queued_images, observer=self.metrics)
        else:
            self.caller = UnbatchedCaller(captioner.caption, max_concurrent_calls=settings.max_concurrent_calls,
                                          max_queued_images=settings.max_queued_images, observer=self.metrics)
        with open(PAGE_PATH, encoding="utf-8") as f:
            self.page = f.read()

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """JSON errors for every route; for POST /caption also in-flight counting and the outcome metrics."""
        counted = request.method == "POST" and request.path == "/caption"
        if not counted:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001  (a bug must not take the server down; the log has the trace)
                if isinstance(exc, web.HTTPException) and exc.status < 400:
                    raise
                return _error_response(request, exc)[0]
        start = asyncio.get_running_loop().time()
        self.in_flight += 1
        self._idle.clear()
        try:
            try:
                response, code = await handler(request), "ok"
            except Exception as exc:  # noqa: BLE001
                response, code = _error_response(request, exc)
            self.metrics.answered(response.status, code, asyncio.get_running_loop().time() - start)
            return response
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    def _retry_after_s(self) -> float:
        """About how long the queue takes to drain at the model's speed so far."""
        per_image = self.caller.seconds_per_image()
        return self.caller.queued_images * per_image if per_image else 1.0

    def _queue_full(self, exc: QueueFull) -> Unavailable:
        wait = self._retry_after_s()
        return Unavailable("queue_full_images", f"the server is at capacity: {exc.queued} images are queued and "
                           f"this request's {exc.adding} would take the queue over max_queued_images={exc.limit} "
                           f"(--max_queued_images): retry after {retry_after_seconds(wait)} s.",
                           retry_after_s=wait, limit="max_queued_images")

    def _bytes_full(self, exc: BytesFull) -> Unavailable:
        wait = self._retry_after_s()
        return Unavailable("queue_full_bytes",
                           f"the server is at capacity: it holds {exc.held} bytes of request bodies and this "
                           f"request's {exc.adding} would take it over max_queued_bytes={exc.limit} "
                           f"({exc.limit / 2**20:g} MB, --max_queued_mb): retry after {retry_after_seconds(wait)} s.",
                           retry_after_s=wait, limit="max_queued_bytes")

    def _draining(self) -> Unavailable:
        return Unavailable("draining", "the server is shutting down and takes no new requests: send this one to "
                           "another replica, or again once the server has restarted.", retry_after_s=1)

    async def drain(self) -> None:
        """Stops taking work (503, /health not ready) and waits up to drain_timeout_s for requests in flight.

        Requests still waiting at the bound are answered 503 shutting_down before this returns.
        """
        self.draining = True
        bound = self.settings.drain_timeout_s
        try:
            await asyncio.wait_for(self._idle.wait(), bound)
            return
        except asyncio.TimeoutError:
            pass
        failed = self.caller.fail_waiting(Unavailable(
            "shutting_down", f"the server shut down before this request's images were captioned (requests in "
            f"flight get --drain_timeout_s={bound:g} s to finish): send it again.", retry_after_s=1))
        _log.warning("drain bound of %g s passed: %d waiting images answered 503", bound, failed)
        try:  # their handlers answer at once; give them a moment to write the 503
            await asyncio.wait_for(self._idle.wait(), 5.0)
        except asyncio.TimeoutError:
            pass

    async def on_startup(self, app: web.Application) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        await self.caller.start()

    async def on_cleanup(self, app: web.Application) -> None:
        await self.caller.stop()

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=self.page, content_type="text/html", charset="utf-8")

    async def health(self, request: web.Request) -> web.Response:
        """200 `"ready": true` while serving; 503 `"ready": false` while draining (load balancers stop sending)."""
        c, s = self.captioner, self.settings
        return web.json_response({
            "status": "draining" if self.draining else "ok",
            "ready": not self.draining,
            "model": {"export_dir": c.export_dir, "beam_width": c.beam_width, "image_size": c.image_size,
                      "max_len": c.max_len},
            "limits": {"max_request_bytes": s.max_request_bytes, "max_image_pixels": s.max_image_pixels,
                       "max_images_per_request": s.max_images_per_request,
                       "max_queued_images": s.max_queued_images, "max_queued_bytes": s.max_queued_bytes,
                       "request_timeout_s": s.request_timeout_s, "drain_timeout_s": s.drain_timeout_s},
            "load": {"in_flight": self.in_flight, "queued_images": self.caller.queued_images,
                     "held_bytes": self.held_bytes.held},
            "calls": self.caller.describe(),
        }, status=503 if self.draining else 200)

    async def metrics_text(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def caption(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        if self.draining:
            raise self._draining()
        limit = self.caller.max_queued_images
        if limit is not None and self.caller.queued_images >= limit:  # not even one more image: before reading
            raise self._queue_full(QueueFull(self.caller.queued_images, 1, limit))
        top_k = _top_k(request, self.captioner.beam_width)
        hold = self.held_bytes.hold()
        try:
            return await self._caption(request, top_k, deadline, hold)
        finally:
            hold.release()

    async def _caption(self, request: web.Request, top_k: int, deadline: float, hold) -> web.Response:
        with self.caller.arriving():  # batches forming meanwhile may wait for this request's images
            try:
                async with asyncio.timeout_at(deadline):
                    images = await read_request_images(request, max_bytes=self.settings.max_request_bytes,
                                                       max_images=self.settings.max_images_per_request,
                                                       hold=hold.grow_to)
            except BytesFull as exc:
                raise self._bytes_full(exc) from None
            except TimeoutError:
                raise RequestRejected(408, "request_timeout", f"the request body took longer than "
                                      f"--request_timeout_s={self.settings.request_timeout_s:g} s to arrive: send "
                                      "it faster, or fewer images per request.") from None
            raw_body = len(images) == 1 and images[0].name == "body"
            headers = [check_image(image.data, name="the request body" if raw_body else f"file {image.name!r}",
                                   max_pixels=self.settings.max_image_pixels) for image in images]
        try:
            results = await self.caller.submit([image.data for image in images], deadline=deadline)
        except QueueFull as exc:
            raise self._queue_full(exc) from None
        except DeadlineExceeded:
            wait = self._retry_after_s()
            raise Unavailable("deadline_exceeded", f"the request was still queued at its deadline, "
                              f"--request_timeout_s={self.settings.request_timeout_s:g} s after it arrived, and its "
                              f"images were dropped: the server is overloaded; retry after {retry_after_seconds(wait)} s.",
                              retry_after_s=wait, limit="request_timeout_s") from None
        for image, result in zip(images, results):
            if isinstance(result, ImageDecodeError):
                what = "the request body" if raw_body else f"file {image.name!r}"
                raise RequestRejected(400, "undecodable_image",
                                      f"{what} has a valid header but its image data cannot be decoded "
                                      f"({result.message}): the file is truncated or corrupt; send it again.")
        return web.json_response({
            "images": [{"name": image.name, "format": header.format, "width": header.width,
                        "height": header.height,
                        "captions": [{"caption": c, "score": s}
                                     for c, s in zip(result.captions[:top_k], result.scores[:top_k])]}
                       for image, header, result in zip(images, headers, results)],
            "beam_width": self.captioner.beam_width,
        })


def make_app(captioner: SavedModelCaptioner, settings: ServerSettings = ServerSettings()) -> web.Application:
    service = CaptionService(captioner, settings)
    # aiohttp's own limit as a backstop; read_request_images counts the bytes itself.
    app = web.Application(middlewares=[service.middleware], client_max_size=settings.max_request_bytes + (1 << 16))
    app[DRAIN] = service.drain
    app.on_startup.append(service.on_startup)
    app.on_cleanup.append(service.on_cleanup)
    app.router.add_get("/", service.index)
    app.router.add_get("/health", service.health)
    app.router.add_get("/metrics", service.metrics_text)
    app.router.add_post("/caption", service.caption)
    return app
