# -*- test-case-name: tests.test_staging -*-
"""Resumable (tus) uploads: bytes staged encrypted until the last one arrives.

Plain blocking Python with no Twisted import: the daemon runs every call here
in its worker pool.  The layout (docs/FORMAT.md, "Staged uploads"):

  - the upload row in the metadata store (owner, declared length, offset
    acknowledged so far, quota reservation, expiry) with a document holding
    the upload's random key, wrapped by the master key, and the filename
    sealed under it;
  - one piece per acknowledged PATCH body: a blob of its own beside the
    owner's archives (a random 32-hex-digit name), encrypted as one
    Cobblestone-256 stream under a key derived from the upload key and bound
    to the upload and the piece's offset; its row names it.

A piece is acknowledged only once its blob is durable and its row committed
(the row moves the upload's offset in the same transaction), so a crash
keeps exactly what was acknowledged.  When the last byte is in, the pieces
are decoded in order into an L{ArchiveWriter}: the archive is one like any
raw upload, and its row replaces the upload's rows in one transaction.

Done at the end, that pass is the slow path.  On the fast one the archive
is written as the PATCHes arrive: the process that took an upload's PATCHes
in order keeps its L{ArchiveWriter} (an L{_Assembler}, at most
L{MAX_ASSEMBLERS} of them, least recently used evicted), each PATCH body
goes straight into it, and the archive ciphertext it makes is what survives
a crash, encrypted once (L{securevault.core.runs}): on the local blob store
the archive's file is the upload's I{journal}, made durable at the end of
each PATCH, and the PATCH's piece holds only where its run starts and ends
in it (each byte written once); elsewhere (S3) the ciphertext goes into the
PATCH's piece as well, a I{run piece}.  The last PATCH commits the archive.  A PATCH that fails after its first byte spoils the
archive being written (its bytes are in it, unacknowledged): the assembler
is dropped, and like any upload whose assembler missed a piece (a restart,
another node or process took a PATCH, eviction) the upload finishes on the
slow path, from the pieces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securevault.core.archive import (
    CHUNK_PLAINTEXT_BYTES,
    CHUNK_TAG_BYTES,
    DATA_KEY_BYTES,
    IO_BLOCK_BYTES,
    NONCE_BYTES,
    OWNER_ID,
    ArchiveInfo,
    ArchiveWriter,
    IntegrityError,
    StorageError,
    StoreUnavailable,
    check_filename,
    ciphertext_buffer,
    context_bytes,
    derive_key,
    is_archive_id,
    translate_os_error,
)
from securevault.core.keys import UnwrapError
from securevault.core.ranges import read_up_to
from securevault.core.runs import (
    RUN_END_BYTES,
    RUN_HEAD_BYTES,
    RunDecoder,
    RunHead,
    open_run_end,
    open_run_head,
    seal_run_end,
    seal_run_head,
)
from securevault.storage import SecureFileStorage
from securevault.stores.blobs import (
    BlobNotFound,
    BlobReader,
    BlobStore,
    BlobStoreError,
    BlobWriter,
    BlobWriters,
    JournalStore,
    JournalWriter,
)
from securevault.stores.metadata import (
    MetadataError,
    UploadConflict,
    UploadGone,
    UploadPiece,
    UploadRecord,
)

UPLOAD_FORMAT = "securevault-upload"
UPLOAD_FORMAT_VERSION = 1
# What an upload of n bytes may take in the blob store once it is an archive
# (stored, incompressible: a tag per 16 KiB chunk, the stream's header and
# final chunk, the ZIP headers with their ZIP64 fields and a 255-byte name):
# reserved against the quota from the POST.
ARCHIVE_OVERHEAD_BYTES = 4096
CHECKSUM_ALGORITHMS = ("sha1", "sha256")
# Uploads assembled on the fast path at once, per process: each holds an
# ArchiveWriter's buffers (about 1 MiB) and an open temp blob.
MAX_ASSEMBLERS = 8


def reservation(length: int) -> int:
    """The quota an upload of C{length} bytes reserves: an upper bound of its
    archive's stored bytes."""
    chunks = length // CHUNK_PLAINTEXT_BYTES + 1
    return length + chunks * CHUNK_TAG_BYTES + ARCHIVE_OVERHEAD_BYTES


class UploadNotFound(StorageError):
    """No such upload for that owner (finished, deleted, expired or never)."""


class OffsetMismatch(StorageError):
    """The PATCH does not start at the upload's offset (tus 409)."""


