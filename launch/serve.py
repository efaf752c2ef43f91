"""Serves an exported captioner over HTTP on 127.0.0.1 (a web page at /, POST /caption, GET /health).

  python launch/serve.py --model_dir=runs/demo                   # its export: runs/demo/export
  python launch/serve.py --export_dir=/tmp/captioner --port=8500 --max_batch_size=64
  curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg http://127.0.0.1:8080/caption
  curl -F a=@one.jpg -F b=@two.png 'http://127.0.0.1:8080/caption?top_k=1'
  curl http://127.0.0.1:8080/metrics                             # Prometheus text format

Only the SavedModel is loaded (written by launch/export.py); the toolkit's
model and training code are not imported. Concurrent requests are
micro-batched into one call of the export's batched signature. Over the queue
bounds (--max_queued_images, --max_queued_mb) or past --request_timeout_s a
request gets 503 with Retry-After; SIGTERM drains (503 for new work, requests
in flight finish within --drain_timeout_s) and exits 0.
"""

import _bootstrap  # noqa: F401  (puts the repo on sys.path)
from absl import app, flags

import cli

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "SavedModel written by launch/export.py (local or gs://).")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A training run's model_dir: serves its export (model_dir/export).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind. The default accepts local connections only; "
                            "another address (e.g. 0.0.0.0) exposes the server to the network.")
_PORT = flags.DEFINE_integer("port", 8080, "TCP port (0: any free port; the URL is printed).")
_MAX_REQUEST_MB = flags.DEFINE_float("max_request_mb", 10.0, "Largest request body accepted, in MB (2^20 bytes).")
_MAX_MEGAPIXELS = flags.DEFINE_float("max_image_megapixels", 40.0, "Largest image accepted, in millions of "
                                     "pixels (width x height from its header, checked before decoding).")
_MAX_IMAGES = flags.DEFINE_integer("max_images_per_request", 32, "Most images in one multipart request.")
_BATCHING = flags.DEFINE_boolean("batching", True, "Micro-batch concurrent requests into one model call "
                                 "(--nobatching: one call per request).")
_MAX_BATCH = flags.DEFINE_integer("max_batch_size", 32, "Most images per model call when batching.")
_BATCH_TIMEOUT_MS = flags.DEFINE_float("batch_timeout_ms", 5.0, "How long a batch's first image may wait for "
                                       "more before the batch runs, in milliseconds.")
_BATCH_THREADS = flags.DEFINE_integer("num_batch_threads", 2, "Batches the model runs at once when batching.")
_MAX_CALLS = flags.DEFINE_integer("max_concurrent_calls", 1, "With --nobatching: model calls running at once "
                                  "(default one at a time).")
_MAX_QUEUED_IMAGES = flags.DEFINE_integer(
    "max_queued_images", 1024, "Most images waiting for a model call; a request that would queue more gets 503 "
    "with Retry-After (0: unbounded). The default waits about 15 s at the Flickr8k export's 69 images/s on 2 "
    "cores: keep it under images/s x --request_timeout_s.")
_MAX_QUEUED_MB = flags.DEFINE_float(
    "max_queued_mb", 256.0, "Most MB (2^20 bytes) of request bodies held at once, from reading to answer; a "
    "request that would hold more gets 503 with Retry-After, before its body is read when Content-Length says so "
    "(0: unbounded). Bounds peak memory: about idle + 2 x this.")
_REQUEST_TIMEOUT_S = flags.DEFINE_float("request_timeout_s", 30.0, "Each request's deadline from arrival: still "
                                        "queued then, it gets 503 deadline_exceeded and its images leave the queue.")
