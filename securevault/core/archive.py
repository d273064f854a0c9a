# -*- test-case-name: tests.test_storage -*-
"""One archive on disk: the streamed writer and the authenticating reader.

The format (docs/FORMAT.md): the upload is one ZIP member (deflate level 1, or
stored when a sample does not compress), and the ZIP stream is encrypted with
Cobblestone-256 (AES-256-GCM in 16 KiB chunks, key-committing) under a key
derived from the archive's random data key.  Plain blocking Python with no
Twisted import; L{securevault.storage.SecureFileStorage} owns the layout.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from securevault.stores.blobs import BlobReader, BlobWriter, BlobWriters

FORMAT_VERSION = 1
META_FORMAT = "securevault-archive"
# Before the metadata store, each archive had a .meta file beside its body.
META_SUFFIX = ".meta"
DATA_KEY_BYTES = 32
NONCE_BYTES = 12
CHUNK_PLAINTEXT_BYTES = 16384
CHUNK_TAG_BYTES = 16
IO_BLOCK_BYTES = 1 << 20
# Downloads go out in half-MiB blocks, and in 1 MiB blocks once the client
# has taken a few MiB (L{ArchiveReader.use_block_bytes}): half the pool
# round trips, measured 2.17 against 2.41-2.52 server CPU-s/GiB and 517-522
# against 446-477 MB/s on a 512 MiB download (docs/PERFORMANCE.md), while a
# client that stalls holds the smaller buffers (64 slow readers: +190 MiB
# with half-MiB blocks, +392 MiB with 1 MiB ones).
READ_BLOCK_BYTES = 512 * 1024
BULK_READ_BLOCK_BYTES = 1024 * 1024
COMPRESSION_SAMPLE_BYTES = 64 * 1024
# Deflated data is fed to inflate this much at a time: what inflate leaves
# unconsumed (its output is capped) comes back as a copy, so feeding a whole
# 512 KiB block copied its rest again on every read.
INFLATE_FEED_BYTES = 128 * 1024
# The zip64 data descriptor after the member's data (docs/FORMAT.md §6).
_DESCRIPTOR = struct.Struct("<4sLQQ")
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
COMPRESSION_LEVEL = 1
# Deflate a file only when level 1 shrinks the sample to at most this share.
COMPRESSIBLE_RATIO = 0.9
MAX_FILENAME_BYTES = 255

_ARCHIVE_ID = re.compile(r"\A[0-9a-f]{32}\Z")
OWNER_ID = re.compile(r"\A[0-9A-Za-z_-]{1,64}\Z")


class StorageError(Exception):
    """Base of the errors this module raises on purpose."""


class IntegrityError(StorageError):
    """An archive on disk fails authentication: tampered, truncated, or
    under a key we do not hold.  No plaintext of it has been returned."""


class ArchiveNotFound(StorageError):
    """No archive with that id for that owner."""


class InvalidFilename(StorageError, ValueError):
    """The filename breaks the contract's rules (API.md, POST /upload-file)."""


class QuotaExceeded(StorageError):
    """The owner's quota would be exceeded; nothing was kept."""


class StoreUnavailable(StorageError):
    """The metadata or blob store cannot be reached (an outage, not a fault
    of the request); the message names the store, never a secret."""


class StorageFull(StorageError):
    """The disk (or the filesystem's quota) is full; nothing was kept."""


@dataclass(frozen=True)
class ArchiveInfo:
    """What the API reports of an archive, plus what the reader needs."""

    id: str
    filename: str
    size: int
    sha256: str
    created_at: str
    created_ns: int
    method: str
    data_offset: int
    compressed_size: int
    stored_bytes: int

    def public(self) -> dict[str, Any]:
        """The fields API.md shows for a file."""
        return {
            "id": self.id,
            "filename": self.filename,
            "size": self.size,
            "sha256": self.sha256,
            "created_at": self.created_at,
        }


def check_filename(filename: str) -> None:
    """Raise L{InvalidFilename} unless C{filename} is allowed by API.md:
    non-empty, at most 255 UTF-8 bytes, not C{.}/C{..}, no C{/}, C{\\}, or
    control character (Unicode category Cc)."""
    if not filename:
        raise InvalidFilename("The filename is empty.")
    try:
        encoded = filename.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidFilename("The filename is not valid Unicode text.") from error
    if len(encoded) > MAX_FILENAME_BYTES:
        raise InvalidFilename("The filename is longer than 255 UTF-8 bytes.")
    if filename in (".", ".."):
        raise InvalidFilename("The filename may not be '.' or '..'.")
    for character in filename:
        code = ord(character)
        if character in "/\\":
            raise InvalidFilename("The filename may not contain '/' or '\\'.")
        if code < 0x20 or 0x7F <= code <= 0x9F:
            raise InvalidFilename("The filename may not contain control characters.")


