# -*- test-case-name: tests.core.test_runs -*-
"""Tests for L{securevault.core.runs}: the run pieces an archive written
PATCH by PATCH leaves behind give back exactly the acknowledged bytes --
stored or deflated, pieces ending anywhere in a chunk -- and refuse pieces
that are moved, mixed up or damaged."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from securevault.core.archive import ArchiveCheckpoint, ArchiveInfo, ArchiveWriter, IntegrityError
from securevault.core.runs import (
    RUN_END_BYTES,
    RUN_HEAD_BYTES,
    RunDecoder,
    RunHead,
    open_run_end,
    open_run_head,
    seal_run_end,
    seal_run_head,
)
from tests.support.testcase import SyncTestCase

UPLOAD_KEY = bytes(range(32))
OWNER = "owner-1"
UPLOAD = "b" * 32


class _MemoryBlob:
    """A blob in memory (the archive's, or one piece's run)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.data += data

    def commit(self) -> int:
        return len(self.data)

    def abort(self) -> None:
        pass


class _MemoryIndex:
    """Just enough of an L{ArchiveIndex} for an L{ArchiveWriter}."""

    def __init__(self) -> None:
        self.blobs = self
        self.clock_ns = time.time_ns
        self.archive = _MemoryBlob()

    def writer(self, owner_id: str, archive_id: str) -> _MemoryBlob:
        return self.archive

    def write_meta(self, owner_id: str, info: ArchiveInfo, data_key: bytes, *, quota: int | None = None) -> None:
        pass

    def discard_unindexed_blob(self, owner_id: str, archive_id: str) -> None:
        pass


@dataclass
class _Run:
    offset: int
    length: int
    head: RunHead
    run: bytes
    end: ArchiveCheckpoint


def write_runs(data: bytes, cuts: list[int]) -> tuple[ArchiveWriter, list[_Run]]:
    """An archive of C{data} written PATCH by PATCH, cut at C{cuts}: the
    writer (still open) and each PATCH's run."""
    writer = ArchiveWriter(_MemoryIndex(), OWNER, "up.bin", checkpoints=True)
    runs: list[_Run] = []
    ciphertext = 0
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
        piece = _MemoryBlob()
        writer.tee(piece)
        for block in range(start, stop, 25_000):
            writer.write(data[block : min(block + 25_000, stop)])
        checkpoint = writer.checkpoint()
        writer.tee(None)
        runs.append(
            _Run(
                start,
                stop - start,
                RunHead(writer.archive_id, writer.data_key, ciphertext),
                bytes(piece.data),
                checkpoint,
            )
        )
        ciphertext = checkpoint.ciphertext_bytes
    return writer, runs


def decode(runs: list[_Run], feed_bytes: int = 7_777) -> bytes:
    out: list[bytes] = []
    decoder = RunDecoder(UPLOAD, OWNER, lambda data: out.append(bytes(data)))
    for run in runs:
        decoder.start_run(run.head)
        for block in range(0, len(run.run), feed_bytes):
            decoder.feed(memoryview(run.run[block : block + feed_bytes]))
        end = open_run_end(
            UPLOAD_KEY, OWNER, UPLOAD, run.offset, seal_run_end(UPLOAD_KEY, OWNER, UPLOAD, run.offset, run.end)
        )
        decoder.end_run(end, run.offset + run.length)
    decoder.finish()
    return b"".join(out)


