"""The caption server's Prometheus metrics (GET /metrics), kept in a registry of the app's own.

Every app gets its own `CollectorRegistry`, so several apps (tests, benchmarks)
live in one process without clashing. Families (all prefixed `showtell_`):

  caption_requests_total{outcome, code}       POST /caption answers: outcome ok (200), client_error (4xx,
                                              code = the error code), shed (503 queue_full_images /
                                              queue_full_bytes), deadline (503 deadline_exceeded),
                                              draining (503 draining / shutting_down), server_error (500)
  caption_request_latency_seconds{outcome}    histogram, arrival to answer
  caption_queue_wait_seconds                  histogram per image, queued to taken into a model call
  caption_model_call_seconds                  histogram per model call
  caption_batch_size                          histogram of images per model call
  caption_queue_images                        gauge: images queued, not yet in a model call
  caption_queue_bytes                         gauge: bytes of request bodies held (reading to answer)
  caption_requests_in_flight                  gauge: POST /caption requests being handled
  caption_queue_limit_images / _bytes         gauges: the configured bounds
  caption_dropped_images_total                counter: images that left the queue unanswered (deadline,
                                              client gone, drain bound)
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily

from showtell_dist.serving.micro_batcher import CallObserver

PREFIX = "showtell_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OUTCOMES = ("ok", "client_error", "shed", "deadline", "draining", "server_error")
SHED_CODES = ("queue_full_images", "queue_full_bytes")
DRAINING_CODES = ("draining", "shutting_down")


def outcome_of(status: int, code: str) -> str:
    if status < 400:
        return "ok"
    if status == 503 and code in SHED_CODES:
        return "shed"
    if status == 503 and code == "deadline_exceeded":
        return "deadline"
    if status == 503 and code in DRAINING_CODES:
        return "draining"
    if status < 500:
        return "client_error"
    return "server_error"


class _CounterOf:
    """A counter whose value the server keeps elsewhere (read when scraped)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]):
        self._name, self._documentation, self._read = name, documentation, read

    def describe(self):
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self):
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class ServingMetrics(CallObserver):
    """The metrics of one app; the gauges read the server's state when scraped."""

    def __init__(self, *, queued_images: Callable[[], float], held_bytes: Callable[[], float],
                 in_flight: Callable[[], float], dropped_images: Callable[[], float],
                 max_queued_images: int | None, max_queued_bytes: int | None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(PREFIX + "caption_requests", "POST /caption answers by outcome and error code "
                                "(code 'ok' for 200).", ["outcome", "code"], registry=r)
        self.latency = Histogram(PREFIX + "caption_request_latency_seconds", "POST /caption time from arrival "
                                 "to answer, by outcome.", ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram(PREFIX + "caption_queue_wait_seconds", "Time an image waited in "
                                            "the queue before its model call.", buckets=LATENCY_BUCKETS, registry=r)
        self.model_call_seconds = Histogram(PREFIX + "caption_model_call_seconds", "Time of one model call "
                                            "(a batch).", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(PREFIX + "caption_batch_size", "Images per model call.",
                                    buckets=BATCH_BUCKETS, registry=r)
        Gauge(PREFIX + "caption_queue_images", "Images queued, not yet in a model call.",
              registry=r).set_function(queued_images)
        Gauge(PREFIX + "caption_queue_bytes", "Bytes of request bodies held, from reading to answer.",
              registry=r).set_function(held_bytes)
        Gauge(PREFIX + "caption_requests_in_flight", "POST /caption requests being handled.",
              registry=r).set_function(in_flight)
        Gauge(PREFIX + "caption_queue_limit_images", "max_queued_images (0: unbounded).",
              registry=r).set(max_queued_images or 0)
        Gauge(PREFIX + "caption_queue_limit_bytes", "max_queued_bytes (0: unbounded).",
              registry=r).set(max_queued_bytes or 0)
        r.register(_CounterOf(PREFIX + "caption_dropped_images", "Images that left the queue unanswered "
                              "(deadline, client gone, drain bound).", dropped_images))

    def answered(self, status: int, code: str, seconds: float) -> None:
        outcome = outcome_of(status, code)
        self.requests.labels(outcome, code).inc()
        self.latency.labels(outcome).observe(seconds)

    def queue_wait(self, seconds: float, images: int) -> None:
        for _ in range(images):
            self.queue_wait_seconds.observe(seconds)

    def model_call(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.model_call_seconds.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
