"""The one-time move from the first release's files (users.json and a .meta
file per archive) into the metadata store, at start."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from pathlib import Path

from securevault.admin.migration import migrate
from securevault.core.keybinding import default_master_key
from securevault.core.keys import Keyring, KeyringFile
from securevault.core.users import USERS_FORMAT, USERS_VERSION, UserStore
from securevault.storage import SecureFileStorage
from securevault.stores.metadata import ArchiveRecord
from tests.support.daemon import SyncDaemon, call, download_sha256, list_files, login, make_vault, twistd_argv
from tests.support.rows import vault_rows
from tests.support.testcase import SyncTestCase
from tests.support.tlsclient import PASSWORD

FAST_N = 2**10


def make_legacy_vault(data_dir: Path, keyring: Keyring, users: dict[str, str]) -> dict[str, bytes]:
    """A data directory as the first release left it: C{users.json}, and
    C{archives/<owner>/<id>.body} beside C{<id>.meta}.  The documents are the
    same JSON the rows now hold, so the current code writes them and the
    database is then removed.  Returns content by archive id."""
    storage = SecureFileStorage(data_dir, keyring)
    store = UserStore(storage.metadata, vault_rows(storage.metadata, keyring), scrypt_n=FAST_N)
    contents: dict[str, bytes] = {}
    legacy_users = {}
    for name, password in users.items():
        user_id = store.add(name, password)
        for index in range(2):
            data = os.urandom(5000) if index else b"text " * 3000
            info = storage.store(user_id, f"{name}-{index}.txt", data)
            contents[info.id] = data
    for user in storage.metadata.list_users():
        legacy_users[user.name] = {"id": user.user_id, "password": user.password_hash, "created_at": user.created_at}
    for owner in storage.owners():
        for row in storage.metadata.list_archives(owner):
            (data_dir / "archives" / owner / f"{row.archive_id}.meta").write_text(row.document, "ascii")
    storage.metadata.close()
    for name in ("vault.db", "vault.db-wal", "vault.db-shm"):
        (data_dir / name).unlink(missing_ok=True)
    document = {"format": USERS_FORMAT, "version": USERS_VERSION, "users": legacy_users}
    (data_dir / "users.json").write_text(json.dumps(document))
    return contents


def files_under(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file())


class MigrationTests(SyncTestCase):
    def setUp(self) -> None:
        self.data_dir = self.make_dir()
        self.keyring = KeyringFile(self.data_dir / "master.key")
        self.keyring.create()
        self.contents = make_legacy_vault(self.data_dir, self.keyring.load(), {"alice": PASSWORD, "bob": PASSWORD})

    def open(self) -> tuple[SecureFileStorage, UserStore]:
        storage = SecureFileStorage(self.data_dir, self.keyring.load())
        self.addCleanup(storage.metadata.close)
        return storage, UserStore(storage.metadata, vault_rows(storage.metadata, storage.keyring), scrypt_n=FAST_N)

    def test_everything_moves_and_reads_back(self) -> None:
        storage, users = self.open()
        report = migrate(self.data_dir, users, storage)
        self.assertEqual((report.users, report.archives, report.left_in_place), (2, 4, 0))
        self.assertEqual(users.names(), ["alice", "bob"])
        self.assertIsNotNone(users.verify("alice", PASSWORD))
        listed = {info.id: info for owner in storage.owners() for info in storage.list(owner)}
        self.assertEqual(set(listed), set(self.contents))
        for owner in storage.owners():
            for info in storage.list(owner):
                self.assertEqual(storage.read_all(owner, info.id)[1], self.contents[info.id])
        # The files are gone but users.json, kept as users.json.migrated; the bodies stay.
        remaining = files_under(self.data_dir)
        self.assertFalse([name for name in remaining if name.endswith(".meta")])
        self.assertIn("users.json.migrated", remaining)
        self.assertNotIn("users.json", remaining)
        self.assertEqual(len([name for name in remaining if name.endswith(".body")]), 4)

    def test_listing_order_is_upload_order(self) -> None:
        """Rows take the upload time from the sealed metadata, not file times."""
        storage, users = self.open()
        migrate(self.data_dir, users, storage)
        for owner in storage.owners():
            names = [info.filename for info in storage.list(owner)]
            self.assertEqual(names, sorted(names, reverse=True))

    def test_rerun_is_harmless(self) -> None:
        storage, users = self.open()
        migrate(self.data_dir, users, storage)
        again = migrate(self.data_dir, users, storage)
        self.assertFalse(again)
        self.assertEqual(sum(len(storage.list(o)) for o in storage.owners()), 4)

    def test_interrupted_migration_finishes(self) -> None:
        """Killed after some rows committed but before their files were
        removed: the next start skips those rows and removes the files."""
        storage, users = self.open()
        meta = sorted((self.data_dir / "archives").rglob("*.meta"))[0]
        owner, archive_id = meta.parent.name, meta.name[: -len(".meta")]
        storage.metadata.put_archive(ArchiveRecord(owner, archive_id, 1, 1, "k", meta.read_text("ascii")))
        report = migrate(self.data_dir, users, storage)
        self.assertEqual(report.archives, 3)
        self.assertFalse(list((self.data_dir / "archives").rglob("*.meta")))
        self.assertEqual(sum(len(storage.list(o)) for o in storage.owners()), 4)

    def test_tampered_document_moves_as_it_is(self) -> None:
        """A .meta that fails authentication is moved, not dropped: verify
        still names it, as it did before."""
        meta = sorted((self.data_dir / "archives").rglob("*.meta"))[0]
        document = json.loads(meta.read_text("ascii"))
        document["metadata"] = document["metadata"][:-4] + "AAA="
        meta.write_text(json.dumps(document), "ascii")
        storage, users = self.open()
        self.assertEqual(migrate(self.data_dir, users, storage).archives, 4)
        archive_id = meta.name[: -len(".meta")]
        owner = storage.find_owner(archive_id)
        self.assertNotIn(archive_id, [info.id for info in storage.list(owner)])
        self.assertEqual(storage.metadata.get_archive(owner, archive_id).document, json.dumps(document))  # type: ignore[union-attr]

    def test_recovery_after_migration_keeps_legacy_bodies(self) -> None:
        """Recovery removes blobs without rows: it must run after the
        migration, which gives the legacy bodies their rows."""
        stray = self.data_dir / "archives" / sorted(p.name for p in (self.data_dir / "archives").iterdir())[0]
        (stray / ("f" * 32 + ".body")).write_bytes(b"debris of a crash")
        storage, users = self.open()
        migrate(self.data_dir, users, storage)
        self.assertEqual(storage.recover(), 1)
        self.assertEqual(len(list((self.data_dir / "archives").rglob("*.body"))), 4)


class DaemonMigrationTests(SyncTestCase):
    def test_daemon_migrates_at_start(self) -> None:
        """A real twistd started on a first-release data directory serves
        its users and archives, and says so in its log."""
        base = self.make_dir()
        certs, data = make_vault(base)  # init and user alice, in the store
        # Turn it into a first-release directory with alice and two archives.
        for name in ("vault.db", "vault.db-wal", "vault.db-shm"):
            (data / name).unlink(missing_ok=True)
        contents = make_legacy_vault(data, KeyringFile(default_master_key(data)).load(), {"alice": PASSWORD})
        daemon = SyncDaemon(twistd_argv(certs, data), base)
        self.addCleanup(daemon.stop)
        port = daemon.wait_listening()
        self.assertIn("Moved 1 users and 2 archives from files into the metadata store", daemon.output())
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.crt"))
        context.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
        session = login(context, port)
        files = list_files(context, port, session)
        self.assertEqual(sorted(f["id"] for f in files), sorted(contents))
        for entry in files:
            self.assertEqual(
                download_sha256(context, port, session, entry["id"]), hashlib.sha256(contents[entry["id"]]).hexdigest()
            )
        self.assertEqual(call(context, port, "GET", "/health").status, 200)
