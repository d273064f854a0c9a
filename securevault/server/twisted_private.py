# -*- test-case-name: tests.server.test_pipeline -*-
"""The private names of Twisted that the vault needs, each wrapped once.

twisted.web offers no public hook between a request's head and its body, no
way to turn off its form parser, and no way to make a hand-built listener
fail loudly.  Each function here names the private attribute it reads or sets
and why; nothing else in the package touches a private Twisted name.  A
Twisted upgrade that renames one breaks here, in one place, and
tests.server.test_pipeline notices.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.web.http import HTTPChannel, Request


def pending_request_line(channel: HTTPChannel) -> tuple[bytes, bytes]:
    """The method and request target of the request whose head just ended.

    L{Request.gotLength} runs before L{Request.requestReceived}, the first
    public moment the method and path are on the request; until then they are
    HTTPChannel's C{_command} and C{_path} (twisted/twisted#4688 describes this
    gap).  We need them there to route a body before it arrives."""
    return getattr(channel, "_command", b""), getattr(channel, "_path", b"")


def head_bytes_received(channel: HTTPChannel) -> int:
    """How many bytes of the current request head arrived (HTTPChannel's
    C{_receivedHeaderSize}), to tell a head over the limit from other
    framing errors in C{_respondToBadRequestAndDisconnect} (the one hook
    every framing error goes through; overridden in L{VaultChannel})."""
    return int(getattr(channel, "_receivedHeaderSize", 0))


def skip_form_parsing(request: Request) -> None:
    """No endpoint takes form submissions; twisted.web's own parser would
    answer a malformed multipart body with a bare, non-JSON 400
    (C{Request._parsePOSTFormSubmission})."""
    setattr(request, "_parsePOSTFormSubmission", False)


def request_disconnected(request: Request) -> bool:
    """Whether the connection under C{request} was lost (C{_disconnected}:
    C{Request.notifyFinish} tells it only through a callback)."""
    return bool(getattr(request, "_disconnected", False))


def fail_loudly_on_listen(service: Any) -> None:
    """A hand-built StreamServerEndpointService only logs a failed bind and
    runs on deaf; C{_raiseSynchronously} makes it raise, as
    C{twisted.application.strports.service()} does."""
    service._raiseSynchronously = True


def listening_port(service: Any) -> Any:
    """The Deferred port of a StreamServerEndpointService being started
    (C{_waitingForPort}), to log where it listens once it does."""
    return service._waitingForPort


def name_port_tls(port: Any) -> None:
    """Make a TCP port that carries TLS log as a TLS port ("(TLS Port N
    Closed)"): C{reactor.listenSSL} sets the same private C{_type} on the
    C{tcp.Port} it makes, which L{securevault.server.plaintext} builds
    itself."""
    port._type = "TLS"


# How long a worker that holds more connections than another leaves a
# pending one to the others before it takes it anyway (a stopped or busy
# worker must not keep connections waiting).  Tests on a loaded machine,
# where a worker may take longer than that to wake, set it longer through
# $SECUREVAULT_PASS_OVER_SECONDS (L{pass_over_seconds}).
PASS_OVER_SECONDS = 0.005


def pass_over_seconds() -> float:
    """L{PASS_OVER_SECONDS}, or the tests' longer value from the environment."""
    try:
        return float(os.environ.get("SECUREVAULT_PASS_OVER_SECONDS", PASS_OVER_SECONDS))
    except ValueError:
        return PASS_OVER_SECONDS


def accept_one_at_a_time(
    port: Any,
    *,
    pass_over: Callable[[], bool] | None = None,
    call_later: Callable[..., Any] | None = None,
    seconds: float = PASS_OVER_SECONDS,
) -> None:
    """Make a listening C{tcp.Port} accept one connection per wake-up, and,
    with C{pass_over}, leave it to the other workers while that says so.

    Several worker processes share one listening socket; each wakes when a
    connection is pending.  Twisted's C{Port.doRead} accepts up to
    C{numberAccepts} connections per wake-up (100 at first, then adapted to
    the last burst), so the first worker to wake took a whole burst of
    keep-alive connections and the others none (measured: 4 of 4).  One per
    wake-up leaves the next to whichever worker is free first.  The
    attribute is public but C{doRead} rewrites it after every call, hence
    the reset before each one, here only.

    Whichever worker is free first is still not the one with the fewest
    connections (measured: 4 of 4 again, now and then).  When
    C{pass_over()} is true (a L{WorkerLoads} says another worker is less
    busy), the port stops reading for L{PASS_OVER_SECONDS}, so that a
    worker woken by the same connection takes it; then it reads again and
    takes at once whatever is still pending, so that a stopped or busy
    worker delays a connection by that long at most.
    """
    do_read = port.doRead
    passing = False

    def resume() -> None:
        nonlocal passing
        passing = False
        if port.connected:  # not stopped meanwhile
            port.startReading()
            port.numberAccepts = 1
            do_read()  # the others had their turn; nothing pending is fine

    def doRead() -> Any:
        nonlocal passing
        if passing:
            return None
        if pass_over is not None and call_later is not None and pass_over():
            passing = True
            port.stopReading()
            call_later(seconds, resume)
            return None
        port.numberAccepts = 1
        return do_read()

    port.doRead = doRead


# tcp.Connection reads at most C{bufferSize} bytes per wake-up of the
# reactor (64 KiB) and sends at most C{SEND_LIMIT} (128 KiB): attributes
# public by name but not documented, read and set only here
# (L{securevault.server.bulkio}).
DEFAULT_READ_BYTES = 2**16


def read_size(transport: Any) -> int | None:
    """How many bytes the TCP transport reads per wake-up; None when it is
    not a C{tcp.Connection} (tests' fake transports)."""
    size = getattr(transport, "bufferSize", None)
    return size if isinstance(size, int) else None


def set_read_size(transport: Any, size: int) -> None:
    transport.bufferSize = size


def set_send_limit(transport: Any, size: int) -> None:
    transport.SEND_LIMIT = size


# BufferingTLSTransport (twisted.protocols.tls) sends every write through
# its C{_aggregator}, which copies it (C{data + b""}) and holds it until the
# next reactor turn unless 64 kB have piled up: right for many small writes,
# a wasted copy of every byte of a download.  L{securevault.server.bulkio}
# sends large writes past it; this flushes what it holds first, so the
# bytes still leave in order.
def flush_small_writes(tls: Any) -> None:
    aggregator = getattr(tls, "_aggregator", None)
    flush = getattr(aggregator, "flush", None)
    if flush is not None:
        flush()
