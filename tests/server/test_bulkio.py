"""Tests for L{securevault.server.bulkio}: the send limit is raised, the read
size follows the data, large writes reach TLS without being aggregated."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from securevault.server.bulkio import BULK_READ_BYTES, BULK_WRITE_BYTES, SEND_LIMIT_BYTES, BulkSocketSizes
from securevault.server.plaintext import PlainHTTPAnsweringTLS, PlainHTTPAnsweringTLSFactory
from securevault.server.tls import server_tls_options
from securevault.server.twisted_private import DEFAULT_READ_BYTES
from tests.support.testcase import SyncTestCase
from tests.support.tlsclient import TestPKI


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


class _Writes(Protocol):
    """Writes its script once TLS is up, then closes."""

    script: list[Any] = []

    def connectionMade(self) -> None:
        transport: Any = self.transport
        for data in self.script:
            transport.write(data)
        transport.loseConnection()


class _Collects(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class BulkTLSWritesTests(SyncTestCase):
    """Large writes go to TLS past Twisted's aggregator, over real TLS (in
    memory, the vault's own server options and the tests' certificates)."""

    aggregated: list[int]

    def connect(self, script: list[Any]) -> tuple[Any, _Collects]:
        pki = TestPKI.for_class(type(self), self.make_dir() / "certs")
        server_options = server_tls_options(pki.server.cert_path, pki.server.key_path, pki.ca.cert_path)
        trust = trustRootFromCertificates([Certificate.loadPEM(pki.ca.cert_path.read_bytes())])
        client_options = optionsForClientTLS(
            "localhost",
            trustRoot=trust,
            extraCertificateOptions={"certificate": pki.client_a.certificate, "privateKey": pki.client_a.key},
        )
        clock = Clock()
        writes = type("Writes", (_Writes,), {"script": script})
        aggregated = self.aggregated = []

        class Counting(PlainHTTPAnsweringTLS):
            """Counts what goes to Twisted's aggregator."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                write = self._aggregated_write

                def counting(data: bytes) -> None:
                    aggregated.append(len(data))
                    write(data)

                self._aggregated_write = counting

        server_factory = PlainHTTPAnsweringTLSFactory(server_options, False, Factory.forProtocol(writes), clock)
        server_factory.protocol = Counting
        collector = _Collects()
        client_factory = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(lambda: collector), clock)
        client, server, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), clock=clock
        )
        for _ in range(200):
            pump.pump()
            clock.advance(0)
            if collector.lost:
                break
        return server, collector

    def test_twisted_aggregates_by_these_names(self) -> None:
        """The names flush_small_writes relies on: an upgrade that renames
        them fails here (the large write would overtake aggregated ones)."""
        from twisted.protocols import tls

        source = Path(tls.__file__).read_text()
        self.assertIn("self._aggregator = _AggregateSmallWrites(", source)
        self.assertIn("self.write = self._aggregator.write", source)
        self.assertTrue(callable(tls._AggregateSmallWrites.flush))

    def test_small_and_large_writes_arrive_whole_and_in_order(self) -> None:
        large = os.urandom(3 * BULK_WRITE_BYTES + 5)
        exact = os.urandom(BULK_WRITE_BYTES)
        script = [b"head ", large, b" middle ", exact, bytearray(b"z" * BULK_WRITE_BYTES), b" tail"]
        _, collector = self.connect(script)
        self.assertTrue(collector.lost)
        self.assertEqual(b"".join(collector.received), b"".join(bytes(part) for part in script))
        # The small writes and the bytearray (mutable: TLS must not keep a
        # view of it) were aggregated; the two large bytes were not.
        self.assertEqual(self.aggregated, [5, 8, BULK_WRITE_BYTES, 5])
