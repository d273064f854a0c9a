"""Tests for L{securevault.server.bulkio}: the send limit is raised, the read
size follows the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import tcp

from securevault.server.bulkio import BULK_READ_BYTES, SEND_LIMIT_BYTES, BulkSocketSizes
from securevault.server.twisted_private import DEFAULT_READ_BYTES
from tests.support.testcase import SyncTestCase


class _Taker:
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.connected_to: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.connected_to = transport

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class _Protocol(BulkSocketSizes, _Taker):
    pass


class _Transport:
    bufferSize = DEFAULT_READ_BYTES
    SEND_LIMIT = 128 * 1024


class BulkSocketSizesTests(SyncTestCase):
    def setUp(self) -> None:
        self.protocol = _Protocol()
        self.transport: Any = _Transport()
        self.protocol.transport = self.transport

    def test_send_limit_raised_on_connection(self) -> None:
        transport = _Transport()
        protocol = _Protocol()
        protocol.makeConnection(transport)
        self.assertEqual(transport.SEND_LIMIT, SEND_LIMIT_BYTES)
        self.assertIs(protocol.connected_to, transport)

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

    def test_twisted_tcp_reads_and_sends_by_these_attributes(self) -> None:
        """The attributes set are the ones Twisted's TCP transport reads and
        sends by: an upgrade that renames one fails here."""
        self.assertEqual(tcp.Connection.bufferSize, DEFAULT_READ_BYTES)
        self.assertEqual(tcp.Connection.SEND_LIMIT, 128 * 1024)
        self.assertIn("[: self.SEND_LIMIT]", Path(tcp.__file__).read_text())
        self.assertIn("self.socket.recv(self.bufferSize)", Path(tcp.__file__).read_text())

    def test_fake_transports_left_alone(self) -> None:
        """A transport without a read size (the tests' fakes) passes data
        through untouched."""
        self.protocol.transport = object()
        self.protocol.dataReceived(b"y" * DEFAULT_READ_BYTES)
        self.assertEqual(self.protocol.received, [b"y" * DEFAULT_READ_BYTES])
