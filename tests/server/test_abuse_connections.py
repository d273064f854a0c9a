# -*- test-case-name: tests.server.test_abuse_connections -*-
"""Hostile holders of a valid client certificate, against a real daemon
over real mutual TLS: each limit of API.md's Transport section attacked the
way the attack table of issue 10 did, and an honest client served throughout.

Each test starts C{twistd securevault} on loopback with small limits (so the
attack is cheap and quick), attacks it with blocking stdlib-ssl sockets, and
checks what the attacker got and that C{/health} still answers.  Bounds on
time here are generous ceilings that only a missing limit would reach.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tests.support.daemon import (
    TWISTD,
    SyncDaemon,
    VaultFixture,
    call,
    connect,
    login,
    read_response,
    request_head,
    run_admin,
)
from tests.support.testcase import SyncTestCase

# A limit that works acts within a few seconds; these ceilings are what the
# same attacks reached without the limits (held for ever, kept reading).
CEILING_SECONDS = 20.0


class _DaemonCase(SyncTestCase):
    port: int
    vault: VaultFixture

    def start(self, *options: str, open_files: int | None = None) -> tuple[SyncDaemon, int]:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        argv = self.vault.argv(*options)
        if open_files is not None:  # the daemon's own limit on open files, soft and hard
            argv = [
                sys.executable,
                "-c",
                f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({open_files}, {open_files})); "
                + TWISTD[2],
                *argv[len(TWISTD) :],
            ]
        daemon = SyncDaemon(argv, self.vault.base)
        self.addCleanup(daemon.stop)
        return daemon, daemon.wait_listening()

    @property
    def context(self) -> ssl.SSLContext:
        return self.vault.tls_context()

    def other_context(self, name: str) -> ssl.SSLContext:
        """A second client certificate from the same CA."""
        result = run_admin("cert", "client", name, "--certs-dir", str(self.vault.certs), cwd=self.vault.base)
        self.assertEqual(result.returncode, 0, result.stderr)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.vault.certs / "ca.crt"))
        context.load_cert_chain(str(self.vault.certs / f"{name}.crt"), str(self.vault.certs / f"{name}.key"))
        return context

    def assert_healthy(self, context: ssl.SSLContext | None = None) -> None:
        response = call(context or self.context, self.port, "GET", "/health")
        self.assertEqual(response.status, 200)


def closed_within(sock: ssl.SSLSocket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes (True) or C{seconds} pass (False)."""
    sock.settimeout(0.5)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except (ConnectionResetError, ssl.SSLError, OSError):
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


class SlowClientTests(_DaemonCase):
    def test_trickled_login_body(self) -> None:
        """A login body trickled one byte every 2 s (--idle-timeout 4) gets
        408 request_timeout and the connection is closed; before, it was
        held for ever.  Others are served meanwhile."""
        _, self.port = self.start("--idle-timeout", "4")
        with connect(self.context, self.port) as sock:
            sock.sendall(
                request_head("POST", "/login", [("Content-Type", "application/json"), ("Content-Length", "100")])
            )
            sock.settimeout(0.1)
            answer = b""
            deadline = time.monotonic() + CEILING_SECONDS
            while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
                try:
                    sock.sendall(b"{")
                except OSError:
                    break
                self.assert_healthy()
                until = time.monotonic() + 2
                while time.monotonic() < until:
                    try:
                        chunk = sock.recv(4096)
                    except (TimeoutError, ssl.SSLWantReadError):
                        continue
                    except OSError:
                        break
                    if not chunk:
                        break
                    answer += chunk
            self.assertIn(b" 408 ", answer.split(b"\r\n", 1)[0])
            self.assertIn(b'"request_timeout"', answer)

    def test_reader_that_does_not_read_is_cut(self) -> None:
        """A raw download whose client reads nothing is cut once a window
        passes below --min-body-rate (its buffers freed); before, it was held
        for ever.  An honest download works meanwhile."""
        _, self.port = self.start("--idle-timeout", "2", "--min-body-rate", "1M")
        session = login(self.context, self.port)
        data = os.urandom(24 << 20)
        stored = call(
            self.context,
            self.port,
            "POST",
            "/upload-file",
            body=data,
            headers=[("Content-Type", "application/octet-stream"), ("X-Filename", "big.bin")],
            session=session,
        )
        self.assertEqual(stored.status, 201)
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock = self.context.wrap_socket(raw, server_hostname="localhost")
        self.addCleanup(sock.close)
        sock.sendall(
            request_head(
                "GET",
                f"/download-file?id={stored.json()['id']}",
                [("Accept", "application/octet-stream"), ("Authorization", f"Bearer {session}")],
            )
        )
        time.sleep(6)  # the attack itself: a client that reads nothing
        closed, received = closed_within(sock, CEILING_SECONDS)
        self.assertTrue(closed)
        self.assertLess(len(received), len(data))
        honest = call(
            self.context,
            self.port,
            "GET",
            f"/download-file?id={stored.json()['id']}",
            headers=[("Accept", "application/octet-stream")],
            session=session,
        )
        self.assertEqual(honest.body, data)