class ChecksumMismatch(StorageError):
    """The PATCH body does not match its Upload-Checksum (tus 460)."""


class LengthExceeded(StorageError):
    """The PATCH would carry the upload past its declared length."""


@dataclass(frozen=True)
class UploadStatus:
    """What HEAD answers, and what the resources need of an upload."""

    upload_id: str
    length: int
    offset: int
    expires_at: float
    archive: ArchiveInfo | None = None  # set once the upload became an archive


@dataclass(frozen=True)
class PieceResult:
    """What a PATCH answers: the new offset, and the archive when complete.
    Then C{leftover} names the pieces whose blobs are to go with the
    upload's journal (no row names them any more):
    L{UploadStaging.remove_upload_blobs}, after the answer, since removing
    a blob costs a directory fsync each."""

    offset: int
    expires_at: float
    archive: ArchiveInfo | None
    leftover: tuple[UploadPiece, ...] = ()


def is_upload_id(value: str) -> bool:
    return is_archive_id(value)


class _Assembler:
    """An upload's archive, written as its PATCHes arrive: the
    L{ArchiveWriter} holds every acknowledged byte up to L{offset} and
    nothing else (a PATCH that fails after writing into it drops it)."""

    def __init__(
        self,
        record: UploadRecord,
        index: _FinishingIndex,
        writer: ArchiveWriter,
        touched: float,
        journals: JournalStore | None,
    ) -> None:
        self.owner_id = record.owner_id
        self.upload_id = record.upload_id
        self.index = index
        self.writer = writer
        self.offset = 0  # the acknowledged bytes in the writer
        self.ciphertext_bytes = 0  # the archive's ciphertext the pieces hold
        self.pieces: list[UploadPiece] = []
        self.touched = touched
        self.claimed = False  # a PATCH holds it
        # A piece row naming the journal was committed, or may have been (a
        # commit whose answer was lost): the journal must stay.
        self.journal_named = False
        self._journals = journals

    @property
    def journaled(self) -> bool:
        """Whether its writer writes into a journal, which holds the runs
        (else each piece holds its own)."""
        return self._journals is not None

    def abort(self) -> None:
        """Stop writing.  A journal holding acknowledged runs stays for the
        slow path; one holding none goes (a new assembler starts another
        at offset 0: refused first PATCHes must not pile up journals)."""
        try:
            self.writer.abort()
            if self._journals is not None and not self.journal_named:
                self._journals.delete_journals(self.owner_id, self.upload_id, self.writer.archive_id)
        except (OSError, BlobStoreError):
            pass  # a temp blob or journal left behind goes with the next start's cleanup or sweep


