"""Prometheus metrics of the model server (``prometheus_client``, one registry per server).

Exposed at ``GET /metrics`` in the Prometheus text format:

- ``edgesmith_requests_total{endpoint,code}``: requests answered, by endpoint and HTTP status.
- ``edgesmith_request_duration_seconds{endpoint}``: time from request to response (histogram).
- ``edgesmith_inference_duration_seconds``: time of each batch's model call (histogram).
- ``edgesmith_batch_size``: samples per batch run (histogram).
- ``edgesmith_queue_depth``: requests waiting for a batch, read at scrape time.
- ``edgesmith_inflight_requests``: requests being handled.
- ``edgesmith_model_swaps_total{result}``: hot swaps, ``ok`` or ``failed``.
- ``edgesmith_model_info{name,version,backend,provider,precision}``: 1 for the model now served.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """The server's metrics in their own registry (several servers can live in one process)."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "edgesmith_requests", "Requests answered", ["endpoint", "code"], registry=r
        )
        self.latency = Histogram(
            "edgesmith_request_duration_seconds",
            "Time from request to response",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "edgesmith_inference_duration_seconds",
            "Model call time per batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "edgesmith_batch_size", "Samples per batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "edgesmith_queue_depth", "Requests waiting for a batch", registry=r
        )
        self.queue_depth.set_function(queue_depth)
        self.inflight = Gauge("edgesmith_inflight_requests", "Requests being handled", registry=r)
        self.swaps = Counter("edgesmith_model_swaps", "Model hot swaps", ["result"], registry=r)
        self.model_info = Gauge(
            "edgesmith_model_info",
            "The model being served",
            ["name", "version", "backend", "provider", "precision"],
            registry=r,
        )
        self._info_labels: tuple[str, ...] | None = None

    def observe_batch(self, samples: int, seconds: float) -> None:
        self.batch_size.observe(samples)
        self.inference.observe(seconds)

    def observe_request(self, endpoint: str, code: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        if seconds is not None:
            self.latency.labels(endpoint).observe(seconds)

    def set_model(self, info: dict[str, Any]) -> None:
        labels = tuple(
            str(info.get(k) if info.get(k) is not None else "")
            for k in ("name", "version", "backend", "provider", "precision")
        )
        if self._info_labels is not None and self._info_labels != labels:
            self.model_info.remove(*self._info_labels)
        self.model_info.labels(*labels).set(1)
        self._info_labels = labels

    def render(self) -> bytes:
        return generate_latest(self.registry)
