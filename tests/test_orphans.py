"""A crash between an archive's blob and its index row leaves an orphan
blob, never a row without a blob; the sweep removes orphans, but only those
older than its grace period while other nodes may be mid-upload.  Run on the
embedded stores and on PostgreSQL + S3."""

from __future__ import annotations

import os
import time

from securevault.core.archive import StorageError
from securevault.core.keys import generate_keyring
from securevault.storage import SecureFileStorage
from securevault.stores.blobs import BlobStore, LocalBlobStore
from securevault.stores.metadata import MetadataError, MetadataStore, SqliteMetadataStore
from tests.support.postgres import postgres_dsn
from tests.support.s3 import make_bucket
from tests.support.testcase import SyncTestCase


class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


class OrphanContract:
    def make_stores(self) -> tuple[MetadataStore, BlobStore]:
        raise NotImplementedError

    def storage(self) -> SecureFileStorage:
        metadata, blobs = self.make_stores()
        self.addCleanup(metadata.close)  # type: ignore[attr-defined]
        return SecureFileStorage(None, generate_keyring(), metadata=metadata, blobs=blobs)

    def crash_before_row(self, storage: SecureFileStorage) -> str:
        """An upload whose process dies right after its blob committed."""
        writer = storage.writer("owner1", "file.bin")
        writer.write(os.urandom(10_000))

        def die(*_: object) -> None:
            raise _Crash()

        # The process dies before the row commits; no cleanup runs after it.
        originals = storage.write_meta, storage.blobs.delete
        setattr(storage, "write_meta", die)
        setattr(storage.blobs, "delete", die)
        try:
            writer.commit()
        except _Crash:
            pass
        finally:
            setattr(storage, "write_meta", originals[0])
            setattr(storage.blobs, "delete", originals[1])
        return writer.archive_id

    def test_crash_leaves_an_orphan_blob_never_a_row(self) -> None:
        storage = self.storage()
        kept = storage.store("owner1", "kept.txt", b"kept")
        orphan = self.crash_before_row(storage)
        self.assertEqual([info.id for info in storage.list("owner1")], [kept.id])  # type: ignore[attr-defined]
        self.assertEqual(storage.orphans(grace_seconds=None), [("owner1", orphan)])  # type: ignore[attr-defined]
        # Young orphans survive a sweep with a grace period: another node's
        # row may be a moment away.
        self.assertEqual(storage.sweep_orphans(grace_seconds=3600), 0)  # type: ignore[attr-defined]
        self.assertEqual(storage.sweep_orphans(grace_seconds=None), 1)  # type: ignore[attr-defined]
        self.assertEqual(storage.orphans(grace_seconds=None), [])  # type: ignore[attr-defined]
        self.assertEqual(storage.read_all("owner1", kept.id)[1], b"kept")  # type: ignore[attr-defined]

    def test_index_failure_removes_the_blob(self) -> None:
        """When the row cannot be written (the store is down), the upload
        fails and its blob is removed at once."""
        storage = self.storage()

        def refuse(*_: object) -> None:
            raise MetadataError("the metadata store failed: down")

        self.patch(storage.metadata, "put_archive", refuse)  # type: ignore[attr-defined]
        with self.assertRaises(StorageError):  # type: ignore[attr-defined]
            storage.store("owner1", "file.bin", b"data" * 1000)
        self.assertEqual(list(storage.blobs.list()), [])  # type: ignore[attr-defined]

    def test_lost_commit_answer_keeps_the_blob(self) -> None:
        """The row committed but its answer was lost (a network database):
        the upload fails, yet the blob stays with its row, readable."""
        storage = self.storage()
        put = storage.metadata.put_archive

        def committed_then_lost(record: object) -> None:
            put(record)  # type: ignore[arg-type]
            raise MetadataError("the metadata store failed: connection lost")

        self.patch(storage.metadata, "put_archive", committed_then_lost)  # type: ignore[attr-defined]
        with self.assertRaises(StorageError):  # type: ignore[attr-defined]
            storage.store("owner1", "file.bin", b"data" * 1000)
        [info] = storage.list("owner1")
        self.assertEqual(storage.read_all("owner1", info.id)[1], b"data" * 1000)  # type: ignore[attr-defined]
        self.assertEqual(storage.orphans(grace_seconds=None), [])  # type: ignore[attr-defined]

    def test_unknown_outcome_leaves_the_blob_to_the_sweep(self) -> None:
        """When even the check fails, the blob stays (an orphan the sweep
        removes later) rather than risk a row without a blob."""
        storage = self.storage()

        def down(*_: object) -> None:
            raise MetadataError("the metadata store failed: down")

        self.patch(storage.metadata, "put_archive", down)  # type: ignore[attr-defined]
        self.patch(storage.metadata, "get_archive", down)  # type: ignore[attr-defined]
        with self.assertRaises(StorageError):  # type: ignore[attr-defined]
            storage.store("owner1", "file.bin", b"data" * 1000)
        self.assertEqual(len(list(storage.blobs.list())), 1)  # type: ignore[attr-defined]

    def test_delete_removes_row_then_blob(self) -> None:
        storage = self.storage()
        info = storage.store("owner1", "gone.txt", b"bytes")
        storage.delete("owner1", info.id)
        self.assertEqual(storage.list("owner1"), [])  # type: ignore[attr-defined]
        self.assertEqual(list(storage.blobs.list()), [])  # type: ignore[attr-defined]


class EmbeddedOrphanTests(OrphanContract, SyncTestCase):
    def make_stores(self) -> tuple[MetadataStore, BlobStore]:
        directory = self.make_dir()
        return SqliteMetadataStore(directory / "vault.db"), LocalBlobStore(directory / "archives")

    def test_grace_uses_blob_age(self) -> None:
        storage = self.storage()
        orphan = self.crash_before_row(storage)
        blobs = storage.blobs
        assert isinstance(blobs, LocalBlobStore)
        old = time.time() - 7200
        os.utime(blobs.path("owner1", orphan), (old, old))
        self.assertEqual(storage.sweep_orphans(grace_seconds=3600), 1)


class ScaleOutOrphanTests(OrphanContract, SyncTestCase):
    def make_stores(self) -> tuple[MetadataStore, BlobStore]:
        from securevault.stores.blobs_s3 import S3BlobStore
        from securevault.stores.metadata_postgres import PostgresMetadataStore

        dsn = postgres_dsn(self)
        bucket, client = make_bucket(self)
        return PostgresMetadataStore(dsn), S3BlobStore(bucket, "vault", client=client)
