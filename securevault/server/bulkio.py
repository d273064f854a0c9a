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
"""

from __future__ import annotations

from typing import Any

from securevault.server.twisted_private import DEFAULT_READ_BYTES, read_size, set_read_size, set_send_limit

BULK_READ_BYTES = 256 * 1024
SEND_LIMIT_BYTES = 512 * 1024


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