class UploadStaging:
    """Resumable uploads over a L{SecureFileStorage}'s stores; safe to call
    from any thread.  Its only state is this process's assemblers (the fast
    path), under a lock; every fact about an upload is in the stores."""

    def __init__(self, storage: SecureFileStorage, expiry_seconds: float) -> None:
        self.storage = storage
        self.expiry_seconds = expiry_seconds
        # Where the fast path's runs stay in the archive's journal (each
        # byte written once); elsewhere each piece holds its run.
        self._journals = storage.blobs if isinstance(storage.blobs, JournalStore) else None
        self._lock = threading.Lock()
        # Upload id -> assembler, least recently used first; a claimed one
        # (a PATCH holds it) stays listed but is never evicted.
        self._assemblers: OrderedDict[str, _Assembler] = OrderedDict()
        # How this process finished uploads (for tests and benchmarks).
        self.fast_finishes = 0
        self.slow_finishes = 0

    @property
    def live_assemblers(self) -> int:
        """Uploads being assembled on the fast path in this process now."""
        with self._lock:
            return len(self._assemblers)

    # -- the fast path's assemblers -----------------------------------------

    def _claim_assembler(self, record: UploadRecord, filename: str, now: float) -> _Assembler | None:
        """The assembler a PATCH at the upload's offset hands its piece to:
        the one this process kept if it has every acknowledged piece, a new
        one at offset 0, else None (the upload finishes on the slow path)."""
        upload_id = record.upload_id
        dropped: list[_Assembler] = []
        try:
            with self._lock:
                found = self._assemblers.get(upload_id)
                if found is not None:
                    if found.claimed:
                        return None  # another PATCH at this offset holds it; one of them gets a 409
                    if found.owner_id == record.owner_id and found.offset == record.upload_offset:
                        found.claimed = True
                        found.touched = now
                        self._assemblers.move_to_end(upload_id)
                        return found
                    dropped.append(self._assemblers.pop(upload_id))  # it missed a piece
                if record.upload_offset != 0:
                    return None
                while len(self._assemblers) >= MAX_ASSEMBLERS:
                    idle = next((key for key, value in self._assemblers.items() if not value.claimed), None)
                    if idle is None:
                        return None  # every one is held: this upload takes the slow path
                    dropped.append(self._assemblers.pop(idle))
                # Close the evicted before opening the new: never more than
                # MAX_ASSEMBLERS journals open.  Under the lock, as the
                # opening: short (an idle writer's hashing thread is idle),
                # and only pool threads wait for this lock.
                for assembler in dropped:
                    assembler.abort()
                dropped.clear()
                try:
                    index, writer = self._archive_writer(record.owner_id, upload_id, filename, fast=True)
                except Exception:
                    return None  # the piece reports a failing store, if it fails too
                assembler = _Assembler(record, index, writer, now, self._journals)
                assembler.claimed = True
                self._assemblers[upload_id] = assembler
                return assembler
        finally:
            for assembler in dropped:
                assembler.abort()

    def _release_assembler(self, assembler: _Assembler, *, keep: bool, abort: bool = True) -> None:
        """A PATCH is done with the assembler: kept for the next one, or
        dropped (aborted, its temp blob removed, unless C{abort} is false:
        its archive was committed)."""
        with self._lock:
            if self._assemblers.get(assembler.upload_id) is assembler:
                if keep:
                    assembler.claimed = False
                    return
                del self._assemblers[assembler.upload_id]
        if abort:
            assembler.abort()

    def _drop_assembler(self, upload_id: str) -> None:
        """Forget an idle assembler of the upload (deleted or expired); a
        held one is dropped by its PATCH, whose commit then fails."""
        with self._lock:
            found = self._assemblers.get(upload_id)
            if found is None or found.claimed:
                return
            del self._assemblers[upload_id]
        found.abort()

    def _archive_writer(
        self, owner_id: str, upload_id: str, filename: str, *, fast: bool = False
    ) -> tuple[_FinishingIndex, ArchiveWriter]:
        """The writer of the upload's archive, which replaces the upload's
        rows when it commits; the quota is set on the index at the end.
        The fast path's writer checkpoints, and writes into a journal where
        the blob store keeps them."""
        journals = self._journals if fast else None
        index = _FinishingIndex(self.storage, upload_id, journals)
        try:
            return index, ArchiveWriter(index, owner_id, filename, checkpoints=fast)
        except OSError as error:
            raise translate_os_error(error) from error
        except BlobStoreError as error:
            raise StoreUnavailable(str(error)) from error

    @property
    def _blobs(self) -> BlobStore:
        return self.storage.blobs

    def _call(self, function: Callable[..., object], *args: object) -> object:
        """A metadata call, its failures in the storage vocabulary."""
        return self.storage.index_call(function, *args)

    # -- the upload's document ----------------------------------------------

    def _seal(self, owner_id: str, upload_id: str, upload_key: bytes, filename: str, length: int) -> tuple[str, str]:
        keyring = self.storage.keyring
        key_id, wrapped = keyring.wrap(upload_key, context_bytes(b"upload-key", owner_id, upload_id))
        nonce = os.urandom(NONCE_BYTES)
        plaintext = json.dumps({"filename": filename, "length": length}, ensure_ascii=False).encode("utf-8")
        sealed = AESGCM(derive_key(upload_key, b"upload-metadata-key")).encrypt(
            nonce, plaintext, context_bytes(b"upload-metadata", owner_id, upload_id)
        )
        document = {
            "format": UPLOAD_FORMAT,
            "version": UPLOAD_FORMAT_VERSION,
            "key_id": key_id,
            "wrapped_key": base64.b64encode(wrapped).decode("ascii"),
            "metadata": base64.b64encode(nonce + sealed).decode("ascii"),
        }
        return key_id, json.dumps(document)

    def _unseal(self, record: UploadRecord) -> tuple[str, bytes]:
        """The filename and the upload key; L{IntegrityError} when the row
        was changed behind the server's back."""
        owner_id, upload_id = record.owner_id, record.upload_id
        try:
            document = json.loads(record.document)
            if document["format"] != UPLOAD_FORMAT or document["version"] != UPLOAD_FORMAT_VERSION:
                raise ValueError("unknown upload format")
            upload_key = self.storage.keyring.unwrap(
                str(document["key_id"]),
                base64.b64decode(document["wrapped_key"], validate=True),
                context_bytes(b"upload-key", owner_id, upload_id),
            )
            sealed = base64.b64decode(document["metadata"], validate=True)
            fields = json.loads(
                AESGCM(derive_key(upload_key, b"upload-metadata-key")).decrypt(
                    sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context_bytes(b"upload-metadata", owner_id, upload_id)
                )
            )
            if fields["length"] != record.length:
                raise ValueError("the declared length was changed")
            return str(fields["filename"]), upload_key
        except (UnwrapError, ValueError, KeyError, TypeError, InvalidTag, binascii.Error) as error:
            raise IntegrityError(f"upload {upload_id} fails authentication") from error

    def _record(self, owner_id: str, upload_id: str) -> UploadRecord:
        if not is_upload_id(upload_id) or not OWNER_ID.match(owner_id):
            raise UploadNotFound(upload_id)
        record = self._call(self.storage.metadata.get_upload, owner_id, upload_id)
        if record is None:
            raise UploadNotFound(upload_id)
        assert isinstance(record, UploadRecord)
        return record

    # -- the operations tus needs -------------------------------------------

    def create(self, owner_id: str, filename: str, length: int, now: float, *, quota: int | None) -> UploadStatus:
        """A new upload (POST); its whole length is reserved against the
        quota at once (L{QuotaExceeded} when it does not fit).  An upload of
        length 0 is its (empty) archive at once."""
        check_filename(filename)
        if not OWNER_ID.match(owner_id) or length < 0:
            raise ValueError("invalid upload")
        upload_id = secrets.token_hex(16)
        if length == 0:
            info = self.storage.writer(owner_id, filename, quota=quota).commit()
            return UploadStatus(upload_id, 0, 0, now, info)
        upload_key = os.urandom(DATA_KEY_BYTES)
        key_id, document = self._seal(owner_id, upload_id, upload_key, filename, length)
        expires_at = now + self.expiry_seconds
        record = UploadRecord(upload_id, owner_id, length, 0, reservation(length), expires_at, key_id, document)
        self._call(self.storage.metadata.put_upload, record, quota)
        return UploadStatus(upload_id, length, 0, expires_at)

    def status(self, owner_id: str, upload_id: str, *, quota: int | None = None) -> UploadStatus:
        """The upload's offset (HEAD).  An upload whose every byte was
        acknowledged but that is not an archive yet (the server stopped in
        between) is finished now."""
        record = self._record(owner_id, upload_id)
        if record.upload_offset == record.length:
            info = self.finish(owner_id, upload_id, quota=quota)
            return UploadStatus(upload_id, record.length, record.length, record.expires_at, info)
        return UploadStatus(upload_id, record.length, record.upload_offset, record.expires_at)

    def piece_writer(
        self,
        owner_id: str,
        upload_id: str,
        offset: int,
        *,
        declared: int | None = None,
        checksum: tuple[str, bytes] | None = None,
        quota: int | None = None,
        now: Callable[[], float],
    ) -> PieceWriter:
        """A writer for one PATCH body starting at C{offset} (of
        C{declared} bytes, when the request said): L{OffsetMismatch} unless
        that is the upload's offset now, L{LengthExceeded} when the body
        would pass the declared length."""
        record = self._record(owner_id, upload_id)
        if record.upload_offset != offset:
            raise OffsetMismatch(f"The upload is at offset {record.upload_offset}, not {offset}.")
        if declared is not None and offset + declared > record.length:
            raise LengthExceeded("The body would carry the upload past its Upload-Length.")
        filename, upload_key = self._unseal(record)
        assembler = self._claim_assembler(record, filename, now())
        try:
            return PieceWriter(self, record, upload_key, assembler, checksum=checksum, quota=quota, now=now)
        except BaseException:
            if assembler is not None:
                self._release_assembler(assembler, keep=True)
            raise

    def finish(self, owner_id: str, upload_id: str, *, quota: int | None) -> ArchiveInfo:
        """Make the complete upload one archive, exactly like a raw upload:
        the pieces decrypted in order, block by block, into an
        L{ArchiveWriter}; the archive's row replaces the upload's rows in one
        transaction; then the pieces' blobs go."""
        info, pieces = self._finish(owner_id, upload_id, quota=quota)
        self.remove_upload_blobs(owner_id, upload_id, pieces)
        return info

    def _finish(self, owner_id: str, upload_id: str, *, quota: int | None) -> tuple[ArchiveInfo, list[UploadPiece]]:
        """L{finish}, but the pieces' blobs are left for the caller."""
        record = self._record(owner_id, upload_id)
        if record.upload_offset != record.length:
            raise OffsetMismatch("The upload is not complete.")
        filename, upload_key = self._unseal(record)
        pieces = self._call(self.storage.metadata.list_upload_pieces, upload_id)
        assert isinstance(pieces, list)
        self._drop_assembler(upload_id)
        index, writer = self._archive_writer(owner_id, upload_id, filename)
        index.quota = quota
        try:
            expected = 0
            runs = RunDecoder(upload_id, owner_id, writer.write)
            for piece in pieces:
                if piece.piece_offset != expected:
                    raise IntegrityError(f"upload {upload_id} has a gap at {expected}")
                self._copy_piece(owner_id, upload_id, upload_key, piece, writer, runs)
                expected += piece.length
            runs.finish()
            if expected != record.length:
                raise IntegrityError(f"upload {upload_id} holds {expected} of {record.length} bytes")
            info = writer.commit()
        except UploadGone as error:
            raise UploadNotFound(upload_id) from error
        except BaseException:
            writer.abort()
            raise
        with self._lock:
            self.slow_finishes += 1
        return info, pieces

    def _finish_assembled(
        self, record: UploadRecord, assembler: _Assembler, *, quota: int | None
    ) -> tuple[ArchiveInfo, list[UploadPiece]]:
        """The fast path's end: the last piece is in, so the archive is
        complete and replaces the upload's rows (the pieces' blobs are left
        for the caller).  An assembler that missed a piece falls back to the
        slow path."""
        if assembler.offset != record.length:
            assembler.abort()
            return self._finish(record.owner_id, record.upload_id, quota=quota)
        assembler.index.quota = quota
        try:
            info = assembler.writer.commit()  # aborts itself on failure
        except UploadGone as error:
            raise UploadNotFound(record.upload_id) from error
        with self._lock:
            self.fast_finishes += 1
        return info, assembler.pieces

    def _copy_piece(
        self,
        owner_id: str,
        upload_id: str,
        upload_key: bytes,
        piece: UploadPiece,
        writer: ArchiveWriter,
        runs: RunDecoder,
    ) -> None:
        """Write the piece's bytes into C{writer}: a run piece's through
        C{runs}, a piece encrypted on its own decrypted (the runs before it
        are finished first)."""
        try:
            body = self._blobs.reader(owner_id, piece.blob_id)
        except BlobNotFound as error:
            raise IntegrityError(f"upload {upload_id} lost a piece") from error
        except BlobStoreError as error:
            raise StoreUnavailable(str(error)) from error
        try:
            first = read_up_to(body, RUN_HEAD_BYTES)
            head = open_run_head(upload_key, owner_id, upload_id, piece.piece_offset, first)
            if head is not None and head.journaled:
                self._copy_journaled_run(upload_key, owner_id, piece, head, body, runs)
            elif head is not None:
                self._copy_run(upload_key, owner_id, piece, head, body, runs)
            else:
                runs.finish()
                self._copy_sealed_piece(upload_key, owner_id, piece, first, body, writer)
        except (InvalidTag, ValueError) as error:
            raise IntegrityError(f"upload {upload_id} fails authentication") from error
        except BlobStoreError as error:
            raise StoreUnavailable(str(error)) from error
        finally:
            body.close()

    def _copy_run(
        self, upload_key: bytes, owner_id: str, piece: UploadPiece, head: RunHead, body: BlobReader, runs: RunDecoder
    ) -> None:
        """A run piece into C{runs}: its run decrypted as it is read, its
        end (the last L{RUN_END_BYTES}) held back and opened."""
        runs.start_run(head)
        pending = bytearray()
        while block := body.read(IO_BLOCK_BYTES):
            pending += block
            usable = len(pending) - RUN_END_BYTES
            if usable > 0:
                with memoryview(pending) as view, view[:usable] as run:
                    runs.feed(run)
                del pending[:usable]
        if len(pending) != RUN_END_BYTES:
            raise IntegrityError(f"upload {piece.upload_id} has a cut run piece")
        end = open_run_end(upload_key, owner_id, piece.upload_id, piece.piece_offset, bytes(pending))
        runs.end_run(end, piece.piece_offset + piece.length)

    def _copy_journaled_run(
        self, upload_key: bytes, owner_id: str, piece: UploadPiece, head: RunHead, body: BlobReader, runs: RunDecoder
    ) -> None:
        """A journaled run piece into C{runs}: its end is all the piece holds
        after its head; the run is read from the archive's journal."""
        upload_id = piece.upload_id
        sealed_end = read_up_to(body, RUN_END_BYTES + 1)
        if len(sealed_end) != RUN_END_BYTES:
            raise IntegrityError(f"upload {upload_id} has a damaged run piece")
        end = open_run_end(upload_key, owner_id, upload_id, piece.piece_offset, sealed_end)
        length = end.ciphertext_bytes - head.run_start
        if self._journals is None or length < 0:
            raise IntegrityError(f"upload {upload_id} has a run piece without its journal")
        try:
            journal = self._journals.journal_reader(owner_id, upload_id, head.archive_id, head.run_start, length)
        except BlobNotFound as error:
            raise IntegrityError(f"upload {upload_id} lost its journal") from error
        try:
            runs.start_run(head)
            while block := journal.read(IO_BLOCK_BYTES):
                with memoryview(block) as run:
                    runs.feed(run)
        finally:
            journal.close()
        runs.end_run(end, piece.piece_offset + piece.length)

    def _copy_sealed_piece(
        self,
        upload_key: bytes,
        owner_id: str,
        piece: UploadPiece,
        first: bytes,
        body: BlobReader,
        writer: ArchiveWriter,
    ) -> None:
        """A piece encrypted on its own (written where no archive was being
        assembled), C{first} its first bytes, already read."""
        decryptor = Cobblestone256Decryptor(*piece_key(upload_key, owner_id, piece.upload_id, piece.piece_offset))
        size = 0
        block = first
        while block:
            plain = decryptor.update(block)
            if plain:
                size += len(plain)
                writer.write(plain)
            block = body.read(IO_BLOCK_BYTES)
        plain = decryptor.finalize()
        if plain:
            size += len(plain)
            writer.write(plain)
        if size != piece.length:
            raise IntegrityError(f"upload {piece.upload_id} has a piece of the wrong length")

    def delete(self, owner_id: str, upload_id: str) -> None:
        """Forget the upload (tus termination): rows first, then blobs."""
        if not is_upload_id(upload_id) or not OWNER_ID.match(owner_id):
            raise UploadNotFound(upload_id)
        self._drop_assembler(upload_id)
        pieces = self._call(self.storage.metadata.delete_upload, owner_id, upload_id)
        if pieces is None:
            raise UploadNotFound(upload_id)
        assert isinstance(pieces, list)
        self.remove_upload_blobs(owner_id, upload_id, pieces)

    def sweep_expired(self, now: float) -> int:
        """Remove the uploads that made no progress for the expiry period,
        with their pieces and reservations; returns how many.  Idle
        assemblers untouched that long go too (their upload was finished or
        removed by another process)."""
        with self._lock:
            stale = [
                upload_id
                for upload_id, assembler in self._assemblers.items()
                if not assembler.claimed and assembler.touched + self.expiry_seconds <= now
            ]
        for upload_id in stale:
            self._drop_assembler(upload_id)
        expired = self._call(self.storage.metadata.expired_uploads, now)
        assert isinstance(expired, list)
        removed = 0
        for owner_id, upload_id in expired:
            try:
                self.delete(owner_id, upload_id)
                removed += 1
            except UploadNotFound:
                pass  # finished or deleted meanwhile
        return removed

    def remove_upload_blobs(
        self, owner_id: str, upload_id: str, pieces: list[UploadPiece] | tuple[UploadPiece, ...]
    ) -> None:
        """The upload's rows are gone (it finished or was deleted): remove
        its pieces' blobs and its journals.  Failures are left to the orphan
        sweep."""
        removals: list[Callable[[], None]] = [partial(self._blobs.delete, owner_id, piece.blob_id) for piece in pieces]
        if self._journals is not None:
            removals.append(partial(self._journals.delete_journals, owner_id, upload_id))
        for remove in removals:
            try:
                remove()
            except (OSError, BlobStoreError):
                pass  # no row names it now: the orphan sweep removes it


