"""Test case bases whose temp paths do not depend on the working directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial import unittest


class _PathMixin:
    """trial chdirs into _trial_temp/ and pytest does not: temp paths live in
    the system temp directory and are removed after the test."""

    def mktemp(self) -> str:
        base = tempfile.mkdtemp(prefix="securevault-test-")
        self.addCleanup(shutil.rmtree, base, True)  # type: ignore[attr-defined]
        return os.path.join(base, "t")

    def make_dir(self) -> Path:
        """A fresh, empty, absolute directory for this test."""
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path


class SyncTestCase(_PathMixin, unittest.SynchronousTestCase):
    """For tests without a real reactor."""


class AsyncTestCase(_PathMixin, unittest.TestCase):
    """For tests with real sockets or processes."""
