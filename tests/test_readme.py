"""The README's curl lines work as printed against a real daemon."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from tests.server.test_twistd import Daemon
from tests.support.daemon import TWISTD, child_environment, run_admin
from tests.support.testcase import AsyncTestCase

REPOSITORY = Path(__file__).resolve().parents[1]
README_PASSWORD = "correct horse battery"


def curl_block(readme: str) -> str:
    """The shell block under "Use it with curl"."""
    section = readme.split("## Use it with curl", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None, "no sh block under 'Use it with curl'"
    return match.group(1)


class ReadmeTests(AsyncTestCase):
    """A new user's path through the README."""

    timeout = 90

    def setUp(self) -> None:
        if shutil.which("curl") is None:
            self.skipTest("curl is not installed")

    @inlineCallbacks
    def test_curl_lines(self) -> Generator[Deferred[Any], Any, None]:
        """With the defaults of `securevault-admin init` and the README's
        user, every curl line of the README runs without error and does
        what its comment says: health, login, both uploads, list, both
        downloads, a range, usage, delete, logout."""
        readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
        self.assertIn(f"printf '{README_PASSWORD}\\n' | securevault-admin user add alice --password-stdin", readme)
        base = self.make_dir()
        shutil.copy(REPOSITORY / "README.md", base / "README.md")
        self.assertEqual(run_admin("init", cwd=base).returncode, 0)
        added = run_admin("user", "add", "alice", "--password-stdin", stdin=README_PASSWORD + "\n", cwd=base)
        self.assertEqual(added.returncode, 0, added.stderr)
        daemon = Daemon([*TWISTD, "-n", "--pidfile=", "securevault", "--port", "0", "--interface", "127.0.0.1"], base)
        self.addCleanup(daemon.stop)
        port = yield daemon.wait_listening()
        script = curl_block(readme).replace("https://localhost:5000", f"https://localhost:{port}")
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=base,
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        out = result.stdout
        self.assertIn('{"status":"ok"', out)
        self.assertIn('"filename":"hello.txt"', out)
        self.assertIn('"filename":"README.md"', out)
        self.assertIn('"content":"aGVsbG8sIHZhdWx0Cg=="', out)
        self.assertNotIn('"error"', out)
        self.assertEqual((base / "downloaded.bin").read_bytes(), (base / "README.md").read_bytes())
        self.assertEqual((base / "first-bytes.bin").read_bytes(), (base / "README.md").read_bytes()[:5])
        self.assertRegex(out, r'\{"archives":2,"stored_bytes":\d+,"quota_bytes":null,"uploads_in_progress":0\}')
