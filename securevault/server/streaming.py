# -*- test-case-name: tests.server.test_resources -*-
"""Bodies that flow between a connection and the worker pool.

L{UploadStream} takes a raw upload body as it arrives and feeds it, in order
and in blocks of about 1 MiB, to an archive writer in the pool, pausing the
connection while the pool is behind.  L{DownloadProducer} is a push producer
that asks the pool for the next authenticated block only when the client wants
more.  Memory stays flat whatever the size.
"""

from __future__ import annotations

import base64
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from securevault.core.archive import BULK_READ_BLOCK_BYTES, IntegrityError
from securevault.core.ranges import PlaintextReader
from securevault.server.errors import ApiError
from securevault.server.pools import RunBlocking
from securevault.server.state import RequestState

BLOCK_BYTES = 1 << 20
HIGH_WATER_BYTES = 4 << 20
# A download whose client has taken this much reads larger blocks: more than
# the kernel's send buffer and the transport's hold, so that a client that
# stalls never gets there.
BULK_AFTER_BYTES = 8 << 20
LOW_WATER_BYTES = 1 << 20
# What one upload holds at most, counted against the memory budget: the
# bytes waiting for the pool up to the high water mark, one more piece, and
# the block being written.
UPLOAD_BUFFER_BYTES = HIGH_WATER_BYTES + 2 * BLOCK_BYTES

log = Logger(namespace="securevault.streaming")


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class BodySink(Protocol[T_co]):
    """What an upload body is fed to in the pool: an L{ArchiveWriter}, or a
    piece of a resumable upload (L{securevault.staging.PieceWriter})."""

    def write(self, data: bytes) -> None:
        """Take the next bytes.  C{data} may be a view of a buffer the
        caller reuses once this returns (L{BlockJoiner}): copy what you keep."""

    def commit(self) -> T_co: ...

    def abort(self) -> None: ...