class RefusalCloseTests(_DaemonCase):
    def test_sending_after_a_refusal(self) -> None:
        """A raw upload with a bogus session is answered 401 with Connection:
        close; a client that keeps sending has the connection closed within
        seconds (before: the server read 47 MB over 45 s)."""
        _, self.port = self.start()
        with connect(self.context, self.port) as sock:
            sock.sendall(
                request_head(
                    "POST",
                    "/upload-file",
                    [
                        ("Content-Type", "application/octet-stream"),
                        ("X-Filename", "a.bin"),
                        ("Authorization", "Bearer bogus"),
                        ("Content-Length", str(10 << 30)),
                    ],
                )
            )
            piece = os.urandom(64 << 10)
            sent = 0
            started = time.monotonic()
            sock.settimeout(5)
            try:
                while time.monotonic() - started < CEILING_SECONDS:
                    sock.sendall(piece)
                    sent += len(piece)
            except OSError:
                pass
            elapsed = time.monotonic() - started
        self.assertLess(elapsed, CEILING_SECONDS)
        self.assert_healthy()


class ConnectionCapTests(_DaemonCase):
    def hold(self, context: ssl.SSLContext, count: int) -> list[ssl.SSLSocket]:
        sockets = [connect(context, self.port) for _ in range(count)]
        for sock in sockets:
            self.addCleanup(sock.close)
        return sockets

    def refused_busy(self, context: ssl.SSLContext) -> bool:
        with connect(context, self.port) as sock:
            sock.settimeout(10)
            response = read_response(sock)
        return response.status == 503 and response.json()["error"] == "busy" and "retry-after" in response.headers

    def test_per_certificate_cap(self) -> None:
        """One certificate holding --max-connections-per-cert idle
        connections gets 503 busy for the next; another certificate is
        served."""
        _, self.port = self.start("--max-connections-per-cert", "4")
        held = self.hold(self.context, 4)
        self.assertTrue(self.refused_busy(self.context))
        self.assert_healthy(self.other_context("bob"))
        held[0].close()
        time.sleep(0.5)
        self.assert_healthy()

    def test_descriptor_limit(self) -> None:
        """At a limit of 200 open files the vault lowers --max-connections
        to fit and says so; a certificate holding idle connections up to it
        makes newcomers 503 busy (never a reset), and the vault serves again
        once they go."""
        daemon, self.port = self.start("--max-connections-per-cert", "1000", open_files=200)
        self.assertIn("--max-connections lowered to 72", daemon.output())
        with ThreadPoolExecutor(8) as pool:
            held = list(pool.map(lambda _: connect(self.context, self.port), range(72)))
        for sock in held:
            self.addCleanup(sock.close)
        self.assertTrue(self.refused_busy(self.other_context("carol")))
        for sock in held:
            sock.close()
        deadline = time.monotonic() + CEILING_SECONDS
        while True:
            try:
                self.assert_healthy()
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class MemoryBudgetTests(_DaemonCase):
    def test_parallel_json_uploads(self) -> None:
        """Parallel 6 MiB JSON uploads (each costs three times its body) under --memory-budget 40M: those that
        do not fit are 503 busy, the others stored, and the vault serves on."""
        _, self.port = self.start("--memory-budget", "40M", "--max-json-body", "8M")
        session = login(self.context, self.port)
        body = json.dumps({"filename": "a.bin", "content": "QUJD" * (6 << 18)}).encode()

        def upload(_: int) -> int:
            return call(
                self.context,
                self.port,
                "POST",
                "/upload-file",
                body=body,
                headers=[("Content-Type", "application/json")],
                session=session,
            ).status

        with ThreadPoolExecutor(6) as pool:
            statuses = sorted(pool.map(upload, range(6)))
        self.assertIn(503, statuses)
        self.assertIn(201, statuses)
        self.assertEqual(set(statuses), {201, 503})
        self.assert_healthy()
