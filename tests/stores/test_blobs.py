"""The blob store contract, on the local directory (the embedded default)."""

from __future__ import annotations

import os
import stat

from securevault.stores.blobs import BlobStore, LocalBlobStore
from tests.stores.contracts import BlobStoreContract
from tests.support.testcase import SyncTestCase


class LocalContractTests(BlobStoreContract, SyncTestCase):
    def make_store(self) -> BlobStore:
        return LocalBlobStore(self.make_dir() / "archives")


class LocalLayoutTests(SyncTestCase):
    def test_private_files_and_temp_cleanup(self) -> None:
        root = self.make_dir() / "archives"
        store = LocalBlobStore(root)
        writer = store.writer("o1", "a" * 32)
        writer.write(b"data")
        writer.commit()
        path = root / "o1" / ("a" * 32 + ".body")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        # A writer killed mid-upload leaves its temp file: removed at start.
        left = store.writer("o1", "b" * 32)
        left.write(b"partial")
        self.assertEqual(store.remove_incomplete(), 1)
        self.assertEqual(sorted(p.name for p in (root / "o1").iterdir()), ["a" * 32 + ".body"])


class LocalReadIntoTests(SyncTestCase):
    """C{readinto} returns what C{read} would, into the caller's buffer."""

    def test_same_bytes_as_read(self) -> None:
        """Whole and ranged readers give the same bytes through
        C{readinto} as through C{read}, stop at the range's end, and
        reuse the buffer without mixing blocks."""
        store = LocalBlobStore(self.make_dir() / "archives")
        data = os.urandom(100_003)
        writer = store.writer("o1", "a" * 32)
        writer.write(data)
        writer.commit()
        for start, length in ((0, None), (5, 70_000), (99_000, 10_000), (200_000, 10)):
            if length is None:
                reader = store.reader("o1", "a" * 32)
                expected = data
            else:
                reader = store.range_reader("o1", "a" * 32, start, length)
                expected = data[start : start + length]
            buffer = bytearray(8191)
            got = b""
            while count := reader.readinto(memoryview(buffer)):
                got += buffer[:count]
            reader.close()
            self.assertTrue(got == expected, (start, length))