class UploadStream(Generic[T]):
    """Feeds one upload body to a L{BodySink} (an L{ArchiveWriter}) running
    in the pool.

    At most one pool call is in flight, so writes stay in order; bytes that
    arrive meanwhile wait here, and past L{HIGH_WATER_BYTES} the connection
    is paused until the pool catches up.  The call in flight goes on with
    what arrived while it wrote (L{_write_waiting}), and the call that opens
    the sink starts on what arrived while it opened (L{prime}): no round
    trip through the reactor between blocks (measured: 3-5 ms each, with
    the reactor busy reading the body).  Only the waiting bytes are shared
    between the threads, under a lock.
    """

    def __init__(
        self,
        run_blocking: RunBlocking,
        pause: Callable[[], None],
        resume: Callable[[], None],
        on_error: Callable[[Failure], None],
        discard: Callable[[T], None],
        call_from_thread: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self._run = run_blocking
        self._pause = pause
        self._resume = resume
        self._on_error = on_error
        self._discard = discard
        self._call_from_thread = call_from_thread
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writer: BodySink[T] | None = None
        self._busy = True  # the opening is in flight
        self._paused = False
        self._ending = False
        self._aborted = False
        self._failure: Failure | None = None
        self._result: Deferred[T] | None = None
        self._joiner = BlockJoiner()
        self.received_bytes = 0

    def open_with(self, opening: Deferred[BodySink[T]]) -> None:
        """The sink, opened in the pool once the session is found there (the
        session gate), by a call that ends with L{prime}; bytes that arrive
        meanwhile wait here."""
        opening.addCallbacks(self._opened, self._failed)

    # -- reactor side ---------------------------------------------------

    def feed(self, data: bytes) -> None:
        """More body bytes arrived."""
        if self._aborted or self._failure is not None:
            return
        self.received_bytes += len(data)
        with self._lock:
            self._pending.append(data)
            self._pending_bytes += len(data)
            full = self._pending_bytes >= HIGH_WATER_BYTES
        if full and not self._paused:
            self._paused = True
            self._pause()
        self._pump()

    def finish(self) -> Deferred[T]:
        """The whole body arrived: commit once every byte is written."""
        self._ending = True
        self._result = Deferred(lambda _: self.abort())
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self._result.errback(failure)
        else:
            self._pump()
        return self._result

    def discard(self, info: T) -> None:
        """Remove the committed archive again: its answer will not be a 201
        (its audit record could not be written)."""
        self._discard(info)

    def abort(self) -> None:
        """The client left or the request was refused: keep nothing."""
        if self._aborted:
            return
        self._aborted = True
        self._take_pending()
        if not self._busy:
            self._abort_writer()

    def _take_pending(self) -> list[bytes]:
        with self._lock:
            pieces, self._pending = self._pending, []
            self._pending_bytes = 0
        return pieces

    def _resume_reading(self) -> None:
        if self._paused and not self._aborted and self._pending_bytes < HIGH_WATER_BYTES:
            self._paused = False
            self._resume()

    # -- pool side ------------------------------------------------------

    def prime(self, sink: BodySink[T]) -> BodySink[T]:
        """In the pool, at the end of the call that opened C{sink}: write
        what arrived meanwhile."""
        self._write_waiting(sink)
        return sink

    def _write(self, sink: BodySink[T], pieces: list[bytes]) -> None:
        self._joiner.write(sink, pieces)
        self._write_waiting(sink)

    def _write_waiting(self, sink: BodySink[T]) -> None:
        """Go on with the bytes that arrived during this call: a block or
        more, or all of them once the body ended.  Only ever in the one call
        in flight, which the reactor side waits for (C{_busy})."""
        while not self._aborted:
            with self._lock:
                if not self._pending or (self._pending_bytes < BLOCK_BYTES and not self._ending):
                    return
                pieces, self._pending = self._pending, []
                self._pending_bytes = 0
            if self._call_from_thread is not None:
                self._call_from_thread(self._resume_reading)
            self._joiner.write(sink, pieces)

    # -- pool traffic ---------------------------------------------------

    def _pump(self) -> None:
        if self._busy or self._aborted or self._writer is None or self._failure is not None:
            return
        writer = self._writer
        with self._lock:
            ready = bool(self._pending) and (self._pending_bytes >= BLOCK_BYTES or self._ending)
            pieces: list[bytes] = []
            if ready:
                pieces, self._pending = self._pending, []
                self._pending_bytes = 0
        if ready:
            self._busy = True
            self._run(self._write, writer, pieces).addCallbacks(self._written, self._failed)
            self._resume_reading()
        elif self._ending and not self._pending and self._result is not None:
            self._busy = True
            self._run(writer.commit).addCallbacks(self._committed, self._failed)

    def _opened(self, writer: BodySink[T]) -> None:
        self._writer = writer
        self._busy = False
        if self._aborted:
            self._abort_writer()
        else:
            self._resume_reading()
            self._pump()

    def _written(self, _: None) -> None:
        self._busy = False
        if self._aborted:
            self._abort_writer()
        else:
            self._resume_reading()
            self._pump()

    def _committed(self, info: T) -> None:
        self._busy = False
        self._writer = None
        self._joiner.release()
        if self._aborted:
            self._discard(info)  # the client never saw the 201
            return
        assert self._result is not None
        self._result.callback(info)

    def _failed(self, failure: Failure) -> None:
        """The writer failed; it has already removed what it wrote."""
        self._busy = False
        self._writer = None
        self._joiner.release()
        if self._aborted:
            return
        self._take_pending()
        if self._result is not None:
            self._result.errback(failure)
        else:
            self._failure = failure
            self._on_error(failure)

    def _abort_writer(self) -> None:
        self._joiner.release()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._run(writer.abort).addErrback(lambda f: log.failure("Aborting an upload failed", f))


class BlockJoiner:
    """In the pool: writes the pieces received meanwhile in blocks of about
    1 MiB, joined into one buffer kept for the whole upload.

    Joining on the reactor thread would be a copy it need not make; a fresh
    C{b"".join} per block is a fresh 1 MiB allocation, which glibc serves
    with mmap and the kernel faults in page by page (the upload's system
    time).  The sink gets a view of the buffer, valid until C{write}
    returns: it must not keep it (L{BodySink}).  One per upload: at most one
    pool call of an upload runs at a time.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def release(self) -> None:
        """Free the buffer now: the stream that owns it may live on in a
        reference cycle until the garbage collector runs, and a tus upload
        makes one stream per PATCH (measured: 18 such buffers, 10 MiB, alive
        at once in a 256 MiB upload)."""
        self._buffer = bytearray()

    def write(self, writer: BodySink[Any], pieces: list[bytes]) -> None:
        batch: list[bytes] = []
        size = 0
        for piece in pieces:
            batch.append(piece)
            size += len(piece)
            if size >= BLOCK_BYTES:
                self._write(writer, batch, size)
                batch, size = [], 0
        if batch:
            self._write(writer, batch, size)

    def _write(self, writer: BodySink[Any], batch: list[bytes], size: int) -> None:
        if len(batch) == 1:
            writer.write(batch[0])
            return
        if len(self._buffer) < size:
            # A full block overshoots 1 MiB by up to one piece: room for a
            # larger one next time, so the buffer is not regrown per block.
            self._buffer = bytearray(size if size < BLOCK_BYTES else size + BLOCK_BYTES // 8)
        view = memoryview(self._buffer)
        at = 0
        for piece in batch:
            view[at : at + len(piece)] = piece
            at += len(piece)
        writer.write(view[:size])  # type: ignore[arg-type]  # a view the sink does not keep


def body_stream(
    run_blocking: RunBlocking,
    state: RequestState,
    *,
    to_error: Callable[[Failure], BaseException],
    discard: Callable[[T], None],
    call_from_thread: Callable[[Callable[[], None]], object] | None,
) -> UploadStream[T]:
    """The request's body streamed into the sink its L{UploadStream.open_with}
    gives, paced by the request's state; a sink that fails while the body
    still arrives refuses the request at once with C{to_error}'s answer (the
    body unread)."""

    def failed(failure: Failure) -> None:
        if state.refuse is None:
            return
        error = to_error(failure)
        state.refuse(error if isinstance(error, ApiError) else failure)

    return UploadStream(
        run_blocking,
        pause=state.pause_body,
        resume=state.resume_body,
        on_error=failed,
        discard=discard,
        call_from_thread=call_from_thread,
    )


@implementer(IPushProducer)
class DownloadProducer:
    """Streams an archive's plaintext into a response.

    One block is read ahead in the pool while the reactor thread writes the
    current one (TLS encryption happens on that thread), and nothing is read
    while the consumer is paused.  A block that fails authentication aborts
    the connection: headers are out, so the client sees a truncated response
    and never an unauthenticated byte.
    """

    def __init__(
        self,
        run_blocking: RunBlocking,
        reader: PlaintextReader,
        request: Request,
        *,
        first: bytes = b"",
        encode: Callable[[bytes], bytes] | None = None,
        suffix: Callable[[], bytes] | None = None,
        on_integrity_error: Callable[[], None] | None = None,
    ) -> None:
        self._run = run_blocking
        self._on_integrity_error = on_integrity_error
        self._reader = reader
        self._request = request
        self._encode = encode
        self._suffix = suffix
        self._ready: deque[bytes] = deque()
        if first:
            self._ready.append(encode(first) if encode else first)
        self._paused = False
        self._in_flight = False
        self._at_end = False
        self._stopped = False
        self._pumping = False
        self._done: Deferred[None] = Deferred()
        self._written = 0
        # Set once the client has taken BULK_AFTER_BYTES: the next read in
        # the pool switches the reader to larger blocks.
        self._bulk = False

    def start(self) -> Deferred[None]:
        """Begin streaming; fires when the response is finished or aborted."""
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._pump()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._ready.clear()
        if not self._in_flight:
            self._close()

    def _pump(self) -> None:
        """Keep one read ahead and write what is ready, in order.

        Not re-entrant: a synchronous C{run_blocking} (tests) delivers the
        read inside this loop, which only queues it.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._stopped and not self._paused:
                if not self._in_flight and not self._at_end and len(self._ready) < 2:
                    self._in_flight = True
                    self._run(self._read_block).addCallbacks(self._got, self._failed)
                    continue
                if not self._ready:
                    break
                data = self._ready.popleft()
                if data:
                    self._written += len(data)
                    if self._written >= BULK_AFTER_BYTES:
                        self._bulk = True
                    self._request.write(data)
                else:
                    self._finish()
        finally:
            self._pumping = False

    def _read_block(self) -> bytes:
        """In the pool: the next block, encoded there too (base64 of a MiB
        is work the reactor thread should not do)."""
        if self._bulk:
            grow = getattr(self._reader, "use_block_bytes", None)
            if grow is not None:
                grow(BULK_READ_BLOCK_BYTES)
        data = self._reader.read()
        if data and self._encode is not None:
            return self._encode(data)
        return data

    def _got(self, data: bytes) -> None:
        self._in_flight = False
        if self._stopped:
            self._close()
            return
        if not data:
            self._at_end = True
        self._ready.append(data)
        self._pump()

    def _finish(self) -> None:
        if self._suffix is not None:
            self._request.write(self._suffix())
        self._stopped = True
        self._request.unregisterProducer()
        self._request.finish()
        self._close()

    def _failed(self, failure: Failure) -> None:
        self._in_flight = False
        if not self._stopped:
            self._stopped = True
            self._ready.clear()
            log.error(
                "Download of archive {archive_id} aborted: {reason}",
                archive_id=self._reader.info.id,
                reason=failure.getErrorMessage(),
            )
            if failure.check(IntegrityError) and self._on_integrity_error is not None:
                self._on_integrity_error()
            self._request.unregisterProducer()
            transport: Any = self._request.transport
            if transport is not None:
                transport.abortConnection()
        self._close()

    def _close(self) -> None:
        reader = self._reader
        self._run(reader.close).addErrback(lambda f: None)
        if not self._done.called:
            self._done.callback(None)


class Base64Encoder:
    """Encodes a byte stream as one base64 text, block by block."""

    def __init__(self) -> None:
        self._carry = b""

    def __call__(self, data: bytes) -> bytes:
        data = self._carry + data if self._carry else data
        cut = len(data) - len(data) % 3
        self._carry = data[cut:]
        return base64.b64encode(data[:cut])

    def flush(self) -> bytes:
        carry, self._carry = self._carry, b""
        return base64.b64encode(carry)


def base64_length(size: int) -> int:
    return 4 * ((size + 2) // 3)


__all__ = ["UploadStream", "DownloadProducer", "Base64Encoder", "base64_length", "CancelledError"]
