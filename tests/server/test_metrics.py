# -*- test-case-name: tests.server.test_metrics -*-
"""Tests for L{securevault.server.metrics}: the C{securevault_*} Prometheus series,
directly and as served by a real daemon started with C{--metrics-port}."""

from __future__ import annotations

import errno
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Generator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from securevault.admin.pki import load_cert
from securevault.server.metrics import VaultMetrics
from tests.server.test_twistd import Daemon, reactor
from tests.support.daemon import make_vault, twistd_argv
from tests.support.testcase import AsyncTestCase, SyncTestCase
from tests.support.tlsclient import Credential, client_for, read_json

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value; KeyError naming it when absent."""
    return found[(name, tuple(sorted(labels.items())))]


class VaultMetricsTests(SyncTestCase):
    """L{VaultMetrics} records requests and audit events as securevault_* series."""

    def setUp(self) -> None:
        self.sessions = 3.0
        self.queue = 7.0
        self.metrics = VaultMetrics(active_sessions=lambda: self.sessions, pool_queue_depth=lambda: self.queue)

    def scrape(self) -> tuple[str, Samples]:
        text = generate_latest(self.metrics.registry).decode("utf-8")
        return text, samples(text)

    def test_gauges_without_callbacks(self) -> None:
        """Without callbacks (a worker of --workers N) the gauges hold what
        was last set on them."""
        metrics = VaultMetrics()
        metrics.active_sessions.set(5)
        metrics.pool_queue_depth.set(2)
        found = samples(generate_latest(metrics.registry).decode("utf-8"))
        self.assertEqual(value(found, "securevault_active_sessions"), 5.0)
        self.assertEqual(value(found, "securevault_pool_queue_depth"), 2.0)

    def test_observe_request(self) -> None:
        """A request is counted by endpoint and status, its duration goes to
        the endpoint's histogram, and its body sizes to the byte counters."""
        self.metrics.observe_request("/health", 200, 0, 15, 0.002)
        self.metrics.observe_request("/upload-file", 201, 1000, 60, 0.3)
        self.metrics.observe_request("/upload-file", "413", 500, 40, 0.01)
        text, found = self.scrape()
        self.assertIn('securevault_requests_total{endpoint="/health",status="200"} 1.0', text)
        self.assertEqual(value(found, "securevault_requests_total", endpoint="/upload-file", status="201"), 1.0)
        self.assertEqual(value(found, "securevault_requests_total", endpoint="/upload-file", status="413"), 1.0)
        self.assertEqual(value(found, "securevault_bytes_received_total"), 1500.0)
        self.assertEqual(value(found, "securevault_bytes_sent_total"), 115.0)
        bucket = "securevault_request_duration_seconds_bucket"
        self.assertEqual(value(found, bucket, endpoint="/health", le="0.001"), 0.0)
        self.assertEqual(value(found, bucket, endpoint="/health", le="0.005"), 1.0)
        self.assertEqual(value(found, bucket, endpoint="/upload-file", le="0.25"), 1.0)
        self.assertEqual(value(found, bucket, endpoint="/upload-file", le="+Inf"), 2.0)
        self.assertEqual(value(found, "securevault_request_duration_seconds_count", endpoint="/upload-file"), 2.0)
        self.assertAlmostEqual(value(found, "securevault_request_duration_seconds_sum", endpoint="/upload-file"), 0.31)

    def test_unknown_paths_are_other(self) -> None:
        """Paths that are not endpoints (probes, typos, trailing slashes,
        long random paths) share the label "other", so a scanner cannot grow
        the series without bound."""
        for path in ("/", "/admin", "/health/", "/login/../etc/passwd", "/" + "x" * 500, "/Health"):
            self.metrics.observe_request(path, 404, 0, 50, 0.001)
        _, found = self.scrape()
        self.assertEqual(value(found, "securevault_requests_total", endpoint="other", status="404"), 6.0)
        endpoints = {dict(labels).get("endpoint") for name, labels in found if name == "securevault_requests_total"}
        self.assertEqual(endpoints, {"other"})

    def test_count_event(self) -> None:
        """Audit events login_failed, login_throttled and integrity_error
        increment their counters; other events count nothing."""
        for event in ("login_failed", "login_failed", "login_throttled", "integrity_error", "login", "logout"):
            self.metrics.count_event(event)
        text, found = self.scrape()
        self.assertIn("securevault_failed_logins_total 2.0", text)
        self.assertEqual(value(found, "securevault_throttled_logins_total"), 1.0)
        self.assertEqual(value(found, "securevault_integrity_errors_total"), 1.0)
        self.assertNotIn("login_total", text)

    def test_gauges_read_live(self) -> None:
        """Active sessions and pool queue depth are read at scrape time."""
        _, found = self.scrape()
        self.assertEqual(value(found, "securevault_active_sessions"), 3.0)
        self.assertEqual(value(found, "securevault_pool_queue_depth"), 7.0)
        self.sessions, self.queue = 1.0, 0.0
        _, found = self.scrape()
        self.assertEqual(value(found, "securevault_active_sessions"), 1.0)
        self.assertEqual(value(found, "securevault_pool_queue_depth"), 0.0)

    def test_fresh_series_and_names(self) -> None:
        """Before any traffic every counter is present at 0, and every series
        is named securevault_*."""
        _, found = self.scrape()
        for name in (
            "securevault_bytes_received_total",
            "securevault_bytes_sent_total",
            "securevault_failed_logins_total",
            "securevault_throttled_logins_total",
            "securevault_integrity_errors_total",
        ):
            self.assertEqual(value(found, name), 0.0, name)
        self.assertTrue(all(name.startswith("securevault_") for name, _ in found), sorted(found))

    def test_own_registry(self) -> None:
        """Each L{VaultMetrics} has a registry of its own: two instances (two
        daemons in one test process) neither collide nor share counts."""
        other = VaultMetrics(active_sessions=lambda: 0.0, pool_queue_depth=lambda: 0.0)
        other.count_event("login_failed")
        _, found = self.scrape()
        self.assertEqual(value(found, "securevault_failed_logins_total"), 0.0)
        self.assertIsNot(other.registry, self.metrics.registry)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than 127.0.0.0/8, if any."""
    candidates: list[str] = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
            candidates.append(udp.getsockname()[0])
    except OSError:
        pass
    try:
        candidates += [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    for address in candidates:
        if not address.startswith("127.") and address != "0.0.0.0":
            return str(address)
    return None


def fetch(url: str) -> str:
    """GET C{url} over plain HTTP, ignoring any proxy settings (blocking)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return str(response.read().decode("utf-8"))


