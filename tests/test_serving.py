"""The caption server on loopback: concurrent clients, every bad input, the launcher and the web page."""

import asyncio
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import aiohttp
import numpy as np
import pytest
from PIL import Image

from showtell_dist.serving import BackgroundServer, SavedModelCaptioner, ServerSettings, make_app
from serving_testing import BEAM, direct as _direct, export_dir, make_image as _image  # noqa: F401  (a fixture)
from tiny_setup import REPO_ROOT

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=120)


@pytest.fixture(scope="module")
def captioner(export_dir):
    return SavedModelCaptioner.load(export_dir)


async def _post(session, url, data, content_type=None, params=None):
    headers = {"Content-Type": content_type} if content_type else {}
    async with session.post(url + "/caption", data=data, headers=headers, params=params) as response:
        return response.status, await response.json()


def _form(*images):
    form = aiohttp.FormData()
    for name, data in images:
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
    return form


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no_batching"])
def test_concurrent_clients_get_what_the_saved_model_returns(captioner, export_dir, batching):
    images = [_image(seed, "PNG" if seed % 3 == 0 else "JPEG") for seed in range(12)]
    expected = _direct(export_dir, images)
    # Requests: 8 single raw-body images and 2 multipart pairs, all sent at once.
    requests = [[i] for i in range(8)] + [[8, 9], [10, 11]]
    settings = ServerSettings(batching=batching, max_batch_size=6, max_wait_ms=20)

    async def clients(url):
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            async def one(indices):
                if len(indices) == 1:
                    return await _post(session, url, images[indices[0]], "image/jpeg")
                return await _post(session, url, _form(*[(f"img{i}.png", images[i]) for i in indices]))

            replies = await asyncio.gather(*[one(r) for r in requests])
            async with session.get(url + "/health") as response:
                return replies, await response.json()

    with BackgroundServer(make_app(captioner, settings)) as server:
        replies, health = asyncio.run(clients(server.url))
    for indices, (status, body) in zip(requests, replies):
        assert status == 200, body
        assert [img["name"] for img in body["images"]] == (
            ["body"] if len(indices) == 1 else [f"img{i}.png" for i in indices])
        for i, img in zip(indices, body["images"]):
            want_captions, want_scores = expected[i]
            assert [c["caption"] for c in img["captions"]] == want_captions
            np.testing.assert_allclose([c["score"] for c in img["captions"]], want_scores, rtol=1e-5, atol=1e-5)
            assert (img["width"], img["height"]) == (56, 40)
    calls = health["calls"]
    assert calls["batching"] is batching and calls["images"] == 12
    assert calls["largest_batch"] <= (6 if batching else 2)


def _png_header_only(width: int, height: int) -> bytes:
    """A small PNG file whose header declares width x height pixels (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def _bad_requests():
    """(what, content type or None, body, query, expected status, expected code, words the message must name)."""
    jpeg = _image(1)
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    boundary = "b0undary"
    no_files = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
                f"--{boundary}--\r\n").encode()

    async def chunked(data):
        for start in range(0, len(data), 65536):
            yield data[start:start + 65536]

    return [
        ("not an image", "image/jpeg", b"this is a text file, not a picture", None, 400, "not_an_image",
         ["not an image"]),
        ("empty body", "image/png", b"", None, 400, "empty_body", ["empty"]),
        ("over the size limit", "image/jpeg", jpeg + b"\0" * 300_000, None, 413, "request_too_large",
         ["300000 bytes"]),
        ("over the size limit, chunked", "image/jpeg", lambda: chunked(b"\0" * 400_000), None, 413,
         "request_too_large", ["300000 bytes"]),
        ("bomb over the server's pixel limit", "image/png", _png_header_only(5000, 5000), None, 413,
         "image_too_many_pixels", ["5000 x 5000", "1000000"]),
        ("bomb over PIL's limit", "image/png", _png_header_only(100_000, 100_000), None, 413,
         "image_too_many_pixels", ["decompression bomb"]),
        ("unsupported image format", "image/tiff", tiff.getvalue(), None, 415, "unsupported_image_format",
         ["TIFF"]),
        ("truncated image data", "image/jpeg", jpeg[:len(jpeg) * 2 // 3], None, 400, "undecodable_image",
         ["cannot be decoded"]),
        ("wrong content type", "text/plain", jpeg, None, 415, "unsupported_content_type", ["text/plain"]),
        ("json content type", "application/json", b"{}", None, 415, "unsupported_content_type",
         ["application/json"]),
        ("multipart without boundary", "multipart/form-data", jpeg, None, 400, "malformed_multipart",
         ["boundary"]),
        ("multipart with a wrong boundary", "multipart/form-data; boundary=elsewhere", jpeg, None, 400,
         "malformed_multipart", ["elsewhere"]),
        ("multipart cut short", f"multipart/form-data; boundary={boundary}",
         f"--{boundary}\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a.jpg\"\r\n\r\n".encode()
         + jpeg[:100], None, 400, "malformed_multipart", ["malformed"]),
        ("multipart without files", f"multipart/form-data; boundary={boundary}", no_files, None, 400, "no_images",
         ["no files", "note"]),
        ("empty multipart", f"multipart/form-data; boundary={boundary}", b"", None, 400, "empty_body", ["empty"]),
        ("bad top_k", "image/jpeg", jpeg, {"top_k": "7"}, 400, "bad_top_k", ["top_k", "1 to 3"]),
        ("too many images", None, lambda: _form(*[(f"{i}.jpg", jpeg) for i in range(5)]), None, 400,
         "too_many_images", ["4 images"]),
    ]


def test_every_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(captioner):
    settings = ServerSettings(max_request_bytes=300_000, max_image_pixels=1_000_000, max_images_per_request=4)
    good = _image(2)

    async def scenario(url):
        outcomes = []
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            for what, content_type, body, params, status, code, words in _bad_requests():
                data = body() if callable(body) else body
                outcomes.append((what, status, code, words, await _post(session, url, data, content_type, params)))
                outcomes.append((f"good request after {what}", 200, None, [],
                                 await _post(session, url, good, "image/jpeg")))
            async with session.get(url + "/caption") as response:
                outcomes.append(("GET /caption", 405, "method_not_allowed", ["POST /caption"],
                                 (response.status, await response.json())))
            async with session.get(url + "/nothing") as response:
                outcomes.append(("unknown path", 404, "not_found", ["/nothing"],
                                 (response.status, await response.json())))
        return outcomes

    with BackgroundServer(make_app(captioner, settings)) as server:
        outcomes = asyncio.run(scenario(server.url))
    for what, want_status, want_code, words, (status, body) in outcomes:
        assert status == want_status, (what, body)
        if want_status == 200:
            assert len(body["images"][0]["captions"]) >= 1, (what, body)
            continue
        error = body["error"]
        assert error["code"] == want_code and error["status"] == want_status, (what, error)
        for word in words:
            assert word in error["message"], (what, word, error["message"])


def test_top_k_limits_the_captions(captioner):
    async def scenario(url):
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            return await _post(session, url, _image(3), "image/jpeg", {"top_k": "1"})

    with BackgroundServer(make_app(captioner, ServerSettings())) as server:
        status, body = asyncio.run(scenario(server.url))
    assert status == 200 and len(body["images"][0]["captions"]) == 1


IMPORTS_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from showtell_dist.serving import SavedModelCaptioner, make_app
make_app(SavedModelCaptioner.load(sys.argv[2]))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("showtell_dist", "tensorflow_text"))))
"""


