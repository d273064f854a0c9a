# -*- test-case-name: tests.admin.test_admin -*-
"""Tests for L{securevault.admin.cli}: the C{securevault-admin} command line."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from securevault.admin.cli import AdminError, main, read_new_password
from securevault.core.keys import load_keyring
from securevault.core.sessions import FAILURES_BEFORE_THROTTLE, LoginThrottle, LoginThrottled
from securevault.core.users import USERS_FORMAT, USERS_VERSION, UserStore, hash_password
from securevault.storage import SecureFileStorage
from securevault.stores.blobs import LocalBlobStore
from securevault.stores.metadata import SqliteMetadataStore
from tests.support.rows import vault_rows
from tests.support.testcase import SyncTestCase

REPOSITORY = Path(__file__).parents[2]
PASSWORD = "a long enough password"


class AdminTestCase(SyncTestCase):
    """Runs C{main} in-process with captured output and a scratch vault."""

    def setUp(self) -> None:
        base = self.make_dir()
        self.data_dir = base / "vault-data"
        self.certs_dir = base / "certs"
        self.master_key = base / "vault-keys" / "master.key"  # beside the data, not in it

    def run_admin(self, *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        """Run C{securevault-admin --data-dir <scratch> ARGV...}; return (status, out, err)."""
        out, err = io.StringIO(), io.StringIO()
        if stdin is not None:
            saved = sys.stdin
            sys.stdin = io.StringIO(stdin)
            self.addCleanup(setattr, sys, "stdin", saved)
        with redirect_stdout(out), redirect_stderr(err):
            status = main(["--data-dir", str(self.data_dir), *argv])
        return status, out.getvalue(), err.getvalue()

    def init(self) -> str:
        status, out, err = self.run_admin("init", "--certs-dir", str(self.certs_dir))
        self.assertEqual((status, err), (0, ""))
        return out

    def metadata(self) -> SqliteMetadataStore:
        """The vault's metadata store where the daemon finds it by default
        (C{<data-dir>/vault.db}), opened once, closed when the test ends."""
        store: SqliteMetadataStore | None = getattr(self, "_metadata", None)
        if store is None:
            store = self._metadata = SqliteMetadataStore(self.data_dir / "vault.db")
            self.addCleanup(store.close)
        return store


def listed_names(out: str) -> list[str]:
    """The user names in C{user list}'s table (between its head and its
    summary line)."""
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ARCHIVES", "STORED", "QUOTA"], out
    return [line.split()[0] for line in lines[1:-1]]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class InitTests(AdminTestCase):
    """C{init} builds a development PKI and the master key."""

    def test_creates_files(self) -> None:
        """init creates the six PKI files, the master key and a 0700 data dir,
        names each, and prints the next steps."""
        out = self.init()
        expected = [
            *(self.certs_dir / n for n in ["ca.crt", "ca.key", "ca.crl", "server.crt", "server.key"]),
            *(self.certs_dir / n for n in ["client.crt", "client.key"]),
            self.master_key,
        ]
        for path in expected:
            self.assertIn(f"created {path}\n", out)
        for path in expected:
            if path.suffix == ".key":
                self.assertEqual(_mode(path), 0o600, path)
        self.assertEqual(_mode(self.data_dir), 0o700)
        load_keyring(self.master_key)
        self.assertIn("user add NAME", out)
        self.assertIn("twistd -n securevault", out)

    def test_idempotent(self) -> None:
        """A second init creates nothing, changes nothing, and says what was already there."""
        self.init()
        files = [*self.certs_dir.iterdir(), self.master_key]
        before = {path: path.read_bytes() for path in files}
        out = self.init()
        self.assertNotIn("created", out)
        self.assertIn("already present", out)
        self.assertIn(str(self.master_key), out)
        self.assertEqual({path: path.read_bytes() for path in files}, before)


class CertClientTests(AdminTestCase):
    """C{cert client NAME} issues another client certificate."""

    def test_issue(self) -> None:
        """The new certificate chains to the CA and is for clientAuth."""
        self.init()
        status, out, err = self.run_admin("cert", "client", "phone", "--certs-dir", str(self.certs_dir))
        self.assertEqual((status, err), (0, ""))
        self.assertIn(str(self.certs_dir / "phone.crt"), out)
        cert = x509.load_pem_x509_certificate((self.certs_dir / "phone.crt").read_bytes())
        ca = x509.load_pem_x509_certificate((self.certs_dir / "ca.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(_mode(self.certs_dir / "phone.key"), 0o600)

    def test_refusals(self) -> None:
        """Without a CA, for an existing or bad name: one error line and status 1."""
        status, out, err = self.run_admin("cert", "client", "phone", "--certs-dir", str(self.certs_dir))
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("securevault-admin: error: "), err)
        self.assertIn("securevault-admin init", err)
        self.assertEqual(err.count("\n"), 1)
        self.init()
        for name in ["client", "../x", "server"]:
            status, out, err = self.run_admin("cert", "client", name, "--certs-dir", str(self.certs_dir))
            self.assertEqual(status, 1, name)
            self.assertTrue(err.startswith("securevault-admin: error: "), err)


class CertRevokeTests(AdminTestCase):
    """C{cert revoke NAME|SERIAL} adds a certificate to the development CA's CRL."""

    def revoke(self, what: str) -> tuple[int, str, str]:
        return self.run_admin("cert", "revoke", what, "--certs-dir", str(self.certs_dir))

    def listed(self) -> list[int]:
        crl = x509.load_pem_x509_crl((self.certs_dir / "ca.crl").read_bytes())
        return [entry.serial_number for entry in crl]

    def test_revoke(self) -> None:
        """By name it says which serial of which file went into which CRL; a
        second time it says nothing changed; a serial in hex works too."""
        self.init()
        serial = x509.load_pem_x509_certificate((self.certs_dir / "client.crt").read_bytes()).serial_number
        status, out, err = self.revoke("client")
        self.assertEqual((status, err), (0, ""))
        self.assertIn(
            f"revoked serial {serial:X} ({self.certs_dir / 'client.crt'}) in {self.certs_dir / 'ca.crl'}", out
        )
        self.assertEqual(self.listed(), [serial])
        status, out, err = self.revoke(f"{serial:x}")
        self.assertEqual((status, err), (0, ""))
        self.assertIn(f"serial {serial:X} was already revoked", out)
        status, out, err = self.revoke("0x1234")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("revoked serial 1234 in", out)
        self.assertEqual(self.listed(), [serial, 0x1234])

    def test_refusals(self) -> None:
        """Without a CA, or for a name with no certificate that is not hex
        either: one error line, status 1."""
        status, out, err = self.revoke("client")
        self.assertEqual(status, 1)
        self.assertIn("securevault-admin init", err)
        self.init()
        status, out, err = self.revoke("nobody")
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("securevault-admin: error: "), err)
        self.assertIn("nobody.crt", err)
        self.assertEqual(err.count("\n"), 1)
        self.assertEqual(self.listed(), [])


