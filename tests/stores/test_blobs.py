"""The blob store contract, on the local directory (the embedded default)."""

from __future__ import annotations

import os
import stat

from securevault.stores.blobs import BlobNotFound, BlobStore, LocalBlobStore
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


class LocalJournalTests(SyncTestCase):
    """Journals (L{securevault.stores.blobs.JournalStore}): a resumable
    upload's archive, readable and durable before it is committed."""

    OWNER, UPLOAD, ARCHIVE = "o1", "c" * 32, "d" * 32

    def setUp(self) -> None:
        self.root = self.make_dir() / "archives"
        self.store = LocalBlobStore(self.root)

    def names(self) -> list[str]:
        return sorted(path.name for path in (self.root / self.OWNER).iterdir())

    def test_read_while_written_and_kept_after_abort(self) -> None:
        """What was written and synced reads back by range while the writer
        is open; aborting stops writing but keeps the file (acknowledged
        pieces point into it), which the start-up cleanup leaves alone too."""
        writer = self.store.journal_writer(self.OWNER, self.UPLOAD, self.ARCHIVE)
        data = os.urandom(50_000)
        writer.write(data)
        writer.sync()
        reader = self.store.journal_reader(self.OWNER, self.UPLOAD, self.ARCHIVE, 1_000, 20_000)
        self.assertEqual(reader.read(100_000), data[1_000:21_000])
        reader.close()
        writer.abort()
        self.assertEqual(self.store.remove_incomplete(), 0)
        self.assertEqual(self.names(), [f"{self.UPLOAD}.{self.ARCHIVE}.journal"])
        self.assertEqual(stat.S_IMODE(os.stat(self.root / self.OWNER / self.names()[0]).st_mode), 0o600)
        self.assertEqual(list(self.store.list()), [])  # not a blob

    def test_commit_links_the_archive_and_keeps_the_journal(self) -> None:
        """A commit makes the archive's blob (the same bytes) and leaves the
        journal until the upload's journals are deleted."""
        writer = self.store.journal_writer(self.OWNER, self.UPLOAD, self.ARCHIVE)
        writer.write(b"archive bytes")
        self.assertEqual(writer.commit(), 13)
        self.assertEqual(self.names(), sorted([f"{self.ARCHIVE}.body", f"{self.UPLOAD}.{self.ARCHIVE}.journal"]))
        self.assertEqual(
            [(entry.owner_id, entry.upload_id, entry.archive_id) for entry in self.store.journals()],
            [(self.OWNER, self.UPLOAD, self.ARCHIVE)],
        )
        self.store.delete_journals(self.OWNER, self.UPLOAD)
        self.assertEqual(self.names(), [f"{self.ARCHIVE}.body"])
        reader = self.store.reader(self.OWNER, self.ARCHIVE)
        self.assertEqual(reader.read(100), b"archive bytes")
        reader.close()
        self.assertEqual(list(self.store.journals()), [])

    def test_delete_takes_only_that_uploads_journals(self) -> None:
        """An upload may have had two journals (its first archive was
        spoiled at offset 0, a second started): one archive's goes alone, or
        all of the upload's; another upload's stays; a missing journal reads
        as not found."""
        other = "e" * 32
        for upload_id, archive_id in ((self.UPLOAD, self.ARCHIVE), (self.UPLOAD, "f" * 32), (other, self.ARCHIVE)):
            writer = self.store.journal_writer(self.OWNER, upload_id, archive_id)
            writer.write(b"x")
            writer.abort()
        self.store.delete_journals(self.OWNER, self.UPLOAD, "f" * 32)  # one archive's only
        self.assertEqual(
            self.names(), sorted([f"{self.UPLOAD}.{self.ARCHIVE}.journal", f"{other}.{self.ARCHIVE}.journal"])
        )
        self.store.delete_journals(self.OWNER, self.UPLOAD)
        self.assertEqual(self.names(), [f"{other}.{self.ARCHIVE}.journal"])
        self.assertRaises(BlobNotFound, self.store.journal_reader, self.OWNER, self.UPLOAD, self.ARCHIVE, 0, 1)
        self.store.delete_journals(self.OWNER, self.UPLOAD)  # none left: not an error

    def test_names_are_checked(self) -> None:
        for owner_id, upload_id in (("../x", self.UPLOAD), (self.OWNER, "../" + "a" * 29), (self.OWNER, "A" * 32)):
            self.assertRaises(ValueError, self.store.journal_writer, owner_id, upload_id, self.ARCHIVE)
            self.assertRaises(ValueError, self.store.delete_journals, owner_id, upload_id)
