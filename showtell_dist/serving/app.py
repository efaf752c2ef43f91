"""The caption server's aiohttp application: POST /caption, GET /health and the web page at /.

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
"""

from __future__ import annotations

import dataclasses
import logging
import os

from aiohttp import web

from showtell_dist.serving.image_checks import Rejected, check_image
from showtell_dist.serving.micro_batcher import MicroBatcher, UnbatchedCaller
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


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "code": code, "message": message}}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler):
    """Every failure as a JSON error: the handlers' rejections, aiohttp's 404/405/413, and bugs as 500."""
    try:
        return await handler(request)
    except Rejected as exc:  # a bad request or a bad image
        return _error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason.lower().replace(" ", "_"),
                      f"{exc.reason}: {request.method} {request.path}" + (
                          " (the API is POST /caption and GET /health)" if exc.status in (404, 405) else ""))
    except Exception:  # noqa: BLE001  (a bug must not take the server down; the log has the trace)
        _log.exception("error while handling %s %s", request.method, request.path)
        return _error(500, "internal_error", "the server failed on this request; see its log.")


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
        if settings.batching:
            self.caller = MicroBatcher(captioner.caption, max_batch_size=settings.max_batch_size,
                                       max_wait_ms=settings.max_wait_ms, num_batch_threads=settings.num_batch_threads)
        else:
            self.caller = UnbatchedCaller(captioner.caption, max_concurrent_calls=settings.max_concurrent_calls)
        with open(PAGE_PATH, encoding="utf-8") as f:
            self.page = f.read()

    async def on_startup(self, app: web.Application) -> None:
        await self.caller.start()

    async def on_cleanup(self, app: web.Application) -> None:
        await self.caller.stop()

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=self.page, content_type="text/html", charset="utf-8")

    async def health(self, request: web.Request) -> web.Response:
        c = self.captioner
        return web.json_response({
            "status": "ok",
            "model": {"export_dir": c.export_dir, "beam_width": c.beam_width, "image_size": c.image_size,
                      "max_len": c.max_len},
            "limits": {"max_request_bytes": self.settings.max_request_bytes,
                       "max_image_pixels": self.settings.max_image_pixels,
                       "max_images_per_request": self.settings.max_images_per_request},
            "calls": self.caller.describe(),
        })

    async def caption(self, request: web.Request) -> web.Response:
        top_k = _top_k(request, self.captioner.beam_width)
        with self.caller.arriving():  # batches forming meanwhile may wait for this request's images
            images = await read_request_images(request, max_bytes=self.settings.max_request_bytes,
                                               max_images=self.settings.max_images_per_request)
            raw_body = len(images) == 1 and images[0].name == "body"
            headers = [check_image(image.data, name="the request body" if raw_body else f"file {image.name!r}",
                                   max_pixels=self.settings.max_image_pixels) for image in images]
        results = await self.caller.submit([image.data for image in images])
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
    app = web.Application(middlewares=[_json_errors], client_max_size=settings.max_request_bytes + (1 << 16))
    app.on_startup.append(service.on_startup)
    app.on_cleanup.append(service.on_cleanup)
    app.router.add_get("/", service.index)
    app.router.add_get("/health", service.health)
    app.router.add_post("/caption", service.caption)
    return app
