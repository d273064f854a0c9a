# -*- test-case-name: tests.test_sealed_daemon -*-
"""A real daemon on a sealed master key: C{securevault-admin init --sealed},
C{twistd securevault --master-key-passphrase file:PATH}, and key rotation
and verification by C{securevault-admin} while the daemon runs."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from securevault.admin.pki import load_cert
from securevault.core.keys import SEALED_FORMAT
from tests.server.test_twistd import Daemon, reactor
from tests.support.daemon import run_admin, twistd_argv
from tests.support.testcase import AsyncTestCase
from tests.support.tlsclient import PASSWORD, Credential, VaultClient, client_for

PASSPHRASE = "a long passphrase"
_TEMPLATE: list[Path] = []


def admin_in(base: Path, *argv: str, stdin: str | None = None) -> Any:
    """Run C{securevault-admin --data-dir <base>/vault-data ARGV} in C{base},
    with C{stdin} plus a newline as standard input."""
    return run_admin(
        "--data-dir", str(base / "vault-data"), *argv, stdin=None if stdin is None else stdin + "\n", cwd=base
    )


def template() -> Path:
    """A vault made once per test run by C{securevault-admin init --sealed
    --passphrase-stdin} and C{user add alice} (certificates in C{certs/},
    data in C{vault-data/}); each test works on a copy.  The PKI and the
    scrypt derivation take most of a second, which would otherwise be paid
    by every test."""
    if not _TEMPLATE:
        base = Path(tempfile.mkdtemp(prefix="securevault-sealed-template-"))
        atexit.register(shutil.rmtree, base, True)
        result = admin_in(
            base, "init", "--certs-dir", str(base / "certs"), "--sealed", "--passphrase-stdin", stdin=PASSPHRASE
        )
        if result.returncode != 0:
            raise AssertionError(f"init --sealed failed: {result.stderr}")
        result = admin_in(
            base, "user", "add", "alice", "--passphrase-stdin", "--password-stdin", stdin=PASSPHRASE + "\n" + PASSWORD
        )
        if result.returncode != 0:
            raise AssertionError(f"user add failed: {result.stderr}")
        _TEMPLATE.append(base)
    return _TEMPLATE[0]


class SealedDaemonTests(AsyncTestCase):
    """The daemon unseals its master key from a passphrase source, refuses to
    start without the right passphrase, and follows a rotation."""

    timeout = 60

    def setUp(self) -> None:
        self.base = self.make_dir()
        shutil.copytree(template(), self.base, dirs_exist_ok=True)
        self.certs = self.base / "certs"
        self.data = self.base / "vault-data"
        self.master_key = self.base / "vault-keys" / "master.key"

    def admin(self, *argv: str, stdin: str | None = None) -> Any:
        """Run C{securevault-admin --data-dir <data> ARGV}, C{stdin} + newline."""
        return admin_in(self.base, *argv, stdin=stdin)

    def passphrase_file(self, passphrase: str = PASSPHRASE) -> Path:
        """A 0600 file holding C{passphrase} and a newline."""
        path = self.base / "passphrase"
        path.write_text(passphrase + "\n", encoding="utf-8")
        path.chmod(0o600)
        return path

    def start(self, *extra: str) -> Daemon:
        """Start twistd on this test's data directory and certificates."""
        daemon = Daemon(twistd_argv(self.certs, self.data, *extra), self.base)
        self.addCleanup(daemon.stop)
        return daemon

    def client(self, port: int) -> VaultClient:
        credential = Credential.from_files(self.certs / "client.crt", self.certs / "client.key")
        return client_for(reactor, port, load_cert(self.certs / "ca.crt"), credential, cleanup=self.addCleanup)

    def assert_sealed(self) -> None:
        """The master key file is a sealed document (no keys in the clear)."""
        document = json.loads(self.master_key.read_bytes())
        self.assertEqual(document["format"], SEALED_FORMAT)
        self.assertNotIn("keys", document)

    def test_init_sealed(self) -> None:
        """C{securevault-admin init --sealed --passphrase-stdin} writes a 0600
        sealed master key that no plain reader can use."""
        self.assert_sealed()
        self.assertEqual(self.master_key.stat().st_mode & 0o777, 0o600)
        self.assertEqual(self.data.stat().st_mode & 0o777, 0o700)
        self.assertEqual(self.master_key.parent.stat().st_mode & 0o777, 0o700)

    def test_admin_without_passphrase(self) -> None:
        """C{securevault-admin verify} on a sealed key without
        C{--passphrase-stdin} and with no terminal fails with one line
        pointing at C{--passphrase-stdin}, not a traceback."""
        result = self.admin("verify")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("--passphrase-stdin", result.stderr)

    def test_init_sealed_short_passphrase(self) -> None:
        """A passphrase under 8 characters is refused with one line and no key
        file is written."""
        other = self.base / "other-data"
        result = run_admin(
            "--data-dir", str(other), "init", "--certs-dir", str(self.certs), "--sealed", "--passphrase-stdin",
            stdin="short\n", cwd=self.base,
        )  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("at least 8 characters", result.stderr)
        self.assertFalse((self.base / "other-keys" / "master.key").exists())
        self.assertFalse((other / "master.key").exists())

    @inlineCallbacks
    def test_serves_with_passphrase_file(self) -> Generator[Deferred[Any], Any, None]:
        """Started with C{--master-key-passphrase file:PATH}, the daemon
        listens, serves login, JSON upload and raw download byte-exact, never
        logs the passphrase, and stops cleanly on SIGTERM."""
        daemon = self.start("--master-key-passphrase", f"file:{self.passphrase_file()}")
        port = yield daemon.wait_listening()
        client = self.client(port)
        yield client.login("alice")
        content = os.urandom(70_000)
        archive_id = yield client.upload_json("sealed.bin", content)
        body = yield client.download_raw(archive_id)
        self.assertTrue(body == content, "downloaded bytes differ")
        yield client.close()
        daemon.process.send_signal(signal.SIGTERM)
        code = yield daemon.wait_exited()
        output = daemon.output()
        self.assertEqual(code, -signal.SIGTERM, output)
        self.assertEqual(daemon.stderr, [], output)
        self.assertNotIn(PASSPHRASE, output)
        self.assert_sealed()

    @inlineCallbacks
    def test_no_passphrase_source(self) -> Generator[Deferred[Any], Any, None]:
        """Without C{--master-key-passphrase} and with no terminal on stdin,
        the daemon exits non-zero with one stderr line naming
        C{--master-key-passphrase}, no traceback, and never listens."""
        daemon = self.start()
        code = yield daemon.wait_exited()
        output = daemon.output()
        self.assertNotEqual(code, 0, output)
        self.assertEqual(len(daemon.stderr), 1, output)
        self.assertIn("--master-key-passphrase", daemon.stderr[0])
        self.assertNotIn("Traceback", output)
        yield self.assertFailure(daemon.listening, AssertionError)

    @inlineCallbacks
    def test_wrong_passphrase(self) -> Generator[Deferred[Any], Any, None]:
        """A passphrase file with the wrong passphrase ends the daemon with a
        non-zero status and one line saying "wrong passphrase"."""
        daemon = self.start("--master-key-passphrase", f"file:{self.passphrase_file('not the passphrase')}")
        code = yield daemon.wait_exited()
        output = daemon.output()
        self.assertNotEqual(code, 0, output)
        self.assertEqual(len(daemon.stderr), 1, output)
        self.assertIn("wrong passphrase", daemon.stderr[0])
        self.assertNotIn("Traceback", output)
        self.assertNotIn("not the passphrase", output)
        yield self.assertFailure(daemon.listening, AssertionError)

    @inlineCallbacks
    def test_empty_stdin(self) -> Generator[Deferred[Any], Any, None]:
        """C{--master-key-passphrase stdin} with nothing on standard input
        (the harness gives /dev/null) ends the daemon with one line saying no
        passphrase was read."""
        daemon = self.start("--master-key-passphrase", "stdin")
        code = yield daemon.wait_exited()
        output = daemon.output()
        self.assertNotEqual(code, 0, output)
        self.assertEqual(len(daemon.stderr), 1, output)
        self.assertIn("no passphrase was read from standard input", daemon.stderr[0])
        self.assertNotIn("Traceback", output)
        yield self.assertFailure(daemon.listening, AssertionError)

    def test_serves_with_passphrase_stdin(self) -> None:
        """C{--master-key-passphrase stdin} with the passphrase on standard
        input unseals the key."""

    @inlineCallbacks
    def test_rotate_while_running(self) -> Generator[Deferred[Any], Any, None]:
        """C{securevault-admin key rotate --passphrase-stdin} while the daemon
        runs: an archive uploaded before still downloads byte-exact, a new
        upload works, the key file stays sealed, and C{securevault-admin
        verify --passphrase-stdin} passes every archive."""
        daemon = self.start("--master-key-passphrase", f"file:{self.passphrase_file()}")
        port = yield daemon.wait_listening()
        client = self.client(port)
        yield client.login("alice")
        before = os.urandom(120_000)
        before_id = yield client.upload_json("before.bin", before)
        old_key_file = self.master_key.read_bytes()

        result = self.admin("key", "rotate", "--passphrase-stdin", stdin=PASSPHRASE)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("1 of 1 data keys rewrapped", result.stdout)
        self.assertNotEqual(self.master_key.read_bytes(), old_key_file)
        self.assert_sealed()

        body = yield client.download_raw(before_id)
        self.assertTrue(body == before, "archive stored before the rotation differs")
        after = os.urandom(30_000)
        after_id = yield client.upload_json("after.bin", after)
        body = yield client.download_raw(after_id)
        self.assertTrue(body == after, "archive stored after the rotation differs")
        yield client.close()

        result = self.admin("verify", "--passphrase-stdin", stdin=PASSPHRASE)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("2 archives verified, 0 failed", result.stdout)
        result = self.admin("verify", "--passphrase-stdin", stdin="not the passphrase")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("wrong passphrase", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIsNone(daemon.process.poll(), daemon.output())
