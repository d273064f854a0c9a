# -*- test-case-name: tests.server.test_plaintext -*-
"""A plain-HTTP request on the TLS port gets a plain answer, not silence.

C{curl http://host:5000/} used to end with "Empty reply from server": the
TLS layer cannot parse "GET ", and closes.  The first byte of a TLS
connection is a record's content type (20-24) or, for an SSLv2-style hello,
has its high bit set; the first byte of an HTTP/1.x request is the first
letter of its method, A-Z.  So one byte tells them apart, before TLS sees
anything: a connection that starts with a capital letter would fail the
handshake anyway, and instead gets C{400 bad_request} in clear text saying
this port speaks HTTPS, and is closed.  Everything else goes to TLS
untouched, so nothing about TLS is weakened: no byte is held back, no byte
of a TLS connection is interpreted here.

This is C{reactor.listenSSL}'s own construction (a TCP port whose factory is
a L{TLSMemoryBIOFactory} around the site) with the TLS protocol subclassed
to look at the first byte.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import implementer

from securevault.server.bulkio import BulkSocketSizes, BulkTLSWrites
from securevault.server.errors import ApiError
from securevault.server.twisted_private import name_port_tls
from securevault.server.web import raw_error_response

PLAINTEXT_MESSAGE = "This port speaks HTTPS (mutual TLS), not plain HTTP: use an https:// URL and a client certificate."


def is_plain_http(first: bytes) -> bool:
    """Whether a connection's first bytes are a plain HTTP/1.x request
    rather than TLS: an HTTP method starts with a capital letter, which no
    TLS record (or SSLv2 hello) starts with."""
    return b"A" <= first[:1] <= b"Z"


PLAINTEXT_ANSWER = raw_error_response(ApiError(400, "bad_request", PLAINTEXT_MESSAGE))


class PlainHTTPAnsweringTLS(BulkSocketSizes, BulkTLSWrites, BufferingTLSTransport):
    """Twisted's TLS protocol, which answers a plain HTTP request itself,
    reads and sends larger slices of the socket in bulk transfers
    (L{BulkSocketSizes}) and encrypts large writes without copying them
    first (L{BulkTLSWrites})."""

    _first_byte_seen = False

    def dataReceived(self, data: bytes) -> None:
        if not self._first_byte_seen and data:
            self._first_byte_seen = True
            transport = self.transport  # TCP: the answer goes out in clear text
            if is_plain_http(data) and transport is not None:
                transport.write(PLAINTEXT_ANSWER)
                transport.loseConnection()
                return
        super().dataReceived(data)


class PlainHTTPAnsweringTLSFactory(TLSMemoryBIOFactory):
    """A server-side L{TLSMemoryBIOFactory} of L{PlainHTTPAnsweringTLS}."""

    protocol = PlainHTTPAnsweringTLS


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """L{twisted.internet.endpoints.SSL4ServerEndpoint}, with plain HTTP
    answered (see the module docstring)."""

    def __init__(self, reactor: Any, port: int, context_factory: Any, *, interface: str = "", backlog: int = 50):
        self._tcp = TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=interface)
        self._context_factory = context_factory

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory = PlainHTTPAnsweringTLSFactory(self._context_factory, False, protocolFactory)
        listening: Deferred[IListeningPort] = self._tcp.listen(factory)
        listening.addCallback(_named_tls)
        return listening


def _named_tls(port: IListeningPort) -> IListeningPort:
    name_port_tls(port)
    return port
