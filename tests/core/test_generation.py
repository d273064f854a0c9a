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
    WorkerLoads,
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
        """The file is made on first open, readable by its owner only, two
        pages long (generations, worker loads), every slot 0."""
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


class WorkerLoadsTests(SyncTestCase):
    def setUp(self) -> None:
        data_dir = self.make_dir()
        self.mappings = []
        for _ in range(3):
            generation = SharedGeneration.in_data_dir(data_dir)
            assert generation is not None
            self.addCleanup(generation.close)
            self.mappings.append(generation)

    def test_each_worker_sees_the_others_counts(self) -> None:
        """A worker holding more connections than another is busier; one
        holding as few as the least loaded is not."""
        first, second, third = (WorkerLoads(self.mappings[n], n + 1, 3) for n in range(3))
        first.publish(2)
        second.publish(1)
        third.publish(1)
        self.assertEqual([third.of(n) for n in (1, 2, 3)], [2, 1, 1])
        self.assertTrue(first.busier(2))
        self.assertFalse(second.busier(1))
        self.assertFalse(third.busier(1))
        self.assertTrue(third.busier(2))

    def test_a_new_worker_starts_at_zero(self) -> None:
        """A worker that replaces a dead one publishes 0 at once, not its
        predecessor's count."""
        WorkerLoads(self.mappings[0], 2, 2).publish(7)
        successor = WorkerLoads(self.mappings[1], 2, 2)
        self.assertEqual(successor.of(2), 0)

    def test_loads_leave_the_generations_alone(self) -> None:
        """The loads page does not overlap any generation slot."""
        loads = WorkerLoads(self.mappings[0], 1, 2)
        loads.publish(5)
        self.assertEqual([self.mappings[1].value(slot) for slot in range(SLOTS)], [0] * SLOTS)

    def test_numbers_checked(self) -> None:
        """Worker numbers run from 1 to the count."""
        for number, workers in ((0, 2), (3, 2), (1, 10_000)):
            self.assertRaises(ValueError, WorkerLoads, self.mappings[0], number, workers)
