# -*- test-case-name: tests.test_tus -*-
"""Resumable uploads with a stock tus client (tuspy) over real mutual TLS,
against a real daemon: an upload in several PATCHes, and one that survives a
SIGKILL of the daemon between two PATCHes."""

from __future__ import annotations

import hashlib
import io
import os

from tusclient import client as tus_client

from tests.support.daemon import SyncDaemon, VaultFixture, download_sha256, list_files, login
from tests.support.testcase import SyncTestCase

CHUNK_BYTES = 256 * 1024


class TuspyTests(SyncTestCase):
    """tuspy, unchanged, against the daemon."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        self.context = self.vault.tls_context()
        # tuspy passes verify=True to requests, which then trusts this bundle.
        previous = os.environ.get("REQUESTS_CA_BUNDLE")
        os.environ["REQUESTS_CA_BUNDLE"] = str(self.vault.certs / "ca.crt")
        self.addCleanup(self._restore, previous)

    @staticmethod
    def _restore(previous: str | None) -> None:
        if previous is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = previous

    def start(self) -> tuple[SyncDaemon, int]:
        daemon = self.vault.start()
        self.addCleanup(daemon.stop)
        return daemon, daemon.wait_listening()

    def tus(self, port: int, session: str) -> tus_client.TusClient:
        certs = self.vault.certs
        return tus_client.TusClient(
            f"https://localhost:{port}/uploads/",
            headers={"Authorization": f"Bearer {session}"},
            client_cert=(str(certs / "client.crt"), str(certs / "client.key")),
        )

    def test_upload_in_chunks(self) -> None:
        """A file sent in several PATCHes becomes one archive that downloads
        byte-exact."""
        _, port = self.start()
        session = login(self.context, port)
        data = os.urandom(5 * CHUNK_BYTES + 12345)
        uploader = self.tus(port, session).uploader(
            file_stream=io.BytesIO(data), chunk_size=CHUNK_BYTES, metadata={"filename": "tuspy.bin"}
        )
        uploader.upload()
        self.assertEqual(uploader.offset, len(data))
        [listed] = list_files(self.context, port, session)
        self.assertEqual((listed["filename"], listed["size"]), ("tuspy.bin", len(data)))
        self.assertEqual(download_sha256(self.context, port, session, listed["id"]), hashlib.sha256(data).hexdigest())

    def test_resume_after_kill(self) -> None:
        """SIGKILL between two PATCHes: after a restart, HEAD gives the
        acknowledged offset, the upload resumes from there, and the archive
        downloads byte-exact."""
        self.resume_after_kill(os.urandom(3 * CHUNK_BYTES + 999))

    def test_resume_compressible_after_kill(self) -> None:
        """The same with a file that deflates: the first two PATCHes' run
        pieces (each ending on a sync flush) give back their bytes after the
        restart."""
        self.resume_after_kill(b"".join(b"line %08d: all is well\n" % i for i in range(40_000)))

    def resume_after_kill(self, data: bytes) -> None:
        daemon, port = self.start()
        session = login(self.context, port)
        uploader = self.tus(port, session).uploader(
            file_stream=io.BytesIO(data), chunk_size=CHUNK_BYTES, metadata={"filename": "resumed.bin"}
        )
        uploader.upload_chunk()
        uploader.upload_chunk()
        self.assertEqual(uploader.offset, 2 * CHUNK_BYTES)
        assert uploader.url is not None
        path = uploader.url.split(f":{port}", 1)[1]
        daemon.kill()
        _, port = self.start()
        session = login(self.context, port)
        resumed = self.tus(port, session).uploader(
            file_stream=io.BytesIO(data),
            chunk_size=CHUNK_BYTES,
            url=f"https://localhost:{port}{path}",
        )
        self.assertEqual(resumed.get_offset(), 2 * CHUNK_BYTES)
        resumed.upload()
        [listed] = list_files(self.context, port, session)
        self.assertEqual((listed["filename"], listed["size"]), ("resumed.bin", len(data)))
        self.assertEqual(download_sha256(self.context, port, session, listed["id"]), hashlib.sha256(data).hexdigest())
        self.assertEqual(self.vault.verify().returncode, 0)
