# -*- test-case-name: tests.server.test_metrics -*-
"""Prometheus metrics (securevault_*), served on 127.0.0.1 by --metrics-port."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENDPOINTS = frozenset(["/login", "/logout", "/upload-file", "/get-files", "/download-file", "/delete-file", "/health"])
# Audit events that are also counted.
EVENT_COUNTERS = {
    "login_failed": "failed_logins",
    "login_throttled": "throttled_logins",
    "integrity_error": "integrity_errors",
}


class VaultMetrics:
    """The daemon's series, in a registry of their own."""

    def __init__(
        self,
        *,
        active_sessions: Callable[[], float],
        pool_queue_depth: Callable[[], float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "securevault_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "securevault_request_duration_seconds",
            "Time from request head to the end of the response.",
            ["endpoint"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 300),
            registry=r,
        )
        self.bytes_in = Counter("securevault_bytes_received", "Request body bytes.", registry=r)
        self.bytes_out = Counter("securevault_bytes_sent", "Response body bytes.", registry=r)
        self.failed_logins = Counter("securevault_failed_logins", "Failed logins.", registry=r)
        self.throttled_logins = Counter("securevault_throttled_logins", "Logins refused by throttling.", registry=r)
        self.integrity_errors = Counter(
            "securevault_integrity_errors", "Archives that failed authentication on read.", registry=r
        )
        self.refused_rows = Counter(
            "securevault_refused_rows",
            "User and session rows refused: their MAC failed (changed outside securevault).",
            ["kind"],
            registry=r,
        )
        Gauge("securevault_active_sessions", "Live sessions.", registry=r).set_function(active_sessions)
        Gauge("securevault_pool_queue_depth", "Jobs waiting for a worker thread.", registry=r).set_function(
            pool_queue_depth
        )

    def observe_request(self, path: str, status: int | str, received: int, sent: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)
        self.bytes_in.inc(received)
        self.bytes_out.inc(sent)

    def count_event(self, event: str) -> None:
        name = EVENT_COUNTERS.get(event)
        if name is not None:
            counter: Counter = getattr(self, name)
            counter.inc()
