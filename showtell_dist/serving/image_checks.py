"""Checks an uploaded image's header before anything decodes it.

The header says the format and the dimensions, so an image the model cannot
decode, or one whose pixels would not fit in memory (a "decompression bomb":
a small file declaring e.g. 50000 x 50000 pixels), is refused without
decoding a single pixel.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

from PIL import Image

# PIL format names of what the export's tf.io.decode_image reads (MPO: a camera JPEG with previews).
DECODABLE_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "GIF": "GIF", "BMP": "BMP"}


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    format: str  # JPEG, PNG, GIF or BMP
    width: int
    height: int


class Rejected(Exception):
    """A client error: an HTTP `status` (4xx), a short machine-readable `code` and a message naming the fix."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ImageRejected(Rejected):
    """The bytes are not an image the server will caption; `code` and `status` say why."""


def check_image(data: bytes, *, name: str, max_pixels: int) -> ImageHeader:
    """Returns the format and size from `data`'s header, or raises ImageRejected naming `name`."""
    if not data:
        raise ImageRejected(400, "empty_image", f"{name} is empty (0 bytes): send the image file's bytes.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                pil_format, (width, height) = image.format, image.size
        except Image.DecompressionBombError as exc:
            raise ImageRejected(413, "image_too_many_pixels",
                                f"{name} declares far too many pixels, as a decompression bomb does ({exc}); the "
                                f"limit is {max_pixels} pixels: send a smaller image.") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected(400, "not_an_image",
                                f"{name} is not an image ({len(data)} bytes starting {data[:8]!r}): "
                                "send a JPEG, PNG, GIF or BMP file.") from exc
    if pil_format not in DECODABLE_FORMATS:
        raise ImageRejected(415, "unsupported_image_format",
                            f"{name} is a {pil_format} image, which the model cannot decode: "
                            "convert it to JPEG, PNG, GIF or BMP.")
    if width < 1 or height < 1:
        raise ImageRejected(400, "empty_image", f"{name} has no pixels ({width} x {height}).")
    if width * height > max_pixels:
        raise ImageRejected(413, "image_too_many_pixels",
                            f"{name} is {width} x {height} = {width * height} pixels, over the limit of "
                            f"{max_pixels}: send a smaller image (or raise the server's --max_image_megapixels).")
    return ImageHeader(DECODABLE_FORMATS[pil_format], width, height)