class UserCommandTests(AdminTestCase):
    """C{user add/passwd/remove/list}."""

    def setUp(self) -> None:
        super().setUp()
        self.init()

    @property
    def store(self) -> UserStore:
        """The users as the daemon sees them, in the vault's metadata store."""
        metadata = self.metadata()
        return UserStore(metadata, vault_rows(metadata, load_keyring(self.master_key)))

    def test_add_from_stdin(self) -> None:
        """--password-stdin reads one line, stripping only the newline; the
        password is never printed and not stored in plaintext (in no file of
        the metadata database, write-ahead log included); no users.json is
        written."""
        password = "  spaces around  "
        status, out, err = self.run_admin("user", "add", "alice", "--password-stdin", stdin=password + "\nrest\n")
        self.assertEqual((status, err), (0, ""))
        self.assertNotIn(password.strip(), out)
        self.assertIsNotNone(self.store.verify("alice", password))
        database = sorted(self.data_dir.glob("vault.db*"))
        self.assertIn(self.data_dir / "vault.db", database)
        for path in database:
            self.assertNotIn(password.strip().encode(), path.read_bytes(), path)
        self.assertFalse((self.data_dir / "users.json").exists())
        status, out, err = self.run_admin("user", "list")
        self.assertEqual((status, listed_names(out)), (0, ["alice"]))

    def test_seen_by_an_open_store(self) -> None:
        """A store already open (a running daemon's) sees each command's
        change at once: no file to reload, no signal to send."""
        store = self.store
        self.assertEqual(store.names(), [])
        self.run_admin("user", "add", "alice", "--password-stdin", stdin=PASSWORD)
        user_id = store.verify("alice", PASSWORD)
        self.assertIsNotNone(user_id)
        self.run_admin("user", "passwd", "alice", "--password-stdin", stdin="new password\n")
        self.assertIsNone(store.verify("alice", PASSWORD))
        self.assertEqual(store.verify("alice", "new password"), user_id)
        self.run_admin("user", "remove", "alice")
        self.assertEqual(store.names(), [])

    def test_legacy_users_file_migrated(self) -> None:
        """A users.json from before the metadata store is moved into it by the
        first user command (ids and passwords kept) and renamed
        users.json.migrated; later commands work on the store alone."""
        legacy = {
            "format": USERS_FORMAT,
            "version": USERS_VERSION,
            "users": {
                "bob": {
                    "id": "b" * 32,
                    "password": hash_password(PASSWORD, n=2**10),
                    "created_at": "2025-01-01T00:00:00Z",
                },
                "alice": {"id": "a" * 32, "password": hash_password("alice password", n=2**10), "created_at": ""},
            },
        }
        (self.data_dir / "users.json").write_text(json.dumps(legacy))
        status, out, err = self.run_admin("user", "list")
        self.assertEqual((status, listed_names(out), err), (0, ["alice", "bob"], ""))
        self.assertFalse((self.data_dir / "users.json").exists())
        self.assertEqual(json.loads((self.data_dir / "users.json.migrated").read_text()), legacy)
        self.assertEqual(self.store.verify("bob", PASSWORD), "b" * 32)
        self.assertEqual(self.store.verify("alice", "alice password"), "a" * 32)
        self.assertEqual(self.run_admin("user", "remove", "bob")[0], 0)
        self.assertEqual(listed_names(self.run_admin("user", "list")[1]), ["alice"])

    def test_add_errors(self) -> None:
        """A duplicate name, a bad name, a short or missing password fail with status 1."""
        self.assertEqual(self.run_admin("user", "add", "alice", "--password-stdin", stdin=PASSWORD)[0], 0)
        for argv, stdin in [
            (["alice"], PASSWORD),
            (["bad/name"], PASSWORD),
            (["bob"], "short\n"),
            (["bob"], ""),
        ]:
            status, out, err = self.run_admin("user", "add", *argv, "--password-stdin", stdin=stdin)
            self.assertEqual(status, 1, argv)
            self.assertTrue(err.startswith("securevault-admin: error: "), err)
        self.assertEqual(self.store.names(), ["alice"])

    def test_passwd_and_remove(self) -> None:
        """passwd changes the password; remove deletes the user; both refuse unknown users."""
        self.run_admin("user", "add", "alice", "--password-stdin", stdin=PASSWORD)
        status, _, err = self.run_admin("user", "passwd", "alice", "--password-stdin", stdin="new password\n")
        self.assertEqual((status, err), (0, ""))
        self.assertIsNone(self.store.verify("alice", PASSWORD))
        self.assertIsNotNone(self.store.verify("alice", "new password"))
        self.assertEqual(self.run_admin("user", "remove", "alice")[0], 0)
        self.assertEqual(self.store.names(), [])
        self.assertEqual(self.run_admin("user", "remove", "alice")[0], 1)
        self.assertEqual(self.run_admin("user", "passwd", "alice", "--password-stdin", stdin=PASSWORD)[0], 1)

    def test_unlock(self) -> None:
        """user unlock NAME forgets that user's failed logins from every
        certificate (a throttled login works again), keeps other users'
        failures, says how many it forgot, and is audited; an unknown user
        is an error."""
        self.run_admin("user", "add", "alice", "--password-stdin", stdin=PASSWORD)
        self.run_admin("user", "add", "bob", "--password-stdin", stdin=PASSWORD)
        throttle = LoginThrottle(self.metadata(), time.time)
        for certificate in ("a" * 64, "b" * 64):
            for _ in range(FAILURES_BEFORE_THROTTLE):
                throttle.reserve(certificate, "alice")
            self.assertRaises(LoginThrottled, throttle.reserve, certificate, "alice")
        for _ in range(FAILURES_BEFORE_THROTTLE):
            throttle.reserve("a" * 64, "bob")
        status, out, err = self.run_admin("user", "unlock", "alice")
        self.assertEqual((status, out, err), (0, "unlocked user alice (10 failed logins forgotten)\n", ""))
        for certificate in ("a" * 64, "b" * 64):
            throttle.release(throttle.reserve(certificate, "alice"))
        self.assertRaises(LoginThrottled, throttle.reserve, "a" * 64, "bob")
        records = [json.loads(line) for line in (self.data_dir / "audit.jsonl").read_text().splitlines()]
        self.assertEqual(
            [(r["event"], r["user"], r["cleared"]) for r in records if r["event"] == "user_unlocked"],
            [("user_unlocked", "alice", 10)],
        )
        status, out, err = self.run_admin("user", "unlock", "carol")
        self.assertEqual(status, 1)
        self.assertIn("no user 'carol'", err)

    def test_missing_data_dir(self) -> None:
        """User commands refuse a data directory that does not exist rather than create one."""
        self.data_dir = self.data_dir.parent / "elsewhere"
        status, out, err = self.run_admin("user", "list")
        self.assertEqual(status, 1)
        self.assertIn("init", err)
        self.assertFalse(self.data_dir.exists())

    def test_usage_error(self) -> None:
        """A missing subcommand is a usage error, status 2."""
        status, out, err = self.run_admin("user")
        self.assertEqual(status, 2)
        self.assertIn("usage:", err)


