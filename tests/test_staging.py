# -*- test-case-name: tests.test_staging -*-
"""The fast path of resumable uploads (L{securevault.staging}): the archive
assembled while the PATCHes arrive, and every way back to the slow path
(assembled from the pieces) when this process did not see every
acknowledged byte in order."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, cast

from securevault.core.archive import IntegrityError, StoreUnavailable
from securevault.core.chunked import CHUNK_PLAINTEXT_BYTES
from securevault.core.runs import RUN_END_BYTES, RUN_HEAD_BYTES
from securevault.staging import MAX_ASSEMBLERS, ChecksumMismatch, OffsetMismatch, PieceResult, UploadStaging
from securevault.stores.blobs import BlobStore, JournalStore
from securevault.stores.metadata import MetadataError
from tests.support.app import add_user, blob_directory, make_app
from tests.support.daemon import open_journals
from tests.support.testcase import SyncTestCase

PIECE = 70_000  # not a multiple of the 16 KiB chunk: pieces end mid-chunk


class _StagingTestCase(SyncTestCase):
    """A vault on a fake clock, one user, and tus uploads by hand."""

    def setUp(self) -> None:
        self.app, self.clock = make_app(self)
        self.owner = add_user(self.app, "alice", "alice correct horse")
        self.directory = blob_directory(self.app.storage, self.owner)
        self.staging = self.app.staging

    def start(self, data: bytes, staging: UploadStaging | None = None) -> str:
        status = (staging or self.staging).create(self.owner, "up.bin", len(data), self.clock.seconds(), quota=None)
        return status.upload_id

    def patch(
        self,
        upload_id: str,
        offset: int,
        body: bytes,
        *,
        staging: UploadStaging | None = None,
        checksum: tuple[str, bytes] | None = None,
    ) -> PieceResult:
        writer = (staging or self.staging).piece_writer(
            self.owner, upload_id, offset, checksum=checksum, now=self.clock.seconds
        )
        for start in range(0, len(body), 30_000):
            writer.write(body[start : start + 30_000])
        result = writer.commit()
        self.assertEqual(bool(result.leftover), result.archive is not None)
        if result.archive is not None:  # as the resource does, after the 204
            (staging or self.staging).remove_upload_blobs(self.owner, upload_id, result.leftover)
        return result

    def upload(self, data: bytes, upload_id: str, start: int = 0, staging: UploadStaging | None = None) -> str:
        """PATCH the rest of C{data} from C{start}; the archive id."""
        result = None
        for offset in range(start, len(data), PIECE):
            result = self.patch(upload_id, offset, data[offset : offset + PIECE], staging=staging)
        assert result is not None and result.archive is not None
        return result.archive.id

    def assertArchive(self, archive_id: str, data: bytes) -> None:
        info, content = self.app.storage.read_all(self.owner, archive_id)
        self.assertEqual(content, data)
        self.assertEqual(
            (info.size, info.sha256, info.filename), (len(data), hashlib.sha256(data).hexdigest(), "up.bin")
        )

    def files(self) -> list[str]:
        """Every file in the owner's blob directory, temp files included."""
        directory = self.directory
        return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []

    def assertOnly(self, archive_ids: list[str]) -> None:
        """Nothing but these archives is left: no piece, no temp blob, no
        reservation, no assembler."""
        self.assertEqual(self.files(), sorted(f"{archive_id}.body" for archive_id in archive_ids))
        self.assertEqual(self.app.storage.metadata.reserved(self.owner), 0)
        self.assertEqual(self.staging.live_assemblers, 0)


