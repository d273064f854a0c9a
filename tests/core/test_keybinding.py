# -*- test-case-name: tests.core.test_keybinding -*-
"""Tests for L{securevault.core.keybinding}: the key check that binds a master
key file to its vault, where the key file is looked for, and how a vault is
opened with it (created only for a new vault, refused when it is not the
vault's own)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securevault.admin.maintenance import rotate_master_key
from securevault.core.integrity import RowAuthenticator
from securevault.core.keybinding import (
    KEY_CHECK_STATE,
    KeyBindingError,
    default_key_dir,
    default_master_key,
    key_check,
    keyring_opens,
    legacy_master_key,
    locate_master_key,
    open_master_key,
    rebind,
)
from securevault.core.keys import Keyring, KeyringFile, generate_keyring, load_keyring
from securevault.core.users import UserStore
from securevault.storage import METADATA_FILE, SecureFileStorage
from securevault.stores.metadata import SqliteMetadataStore
from tests.support.testcase import SyncTestCase

OWNER = "a" * 32


def two_keys(old: Keyring) -> Keyring:
    """C{old} plus a new current key, as a rotation's first step makes it."""
    new = generate_keyring()
    return Keyring(new.current_id, {**old.keys, new.current_id: new.current_key})


class KeyCheckTests(SyncTestCase):
    """L{key_check} and L{keyring_opens}."""

    def test_own_keyring_opens(self) -> None:
        """A keyring opens the vault whose check was made from it, also
        after the check went through the store as text."""
        keyring = generate_keyring()
        self.assertTrue(keyring_opens(keyring, key_check(keyring)))
        self.assertTrue(keyring_opens(Keyring.from_json(keyring.to_json()), key_check(keyring)))

    def test_other_keyring_refused(self) -> None:
        """Another vault's keyring (other ids) does not open it, nor does a
        keyring with the right id and other key bytes."""
        keyring = generate_keyring()
        check = key_check(keyring)
        self.assertFalse(keyring_opens(generate_keyring(), check))
        forged = Keyring(keyring.current_id, {keyring.current_id: os.urandom(32)})
        self.assertFalse(keyring_opens(forged, check))
        # One right key does not excuse a wrong one under a vouched-for id.
        both = two_keys(keyring)
        mixed = Keyring(both.current_id, {**keyring.keys, both.current_id: os.urandom(32)})
        self.assertFalse(keyring_opens(mixed, key_check(both)))

    def test_check_reveals_no_key(self) -> None:
        """The check names key ids only: no key appears in it raw, base64 or hex."""
        keyring = two_keys(generate_keyring())
        check = key_check(keyring)
        self.assertEqual(sorted(json.loads(check)["keys"]), sorted(keyring.keys))
        for key in keyring.keys.values():
            for encoding in (base64.b64encode(key).decode(), key.hex()):
                self.assertNotIn(encoding, check)

    def test_rotation_states(self) -> None:
        """Each state a rotation passes through keeps the key file on disk
        opening the vault: old+new keys against the old check, old+new
        against the check of both, old+new against the new check; the old
        key alone no longer opens the vault once the check names only the
        new key."""
        old = generate_keyring()
        both = two_keys(old)
        new = Keyring(both.current_id, {both.current_id: both.current_key})
        self.assertTrue(keyring_opens(both, key_check(old)))
        self.assertTrue(keyring_opens(both, key_check(both)))
        self.assertTrue(keyring_opens(both, key_check(new)))
        self.assertTrue(keyring_opens(new, key_check(both)))
        self.assertFalse(keyring_opens(old, key_check(new)))

    def test_tag_as_documented(self) -> None:
        """The tag is the one docs/FORMAT.md §2 spells out: HMAC-SHA256 of
        the key id under HKDF-SHA256(master key, info b"securevault/v1/key-check")."""
        keyring = generate_keyring()
        label = b"securevault/v1/key-check"
        check_key = HKDF(hashes.SHA256(), 32, salt=None, info=label).derive(keyring.current_key)
        tag = hmac.new(check_key, label + b"\x00" + keyring.current_id.encode(), hashlib.sha256).hexdigest()
        document = json.loads(key_check(keyring))
        self.assertEqual(document, {"format": "securevault-key-check", "version": 1, "keys": {keyring.current_id: tag}})

    def test_malformed_check(self) -> None:
        """A check that is not one (damaged in the store) is a one-line
        L{KeyBindingError}, not a traceback."""
        for value in ("", "{}", "[]", '{"format": "securevault-key-check", "version": 2, "keys": {}}'):
            with self.assertRaises(KeyBindingError) as caught:
                keyring_opens(generate_keyring(), value)
            self.assertIn("malformed", str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))


