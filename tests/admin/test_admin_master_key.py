# -*- test-case-name: tests.admin.test_admin_master_key -*-
"""C{securevault-admin} and the master key bound to its vault, run as the
operator runs it (a subprocess): where C{init} puts the key, and how the
commands that use it refuse a wrong or missing key file."""

from __future__ import annotations

import stat
import subprocess

from securevault.core.keybinding import KEY_CHECK_STATE, keyring_opens
from securevault.core.keys import KeyringFile, load_keyring
from securevault.stores.metadata import SqliteMetadataStore
from tests.support.daemon import run_admin
from tests.support.testcase import SyncTestCase
from tests.support.tlsclient import PASSWORD

ERROR = "securevault-admin: error: "


class AdminMasterKeyTests(SyncTestCase):
    """A scratch directory C{base} with C{vault-data}, C{vault-keys}, C{certs}."""

    def setUp(self) -> None:
        self.base = self.make_dir()
        self.data = self.base / "vault-data"
        self.key = self.base / "vault-keys" / "master.key"

    def admin(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """C{securevault-admin --data-dir vault-data ARGV} in C{base}."""
        return run_admin("--data-dir", str(self.data), *argv, stdin=stdin, cwd=self.base)

    def make_vault(self) -> None:
        """init and a user alice."""
        result = self.admin("init", "--certs-dir", str(self.base / "certs"))
        self.assertEqual(result.returncode, 0, result.stderr)
        result = self.admin("user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(result.returncode, 0, result.stderr)

    def assert_error(self, result: subprocess.CompletedProcess[str], reason: str) -> None:
        """Exit status 1 and exactly one stderr line: the error with C{reason}."""
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith(ERROR), result.stderr)
        self.assertIn(reason, result.stderr)

    def test_init_puts_the_key_outside_the_data(self) -> None:
        """init on a new vault creates the key at vault-keys/master.key
        (0600, in a 0700 directory), none inside the data directory, stores
        the vault's key check, says where the key is and that it must be
        backed up apart from the data, and prints a daemon command line
        that finds it without --master-key."""
        result = run_admin("init", cwd=self.base)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("created vault-keys/master.key\n", result.stdout)
        self.assertIn(
            "The master key is vault-keys/master.key. Back it up, apart from the data directory", result.stdout
        )
        self.assertIn("  twistd -n securevault\n", result.stdout)
        self.assertEqual(stat.S_IMODE(self.key.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.key.parent.stat().st_mode), 0o700)
        self.assertFalse((self.data / "master.key").exists())
        metadata = SqliteMetadataStore(self.data / "vault.db")
        self.addCleanup(metadata.close)
        check = metadata.get_state(KEY_CHECK_STATE)
        assert check is not None
        self.assertTrue(keyring_opens(load_keyring(self.key), check))

    def test_wrong_key_refused(self) -> None:
        """verify, export and key rotate given another key file exit 1 with one
        line: that key does not open this vault.  The file is unchanged."""
        self.make_vault()
        other = self.base / "other.key"
        KeyringFile(other).create()
        before = other.read_bytes()
        for argv in (("verify",), ("export", "0" * 32, "--out", "x.zip"), ("key", "rotate")):
            result = self.admin(*argv, "--master-key", str(other))
            self.assert_error(result, f"the master key at {other} does not open this vault")
        self.assertEqual(other.read_bytes(), before)
        self.assertFalse((self.base / "x.zip").exists())

    def test_missing_key_on_a_vault_with_data(self) -> None:
        """With its key file gone, a vault with a user is refused by verify,
        key rotate and init alike: one line naming the path and saying the
        key is missing, never advice to run init; no key is created."""
        self.make_vault()
        self.key.unlink()
        for argv in (("verify",), ("key", "rotate"), ("init", "--certs-dir", str(self.base / "certs"))):
            result = self.admin(*argv)
            self.assert_error(result, f"the master key file {self.key} is missing")
            self.assertNotIn("run 'securevault-admin init'", result.stderr)
            self.assertFalse(self.key.exists(), argv)
        elsewhere = self.base / "typo" / "master.key"
        self.assert_error(self.admin("verify", "--master-key", str(elsewhere)), f"{elsewhere} is missing")
        self.assertFalse(elsewhere.parent.exists())

    def test_advice_for_a_key_elsewhere(self) -> None:
        """On an empty vault with no key yet, a command given --master-key
        elsewhere says how to create the key there; following that advice
        creates it there (not at the default place), and the command then
        works."""
        self.data.mkdir()
        elsewhere = self.base / "etc" / "master.key"
        result = self.admin("verify", "--master-key", str(elsewhere))
        advice = f"securevault-admin --data-dir {self.data} init --master-key {elsewhere}"
        self.assert_error(result, f"create its key with '{advice}'")
        init = run_admin(*advice.split()[1:], "--certs-dir", str(self.base / "certs"), cwd=self.base)
        self.assertEqual(init.returncode, 0, init.stderr)
        self.assertIn(f"--master-key {elsewhere}", init.stdout)
        self.assertTrue(elsewhere.exists())
        self.assertFalse(self.key.exists())
        verified = self.admin("verify", "--master-key", str(elsewhere))
        self.assertEqual(verified.returncode, 0, verified.stderr)
        self.assertIn("0 archives verified, 0 failed", verified.stdout)
