"""Copying a vault into other stores: one machine outgrown, its users and
archives moved to PostgreSQL and S3 without decrypting anything."""

from __future__ import annotations

import hashlib
import os
import ssl
from pathlib import Path

from securevault.admin.maintenance import ROTATION_STATE
from securevault.admin.transfer import TransferError, copy_vault
from securevault.core.keybinding import KEY_CHECK_STATE, default_master_key, keyring_opens, rebind
from securevault.core.keys import KeyringFile, generate_keyring
from securevault.core.users import UserStore
from securevault.storage import SecureFileStorage
from securevault.stores.backends import Stores, open_stores
from tests.support.daemon import SyncDaemon, download_sha256, list_files, login, make_vault, run_admin, twistd_argv
from tests.support.postgres import postgres_url
from tests.support.rows import vault_rows
from tests.support.s3 import make_bucket, moto_endpoint, s3_environment
from tests.support.testcase import SyncTestCase
from tests.support.tlsclient import PASSWORD

FAST_N = 2**10


def fill(storage: SecureFileStorage, users: UserStore) -> dict[str, bytes]:
    contents = {}
    for name in ("alice", "bob"):
        owner = users.add(name, PASSWORD)
        for index in range(3):
            data = os.urandom(3000 * (index + 1)) if index else b"log line\n" * 5000
            contents[storage.store(owner, f"{name}-{index}", data).id] = data
    return contents


class CopyTests(SyncTestCase):
    def setUp(self) -> None:
        base = self.make_dir()
        self.key = KeyringFile(base / "master.key")
        self.key.create()
        self.source = self.open(base / "one")
        self.storage = self.source.storage(self.key.load())
        self.contents = fill(
            self.storage,
            UserStore(self.source.metadata, vault_rows(self.source.metadata, self.key.load()), scrypt_n=FAST_N),
        )
        self.target = self.open(base / "two")

    def open(self, directory: Path) -> Stores:
        stores = open_stores(directory)
        self.addCleanup(stores.close)
        return stores

    def test_everything_arrives_byte_exact(self) -> None:
        report = copy_vault(self.source, self.target)
        self.assertEqual((report.users, report.archives, report.missing_bodies), (2, 6, ()))
        self.assertEqual(self.target.metadata.list_users(), self.source.metadata.list_users())
        copied = self.target.storage(self.key.load())
        users = UserStore(self.target.metadata, vault_rows(self.target.metadata, self.key.load()), scrypt_n=FAST_N)
        for name in ("alice", "bob"):
            owner = users.verify(name, PASSWORD)
            assert owner is not None
            listed = copied.list(owner)
            self.assertEqual([i.id for i in listed], [i.id for i in self.storage.list(owner)])
            for info in listed:
                self.assertEqual(copied.read_all(owner, info.id)[1], self.contents[info.id])

    def test_rerun_finishes_and_skips(self) -> None:
        copy_vault(self.source, self.target)
        owner = self.source.metadata.owners()[0]
        later = self.storage.store(owner, "later.txt", b"uploaded while copying")
        report = copy_vault(self.source, self.target)
        self.assertEqual((report.users, report.users_present), (0, 2))
        self.assertEqual((report.archives, report.archives_present), (1, 6))
        self.assertEqual(self.target.storage(self.key.load()).read_all(owner, later.id)[1], b"uploaded while copying")

    def test_missing_body_is_reported_not_indexed(self) -> None:
        owner = self.source.metadata.owners()[0]
        gone = self.source.metadata.list_archives(owner)[0].archive_id
        self.source.blobs.delete(owner, gone)
        report = copy_vault(self.source, self.target)
        self.assertEqual(report.missing_bodies, (gone,))
        self.assertIsNone(self.target.metadata.get_archive(owner, gone))
        self.assertEqual(report.archives, 5)

    def test_refused_during_key_rotation_and_onto_itself(self) -> None:
        self.source.metadata.set_state(ROTATION_STATE, "k2")
        with self.assertRaises(TransferError):
            copy_vault(self.source, self.target)
        self.source.metadata.set_state(ROTATION_STATE, None)
        with self.assertRaises(TransferError):
            copy_vault(self.source, self.source)

    def test_key_check_goes_along(self) -> None:
        """The source's key check is copied: the target opens with the same
        key file and with no other.  A target already bound to another key
        is refused before any user or archive is copied."""
        rebind(self.source.metadata, self.key.load())
        copy_vault(self.source, self.target)
        check = self.target.metadata.get_state(KEY_CHECK_STATE)
        self.assertEqual(check, self.source.metadata.get_state(KEY_CHECK_STATE))
        assert check is not None
        self.assertTrue(keyring_opens(self.key.load(), check))
        self.assertFalse(keyring_opens(generate_keyring(), check))

        other = self.open(self.make_dir() / "other")
        rebind(other.metadata, generate_keyring())
        with self.assertRaises(TransferError) as caught:
            copy_vault(self.source, other)
        self.assertIn("another master key", str(caught.exception))
        self.assertEqual((other.metadata.list_users(), other.metadata.owners()), ([], []))


class OneMachineToScaleOutTests(SyncTestCase):
    def test_admin_copy_then_a_node_serves_it(self) -> None:
        """A vault made and filled on one machine is copied with
        C{securevault-admin copy} into PostgreSQL and S3; a node started on
        those serves the same users and archives, byte-exact."""
        metadata = postgres_url(self)
        endpoint = moto_endpoint(self)
        bucket, _ = make_bucket(self)
        for name, value in s3_environment(endpoint).items():
            self.patch(os, "environ", {**os.environ, name: value})
        base = self.make_dir()
        certs, data = make_vault(base)  # alice, on the embedded stores
        storage = SecureFileStorage(data, KeyringFile(default_master_key(data)).load())
        owner = UserStore(storage.metadata, vault_rows(storage.metadata, storage.keyring)).user_id("alice")
        assert owner is not None
        contents = {storage.store(owner, f"f{i}", os.urandom(10_000 + i)).id: i for i in range(3)}
        storage.metadata.close()

        target = ["--to-metadata", metadata, "--to-blobs", f"s3://{bucket}/vault"]
        result = run_admin("--data-dir", str(data), "copy", *target, cwd=base)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("copied 1 users (0 already there) and 3 archives", result.stdout)
        again = run_admin("--data-dir", str(data), "copy", *target, cwd=base)
        self.assertIn("copied 0 users (1 already there) and 0 archives, 0 bytes (3 already there)", again.stdout)

        node = SyncDaemon(
            twistd_argv(certs, base / "node", "--metadata", metadata, "--blobs", f"s3://{bucket}/vault",
                        "--master-key", str(default_master_key(data))),
            base,
        )  # fmt: skip
        self.addCleanup(node.stop)
        port = node.wait_listening()
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.crt"))
        context.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
        session = login(context, port)
        files = list_files(context, port, session)
        self.assertEqual(sorted(f["id"] for f in files), sorted(contents))
        original = SecureFileStorage(data, KeyringFile(default_master_key(data)).load())
        self.addCleanup(original.metadata.close)
        for entry in files:
            expected = hashlib.sha256(original.read_all(owner, entry["id"])[1]).hexdigest()
            self.assertEqual(download_sha256(context, port, session, entry["id"]), expected)
