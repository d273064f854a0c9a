# -*- test-case-name: tests.server.test_metrics -*-
"""Prometheus metrics (securevault_*), served on 127.0.0.1 by --metrics-port.

With C{--workers N} each worker writes its series to the files of
prometheus_client's multiprocess mode and the parent serves their sum
(L{securevault.server.supervisor}); a gauge there cannot call back into a
worker, so its value is set by the worker instead (C{multiprocess_mode}
says how the workers' values combine)."""

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
    """The daemon's series, in a registry of their own.  Without the two
    callbacks the gauges hold what is set on them (in a worker)."""

    def __init__(
        self,
        *,
        active_sessions: Callable[[], float] | None = None,
        pool_queue_depth: Callable[[], float] | None = None,
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
        # Every worker counts the same shared store: the largest is the
        # freshest.  Each has its own pool queue: they add up (live workers).
        self.active_sessions = Gauge(
            "securevault_active_sessions", "Live sessions.", registry=r, multiprocess_mode="max"
        )
        self.pool_queue_depth = Gauge(
            "securevault_pool_queue_depth", "Jobs waiting for a worker thread.", registry=r, multiprocess_mode="livesum"
        )
        if active_sessions is not None:
            self.active_sessions.set_function(active_sessions)
        if pool_queue_depth is not None:
            self.pool_queue_depth.set_function(pool_queue_depth)

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
