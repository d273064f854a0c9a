# -*- test-case-name: tests.test_users -*-
"""Tests for L{securevault.users}: accounts and password hashes."""

from __future__ import annotations

import json
import stat

from securevault.users import (
    InvalidPassword,
    InvalidUsername,
    UnknownUser,
    UserError,
    UserExists,
    UserFileError,
    UserStore,
    check_password,
    hash_password,
)
from tests.support.testcase import SyncTestCase

FAST_N = 2**10
PASSWORD = "correct horse battery"


class UserStoreTests(SyncTestCase):
    """The user store: add, verify, change, remove, list."""

    def setUp(self) -> None:
        self.path = self.make_dir() / "users.json"
        self.store = UserStore(self.path, scrypt_n=FAST_N)

    def test_empty(self) -> None:
        """With no file there are no users, and nothing is created by reading."""
        self.assertEqual(self.store.names(), [])
        self.assertIsNone(self.store.user_id("alice"))
        self.assertIsNone(self.store.verify("alice", PASSWORD))
        self.assertFalse(self.path.exists())

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
        """An unknown or invalid user name verifies as None, never raises."""
        self.store.add("alice", PASSWORD)
        self.assertIsNone(self.store.verify("bob", PASSWORD))
        self.assertIsNone(self.store.verify("../etc/passwd", PASSWORD))
        self.assertIsNone(self.store.verify("", PASSWORD))

    def test_file_format(self) -> None:
        """The file is 0600 JSON in the documented shape holding no plaintext password."""
        user_id = self.store.add("alice", PASSWORD)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        raw = self.path.read_bytes()
        self.assertNotIn(PASSWORD.encode(), raw)
        document = json.loads(raw)
        self.assertEqual((document["format"], document["version"]), ("securevault-users", 1))
        entry = document["users"]["alice"]
        self.assertEqual(entry["id"], user_id)
        self.assertTrue(entry["created_at"].endswith("Z"))
        scheme, n, r, p, salt, digest = entry["password"].split("$")
        self.assertEqual((scheme, n, r, p), ("scrypt", str(FAST_N), "8", "1"))

    def test_salted(self) -> None:
        """Two users with the same password get different hashes."""
        self.store.add("alice", PASSWORD)
        self.store.add("bob", PASSWORD)
        users = json.loads(self.path.read_bytes())["users"]
        self.assertNotEqual(users["alice"]["password"], users["bob"]["password"])

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

    def test_names_sorted(self) -> None:
        """names() lists every user, sorted."""
        for name in ["carol", "alice", "bob"]:
            self.store.add(name, PASSWORD)
        self.assertEqual(self.store.names(), ["alice", "bob", "carol"])

    def test_rereads_file(self) -> None:
        """A change made through another store object (the admin CLI) is seen at once."""
        other = UserStore(self.path, scrypt_n=FAST_N)
        user_id = other.add("alice", PASSWORD)
        self.assertEqual(self.store.verify("alice", PASSWORD), user_id)
        other.remove("alice")
        self.assertIsNone(self.store.verify("alice", PASSWORD))

    def test_stored_parameters_used(self) -> None:
        """verify uses the cost stored with each hash, so a store with another
        default cost still verifies older hashes."""
        user_id = self.store.add("alice", PASSWORD)
        cheaper = UserStore(self.path, scrypt_n=2**8)
        self.assertEqual(cheaper.verify("alice", PASSWORD), user_id)

    def test_malformed_file(self) -> None:
        """A file that is not a users file is reported, not treated as empty."""
        self.path.write_text('{"format": "something-else"}')
        self.assertRaises(UserFileError, self.store.names)
        self.path.write_text("not json")
        self.assertRaises(UserFileError, self.store.verify, "alice", PASSWORD)


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
    """The set of current user ids, for ending removed users' sessions."""

    def test_user_ids(self) -> None:
        """user_ids holds every current user's id and loses a removed one's."""
        store = UserStore(self.make_dir() / "users.json", scrypt_n=2**4)
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
        store = UserStore(self.make_dir() / "users.json", scrypt_n=2**4)
        store.add("alice", "password1")
        self.assertIsNone(store.verify("alice", "\ud800password1"))
        self.assertIsNotNone(store.verify("alice", "password1"))