_DRAIN_TIMEOUT_S = flags.DEFINE_float("drain_timeout_s", 30.0, "On SIGTERM: new requests get 503 and /health "
                                      "ready:false while those in flight get this long to finish; then exit 0.")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def main(argv):
    del argv
    with cli.user_errors():
        from showtell_dist.errors import ConfigError

        if bool(_EXPORT_DIR.value) == bool(_MODEL_DIR.value):
            raise ConfigError("give exactly one of --export_dir (a SavedModel) or --model_dir (a training run, "
                              "whose export in model_dir/export is served).")
        for name, value in (("max_request_mb", _MAX_REQUEST_MB.value), ("max_image_megapixels", _MAX_MEGAPIXELS.value),
                            ("max_images_per_request", _MAX_IMAGES.value), ("max_batch_size", _MAX_BATCH.value),
                            ("num_batch_threads", _BATCH_THREADS.value),
                            ("max_concurrent_calls", _MAX_CALLS.value)):
            if value <= 0:
                raise ConfigError(f"--{name}={value} must be positive.")
        if _BATCH_TIMEOUT_MS.value < 0:
            raise ConfigError(f"--batch_timeout_ms={_BATCH_TIMEOUT_MS.value} must not be negative.")
        for name, value in (("max_queued_images", _MAX_QUEUED_IMAGES.value), ("max_queued_mb", _MAX_QUEUED_MB.value)):
            if value < 0:
                raise ConfigError(f"--{name}={value} must not be negative (0: unbounded).")
        for name, value in (("request_timeout_s", _REQUEST_TIMEOUT_S.value),
                            ("drain_timeout_s", _DRAIN_TIMEOUT_S.value)):
            if not value > 0:
                raise ConfigError(f"--{name}={value} must be positive.")
        max_queued_bytes = int(_MAX_QUEUED_MB.value * 2**20) or None
        if max_queued_bytes is not None and max_queued_bytes < int(_MAX_REQUEST_MB.value * 2**20):
            raise ConfigError(f"--max_queued_mb={_MAX_QUEUED_MB.value:g} is below --max_request_mb="
                              f"{_MAX_REQUEST_MB.value:g}: a request at the size limit could never be held; raise "
                              "--max_queued_mb or lower --max_request_mb.")
        if 0 < _MAX_QUEUED_IMAGES.value < _MAX_IMAGES.value:
            raise ConfigError(f"--max_queued_images={_MAX_QUEUED_IMAGES.value} is below --max_images_per_request="
                              f"{_MAX_IMAGES.value}: a request with that many images could never be queued; raise "
                              "--max_queued_images or lower --max_images_per_request.")
        from showtell_dist.run.run_dir import RunDir
        from showtell_dist.serving import SavedModelCaptioner, ServerSettings, make_app, serve_forever

        export_dir = _EXPORT_DIR.value or RunDir(_MODEL_DIR.value).export

        captioner = SavedModelCaptioner.load(export_dir)
        settings = ServerSettings(
            max_request_bytes=int(_MAX_REQUEST_MB.value * 2**20),
            max_image_pixels=int(_MAX_MEGAPIXELS.value * 1e6),
            max_images_per_request=_MAX_IMAGES.value, batching=_BATCHING.value, max_batch_size=_MAX_BATCH.value,
            max_wait_ms=_BATCH_TIMEOUT_MS.value, num_batch_threads=_BATCH_THREADS.value,
            max_concurrent_calls=_MAX_CALLS.value, max_queued_images=_MAX_QUEUED_IMAGES.value or None,
            max_queued_bytes=max_queued_bytes, request_timeout_s=_REQUEST_TIMEOUT_S.value,
            drain_timeout_s=_DRAIN_TIMEOUT_S.value)
        application = make_app(captioner, settings)

    def on_ready(url):
        if _HOST.value not in _LOOPBACK:
            print(f"warning: bound to {_HOST.value}: anyone who can reach this machine can use the server.",
                  flush=True)
        batching = (f"micro-batching up to {settings.max_batch_size} images, {settings.max_wait_ms:g} ms"
                    if settings.batching else "no batching")
        print(f"serving {export_dir} (beam width {captioner.beam_width}, {batching}) at {url}", flush=True)

    def on_draining():
        print(f"draining: new requests get 503 while those in flight finish (at most "
              f"{settings.drain_timeout_s:g} s)", flush=True)

    try:
        serve_forever(application, _HOST.value, _PORT.value, on_ready=on_ready, on_draining=on_draining)
    except OSError as exc:
        with cli.user_errors():
            from showtell_dist.errors import ConfigError

            raise ConfigError(f"cannot listen on {_HOST.value}:{_PORT.value} ({exc.strerror or exc}): choose "
                              "another --port (0 picks a free one) or --host.") from exc


if __name__ == "__main__":
    app.run(main)