class FastPathTests(_StagingTestCase):
    """An upload whose PATCHes this process took in order is assembled as
    they arrive; anything else finishes from the pieces, byte-exact."""

    def test_in_order_upload_is_assembled(self) -> None:
        """PATCHes taken in order by this process finish on the fast path
        (the pieces are not read back) into a byte-exact archive; the pieces
        are still written and acknowledged, and go once it exists."""
        data = os.urandom(5 * PIECE + 123)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.assertEqual(self.staging.live_assemblers, 1)
        pieces = [name for name in self.files() if name.endswith(".body")]
        self.assertEqual(len(pieces), 1)  # the acknowledged piece
        journals = [name for name in self.files() if name.endswith(".journal")]
        self.assertEqual(journals, [f"{upload_id}.{self.staging._assemblers[upload_id].writer.archive_id}.journal"])
        archive_id = self.upload(data, upload_id, PIECE)
        self.assertArchive(archive_id, data)
        self.assertEqual((self.staging.fast_finishes, self.staging.slow_finishes), (1, 0))
        self.assertOnly([archive_id])

    def test_compressible_upload_is_assembled(self) -> None:
        """A deflated archive comes out of the fast path byte-exact too."""
        data = b"log line: all is well\n" * 20_000
        upload_id = self.start(data)
        archive_id = self.upload(data, upload_id)
        self.assertArchive(archive_id, data)
        self.assertEqual(self.app.storage.info(self.owner, archive_id).method, "deflated")
        self.assertEqual(self.staging.fast_finishes, 1)

    def test_upload_in_one_patch(self) -> None:
        """One PATCH with the whole file is assembled at once."""
        data = os.urandom(100_000)
        upload_id = self.start(data)
        result = self.patch(upload_id, 0, data)
        assert result.archive is not None
        self.assertArchive(result.archive.id, data)
        self.assertEqual(self.staging.fast_finishes, 1)
        self.assertOnly([result.archive.id])

    # -- back to the slow path -------------------------------------------------

    def test_restart_between_patches(self) -> None:
        """A process that did not see the first PATCHes (a restart, another
        node) finishes from the pieces."""
        data = os.urandom(3 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        restarted = UploadStaging(self.app.storage, self.staging.expiry_seconds)
        archive_id = self.upload(data, upload_id, PIECE, staging=restarted)
        self.assertArchive(archive_id, data)
        self.assertEqual((restarted.fast_finishes, restarted.slow_finishes), (0, 1))
        self.assertEqual(restarted.live_assemblers, 0)
        # The first process's assembler missed a PATCH: never used; the sweep
        # drops it once idle for the expiry period.
        self.assertEqual(self.staging.live_assemblers, 1)
        self.clock.advance(self.staging.expiry_seconds)
        self.staging.sweep_expired(self.clock.seconds())
        self.assertOnly([archive_id])

    def test_restart_after_deflated_runs(self) -> None:
        """Run pieces of a deflated archive, then a restart: the pieces give
        back every acknowledged byte (each PATCH ended on a sync flush), and
        the rest goes on as pieces of their own."""
        data = b"".join(b"line %d: all is well\n" % i for i in range(40_000))
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.patch(upload_id, PIECE, data[PIECE : 3 * PIECE])
        self.addCleanup(self.staging._assemblers[upload_id].abort)
        restarted = UploadStaging(self.app.storage, self.staging.expiry_seconds)
        archive_id = self.upload(data, upload_id, 3 * PIECE, staging=restarted)
        self.assertArchive(archive_id, data)
        self.assertEqual(self.app.storage.info(self.owner, archive_id).method, "deflated")
        self.assertEqual((restarted.fast_finishes, restarted.slow_finishes), (0, 1))

    def test_run_pieces_swapped(self) -> None:
        """Two run pieces' blobs swapped behind the server's back: each
        piece's head is bound to its place, so the slow path refuses."""
        data = os.urandom(3 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.patch(upload_id, PIECE, data[PIECE : 2 * PIECE])
        assembler = self.staging._assemblers[upload_id]
        self.addCleanup(assembler.abort)
        directory = self.directory
        first, second = (directory / f"{piece.blob_id}.body" for piece in assembler.pieces)
        first_bytes, second_bytes = first.read_bytes(), second.read_bytes()
        first.write_bytes(second_bytes)
        second.write_bytes(first_bytes)
        restarted = UploadStaging(self.app.storage, self.staging.expiry_seconds)
        self.assertRaises(IntegrityError, self.patch, upload_id, 2 * PIECE, data[2 * PIECE :], staging=restarted)

    def test_run_piece_cut(self) -> None:
        """A run piece cut short (its end gone) is refused, not read as a
        shorter upload."""
        data = os.urandom(2 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        assembler = self.staging._assemblers[upload_id]
        self.addCleanup(assembler.abort)
        path = self.directory / f"{assembler.pieces[0].blob_id}.body"
        path.write_bytes(path.read_bytes()[:-100])
        restarted = UploadStaging(self.app.storage, self.staging.expiry_seconds)
        self.assertRaises(IntegrityError, self.patch, upload_id, PIECE, data[PIECE:], staging=restarted)

    def test_another_process_took_a_patch(self) -> None:
        """An assembler that missed a PATCH (another process took it) is
        dropped when its process gets the next one; slow path, byte-exact."""
        data = os.urandom(4 * PIECE)
        upload_id = self.start(data)
        other = UploadStaging(self.app.storage, self.staging.expiry_seconds)
        self.patch(upload_id, 0, data[:PIECE])
        self.patch(upload_id, PIECE, data[PIECE : 2 * PIECE], staging=other)
        archive_id = self.upload(data, upload_id, 2 * PIECE)
        self.assertArchive(archive_id, data)
        self.assertEqual((self.staging.fast_finishes, self.staging.slow_finishes), (0, 1))
        self.assertOnly([archive_id])

    def test_failed_checksum_then_retry(self) -> None:
        """A PATCH refused for its checksum (460) went into the archive being
        written, so that archive is dropped; the retry and the rest finish
        from the pieces, and the archive holds only the acknowledged bytes."""
        data = os.urandom(3 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        wrong = ("sha256", hashlib.sha256(b"something else").digest())
        self.assertRaises(ChecksumMismatch, self.patch, upload_id, PIECE, os.urandom(PIECE), checksum=wrong)
        self.assertEqual(self.staging.live_assemblers, 0)
        archive_id = self.upload(data, upload_id, PIECE)
        self.assertArchive(archive_id, data)
        self.assertEqual((self.staging.fast_finishes, self.staging.slow_finishes), (0, 1))
        self.assertOnly([archive_id])

    def test_client_gone_midway(self) -> None:
        """A PATCH aborted midway (the client left) spoils the archive being
        written; the resumed upload finishes from the pieces, byte-exact."""
        data = os.urandom(3 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        writer = self.staging.piece_writer(self.owner, upload_id, PIECE, now=self.clock.seconds)
        writer.write(os.urandom(PIECE // 2))
        writer.abort()
        self.assertEqual(self.staging.live_assemblers, 0)
        archive_id = self.upload(data, upload_id, PIECE)
        self.assertArchive(archive_id, data)
        self.assertEqual((self.staging.fast_finishes, self.staging.slow_finishes), (0, 1))
        self.assertOnly([archive_id])

    def test_empty_patch_keeps_the_fast_path(self) -> None:
        """A PATCH with no body put nothing into the archive: it stays."""
        data = os.urandom(2 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.patch(upload_id, PIECE, b"")
        archive_id = self.upload(data, upload_id, PIECE)
        self.assertArchive(archive_id, data)
        self.assertEqual((self.staging.fast_finishes, self.staging.slow_finishes), (1, 0))

    def test_run_piece_lost(self) -> None:
        """A run piece whose blob vanished: the slow path reports the damage
        and makes no archive."""
        data = os.urandom(2 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        assembler = self.staging._assemblers[upload_id]
        self.addCleanup(assembler.abort)
        self.app.storage.blobs.delete(self.owner, assembler.pieces[0].blob_id)
        restarted = UploadStaging(self.app.storage, self.staging.expiry_seconds)
        self.assertRaises(IntegrityError, self.patch, upload_id, PIECE, data[PIECE:], staging=restarted)
        self.assertEqual((restarted.fast_finishes, restarted.slow_finishes), (0, 0))

    def test_two_patches_at_once(self) -> None:
        """Two PATCHes at the same offset: one feeds the assembler, the other
        cannot (and gets a 409 at its commit); the upload stays fast."""
        data = os.urandom(3 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        first = self.staging.piece_writer(self.owner, upload_id, PIECE, now=self.clock.seconds)
        second = self.staging.piece_writer(self.owner, upload_id, PIECE, now=self.clock.seconds)
        second.write(os.urandom(PIECE))
        first.write(data[PIECE : 2 * PIECE])
        first.commit()
        self.assertRaises(OffsetMismatch, second.commit)
        archive_id = self.upload(data, upload_id, 2 * PIECE)
        self.assertArchive(archive_id, data)
        self.assertEqual((self.staging.fast_finishes, self.staging.slow_finishes), (1, 0))
        self.assertOnly([archive_id])

    def test_delete_drops_the_assembler(self) -> None:
        """DELETE (tus termination) removes the assembler and its temp blob
        with the pieces."""
        data = os.urandom(3 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.assertEqual(self.staging.live_assemblers, 1)
        self.staging.delete(self.owner, upload_id)
        self.assertOnly([])

    def test_expiry_drops_the_assembler(self) -> None:
        """An upload removed for lack of progress loses its assembler and
        temp blob with its pieces."""
        data = os.urandom(3 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.clock.advance(self.staging.expiry_seconds - 1)
        self.assertEqual(self.staging.sweep_expired(self.clock.seconds()), 0)
        self.assertEqual(self.staging.live_assemblers, 1)
        self.clock.advance(2)
        self.assertEqual(self.staging.sweep_expired(self.clock.seconds()), 1)
        self.assertOnly([])

    def test_bounded_assemblers(self) -> None:
        """More uploads at once than there may be assemblers: the least
        recently used is evicted (its upload takes the slow path), never more
        than the bound live, and every upload is byte-exact."""
        count = MAX_ASSEMBLERS + 1
        files = [os.urandom(3 * PIECE + index) for index in range(count)]
        upload_ids = [self.start(data) for data in files]
        for offset in range(0, 3 * PIECE + count, PIECE):
            for data, upload_id in zip(files, upload_ids, strict=True):
                if offset < len(data):
                    self.patch(upload_id, offset, data[offset : offset + PIECE])
                self.assertLessEqual(self.staging.live_assemblers, MAX_ASSEMBLERS)
        archive_ids = [info.id for info in self.app.storage.list(self.owner)]
        self.assertEqual(len(archive_ids), count)
        by_size = {self.app.storage.info(self.owner, archive_id).size: archive_id for archive_id in archive_ids}
        for data in files:
            self.assertArchive(by_size[len(data)], data)
        self.assertEqual(self.staging.fast_finishes + self.staging.slow_finishes, count)
        self.assertGreaterEqual(self.staging.slow_finishes, 1)
        self.assertOnly(archive_ids)


class _WithoutJournals:
    """The local blob store without its journals: the shape of a store that
    cannot keep them (S3), where each run piece holds its run."""

    def __init__(self, blobs: BlobStore) -> None:
        self.writer = blobs.writer
        self.reader = blobs.reader
        self.range_reader = blobs.range_reader
        self.delete = blobs.delete
        self.list = blobs.list
        self.remove_incomplete = blobs.remove_incomplete
        self.describe = blobs.describe


class RunsInPiecesTests(FastPathTests):
    """Every fast-path test again where the blob store keeps no journals:
    each run piece holds its run (and the archive's temp blob goes with
    its assembler)."""

    def setUp(self) -> None:
        super().setUp()
        self.app.storage.blobs = cast(BlobStore, _WithoutJournals(self.app.storage.blobs))
        self.staging = UploadStaging(self.app.storage, self.staging.expiry_seconds)
        self.assertNotIsInstance(self.app.storage.blobs, JournalStore)

    def test_in_order_upload_is_assembled(self) -> None:
        """As on the local store, but the archive is a temp blob and the
        acknowledged piece holds its run."""
        data = os.urandom(2 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        pieces = [name for name in self.files() if not name.startswith(".")]
        self.assertEqual(len(pieces), 1)  # beside the archive's temp blob
        self.assertGreater((self.directory / pieces[0]).stat().st_size, PIECE)
        archive_id = self.upload(data, upload_id, PIECE)
        self.assertArchive(archive_id, data)
        self.assertEqual((self.staging.fast_finishes, self.staging.slow_finishes), (1, 0))
        self.assertOnly([archive_id])


class JournalTests(_StagingTestCase):
    """Where the runs are in the journal (the local blob store): each byte
    is written once, and the journal outlives its assembler until the
    upload is gone."""

    def journal(self, upload_id: str) -> Path:
        (path,) = self.directory.glob(f"{upload_id}.*.journal")
        return path

    def test_pieces_hold_no_run(self) -> None:
        """A run piece is its head and end only: the bytes are written to
        disk once, into the journal."""
        data = os.urandom(3 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.patch(upload_id, PIECE, data[PIECE : 2 * PIECE])
        directory = self.directory
        sizes = [
            (directory / f"{piece.blob_id}.body").stat().st_size for piece in self.staging._assemblers[upload_id].pieces
        ]
        self.assertEqual(sizes, [RUN_HEAD_BYTES + RUN_END_BYTES] * 2)
        self.assertGreaterEqual(self.journal(upload_id).stat().st_size, 2 * PIECE - CHUNK_PLAINTEXT_BYTES)
        archive_id = self.upload(data, upload_id, 2 * PIECE)
        self.assertArchive(archive_id, data)
        self.assertOnly([archive_id])

    def test_evicted_assembler_keeps_its_journal(self) -> None:
        """An assembler dropped (a PATCH spoiled it, eviction, a restart)
        stops writing its journal but leaves it: the acknowledged runs are
        there, and the upload finishes from them on the slow path."""
        data = os.urandom(3 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        writer = self.staging.piece_writer(self.owner, upload_id, PIECE, now=self.clock.seconds)
        writer.write(os.urandom(PIECE // 2))
        writer.abort()  # the client left: the assembler is spoiled and dropped
        self.assertEqual(self.staging.live_assemblers, 0)
        self.assertTrue(self.journal(upload_id).exists())
        archive_id = self.upload(data, upload_id, PIECE)
        self.assertArchive(archive_id, data)
        self.assertEqual((self.staging.fast_finishes, self.staging.slow_finishes), (0, 1))
        self.assertOnly([archive_id])

    def test_journal_lost(self) -> None:
        """A journal that vanished: the slow path reports the damage and
        makes no archive."""
        data = os.urandom(2 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.addCleanup(self.staging._assemblers[upload_id].abort)
        self.journal(upload_id).unlink()
        restarted = UploadStaging(self.app.storage, self.staging.expiry_seconds)
        self.assertRaises(IntegrityError, self.patch, upload_id, PIECE, data[PIECE:], staging=restarted)
        self.assertEqual((restarted.fast_finishes, restarted.slow_finishes), (0, 0))

    def test_journal_cut(self) -> None:
        """A journal cut short holds less than a run piece's end says: the
        slow path refuses it rather than make a shorter archive."""
        data = os.urandom(2 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.addCleanup(self.staging._assemblers[upload_id].abort)
        journal = self.journal(upload_id)
        os.truncate(journal, journal.stat().st_size - CHUNK_PLAINTEXT_BYTES)
        restarted = UploadStaging(self.app.storage, self.staging.expiry_seconds)
        self.assertRaises(IntegrityError, self.patch, upload_id, PIECE, data[PIECE:], staging=restarted)

    def test_index_fails_at_the_end(self) -> None:
        """The last PATCH's archive is linked from the journal, then its row
        fails to commit (the metadata store went away): nothing is lost.
        The upload is still there, complete, and a HEAD finishes it from the
        journal; no blob is left over."""
        data = os.urandom(2 * PIECE)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        write_meta = self.app.storage.write_meta

        def unavailable(*args: object, **kwargs: object) -> None:
            raise StoreUnavailable("the database went away")

        self.app.storage.write_meta = unavailable  # type: ignore[method-assign]
        self.assertRaises(StoreUnavailable, self.patch, upload_id, PIECE, data[PIECE:])
        self.app.storage.write_meta = write_meta  # type: ignore[method-assign]
        status = self.staging.status(self.owner, upload_id)
        assert status.archive is not None
        self.assertArchive(status.archive.id, data)
        self.assertEqual((self.staging.fast_finishes, self.staging.slow_finishes), (0, 1))
        self.assertOnly([status.archive.id])

    def test_sweep_removes_journals_of_gone_uploads(self) -> None:
        """A crash between an upload's end and its cleanup leaves its journal
        with no upload row: the orphan sweep removes it (after the grace
        period, or at once at start-up), and keeps a live upload's."""
        gone, live = os.urandom(2 * PIECE), os.urandom(2 * PIECE)
        gone_id, live_id = self.start(gone), self.start(live)
        self.patch(live_id, 0, live[:PIECE])
        self.patch(gone_id, 0, gone[:PIECE])
        writer = self.staging.piece_writer(self.owner, gone_id, PIECE, now=self.clock.seconds)
        writer.write(gone[PIECE:])
        result = writer.commit()  # the archive's row is in; "crash" before its leftovers go
        assert result.archive is not None
        self.assertTrue(self.journal(gone_id).exists())
        self.assertEqual(self.app.storage.sweep_orphans(grace_seconds=3600), 0)  # too young
        self.assertEqual(self.app.storage.recover(), len(result.leftover) + 1)  # pieces and the journal
        self.assertFalse(list(self.directory.glob(f"{gone_id}.*")))
        self.assertTrue(self.journal(live_id).exists())
        self.assertArchive(result.archive.id, gone)
        archive_id = self.upload(live, live_id, PIECE)
        self.assertArchive(archive_id, live)

    def test_lost_answer_keeps_the_journal(self) -> None:
        """The first PATCH's row commits but its answer is lost (a network
        database): the PATCH fails, its assembler goes, but the journal the
        committed row points into stays, and the upload finishes from it."""
        data = os.urandom(2 * PIECE)
        upload_id = self.start(data)
        metadata = self.app.storage.metadata
        add_upload_piece = metadata.add_upload_piece

        def lost_answer(*args: Any) -> int:
            add_upload_piece(*args)
            raise MetadataError("connection lost after the commit")

        metadata.add_upload_piece = lost_answer  # type: ignore[method-assign,assignment]
        self.assertRaises(StoreUnavailable, self.patch, upload_id, 0, data[:PIECE])
        metadata.add_upload_piece = add_upload_piece  # type: ignore[method-assign]
        self.assertEqual(self.staging.live_assemblers, 0)
        self.assertEqual(self.staging.status(self.owner, upload_id).offset, PIECE)
        archive_id = self.upload(data, upload_id, PIECE)
        self.assertArchive(archive_id, data)
        self.assertOnly([archive_id])

    def test_never_more_journals_open_than_assemblers(self) -> None:
        """One upload more than there may be assemblers: the evicted one's
        journal is closed before the new one opens (an attacker holding
        uploads open never holds more than MAX_ASSEMBLERS files open)."""
        store = self.app.storage.blobs
        open_before: list[int] = []
        journal_writer = store.journal_writer  # type: ignore[attr-defined]

        def counting(*args: Any) -> Any:
            open_before.append(open_journals())
            return journal_writer(*args)

        store.journal_writer = counting  # type: ignore[attr-defined]
        files = [os.urandom(2 * PIECE) for _ in range(MAX_ASSEMBLERS + 2)]
        upload_ids = [self.start(data) for data in files]
        for data, upload_id in zip(files, upload_ids, strict=True):
            self.patch(upload_id, 0, data[:PIECE])
        self.assertEqual(len(open_before), MAX_ASSEMBLERS + 2)
        self.assertEqual(max(open_before), MAX_ASSEMBLERS - 1)
        self.assertEqual(open_journals(), MAX_ASSEMBLERS)
        for data, upload_id in zip(files, upload_ids, strict=True):
            self.assertArchive(self.upload(data, upload_id, PIECE), data)
        self.assertEqual(open_journals(), 0)