class MetricsDaemonTests(AsyncTestCase):
    """C{twistd securevault --metrics-port}: Prometheus text on 127.0.0.1."""

    timeout = 60

    def setUp(self) -> None:
        self.base = self.make_dir()
        self.certs, self.data = make_vault(self.base)

    @inlineCallbacks
    def start(self) -> Generator[Deferred[Any], Any, tuple[int, int]]:
        """Start twistd with a metrics port; fires with (vault port, metrics port)."""
        metrics_port = free_port()
        daemon = Daemon(twistd_argv(self.certs, self.data, "--metrics-port", str(metrics_port)), self.base)
        self.addCleanup(daemon.stop)
        port = yield daemon.wait_listening()
        return port, metrics_port

    @inlineCallbacks
    def test_serves_metrics(self) -> Generator[Deferred[Any], Any, None]:
        """After a /health, a failed login, and a login, JSON upload and raw
        download over mutual TLS, GET /metrics on the metrics port shows each
        request by endpoint and status, one failed login, the bytes moved,
        one active session, the pool queue, no integrity errors and the
        latency histogram."""
        port, metrics_port = yield self.start()
        credential = Credential.from_files(self.certs / "client.crt", self.certs / "client.key")
        client = client_for(reactor, port, load_cert(self.certs / "ca.crt"), credential, cleanup=self.addCleanup)
        response = yield client.request("GET", "/health")
        yield read_json(response)
        self.assertEqual(response.code, 200)
        response = yield client.post_json("/login", {"username": "alice", "password": "not the password"})
        yield read_json(response)
        self.assertEqual(response.code, 401)
        yield client.login("alice")
        content = os.urandom(60_000)
        archive_id = yield client.upload_json("m.bin", content)
        body = yield client.download_raw(archive_id)
        self.assertEqual(len(body), len(content))
        yield client.close()

        text = yield deferToThread(fetch, f"http://127.0.0.1:{metrics_port}/metrics")
        found = samples(text)
        self.assertIn('securevault_requests_total{endpoint="/health",status="200"} 1.0', text)
        self.assertIn("securevault_failed_logins_total 1.0", text)
        self.assertIn("securevault_active_sessions 1.0", text)
        self.assertIn("securevault_integrity_errors_total 0.0", text)
        self.assertIn("securevault_throttled_logins_total 0.0", text)
        requests = "securevault_requests_total"
        self.assertEqual(value(found, requests, endpoint="/login", status="401"), 1.0)
        self.assertEqual(value(found, requests, endpoint="/login", status="200"), 1.0)
        self.assertEqual(value(found, requests, endpoint="/upload-file", status="201"), 1.0)
        self.assertEqual(value(found, requests, endpoint="/download-file", status="200"), 1.0)
        self.assertGreater(value(found, "securevault_bytes_received_total"), len(content))
        self.assertGreater(value(found, "securevault_bytes_sent_total"), len(content))
        self.assertGreaterEqual(value(found, "securevault_pool_queue_depth"), 0.0)
        bucket = "securevault_request_duration_seconds_bucket"
        self.assertIn(bucket + '{endpoint="/health",le="', text)
        self.assertEqual(value(found, bucket, endpoint="/health", le="+Inf"), 1.0)
        self.assertEqual(value(found, bucket, endpoint="/login", le="+Inf"), 2.0)
        self.assertEqual(value(found, "securevault_request_duration_seconds_count", endpoint="/download-file"), 1.0)
        self.assertTrue(all(name.startswith("securevault_") for name, _ in found), sorted(found))

    @inlineCallbacks
    def test_loopback_only(self) -> Generator[Deferred[Any], Any, None]:
        """The metrics port listens on 127.0.0.1 only: connecting to it through
        the machine's non-loopback address is refused, while a listener on
        all interfaces is reachable that way (so the refusal is meaningful).
        On 127.0.0.1 it serves /metrics and nothing else (another path is a
        404)."""
        address = non_loopback_address()
        if address is None:
            raise SkipTest("this machine has no non-loopback IPv4 address")
        _, metrics_port = yield self.start()
        text = yield deferToThread(fetch, f"http://127.0.0.1:{metrics_port}/metrics")
        self.assertIn("securevault_requests_total", text)
        failure = yield self.assertFailure(
            deferToThread(fetch, f"http://127.0.0.1:{metrics_port}/health"), urllib.error.HTTPError
        )
        self.assertEqual(failure.code, 404)
        failure.close()

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as control:
            control.bind(("0.0.0.0", 0))
            control.listen(1)
            with socket.create_connection((address, control.getsockname()[1]), timeout=5):
                pass
        error = yield deferToThread(self.connect_error, address, metrics_port)
        self.assertIsNotNone(error, f"{address}:{metrics_port} accepted a connection")

    def connect_error(self, address: str, port: int) -> OSError | None:
        """The error connecting to C{address:port} gives, or None (blocking)."""
        try:
            with socket.create_connection((address, port), timeout=5):
                return None
        except OSError as error:
            if error.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, None):
                raise
            return error
