"""The daemon's checks before it opens its data (L{securevault.server.startup});
the real-daemon cases are in L{tests.server.test_twistd}."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from securevault.server.config import VaultConfig
from securevault.server.startup import LOCK_NAME, check_writable, claim_data_dir, lock_data_dir
from tests.support.testcase import SyncTestCase


def make_unwritable(test: SynchronousTestCase, directory: Path) -> None:
    """Make C{directory} unwritable for this process until the test ends:
    a read-only tmpfs mounted on it when running as root (root ignores
    permission bits), else mode 0500."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o500)
        test.addCleanup(directory.chmod, 0o700)
        return
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k,mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SkipTest(f"cannot mount a read-only tmpfs here: {result.stderr.strip()}")
    test.addCleanup(subprocess.run, ["umount", "-l", str(directory)], check=False)


class DataDirLockTests(SyncTestCase):
    """One daemon per data directory."""

    def test_second_lock_names_the_first_pid(self) -> None:
        """While one lock on a data directory is held, taking another ends
        with one line naming the directory and the holder's pid; once
        released, the directory can be locked again."""
        data_dir = self.make_dir() / "vault-data"
        first = lock_data_dir(data_dir)
        self.addCleanup(first.release)
        self.assertEqual((data_dir / LOCK_NAME).read_text(), f"{os.getpid()}\n")
        error = self.assertRaises(SystemExit, lock_data_dir, data_dir)
        self.assertEqual(
            error.code, f"securevault: error: another securevault daemon is using {data_dir} (pid {os.getpid()})"
        )
        first.release()
        second = lock_data_dir(data_dir)
        second.release()


class WritableTests(SyncTestCase):
    """Every directory the daemon will write is checked at start."""

    def test_unwritable_directory(self) -> None:
        """A directory that cannot take a new file is one line naming it and
        why; one that does not exist yet is judged by where it would be
        created; a writable one leaves nothing behind."""
        base = self.make_dir()
        check_writable(base, "the test directory")
        check_writable(base / "not" / "yet", "the test directory")
        self.assertEqual(list(base.iterdir()), [])
        locked = base / "locked"
        make_unwritable(self, locked)
        error = self.assertRaises(SystemExit, check_writable, locked, "the blob directory")
        self.assertRegex(str(error.code), rf"^securevault: error: the blob directory {locked} is not writable: ")
        error = self.assertRaises(SystemExit, check_writable, locked / "sub", "the blob directory")
        self.assertIn(f"{locked / 'sub'} (to be created in {locked}) is not writable", str(error.code))

    def test_claim_checks_each_directory(self) -> None:
        """claim_data_dir checks the blob directory, the audit log's
        directory and, when the master key is to be created, the key's
        directory: each unwritable one is named."""
        base = self.make_dir()
        cases = {
            "the blob directory": VaultConfig(data_dir=base / "d1", blobs_url=f"file://{base / 'ro'}"),
            "the directory of the audit log": VaultConfig(data_dir=base / "d2", audit_log=base / "ro" / "audit.jsonl"),
            "the directory of the new master key": VaultConfig(
                data_dir=base / "d3", master_key=base / "ro" / "master.key"
            ),
        }
        make_unwritable(self, base / "ro")
        for what, config in cases.items():
            error = self.assertRaises(SystemExit, claim_data_dir, config)
            self.assertIn(f"{what} {base / 'ro'}", str(error.code))
        config = VaultConfig(data_dir=base / "d4", audit_log=base / "d4" / "audit.jsonl", master_key=base / "d4" / "k")
        claim_data_dir(config).release()