def piece_key(upload_key: bytes, owner_id: str, upload_id: str, offset: int) -> tuple[bytes, bytes]:
    """The Cobblestone-256 key and context of the piece at C{offset}: bound
    to its owner, upload and place, so pieces cannot be swapped or moved."""
    return derive_key(upload_key, b"piece-key"), context_bytes(b"piece", owner_id, f"{upload_id}/{offset}")


class _FinishingIndex:
    """The storage as an L{ArchiveWriter} publishes into it, except that the
    archive's row replaces the finishing upload's rows (and reservation)."""

    def __init__(self, storage: SecureFileStorage, upload_id: str, journals: JournalStore | None = None) -> None:
        self._storage = storage
        self._upload_id = upload_id
        self.blobs: BlobWriters = storage.blobs if journals is None else _JournalBlobs(journals, upload_id)
        self.clock_ns = storage.clock_ns
        # Set by the finishing request: an assembler's writer is opened by
        # the first PATCH, and the quota in force is the last one's.
        self.quota: int | None = None

    def write_meta(self, owner_id: str, info: ArchiveInfo, data_key: bytes, *, quota: int | None = None) -> None:
        self._storage.write_meta(owner_id, info, data_key, quota=self.quota, finishing_upload=self._upload_id)

    def discard_unindexed_blob(self, owner_id: str, archive_id: str) -> None:
        self._storage.discard_unindexed_blob(owner_id, archive_id)


