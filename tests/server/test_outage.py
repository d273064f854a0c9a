"""A store outage (the database or the object store unreachable) is a 503
with Retry-After, in the contract's JSON error form; the vault serves again
as soon as the store is back."""

from __future__ import annotations

from typing import Any

from securevault.core.users import MalformedPasswordHash
from securevault.stores.blobs import BlobStoreError
from securevault.stores.metadata import MetadataError, UserRecord
from tests.support.app import VaultClient, add_user, default_client, make_app
from tests.support.rows import vault_rows
from tests.support.testcase import SyncTestCase

PASSWORD = "correct horse battery"


class OutageTests(SyncTestCase):
    def setUp(self) -> None:
        self.app, self.clock = make_app(self)
        add_user(self.app, "alice", PASSWORD)
        self.client = VaultClient(self.app, self.clock, self)
        self.session = self.client.session("alice", PASSWORD, default_client(0))
        self.stored = self.client.post_json(
            b"/upload-file", {"filename": "a.txt", "content": "aGVsbG8="}, session=self.session
        ).json()

    def down(self, target: Any, *names: str, error: Exception | None = None) -> None:
        def raise_(*_: object, **__: object) -> None:
            raise error or MetadataError("the metadata store failed: OperationalError: connection refused")

        for name in names:
            self.patch(target, name, raise_)

    def assert_unavailable(self, response: Any) -> None:
        self.assertEqual(response.status, 503, response.body)
        self.assertEqual(response.json()["error"], "unavailable")
        self.assertEqual(response.header("Retry-After"), "5")
        self.assertNotIn(b"Traceback", response.body)
        self.assertNotIn(b"OperationalError", response.body)

    def test_listing_and_download_while_the_database_is_down(self) -> None:
        metadata = self.app.storage.metadata
        self.down(metadata, "list_archives", "get_archive")
        self.assert_unavailable(self.client.get(b"/get-files", session=self.session))
        self.assert_unavailable(
            self.client.get(b"/download-file?id=" + self.stored["id"].encode(), session=self.session)
        )

    def test_login_while_the_database_is_down(self) -> None:
        self.down(self.app.storage.metadata, "get_user", "reserve_login_attempt")
        self.assert_unavailable(self.client.login("alice", PASSWORD))

    def test_login_while_the_user_store_is_down(self) -> None:
        """The user lookup failing (the throttle's reads still working) is an
        outage too: 503 unavailable with Retry-After, not a 500."""
        self.down(self.app.storage.metadata, "get_user")
        self.assert_unavailable(self.client.login("alice", PASSWORD))

    def test_malformed_password_hash_is_not_an_outage(self) -> None:
        """A stored password hash that is damaged is a server fault, not an
        outage: 500 internal_error with a request id, never a 503 inviting
        the client to retry."""
        metadata = self.app.storage.metadata
        mac = vault_rows(metadata, self.app.storage.keyring).user_mac("mallory", "m" * 32, "not a hash")
        metadata.add_user(UserRecord("mallory", "m" * 32, "not a hash", "2026-01-01T00:00:00Z", mac))
        response = self.client.login("mallory", PASSWORD)
        self.assertEqual(response.status, 500, response.body)
        self.assertEqual(response.json()["error"], "internal_error")
        self.assertIn("request_id", response.json())
        self.assertIsNone(response.header("Retry-After"))
        self.assertEqual(len(self.flushLoggedErrors(MalformedPasswordHash)), 1)

    def test_upload_while_the_blob_store_is_down(self) -> None:
        self.down(self.app.storage.blobs, "writer", error=BlobStoreError("S3 CreateMultipartUpload failed: boom"))
        response = self.client.post_json(
            b"/upload-file", {"filename": "b.txt", "content": "aGVsbG8="}, session=self.session
        )
        self.assert_unavailable(response)
        raw = self.client.request(
            b"POST", b"/upload-file", body=b"x" * 1000, session=self.session,
            headers=[(b"Content-Type", b"application/octet-stream"), (b"X-Filename", b"c.bin")],
        )  # fmt: skip
        self.assert_unavailable(raw)

    def test_back_when_the_store_is(self) -> None:
        metadata = self.app.storage.metadata
        original = metadata.list_archives
        self.down(metadata, "list_archives")
        self.assert_unavailable(self.client.get(b"/get-files", session=self.session))
        self.patch(metadata, "list_archives", original)
        response = self.client.get(b"/get-files", session=self.session)
        self.assertEqual(response.status, 200)
        self.assertEqual([f["id"] for f in response.json()["files"]], [self.stored["id"]])
