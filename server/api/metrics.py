"""HTTP metrics of the API, registered on the one registry /metrics serves (shared with the engine
and the expert cache). ``endpoint`` is the route's path template, never the raw URL, so a client
cannot grow the label set; unknown paths count as ``other``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class HTTPMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "emo_serve_http_requests", "HTTP requests answered, by route and status code",
            ["endpoint", "status"], registry=registry,
        )  # exposed as emo_serve_http_requests_total
        self.duration = Histogram(
            "emo_serve_http_request_duration_seconds",
            "Time from request start to the last byte of the response (streams included)",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "emo_serve_http_requests_in_flight", "HTTP requests being answered now", registry=registry,
        )

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.duration.labels(endpoint=endpoint).observe(seconds)
