# -*- test-case-name: tests.server.test_uploads -*-
"""Resumable uploads (tus 1.0.0 at /uploads/, API.md) through the whole
pipeline: every answer of the protocol, and every error case."""

from __future__ import annotations

import base64
import hashlib
import os

from tests.server.test_resources import _VaultTestCase
from tests.support.app import ClientCert, Response
from tests.support.app import blob_directory as _blob_directory

TUS = (b"Tus-Resumable", b"1.0.0")
OFFSET_TYPE = (b"Content-Type", b"application/offset+octet-stream")


def metadata(filename: str) -> tuple[bytes, bytes]:
    return (b"Upload-Metadata", b"filename " + base64.b64encode(filename.encode("utf-8")))


class UploadsTests(_VaultTestCase):
    """The protocol with a stock client's requests."""

    # -- helpers -------------------------------------------------------------

    def create(
        self, session: str | None, length: int, filename: str = "big.bin", *, cert: ClientCert | None = None
    ) -> Response:
        return self.client.request(
            b"POST",
            b"/uploads/",
            headers=[TUS, (b"Upload-Length", str(length).encode()), metadata(filename)],
            session=session,
            cert=cert,
        )

    def location(self, response: Response) -> bytes:
        self.assertEqual(response.status, 201, response.body)
        location = response.header("Location")
        assert location is not None
        self.assertTrue(location.startswith("/uploads/"))
        return location.encode("ascii")

    def send_patch(
        self,
        session: str | None,
        location: bytes,
        offset: int,
        body: bytes,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        cert: ClientCert | None = None,
    ) -> Response:
        return self.client.request(
            b"PATCH",
            location,
            body=body,
            headers=headers if headers is not None else [TUS, OFFSET_TYPE, (b"Upload-Offset", str(offset).encode())],
            session=session,
            cert=cert,
        )

    def head(self, session: str | None, location: bytes, cert: ClientCert | None = None) -> Response:
        return self.client.request(b"HEAD", location, headers=[TUS], session=session, cert=cert)

    def assertError(self, response: Response, status: int, code: str) -> None:
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.json()["error"], code)
        self.assertEqual(response.header("Content-Type"), "application/json; charset=utf-8")

    def fetch(self, session: str, archive_id: str) -> bytes:
        response = self.client.get(
            b"/download-file?id=" + archive_id.encode(),
            session=session,
            headers=[(b"Accept", b"application/octet-stream")],
        )
        self.assertEqual(response.status, 200, response.body)
        return response.body

    def piece_files(self, *, temp: bool = False) -> list[str]:
        """The committed blobs in alice's directory (pieces, archives); with
        C{temp}, the temp blobs and journals too (an upload's archive being
        assembled)."""
        directory = _blob_directory(self.app.storage, self.alice_id)
        if not directory.is_dir():
            return []
        return sorted(
            path.name
            for path in directory.iterdir()
            if temp or (path.name.endswith(".body") and not path.name.startswith("."))
        )

    # -- the protocol ----------------------------------------------------------

    def test_options(self) -> None:
        """OPTIONS needs no session and says what the server supports."""
        response = self.client.request(b"OPTIONS", b"/uploads/")
        self.assertEqual(response.status, 204, response.body)
        self.assertEqual(response.header("Tus-Resumable"), "1.0.0")
        self.assertEqual(response.header("Tus-Version"), "1.0.0")
        self.assertEqual(response.header("Tus-Extension"), "creation,termination,expiration,checksum")
        self.assertEqual(response.header("Tus-Max-Size"), str(self.app.config.max_upload_size))
        self.assertEqual(response.header("Tus-Checksum-Algorithm"), "sha1,sha256")

    def test_upload_in_pieces(self) -> None:
        """POST, then PATCHes of the next bytes (HEAD tells where it is); the
        last one makes the archive, like a raw upload, and names it."""
        alice = self.alice()
        data = os.urandom(300_000)
        created = self.create(alice, len(data), "pieces.bin")
        location = self.location(created)
        self.assertIsNotNone(created.header("Upload-Expires"))
        head = self.head(alice, location)
        self.assertEqual(head.status, 200, head.body)
        self.assertEqual((head.header("Upload-Offset"), head.header("Upload-Length")), ("0", str(len(data))))
        self.assertEqual(head.header("Cache-Control"), "no-store")
        self.assertTrue(str(head.header("Upload-Expires")).endswith("GMT"))
        first = self.send_patch(alice, location, 0, data[:100_000])
        self.assertEqual(first.status, 204, first.body)
        self.assertEqual(first.header("Upload-Offset"), "100000")
        self.assertIsNone(first.header("Upload-Archive-Id"))
        self.assertEqual(self.head(alice, location).header("Upload-Offset"), "100000")
        second = self.send_patch(alice, location, 100_000, data[100_000:])
        self.assertEqual(second.status, 204, second.body)
        self.assertEqual(second.header("Upload-Offset"), str(len(data)))
        archive_id = second.header("Upload-Archive-Id")
        assert archive_id is not None
        [info] = self.app.storage.list(self.alice_id)
        self.assertEqual((info.id, info.filename, info.size), (archive_id, "pieces.bin", len(data)))
        self.assertEqual(info.sha256, hashlib.sha256(data).hexdigest())
        self.assertEqual(self.fetch(alice, archive_id), data)
        self.assertEqual(self.head(alice, location).status, 404)
        self.assertEqual(self.piece_files(temp=True), [f"{archive_id}.body"])  # the pieces are gone
        self.assertEqual(self.app.storage.metadata.reserved(self.alice_id), 0)
        # Assembled as the PATCHes came (tests/test_staging.py), not re-read at the end.
        staging = self.app.staging
        self.assertEqual((staging.fast_finishes, staging.slow_finishes, staging.live_assemblers), (1, 0, 0))

    def test_pieces_encrypted(self) -> None:
        """Staged bytes are never on disk in plaintext."""
        alice = self.alice()
        marker = b"PLAINTEXT-MARKER-" * 1000
        location = self.location(self.create(alice, len(marker) + 10))
        self.assertEqual(self.send_patch(alice, location, 0, marker).status, 204)
        found = [name for name in self.piece_files()]
        self.assertEqual(len(found), 1)
        directory = _blob_directory(self.app.storage, self.alice_id)
        for path in self.app.config.data_dir.rglob("*"):
            if path.is_file():
                self.assertNotIn(b"PLAINTEXT-MARKER", path.read_bytes(), path)
        self.assertTrue(directory.is_dir())

    def test_empty_upload(self) -> None:
        """Length 0: the (empty) archive exists at the POST, named in its 201."""
        alice = self.alice()
        created = self.create(alice, 0, "empty.txt")
        self.assertEqual(created.status, 201, created.body)
        archive_id = created.header("Upload-Archive-Id")
        assert archive_id is not None
        self.assertEqual(self.fetch(alice, archive_id), b"")

    def test_delete(self) -> None:
        """DELETE: 204, the staged bytes and reservation gone, 404 after."""
        alice = self.alice()
        location = self.location(self.create(alice, 1000))
        self.assertEqual(self.send_patch(alice, location, 0, b"x" * 500).status, 204)
        self.assertEqual(len(self.piece_files()), 1)
        response = self.client.request(b"DELETE", location, headers=[TUS], session=alice)
        self.assertEqual(response.status, 204, response.body)
        self.assertEqual(self.piece_files(temp=True), [])
        self.assertEqual(self.app.storage.metadata.reserved(self.alice_id), 0)
        self.assertEqual(self.head(alice, location).status, 404)
        self.assertError(self.send_patch(alice, location, 500, b"y" * 500), 404, "not_found")
        self.assertError(self.client.request(b"DELETE", location, headers=[TUS], session=alice), 404, "not_found")

    def test_checksum(self) -> None:
        """A right Upload-Checksum (sha1 or sha256) is accepted; a wrong one
        is 460 and its bytes are dropped."""
        alice = self.alice()
        data = os.urandom(2000)
        location = self.location(self.create(alice, len(data)))

        def checked(offset: int, body: bytes, algorithm: str, digest: bytes) -> Response:
            headers = [
                TUS,
                OFFSET_TYPE,
                (b"Upload-Offset", str(offset).encode()),
                (b"Upload-Checksum", algorithm.encode() + b" " + base64.b64encode(digest)),
            ]
            return self.send_patch(alice, location, offset, body, headers=headers)

        bad = checked(0, data[:1000], "sha256", hashlib.sha256(b"other").digest())
        self.assertError(bad, 460, "checksum_mismatch")
        self.assertEqual(self.head(alice, location).header("Upload-Offset"), "0")
        self.assertEqual(self.piece_files(temp=True), [])  # no piece kept, and no journal: nothing was acknowledged
        self.assertEqual(checked(0, data[:1000], "sha1", hashlib.sha1(data[:1000]).digest()).status, 204)
        last = checked(1000, data[1000:], "sha256", hashlib.sha256(data[1000:]).digest())
        self.assertEqual(last.status, 204, last.body)
        self.assertEqual(self.fetch(alice, str(last.header("Upload-Archive-Id"))), data)
        unknown = checked(0, b"", "md5", b"0" * 16)
        self.assertError(unknown, 400, "bad_request")

    def test_offset_mismatch(self) -> None:
        """A PATCH that does not start at the upload's offset is 409."""
        alice = self.alice()
        location = self.location(self.create(alice, 1000))
        self.assertError(self.send_patch(alice, location, 10, b"x" * 10), 409, "offset_mismatch")
        self.assertEqual(self.send_patch(alice, location, 0, b"x" * 10).status, 204)
        self.assertError(self.send_patch(alice, location, 0, b"x" * 10), 409, "offset_mismatch")
        self.assertEqual(self.head(alice, location).header("Upload-Offset"), "10")

    def test_past_length(self) -> None:
        """A body that would pass the declared length is refused, unkept."""
        alice = self.alice()
        location = self.location(self.create(alice, 10))
        self.assertError(self.send_patch(alice, location, 0, b"x" * 11), 400, "bad_request")
        self.assertEqual(self.head(alice, location).header("Upload-Offset"), "0")

    def test_other_user(self) -> None:
        """Another user's upload is 404 to every method."""
        alice, bob = self.alice(), self.bob()
        location = self.location(self.create(alice, 100))
        self.assertEqual(self.head(bob, location, cert=self.bob_cert).status, 404)
        self.assertError(self.send_patch(bob, location, 0, b"x", cert=self.bob_cert), 404, "not_found")
        deleted = self.client.request(b"DELETE", location, headers=[TUS], session=bob, cert=self.bob_cert)
        self.assertError(deleted, 404, "not_found")
        self.assertEqual(self.head(alice, location).header("Upload-Offset"), "0")

    def test_no_session(self) -> None:
        """Every method but OPTIONS needs a session: 401."""
        alice = self.alice()
        location = self.location(self.create(alice, 100))
        self.assertError(self.create(None, 100), 401, "invalid_session")
        self.assertEqual(self.head(None, location).status, 401)
        self.assertError(self.send_patch(None, location, 0, b"x"), 401, "invalid_session")
        self.assertError(self.client.request(b"DELETE", location, headers=[TUS]), 401, "invalid_session")

    def test_unsupported_version(self) -> None:
        """A Tus-Resumable other than 1.0.0 (or none) is 412 with Tus-Version."""
        alice = self.alice()
        location = self.location(self.create(alice, 100))
        old = [(b"Tus-Resumable", b"0.2.2"), OFFSET_TYPE, (b"Upload-Offset", b"0")]
        response = self.send_patch(alice, location, 0, b"x", headers=old)
        self.assertError(response, 412, "unsupported_version")
        self.assertEqual(response.header("Tus-Version"), "1.0.0")
        created = self.client.request(
            b"POST", b"/uploads/", headers=[(b"Upload-Length", b"5"), metadata("a")], session=alice
        )
        self.assertError(created, 412, "unsupported_version")

    def test_wrong_content_type(self) -> None:
        alice = self.alice()
        location = self.location(self.create(alice, 100))
        headers = [TUS, (b"Content-Type", b"application/octet-stream"), (b"Upload-Offset", b"0")]
        self.assertError(self.send_patch(alice, location, 0, b"x", headers=headers), 415, "unsupported_media_type")

    def test_creation_checks(self) -> None:
        """The filename rules and the size limit apply at the POST."""
        alice = self.alice()
        self.assertError(self.create(alice, 10, "a/b"), 400, "invalid_filename")
        no_name = self.client.request(b"POST", b"/uploads/", headers=[TUS, (b"Upload-Length", b"5")], session=alice)
        self.assertError(no_name, 400, "invalid_filename")
        self.assertError(self.create(alice, self.app.config.max_upload_size + 1), 413, "too_large")
        no_length = self.client.request(b"POST", b"/uploads/", headers=[TUS, metadata("a")], session=alice)
        self.assertError(no_length, 400, "bad_request")

    def test_unknown_ids(self) -> None:
        """Ids that are not upload ids, and paths below one, are 404."""
        alice = self.alice()
        self.assertEqual(self.head(alice, b"/uploads/nothing").status, 404)
        self.assertEqual(self.head(alice, b"/uploads/" + b"a" * 32 + b"/x").status, 404)

    def test_expiry(self) -> None:
        """An upload without progress for --upload-expiry is removed by the
        sweep, with its pieces and reservation; progress pushes it back."""
        alice = self.alice()
        location = self.location(self.create(alice, 1000))
        expiry = self.app.config.upload_expiry
        self.clock.advance(expiry - 10)
        alice = self.alice()  # sessions idle out sooner than uploads
        self.assertEqual(self.send_patch(alice, location, 0, b"x" * 100).status, 204)
        self.clock.advance(20)
        self.assertEqual(self.app.staging.sweep_expired(self.clock.seconds()), 0)
        self.assertEqual(self.head(alice, location).header("Upload-Offset"), "100")
        self.clock.advance(expiry)
        alice = self.alice()
        self.assertEqual(self.app.staging.sweep_expired(self.clock.seconds()), 1)
        self.assertEqual(self.head(alice, location).status, 404)
        self.assertEqual(self.piece_files(temp=True), [])
        self.assertEqual(self.app.storage.metadata.reserved(self.alice_id), 0)


class UploadQuotaTests(UploadsTests):
    """The same protocol under a quota, and the quota's own cases."""

    app_options = {"quota": 400_000}

    def test_reserved_from_the_post(self) -> None:
        """The declared length counts against the quota from the POST: a
        second upload or a raw upload that would not fit beside it is 507,
        and the reservation goes with a DELETE."""
        alice = self.alice()
        location = self.location(self.create(alice, 300_000))
        self.assertError(self.create(alice, 200_000), 507, "insufficient_storage")
        self.assertError(self.upload_raw(alice, "raw.bin", os.urandom(150_000)), 507, "insufficient_storage")
        self.assertEqual(self.client.request(b"DELETE", location, headers=[TUS], session=alice).status, 204)
        self.assertEqual(self.create(alice, 200_000).status, 201)
