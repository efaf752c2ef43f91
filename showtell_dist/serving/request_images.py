"""Reads the images of a POST /caption request: a multipart form, or one image as the raw body.

Every way a request can be unusable raises `RequestRejected` with an HTTP
status, a short code and a message naming the problem and the fix. The body
is read in chunks and counted, so a request over the size limit is refused
after at most `max_bytes` bytes, whatever its Content-Length claims. `hold`
is told the bytes the body takes before they are read (Content-Length) or as
they arrive (no Content-Length), and may refuse them by raising.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from aiohttp import BodyPartReader, web
from aiohttp.helpers import parse_mimetype

from showtell_dist.serving.image_checks import Rejected

RAW_BODY_TYPES = ("application/octet-stream",)  # and every image/* type
CHUNK_BYTES = 1 << 16


class RequestRejected(Rejected):
    """The request itself is malformed (content type, multipart, size, count)."""


@dataclasses.dataclass(frozen=True)
class UploadedImage:
    name: str  # the file name, form field or "body": how errors refer to it
    data: bytes


def _too_large(max_bytes: int) -> RequestRejected:
    return RequestRejected(413, "request_too_large",
                           f"the request body is over the limit of {max_bytes} bytes "
                           f"({max_bytes / 2**20:.1f} MB): send smaller or fewer images (or raise the server's "
                           "--max_request_mb).")


def _empty_body() -> RequestRejected:
    return RequestRejected(400, "empty_body", "the request body is empty: send an image's bytes as the body, or "
                           "images as multipart/form-data file fields.")


class _Budget:
    """Bytes left for the whole request body."""

    def __init__(self, max_bytes: int, hold: Callable[[int], None]):
        self.max_bytes = max_bytes
        self.used = 0
        self._hold = hold

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise _too_large(self.max_bytes)
        self._hold(self.used)


async def _read_stream(read_chunk, budget: _Budget) -> bytes:
    chunks = []
    while True:
        chunk = await read_chunk(CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        budget.take(len(chunk))
        chunks.append(chunk)


def _hold_nothing(total_bytes: int) -> None:
    pass


async def read_request_images(request: web.Request, *, max_bytes: int, max_images: int,
                              hold: Callable[[int], None] = _hold_nothing) -> list[UploadedImage]:
    """The request's images, in order; raises RequestRejected (or what `hold(total_bytes)` raises)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    if not request.body_exists:
        raise _empty_body()
    if request.content_length is not None:
        hold(request.content_length)  # before a byte is read
    budget = _Budget(max_bytes, hold)
    content_type = request.content_type  # without parameters; "application/octet-stream" when absent
    if content_type == "multipart/form-data":
        images = await _read_multipart(request, budget, max_images)
    elif content_type.startswith("image/") or content_type in RAW_BODY_TYPES:
        data = await _read_stream(request.content.read, budget)
        if not data:
            raise _empty_body()
        images = [UploadedImage("body", data)]
    else:
        raise RequestRejected(415, "unsupported_content_type",
                              f"Content-Type {request.headers.get('Content-Type', '')!r} is not accepted: send "
                              "multipart/form-data with image files, or one image as the body with Content-Type "
                              "image/jpeg, image/png (any image/*) or application/octet-stream.")
    return images


async def _read_multipart(request: web.Request, budget: _Budget, max_images: int) -> list[UploadedImage]:
    def malformed(detail) -> RequestRejected:
        return RequestRejected(400, "malformed_multipart",
                               f"the multipart/form-data body is malformed ({detail}): send a well-formed form "
                               "whose Content-Type carries its boundary, e.g. with curl -F image=@photo.jpg.")

    if not parse_mimetype(request.headers.get("Content-Type", "")).parameters.get("boundary"):
        raise malformed("its Content-Type has no boundary parameter")
    images, fields = [], []
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise malformed("nested multipart parts are not supported")
            name = part.filename or part.name or f"part {len(images) + 1}"
            data = await _read_stream(part.read_chunk, budget)
            if part.filename is None and part.headers.get("Content-Type", "text/plain").startswith("text/"):
                fields.append(name)  # a plain form field (text, a submit button), not a file
                continue
            if len(images) == max_images:
                raise RequestRejected(400, "too_many_images", f"the request holds more than {max_images} images: "
                                      "send at most that many per request.")
            images.append(UploadedImage(name, data))
    except RequestRejected:
        raise
    except (ValueError, RuntimeError, AssertionError, LookupError) as exc:
        raise malformed(exc) from exc
    if not images:
        raise RequestRejected(400, "no_images", f"the multipart form holds no files, only the text fields "
                              f"{fields}: add image files to it (a part with a filename or an image Content-Type).")
    return images