class LocateTests(SyncTestCase):
    """Where the master key file is looked for."""

    def test_default_is_beside_the_data(self) -> None:
        """The default key directory is the data directory's sibling named
        after it: vault-data → vault-keys, any other NAME → NAME-keys;
        relative stays relative."""
        self.assertEqual(default_master_key(Path("vault-data")), Path("vault-keys/master.key"))
        self.assertEqual(default_master_key(Path("/srv/vault")), Path("/srv/vault-keys/master.key"))
        self.assertEqual(default_master_key(Path("/srv/a-data/")), Path("/srv/a-keys/master.key"))
        self.assertEqual(default_master_key(Path("x/shared")), Path("x/shared-keys/master.key"))
        here = Path(os.path.abspath("."))
        self.assertEqual(default_key_dir(Path(".")), here.parent / f"{here.name}-keys")

    def test_new_vault(self) -> None:
        """Nothing on disk: the new default place, outside the data directory."""
        data = self.make_dir() / "vault-data"
        location = locate_master_key(data, None)
        self.assertEqual(location.path, data.parent / "vault-keys" / "master.key")
        self.assertFalse(location.inside_data_dir)
        self.assertIsNone(location.warning(data))

    def test_old_layout(self) -> None:
        """Only the old default (inside the data directory) exists: it is
        used, with a warning that names it and the new place; once a key is
        at the new place, that one is used."""
        data = self.make_dir() / "vault-data"
        KeyringFile(legacy_master_key(data)).create()
        location = locate_master_key(data, None)
        self.assertEqual(location.path, data / "master.key")
        self.assertTrue(location.inside_data_dir)
        warning = location.warning(data)
        assert warning is not None
        self.assertIn("a backup of the data is a backup of the key", warning)
        self.assertIn(str(default_master_key(data)), warning)
        KeyringFile(default_master_key(data)).create()
        self.assertEqual(locate_master_key(data, None).path, default_master_key(data))

    def test_given(self) -> None:
        """--master-key wins; inside the data directory it is warned about too."""
        data = self.make_dir() / "vault-data"
        elsewhere = self.make_dir() / "k"
        self.assertEqual(locate_master_key(data, elsewhere), locate_master_key(data, str(elsewhere)))
        self.assertFalse(locate_master_key(data, elsewhere).inside_data_dir)
        inside = locate_master_key(data, data / "sub" / "key")
        self.assertTrue(inside.inside_data_dir)
        self.assertIn("--master-key", inside.warning(data) or "")