class VerifyRepairTests(AdminTestCase):
    """C{verify} reports blobs that no index row names (the debris of a crash
    between writing a blob and committing its row); C{--repair} removes those
    older than C{--grace} seconds."""

    def setUp(self) -> None:
        super().setUp()
        self.init()
        self.assertEqual(self.run_admin("user", "add", "alice", "--password-stdin", stdin=PASSWORD)[0], 0)
        self.alice_id = self.store_user_id("alice")
        storage = SecureFileStorage(self.data_dir, load_keyring(self.master_key), metadata=self.metadata())
        blobs = storage.blobs
        assert isinstance(blobs, LocalBlobStore)
        self.blobs = blobs
        self.kept = storage.store(self.alice_id, "kept.txt", b"kept " * 1000).id
        # An upload whose index row never committed: the blob alone.
        self.orphan = storage.store(self.alice_id, "lost.txt", b"lost " * 1000).id
        self.assertTrue(self.metadata().delete_archive(self.alice_id, self.orphan))

    def store_user_id(self, name: str) -> str:
        metadata = self.metadata()
        user_id = UserStore(metadata, vault_rows(metadata, load_keyring(self.master_key))).user_id(name)
        assert user_id is not None
        return user_id

    def age(self, archive_id: str, seconds: float) -> None:
        """Make the blob's last write C{seconds} old."""
        then = time.time() - seconds
        os.utime(self.blobs.path(self.alice_id, archive_id), (then, then))

    def assert_kept_archive_intact(self) -> None:
        self.assertTrue(self.blobs.path(self.alice_id, self.kept).exists())
        self.assertIsNotNone(self.metadata().get_archive(self.alice_id, self.kept))

    def test_verify_only_reports(self) -> None:
        """Without --repair an orphan older than the grace period is reported,
        with its owner's name and the way to remove it, and left in place;
        the indexed archive verifies."""
        self.age(self.orphan, 2 * 3600)
        status, out, err = self.run_admin("verify")
        self.assertEqual(status, 0, err)
        self.assertIn("1 archives verified, 0 failed\n", out)
        self.assertIn(f"ORPHAN {self.orphan} of alice: blob without an index row, found\n", out)
        self.assertIn("1 orphaned blobs; remove them with --repair\n", out)
        self.assertNotIn(self.kept, out)
        self.assertTrue(self.blobs.path(self.alice_id, self.orphan).exists())
        self.assert_kept_archive_intact()
        # Reported again next time: nothing was changed.
        self.assertIn(f"ORPHAN {self.orphan} of alice", self.run_admin("verify")[1])

    def test_repair_removes(self) -> None:
        """verify --repair --grace 0 removes the orphan blob and says so; the
        indexed archive (blob and row) stays; a second run finds nothing."""
        self.age(self.orphan, 1)
        status, out, err = self.run_admin("verify", "--repair", "--grace", "0")
        self.assertEqual(status, 0, err)
        self.assertIn("1 archives verified, 0 failed\n", out)
        self.assertIn(f"ORPHAN {self.orphan} of alice: blob without an index row, removed\n", out)
        self.assertIn("1 orphaned blobs removed\n", out)
        self.assertFalse(self.blobs.path(self.alice_id, self.orphan).exists())
        self.assert_kept_archive_intact()
        status, out, err = self.run_admin("verify", "--repair", "--grace", "0")
        self.assertEqual((status, err), (0, ""))
        self.assertNotIn("ORPHAN", out)
        self.assertNotIn("orphaned", out)
        self.assert_kept_archive_intact()

    def test_repair_respects_grace(self) -> None:
        """A blob younger than --grace (default an hour) may be an upload in
        flight on another node: --repair neither reports nor removes it."""
        self.age(self.orphan, 60)
        for argv in (["verify", "--repair"], ["verify", "--repair", "--grace", "120"]):
            status, out, err = self.run_admin(*argv)
            self.assertEqual((status, err), (0, ""), argv)
            self.assertNotIn("ORPHAN", out, argv)
            self.assertTrue(self.blobs.path(self.alice_id, self.orphan).exists(), argv)
        self.assertIn(f"ORPHAN {self.orphan} of alice", self.run_admin("verify", "--repair", "--grace", "30")[1])
        self.assertFalse(self.blobs.path(self.alice_id, self.orphan).exists())
        self.assert_kept_archive_intact()


