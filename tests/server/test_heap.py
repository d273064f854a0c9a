"""Tests for L{securevault.server.heap}."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

from tests.support.testcase import SyncTestCase

REPOSITORY = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: the test runner's own heap, shaped by every
# test before, decides where new blocks land and how much a trim finds.
FRAGMENT_AND_TRIM = """
import json, sys
from securevault.server.heap import trim_heap

def resident_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

blocks = []
for number in range(1300):
    blocks.append(bytearray(64 * 1024))  # malloc'ed, below glibc's mmap threshold
    blocks.append(bytearray(bytes([number % 256]) * 600))  # kept: pins the heap between them
kept = blocks[1::2]
del blocks  # frees the 64 KiB blocks, in the middle of the heap
before = resident_kib()
trimmed = trim_heap() if sys.argv[1] == "trim" else False
after = resident_kib()
intact = all(block[0] == number % 256 for number, block in enumerate(kept))
print(json.dumps({"before": before, "after": after, "trimmed": trimmed, "intact": intact}))
"""


def fragment(action: str) -> dict[str, int | bool]:
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENT_AND_TRIM, action],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, int | bool] = json.loads(done.stdout)
    return result


class TrimHeapTests(SyncTestCase):
    def test_freed_memory_leaves_the_process(self) -> None:
        """On glibc, 85 MB freed between blocks still in use stays resident
        until the heap is trimmed; then most of it goes back (over 40 MB),
        and the blocks in use are intact.  Without the trim, none goes."""
        if platform.libc_ver()[0] != "glibc":
            self.skipTest("malloc_trim is glibc's")
        trimmed = fragment("trim")
        self.assertIs(trimmed["trimmed"], True)
        self.assertTrue(trimmed["intact"])
        self.assertGreater(int(trimmed["before"]) - int(trimmed["after"]), 40_000, trimmed)
        untrimmed = fragment("none")
        self.assertLess(int(untrimmed["before"]) - int(untrimmed["after"]), 5_000, untrimmed)
