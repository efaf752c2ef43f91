"""Tests for showtell_dist.data.images."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFile

from showtell_dist.data.images import ImageError, load_image_as_jpeg
from showtell_dist.errors import ConfigError, DataError

FLICKR8K_IMAGES = "/work/shared/data/flickr8k/images"
HEIGHT, WIDTH = 12, 20  # non-square, to catch swapped dimensions


def _rgb_pixels() -> np.ndarray:
    """A [HEIGHT, WIDTH, 3] uint8 gradient (compresses like a real image)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([x * 12, y * 20, (x + y) * 8], axis=-1).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _decode(jpeg: bytes) -> np.ndarray:
    """Decodes with TensorFlow, keeping the channel count stored in the JPEG."""
    return tf.io.decode_jpeg(jpeg, channels=0).numpy()  # [height, width, channels]


def test_baseline_rgb_jpeg_is_passed_through_unchanged(tmp_path):
    data = _encode(Image.fromarray(_rgb_pixels()), "JPEG", quality=80)
    path = _write(tmp_path, "rgb.jpg", data)

    jpeg, height, width = load_image_as_jpeg(path)

    assert jpeg == data
    assert (height, width) == (HEIGHT, WIDTH)


def _rgba_png() -> bytes:
    rgba = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    rgba[:, : WIDTH // 2] = (255, 0, 0, 255)  # left half opaque red
    # right half fully transparent black: must become white, not black
    return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def _palette_gif() -> bytes:
    return _encode(Image.fromarray(_rgb_pixels()).convert("P"), "GIF")


def _transparent_palette_png() -> bytes:
    img = Image.new("P", (WIDTH, HEIGHT), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(0, (WIDTH // 2, 0, WIDTH, HEIGHT))  # right half: index 0, transparent
    return _encode(img, "PNG", transparency=0)


@pytest.mark.parametrize(
    "name, make_bytes",
    [
        ("rgba.png", _rgba_png),
        ("grey.jpg", lambda: _encode(Image.fromarray(_rgb_pixels()).convert("L"), "JPEG")),
        ("cmyk.jpg", lambda: _encode(Image.fromarray(_rgb_pixels()).convert("CMYK"), "JPEG")),
        ("palette.gif", _palette_gif),
        ("palette_alpha.png", _transparent_palette_png),
        ("la.png", lambda: _encode(Image.fromarray(_rgb_pixels()).convert("LA"), "PNG")),
        ("bilevel.png", lambda: _encode(Image.fromarray(_rgb_pixels()).convert("1"), "PNG")),
        ("rgb.png", lambda: _encode(Image.fromarray(_rgb_pixels()), "PNG")),
        (
            "progressive.jpg",
            lambda: _encode(Image.fromarray(_rgb_pixels()), "JPEG", progressive=True),
        ),
    ],
)
def test_other_images_are_converted_to_rgb_jpeg(tmp_path, name, make_bytes):
    data = make_bytes()
    path = _write(tmp_path, name, data)

    jpeg, height, width = load_image_as_jpeg(path)

    assert jpeg != data
    assert (height, width) == (HEIGHT, WIDTH)
    assert _decode(jpeg).shape == (HEIGHT, WIDTH, 3)


@pytest.mark.parametrize("make_bytes", [_rgba_png, _transparent_palette_png])
def test_transparency_is_composited_on_white(tmp_path, make_bytes):
    jpeg, _, _ = load_image_as_jpeg(_write(tmp_path, "alpha.png", make_bytes()))

    pixels = _decode(jpeg).astype(int)
    assert np.all(np.abs(pixels[:, -2:] - 255) <= 8)  # transparent -> white
    assert np.all(np.abs(pixels[:, :2] - (255, 0, 0)) <= 8)  # opaque red kept


def test_16_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    grey16 = np.full((HEIGHT, WIDTH), 32768, np.uint16)  # mid-grey in 16 bits
    path = _write(tmp_path, "grey16.png", _encode(Image.fromarray(grey16), "PNG"))

    jpeg, _, _ = load_image_as_jpeg(path)

    assert np.all(np.abs(_decode(jpeg).astype(int) - 128) <= 2)


def test_quality_applies_to_reencoded_images(tmp_path):
    path = _write(tmp_path, "rgb.png", _encode(Image.fromarray(_rgb_pixels()), "PNG"))

    low, _, _ = load_image_as_jpeg(path, quality=10)
    high, _, _ = load_image_as_jpeg(path, quality=95)

    assert len(low) < len(high)


@pytest.mark.parametrize("quality", [0, 101, 9.5, True])
def test_invalid_quality_is_a_config_error(tmp_path, quality):
    path = _write(tmp_path, "rgb.png", _encode(Image.fromarray(_rgb_pixels()), "PNG"))
    with pytest.raises(ConfigError, match="quality"):
        load_image_as_jpeg(path, quality=quality)


def _assert_image_error(path: str, reason: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image_as_jpeg(path)
    error = info.value
    assert isinstance(error, DataError)
    assert error.reason == reason
    assert str(error).startswith(f"{path}: {reason}")
    assert "remove the image" in str(error)  # says how to fix it


def _truncated(fmt: str) -> bytes:
    """First half of a noisy 64x64 image: the header is intact, pixel data is cut."""
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), fmt)
    cut = data[: len(data) // 2]
    Image.open(io.BytesIO(cut))  # still opens: only decoding the pixels can notice
    return cut


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_an_error(tmp_path, fmt):
    path = _write(tmp_path, f"cut.{fmt.lower()}", _truncated(fmt))
    _assert_image_error(path, "corrupt or truncated")


def test_truncation_is_detected_even_if_pillow_is_told_to_accept_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)

    _assert_image_error(_write(tmp_path, "cut.jpg", _truncated("JPEG")), "corrupt or truncated")

    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_non_image_is_an_error(tmp_path):
    _assert_image_error(_write(tmp_path, "notes.jpg", b"these are not pixels\n"), "not an image")


def test_empty_file_is_an_error(tmp_path):
    _assert_image_error(_write(tmp_path, "empty.jpg", b""), "empty file")


def test_missing_file_is_an_error(tmp_path):
    _assert_image_error(str(tmp_path / "absent.jpg"), "missing")


def test_directory_is_an_error(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    _assert_image_error(str(tmp_path / "dir.jpg"), "unreadable")


@pytest.mark.skipif(not os.path.isdir(FLICKR8K_IMAGES), reason=f"{FLICKR8K_IMAGES} not present")
def test_real_flickr8k_jpeg_is_passed_through():
    path = os.path.join(FLICKR8K_IMAGES, sorted(os.listdir(FLICKR8K_IMAGES))[0])

    jpeg, height, width = load_image_as_jpeg(path)

    with open(path, "rb") as f:
        assert jpeg == f.read()
    assert _decode(jpeg).shape == (height, width, 3)
