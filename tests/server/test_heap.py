"""Tests for L{securevault.server.heap}."""

from __future__ import annotations

import platform

from securevault.server.heap import trim_heap
from tests.support.testcase import SyncTestCase


def resident_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class TrimHeapTests(SyncTestCase):
    def test_freed_memory_leaves_the_process(self) -> None:
        """On glibc, 85 MB freed between blocks still in use stays resident
        until the heap is trimmed; then much of it goes back (over 20 MB), and the
        blocks in use are intact."""
        if platform.libc_ver()[0] != "glibc":
            self.skipTest("malloc_trim is glibc's")
        blocks = []
        for number in range(1300):
            blocks.append(bytearray(64 * 1024))  # malloc'ed, below glibc's mmap threshold
            blocks.append(bytearray(bytes([number % 256]) * 600))  # kept: pins the heap between them
        kept = blocks[1::2]
        del blocks  # frees the 4000-byte blocks, in the middle of the heap
        before = resident_kib()
        self.assertTrue(trim_heap())
        after = resident_kib()
        self.assertGreater(before - after, 20_000, (before, after))  # KiB; untrimmed: 0
        self.assertTrue(all(block[0] == number % 256 for number, block in enumerate(kept)))