class _JournalBlobs:
    """The blob store as a fast-path L{ArchiveWriter} writes into it: its
    blob is the upload's journal."""

    def __init__(self, journals: JournalStore, upload_id: str) -> None:
        self._journals = journals
        self._upload_id = upload_id

    def writer(self, owner_id: str, archive_id: str) -> JournalWriter:
        return self._journals.journal_writer(owner_id, self._upload_id, archive_id)


class PieceWriter:
    """One PATCH body becoming one encrypted piece.  Call L{write} for each
    block, then L{commit}, or L{abort} at any point; nothing is kept unless
    L{commit} returns.

    With an L{_Assembler} (the fast path) the body goes into the upload's
    archive, and the piece is a run piece holding the archive's ciphertext
    this body made; without one, the piece is the body encrypted on its own.
    """

    def __init__(
        self,
        staging: UploadStaging,
        record: UploadRecord,
        upload_key: bytes,
        assembler: _Assembler | None,
        *,
        checksum: tuple[str, bytes] | None,
        quota: int | None,
        now: Callable[[], float],
    ) -> None:
        self._staging = staging
        self._record = record
        self._upload_key = upload_key
        self._quota = quota
        self._now = now
        self._checksum = checksum
        self._hash = hashlib.new(checksum[0]) if checksum is not None else None
        self._size = 0
        self._done = False
        self.assembler = assembler
        self._fed = False  # the assembler's writer took bytes of this body
        self._encryptor: Cobblestone256Encryptor | None = None
        self.blob_id = secrets.token_hex(16)
        self._buffer = bytearray()
        try:
            self._blob: BlobWriter = staging.storage.blobs.writer(record.owner_id, self.blob_id)
            if assembler is None:
                key, context = piece_key(upload_key, record.owner_id, record.upload_id, record.upload_offset)
                self._encryptor = Cobblestone256Encryptor(key, context)
            else:
                journaled = assembler.journaled
                head = RunHead(
                    assembler.writer.archive_id, assembler.writer.data_key, assembler.ciphertext_bytes, journaled
                )
                self._blob.write(
                    seal_run_head(upload_key, record.owner_id, record.upload_id, record.upload_offset, head)
                )
                if not journaled:
                    assembler.writer.tee(self._blob)
        except OSError as error:
            raise translate_os_error(error) from error
        except BlobStoreError as error:
            raise StoreUnavailable(str(error)) from error

    @contextmanager
    def _aborting(self) -> Iterator[None]:
        """Any failure inside aborts the piece (nothing of it is kept);
        disk and blob-store errors in the storage vocabulary."""
        try:
            yield
        except OSError as error:
            self.abort()
            raise translate_os_error(error) from error
        except BlobStoreError as error:
            self.abort()
            raise StoreUnavailable(str(error)) from error
        except BaseException:
            self.abort()
            raise

    def _release(self, *, keep: bool) -> None:
        """Done with the assembler: kept for the next PATCH unless the
        upload is gone or this body spoiled it (its writer took bytes that
        are not acknowledged)."""
        assembler, self.assembler = self.assembler, None
        if assembler is not None:
            assembler.writer.tee(None)
            self._staging._release_assembler(assembler, keep=keep and not self._fed)

    def write(self, data: bytes) -> None:
        if self._done:
            raise StorageError("write after commit or abort")
        with self._aborting():
            self._size += len(data)
            if self._record.upload_offset + self._size > self._record.length:
                raise LengthExceeded("The body would carry the upload past its Upload-Length.")
            if self._hash is not None:
                self._hash.update(data)
            if self.assembler is not None:
                self._fed = True
                self.assembler.writer.write(data)  # its ciphertext goes into the piece too
                return
            assert self._encryptor is not None
            if len(self._buffer) < len(data) + 2 * CHUNK_PLAINTEXT_BYTES:
                self._buffer = ciphertext_buffer(len(data))
            produced = self._encryptor.update_into(data, self._buffer)
            if produced:
                self._blob.write(memoryview(self._buffer)[:produced])

    def _seal_piece(self) -> int:
        """Write the piece's last bytes; returns the archive ciphertext the
        pieces hold once it is acknowledged (run pieces)."""
        record = self._record
        if self.assembler is None:
            assert self._encryptor is not None
            self._blob.write(self._encryptor.finalize())
            return 0
        writer = self.assembler.writer
        checkpoint = writer.checkpoint()  # its flush goes into the run too
        if self.assembler.journaled:
            writer.sync()  # the run is in the journal: durable before its piece
        writer.tee(None)
        self._blob.write(
            seal_run_end(self._upload_key, record.owner_id, record.upload_id, record.upload_offset, checkpoint)
        )
        return checkpoint.ciphertext_bytes

    def commit(self) -> PieceResult:
        """Check the checksum, make the piece durable, then commit its row
        (the acknowledgement); the archive too when this was the last byte
        (the pieces' blobs are then the result's C{leftover})."""
        if self._done:
            raise StorageError("commit after commit or abort")
        record = self._record
        staging = self._staging
        with self._aborting():
            if self._checksum is not None and self._hash is not None:
                if not secrets.compare_digest(self._hash.digest(), self._checksum[1]):
                    raise ChecksumMismatch("The body does not match its Upload-Checksum.")
            if self._size == 0:  # nothing to keep (a resent final PATCH, say)
                self.abort()
                offset = record.upload_offset
                expires_at = record.expires_at
            else:
                ciphertext_bytes = self._seal_piece()
                self._blob.commit()
                self._done = True
                expires_at = self._now() + staging.expiry_seconds
                piece = UploadPiece(record.upload_id, record.upload_offset, self._size, self.blob_id)
                if self.assembler is not None:
                    self.assembler.journal_named = True
                try:
                    offset = staging.storage.metadata.add_upload_piece(record.owner_id, piece, expires_at)
                except (UploadGone, UploadConflict) as error:
                    self._discard_blob()
                    if isinstance(error, UploadGone):
                        self._release(keep=False)
                        raise UploadNotFound(record.upload_id) from error
                    raise OffsetMismatch("Another request moved the upload's offset.") from error
                except MetadataError as error:
                    # A lost answer may hide a commit: keep the blob when in
                    # doubt (the orphan sweep removes it if no row names it).
                    raise StoreUnavailable(str(error)) from error
                if self.assembler is not None:
                    self.assembler.offset = offset
                    self.assembler.ciphertext_bytes = ciphertext_bytes
                    self.assembler.pieces.append(piece)
                    self._fed = False  # its bytes are acknowledged now
        assembler, self.assembler = self.assembler, None
        if offset != record.length:
            if assembler is not None:
                staging._release_assembler(assembler, keep=True)
            return PieceResult(offset, expires_at, None)
        if assembler is None:
            archive, pieces = staging._finish(record.owner_id, record.upload_id, quota=self._quota)
        else:
            try:
                archive, pieces = staging._finish_assembled(record, assembler, quota=self._quota)
            except BaseException:
                staging._release_assembler(assembler, keep=False)
                raise
            staging._release_assembler(assembler, keep=False, abort=False)
        return PieceResult(offset, expires_at, archive, tuple(pieces))

    def _discard_blob(self) -> None:
        try:
            self._staging.storage.blobs.delete(self._record.owner_id, self.blob_id)
        except (OSError, BlobStoreError):
            pass

    def abort(self) -> None:
        """Forget the piece; safe to call twice, and after a commit (a no-op).
        The assembler stays for the retry unless this body went into it."""
        self._release(keep=True)
        if self._done:
            return
        self._done = True
        try:
            self._blob.abort()
        except (OSError, BlobStoreError):
            pass
