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
