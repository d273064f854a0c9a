# -*- test-case-name: tests.server.test_revocation -*-
"""Certificate revocation against a real daemon (API.md Transport /
Revocation): C{securevault-admin cert revoke} while C{twistd securevault}
runs, over real mutual TLS with stdlib C{ssl} sockets.

The vault (dev PKI with its empty C{ca.crl}, user C{alice}, a second client
certificate C{bob}) is made once per run and copied for each test.  Every
wait is for an event the daemon logs (the CRL loaded or rejected), bounded
by the contract's 10 s plus a margin; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from securevault.admin.pki import issue_client_cert, make_ca, make_crl
from tests.support.daemon import (
    WAIT_SECONDS,
    SyncDaemon,
    VaultFixture,
    call,
    child_environment,
    connect,
    login,
    read_response,
    request_head,
    run_admin,
)
from tests.support.testcase import SyncTestCase

# The contract: a changed CRL is in force within 10 s.
RELOAD_SECONDS = 15.0
_TEMPLATE: list[Path] = []


def template() -> Path:
    """A vault made once per test run: init (with ca.crl), user alice, and a
    second client certificate bob."""
    if not _TEMPLATE:
        base = Path(tempfile.mkdtemp(prefix="securevault-revocation-template-"))
        atexit.register(shutil.rmtree, base, True)
        VaultFixture(base).create()
        issue_client_cert(base / "certs", "bob")
        _TEMPLATE.append(base)
    return _TEMPLATE[0]


def keep_alive_request(method: str, target: str, session: str) -> bytes:
    """A request that leaves the connection open for the next one."""
    return (f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {session}\r\n\r\n").encode("ascii")


class RevocationTests(SyncTestCase):
    """A revoked certificate is shut out without a restart: new handshakes
    fail, open connections are refused from their next request on, SIGHUP
    reloads at once, and a bad CRL never lets a revoked certificate back."""

    def setUp(self) -> None:
        base = self.make_dir()
        shutil.copytree(template(), base, dirs_exist_ok=True)
        self.vault = VaultFixture(base)

    def start(self, *options: str) -> SyncDaemon:
        daemon = self.vault.start(*options)
        self.addCleanup(daemon.stop)
        self.port = daemon.wait_listening()
        return daemon

    def context(self, name: str = "client") -> ssl.SSLContext:
        certs = self.vault.certs
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.crt"))
        context.load_cert_chain(str(certs / f"{name}.crt"), str(certs / f"{name}.key"))
        return context

    def revoke(self, name: str) -> str:
        result = run_admin("cert", "revoke", name, "--certs-dir", str(self.vault.certs), cwd=self.vault.base)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def wait_logged(self, daemon: SyncDaemon, text: str, count: int = 1) -> None:
        """Until the daemon's output holds C{text} C{count} times."""
        deadline = time.monotonic() + RELOAD_SECONDS
        while daemon.output().count(text) < count:
            if time.monotonic() > deadline or daemon.process.poll() is not None:
                self.fail(f"not logged: {text!r}\n{daemon.output()}")
            time.sleep(0.05)

    def assert_handshake_refused(self, context: ssl.SSLContext) -> None:
        """No HTTP response ever: the handshake (or, in TLS 1.3, the first
        read after it, where the server's verdict arrives) fails."""
        try:
            response = call(context, self.port, "GET", "/health")
        except (ssl.SSLError, ConnectionError, OSError):
            return
        self.fail(f"served: {response.status} {response.body!r}")

    def test_new_handshake_refused(self) -> None:
        """After 'cert revoke client' on a running daemon, a new connection
        with that certificate fails its handshake within the reload time,
        while another certificate of the same CA (bob) is served."""
        daemon = self.start()
        context = self.context()
        with connect(context, self.port) as sock:
            sock.sendall(request_head("GET", "/health", []))
            self.assertEqual(read_response(sock).status, 200)
            earlier = sock.session  # a TLS session from before the revocation
        self.revoke("client")
        self.wait_logged(daemon, "Loaded CRL")
        self.assert_handshake_refused(context)
        # Nor can that session be resumed to skip the certificate check.
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_SECONDS)
        try:
            with context.wrap_socket(raw, server_hostname="localhost", session=earlier) as sock:
                sock.sendall(request_head("GET", "/health", []))
                self.assertRaises((ssl.SSLError, ConnectionError), read_response, sock)
                self.assertFalse(sock.session_reused)
        except (ssl.SSLError, ConnectionError):
            pass
        self.assertEqual(call(self.context("bob"), self.port, "GET", "/health").status, 200)
        self.assertIn("Refused a revoked client certificate", daemon.output())

    def test_revoked_before_start(self) -> None:
        """A certificate the CRL lists at start never gets a response."""
        self.revoke("client")
        self.start()
        self.assert_handshake_refused(self.context())
        self.assertEqual(call(self.context("bob"), self.port, "GET", "/health").status, 200)

    def test_open_connection_refused(self) -> None:
        """A connection opened and logged in before the revocation: its next
        request is 401 invalid_session and the server closes it."""
        daemon = self.start()
        session = login(self.context(), self.port)
        with connect(self.context(), self.port) as sock:
            sock.sendall(keep_alive_request("GET", "/get-files", session))
            self.assertEqual(read_response(sock).status, 200)
            self.revoke("client")
            self.wait_logged(daemon, "Loaded CRL")
            sock.sendall(keep_alive_request("GET", "/get-files", session))
            response = read_response(sock)
            self.assertEqual((response.status, response.json()["error"]), (401, "invalid_session"))
            self.assertEqual(response.headers.get("connection"), "close")
            self.assertEqual(sock.recv(1), b"")  # closed by the server
        self.assertEqual(call(self.context("bob"), self.port, "GET", "/health").status, 200)

    def test_sighup_reloads(self) -> None:
        """SIGHUP does not end the daemon (its default action would): it
        re-reads the CRL at once, and the revoked certificate is refused."""
        daemon = self.start()
        self.revoke("client")
        daemon.process.send_signal(signal.SIGHUP)
        self.wait_logged(daemon, "on SIGHUP")
        self.assertIsNone(daemon.process.poll())
        self.assert_handshake_refused(self.context())
        daemon.process.send_signal(signal.SIGHUP)  # again: still alive, reloaded again
        self.wait_logged(daemon, "on SIGHUP", count=2)
        self.assertEqual(call(self.context("bob"), self.port, "GET", "/health").status, 200)

    def test_garbage_after_start_keeps_last_good(self) -> None:
        """A CRL file turned to garbage after start is logged, and the last
        good CRL stays in force: the revoked certificate is still refused.
        (SIGHUP makes each reload immediate; the poll finds the same.)"""
        daemon = self.start()
        self.revoke("client")
        daemon.process.send_signal(signal.SIGHUP)
        self.wait_logged(daemon, "Loaded CRL")
        crl = self.vault.certs / "ca.crl"
        temp = crl.with_name("garbage.tmp")
        temp.write_bytes(b"not a CRL\n")
        os.replace(temp, crl)
        daemon.process.send_signal(signal.SIGHUP)
        self.wait_logged(daemon, "the last good CRL stays in force")
        self.assertIn(f"CRL file {crl} holds no PEM CRL", daemon.output())
        self.assert_handshake_refused(self.context())
        self.assertEqual(call(self.context("bob"), self.port, "GET", "/health").status, 200)

    def exits_naming(self, path: Path, *options: str) -> None:
        """twistd with C{options} exits non-zero with one stderr line naming
        C{path}, and never listens."""
        result = subprocess.run(
            self.vault.argv(*options),
            cwd=self.vault.base,
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )
        self.assertNotEqual(result.returncode, 0, result.stdout)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("securevault: error: "), lines[0])
        self.assertIn(str(path), lines[0])
        self.assertNotIn("listening on", result.stdout)

    def test_garbage_crl_at_start(self) -> None:
        """A garbage file given as --crl, or an absent one, is an error at start."""
        garbage = self.vault.base / "garbage.crl"
        garbage.write_bytes(b"garbage\n")
        self.exits_naming(garbage, "--crl", str(garbage))
        absent = self.vault.base / "absent.crl"
        self.exits_naming(absent, "--crl", str(absent))

    def test_foreign_default_crl_at_start(self) -> None:
        """The default ca.crl beside --ca-cert is used when present: one
        signed by another CA is an error at start."""
        other_ca, other_key = make_ca("another CA")
        foreign = self.vault.certs / "ca.crl"
        foreign.write_bytes(make_crl(other_ca, other_key, []).public_bytes(Encoding.PEM))
        self.exits_naming(foreign)
