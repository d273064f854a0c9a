"""Tests for L{securevault.server.reading}: the read size follows the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import tcp

from securevault.server.reading import BULK_READ_BYTES, AdaptiveReads
from securevault.server.twisted_private import DEFAULT_READ_BYTES
from tests.support.testcase import SyncTestCase


class _Taker:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class _Protocol(AdaptiveReads, _Taker):
    pass


class _Transport:
    bufferSize = DEFAULT_READ_BYTES


class AdaptiveReadsTests(SyncTestCase):
    def setUp(self) -> None:
        self.protocol = _Protocol()
        self.transport: Any = _Transport()
        self.protocol.transport = self.transport

    def test_small_reads_stay_small(self) -> None:
        """Requests that fit in one read leave the read size alone, and
        every byte is passed on."""
        self.protocol.dataReceived(b"x" * 1000)
        self.assertEqual(self.transport.bufferSize, DEFAULT_READ_BYTES)
        self.assertEqual(self.protocol.received, [b"x" * 1000])

    def test_a_full_read_makes_the_next_larger_and_a_short_one_small_again(self) -> None:
        self.protocol.dataReceived(b"x" * DEFAULT_READ_BYTES)
        self.assertEqual(self.transport.bufferSize, BULK_READ_BYTES)
        self.protocol.dataReceived(b"x" * BULK_READ_BYTES)
        self.assertEqual(self.transport.bufferSize, BULK_READ_BYTES)
        self.protocol.dataReceived(b"x" * (DEFAULT_READ_BYTES + 1))  # still bulk
        self.assertEqual(self.transport.bufferSize, BULK_READ_BYTES)
        self.protocol.dataReceived(b"x" * 100)
        self.assertEqual(self.transport.bufferSize, DEFAULT_READ_BYTES)
        self.assertEqual(len(self.protocol.received), 4)

    def test_twisted_tcp_reads_by_buffer_size(self) -> None:
        """The attribute adapted is the one Twisted's TCP transport reads
        by: an upgrade that renames it fails here."""
        self.assertEqual(tcp.Connection.bufferSize, DEFAULT_READ_BYTES)
        self.assertIn("self.socket.recv(self.bufferSize)", Path(tcp.__file__).read_text())

    def test_fake_transports_left_alone(self) -> None:
        """A transport without a read size (the tests' fakes) passes data
        through untouched."""
        self.protocol.transport = object()
        self.protocol.dataReceived(b"y" * DEFAULT_READ_BYTES)
        self.assertEqual(self.protocol.received, [b"y" * DEFAULT_READ_BYTES])