def _prompts(*answers: str) -> Iterator[str]:
    yield from answers


class ReadPasswordTests(SyncTestCase):
    """The interactive path asks twice and insists on agreement."""

    def test_prompt_twice(self) -> None:
        """Matching entries are returned; stdin is not read."""
        answers = _prompts(PASSWORD, PASSWORD)
        prompts: list[str] = []

        def prompt(text: str) -> str:
            prompts.append(text)
            return next(answers)

        stdin = io.StringIO("unused\n")
        self.assertEqual(read_new_password("alice", from_stdin=False, stdin=stdin, prompt=prompt), PASSWORD)
        self.assertEqual(len(prompts), 2)
        self.assertIn("alice", prompts[0])
        self.assertEqual(stdin.read(), "unused\n")

    def test_mismatch(self) -> None:
        """Different entries are an error."""
        answers = _prompts(PASSWORD, PASSWORD + "x")
        self.assertRaises(
            AdminError,
            read_new_password,
            "alice",
            from_stdin=False,
            stdin=io.StringIO(),
            prompt=lambda text: next(answers),
        )

    def test_crlf(self) -> None:
        """A CRLF line ending is stripped as a whole, nothing else is."""
        stdin = io.StringIO(" pass word \r\n")
        self.assertEqual(read_new_password("a", from_stdin=True, stdin=stdin), " pass word ")


