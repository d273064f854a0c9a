# -*- test-case-name: tests.core.test_generation -*-
"""A shared generation: counters every process of one node reads without I/O.

The workers of C{--workers N} keep sessions and listings in memory; each
such copy is trusted only while the generation it was built at is still
current.  Any process that changes shared state under the others' copies
(a logout, a revoke, an upload, a delete) bumps the generation after the
store change and before it answers, so the next request on any worker
sees a new value and asks the store.

The counters live in a small file of the data directory, mapped into
every process: a read is a load from shared memory, a bump an increment
under C{flock}.  Slot 0 is for sessions; the other slots of the first page
are for listings, by a hash of the owner, so that one user's upload does
not drop every user's cached listing.

The second page holds each worker's load (its open connections and
requests in progress, L{WorkerLoads}), so that a worker can leave a new
connection to a less busy one.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from pathlib import Path

GENERATION_FILE = "shared-generation"
SLOT_BYTES = 8
SLOTS = 512  # one page of generations
LOAD_SLOTS = 512  # and one of worker loads (L{WorkerLoads})
FILE_BYTES = SLOT_BYTES * (SLOTS + LOAD_SLOTS)
SESSIONS_SLOT = 0
_WORD = struct.Struct("=Q")  # native order: the file never leaves this machine


class SharedGeneration:
    """Counters in a file mapped by every process of the node.

    C{value} and C{bump} take a slot (0 for sessions, L{listing_slot} for
    an owner's listing).  Values only grow, so a copy built at value C{v}
    is current exactly while the slot still reads C{v}.
    """

    def __init__(self, path: Path, *, create: bool = True) -> None:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < FILE_BYTES:
                    os.ftruncate(fd, FILE_BYTES)  # zeros: every slot starts at 0
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, FILE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.path = path

    @classmethod
    def in_data_dir(cls, data_dir: Path, *, create: bool = True) -> SharedGeneration | None:
        """The node's generation file; with C{create=False} (the admin
        command) None when no daemon of workers has made it."""
        path = Path(data_dir) / GENERATION_FILE
        if not create and not path.exists():
            return None
        try:
            return cls(path, create=create)
        except FileNotFoundError:
            if create:
                raise
            return None

    def value(self, slot: int = SESSIONS_SLOT) -> int:
        """The slot's current value: one aligned 8-byte load, no system call."""
        return int(_WORD.unpack_from(self._map, slot * SLOT_BYTES)[0])

    def bump(self, slot: int = SESSIONS_SLOT) -> int:
        """Make every copy built at the slot's current value stale; returns
        the new value."""
        offset = slot * SLOT_BYTES
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            new = (int(_WORD.unpack_from(self._map, offset)[0]) + 1) & 0xFFFFFFFFFFFFFFFF
            _WORD.pack_into(self._map, offset, new)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return new

    def store(self, slot: int, value: int) -> None:
        """Set a slot that only this process writes: one aligned 8-byte
        store, no lock (L{WorkerLoads})."""
        _WORD.pack_into(self._map, slot * SLOT_BYTES, value & 0xFFFFFFFFFFFFFFFF)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class WorkerLoads:
    """The load of each worker of C{--workers N} (open connections, and
    requests in progress weighing more: L{ConnectionLimits.load}), as the
    workers publish it on the generation file's second page.

    All workers wait on one listening socket, and whichever wakes first
    takes the connection: a burst of kept-alive connections could all land
    on one worker while the other idled (measured: 4 of 4).  A worker that
    holds more connections than another asks to be passed over
    (L{busier}); the accept loop then leaves the connection a moment to the
    others (L{securevault.server.twisted_private.accept_balanced}).  A
    worker that died leaves its last count until its successor publishes
    0, which only delays an accept, never refuses one.
    """

    def __init__(self, generation: SharedGeneration, number: int, workers: int) -> None:
        if not 1 <= number <= workers <= LOAD_SLOTS:
            raise ValueError(f"worker {number} of {workers}")
        self._generation = generation
        self._number = number
        self._others = [other for other in range(1, workers + 1) if other != number]
        self.publish(0)

    def publish(self, load: int) -> None:
        """This worker's load is now C{load}."""
        self._generation.store(SLOTS + self._number - 1, load)

    def of(self, number: int) -> int:
        return self._generation.value(SLOTS + number - 1)

    def busier(self, load: int) -> bool:
        """Whether some other worker's load is below C{load}."""
        return any(self.of(other) < load for other in self._others)


def listing_slot(owner_id: str) -> int:
    """The slot of C{owner_id}'s listing (never the sessions slot)."""
    digest = hashlib.blake2b(owner_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (SLOTS - 1)
