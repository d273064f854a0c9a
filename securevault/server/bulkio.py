# -*- test-case-name: tests.server.test_bulkio -*-
"""Socket reads and sends sized for bulk transfers.

Twisted's TCP transport reads at most 64 KiB per wake-up of the reactor,
and each wake-up costs the reactor's loop, the TLS layer's pass over the
records, and the HTTP layer's, whatever it carries: on a 512 MiB upload the
reactor spent 2.0-2.3 CPU-s/GiB with 64 KiB reads, 1.5 with 256 KiB (python
-m bench --only upload; docs/PERFORMANCE.md).  Small requests keep 64 KiB
reads: only a read that filled its buffer (more is waiting) makes the next
one larger, and a read of less than 64 KiB makes them small again, so a
256 KiB buffer is only allocated while a body streams at full speed.

Sends likewise: the transport sends at most 128 KiB per wake-up; 512 KiB
took a 512 MiB download from 2.65 to 2.41-2.49 server CPU-s/GiB (reactor
1.68-1.82 -> 1.52-1.68) and 429 to 456-466 MB/s.  A send only takes what is
buffered, so small answers are unchanged.

And large writes: Twisted's buffering TLS transport copies every write
before TLS sees it (to aggregate small ones), and TLS then slices it into
16 KiB records, another copy; a write of 64 KiB or more (a download's
block) now goes to TLS as a memoryview, past the aggregator, and is sliced
without a copy (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Any

from twisted.protocols.tls import TLSMemoryBIOProtocol

from securevault.server.twisted_private import (
    DEFAULT_READ_BYTES,
    flush_small_writes,
    read_size,
    set_read_size,
    set_send_limit,
)

BULK_READ_BYTES = 256 * 1024
SEND_LIMIT_BYTES = 512 * 1024
# Twisted's aggregator sends what it holds once it passes 64 000 bytes: a
# write this large gains nothing from it.
BULK_WRITE_BYTES = 64 * 1024


class BulkSocketSizes:
    """A protocol mixin for the protocol right above TCP: raises its
    transport's send limit, and adapts its read size to the data that
    arrives (see the module).  Put it before the protocol class whose
    C{makeConnection} and C{dataReceived} it extends."""

    transport: Any

    def makeConnection(self, transport: Any) -> None:
        if read_size(transport) is not None:
            set_send_limit(transport, SEND_LIMIT_BYTES)
        super().makeConnection(transport)  # type: ignore[misc]

    def dataReceived(self, data: bytes) -> None:
        transport = self.transport
        size = read_size(transport)
        if size is not None:
            if len(data) >= size and size < BULK_READ_BYTES:
                set_read_size(transport, BULK_READ_BYTES)
            elif len(data) < DEFAULT_READ_BYTES and size > DEFAULT_READ_BYTES:
                set_read_size(transport, DEFAULT_READ_BYTES)
        super().dataReceived(data)  # type: ignore[misc]


class BulkTLSWrites:
    """A mixin for L{twisted.protocols.tls.BufferingTLSTransport}: writes of
    L{BULK_WRITE_BYTES} or more go to TLS directly as a memoryview (no copy
    to aggregate them, none to slice them into records); smaller ones are
    aggregated as before.  Safe with C{bytes} only, which nobody can change
    while TLS holds a view of it (a write TLS must buffer, during a
    renegotiation, keeps the view and so the bytes)."""

    write: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # BufferingTLSTransport binds C{write} to its aggregator per
        # instance (and to a null one once the connection is lost).
        self._aggregated_write = self.write
        self.write = self._sized_write

    def _sized_write(self, data: bytes) -> None:
        if len(data) < BULK_WRITE_BYTES or type(data) is not bytes:
            self._aggregated_write(data)
            return
        flush_small_writes(self)
        TLSMemoryBIOProtocol.write(self, memoryview(data))  # type: ignore[arg-type]
