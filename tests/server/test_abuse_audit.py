# -*- test-case-name: tests.server.test_abuse_audit -*-
"""The audit log against a real daemon over real mutual TLS: a flood of
refused requests cannot grow it, and a kill -9 cannot lose an event whose
answer went out.

Each test runs C{twistd -n securevault} on a fresh vault (L{VaultFixture})
and talks to it with blocking C{ssl} sockets from plain threads.
"""

from __future__ import annotations

import json
import signal
import ssl
import threading
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.support.app import IncompleteResponse, parse_responses
from tests.support.daemon import (
    WAIT_SECONDS,
    SyncDaemon,
    VaultFixture,
    call,
    connect,
    login,
    run_admin,
)
from tests.support.testcase import SyncTestCase

FLOOD_CONNECTIONS = 4
FLOOD_REQUESTS_PER_CONNECTION = 500
PIPELINE_DEPTH = 50  # requests sent before their answers are read
BOGUS_REQUEST = b"GET /get-files HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer 00000000-bogus\r\n\r\n"
LOGINS = 20
LOGIN_THREADS = 4  # logins in parallel, so that their records share group commits


def flood(context: ssl.SSLContext, port: int, count: int, statuses: list[int], stop: threading.Event) -> None:
    """Thread body: C{count} bogus-session requests on one keep-alive
    connection, pipelined C{PIPELINE_DEPTH} at a time; their statuses go to
    C{statuses}.  Ends early (quietly) when C{stop} is set or the daemon
    goes away."""
    try:
        with connect(context, port) as sock:
            sent = 0
            while sent < count and not stop.is_set():
                batch = min(PIPELINE_DEPTH, count - sent)
                sock.sendall(BOGUS_REQUEST * batch)
                sent += batch
                data = b""
                while True:
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        raise ConnectionError("the daemon closed the connection")
                    data += chunk
                    try:
                        responses = parse_responses(data)
                    except IncompleteResponse:
                        continue
                    if len(responses) == batch and responses[-1].complete:
                        break
                statuses.extend(response.status for response in responses)
    except OSError:
        if not stop.is_set():
            raise


def audit_records(vault: VaultFixture) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (vault.data / "audit.jsonl").read_bytes().splitlines()]


def client_fingerprint(vault: VaultFixture) -> str:
    """The identity the daemon derives from the dev client certificate."""
    certificate = x509.load_pem_x509_certificate((vault.certs / "client.crt").read_bytes())
    return certificate.fingerprint(hashes.SHA256()).hex()


class AbuseAuditTests(SyncTestCase):
    """A real daemon's audit log under a flood and a kill -9."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        self.context = self.vault.tls_context()

    def start(self) -> tuple[SyncDaemon, int]:
        daemon = self.vault.start()
        self.addCleanup(daemon.stop)
        return daemon, daemon.wait_listening()

    def assert_audit_verifies(self) -> None:
        result = run_admin("--data-dir", str(self.vault.data), "audit", "verify", cwd=self.vault.base)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def run_flood(
        self,
        port: int,
        statuses: list[int],
        stop: threading.Event,
        count: int = FLOOD_REQUESTS_PER_CONNECTION,
        connections: int = FLOOD_CONNECTIONS,
    ) -> list[threading.Thread]:
        """C{connections} threads each sending C{count} bogus requests."""
        threads = [
            threading.Thread(target=flood, args=(self.context, port, count, statuses, stop), daemon=True)
            for _ in range(connections)
        ]
        for thread in threads:
            thread.start()
        return threads

    def test_flood_of_refusals(self) -> None:
        """2,000 bogus-session requests on 4 keep-alive connections are all
        401, and add at most one audit line per certificate, reason and
        second, whose counts add up to 2,000; meanwhile /health answers; the
        chain verifies after a clean stop."""
        daemon, port = self.start()
        statuses: list[int] = []
        stop = threading.Event()
        threads = self.run_flood(port, statuses, stop)
        health = call(self.context, port, "GET", "/health")
        for thread in threads:
            thread.join(WAIT_SECONDS)
        self.assertEqual(health.status, 200)
        self.assertEqual(statuses, [401] * (FLOOD_CONNECTIONS * FLOOD_REQUESTS_PER_CONNECTION))
        daemon.process.send_signal(signal.SIGTERM)  # a clean stop writes what is held
        # twistd re-raises SIGTERM once its shutdown is complete (see test_twistd).
        self.assertEqual(daemon.process.wait(WAIT_SECONDS), -signal.SIGTERM, daemon.output())
        self.assertNotIn("Traceback", daemon.output())
        records = [r for r in audit_records(self.vault) if r["event"] == "session_refused"]
        keys = [(r["fingerprint"], r["event"], r["time"][:19]) for r in records]
        self.assertEqual(len(keys), len(set(keys)), "a certificate, reason and second written twice")
        self.assertEqual({r["fingerprint"] for r in records}, {client_fingerprint(self.vault)})
        self.assertEqual(sum(r["count"] for r in records), len(statuses))
        self.assert_audit_verifies()

    def test_kill_loses_no_answered_login(self) -> None:
        """20 logins (4 clients at a time), each answered 200 while a flood of
        refusals keeps the daemon busy until SIGKILL, sent as soon as the
        last 200 is in: the audit log holds all 20 login records and its
        chain verifies.  (Were the records written after the answers, the
        flood's backlog in the pool would hold some of them at the kill.)"""
        daemon, port = self.start()
        statuses: list[int] = []
        stop = threading.Event()
        threads = self.run_flood(port, statuses, stop, count=10**9, connections=2)  # until the kill
        sessions: list[str] = []

        def log_in(count: int) -> None:
            for _ in range(count):
                sessions.append(login(self.context, port))

        clients = [threading.Thread(target=log_in, args=(LOGINS // LOGIN_THREADS,)) for _ in range(LOGIN_THREADS)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(WAIT_SECONDS)
        stop.set()
        daemon.kill()
        for thread in threads:
            thread.join(WAIT_SECONDS)
        self.assertEqual(len(set(sessions)), LOGINS)
        logins = [r for r in audit_records(self.vault) if r["event"] == "login"]
        self.assertEqual(len(logins), LOGINS)
        self.assertEqual({r["user"] for r in logins}, {"alice"})
        self.assert_audit_verifies()
