"""Tests for L{securevault.server.streaming.DownloadProducer}: a download
reads larger blocks only once its client has taken a few MiB."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred

from securevault.core.archive import BULK_READ_BLOCK_BYTES, READ_BLOCK_BYTES
from securevault.core.keys import generate_keyring
from securevault.server.pools import run_inline
from securevault.server.streaming import BULK_AFTER_BYTES, DownloadProducer
from securevault.storage import SecureFileStorage
from tests.support.testcase import SyncTestCase

MiB = 1 << 20


class _Request:
    """What the producer uses of a request; C{pause_after} writes, the
    consumer stops taking data (a client that stalls)."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.writes: list[bytes] = []
        self.finished = False
        self.producer: Any = None
        self.transport = None
        self._pause_after = pause_after

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        return Deferred()

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        if self._pause_after is not None and len(self.writes) >= self._pause_after:
            self.producer.pauseProducing()

    def finish(self) -> None:
        self.finished = True


class DownloadBlockTests(SyncTestCase):
    def setUp(self) -> None:
        self.storage = SecureFileStorage(self.make_dir(), generate_keyring())
        self.data = os.urandom(BULK_AFTER_BYTES + 6 * MiB)  # random: stored, not deflated
        self.info = self.storage.store("alice", "big.bin", self.data)

    def stream(self, request: _Request) -> list[int]:
        """Stream the archive into C{request}; the sizes of the blocks read."""
        reader = self.storage.open("alice", self.info.id)
        sizes: list[int] = []
        read = reader.read

        def counted(size: int = BULK_READ_BLOCK_BYTES) -> bytes:
            block = read(size)
            sizes.append(len(block))
            return block

        reader.read = counted  # type: ignore[method-assign]
        DownloadProducer(run_inline, reader, request).start()  # type: ignore[arg-type]
        return sizes

    def test_a_client_that_keeps_up_gets_larger_blocks(self) -> None:
        """Half-MiB blocks until the client has taken BULK_AFTER_BYTES, 1 MiB
        blocks after; the file arrives whole and in order."""
        request = _Request()
        self.stream(request)
        self.assertTrue(request.finished)
        self.assertEqual(b"".join(request.writes), self.data)
        taken = 0
        early: list[int] = []
        late: list[int] = []
        for block in request.writes:
            (early if taken < BULK_AFTER_BYTES else late).append(len(block))
            taken += len(block)
        self.assertLessEqual(max(early), READ_BLOCK_BYTES)
        self.assertGreater(max(late), READ_BLOCK_BYTES)
        self.assertLessEqual(max(late), BULK_READ_BLOCK_BYTES)

    def test_a_client_that_stalls_keeps_small_blocks(self) -> None:
        """A consumer paused after its first block: at most one more block
        is read, and no block is larger than half a MiB."""
        request = _Request(pause_after=1)
        sizes = self.stream(request)
        self.assertFalse(request.finished)
        self.assertEqual(len(request.writes), 1)
        self.assertLessEqual(len(sizes), 2)
        self.assertLessEqual(max(sizes), READ_BLOCK_BYTES)
