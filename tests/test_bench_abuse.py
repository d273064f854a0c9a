"""The abuse benchmark (bench/abuse.py) keeps working: one cheap row, end to
end, against a real daemon.  Its figures are not checked: they are what the
benchmark is for, and they change as the daemon is hardened."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.testcase import SyncTestCase

REPOSITORY = Path(__file__).resolve().parents[1]


class AbuseBenchSmokeTests(SyncTestCase):
    def test_owner_lockout_row(self) -> None:
        """C{python -m bench.abuse --only owner_lockout} starts a daemon, makes
        the five wrong guesses from the attacker's certificate and alice's
        login from her own, prints the row with the status alice got and a
        yes/NO verdict, exits 0, and leaves no temporary directory behind."""
        workdir = self.make_dir()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.abuse",
                "--only",
                "owner_lockout",
                "--seconds",
                "1",
                "--workdir",
                str(workdir),
            ],
            cwd=REPOSITORY,
            env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        rows = [line for line in done.stdout.splitlines() if line.startswith("| owner_lockout ")]
        self.assertEqual(len(rows), 1, done.stdout)
        self.assertRegex(
            rows[0], r"^\| owner_lockout +\| alice got (200|429 too_many_attempts) +\| 200 +\| +(yes|NO) \|$"
        )
        self.assertIn("the 5 wrong guesses from B:", done.stdout)
        self.assertNotIn("failed to run", done.stdout)
        self.assertEqual(list(workdir.iterdir()), [])

    def test_unknown_attack_is_a_usage_error(self) -> None:
        """An unknown name in C{--only} is refused before any daemon starts,
        with the list of attacks."""
        done = subprocess.run(
            [sys.executable, "-m", "bench.abuse", "--only", "owner_lockout,nope"],
            cwd=REPOSITORY,
            env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 2)
        self.assertTrue(re.search(r"unknown attack 'nope'; choose from session_flood, .*audit_kill9", done.stderr))
