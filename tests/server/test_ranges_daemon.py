# -*- test-case-name: tests.server.test_ranges_daemon -*-
"""Range downloads and GET /usage against a real C{twistd -n securevault}
over real mutual TLS, with the headers curl sends (C{curl -r 1000-1999},
C{curl -C -})."""

from __future__ import annotations

import hashlib
import os

from tests.support.daemon import (
    VaultFixture,
    call,
    connect,
    login,
    raw_upload_head,
    read_response,
)
from tests.support.testcase import SyncTestCase

CURL_HEADERS = [("User-Agent", "curl/8.5.0"), ("Accept", "application/octet-stream")]
QUOTA_BYTES = 50_000_000


class DaemonRangeTests(SyncTestCase):
    """One daemon (--quota 50000000), one 300 kB random archive."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        daemon = self.vault.start("--quota", str(QUOTA_BYTES))
        self.addCleanup(daemon.stop)
        self.port = daemon.wait_listening()
        self.context = self.vault.tls_context()
        self.session = login(self.context, self.port)
        self.content = os.urandom(300_000)
        with connect(self.context, self.port) as sock:
            sock.sendall(raw_upload_head("backup.tar", len(self.content), self.session) + self.content)
            uploaded = read_response(sock)
        self.assertEqual(uploaded.status, 201, uploaded.body)
        self.archive_id = uploaded.json()["id"]
        self.etag = '"' + hashlib.sha256(self.content).hexdigest() + '"'

    def get(self, *headers: tuple[str, str]) -> tuple[int, dict[str, str], bytes]:
        response = call(
            self.context,
            self.port,
            "GET",
            f"/download-file?id={self.archive_id}",
            headers=[*CURL_HEADERS, *headers],
            session=self.session,
        )
        return response.status, response.headers, response.body

    def test_curl_range(self) -> None:
        """curl -r 1000-1999: 206, Content-Range, exactly those bytes; with
        If-Range and the ETag as curl -C - sends after an interruption: the
        rest; past the end: 416 with bytes */size; a stale ETag: 200 whole."""
        status, headers, body = self.get(("Range", "bytes=1000-1999"))
        self.assertEqual(status, 206)
        self.assertEqual(headers["content-range"], f"bytes 1000-1999/{len(self.content)}")
        self.assertEqual(headers["accept-ranges"], "bytes")
        self.assertEqual(headers["etag"], self.etag)
        self.assertEqual(body, self.content[1000:2000])

        status, headers, body = self.get(("Range", "bytes=123456-"), ("If-Range", self.etag))
        self.assertEqual((status, body), (206, self.content[123456:]))

        status, headers, body = self.get(("Range", f"bytes={len(self.content)}-"))
        self.assertEqual(status, 416)
        self.assertEqual(headers["content-range"], f"bytes */{len(self.content)}")
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")

        status, headers, body = self.get(("Range", "bytes=0-9"), ("If-Range", '"' + "0" * 64 + '"'))
        self.assertEqual((status, body), (200, self.content))

    def test_usage(self) -> None:
        """GET /usage counts the archive, its stored bytes and the quota."""
        response = call(self.context, self.port, "GET", "/usage", session=self.session)
        self.assertEqual(response.status, 200, response.body)
        body = response.json()
        self.assertEqual((body["archives"], body["quota_bytes"], body["uploads_in_progress"]), (1, QUOTA_BYTES, 0))
        self.assertGreater(body["stored_bytes"], len(self.content))
