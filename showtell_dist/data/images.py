"""Loading dataset images as RGB JPEG bytes.

The input pipeline stores every image as a JPEG that `tf.io.decode_jpeg`
decodes to 3 channels. `load_image_as_jpeg` reads an image from a local path
or any `tf.io.gfile` URL (gs://, hdfs://, ...), fully decodes it with Pillow
to catch corrupt and truncated files before they reach training, and either
passes a baseline RGB JPEG through byte for byte or converts anything else
(PNG, GIF, greyscale, palette, alpha, CMYK, 16-bit, progressive JPEG, ...) to
RGB and re-encodes it.

Pixels are taken as stored: EXIF orientation is not applied, so the returned
height and width are those `tf.io.decode_jpeg` reports for the returned bytes.
Of multi-frame files (animated GIF/PNG) only the first frame is used.
"""

import contextlib
import io
import threading

import numpy as np
import tensorflow as tf
from PIL import Image, ImageFile, UnidentifiedImageError

from showtell_dist.errors import ConfigError, DataError

# Hints appended to ImageError messages, by reason.
_REMOVE_HINT = "remove the image from the caption and split files"
_HINTS = {
    "missing": f"Check the path and the image directory, or {_REMOVE_HINT}.",
    "unreadable": f"Fix the file's permissions, or {_REMOVE_HINT}.",
    "empty file": f"Re-download or re-export the image, or {_REMOVE_HINT}.",
    "not an image": (
        "Pillow cannot identify the file as an image; replace it with a "
        f"JPEG or PNG, or {_REMOVE_HINT}."
    ),
    "corrupt or truncated": f"Re-download or re-export the image, or {_REMOVE_HINT}.",
    "zero-size image": f"Replace the image, or {_REMOVE_HINT}.",
    "too large": (
        "The image exceeds Pillow's decompression-bomb limit "
        f"(PIL.Image.MAX_IMAGE_PIXELS); downscale it, or {_REMOVE_HINT}."
    ),
    "unsupported color mode": (
        f"Convert the image to RGB with an image editor, or {_REMOVE_HINT}."
    ),
}


class ImageError(DataError):
    """An image file cannot be used: missing, unreadable, empty, corrupt, ...

    Attributes:
      path: the image path or URL as given.
      reason: a short, fixed string naming the problem ("missing",
        "unreadable", "empty file", "not an image", "corrupt or truncated",
        "zero-size image", "too large" or "unsupported color mode"), suitable
        for grouping skipped images in a report.
    """

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path = path
        self.reason = reason
        message = f"{path}: {reason}"
        if detail:
            message += f" ({detail})"
        super().__init__(f"{message}. {_HINTS[reason]}")


# `ImageFile.LOAD_TRUNCATED_IMAGES` is process-global; other code may set it
# to True, which makes Pillow pad truncated images with grey instead of
# raising. `_strict_truncation` forces it to False while at least one decode
# is in progress (decodes may overlap across threads) and restores the
# previous value when the last one finishes.
_truncation_lock = threading.Lock()
_strict_decodes = 0  # number of decodes currently inside _strict_truncation
_saved_load_truncated = False  # the flag's value before the first of them


@contextlib.contextmanager
def _strict_truncation():
    """Make Pillow raise on truncated image data for the duration of the block."""
    global _strict_decodes, _saved_load_truncated
    with _truncation_lock:
        if _strict_decodes == 0:
            _saved_load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_decodes += 1
    try:
        yield
    finally:
        with _truncation_lock:
            _strict_decodes -= 1
            if _strict_decodes == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_load_truncated


def _read_bytes(path: str) -> bytes:
    """Returns the file's contents; raises ImageError if it is absent or unreadable.

    Other I/O failures (e.g. a transient network error on a remote file
    system) are not the user's doing and propagate unchanged.
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError:
        raise ImageError(path, "missing") from None
    except tf.errors.PermissionDeniedError as e:
        raise ImageError(path, "unreadable", e.message) from None
    except tf.errors.FailedPreconditionError as e:  # e.g. the path is a directory
        raise ImageError(path, "unreadable", e.message) from None


def _is_baseline_rgb_jpeg(img: Image.Image) -> bool:
    """True for a sequential (non-progressive) 3-channel RGB/YCbCr JPEG."""
    return (
        img.format == "JPEG"
        and img.mode == "RGB"
        and not img.info.get("progressive")
        and not img.info.get("progression")
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts a fully loaded image of any Pillow mode to mode RGB.

    Transparent pixels are composited on white. High bit-depth greyscale is
    rescaled rather than clipped: "I;16*" and "I" are taken to hold 16-bit
    values (0..65535), "F" to hold values in [0, 1].
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)  # [height, width]
        scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image_as_jpeg(path: str, quality: int = 95) -> tuple[bytes, int, int]:
    """Reads an image and returns it as RGB JPEG bytes.

    Args:
      path: local path or `tf.io.gfile` URL of an image in any format Pillow
        reads.
      quality: JPEG quality (1..100) used when the image has to be re-encoded.

    Returns:
      (jpeg_bytes, height, width). A valid baseline RGB JPEG is returned with
      its original bytes unchanged; anything else is converted to RGB and
      re-encoded. `tf.io.decode_jpeg(jpeg_bytes, channels=3)` yields a
      [height, width, 3] uint8 tensor.

    Raises:
      ImageError: the file is missing, unreadable, empty, not an image,
        corrupt or truncated, has zero width or height, is too large to
        decode safely, or has a colour mode that cannot be converted to RGB.
      ConfigError: quality is not an integer in 1..100.
    """
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be an integer in 1..100, got {quality!r}.")
    data = _read_bytes(path)
    if not data:
        raise ImageError(path, "empty file")
    try:
        with _strict_truncation():
            img = Image.open(io.BytesIO(data))
            img.load()  # decodes every pixel: raises on corrupt or truncated data
    except UnidentifiedImageError:
        raise ImageError(path, "not an image") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, "too large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow's decoders signal broken data with any of these.
        raise ImageError(path, "corrupt or truncated", str(e)) from None
    width, height = img.size
    if width == 0 or height == 0:
        raise ImageError(path, "zero-size image", f"{width}x{height}")
    if _is_baseline_rgb_jpeg(img):
        return data, height, width
    try:
        rgb = _to_rgb(img)
    except ValueError as e:  # Pillow has no conversion for this mode
        raise ImageError(path, "unsupported color mode", f"{img.mode}: {e}") from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), height, width
