# -*- test-case-name: tests.test_staging -*-
"""The fast path of resumable uploads (L{securevault.staging}): the archive
assembled while the PATCHes arrive, and every way back to the slow path
(assembled from the pieces) when this process did not see every
acknowledged byte in order."""

from __future__ import annotations

import hashlib
import os

from securevault.core.archive import IntegrityError
from securevault.staging import MAX_ASSEMBLERS, ChecksumMismatch, OffsetMismatch, PieceResult, UploadStaging
from tests.support.app import add_user, blob_directory, make_app
from tests.support.testcase import SyncTestCase

PIECE = 70_000  # not a multiple of the 16 KiB chunk: pieces end mid-chunk


class FastPathTests(SyncTestCase):
    """An upload whose PATCHes this process took in order is assembled as
    they arrive; anything else finishes from the pieces, byte-exact."""

    def setUp(self) -> None:
        self.app, self.clock = make_app(self)
        self.owner = add_user(self.app, "alice", "alice correct horse")
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
        (staging or self.staging).remove_pieces(self.owner, result.leftover)  # as the resource does, after the 204
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
        directory = blob_directory(self.app.storage, self.owner)
        return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []

    def assertOnly(self, archive_ids: list[str]) -> None:
        """Nothing but these archives is left: no piece, no temp blob, no
        reservation, no assembler."""
        self.assertEqual(self.files(), sorted(f"{archive_id}.body" for archive_id in archive_ids))
        self.assertEqual(self.app.storage.metadata.reserved(self.owner), 0)
        self.assertEqual(self.staging.live_assemblers, 0)

    # -- the fast path -------------------------------------------------------

    def test_in_order_upload_is_assembled(self) -> None:
        """PATCHes taken in order by this process finish on the fast path
        (the pieces are not read back) into a byte-exact archive; the pieces
        are still written and acknowledged, and go once it exists."""
        data = os.urandom(5 * PIECE + 123)
        upload_id = self.start(data)
        self.patch(upload_id, 0, data[:PIECE])
        self.assertEqual(self.staging.live_assemblers, 1)
        pieces = [name for name in self.files() if not name.startswith(".")]
        self.assertEqual(len(pieces), 1)  # the acknowledged piece, beside the archive's temp blob
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
        directory = blob_directory(self.app.storage, self.owner)
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
        path = blob_directory(self.app.storage, self.owner) / f"{assembler.pieces[0].blob_id}.body"
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