def is_archive_id(value: str) -> bool:
    """Whether C{value} has the shape of an archive id (so never a path)."""
    return bool(_ARCHIVE_ID.match(value))


def rfc3339(timestamp: float) -> str:
    """UTC time as API.md writes it: C{2026-11-24T17:30:00Z}."""
    return datetime.fromtimestamp(int(timestamp), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def derive_key(data_key: bytes, purpose: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"securevault/v1/" + purpose).derive(data_key)


def context_bytes(purpose: bytes, owner_id: str, archive_id: str) -> bytes:
    """Binds a ciphertext to its owner and archive, so entries cannot be swapped."""
    return b"securevault/v1/%s\x00%s\x00%s" % (purpose, owner_id.encode(), archive_id.encode())


def ciphertext_buffer(plaintext_bytes: int) -> bytearray:
    """A buffer large enough for C{update_into} of that many bytes."""
    chunks = plaintext_bytes // CHUNK_PLAINTEXT_BYTES + 2
    return bytearray(plaintext_bytes + CHUNK_PLAINTEXT_BYTES + chunks * CHUNK_TAG_BYTES + 256)


def translate_os_error(error: OSError) -> Exception:
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageFull("No space left on the vault's disk.")
    return error


PARALLEL_HASH_BYTES = 256 * 1024


@dataclass(frozen=True)
class ArchiveCheckpoint:
    """Where an unfinished archive stands (L{ArchiveWriter.checkpoint}): its
    ciphertext so far is a Cobblestone-256 stream's header and
    C{ciphertext_bytes} of whole chunks, which hold the ZIP stream's first
    C{stream_bytes - len(tail)} bytes; C{tail} is the rest, which the
    encryptor holds until its chunk is full.  That ZIP stream holds the
    file's first C{size} bytes."""

    size: int
    stream_bytes: int
    ciphertext_bytes: int
    tail: bytes


def _sync_flush(member: Any, sink: _EncryptingSink) -> None:
    """Make a deflated ZIP member's output so far decodable on its own
    (zlib's Z_SYNC_FLUSH: a few bytes, compression goes on after it).
    zipfile has no public call for this: it reaches into the member's
    compressor and compressed-size count (CPython's C{_ZipWriteFile}
    C{_compressor} and C{_compress_size}, the same in 3.11 to 3.13); the
    one place that does."""
    compressor = getattr(member, "_compressor", None)
    if compressor is None:
        return  # stored: everything written is in the stream already
    flushed = compressor.flush(zlib.Z_SYNC_FLUSH)
    member._compress_size += len(flushed)
    sink.write(flushed)


class ArchiveIndex(Protocol):
    """What a writer needs from the store it publishes into (in practice
    L{securevault.storage.SecureFileStorage}): where bodies go, the clock,
    and the index row that is the commit point."""

    @property
    def blobs(self) -> BlobWriters: ...

    clock_ns: Callable[[], int]

    def write_meta(self, owner_id: str, info: ArchiveInfo, data_key: bytes, *, quota: int | None = None) -> None:
        """Commit the index row; with C{quota}, only if the owner's archives
        stay within it (else L{QuotaExceeded}, nothing committed)."""

    def discard_unindexed_blob(self, owner_id: str, archive_id: str) -> None: ...


class _EncryptingSink:
    """The file object zipfile writes to: encrypts and writes to a blob.

    It has C{tell} but no C{seek}, so zipfile streams (data descriptors)
    instead of seeking back to patch headers.
    """

    def __init__(self, blob: BlobWriter, encryptor: Cobblestone256Encryptor) -> None:
        self._blob = blob
        self._encryptor = encryptor
        # One buffer for the life of the upload, grown to the largest write
        # (a fresh 1 MiB bytearray per write costs more than the encryption
        # itself); a small upload never holds a large one.
        self._buffer = bytearray()
        self.position = 0
        self.ciphertext_bytes = 0
        self.closed = False
        # A second blob that also gets the ciphertext (L{ArchiveWriter.tee}).
        self.copy_to: BlobWriter | None = None
        # For checkpoints, a copy of the plaintext the encryptor holds back
        # until its chunk is full (less than one chunk).
        self.keeps_tail = False
        self.tail = b""

    def write(self, data: bytes | memoryview) -> int:
        size = len(data)
        if size == 0 or self.closed:
            # Once the upload is aborted, whatever zipfile still flushes
            # goes nowhere.
            return size
        if len(self._buffer) < size + 2 * CHUNK_PLAINTEXT_BYTES:
            self._buffer = ciphertext_buffer(size)
        produced = self._encryptor.update_into(data, self._buffer)
        self._emit(memoryview(self._buffer)[:produced])
        self.position += size
        if self.keeps_tail:
            held = self.position % CHUNK_PLAINTEXT_BYTES  # what the encryptor holds now
            if held == 0:
                self.tail = b""
            elif size >= held:
                self.tail = bytes(data[size - held :])
            else:  # no chunk was completed: the old tail plus these bytes
                self.tail += bytes(data)
        return size

    def _emit(self, ciphertext: memoryview | bytes) -> None:
        if not ciphertext:
            return
        try:
            self._blob.write(ciphertext)
            if self.copy_to is not None:
                self.copy_to.write(ciphertext)
        except OSError as error:
            raise translate_os_error(error) from error
        self.ciphertext_bytes += len(ciphertext)

    def finish(self) -> None:
        self._emit(self._encryptor.finalize())

    def release(self) -> None:
        """Free the buffer now that nothing more is written: whatever still
        holds the writer (a stream in a reference cycle until the garbage
        collector runs) does not hold a MiB with it."""
        self._buffer = bytearray()

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass


class ArchiveWriter:
    """Streams one upload into a new archive.

    Call L{write} any number of times, then L{commit}, or L{abort} at any
    point; never two calls at once.  Nothing is visible until L{commit}
    returns; any failure removes what was written.

    C{max_bytes} cuts the upload off as soon as its stored bytes pass it;
    C{quota} is the owner's limit, checked by the commit itself, so that
    uploads running at once cannot each use what is left.
    """

    def __init__(
        self,
        storage: ArchiveIndex,
        owner_id: str,
        filename: str,
        *,
        max_bytes: int | None = None,
        quota: int | None = None,
        checkpoints: bool = False,
    ) -> None:
        check_filename(filename)
        self._storage = storage
        self._owner_id = owner_id
        self._filename = filename
        self._max_bytes = max_bytes
        self._quota = quota
        self.archive_id = secrets.token_hex(16)
        self._created_ns = storage.clock_ns()
        self._data_key = os.urandom(DATA_KEY_BYTES)
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._sample: list[bytes] = []
        self._sample_bytes = 0
        self._zip: zipfile.ZipFile | None = None
        self._member: Any = None
        self._zip_info: zipfile.ZipInfo | None = None
        self._data_offset = 0
        self._method = "stored"
        self._done = False
        self._hash_thread: ThreadPoolExecutor | None = None
        self._blob = storage.blobs.writer(owner_id, self.archive_id)
        encryptor = Cobblestone256Encryptor(
            derive_key(self._data_key, b"body-key"), context_bytes(b"body", owner_id, self.archive_id)
        )
        self._sink = _EncryptingSink(self._blob, encryptor)
        # A resumable upload's writer: keep what L{checkpoint} needs.
        self._sink.keeps_tail = checkpoints

    @property
    def size(self) -> int:
        """Plaintext bytes received so far."""
        return self._size

    @property
    def data_key(self) -> bytes:
        """The archive's random data key (a staged upload seals it in its
        pieces, L{securevault.core.runs})."""
        return self._data_key

    def write(self, data: bytes | memoryview) -> None:
        """Add the next bytes of the file (a view is not kept past the call)."""
        if self._done:
            raise StorageError("write after commit or abort")
        try:
            self._size += len(data)
            if self._zip is not None and len(data) >= PARALLEL_HASH_BYTES:
                # SHA-256, deflate, CRC-32 and the encryption all release the
                # GIL: hash this block on a helper thread while this one
                # compresses or stores, encrypts and writes it (~8 % of a text
                # upload's time; a tus upload of random data in 8 MiB PATCHes
                # 1.14 -> 1.02-1.08 s, raw uploads unchanged within noise).
                # Waited for before returning, so the digest still sees the
                # blocks in order.
                hashing = self._hasher().submit(self._sha256.update, data)
                try:
                    self._member.write(data)
                finally:
                    hashing.result()
            else:
                self._sha256.update(data)
                if self._zip is None:
                    self._sample.append(bytes(data))  # data may be a reused buffer
                    self._sample_bytes += len(data)
                    if self._sample_bytes >= COMPRESSION_SAMPLE_BYTES:
                        self._start_member()
                else:
                    self._member.write(data)
            if self._max_bytes is not None and self._sink.ciphertext_bytes > self._max_bytes:
                raise QuotaExceeded("The upload exceeds the storage quota.")
        except BaseException:
            self.abort()
            raise

    def tee(self, blob: BlobWriter | None) -> None:
        """Also write the archive's ciphertext from here on into C{blob}
        (None: stop).  A resumable upload keeps each PATCH's share of the
        archive in a piece of its own this way (L{securevault.staging})."""
        self._sink.copy_to = blob

    def sync(self) -> None:
        """Make the ciphertext written so far durable: its blob is a journal
        (L{securevault.stores.blobs.JournalWriter}), the resumable upload's
        record of every acknowledged byte."""
        sync: Callable[[], None] | None = getattr(self._blob, "sync", None)
        if sync is None:
            raise StorageError("only a journal blob syncs before its commit")
        try:
            sync()
        except OSError as error:
            self.abort()
            raise translate_os_error(error) from error

    def checkpoint(self) -> ArchiveCheckpoint:
        """Push everything received so far into the ZIP stream (starting the
        member if the compression sample is not full yet; a deflated member
        is sync-flushed, so the stream inflates to every byte received) and
        say where the stream stands: a reader of the ciphertext written so
        far plus L{ArchiveCheckpoint.tail} recovers every byte."""
        if self._done:
            raise StorageError("checkpoint after commit or abort")
        try:
            if self._zip is None:
                self._start_member()
            _sync_flush(self._member, self._sink)
        except BaseException:
            self.abort()
            raise
        return ArchiveCheckpoint(
            size=self._size,
            stream_bytes=self._sink.position,
            ciphertext_bytes=self._sink.ciphertext_bytes,
            tail=self._sink.tail,
        )

    def _hasher(self) -> ThreadPoolExecutor:
        """This upload's helper thread for SHA-256, started on first use
        (uploads written in large blocks need it) and stopped with the
        writer: no thread outlives its upload or starts at import."""
        if self._hash_thread is None:
            self._hash_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="securevault-sha256")
        return self._hash_thread

    def _stop_hasher(self) -> None:
        if self._hash_thread is not None:
            self._hash_thread.shutdown(wait=True)
            self._hash_thread = None

    def _start_member(self) -> None:
        """Choose deflate or stored from the sample, then start the ZIP entry."""
        sample = b"".join(self._sample)
        self._sample = []
        probe = sample[:COMPRESSION_SAMPLE_BYTES]
        if probe and len(zlib.compress(probe, COMPRESSION_LEVEL)) <= COMPRESSIBLE_RATIO * len(probe):
            self._method, compression = "deflated", zipfile.ZIP_DEFLATED
        else:
            self._method, compression = "stored", zipfile.ZIP_STORED
        self._zip = zipfile.ZipFile(
            cast(IO[bytes], self._sink),
            "w",
            compression=compression,
            compresslevel=COMPRESSION_LEVEL,
            allowZip64=True,
        )
        # ZIP (DOS) times start in 1980; a clock before that is clamped.
        info = zipfile.ZipInfo(self._filename, max(time.gmtime(self._created_ns / 1e9)[:6], (1980, 1, 1, 0, 0, 0)))
        info.compress_type = compression
        # ZipFile.open(info, "w") takes the level from the ZipInfo, not from
        # the ZipFile: unset, zlib's default (6) runs three times slower.
        # (A slot named _compresslevel up to 3.12, kept as an alias later.)
        setattr(info, "_compresslevel", COMPRESSION_LEVEL)
        info.external_attr = 0o600 << 16
        self._zip_info = info
        self._member = self._zip.open(info, "w", force_zip64=True)
        self._data_offset = self._sink.position
        if sample:
            self._member.write(sample)

    def commit(self) -> ArchiveInfo:
        """Finish the archive, make it durable, and publish it atomically."""
        if self._done:
            raise StorageError("commit after commit or abort")
        try:
            if self._zip is None:
                self._start_member()
            assert self._zip is not None
            self._member.close()
            assert self._zip_info is not None
            compressed_size = self._zip_info.compress_size
            self._zip.close()
            self._sink.finish()
            if self._max_bytes is not None and self._sink.ciphertext_bytes > self._max_bytes:
                raise QuotaExceeded("The upload exceeds the storage quota.")
            # The blob is durable before the index row that names it commits:
            # a crash in between leaves an orphan blob (swept), never a row
            # without a blob.
            self._blob.commit()
            info = ArchiveInfo(
                id=self.archive_id,
                filename=self._filename,
                size=self._size,
                sha256=self._sha256.hexdigest(),
                created_at=rfc3339(self._created_ns / 1e9),
                created_ns=self._created_ns,
                method=self._method,
                data_offset=self._data_offset,
                compressed_size=compressed_size,
                stored_bytes=self._sink.ciphertext_bytes,
            )
            try:
                self._storage.write_meta(self._owner_id, info, self._data_key, quota=self._quota)
            except BaseException:
                self._storage.discard_unindexed_blob(self._owner_id, self.archive_id)
                raise
            self._done = True
            self._stop_hasher()
            self._sink.release()
            return info
        except OSError as error:
            self.abort()
            raise translate_os_error(error) from error
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Forget the upload and remove its temp file.  Safe to call twice."""
        self._done = True
        self._stop_hasher()
        self._sink.closed = True  # from here on, zipfile's writes go nowhere
        member, archive = self._member, self._zip
        self._member = self._zip = None
        for closable in (member, archive):
            if closable is not None:
                try:
                    closable.close()
                except Exception:
                    pass  # already failing; nothing of it reaches the disk
        self._sink.release()
        self._blob.abort()


class ArchiveReader:
    """Reads an archive back, returning only authenticated plaintext.

    Each L{read} returns the next bytes of the original file, or C{b""} at the
    end, after the whole stream (the ZIP trailer included) has been
    authenticated and the size checked.  Any failure raises
    L{IntegrityError}, after calling C{on_integrity_failure} (the storage
    remembers the archive, so the next read fails before any byte).

    What is checked beyond the AEAD (docs/FORMAT.md §6.1): a deflated
    member's CRC-32 against its authenticated data descriptor (inflate's
    output, end to end), and with C{check_sha256} the whole file's SHA-256
    against the sealed metadata (C{securevault-admin verify}; downloads
    leave it to the client, which checks it).
    """

    def __init__(
        self,
        blob: BlobReader,
        info: ArchiveInfo,
        body_key: bytes,
        context: bytes,
        *,
        on_integrity_failure: Callable[[], None] | None = None,
        check_sha256: bool = True,
    ) -> None:
        self.info = info
        self._on_integrity_failure = on_integrity_failure
        self._blob: BlobReader | None = blob
        # A blob that can read into our buffer spares a fresh bytes per block.
        self._readinto: Callable[[memoryview], int] | None = getattr(blob, "readinto", None)
        self._decryptor = Cobblestone256Decryptor(body_key, context)
        # Sized by the archive: many small downloads must not each hold a MiB.
        self._read_bytes = max(1, min(READ_BLOCK_BYTES, info.stored_bytes))
        self._cipher = bytearray(self._read_bytes) if self._readinto is not None else None
        self._plain = ciphertext_buffer(self._read_bytes)
        self._zip_position = 0
        self._data_left = info.compressed_size
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if info.method == "deflated" else None
        self._inflate_input = memoryview(b"")
        self._pending_data = memoryview(b"")
        self._descriptor = bytearray()
        self._crc = 0
        self._sha256 = hashlib.sha256() if check_sha256 else None
        self._produced = 0
        self._finished = False
        self._eof = False

    def use_block_bytes(self, size: int) -> None:
        """Read C{size} bytes of the blob at a time from now on (never less
        than now, never more than the archive): a download that proves fast
        gets larger blocks.  Between reads only: views of the old buffers
        handed out stay valid, new blocks go to new buffers."""
        size = max(1, min(size, self.info.stored_bytes))
        if size <= self._read_bytes:
            return
        self._read_bytes = size
        if self._cipher is not None:
            self._cipher = bytearray(size)
        self._plain = ciphertext_buffer(size)

    def _next_plaintext(self) -> memoryview:
        """Decrypt the next block of the ZIP stream; empty at its end.  The
        view is of a buffer the next call decrypts into again."""
        if self._eof:
            return memoryview(b"")
        if self._blob is None:
            raise IntegrityError("read after close")
        ciphertext: bytes | memoryview
        if self._readinto is not None and self._cipher is not None:
            ciphertext = memoryview(self._cipher)[: self._readinto(memoryview(self._cipher))]
        else:
            ciphertext = self._blob.read(self._read_bytes)
        try:
            if not ciphertext:
                self._eof = True
                return memoryview(self._decryptor.finalize())
            produced = self._decryptor.update_into(ciphertext, self._plain)
        except (InvalidTag, ValueError) as error:
            raise IntegrityError("archive fails authentication") from error
        return memoryview(self._plain)[:produced]

    def _trailer(self, view: memoryview) -> None:
        """Keep the start of the authenticated trailer: the data descriptor."""
        want = _DESCRIPTOR.size - len(self._descriptor)
        if want > 0 and view:
            self._descriptor += view[:want]

    def _next_data(self) -> memoryview:
        """The next slice of the member's (compressed) data."""
        while True:
            view = self._next_plaintext()
            if not view and self._eof:
                return view
            skip = self.info.data_offset - self._zip_position
            if skip > 0:
                step = min(skip, len(view))
                self._zip_position += step
                view = view[step:]
            if not view:
                continue
            take = min(len(view), self._data_left)
            self._data_left -= take
            self._zip_position += take
            self._trailer(view[take:])
            if take == 0:
                continue  # trailer: authenticated, kept in _finish
            return view[:take]

    def read(self, size: int = IO_BLOCK_BYTES) -> bytes:
        """The next at most about C{size} bytes of the file; b"" at the end."""
        try:
            return self._read(size)
        except IntegrityError:
            # A read after close is the caller's mistake, not the archive's.
            if self._blob is not None and self._on_integrity_failure is not None:
                self._on_integrity_failure()
            raise

    def _read(self, size: int) -> bytes:
        if self._finished:
            return b""
        while True:
            if self._inflater is not None and self._inflate_input:
                feed = self._inflate_input[:INFLATE_FEED_BYTES]
                try:
                    out = self._inflater.decompress(feed, size)
                except zlib.error as error:
                    raise IntegrityError("archive data does not inflate") from error
                used = len(feed) - len(self._inflater.unconsumed_tail)
                self._inflate_input = self._inflate_input[used:]
                if out:
                    self._crc = zlib.crc32(out, self._crc)
                    self._account(out)
                    return out
                continue
            if self._pending_data:
                data, self._pending_data = self._pending_data, memoryview(b"")
            elif self._data_left == 0:
                return self._finish()
            else:
                data = self._next_data()
            if not data:
                raise IntegrityError("archive is truncated")
            if self._inflater is not None:
                self._inflate_input = data
                continue
            if len(data) > size:
                # Serve the rest next time; it is consumed before the buffer
                # it views is decrypted into again.
                self._pending_data = data[size:]
                data = data[:size]
            # The one copy of a stored download: the block leaves the pool
            # for the reactor while this buffer is decrypted into again.
            out = bytes(data)
            self._account(out)
            return out

    def _account(self, out: bytes) -> None:
        self._produced += len(out)
        if self._produced > self.info.size:
            raise IntegrityError("archive holds more data than recorded")
        if self._sha256 is not None:
            self._sha256.update(out)

    def _finish(self) -> bytes:
        tail = b""
        if self._inflater is not None:
            tail = self._inflater.flush()
            if tail:
                self._crc = zlib.crc32(tail, self._crc)
                self._account(tail)
        # Authenticate the rest of the stream: the ZIP trailer and the end marker.
        while not self._eof:
            self._trailer(self._next_plaintext())
        if self._produced != self.info.size:
            raise IntegrityError("archive content does not match its recorded size")
        if self._inflater is not None:
            self._check_descriptor()
        if self._sha256 is not None and self._sha256.hexdigest() != self.info.sha256:
            raise IntegrityError("archive content does not match its recorded digest")
        self._finished = True
        return tail

    def _check_descriptor(self) -> None:
        """Inflate's output against the CRC-32 the writer computed over the
        original bytes, stored in the (authenticated) data descriptor: it
        catches what the AEAD cannot, a fault of inflate or of this reader."""
        if len(self._descriptor) != _DESCRIPTOR.size:
            raise IntegrityError("archive has no data descriptor")
        signature, crc, compressed, size = _DESCRIPTOR.unpack(self._descriptor)
        if (signature, crc, compressed, size) != (
            _DESCRIPTOR_SIGNATURE,
            self._crc,
            self.info.compressed_size,
            self.info.size,
        ):
            raise IntegrityError("archive content does not match its CRC-32")

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read():
            yield chunk

    def close(self) -> None:
        if self._blob is not None:
            self._blob.close()
            self._blob = None
