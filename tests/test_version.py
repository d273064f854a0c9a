"""Every entry point says which securevault it is, and the project says
under which terms it is shared and what changed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from securevault import __version__
from tests.support.daemon import TWISTD, WAIT_SECONDS, child_environment
from tests.support.testcase import SyncTestCase

REPOSITORY = Path(__file__).resolve().parents[1]


class VersionTests(SyncTestCase):
    """C{--version} prints C{securevault X.Y.Z} and exits 0."""

    def run_version(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, "--version"],
            cwd=self.make_dir(),
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )

    def assert_version(self, result: subprocess.CompletedProcess[str]) -> None:
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, f"securevault {__version__}\n", ""))

    def test_client(self) -> None:
        """C{securevault-client --version} (as C{python -m securevault.client})."""
        self.assert_version(self.run_version(sys.executable, "-m", "securevault.client"))

    def test_admin(self) -> None:
        """C{securevault-admin --version} (as C{python -m securevault.admin})."""
        self.assert_version(self.run_version(sys.executable, "-m", "securevault.admin"))

    def test_twistd(self) -> None:
        """C{twistd securevault --version} prints securevault's version, not
        Twisted's."""
        self.assert_version(self.run_version(*TWISTD, "securevault"))


class ProjectFilesTests(SyncTestCase):
    """LICENSE and CHANGELOG.md are there and say what pyproject.toml says."""

    def test_license(self) -> None:
        """LICENSE is the MIT licence that pyproject.toml declares."""
        text = (REPOSITORY / "LICENSE").read_text(encoding="utf-8")
        self.assertTrue(text.startswith("MIT License\n"), text[:40])
        self.assertIn("Copyright (c)", text)
        self.assertIn("the securevault authors", text)
        self.assertIn('license = { text = "MIT" }', (REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))

    def test_changelog(self) -> None:
        """CHANGELOG.md follows Keep a Changelog: an Unreleased section first,
        grouped under its headings."""
        text = (REPOSITORY / "CHANGELOG.md").read_text(encoding="utf-8")
        releases = re.findall(r"(?m)^## \[([^\]]+)\]", text)
        self.assertEqual(releases[0], "Unreleased")
        unreleased = text.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
        groups = re.findall(r"(?m)^### (\w+)$", unreleased)
        self.assertTrue(groups)
        self.assertLessEqual(set(groups), {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"})
