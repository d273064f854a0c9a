"""What the documentation tells a newcomer to run is safe to run."""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

REPOSITORY = Path(__file__).resolve().parents[1]
# "pip install" and its options, then a requirement that names securevault:
# the name on the public package index belongs to an unrelated project.
BY_NAME = re.compile(r"pip3?\s+install\s+(?:-\S+\s+)*['\"]?securevault\b", re.IGNORECASE)
TEXT_SUFFIXES = {".md", ".py", ".cfg", ".ini", ".toml", ".service", ".txt", ".sh", ""}


def shipped_text_files() -> list[Path]:
    """Documentation, examples, CI scripts and code: every file a newcomer
    reads or runs (not .git, caches, the test run's scratch, or this file,
    which quotes what it looks for)."""
    skipped = {".git", "_trial_temp", ".tox", ".ci-venv", "__pycache__", ".venv", "build", "dist"}
    found = []
    for directory, subdirectories, files in os.walk(REPOSITORY):
        subdirectories[:] = [name for name in subdirectories if name not in skipped and not name.startswith("_trial")]
        for name in files:
            path = Path(directory, name)
            if path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
                found.append(path)
    return found


class InstallInstructionsTests(SynchronousTestCase):
    """Every install instruction installs from the checkout."""

    def test_no_install_by_name(self) -> None:
        """No document, example, script or error message says to
        C{pip install securevault...}: that would install an unrelated
        project from the public index (C{pip install .} in the checkout
        is the way)."""
        offenders = []
        for path in shipped_text_files():
            text = path.read_text(encoding="utf-8", errors="replace")
            for number, line in enumerate(text.splitlines(), 1):
                if BY_NAME.search(line):
                    offenders.append(f"{path.relative_to(REPOSITORY)}:{number}: {line.strip()}")
        self.assertEqual(offenders, [])

    def test_pattern(self) -> None:
        """The check finds the forms a document would use, and passes the
        checkout's own."""
        for bad in (
            "pip install 'securevault[postgresql,s3]'",
            "pip install securevault",
            "pip3 install -U securevault",
        ):
            self.assertIsNotNone(BY_NAME.search(bad), bad)
        for good in ("pip install .", "pip install '.[postgresql,s3]'", "pip install 'psycopg[binary]'"):
            self.assertIsNone(BY_NAME.search(good), good)

    def test_readme_says_why(self) -> None:
        """The README says to install from the checkout, and why."""
        readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
        self.assertIn("Always install from the checkout", readme)
        self.assertIn("unrelated project", readme)
