# -*- test-case-name: tests.server.test_pipeline -*-
"""The limits that keep one hostile client from exhausting the vault.

Every holder of a client certificate may flood, trickle or hold
connections.  These are the counters the pipeline consults, all used on the
reactor thread only: connections in all and per certificate, the bytes held
in memory for bodies, and the rate at which a body or a response moves.
"""

from __future__ import annotations

import resource
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

BUSY_RETRY_SECONDS = 1
# After a refusal sent with "Connection: close", the client has this long to
# take it before the connection is cut, whatever it is still sending.
CLOSE_GRACE_SECONDS = 2.0
# File descriptors kept for everything but client connections: the stores,
# the audit log, worker threads' files, the listening socket.
RESERVED_DESCRIPTORS = 128


# A request in progress weighs this many open connections in a worker's
# load (L{ConnectionLimits.load}): a worker serving a download is busier
# than one holding idle kept-alive connections, however many.
LOAD_PER_REQUEST = 1000


class ConnectionLimits:
    """Connections open in all and per client certificate, and requests in
    progress on them (the worker's load, for spreading connections)."""

    def __init__(self, max_total: int, max_per_certificate: int) -> None:
        self.max_total = max_total
        self.max_per_certificate = max_per_certificate
        self.total = 0
        self.requests = 0
        self._per_certificate: Counter[str] = Counter()
        # Told the new load at each change (a worker publishes it).
        self.on_load: Callable[[int], object] | None = None

    @property
    def load(self) -> int:
        """Open connections, plus L{LOAD_PER_REQUEST} per request in
        progress: the worker with the least takes the next connection."""
        return self.total + LOAD_PER_REQUEST * self.requests

    def _changed(self) -> None:
        if self.on_load is not None:
            self.on_load(self.load)

    def open(self) -> bool:
        """A connection arrived: counted; False when past the total cap."""
        self.total += 1
        self._changed()
        return self.total <= self.max_total

    def close(self) -> None:
        self.total -= 1
        self._changed()

    def request_started(self) -> None:
        """A request's head is in; it is in progress until L{request_ended}."""
        self.requests += 1
        self._changed()

    def request_ended(self) -> None:
        self.requests -= 1
        self._changed()

    def claim(self, fingerprint: str) -> bool:
        """Its certificate is known: counted; False when past its cap."""
        self._per_certificate[fingerprint] += 1
        return self._per_certificate[fingerprint] <= self.max_per_certificate

    def unclaim(self, fingerprint: str) -> None:
        self._per_certificate[fingerprint] -= 1
        if self._per_certificate[fingerprint] <= 0:
            del self._per_certificate[fingerprint]

    def of_certificate(self, fingerprint: str) -> int:
        return self._per_certificate[fingerprint]


class UploadsInFlight:
    """Raw uploads whose archive writer is open on this node, per owner
    (C{uploads_in_progress} of GET /usage): counted from the moment the
    session is found until the request ends, however it ends."""

    def __init__(self) -> None:
        self._per_owner: Counter[str] = Counter()

    def started(self, owner_id: str) -> None:
        self._per_owner[owner_id] += 1

    def ended(self, owner_id: str) -> None:
        self._per_owner[owner_id] -= 1
        if self._per_owner[owner_id] <= 0:
            del self._per_owner[owner_id]

    def of_owner(self, owner_id: str) -> int:
        return self._per_owner[owner_id]


class MemoryBudget:
    """Bytes held for request and response bodies, across all clients."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> bool:
        """Take C{size} bytes if they fit; False (nothing taken) if not."""
        if size <= 0:
            return True
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)


@dataclass
class _Bucket:
    received: int = 0
    sent: int = 0
    held: bool = False  # we stopped reading (back-pressure): the client is excused


@dataclass
class RateMeter:
    """Bytes moved in each quarter of a window, over the last window.

    A body or a response is judged only once it has lasted a whole window,
    and only on the bytes of that window: a client that starts fast and then
    trickles is caught within a window and a quarter."""

    window_seconds: float
    min_rate: int
    buckets: deque[_Bucket] = field(default_factory=lambda: deque([_Bucket()], maxlen=4))

    @property
    def tick_seconds(self) -> float:
        return self.window_seconds / 4

    @property
    def threshold(self) -> float:
        return self.min_rate * self.window_seconds

    def received(self, size: int) -> None:
        self.buckets[-1].received += size

    def sent(self, size: int) -> None:
        self.buckets[-1].sent += size

    def hold(self) -> None:
        self.buckets[-1].held = True

    def tick(self, still_held: bool) -> None:
        """A quarter window passed; C{still_held}: reading is paused by us."""
        self.buckets.append(_Bucket(held=still_held))

    def reset(self) -> None:
        self.buckets.clear()
        self.buckets.append(_Bucket())

    def full(self) -> bool:
        return len(self.buckets) == self.buckets.maxlen

    def body_too_slow(self) -> bool:
        """Over a whole window, fewer body bytes than the rate asks, and we
        never held the client back."""
        if not self.full() or any(bucket.held for bucket in self.buckets):
            return False
        return sum(bucket.received for bucket in self.buckets) < self.threshold

    def response_too_slow(self) -> bool:
        """Over a whole window, fewer response bytes than the rate asks."""
        return self.full() and sum(bucket.sent for bucket in self.buckets) < self.threshold


def usable_descriptors() -> int:
    """Raise the soft limit on open files to the hard one, and say how many
    client connections fit below it (a vault at its descriptor limit can
    accept nobody: the cap must bite first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return max(16, soft - RESERVED_DESCRIPTORS)
