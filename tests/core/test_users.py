# -*- test-case-name: tests.core.test_users -*-
"""Tests for L{securevault.core.users}: accounts and password hashes, kept in the
metadata store, and the legacy C{users.json} reader for the migration."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any, NoReturn

from securevault.core import users
from securevault.core.integrity import RowAuthenticator
from securevault.core.users import (
    InvalidPassword,
    InvalidUsername,
    MalformedPasswordHash,
    UnknownUser,
    UserError,
    UserExists,
    UserFileError,
    UserStore,
    UserStoreUnavailable,
    check_password,
    hash_password,
    read_legacy_users,
)
from securevault.stores.metadata import MetadataError, SessionRecord, SqliteMetadataStore, UserRecord
from tests.support.rows import vault_rows
from tests.support.testcase import SyncTestCase

FAST_N = 2**10
PASSWORD = "correct horse battery"


def open_metadata(test: SyncTestCase, path: Path) -> SqliteMetadataStore:
    """A SQLite metadata store at C{path}, closed when the test ends."""
    store = SqliteMetadataStore(path)
    test.addCleanup(store.close)
    return store


def fresh_store(test: SyncTestCase, scrypt_n: int = FAST_N) -> UserStore:
    """A user store on a fresh metadata store of its own."""
    metadata = open_metadata(test, test.make_dir() / "vault.db")
    return UserStore(metadata, vault_rows(metadata), scrypt_n=scrypt_n)


class UserStoreTests(SyncTestCase):
    """The user store: add, verify, change, remove, list."""

    def setUp(self) -> None:
        self.path = self.make_dir() / "vault.db"
        self.metadata = open_metadata(self, self.path)
        self.store = UserStore(self.metadata, vault_rows(self.metadata), scrypt_n=FAST_N)

    def test_empty(self) -> None:
        """A fresh store has no users, and reading creates none."""
        self.assertEqual(self.store.names(), [])
        self.assertEqual(self.store.user_ids(), set())
        self.assertIsNone(self.store.user_id("alice"))
        self.assertIsNone(self.store.verify("alice", PASSWORD))
        self.assertEqual(self.metadata.list_users(), [])

    def test_add_and_verify(self) -> None:
        """A user added with a password verifies with it and gets a random 32-hex id."""
        user_id = self.store.add("alice", PASSWORD)
        self.assertEqual(len(user_id), 32)
        int(user_id, 16)
        self.assertEqual(self.store.user_id("alice"), user_id)
        self.assertEqual(self.store.verify("alice", PASSWORD), user_id)

    def test_wrong_password(self) -> None:
        """A wrong password, or the right one with other case or whitespace, is refused."""
        self.store.add("alice", PASSWORD)
        for attempt in ["wrong password", PASSWORD.upper(), PASSWORD + " ", "short", "x" * 2000]:
            self.assertIsNone(self.store.verify("alice", attempt))

    def test_unknown_user(self) -> None:
        """An unknown or invalid user name verifies as None, never raises,
        even one the store could not take as text (a lone surrogate, a NUL)."""
        self.store.add("alice", PASSWORD)
        for name in ["bob", "../etc/passwd", "", "ALICE", "alice\0", "\ud800alice", "x" * 100_000]:
            self.assertIsNone(self.store.verify(name, PASSWORD), repr(name[:20]))

    def test_every_refusal_costs_one_scrypt(self) -> None:
        """An unknown name, an invalid one, and a password of the wrong length
        each cost one scrypt at the store's cost (a decoy), like a real check:
        response times do not tell which names exist."""
        self.store.add("alice", PASSWORD)
        costs: list[int] = []
        real = users._scrypt

        def counting(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
            costs.append(n)
            return real(password, salt, n, r, p)

        self.patch(users, "_scrypt", counting)
        for name, password in [
            ("alice", PASSWORD),
            ("alice", "wrong password"),
            ("bob", PASSWORD),
            ("../etc/passwd", PASSWORD),
            ("\ud800alice", PASSWORD),
            ("alice", "short"),
            ("alice", "x" * 2000),
            ("bob", "\ud800short"),
        ]:
            del costs[:]
            self.store.verify(name, password)
            self.assertEqual(costs, [FAST_N], repr((name, password[:10])))

    def test_stored_record(self) -> None:
        """The store keeps the name, the id, a UTC creation time and the
        self-describing scrypt hash; no plaintext password is in the
        database's files (0600), write-ahead log included."""
        user_id = self.store.add("alice", PASSWORD)
        record = self.metadata.get_user("alice")
        assert record is not None
        self.assertEqual((record.name, record.user_id), ("alice", user_id))
        self.assertTrue(record.created_at.endswith("Z"), record.created_at)
        scheme, n, r, p, salt, digest = record.password_hash.split("$")
        self.assertEqual((scheme, n, r, p), ("scrypt", str(FAST_N), "8", "1"))
        self.assertTrue(check_password(PASSWORD, record.password_hash))
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        files = sorted(self.path.parent.glob("vault.db*"))
        self.assertIn(self.path, files)
        for path in files:
            self.assertNotIn(PASSWORD.encode(), path.read_bytes(), path)

    def test_salted(self) -> None:
        """Two users with the same password get different hashes."""
        self.store.add("alice", PASSWORD)
        self.store.add("bob", PASSWORD)
        alice, bob = self.metadata.get_user("alice"), self.metadata.get_user("bob")
        assert alice is not None and bob is not None
        self.assertNotEqual(alice.password_hash, bob.password_hash)

    def test_duplicate_add(self) -> None:
        """Adding an existing name is refused and the original password still works."""
        user_id = self.store.add("alice", PASSWORD)
        self.assertRaises(UserExists, self.store.add, "alice", "another password")
        self.assertEqual(self.store.verify("alice", PASSWORD), user_id)

    def test_invalid_names(self) -> None:
        """Names outside [A-Za-z0-9._@-]{1,64} are refused."""
        for name in ["", "a b", "a/b", "x" * 65, "é", "a\nb", "a:b"]:
            self.assertRaises(InvalidUsername, self.store.add, name, PASSWORD)
        for name in ["a", "alice@example.com", "A.b_c-d", "x" * 64]:
            self.store.add(name, PASSWORD)
        self.assertEqual(len(self.store.names()), 4)

    def test_invalid_passwords(self) -> None:
        """Passwords shorter than 8, longer than 1024 or holding NUL are refused."""
        for password in ["short", "", "x" * 1025, "long enough\0"]:
            self.assertRaises(InvalidPassword, self.store.add, "alice", password)
        self.assertEqual(self.store.names(), [])
        self.store.add("alice", "x" * 1024)

    def test_errors_are_sentences(self) -> None:
        """Every error is a UserError whose message is a full sentence."""
        error = self.assertRaises(UserError, self.store.remove, "ghost")
        self.assertIsInstance(error, UnknownUser)
        self.assertTrue(str(error)[0].isupper() and str(error).endswith("."))

    def test_set_password(self) -> None:
        """After a password change the old one fails, the new one works, the id stays."""
        user_id = self.store.add("alice", PASSWORD)
        self.store.set_password("alice", "new password!")
        self.assertIsNone(self.store.verify("alice", PASSWORD))
        self.assertEqual(self.store.verify("alice", "new password!"), user_id)
        self.assertRaises(UnknownUser, self.store.set_password, "bob", "new password!")

    def test_remove_and_new_id(self) -> None:
        """A removed user cannot log in; adding the name again gives a new id."""
        old_id = self.store.add("alice", PASSWORD)
        self.store.remove("alice")
        self.assertIsNone(self.store.verify("alice", PASSWORD))
        self.assertEqual(self.store.names(), [])
        self.assertRaises(UnknownUser, self.store.remove, "alice")
        new_id = self.store.add("alice", PASSWORD)
        self.assertNotEqual(new_id, old_id)

    def test_remove_ends_sessions(self) -> None:
        """Removing a user deletes their sessions with them, and no one else's."""
        alice = self.store.add("alice", PASSWORD)
        bob = self.store.add("bob", PASSWORD)
        for digest, name, user_id in [("1" * 64, "alice", alice), ("2" * 64, "alice", alice), ("3" * 64, "bob", bob)]:
            self.metadata.put_session(SessionRecord(digest, name, user_id, "f" * 64, 1.0, 1.0, 2.0e9))
        self.store.remove("alice")
        self.assertEqual(self.metadata.count_sessions(), 1)
        self.assertIsNone(self.metadata.get_session("1" * 64))
        self.assertIsNotNone(self.metadata.get_session("3" * 64))

    def test_names_sorted(self) -> None:
        """names() lists every user, sorted."""
        for name in ["carol", "alice", "bob"]:
            self.store.add(name, PASSWORD)
        self.assertEqual(self.store.names(), ["alice", "bob", "carol"])

    def test_shared_store(self) -> None:
        """A change made through another connection to the same database (the
        admin CLI, another node) is seen at once."""
        other_metadata = open_metadata(self, self.path)
        other = UserStore(other_metadata, vault_rows(other_metadata), scrypt_n=FAST_N)
        user_id = other.add("alice", PASSWORD)
        self.assertEqual(self.store.verify("alice", PASSWORD), user_id)
        other.set_password("alice", "new password!")
        self.assertIsNone(self.store.verify("alice", PASSWORD))
        self.assertEqual(self.store.verify("alice", "new password!"), user_id)
        other.remove("alice")
        self.assertIsNone(self.store.verify("alice", "new password!"))
        self.assertEqual(self.store.names(), [])

    def test_stored_parameters_used(self) -> None:
        """verify uses the cost stored with each hash, so a store with another
        default cost still verifies older hashes."""
        user_id = self.store.add("alice", PASSWORD)
        cheaper = UserStore(self.metadata, vault_rows(self.metadata), scrypt_n=2**8)
        self.assertEqual(cheaper.verify("alice", PASSWORD), user_id)

    def test_malformed_stored_hash(self) -> None:
        """A stored hash that is not a valid scrypt hash is reported, not
        treated as a wrong password."""
        mac = vault_rows(self.metadata).user_mac("alice", "a" * 32, "not a hash")
        self.metadata.add_user(UserRecord("alice", "a" * 32, "not a hash", "2026-01-01T00:00:00Z", mac))
        self.assertRaises(UserFileError, self.store.verify, "alice", PASSWORD)

    def test_malformed_stored_hash_is_not_an_outage(self) -> None:
        """A malformed stored hash is a MalformedPasswordHash (damaged data),
        never a UserStoreUnavailable (which the daemon answers 503)."""
        malformed = "scrypt$1$8$1$c2FsdA==$aGFzaA=="
        mac = vault_rows(self.metadata).user_mac("alice", "a" * 32, malformed)
        self.metadata.add_user(UserRecord("alice", "a" * 32, malformed, "t", mac))
        error = self.assertRaises(MalformedPasswordHash, self.store.verify, "alice", PASSWORD)
        self.assertNotIsInstance(error, UserStoreUnavailable)

    def test_bad_cost_parameter(self) -> None:
        """scrypt_n must be a power of two between 2 and 2**20."""
        for n in [0, 1, 1000, 2**21]:
            self.assertRaises(ValueError, UserStore, self.metadata, vault_rows(self.metadata), scrypt_n=n)