class RunPieceTests(SyncTestCase):
    def test_stored_runs_give_back_every_byte(self) -> None:
        """Random data (stored), cut before, at and after chunk boundaries:
        any prefix of runs decodes to exactly the bytes up to its end."""
        data = os.urandom(200_000)
        cuts = [1, 16_383, 16_384, 16_385, 70_000, 131_072, 199_999]
        writer, runs = write_runs(data, cuts)
        self.addCleanup(writer.abort)
        for count in range(1, len(runs) + 1):
            acknowledged = runs[count - 1].offset + runs[count - 1].length
            self.assertEqual(decode(runs[:count]), data[:acknowledged])

    def test_deflated_runs_give_back_every_byte(self) -> None:
        """Compressible data (deflated): each PATCH ended on a sync flush, so
        the runs inflate to exactly the acknowledged bytes."""
        data = b"".join(b"%08d all is well\n" % i for i in range(20_000))
        writer, runs = write_runs(data, [70_000, 70_010, 100_003, 250_000])
        self.addCleanup(writer.abort)
        self.assertTrue(runs[-1].end.stream_bytes < len(data) // 2)  # it did compress
        for count in range(1, len(runs) + 1):
            acknowledged = runs[count - 1].offset + runs[count - 1].length
            self.assertEqual(decode(runs[:count]), data[:acknowledged])

    def test_archive_after_checkpoints_is_whole(self) -> None:
        """The archive written through the checkpoints is an ordinary one
        (the sync flushes are valid deflate): it commits."""
        data = b"x" * 300_000
        writer, runs = write_runs(data, [1_000, 100_000])
        info = writer.commit()
        self.assertEqual((info.size, info.method), (len(data), "deflated"))

    def test_head_bound_to_its_place(self) -> None:
        head = RunHead("c" * 32, os.urandom(32), 56 + 16_400)
        sealed = seal_run_head(UPLOAD_KEY, OWNER, UPLOAD, 70_000, head)
        self.assertEqual(len(sealed), RUN_HEAD_BYTES)
        self.assertEqual(open_run_head(UPLOAD_KEY, OWNER, UPLOAD, 70_000, sealed), head)
        self.assertIsNone(open_run_head(UPLOAD_KEY, OWNER, UPLOAD, 0, sealed))
        self.assertIsNone(open_run_head(UPLOAD_KEY, OWNER, "c" * 32, 70_000, sealed))
        self.assertIsNone(open_run_head(os.urandom(32), OWNER, UPLOAD, 70_000, sealed))
        self.assertIsNone(open_run_head(UPLOAD_KEY, OWNER, UPLOAD, 70_000, os.urandom(RUN_HEAD_BYTES)))

    def test_end_bound_to_its_place(self) -> None:
        checkpoint = ArchiveCheckpoint(5, 90, 56, b"tail")
        sealed = seal_run_end(UPLOAD_KEY, OWNER, UPLOAD, 0, checkpoint)
        self.assertEqual(len(sealed), RUN_END_BYTES)
        self.assertEqual(open_run_end(UPLOAD_KEY, OWNER, UPLOAD, 0, sealed).tail, b"tail")
        self.assertRaises(IntegrityError, open_run_end, UPLOAD_KEY, OWNER, UPLOAD, 1, sealed)
        damaged = bytearray(sealed)
        damaged[-1] ^= 1
        self.assertRaises(IntegrityError, open_run_end, UPLOAD_KEY, OWNER, UPLOAD, 0, bytes(damaged))

    def test_runs_out_of_order_refused(self) -> None:
        data = os.urandom(100_000)
        writer, runs = write_runs(data, [40_000, 70_000])
        self.addCleanup(writer.abort)
        self.assertRaises(IntegrityError, decode, [runs[1], runs[0]])
        self.assertRaises(IntegrityError, decode, [runs[0], runs[2]])

    def test_runs_of_another_archive_refused(self) -> None:
        data = os.urandom(100_000)
        first, ours = write_runs(data, [40_000])
        second, theirs = write_runs(data, [40_000])
        self.addCleanup(first.abort)
        self.addCleanup(second.abort)
        self.assertRaises(IntegrityError, decode, [ours[0], theirs[1]])

    def test_damaged_run_refused(self) -> None:
        data = os.urandom(100_000)
        writer, runs = write_runs(data, [40_000])
        self.addCleanup(writer.abort)
        damaged = bytearray(runs[1].run)
        damaged[100] ^= 1
        runs[1].run = bytes(damaged)
        self.assertRaises(IntegrityError, decode, runs)

    def test_row_disagreeing_with_run_refused(self) -> None:
        """A run whose end says another length than its row."""
        data = os.urandom(50_000)
        writer, runs = write_runs(data, [20_000])
        self.addCleanup(writer.abort)
        runs[1].length -= 1
        self.assertRaises(IntegrityError, decode, runs)
