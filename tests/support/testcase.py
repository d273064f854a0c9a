"""Test case bases whose temp paths do not depend on the working directory."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial import unittest


class _PathMixin:
    """trial chdirs into _trial_temp/ and pytest does not: return absolute paths."""

    def mktemp(self) -> str:
        return os.path.abspath(super().mktemp())  # type: ignore[misc]

    def make_dir(self) -> Path:
        """A fresh, empty, absolute directory for this test."""
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path


class SyncTestCase(_PathMixin, unittest.SynchronousTestCase):
    """For tests without a real reactor."""


class AsyncTestCase(_PathMixin, unittest.TestCase):
    """For tests with real sockets or processes."""
