# -*- test-case-name: tests.test_ranges -*-
"""Tests for L{SecureFileStorage.open_range} (L{securevault.core.ranges}):
a byte range of an archive reads back exactly, decrypting only the chunks it
needs for a stored archive, and fails closed on tampering where it reads."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from securevault.core.archive import ArchiveInfo, IntegrityError
from securevault.core.keys import generate_keyring
from securevault.storage import SecureFileStorage
from securevault.stores.blobs import BlobEntry, BlobReader, BlobWriter, LocalBlobStore
from tests.support.s3 import make_bucket
from tests.support.testcase import SyncTestCase

OWNER = "alice"
CHUNK = 16384
CHUNK_BYTES = CHUNK + 16
HEADER_BYTES = 56


@dataclass
class CountingBlobStore:
    """The local blob store, counting the ciphertext bytes each read takes."""

    inner: LocalBlobStore
    whole_reads: int = 0
    range_bytes: list[int] = field(default_factory=list)

    def writer(self, owner_id: str, archive_id: str) -> BlobWriter:
        return self.inner.writer(owner_id, archive_id)

    def reader(self, owner_id: str, archive_id: str) -> BlobReader:
        self.whole_reads += 1
        return self.inner.reader(owner_id, archive_id)

    def range_reader(self, owner_id: str, archive_id: str, start: int, length: int) -> BlobReader:
        store = self

        class Counted:
            def __init__(self, reader: BlobReader) -> None:
                self._reader = reader

            def read(self, size: int) -> bytes:
                data = self._reader.read(size)
                store.range_bytes.append(len(data))
                return data

            def close(self) -> None:
                self._reader.close()

        return Counted(self.inner.range_reader(owner_id, archive_id, start, length))

    def delete(self, owner_id: str, archive_id: str) -> None:
        self.inner.delete(owner_id, archive_id)

    def list(self) -> Iterator[BlobEntry]:
        return self.inner.list()

    def remove_incomplete(self) -> int:
        return self.inner.remove_incomplete()

    def describe(self) -> str:
        return self.inner.describe()


def read_range(storage: SecureFileStorage, archive_id: str, start: int, end: int, size: int = 1 << 20) -> bytes:
    reader = storage.open_range(OWNER, archive_id, start, end)
    try:
        out = []
        while piece := reader.read(size):
            out.append(piece)
        return b"".join(out)
    finally:
        reader.close()


def compressible(size: int) -> bytes:
    """Distinct text lines: deflates well, and no two ranges look alike."""
    lines = b"".join(b"line %08d of a log that compresses well\n" % n for n in range(size // 40 + 1))
    return lines[:size]


class _RangeCase(SyncTestCase):
    def setUp(self) -> None:
        self.data_dir = self.make_dir()
        self.blobs = CountingBlobStore(LocalBlobStore(self.data_dir / "archives"))
        self.storage = SecureFileStorage(self.data_dir, generate_keyring(), blobs=self.blobs)
        self.addCleanup(self.storage.metadata.close)

    def body_path(self, info: ArchiveInfo) -> Path:
        return self.data_dir / "archives" / OWNER / f"{info.id}.body"

    def flip(self, info: ArchiveInfo, position: int) -> None:
        body = bytearray(self.body_path(info).read_bytes())
        body[position] ^= 0x01
        self.body_path(info).write_bytes(bytes(body))


class StoredRangeTests(_RangeCase):
    """A stored (incompressible) archive."""

    def setUp(self) -> None:
        super().setUp()
        self.data = os.urandom(6 * CHUNK + 1234)
        self.info = self.storage.store(OWNER, "random.bin", self.data)
        self.assertEqual(self.info.method, "stored")

    def test_ranges_read_back_exactly(self) -> None:
        """Ranges at the file's chunk-sized offsets (16383/16384/16385), at
        the ZIP's chunk boundaries (shifted by data_offset), the first and
        last byte, the whole file and random ones all read back exactly, in
        reads of any size."""
        size, shift = len(self.data), self.info.data_offset
        ranges = [(0, 1), (size - 1, size), (0, size), (16383, 16384), (16384, 16385), (16385, 16386)]
        ranges += [(16383, 16386), (CHUNK - shift - 1, CHUNK - shift + 1), (CHUNK - shift, CHUNK - shift + 1)]
        ranges += [(CHUNK - shift - 1, CHUNK - shift), (2 * CHUNK - shift - 1, 4 * CHUNK - shift + 1), (5, 5)]
        rng = random.Random(3)
        ranges += [tuple(sorted((rng.randint(0, size), rng.randint(0, size)))) for _ in range(20)]  # type: ignore[misc]
        for start, end in ranges:
            for size_per_read in (1000, 1 << 20):
                self.assertEqual(
                    read_range(self.storage, self.info.id, start, end, size_per_read),
                    self.data[start:end],
                    (start, end),
                )
        self.assertEqual(self.blobs.whole_reads, 0)

    def test_reads_only_the_chunks_it_needs(self) -> None:
        """A 1-byte range near the end of a 4 MiB archive reads the header,
        the final chunk and the one chunk holding the byte: a few chunks of
        the 256 the body has."""
        big = os.urandom(4 << 20)
        info = self.storage.store(OWNER, "big.bin", big)
        self.blobs.range_bytes.clear()
        self.assertEqual(read_range(self.storage, info.id, len(big) - 100_000, len(big) - 99_999), big[-100_000:][:1])
        self.assertLessEqual(sum(self.blobs.range_bytes), HEADER_BYTES + 2 * CHUNK_BYTES)
        self.assertEqual(self.blobs.whole_reads, 0)

    def test_tampered_chunk_inside_the_range(self) -> None:
        """A flipped bit in a chunk the range needs fails it: the range
        reader raises IntegrityError (at the first read, or after returning
        only authentic bytes), and the archive is refused at once next
        time."""
        self.flip(self.info, HEADER_BYTES + 3 * CHUNK_BYTES + 10)
        returned = b""
        with self.assertRaises(IntegrityError):
            reader = self.storage.open_range(OWNER, self.info.id, CHUNK, 5 * CHUNK)
            try:
                while piece := reader.read(1000):
                    returned += piece
            finally:
                reader.close()
        self.assertTrue(self.data[CHUNK:].startswith(returned))
        self.assertTrue(self.storage.failed_lately(OWNER, self.info.id))
        self.assertRaises(IntegrityError, self.storage.open_range, OWNER, self.info.id, 0, 1)

    def test_tampered_chunk_outside_the_range(self) -> None:
        """A flipped bit in a chunk the range does not need is not seen:
        the range is served (a whole download still fails)."""
        self.flip(self.info, HEADER_BYTES + 4 * CHUNK_BYTES + 10)
        self.assertEqual(read_range(self.storage, self.info.id, 0, 1000), self.data[:1000])
        self.assertRaises(IntegrityError, self.storage.read_all, OWNER, self.info.id)

    def test_header_final_chunk_and_length_are_checked(self) -> None:
        """Whatever the range, a damaged header, a damaged final chunk, a
        body cut short or one with bytes appended fail before any byte."""
        body = self.body_path(self.info).read_bytes()
        for damaged in [
            body[:5] + bytes([body[5] ^ 1]) + body[6:],
            body[:40] + bytes([body[40] ^ 1]) + body[41:],
            body[:-1] + bytes([body[-1] ^ 1]),
            body[:-1],
            body[: HEADER_BYTES + 6 * CHUNK_BYTES],
            body + b"\x00",
            body + body[HEADER_BYTES : HEADER_BYTES + CHUNK_BYTES],
        ]:
            self.body_path(self.info).write_bytes(damaged)
            storage = SecureFileStorage(self.data_dir, self.storage.keyring)  # no failure marks
            self.addCleanup(storage.metadata.close)
            self.assertRaises(IntegrityError, storage.open_range, OWNER, self.info.id, 0, 10)

    def test_chunks_swapped_inside_the_range(self) -> None:
        """Two chunks of the range swapped fail it."""
        body = self.body_path(self.info).read_bytes()
        one, two = HEADER_BYTES + CHUNK_BYTES, HEADER_BYTES + 2 * CHUNK_BYTES
        swapped = body[:one] + body[two : two + CHUNK_BYTES] + body[one:two] + body[two + CHUNK_BYTES :]
        self.body_path(self.info).write_bytes(swapped)
        with self.assertRaises(IntegrityError):
            read_range(self.storage, self.info.id, CHUNK, 3 * CHUNK)

    def test_missing_body(self) -> None:
        """An index row without its body is an integrity error."""
        self.body_path(self.info).unlink()
        self.assertRaises(IntegrityError, self.storage.open_range, OWNER, self.info.id, 0, 1)


class DeflatedRangeTests(_RangeCase):
    """A deflated (compressible) archive is inflated from its start."""

    def setUp(self) -> None:
        super().setUp()
        self.data = compressible(300_000)
        self.info = self.storage.store(OWNER, "log.txt", self.data)
        self.assertEqual(self.info.method, "deflated")

    def test_ranges_read_back_exactly(self) -> None:
        """Ranges anywhere, the first and last bytes and the whole file read
        back exactly."""
        size = len(self.data)
        for start, end in [(0, 1), (size - 1, size), (0, size), (16383, 16385), (150_000, 250_001), (7, 7)]:
            for size_per_read in (1000, 1 << 20):
                self.assertEqual(
                    read_range(self.storage, self.info.id, start, end, size_per_read), self.data[start:end]
                )

    def test_tampered_chunk_inside_the_range(self) -> None:
        """A damaged chunk before the range fails it: the range is inflated
        from the start."""
        self.flip(self.info, HEADER_BYTES + 10)
        with self.assertRaises(IntegrityError):
            read_range(self.storage, self.info.id, 200_000, 200_010)

    def test_range_to_the_end_checks_the_stream_end(self) -> None:
        """Bytes appended to the body fail a range that ends with the file."""
        self.body_path(self.info).write_bytes(self.body_path(self.info).read_bytes() + b"\x00")
        with self.assertRaises(IntegrityError):
            read_range(self.storage, self.info.id, len(self.data) - 10, len(self.data))


class S3RangeTests(SyncTestCase):
    """The same ranged reads through the S3 blob store (moto's server)."""

    def test_stored_range_on_s3(self) -> None:
        """A stored archive in S3 reads back any range exactly."""
        bucket, client = make_bucket(self)  # skips first without moto
        from securevault.stores.blobs_s3 import S3BlobStore

        data_dir = self.make_dir()
        storage = SecureFileStorage(data_dir, generate_keyring(), blobs=S3BlobStore(bucket, "vault", client=client))
        self.addCleanup(storage.metadata.close)
        data = os.urandom(3 * CHUNK + 17)
        info = storage.store(OWNER, "s3.bin", data)
        for start, end in [(0, 1), (16383, 16386), (len(data) - 1, len(data)), (0, len(data))]:
            self.assertEqual(read_range(storage, info.id, start, end), data[start:end])