class EntryPointTests(SyncTestCase):
    """C{python -m securevault.admin.cli} works as the installed script does."""

    def test_subprocess(self) -> None:
        """init in a fresh cwd uses ./certs and ./vault-data; a user added from
        stdin is listed; errors exit 1 with one line on stderr."""
        cwd = self.make_dir()
        env = dict(os.environ, PYTHONPATH=str(REPOSITORY))

        def run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "securevault.admin.cli", *argv],
                cwd=cwd,
                env=env,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=120,
            )

        result = run("init")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("created certs/ca.crt", result.stdout)
        self.assertIn("created vault-keys/master.key", result.stdout)
        self.assertTrue((cwd / "certs" / "client.key").exists())
        result = run("user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(PASSWORD, result.stdout + result.stderr)
        self.assertFalse((cwd / "vault-data" / "users.json").exists())
        metadata = SqliteMetadataStore(cwd / "vault-data" / "vault.db")
        self.addCleanup(metadata.close)
        self.assertEqual([user.name for user in metadata.list_users()], ["alice"])
        rows = vault_rows(metadata, load_keyring(cwd / "vault-keys" / "master.key"))
        self.assertIsNotNone(UserStore(metadata, rows).verify("alice", PASSWORD))
        self.assertEqual(listed_names(run("user", "list").stdout), ["alice"])
        result = run("user", "remove", "nobody")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertTrue(result.stderr.startswith("securevault-admin: error: "))


class ArchiveListTests(SyncTestCase):
    """C{archive list} and the usage columns of C{user list}, through the
    entry point (C{python -m securevault.admin})."""

    def setUp(self) -> None:
        self.cwd = self.make_dir()
        self.data_dir = self.cwd / "vault-data"
        self.assertEqual(self.admin("init").returncode, 0)
        for name in ("alice", "bob", "carol"):
            added = self.admin("user", "add", name, "--password-stdin", stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        metadata = SqliteMetadataStore(self.data_dir / "vault.db")
        self.addCleanup(metadata.close)
        keyring = load_keyring(self.cwd / "vault-keys" / "master.key")
        users = UserStore(metadata, vault_rows(metadata, keyring))
        self.ids = {name: users.user_id(name) or "" for name in ("alice", "bob", "carol")}
        storage = SecureFileStorage(self.data_dir, keyring, metadata=metadata)
        self.report = storage.store(self.ids["alice"], "report.pdf", b"r" * 5000)
        self.notes = storage.store(self.ids["alice"], "notes\u202e.txt", b"n" * 10)
        self.photo = storage.store(self.ids["bob"], "photo.jpg", b"p" * 20000)
        self.left = storage.store(self.ids["carol"], "left behind.txt", b"c" * 100)
        self.stored = {
            name: metadata.usage(user_id) for name, user_id in self.ids.items()
        }  # bytes in the blob store: the encrypted size
        self.assertEqual(self.admin("user", "remove", "carol").returncode, 0)

    def admin(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "securevault.admin", *argv],
            cwd=self.cwd,
            env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def test_archive_list(self) -> None:
        """Every archive: id, owner (a removed user's by owner id), size,
        bytes stored, creation date and name (a bidi override escaped);
        --user narrows it to one user; an unknown user is an error."""
        result = self.admin("archive", "list")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "OWNER", "SIZE", "STORED", "CREATED", "NAME"])
        rows = {line.split()[0]: line for line in lines[1:-1]}
        self.assertEqual(set(rows), {self.report.id, self.notes.id, self.photo.id, self.left.id})
        self.assertRegex(rows[self.report.id], rf"^{self.report.id}\s+alice\s+5000\s+\d+\s+\S+Z\s+report\.pdf$")
        self.assertIn("notes\\u202e.txt", rows[self.notes.id])
        self.assertRegex(
            rows[self.photo.id], rf"^{self.photo.id}\s+bob\s+20000\s+{self.stored['bob']}\s+\S+Z\s+photo\.jpg$"
        )
        self.assertIn(f"(removed user {self.ids['carol']})", rows[self.left.id])
        self.assertIn("left behind.txt", rows[self.left.id])
        self.assertEqual(lines[-1], f"4 archives, {sum(self.stored.values())} bytes stored")

        mine = self.admin("archive", "list", "--user", "bob")
        self.assertEqual(mine.returncode, 0, mine.stderr)
        self.assertEqual([line.split()[0] for line in mine.stdout.splitlines()[1:-1]], [self.photo.id])
        nobody = self.admin("archive", "list", "--user", "nobody")
        self.assertEqual(
            (nobody.returncode, nobody.stderr), (1, "securevault-admin: error: There is no user 'nobody'.\n")
        )

    def test_user_list_usage(self) -> None:
        """user list shows each user's archives and stored bytes, and says
        that the quota is the daemon's, unknown here ('-')."""
        result = self.admin("user", "list")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        lines = result.stdout.splitlines()
        self.assertEqual([line.split() for line in lines[:-1]], [
            ["NAME", "ARCHIVES", "STORED", "QUOTA"],
            ["alice", "2", str(self.stored["alice"]), "-"],
            ["bob", "1", str(self.stored["bob"]), "-"],
        ])  # fmt: skip
        self.assertIn("2 users", lines[-1])
        self.assertIn("QUOTA is the daemon's --quota, which securevault-admin does not know ('-')", lines[-1])