def test_serving_imports_no_model_or_training_code(export_dir):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", IMPORTS_SCRIPT, REPO_ROOT, export_dir], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(m == "showtell_dist" or m.startswith(("showtell_dist.serving", "showtell_dist.errors"))
               for m in imported), imported


@pytest.mark.slow
def test_serve_launcher_serves_a_model_dir_and_stops_on_sigterm(export_dir, tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    os.symlink(export_dir, model_dir / "export")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "launch", "serve.py"),
                             f"--model_dir={model_dir}", "--port=0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving DIR (...) at http://127.0.0.1:PORT"
        assert "at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.strip().rsplit(" ", 1)[1]

        async def scenario():
            async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
                async with session.get(url + "/health") as response:
                    health = await response.json()
                return health, await _post(session, url, _image(4), "image/jpeg")

        health, (status, body) = asyncio.run(scenario())
        assert health["status"] == "ok" and health["model"]["beam_width"] == BEAM
        assert status == 200 and body["images"][0]["captions"], body
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=60)
    assert returncode == 0, proc.stderr.read()[-3000:]


def test_serve_launcher_explains_a_missing_export(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", "serve.py"),
                           f"--model_dir={tmp_path}", "--port=0"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2
    assert "launch/export.py" in proc.stderr and str(tmp_path) in proc.stderr, proc.stderr[-2000:]


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium_driver(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("needs Debian's chromium and chromium-driver packages "
                    "(apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900"]:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    return webdriver.Chrome(options=options, service=service)


def test_web_page_captions_an_uploaded_image_in_headless_chromium(captioner, export_dir, tmp_path):
    image = _image(5)
    path = tmp_path / "photo.jpg"
    path.write_bytes(image)
    want_captions, want_scores = _direct(export_dir, [image])[0]
    driver = _chromium_driver(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        with BackgroundServer(make_app(captioner, ServerSettings())) as server:
            driver.set_page_load_timeout(60)
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "beam width 3" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "file-input").send_keys(str(path))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#captions li")) == len(want_captions))
            shown = [li.find_element(By.CLASS_NAME, "caption").text
                     for li in driver.find_elements(By.CSS_SELECTOR, "#captions li")]
            scores = [float(li.find_element(By.CLASS_NAME, "score").text)
                      for li in driver.find_elements(By.CSS_SELECTOR, "#captions li")]
            preview_width = driver.execute_script("return document.getElementById('preview').naturalWidth")
            screenshot = tmp_path / "page.png"
            assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert shown == want_captions
    np.testing.assert_allclose(scores, want_scores, atol=1e-3)  # shown with 3 decimals
    assert preview_width == 56  # the uploaded image is displayed beside its captions
    assert screenshot.stat().st_size > 1000
