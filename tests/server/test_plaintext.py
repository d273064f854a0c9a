"""Plain HTTP on the TLS port: a clear 400, and TLS as before.

The daemon tests run a real C{twistd} (L{tests.support.daemon}) and talk to
it with raw sockets: the client controls exactly which first bytes go out.
"""

from __future__ import annotations

import json
import socket

from securevault.server.plaintext import is_plain_http
from tests.support.daemon import IO_TIMEOUT_SECONDS, VaultFixture, call
from tests.support.testcase import SyncTestCase


def plain_exchange(port: int, request: bytes) -> bytes:
    """Send C{request} in clear text and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_SECONDS) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


class FirstByteTests(SyncTestCase):
    """L{is_plain_http} tells an HTTP request from TLS by its first byte."""

    def test_http_methods(self) -> None:
        """Every HTTP method starts with a capital letter; a TLS record
        starts with its content type (20-24), an SSLv2-style hello with the
        high bit set; nothing else is taken for HTTP."""
        for method in (b"GET /", b"POST /", b"HEAD /", b"PUT /", b"DELETE /", b"OPTIONS *", b"CONNECT x", b"PRI *"):
            self.assertTrue(is_plain_http(method), method)
        for first in (b"\x16\x03\x01", b"\x15\x03\x03", b"\x17", b"\x80\x2e\x01", b"get /", b" GET", b"\r\n", b""):
            self.assertFalse(is_plain_http(first), first)


class PlainHTTPDaemonTests(SyncTestCase):
    """A real daemon answers plain HTTP on its TLS port."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        # Two connections at most: the plain ones must give theirs back.
        self.daemon = self.vault.start("--max-connections", "2")
        self.addCleanup(self.daemon.stop)
        self.port = self.daemon.wait_listening()

    def test_plain_request_gets_a_clear_answer(self) -> None:
        """C{GET /health} in clear text (curl http://...) is answered 400
        bad_request in clear text, saying the port speaks HTTPS, and the
        connection is closed (it was an empty reply); the connections are
        given back, and mutual TLS serves on as before.  Bytes that start
        like a TLS record but are none still get no HTTP answer: TLS itself
        refuses them."""
        for _ in range(3):
            answer = plain_exchange(self.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer)
            self.assertIn(b"Content-Type: application/json; charset=utf-8", head)
            self.assertIn(b"Connection: close", head)
            error = json.loads(body)
            self.assertEqual(error["error"], "bad_request")
            self.assertIn("speaks HTTPS (mutual TLS)", error["message"])
        garbage = plain_exchange(self.port, b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64)
        self.assertNotIn(b"HTTP/1.1", garbage)
        response = call(self.vault.tls_context(), self.port, "GET", "/health")
        self.assertEqual((response.status, response.json()["status"]), (200, "ok"))
        self.assertNotIn("Traceback", self.daemon.output())
        self.assertNotIn("Unhandled", self.daemon.output())
