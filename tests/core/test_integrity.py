# -*- test-case-name: tests.core.test_integrity -*-
"""L{securevault.core.integrity}: row MACs and the integrity key."""

from __future__ import annotations

import dataclasses

from securevault.core.integrity import (
    IntegrityKeyError,
    RowAuthenticator,
    authenticate_existing_rows,
    integrity_key,
    open_rows,
    rewrap_integrity_key,
)
from securevault.core.keys import Keyring, generate_keyring
from securevault.core.users import UserStore
from securevault.stores.metadata import SessionRecord, SqliteMetadataStore, UserRecord
from tests.support.testcase import SyncTestCase

PASSWORD = "a long enough password"


class RowAuthenticatorTests(SyncTestCase):
    """Rows that grant access are refused when changed outside securevault."""

    def setUp(self) -> None:
        self.metadata = SqliteMetadataStore(self.make_dir() / "vault.db")
        self.addCleanup(self.metadata.close)
        self.keyring = generate_keyring()
        self.rows, _ = open_rows(self.keyring, self.metadata)
        self.refusals: list[tuple[str, str]] = []
        self.rows.on_refused = lambda kind, user_id: self.refusals.append((kind, user_id))
        self.users = UserStore(self.metadata, self.rows, scrypt_n=2**4)

    def test_user_row_changes_are_refused(self) -> None:
        """A hash replaced, or a user id swapped, makes the row fail: the
        login fails and the refusal names the user id."""
        alice = self.users.add("alice", PASSWORD)
        bob = self.users.add("bob", PASSWORD)
        self.assertEqual(self.users.verify("alice", PASSWORD), alice)
        bob_row = self.metadata.get_user("bob")
        assert bob_row is not None
        self.metadata.set_password_hash("alice", bob_row.password_hash, mac=self.metadata.get_user("alice").mac)  # type: ignore[union-attr]
        self.assertIsNone(self.users.verify("alice", PASSWORD))
        self.assertEqual(self.refusals, [("user", alice)])
        self.assertIsNone(self.users.user_id("alice"))
        self.assertEqual(self.users.verify("bob", PASSWORD), bob)

    def test_session_mac_ignores_last_used(self) -> None:
        """last_used is not covered; every other field is."""
        record = SessionRecord("d" * 64, "alice", "id", "f" * 64, 1.0, 1.0, 2.0)
        record = dataclasses.replace(record, mac=self.rows.session_mac(record))
        self.assertTrue(self.rows.session_ok(dataclasses.replace(record, last_used=1.5)))
        for change in ({"digest": "e" * 64}, {"user_id": "other"}, {"expires_at": 9.0}, {"fingerprint": "0" * 64}):
            self.assertFalse(self.rows.session_ok(dataclasses.replace(record, **change)), change)
        self.assertFalse(self.rows.session_ok(dataclasses.replace(record, mac=None)))

    def test_name_digest(self) -> None:
        """Equal names give equal short digests; another vault's key another."""
        digest = self.rows.name_digest("hunter2 typed as a name")
        self.assertEqual(len(digest), 16)
        self.assertEqual(digest, self.rows.name_digest("hunter2 typed as a name"))
        self.assertNotEqual(digest, RowAuthenticator(bytes(32)).name_digest("hunter2 typed as a name"))


class ExistingRowsTests(SyncTestCase):
    """A vault from before row MACs, and the integrity key across rotation."""

    def setUp(self) -> None:
        self.metadata = SqliteMetadataStore(self.make_dir() / "vault.db")
        self.addCleanup(self.metadata.close)
        self.keyring = generate_keyring()

    def test_existing_rows_authenticated_once(self) -> None:
        """Rows without a MAC are MACed at the first open and their sessions
        end; after that a row without a MAC is refused."""
        self.metadata.add_user(UserRecord("alice", "a" * 32, "h", "t"))
        self.metadata.put_session(SessionRecord("d" * 64, "alice", "a" * 32, "f" * 64, 1.0, 1.0, 2.0))
        rows, done = open_rows(self.keyring, self.metadata)
        self.assertEqual(done, (1, 1))
        alice = self.metadata.get_user("alice")
        assert alice is not None
        self.assertTrue(rows.user_ok(alice))
        self.assertEqual(self.metadata.count_sessions(), 0)
        self.metadata.add_user(UserRecord("mallory", "m" * 32, "h", "t"))
        self.assertIsNone(authenticate_existing_rows(self.metadata, rows))
        mallory = self.metadata.get_user("mallory")
        assert mallory is not None
        self.assertFalse(rows.user_ok(mallory))

    def test_rewrap_keeps_the_key(self) -> None:
        """A rotation rewraps the integrity key: the new key alone opens the
        same key; a lost integrity key is not silently replaced."""
        key = integrity_key(self.keyring, self.metadata)
        both = Keyring("new", {**self.keyring.keys, "new": generate_keyring().current_key})
        self.assertTrue(rewrap_integrity_key(both, self.metadata))
        self.assertFalse(rewrap_integrity_key(both, self.metadata))
        only_new = Keyring("new", {"new": both.keys["new"]})
        self.assertEqual(integrity_key(only_new, self.metadata), key)
        self.assertRaises(IntegrityKeyError, integrity_key, self.keyring, self.metadata)
        rows, _ = open_rows(only_new, self.metadata)
        UserStore(self.metadata, rows, scrypt_n=2**4).add("alice", PASSWORD)
        self.metadata.set_state("integrity_key", None)
        self.assertRaises(IntegrityKeyError, integrity_key, only_new, self.metadata)