class _FailingMetadata:
    """A metadata store whose every call fails, as a lost database would."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any) -> NoReturn:
            raise MetadataError("the metadata store failed: OperationalError: disk I/O error")

        return fail


class StoreFailureTests(SyncTestCase):
    """A failing metadata store is a UserFileError with a sentence, never an
    empty user list or a refused password."""

    def test_failures_reported(self) -> None:
        store = UserStore(_FailingMetadata(), RowAuthenticator(bytes(32)), scrypt_n=FAST_N)
        for call, args in [
            (store.names, ()),
            (store.user_ids, ()),
            (store.user_id, ("alice",)),
            (store.verify, ("alice", PASSWORD)),
            (store.add, ("alice", PASSWORD)),
            (store.set_password, ("alice", PASSWORD)),
            (store.remove, ("alice",)),
        ]:
            error = self.assertRaises(UserFileError, call, *args)
            self.assertTrue(str(error).startswith("The user store cannot be used: "), str(error))
            self.assertTrue(str(error).endswith("."), str(error))

    def test_failures_are_outages(self) -> None:
        """A failing store is a UserStoreUnavailable caused by the store's
        MetadataError, so the daemon can tell an outage from bad data."""
        store = UserStore(_FailingMetadata(), RowAuthenticator(bytes(32)), scrypt_n=FAST_N)
        for call, args in [(store.verify, ("alice", PASSWORD)), (store.user_id, ("alice",)), (store.names, ())]:
            error = self.assertRaises(UserStoreUnavailable, call, *args)
            self.assertIsInstance(error.__cause__, MetadataError)
            self.assertNotIsInstance(error, MalformedPasswordHash)


class ImportUserTests(SyncTestCase):
    """import_user: a user as an older vault kept it (the migration)."""

    def setUp(self) -> None:
        self.store = fresh_store(self)

    def test_import_keeps_id_and_hash(self) -> None:
        """The imported user keeps their id (their archives) and their password."""
        encoded = hash_password(PASSWORD, n=FAST_N)
        self.assertTrue(self.store.import_user("alice", "a" * 32, encoded, "2025-01-01T00:00:00Z"))
        self.assertEqual(self.store.verify("alice", PASSWORD), "a" * 32)
        self.assertEqual(self.store.names(), ["alice"])

    def test_import_twice(self) -> None:
        """Importing a name already present changes nothing and says so (False)."""
        user_id = self.store.add("alice", PASSWORD)
        other = hash_password("another password", n=FAST_N)
        self.assertFalse(self.store.import_user("alice", "b" * 32, other, ""))
        self.assertEqual(self.store.verify("alice", PASSWORD), user_id)
        self.assertIsNone(self.store.verify("alice", "another password"))

    def test_import_refuses_bad_entries(self) -> None:
        """A malformed hash or an invalid name is refused, and nothing is added."""
        encoded = hash_password(PASSWORD, n=FAST_N)
        self.assertRaises(UserFileError, self.store.import_user, "alice", "a" * 32, "plaintext", "")
        self.assertRaises(InvalidUsername, self.store.import_user, "../alice", "a" * 32, encoded, "")
        self.assertEqual(self.store.names(), [])


class LegacyUsersFileTests(SyncTestCase):
    """read_legacy_users: the C{users.json} of the first release."""

    def setUp(self) -> None:
        self.path = self.make_dir() / "users.json"

    def write(self, document: Any) -> None:
        self.path.write_text(json.dumps(document))

    def test_missing_file(self) -> None:
        """No file: no users, and nothing is created by reading."""
        self.assertEqual(read_legacy_users(self.path), {})
        self.assertFalse(self.path.exists())

    def test_reads_documented_format(self) -> None:
        """The documented shape: format, version, users by name with id,
        password hash and creation time."""
        encoded = hash_password(PASSWORD, n=FAST_N)
        entry = {"id": "a" * 32, "password": encoded, "created_at": "2025-01-01T00:00:00Z"}
        self.write({"format": "securevault-users", "version": 1, "users": {"alice": entry}})
        users = read_legacy_users(self.path)
        self.assertEqual(users, {"alice": entry})
        self.assertTrue(check_password(PASSWORD, users["alice"]["password"]))

    def test_malformed_file(self) -> None:
        """A file that is not a users file is reported, not treated as empty."""
        good_entry = {"id": "a" * 32, "password": "scrypt$...", "created_at": ""}
        for text in [
            json.dumps({"format": "something-else"}),
            json.dumps({"format": "securevault-users", "version": 2, "users": {}}),
            json.dumps({"format": "securevault-users", "version": 1}),
            json.dumps({"format": "securevault-users", "version": 1, "users": []}),
            json.dumps({"format": "securevault-users", "version": 1, "users": {"alice": {"id": "a" * 32}}}),
            json.dumps({"format": "securevault-users", "version": 1, "users": {"alice": {**good_entry, "id": 7}}}),
            json.dumps([1, 2]),
            "not json",
            "",
        ]:
            self.path.write_text(text)
            error = self.assertRaises(UserFileError, read_legacy_users, self.path)
            self.assertIn(str(self.path), str(error))

    def test_unreadable_file(self) -> None:
        """A users.json that cannot be read (here: a directory) is a UserFileError."""
        self.path.mkdir()
        self.assertRaises(UserFileError, read_legacy_users, self.path)


class HashTests(SyncTestCase):
    """The self-describing scrypt hash format."""

    def test_round_trip(self) -> None:
        """A hash checks against its password and no other."""
        encoded = hash_password(PASSWORD, n=FAST_N)
        self.assertTrue(check_password(PASSWORD, encoded))
        self.assertFalse(check_password("something else", encoded))

    def test_hostile_parameters(self) -> None:
        """A hash demanding an absurd cost or malformed is refused before scrypt runs."""
        encoded = hash_password(PASSWORD, n=FAST_N)
        parts = encoded.split("$")
        for bad in [
            "$".join(["scrypt", str(2**30)] + parts[2:]),
            "$".join(["scrypt", "1000"] + parts[2:]),
            "$".join(["bcrypt"] + parts[1:]),
            "scrypt$1$2",
        ]:
            self.assertRaises(UserFileError, check_password, PASSWORD, bad)


class UserIdsTests(SyncTestCase):
    """The set of current user ids."""

    def test_user_ids(self) -> None:
        """user_ids holds every current user's id and loses a removed one's."""
        store = fresh_store(self, scrypt_n=2**4)
        alice = store.add("alice", "password-a")
        bob = store.add("bob", "password-b")
        self.assertEqual(store.user_ids(), {alice, bob})
        store.remove("bob")
        self.assertEqual(store.user_ids(), {alice})


class HostilePasswordTests(SyncTestCase):
    """A password that is not valid Unicode text is just a wrong password."""

    def test_lone_surrogate_password(self) -> None:
        """verify() with a lone surrogate in the password returns None for an
        existing user (JSON can carry "\\ud800"), never raises."""
        store = fresh_store(self, scrypt_n=2**4)
        store.add("alice", "password1")
        self.assertIsNone(store.verify("alice", "\ud800password1"))
        self.assertIsNotNone(store.verify("alice", "password1"))
