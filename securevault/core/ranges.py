# -*- test-case-name: tests.test_ranges -*-
"""Readers of a byte range of an archive's original file (ranged downloads).

A *stored* archive (incompressible data) keeps the file's bytes contiguous in
its ZIP at C{data_offset}: file byte C{i} is ZIP byte C{data_offset + i}, in
chunk C{(data_offset + i) // 16384} of the Cobblestone-256 stream.  Its range
reader (L{StoredRangeReader}) fetches and decrypts only those chunks, so a
range costs what its length costs, not what the file does.  Before the first
byte it authenticates the stream's header (the key commitment) and its final
chunk at the offset the sealed metadata's C{stored_bytes} gives, with nothing
after it: the body is the one the index describes, whole, not truncated or
extended.  Chunks outside the range are not read, so damage there goes
unnoticed by a range (a whole download, or C{securevault-admin verify}, finds
it).

A *deflated* archive can only be inflated from the start: its range reader
(L{InflatingRangeReader}) decrypts and inflates everything before the range
and discards it, so its cost grows with the range's end.  A range that ends
with the file reads on to the stream's end and checks the whole file's size
and SHA-256 as a whole download does.

Every byte returned is authenticated; any failure is an L{IntegrityError}.
Plain blocking Python, run in the worker pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from securevault.core.archive import (
    IO_BLOCK_BYTES,
    ArchiveInfo,
    ArchiveReader,
    IntegrityError,
    StoreUnavailable,
)
from securevault.core.chunked import (
    CHUNK_PLAINTEXT_BYTES,
    HEADER_BYTES,
    ChunkedStream,
    ChunkedStreamError,
    chunk_count,
    chunk_offset,
    plaintext_size,
    read_plaintext,
)
from securevault.stores.blobs import BlobNotFound, BlobReader, BlobStoreError

__all__ = ["InflatingRangeReader", "PlaintextReader", "StoredRangeReader"]

# Opens a reader of the blob's bytes [start, start + length).
OpenRange = Callable[[int, int], BlobReader]


class PlaintextReader(Protocol):
    """What a download streams from: a whole archive (L{ArchiveReader}) or
    a range of it."""

    @property
    def info(self) -> ArchiveInfo: ...

    def read(self, size: int = IO_BLOCK_BYTES) -> bytes:
        """The next authenticated bytes (at most about C{size}); b"" at the end."""

    def close(self) -> None: ...


def read_up_to(reader: BlobReader, length: int) -> bytes:
    """The next C{length} bytes, fewer only where the blob ends."""
    pieces = []
    left = length
    while left > 0:
        piece = reader.read(left)
        if not piece:
            break
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


class StoredRangeReader:
    """The file's bytes C{start <= i < end} of a stored archive, decrypting
    only the chunks that hold them.

    The constructor authenticates the header and the final chunk (it reads
    56 bytes and at most one chunk); L{read} then streams the range's chunks
    over one ranged read of the blob.
    """

    def __init__(
        self,
        open_range: OpenRange,
        info: ArchiveInfo,
        body_key: bytes,
        context: bytes,
        start: int,
        end: int,
        *,
        on_integrity_failure: Callable[[], None] | None = None,
    ) -> None:
        if not 0 <= start <= end <= info.size:
            raise ValueError("range outside the file")
        self._info = info
        self._open_range = open_range
        self._on_integrity_failure = on_integrity_failure
        self._start, self._end = start, end
        self._blob: BlobReader | None = None
        self._blob_position = 0
        self._pieces: Iterator[bytes] | None = None
        self._pending = b""
        self._produced = 0
        self._closed = False
        self._guard(lambda: self._authenticate(body_key, context))

    @property
    def info(self) -> ArchiveInfo:
        return self._info

    def _guard(self, action: Callable[[], bytes | None]) -> bytes | None:
        """Run C{action}, with the stores' and the scheme's failures in the
        storage vocabulary (an integrity failure is remembered)."""
        try:
            return action()
        except (ChunkedStreamError, IntegrityError) as error:
            if self._on_integrity_failure is not None:
                self._on_integrity_failure()
            raise IntegrityError(f"archive {self._info.id} fails authentication: {error}") from error
        except BlobNotFound as error:
            raise IntegrityError(f"archive {self._info.id} has no body") from error
        except BlobStoreError as error:
            raise StoreUnavailable(str(error)) from error

    def _authenticate(self, body_key: bytes, context: bytes) -> None:
        info = self._info
        total = plaintext_size(info.stored_bytes)
        if info.method != "stored" or info.compressed_size != info.size or info.data_offset + info.size > total:
            raise IntegrityError("the archive's metadata does not describe a stored member")
        self._total = total
        with_header = self._open_range(0, HEADER_BYTES)
        try:
            header = read_up_to(with_header, HEADER_BYTES)
        finally:
            with_header.close()
        self._stream = ChunkedStream(body_key, context, header)
        # The final chunk, where the recorded length puts it, and nothing
        # after it: one byte more is asked for, and must not come.
        last = chunk_count(total) - 1
        offset = chunk_offset(last)
        expected = info.stored_bytes - offset
        reader = self._open_range(offset, expected + 1)
        try:
            final = read_up_to(reader, expected + 1)
        finally:
            reader.close()
        if len(final) != expected:
            raise ChunkedStreamError("the body's length differs from the recorded one")
        self._stream.decrypt_chunk(last, final, final=True)

    def _read_at(self, offset: int, length: int) -> bytes:
        """The chunks read_plaintext asks for, in order, from one ranged
        read that spans them all."""
        if self._blob is None:
            first_chunk = (self._info.data_offset + self._start) // CHUNK_PLAINTEXT_BYTES
            last_chunk = (self._info.data_offset + self._end - 1) // CHUNK_PLAINTEXT_BYTES
            self._blob_position = chunk_offset(first_chunk)
            span_end = min(chunk_offset(last_chunk + 1), self._info.stored_bytes)
            self._blob = self._open_range(self._blob_position, span_end - self._blob_position)
        if offset != self._blob_position:
            raise ValueError("chunks must be read in order")
        data = read_up_to(self._blob, length)
        self._blob_position += len(data)
        return data

    def read(self, size: int = IO_BLOCK_BYTES) -> bytes:
        """The next bytes of the range; b"" once it is all out."""
        if self._closed:
            raise IntegrityError("read after close")
        out = self._guard(lambda: self._next(size))
        assert out is not None
        return out

    def _next(self, size: int) -> bytes:
        if not self._pending:
            if self._produced == self._end - self._start:
                return b""
            if self._pieces is None:
                zip_start = self._info.data_offset + self._start
                zip_end = self._info.data_offset + self._end
                self._pieces = read_plaintext(self._stream, self._read_at, self._total, zip_start, zip_end)
            self._pending = next(self._pieces, b"")
            if not self._pending:
                raise ChunkedStreamError("the range ended early")
        out, self._pending = self._pending[:size], self._pending[size:]
        self._produced += len(out)
        return out

    def close(self) -> None:
        self._closed = True
        blob, self._blob = self._blob, None
        if blob is not None:
            blob.close()


class InflatingRangeReader:
    """The file's bytes C{start <= i < end} of any archive, read from the
    start by an L{ArchiveReader} (inflating a deflated member) with the
    bytes before the range discarded."""

    def __init__(self, reader: ArchiveReader, start: int, end: int) -> None:
        if not 0 <= start <= end <= reader.info.size:
            raise ValueError("range outside the file")
        self._reader = reader
        self._skip = start
        self._left = end - start
        self._to_the_end = end == reader.info.size
        self._pending = b""

    @property
    def info(self) -> ArchiveInfo:
        return self._reader.info

    def read(self, size: int = IO_BLOCK_BYTES) -> bytes:
        while self._skip > 0:
            skipped = self._reader.read(min(self._skip, IO_BLOCK_BYTES))
            if not skipped:
                raise IntegrityError("archive is shorter than recorded")
            if len(skipped) > self._skip:
                self._pending = skipped[self._skip :]
            self._skip -= min(self._skip, len(skipped))
        if self._left == 0:
            if self._to_the_end:
                # Authenticate the rest and check the whole file's digest,
                # as a whole download does.
                self._to_the_end = False
                if self._reader.read(1):
                    raise IntegrityError("archive holds more data than recorded")
            return b""
        data = self._pending or self._reader.read(min(size, self._left))
        if not data:
            raise IntegrityError("archive is shorter than recorded")
        out, self._pending = data[: min(size, self._left)], data[min(size, self._left) :]
        self._left -= len(out)
        return out

    def close(self) -> None:
        self._reader.close()
