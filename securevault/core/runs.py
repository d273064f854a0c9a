# -*- test-case-name: tests.core.test_runs -*-
"""Run pieces: a resumable upload's archive, kept a PATCH at a time.

The process that takes an upload's PATCHes in order writes the archive
itself as they arrive (one L{ArchiveWriter}), and each PATCH's share of the
archive's ciphertext -- its *run* -- goes, encrypted once, into that PATCH's
piece as well, between a sealed head and a sealed end (docs/FORMAT.md,
"Staged uploads"):

    piece = head (92 bytes) || run || end (16,438 bytes)
    head  = magic (8) || nonce (12) || AES-256-GCM(archive id (16) || data key (32) || run start (8))

or, where the blob store keeps journals (the local one), the run stays in
the archive's journal, its temp blob made durable at each PATCH, and the
piece is its head (magic C{\0svrun2\0}) and end only: each byte is
written to disk once.  The ends:

    end   = nonce (12) || AES-256-GCM(size (8) || stream bytes (8) || ciphertext bytes (8) ||
                                      tail length (2) || tail, padded to 16,384 bytes)

both under a key derived from the upload key and bound to the piece's place.
A run is whole Cobblestone-256 chunks (the first run starts with the
stream's header); the end's tail is the ZIP stream's bytes the encryptor
still held.  So the pieces (and the journal, where the runs are there)
give back every acknowledged byte (L{RunDecoder}) when the archive being written is lost (a restart, another
process took a PATCH), and the archive itself needs no second encryption
pass.  Plain blocking Python, no Twisted.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.cobblestone import Cobblestone256Decryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securevault.core.archive import (
    DATA_KEY_BYTES,
    IO_BLOCK_BYTES,
    NONCE_BYTES,
    ArchiveCheckpoint,
    IntegrityError,
    context_bytes,
    derive_key,
)
from securevault.core.chunked import CHUNK_CIPHERTEXT_BYTES, CHUNK_PLAINTEXT_BYTES

RUN_MAGIC = b"\x00svrun1\x00"
# A journaled run's piece: head and end only, the run is in the journal.
JOURNALED_RUN_MAGIC = b"\x00svrun2\x00"
_HEAD_FIELDS = struct.Struct(">16s32sQ")
_END_FIELDS = struct.Struct(">QQQH")
_TAG_BYTES = 16
RUN_HEAD_BYTES = len(RUN_MAGIC) + NONCE_BYTES + _HEAD_FIELDS.size + _TAG_BYTES
RUN_END_BYTES = NONCE_BYTES + _END_FIELDS.size + CHUNK_PLAINTEXT_BYTES + _TAG_BYTES
# The ZIP local file header's fixed part (docs/FORMAT.md §6).
_LOCAL_HEADER = struct.Struct("<4sHHHHHLLLHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_STORED, _DEFLATED = 0, 8  # the ZIP compression methods an archive uses


@dataclass(frozen=True)
class RunHead:
    """Whose archive a run belongs to, and where in its ciphertext it starts."""

    archive_id: str
    data_key: bytes
    run_start: int
    # The run is in the archive's journal (the local blob store keeps one),
    # not between the piece's head and end.
    journaled: bool = False


def _run_key(upload_key: bytes) -> AESGCM:
    return AESGCM(derive_key(upload_key, b"run-piece-key"))


def _place(part: bytes, owner_id: str, upload_id: str, offset: int) -> bytes:
    return context_bytes(part, owner_id, f"{upload_id}/{offset}")


def seal_run_head(upload_key: bytes, owner_id: str, upload_id: str, offset: int, head: RunHead) -> bytes:
    if len(head.data_key) != DATA_KEY_BYTES:
        raise ValueError("a data key is 32 bytes")
    nonce = os.urandom(NONCE_BYTES)
    fields = _HEAD_FIELDS.pack(bytes.fromhex(head.archive_id), head.data_key, head.run_start)
    magic = JOURNALED_RUN_MAGIC if head.journaled else RUN_MAGIC
    sealed = _run_key(upload_key).encrypt(nonce, fields, _head_place(magic, owner_id, upload_id, offset))
    return magic + nonce + sealed


def _head_place(magic: bytes, owner_id: str, upload_id: str, offset: int) -> bytes:
    """A head's associated data: its place, and for a journaled run that it
    is one (the magic is outside the seal)."""
    return _place(b"run-head" if magic == RUN_MAGIC else b"journaled-run-head", owner_id, upload_id, offset)


def open_run_head(upload_key: bytes, owner_id: str, upload_id: str, offset: int, data: bytes) -> RunHead | None:
    """The head of the run piece at C{offset}, or None when C{data} (a
    piece's first bytes) does not start one (a piece of plaintext encrypted
    on its own, written where no archive was being assembled)."""
    magic = data[: len(RUN_MAGIC)]
    if len(data) != RUN_HEAD_BYTES or magic not in (RUN_MAGIC, JOURNALED_RUN_MAGIC):
        return None
    nonce = data[len(magic) : len(magic) + NONCE_BYTES]
    try:
        fields = _run_key(upload_key).decrypt(
            nonce, data[len(magic) + NONCE_BYTES :], _head_place(magic, owner_id, upload_id, offset)
        )
    except InvalidTag:
        return None
    archive_id, data_key, run_start = _HEAD_FIELDS.unpack(fields)
    return RunHead(archive_id.hex(), data_key, run_start, journaled=magic == JOURNALED_RUN_MAGIC)


def seal_run_end(upload_key: bytes, owner_id: str, upload_id: str, offset: int, checkpoint: ArchiveCheckpoint) -> bytes:
    tail = checkpoint.tail
    if len(tail) >= CHUNK_PLAINTEXT_BYTES:
        raise ValueError("a tail is less than one chunk")
    fields = _END_FIELDS.pack(checkpoint.size, checkpoint.stream_bytes, checkpoint.ciphertext_bytes, len(tail))
    padded = fields + tail + bytes(CHUNK_PLAINTEXT_BYTES - len(tail))
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _run_key(upload_key).encrypt(nonce, padded, _place(b"run-end", owner_id, upload_id, offset))


def open_run_end(upload_key: bytes, owner_id: str, upload_id: str, offset: int, data: bytes) -> ArchiveCheckpoint:
    try:
        fields = _run_key(upload_key).decrypt(
            data[:NONCE_BYTES], data[NONCE_BYTES:], _place(b"run-end", owner_id, upload_id, offset)
        )
    except InvalidTag as error:
        raise IntegrityError(f"upload {upload_id} has a damaged piece end") from error
    size, stream_bytes, ciphertext_bytes, tail_bytes = _END_FIELDS.unpack_from(fields)
    if tail_bytes >= CHUNK_PLAINTEXT_BYTES:
        raise IntegrityError(f"upload {upload_id} has a damaged piece end")
    tail = fields[_END_FIELDS.size : _END_FIELDS.size + tail_bytes]
    return ArchiveCheckpoint(size, stream_bytes, ciphertext_bytes, tail)


class _MemberBytes:
    """The file bytes of a ZIP stream's first member, fed the stream from
    its start: the local header is parsed and skipped, deflate inflated.
    What it is fed and gives out are views valid for the call only."""

    def __init__(self, out: Callable[[memoryview], None]) -> None:
        self._out = out
        self._header: bytearray | None = bytearray()
        self._inflater: zlib._Decompress | None = None

    def feed(self, data: memoryview) -> None:
        if self._header is not None:
            self._header += data
            if len(self._header) < _LOCAL_HEADER.size:
                return
            fields = _LOCAL_HEADER.unpack_from(self._header)
            signature, method, name_bytes, extra_bytes = fields[0], fields[3], fields[9], fields[10]
            if signature != _LOCAL_SIGNATURE or method not in (_STORED, _DEFLATED):
                raise IntegrityError("a staged archive does not start with its member")
            data_offset = _LOCAL_HEADER.size + name_bytes + extra_bytes
            if len(self._header) < data_offset:
                return
            data = memoryview(bytes(self._header[data_offset:]))
            self._header = None
            if method == _DEFLATED:
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        if self._inflater is None:
            if data:
                self._out(data)
            return
        try:
            rest: bytes | memoryview = data
            while rest:
                plain = self._inflater.decompress(rest, IO_BLOCK_BYTES)
                if plain:
                    self._out(memoryview(plain))
                rest = self._inflater.unconsumed_tail
        except zlib.error as error:
            raise IntegrityError("a staged archive does not inflate") from error


class RunDecoder:
    """Gives back the file bytes an upload's run pieces hold, in order:
    L{start_run} with each run piece's head, L{feed} it the bytes between
    its head and its end (the run), then L{end_run} with its end, and after
    the last one L{finish}.  The runs are one Cobblestone-256 stream's start
    (whole chunks), decrypted by the library as they come: every chunk is
    authenticated when it is given back.  Any piece out of place, damaged
    or from another archive is an L{IntegrityError}."""

    def __init__(self, upload_id: str, owner_id: str, out: Callable[[memoryview], None]) -> None:
        self._upload_id = upload_id
        self._owner_id = owner_id
        self._member = _MemberBytes(self._count)
        self._out = out
        self._decryptor: Cobblestone256Decryptor | None = None
        self._buffer = bytearray()
        self._head: RunHead | None = None
        self._ciphertext = 0  # the archive's ciphertext bytes fed so far
        self._stream_bytes = 0  # the ZIP stream bytes they gave back
        self._last: ArchiveCheckpoint | None = None
        self.size = 0  # file bytes given back so far

    def _count(self, data: memoryview) -> None:
        self.size += len(data)
        self._out(data)

    def _damaged(self, what: str) -> IntegrityError:
        return IntegrityError(f"upload {self._upload_id}: {what}")

    def start_run(self, head: RunHead) -> None:
        if self._head is None:
            if head.run_start != 0:
                raise self._damaged("its first run piece does not start the archive")
            self._decryptor = Cobblestone256Decryptor(
                derive_key(head.data_key, b"body-key"), context_bytes(b"body", self._owner_id, head.archive_id)
            )
        elif head.archive_id != self._head.archive_id or head.data_key != self._head.data_key:
            raise self._damaged("a run piece is from another archive")
        if head.run_start != self._ciphertext:
            raise self._damaged("a run piece is out of place")
        self._head = head

    def feed(self, run: memoryview) -> None:
        """The next bytes of the current run."""
        assert self._decryptor is not None
        if len(self._buffer) < len(run) + CHUNK_CIPHERTEXT_BYTES:
            self._buffer = bytearray(len(run) + CHUNK_CIPHERTEXT_BYTES)
        try:
            produced = self._decryptor.update_into(run, self._buffer)
        except (InvalidTag, ValueError) as error:
            raise self._damaged("a run piece fails authentication") from error
        self._ciphertext += len(run)
        self._stream_bytes += produced
        if produced:
            with memoryview(self._buffer) as view:
                self._member.feed(view[:produced])

    def end_run(self, end: ArchiveCheckpoint, file_offset: int) -> None:
        """The run's piece ended; C{file_offset} is where its row says the
        acknowledged bytes end."""
        if end.ciphertext_bytes != self._ciphertext or end.size != file_offset:
            raise self._damaged("a run piece does not match its row")
        self._last = end

    def finish(self) -> None:
        """The last run piece was fed: its tail completes the bytes."""
        if self._last is None:
            return
        end, self._last = self._last, None
        if self._stream_bytes + len(end.tail) != end.stream_bytes:
            raise self._damaged("its runs do not add up to their stream")
        self._member.feed(memoryview(end.tail))
        if self.size != end.size:
            raise self._damaged(f"its runs hold {self.size} of {end.size} bytes")
