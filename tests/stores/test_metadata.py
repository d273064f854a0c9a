"""The metadata store contract, on SQLite (the embedded default)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from securevault.stores.metadata import MetadataError, MetadataStore, SqliteMetadataStore
from tests.stores.contracts import MetadataStoreContract
from tests.support.testcase import SyncTestCase


class SqliteContractTests(MetadataStoreContract, SyncTestCase):
    def make_store(self) -> MetadataStore:
        return SqliteMetadataStore(self.make_dir() / "vault.db")

    def reopen_store(self, store: MetadataStore) -> MetadataStore:
        assert isinstance(store, SqliteMetadataStore)
        return SqliteMetadataStore(store.path)


class SqliteFileTests(SyncTestCase):
    def test_private_wal_database(self) -> None:
        path = self.make_dir() / "vault.db"
        store = SqliteMetadataStore(path)
        self.addCleanup(store.close)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(store._query("PRAGMA journal_mode")[0][0], "wal")

    def test_newer_schema_refused(self) -> None:
        path = self.make_dir() / "vault.db"
        store = SqliteMetadataStore(path)
        store.set_state("schema", "99")
        store.close()
        with self.assertRaises(MetadataError) as caught:
            SqliteMetadataStore(path)
        self.assertIn("schema version 99", str(caught.exception))

    def test_unopenable_database_is_a_clear_error(self) -> None:
        directory = self.make_dir()
        with self.assertRaises(MetadataError) as caught:
            SqliteMetadataStore(directory / "missing" / "vault.db")
        self.assertIn(str(Path(directory / "missing" / "vault.db")), str(caught.exception))
