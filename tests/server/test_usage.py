# -*- test-case-name: tests.server.test_usage -*-
"""GET /usage (API.md): the caller's archives, stored bytes, quota and raw
uploads in progress, through the whole pipeline."""

from __future__ import annotations

import os

from tests.server.test_resources import OCTETS, _VaultTestCase
from tests.support.app import ClientCert, encode_request

USAGE_FIELDS = {"archives", "stored_bytes", "quota_bytes", "uploads_in_progress"}


class UsageTests(_VaultTestCase):
    """No quota."""

    def usage(self, session: str, cert: ClientCert | None = None) -> dict[str, object]:
        response = self.client.get(b"/usage", session=session, cert=cert)
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.header("Content-Type"), "application/json; charset=utf-8")
        body: dict[str, object] = response.json()
        self.assertEqual(set(body), USAGE_FIELDS)
        return body

    def test_empty(self) -> None:
        """A new user has nothing, and no quota: null."""
        self.assertEqual(
            self.usage(self.alice()),
            {"archives": 0, "stored_bytes": 0, "quota_bytes": None, "uploads_in_progress": 0},
        )

    def test_counts_own_archives(self) -> None:
        """Archives and stored bytes (the encrypted bodies, as the quota
        counts them) are the caller's own; a delete takes them off."""
        alice, bob = self.alice(), self.bob()
        first = self.stored(self.upload_raw(alice, "a.bin", os.urandom(50_000)))
        self.stored(self.upload_json(alice, "b.txt", b"hello " * 1000))
        self.stored(self.upload_json(bob, "bob.txt", b"bob's", cert=self.bob_cert))
        stored = sum(info.stored_bytes for info in self.app.storage.list(self.alice_id))
        self.assertGreater(stored, 50_000)
        body = self.usage(alice)
        self.assertEqual((body["archives"], body["stored_bytes"]), (2, stored))
        self.assertEqual(body["stored_bytes"], self.app.storage.usage(self.alice_id))
        self.assertEqual(self.usage(bob, self.bob_cert)["archives"], 1)
        self.assertEqual(self.client.post_json(b"/delete-file", {"id": first}, session=alice).status, 204)
        self.assertEqual(self.usage(alice)["archives"], 1)

    def test_uploads_in_progress(self) -> None:
        """A raw upload counts while its body streams in, for its owner only,
        and stops counting when it is stored or its client leaves."""
        alice, bob = self.alice(), self.bob()

        def start(size: int) -> object:
            connection = self.client.connect()
            head = encode_request(
                b"POST",
                b"/upload-file",
                [
                    OCTETS,
                    (b"X-Filename", b"slow.bin"),
                    (b"Authorization", b"Bearer " + alice.encode()),
                    (b"Content-Length", str(size).encode()),
                ],
            )
            connection.send(head + os.urandom(size // 2))
            return connection

        stored = start(100_000)
        left = start(100_000)
        self.assertEqual(self.usage(alice)["uploads_in_progress"], 2)
        self.assertEqual(self.usage(bob, self.bob_cert)["uploads_in_progress"], 0)
        stored.send(os.urandom(50_000))  # type: ignore[attr-defined]
        [response] = stored.responses()  # type: ignore[attr-defined]
        self.assertEqual(response.status, 201)
        self.assertEqual(self.usage(alice)["uploads_in_progress"], 1)
        left.close()  # type: ignore[attr-defined]
        self.assertEqual(self.usage(alice)["uploads_in_progress"], 0)
        self.assertEqual(self.usage(alice)["archives"], 1)

    def test_head_and_methods(self) -> None:
        """HEAD answers the headers only; POST is 405 with Allow."""
        session = self.alice()
        head = self.client.request(b"HEAD", b"/usage", session=session)
        self.assertEqual((head.status, head.body), (200, b""))
        refused = self.client.request(b"POST", b"/usage", session=session)
        self.assert_error(refused, 405, "method_not_allowed")
        self.assertEqual(refused.header("Allow"), "GET, HEAD")

    def test_needs_a_session(self) -> None:
        """Without a session: 401 invalid_session."""
        self.assert_invalid_session(self.client.get(b"/usage"))


class QuotaUsageTests(_VaultTestCase):
    """--quota 1000000."""

    app_options = {"quota": 1_000_000}

    def test_quota(self) -> None:
        """quota_bytes is --quota."""
        response = self.client.get(b"/usage", session=self.alice())
        self.assertEqual(response.json()["quota_bytes"], 1_000_000)