class OpenMasterKeyTests(SyncTestCase):
    """L{open_master_key}: the key file checked against the vault's store."""

    def setUp(self) -> None:
        base = self.make_dir()
        self.data = base / "vault-data"
        self.data.mkdir()
        self.path = default_master_key(self.data)
        self.metadata = SqliteMetadataStore(self.data / METADATA_FILE)
        self.addCleanup(self.metadata.close)

    def open(self, path: Path | None = None, *, create: bool = True) -> Keyring:
        return open_master_key(KeyringFile(path or self.path), self.metadata, self.data, create=create).keyring

    def refused(self, path: Path | None = None, *, create: bool = True) -> str:
        """The one-line reason L{open_master_key} refuses."""
        with self.assertRaises(KeyBindingError) as caught:
            self.open(path, create=create)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def store_archive(self, keyring: Keyring) -> str:
        storage = SecureFileStorage(self.data, keyring, metadata=self.metadata)
        return storage.store(OWNER, "notes.txt", b"hello").id

    def test_new_vault_creates_key_and_check(self) -> None:
        """A new, empty vault gets a key file (0600, in a 0700 directory) and
        a check it opens; opening it again finds both and writes nothing."""
        opened = open_master_key(KeyringFile(self.path), self.metadata, self.data, create=True)
        self.assertEqual((opened.created, opened.bound), (True, True))
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.path.parent.stat().st_mode), 0o700)
        self.assertEqual(load_keyring(self.path), opened.keyring)
        self.assertEqual(self.metadata.get_state(KEY_CHECK_STATE), key_check(opened.keyring))
        again = open_master_key(KeyringFile(self.path), self.metadata, self.data, create=True)
        self.assertEqual((again.keyring, again.created, again.bound), (opened.keyring, False, False))

    def test_missing_key_with_users(self) -> None:
        """A vault with a user and no key check (from before checks) whose
        key file is missing is refused, naming the path and saying the key
        is missing; no key file is created."""
        UserStore(self.metadata, RowAuthenticator(bytes(32)), scrypt_n=2**4).add("alice", "a long enough password")
        message = self.refused()
        self.assertIn(str(self.path), message)
        self.assertIn("is missing", message)
        self.assertFalse(self.path.exists())

    def test_missing_key_with_check_only(self) -> None:
        """A vault with a key check but no users or archives still needs its key."""
        rebind(self.metadata, generate_keyring())
        self.assertIn("is missing", self.refused())
        self.assertFalse(self.path.exists())

    def test_missing_key_with_legacy_files(self) -> None:
        """A vault from before the metadata store (a users.json) holds data too."""
        (self.data / "users.json").write_text("{}")
        self.assertIn("is missing", self.refused())
        self.assertFalse(self.path.exists())

    def test_missing_key_without_create(self) -> None:
        """Without C{create} (admin commands) even an empty vault's missing
        key is refused, with the advice given, and nothing is created."""
        with self.assertRaises(KeyBindingError) as caught:
            open_master_key(KeyringFile(self.path), self.metadata, self.data, create=False, how_to_create="; do X")
        self.assertIn("does not exist; do X", str(caught.exception))
        self.assertFalse(self.path.exists())
        self.assertIsNone(self.metadata.get_state(KEY_CHECK_STATE))

    def test_wrong_key(self) -> None:
        """Another key file is refused with "does not open this vault", and
        the check is unchanged."""
        self.open()
        check = self.metadata.get_state(KEY_CHECK_STATE)
        other = self.data.parent / "other.key"
        KeyringFile(other).create()
        message = self.refused(other)
        self.assertIn(f"the master key at {other} does not open this vault", message)
        self.assertEqual(self.metadata.get_state(KEY_CHECK_STATE), check)

    def test_vault_before_checks_right_key(self) -> None:
        """A vault with archives and no check yet is bound to the key file
        that unwraps an archive's data key: the check is written."""
        keyring = KeyringFile(self.path).create()
        self.store_archive(keyring)
        opened = open_master_key(KeyringFile(self.path), self.metadata, self.data, create=True)
        self.assertEqual((opened.created, opened.bound), (False, True))
        self.assertEqual(self.metadata.get_state(KEY_CHECK_STATE), key_check(keyring))

    def test_vault_before_checks_wrong_key(self) -> None:
        """A key file that unwraps none of the archives of a vault with no
        check yet is refused as the wrong key, and no check is written."""
        self.store_archive(generate_keyring())
        KeyringFile(self.path).create()
        self.assertIn("does not open this vault", self.refused())
        self.assertIsNone(self.metadata.get_state(KEY_CHECK_STATE))

    def test_vault_before_store_legacy_archives(self) -> None:
        """A first-release vault (archives in .meta files, not yet in the
        store) is checked against those files: the right key binds, a wrong
        one is refused."""
        keyring = KeyringFile(self.path).create()
        archive_id = self.store_archive(keyring)
        record = self.metadata.get_archive(OWNER, archive_id)
        assert record is not None
        (self.data / "archives" / OWNER / f"{archive_id}.meta").write_text(record.document, "ascii")
        self.metadata.delete_archive(OWNER, archive_id)
        other = self.data.parent / "other.key"
        KeyringFile(other).create()
        self.assertIn("does not open this vault", self.refused(other))
        self.assertIsNone(self.metadata.get_state(KEY_CHECK_STATE))
        self.assertEqual(self.open(), keyring)
        self.assertEqual(self.metadata.get_state(KEY_CHECK_STATE), key_check(keyring))

    def test_two_new_keys_at_once(self) -> None:
        """When another process binds its own new key between this one's
        look and its write, this one's new key is refused and removed: one
        key only ever opens a vault."""
        first = generate_keyring()
        metadata = self.metadata

        class Racing(SqliteMetadataStore):
            def add_state(self, name: str, value: str) -> str:
                metadata.add_state(name, key_check(first))  # the other process wins
                return super().add_state(name, value)

        racing = Racing(self.data / METADATA_FILE)
        self.addCleanup(racing.close)
        with self.assertRaises(KeyBindingError) as caught:
            open_master_key(KeyringFile(self.path), racing, self.data, create=True)
        self.assertIn("does not open this vault", str(caught.exception))
        self.assertFalse(self.path.exists())
        self.assertEqual(self.metadata.get_state(KEY_CHECK_STATE), key_check(first))


