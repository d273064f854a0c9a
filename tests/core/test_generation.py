# -*- test-case-name: tests.core.test_generation -*-
"""Tests for L{securevault.core.generation}: the counters the workers of one
node share through a mapped file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from securevault.core.generation import (
    FILE_BYTES,
    GENERATION_FILE,
    SESSIONS_SLOT,
    SLOTS,
    SharedGeneration,
    listing_slot,
)
from tests.support.testcase import SyncTestCase


class SharedGenerationTests(SyncTestCase):
    def open(self, *, create: bool = True) -> SharedGeneration | None:
        generation = SharedGeneration.in_data_dir(self.data_dir, create=create)
        if generation is not None:
            self.addCleanup(generation.close)
        return generation

    def setUp(self) -> None:
        self.data_dir = self.make_dir()

    def test_created_private_and_zero(self) -> None:
        """The file is made on first open, readable by its owner only, one
        page long, every slot 0."""
        generation = self.open()
        assert generation is not None
        path = self.data_dir / GENERATION_FILE
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(path.stat().st_size, FILE_BYTES)
        self.assertEqual([generation.value(slot) for slot in range(SLOTS)], [0] * SLOTS)

    def test_bump_seen_by_another_mapping_without_io(self) -> None:
        """A bump through one mapping is read at once through another (two
        opens stand for two workers); slots move independently."""
        first, second = self.open(), self.open()
        assert first is not None and second is not None
        self.assertEqual(first.bump(), 1)
        self.assertEqual(second.value(), 1)
        self.assertEqual(second.bump(SESSIONS_SLOT), 2)
        self.assertEqual(first.value(), 2)
        slot = listing_slot("owner")
        self.assertEqual(first.value(slot), 0)
        second.bump(slot)
        self.assertEqual(first.value(slot), 1)
        self.assertEqual(first.value(), 2)

    def test_bump_from_another_process(self) -> None:
        """A separate process (the admin command) bumps; this process's
        mapping sees it."""
        generation = self.open()
        assert generation is not None
        code = (
            "import sys; from pathlib import Path; from securevault.core.generation import SharedGeneration;"
            "SharedGeneration.in_data_dir(Path(sys.argv[1]), create=False).bump()"
        )
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        subprocess.run([sys.executable, "-c", code, str(self.data_dir)], check=True, cwd=root, timeout=60)
        self.assertEqual(generation.value(), 1)

    def test_admin_does_not_create(self) -> None:
        """Without create (the admin command), a data directory no workers
        ran on has no file, and none is made."""
        self.assertIsNone(self.open(create=False))
        self.assertFalse((self.data_dir / GENERATION_FILE).exists())

    def test_listing_slots(self) -> None:
        """A listing's slot is never the sessions slot, is stable, and
        spreads owners."""
        slots = {listing_slot(f"owner-{n}") for n in range(200)}
        self.assertNotIn(SESSIONS_SLOT, slots)
        self.assertTrue(all(0 < slot < SLOTS for slot in slots))
        self.assertEqual(listing_slot("owner-1"), listing_slot("owner-1"))
        self.assertGreater(len(slots), 100)