class RotationBindingTests(SyncTestCase):
    """L{rotate_master_key} keeps the key check in step with the key file."""

    def setUp(self) -> None:
        self.data = self.make_dir() / "vault-data"
        self.path = default_master_key(self.data)
        self.keyring = KeyringFile(self.path).create()
        storage = self.storage()
        self.archive_id = storage.store(OWNER, "notes.txt", b"hello").id

    def storage(self, keyring: Keyring | None = None) -> SecureFileStorage:
        storage = SecureFileStorage(self.data, keyring or load_keyring(self.path))
        self.addCleanup(storage.metadata.close)
        return storage

    def check(self) -> str | None:
        return self.storage().metadata.get_state(KEY_CHECK_STATE)

    def test_rotation_moves_the_check(self) -> None:
        """After a rotation the check vouches for the new key alone: the new
        key file opens the vault, a copy of the old one no longer does."""
        rebind(self.storage().metadata, self.keyring)
        report = rotate_master_key(self.storage, self.path)
        check = self.check()
        assert check is not None
        self.assertEqual(list(json.loads(check)["keys"]), [report.new_key_id])
        self.assertTrue(keyring_opens(load_keyring(self.path), check))
        self.assertFalse(keyring_opens(self.keyring, check))

    def test_rotation_binds_a_vault_from_before_checks(self) -> None:
        """Rotating a vault that has no check yet checks the key file against
        an archive first, and leaves the check of the new key."""
        self.assertIsNone(self.check())
        rotate_master_key(self.storage, self.path)
        check = self.check()
        assert check is not None
        self.assertTrue(keyring_opens(load_keyring(self.path), check))

    def test_rotation_with_a_wrong_key_changes_nothing(self) -> None:
        """A rotation given another vault's key file is refused before it
        adds a key: that file, the check and every row stay as they were."""
        rebind(self.storage().metadata, self.keyring)
        check = self.check()
        other = self.data.parent / "other.key"
        KeyringFile(other).create()
        before = other.read_bytes()
        with self.assertRaises(KeyBindingError):
            rotate_master_key(self.storage, other)
        self.assertEqual(other.read_bytes(), before)
        self.assertEqual(self.check(), check)
        self.assertEqual(self.storage().info(OWNER, self.archive_id).filename, "notes.txt")

    def test_interrupted_rotation_rerun(self) -> None:
        """A rotation stopped after its first step (the key file holds the
        old and the new key, the check still only the old one) leaves a key
        file that opens the vault; the rerun finishes and moves the check to
        the new key."""
        rebind(self.storage().metadata, self.keyring)
        both = two_keys(self.keyring)
        KeyringFile(self.path).save(both)
        check = self.check()
        assert check is not None
        self.assertTrue(keyring_opens(load_keyring(self.path), check))
        report = rotate_master_key(self.storage, self.path)
        self.assertEqual(report.new_key_id, both.current_id)
        check = self.check()
        assert check is not None
        self.assertEqual(list(json.loads(check)["keys"]), [both.current_id])
        self.assertEqual(self.storage().info(OWNER, self.archive_id).filename, "notes.txt")
