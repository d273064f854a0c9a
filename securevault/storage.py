# -*- test-case-name: tests.test_storage -*-
"""SecureFileStorage: each upload becomes one ZIP archive, encrypted at rest.

Plain blocking Python with no Twisted import: the daemon runs every call here
in its worker pool.  The format is described in docs/FORMAT.md.

An archive is two things, kept behind two narrow interfaces:

  - its body in the blob store (L{securevault.stores.blobs}): the ZIP archive,
    encrypted as one Cobblestone-256 stream (AES-256-GCM in 16 KiB chunks,
    key-committing) under a key derived from the archive's random data key;
  - its row in the metadata store's archive index (L{securevault.stores.metadata}):
    a JSON document with the data key wrapped by the master key and the
    metadata (filename, size, sha256, ...) sealed under the data key.

The blob is made durable first and the index row committed last, so the row
is the commit point: a blob without a row is debris from a crash, removed at
start or by the orphan sweep.  Master key rotation rewrites only rows.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from cryptography.cobblestone import Cobblestone256Decryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securevault.core.archive import (
    CHUNK_PLAINTEXT_BYTES,
    FORMAT_VERSION,
    IO_BLOCK_BYTES,
    META_FORMAT,
    NONCE_BYTES,
    OWNER_ID,
    ArchiveInfo,
    ArchiveNotFound,
    ArchiveReader,
    ArchiveWriter,
    IntegrityError,
    QuotaExceeded,
    StorageFull,
    StoreUnavailable,
    context_bytes,
    derive_key,
    is_archive_id,
    translate_os_error,
)
from securevault.core.generation import SharedGeneration, listing_slot
from securevault.core.keys import KeyFileError, Keyring, KeyringFile, UnwrapError
from securevault.core.passphrase import PassphraseError
from securevault.core.ranges import InflatingRangeReader, PlaintextReader, StoredRangeReader
from securevault.stores.blobs import (
    BlobNotFound,
    BlobReader,
    BlobStore,
    BlobStoreError,
    JournalStore,
    LocalBlobStore,
)
from securevault.stores.metadata import (
    ArchiveRecord,
    MetadataError,
    MetadataFull,
    MetadataStore,
    OverQuota,
    SqliteMetadataStore,
)

__all__ = ["SecureFileStorage"]


T = TypeVar("T")

# How many decrypted metadata entries a node keeps, across all owners.
INFO_CACHE_ENTRIES = 100_000
# Archives that failed authentication while being read, remembered so that
# the next read fails before any byte: at most this many, each for this long
# (an operator may restore an archive while the daemon runs).
INTEGRITY_MARK_ENTRIES = 4096
INTEGRITY_MARK_SECONDS = 600.0
METADATA_FILE = "vault.db"


class SecureFileStorage:
    """Archives by owner, encrypted at rest; safe to call from any thread.

    Without explicit stores it uses the embedded defaults under C{root}:
    SQLite in C{vault.db} and blobs under C{archives/}.
    """

    def __init__(
        self,
        root: Path | None,
        keyring: Keyring,
        *,
        metadata: MetadataStore | None = None,
        blobs: BlobStore | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        keyring_file: KeyringFile | None = None,
        cache_listings: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
        generation: SharedGeneration | None = None,
    ) -> None:
        if metadata is None or blobs is None:
            if root is None:
                raise ValueError("a data directory is needed for the embedded stores")
            Path(root).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.metadata: MetadataStore = metadata or SqliteMetadataStore(Path(root or ".") / METADATA_FILE)
        self.blobs: BlobStore = blobs or LocalBlobStore(Path(root or ".") / "archives")
        self._keyring = keyring
        self.clock_ns = clock_ns
        # Decrypted metadata by (owner, archive id), valid while the row's
        # document is the same: a listing decrypts only what it has not seen.
        # Rows come from the metadata store each time, so every node sees
        # every other node's uploads and deletes at once.
        self._infos: dict[tuple[str, str], tuple[str, ArchiveInfo]] = {}
        self._infos_lock = threading.Lock()
        # With cache_listings (one node: this process is the only writer of
        # the archive index), each owner's whole listing is kept in memory
        # once read, updated by this process's uploads and deletes, so GET
        # /get-files needs no pool and no I/O.  A version counter, bumped by
        # every change, keeps a listing read while an upload commits from
        # being cached without it.
        self._listings: dict[str, builtins.list[ArchiveInfo]] | None = {} if cache_listings else None
        self._listing_versions: dict[str, int] = {}
        # With a shared generation as well (the workers of one node: others
        # write the same index), a cached listing is trusted only while its
        # owner's slot still reads the value it was built at; every upload
        # or delete bumps that slot after the index row commits.
        self._generation = generation
        self._listed_at: dict[str, int] = {}
        # When set, the keyring is reloaded whenever that file changes, so a
        # running daemon follows `securevault-admin key rotate`.
        self._keyring_file = keyring_file
        self._keyring_stamp = self._stamp()
        # (owner, archive id) → when it failed authentication while being
        # read (monotonic seconds), oldest first; see _check_not_marked.
        self._failed_reads: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._failed_lock = threading.Lock()
        self._monotonic = monotonic
        self.integrity_mark_entries = INTEGRITY_MARK_ENTRIES
        self.integrity_mark_seconds = INTEGRITY_MARK_SECONDS

    def _stamp(self) -> tuple[int, int, int] | None:
        if self._keyring_file is None:
            return None
        try:
            status = os.stat(self._keyring_file.path)
        except OSError:
            return None
        return (status.st_mtime_ns, status.st_size, status.st_ino)

    @property
    def keyring(self) -> Keyring:
        if self._keyring_file is not None:
            stamp = self._stamp()
            if stamp is not None and stamp != self._keyring_stamp:
                try:
                    self._keyring = self._keyring_file.load()
                    self._keyring_stamp = stamp
                except (KeyFileError, PassphraseError, OSError):
                    pass  # mid-replacement or damaged: keep the keys we have
        return self._keyring

    # -- crash debris -----------------------------------------------------

    def recover(self) -> int:
        """Remove what a crash left behind: incomplete blob writes and blobs
        that were never committed to the index.  Run once at start of a
        single node, before any upload; returns how many were removed."""
        return self.blobs.remove_incomplete() + self.sweep_orphans(grace_seconds=None)

    def orphans(self, grace_seconds: float | None) -> builtins.list[tuple[str, str]]:
        """Blobs with no index row, older than C{grace_seconds} (None: all).

        Another node may have just committed a blob whose row is a moment
        away: while nodes run, only a grace period tells debris apart."""
        blobs = builtins.list(self.blobs.list())  # listed before the index is read
        # Pieces of resumable uploads are named by their upload's rows.
        indexed = self.metadata.all_archive_ids() | self.metadata.all_upload_blob_ids()
        horizon = None if grace_seconds is None else time.time() - grace_seconds
        return [
            (entry.owner_id, entry.archive_id)
            for entry in blobs
            if (entry.owner_id, entry.archive_id) not in indexed and (horizon is None or entry.modified < horizon)
        ]

    def discard_unindexed_blob(self, owner_id: str, archive_id: str) -> None:
        """After a failed index write: remove the blob only if its row is
        known to be absent.  A commit whose answer was lost (a network
        database) may have landed; when in doubt the blob stays, and the
        orphan sweep removes it later if no row names it."""
        try:
            if self.metadata.get_archive(owner_id, archive_id) is None:
                self.blobs.delete(owner_id, archive_id)
        except Exception:
            pass

    def sweep_orphans(self, grace_seconds: float | None) -> int:
        removed = 0
        for owner_id, archive_id in self.orphans(grace_seconds):
            self.blobs.delete(owner_id, archive_id)
            removed += 1
        return removed + self._sweep_journals(grace_seconds)

    def _sweep_journals(self, grace_seconds: float | None) -> int:
        """Remove the journals of resumable uploads that are gone (a crash
        between an upload's end and its cleanup), older than
        C{grace_seconds} (None: all); returns how many uploads' journals
        went.  A journal is made only once its upload's row exists, so a
        missing row means debris."""
        journals = self.blobs if isinstance(self.blobs, JournalStore) else None
        if journals is None:
            return 0
        horizon = None if grace_seconds is None else time.time() - grace_seconds
        uploads = {
            (entry.owner_id, entry.upload_id)
            for entry in journals.journals()
            if horizon is None or entry.modified < horizon
        }
        removed = 0
        for owner_id, upload_id in sorted(uploads):
            if self.metadata.get_upload(owner_id, upload_id) is None:
                journals.delete_journals(owner_id, upload_id)
                removed += 1
        return removed

    # -- metadata -------------------------------------------------------

    def index_call(self, function: Callable[..., T], *args: object) -> T:
        """A metadata store call, its failures in the storage vocabulary."""
        try:
            return function(*args)
        except OverQuota as error:
            raise QuotaExceeded("The upload exceeds the storage quota.") from error
        except MetadataFull as error:
            raise StorageFull("No space left for the vault's metadata.") from error
        except MetadataError as error:
            raise StoreUnavailable(str(error)) from error

    def seal_document(
        self, owner_id: str, info: ArchiveInfo, data_key: bytes, keyring: Keyring | None = None
    ) -> ArchiveRecord:
        """The index row for an archive: data key wrapped, metadata sealed."""
        key_id, wrapped = (keyring or self.keyring).wrap(data_key, context_bytes(b"data-key", owner_id, info.id))
        nonce = os.urandom(NONCE_BYTES)
        plaintext = json.dumps(
            {
                "filename": info.filename,
                "size": info.size,
                "sha256": info.sha256,
                "created_at": info.created_at,
                "created_ns": info.created_ns,
                "method": info.method,
                "data_offset": info.data_offset,
                "compressed_size": info.compressed_size,
                "stored_bytes": info.stored_bytes,
            },
            ensure_ascii=False,
        ).encode("utf-8")
        sealed = AESGCM(derive_key(data_key, b"metadata-key")).encrypt(
            nonce, plaintext, context_bytes(b"metadata", owner_id, info.id)
        )
        document = {
            "format": META_FORMAT,
            "version": FORMAT_VERSION,
            "key_id": key_id,
            "wrapped_key": base64.b64encode(wrapped).decode("ascii"),
            "metadata": base64.b64encode(nonce + sealed).decode("ascii"),
        }
        return ArchiveRecord(owner_id, info.id, info.created_ns, info.stored_bytes, key_id, json.dumps(document))

    def write_meta(
        self,
        owner_id: str,
        info: ArchiveInfo,
        data_key: bytes,
        *,
        quota: int | None = None,
        finishing_upload: str | None = None,
    ) -> None:
        """Commit the archive's index row: from here on it exists.  With
        C{quota}, only if the owner's archives, this one included, and the
        reservations of resumable uploads stay within it (checked atomically
        with the insert); else L{QuotaExceeded} and nothing was committed.
        With C{finishing_upload}, that resumable upload's rows go in the
        same transaction (see L{securevault.staging})."""
        record = self.seal_document(owner_id, info, data_key)
        if finishing_upload is not None:
            self.index_call(self.metadata.put_archive, record, quota, finishing_upload)
        elif quota is None:
            self.index_call(self.metadata.put_archive, record)
        else:
            self.index_call(self.metadata.put_archive, record, quota)
        self._update_listing(owner_id, add=info)

    def _update_listing(self, owner_id: str, *, add: ArchiveInfo | None = None, remove: str | None = None) -> None:
        """After an index row committed: this process's cached listing
        follows, and the other workers' go stale (the shared generation)."""
        bumped = self._generation.bump(listing_slot(owner_id)) if self._generation is not None else None
        with self._infos_lock:
            self._listing_versions[owner_id] = self._listing_versions.get(owner_id, 0) + 1
            if self._listings is None or (listing := self._listings.get(owner_id)) is None:
                return
            if bumped is not None:
                if self._listed_at.get(owner_id) != bumped - 1:
                    # Another change landed since it was read: read again.
                    self._listings.pop(owner_id, None)
                    return
                self._listed_at[owner_id] = bumped
            listing = [info for info in listing if info.id != remove]
            if add is not None and all(info.id != add.id for info in listing):
                listing.append(add)
                listing.sort(key=lambda info: (-info.created_ns, info.id))
            self._listings[owner_id] = listing

    def cached_list(self, owner_id: str) -> builtins.list[ArchiveInfo] | None:
        """The owner's listing if it is in memory (no I/O: safe on the reactor
        thread), else None.  Only with cache_listings."""
        if self._listings is None:
            return None
        at = self._generation.value(listing_slot(owner_id)) if self._generation is not None else None
        with self._infos_lock:
            listing = self._listings.get(owner_id)
            if listing is None:
                return None
            if at is not None and self._listed_at.get(owner_id) != at:
                del self._listings[owner_id]  # another process changed it
                return None
            return builtins.list(listing)

    def unseal(self, record: ArchiveRecord) -> tuple[ArchiveInfo, bytes]:
        """Decrypt an index row's document; returns the metadata and data key."""
        owner_id, archive_id = record.owner_id, record.archive_id
        try:
            document = json.loads(record.document)
            if document["format"] != META_FORMAT or document["version"] != FORMAT_VERSION:
                raise IntegrityError(f"archive {archive_id} has an unknown format")
            wrapped = base64.b64decode(document["wrapped_key"], validate=True)
            sealed = base64.b64decode(document["metadata"], validate=True)
            data_key = self.keyring.unwrap(
                str(document["key_id"]), wrapped, context_bytes(b"data-key", owner_id, archive_id)
            )
            plaintext = AESGCM(derive_key(data_key, b"metadata-key")).decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context_bytes(b"metadata", owner_id, archive_id)
            )
            fields = json.loads(plaintext)
            info = ArchiveInfo(id=archive_id, **fields)
        except (UnwrapError, InvalidTag, ValueError, KeyError, TypeError, binascii.Error) as error:
            raise IntegrityError(f"archive {archive_id} metadata fails authentication") from error
        return info, data_key

    def _record(self, owner_id: str, archive_id: str) -> ArchiveRecord:
        if not is_archive_id(archive_id) or not OWNER_ID.match(owner_id):
            raise ArchiveNotFound(archive_id)
        record = self.index_call(self.metadata.get_archive, owner_id, archive_id)
        if record is None:
            raise ArchiveNotFound(archive_id)
        return record

    def _read_meta(self, owner_id: str, archive_id: str) -> tuple[ArchiveInfo, bytes]:
        return self.unseal(self._record(owner_id, archive_id))

    def rewrap(self, owner_id: str, archive_id: str, keyring: Keyring) -> bool:
        """Rewrap one archive's data key under C{keyring}'s current key.

        Only the index row changes.  Returns False when it already was.
        """
        record = self._record(owner_id, archive_id)
        context = context_bytes(b"data-key", owner_id, archive_id)
        try:
            document = json.loads(record.document)
            # The document's key id decides, not the column beside it: a row
            # whose two disagree is rewrapped, never stranded on a retired key.
            if record.key_id == keyring.current_id and document["key_id"] == keyring.current_id:
                return False
            data_key = self.keyring.unwrap(
                str(document["key_id"]), base64.b64decode(document["wrapped_key"], validate=True), context
            )
        except (UnwrapError, ValueError, KeyError, TypeError, binascii.Error) as error:
            raise IntegrityError(f"archive {archive_id} data key fails authentication") from error
        key_id, wrapped = keyring.wrap(data_key, context)
        document["key_id"] = key_id
        document["wrapped_key"] = base64.b64encode(wrapped).decode("ascii")
        return self.index_call(
            self.metadata.replace_archive_key, owner_id, archive_id, record.key_id, key_id, json.dumps(document)
        )

    # -- the operations the API needs ----------------------------------

    def writer(
        self, owner_id: str, filename: str, *, max_bytes: int | None = None, quota: int | None = None
    ) -> ArchiveWriter:
        """Start a streamed upload; see L{ArchiveWriter}.

        C{quota} (the owner's limit in stored bytes) is enforced exactly at
        the commit, however many uploads run at once on however many nodes;
        an upload that alone exceeds what is left now is also cut off while
        it streams.  C{max_bytes} caps this archive's stored bytes only.
        """
        if not OWNER_ID.match(owner_id):
            raise ValueError("invalid owner id")
        if quota is not None:
            remaining = max(0, quota - self.usage(owner_id) - self.index_call(self.metadata.reserved, owner_id))
            max_bytes = remaining if max_bytes is None else min(max_bytes, remaining)
        try:
            return ArchiveWriter(self, owner_id, filename, max_bytes=max_bytes, quota=quota)
        except OSError as error:
            raise translate_os_error(error) from error
        except BlobStoreError as error:
            raise StoreUnavailable(str(error)) from error

    def store(
        self, owner_id: str, filename: str, data: bytes, *, max_bytes: int | None = None, quota: int | None = None
    ) -> ArchiveInfo:
        """Store a whole file held in memory (the JSON upload form); C{quota}
        and C{max_bytes} as for L{writer}."""
        writer = self.writer(owner_id, filename, max_bytes=max_bytes, quota=quota)
        view = memoryview(data)
        for start in range(0, len(view), IO_BLOCK_BYTES):
            writer.write(view[start : start + IO_BLOCK_BYTES])
        return writer.commit()

    def archive_ids(self, owner_id: str) -> builtins.list[str]:
        return [record.archive_id for record in self.index_call(self.metadata.list_archives, owner_id)]

    def list(self, owner_id: str) -> builtins.list[ArchiveInfo]:
        """The owner's archives, newest first.  An archive whose metadata fails
        authentication is left out here (and reported by verify)."""
        while True:
            cached = self.cached_list(owner_id)
            if cached is not None:
                return cached
            at = self._generation.value(listing_slot(owner_id)) if self._generation is not None else None
            with self._infos_lock:
                version = self._listing_versions.get(owner_id, 0)
            infos = self._read_listing(owner_id)
            if self._listings is None:
                return infos
            with self._infos_lock:
                if self._listing_versions.get(owner_id, 0) == version:
                    if at is None:
                        self._listings.setdefault(owner_id, builtins.list(infos))
                    else:
                        self._listings[owner_id] = builtins.list(infos)
                        self._listed_at[owner_id] = at
                    return infos
            # An upload or delete landed while we read: read again.

    def _read_listing(self, owner_id: str) -> builtins.list[ArchiveInfo]:
        infos = []
        for record in self.index_call(self.metadata.list_archives, owner_id):
            key = (owner_id, record.archive_id)
            with self._infos_lock:
                cached = self._infos.get(key)
            if cached is not None and cached[0] == record.document:
                infos.append(cached[1])
                continue
            try:
                info = self.unseal(record)[0]
            except IntegrityError:
                continue
            with self._infos_lock:
                if len(self._infos) >= INFO_CACHE_ENTRIES:
                    self._infos.clear()
                self._infos[key] = (record.document, info)
            infos.append(info)
        return infos

    def info(self, owner_id: str, archive_id: str) -> ArchiveInfo:
        return self._read_meta(owner_id, archive_id)[0]

    def find_newest(self, owner_id: str, filename: str) -> ArchiveInfo:
        """The newest archive with exactly that filename."""
        for info in self.list(owner_id):
            if info.filename == filename:
                return info
        raise ArchiveNotFound(filename)

    def _body(self, owner_id: str, archive_id: str) -> BlobReader:
        try:
            return self.blobs.reader(owner_id, archive_id)
        except BlobNotFound as error:
            raise IntegrityError(f"archive {archive_id} has no body") from error
        except BlobStoreError as error:
            raise StoreUnavailable(str(error)) from error

    def _blocks(self, body: BlobReader, archive_id: str) -> Iterator[bytes]:
        try:
            while block := body.read(IO_BLOCK_BYTES):
                yield block
        except BlobStoreError as error:
            raise StoreUnavailable(str(error)) from error

    def open(self, owner_id: str, archive_id: str, *, check_sha256: bool = False) -> ArchiveReader:
        """A reader for the archive's original bytes; see L{ArchiveReader}.

        A download does not hash what it sends (C{check_sha256}): every byte
        is authenticated by the AEAD and the client checks the SHA-256 it is
        given (docs/FORMAT.md §6.1).  An archive that failed authentication
        while being read here lately raises L{IntegrityError} at once (see
        L{failed_lately}).
        """
        return self._open(owner_id, archive_id, refuse_marked=True, check_sha256=check_sha256)

    def _open(self, owner_id: str, archive_id: str, *, refuse_marked: bool, check_sha256: bool) -> ArchiveReader:
        info, data_key = self._read_meta(owner_id, archive_id)
        if refuse_marked:
            self._refuse_if_failed_lately(owner_id, archive_id)
        return ArchiveReader(
            self._body(owner_id, archive_id),
            info,
            derive_key(data_key, b"body-key"),
            context_bytes(b"body", owner_id, archive_id),
            on_integrity_failure=lambda: self._mark_failed(owner_id, archive_id),
            check_sha256=check_sha256,
        )

    def open_range(self, owner_id: str, archive_id: str, start: int, end: int) -> PlaintextReader:
        """A reader of the file's bytes C{start <= i < end} (half-open; the
        caller checks the range against the size): every byte authenticated,
        L{IntegrityError} on any failure, as L{open}.

        A stored archive (incompressible data) is read at its offset: only
        the chunks holding the range are fetched and decrypted, after the
        stream's header and final chunk (see L{StoredRangeReader}).  A
        deflated one is inflated from its start, the bytes before the range
        discarded.  The range is authenticated chunk by chunk; the whole
        file's SHA-256 only when the range reaches its end and the archive is
        deflated (a stored range never reads the other chunks).
        """
        info, data_key = self._read_meta(owner_id, archive_id)
        self._refuse_if_failed_lately(owner_id, archive_id)
        body_key = derive_key(data_key, b"body-key")
        context = context_bytes(b"body", owner_id, archive_id)
        if info.method != "stored":
            reader = ArchiveReader(
                self._body(owner_id, archive_id),
                info,
                body_key,
                context,
                on_integrity_failure=lambda: self._mark_failed(owner_id, archive_id),
                check_sha256=False,
            )
            return InflatingRangeReader(reader, start, end)
        blobs = self.blobs

        def open_blob_range(offset: int, length: int) -> BlobReader:
            return blobs.range_reader(owner_id, archive_id, offset, length)

        return StoredRangeReader(
            open_blob_range,
            info,
            body_key,
            context,
            start,
            end,
            on_integrity_failure=lambda: self._mark_failed(owner_id, archive_id),
        )

    # -- archives that failed authentication while being read -----------

    def _mark_failed(self, owner_id: str, archive_id: str) -> None:
        """Remember that the archive failed authentication mid-read.  A raw
        download that fails after its headers went out can only be aborted;
        the client that asks again then gets a plain 500 integrity_error
        before any byte, instead of another truncated stream."""
        key = (owner_id, archive_id)
        with self._failed_lock:
            self._failed_reads.pop(key, None)
            self._failed_reads[key] = self._monotonic()
            while len(self._failed_reads) > self.integrity_mark_entries:
                self._failed_reads.popitem(last=False)

    def _clear_failed(self, owner_id: str, archive_id: str) -> None:
        with self._failed_lock:
            self._failed_reads.pop((owner_id, archive_id), None)

    def failed_lately(self, owner_id: str, archive_id: str) -> bool:
        """Whether the archive failed authentication while being read in this
        process within C{integrity_mark_seconds}, and no L{verify} of it has
        succeeded since.  In memory only: other nodes keep their own."""
        key = (owner_id, archive_id)
        with self._failed_lock:
            failed_at = self._failed_reads.get(key)
            if failed_at is None:
                return False
            if self._monotonic() - failed_at >= self.integrity_mark_seconds:
                del self._failed_reads[key]
                return False
            return True

    def _refuse_if_failed_lately(self, owner_id: str, archive_id: str) -> None:
        if self.failed_lately(owner_id, archive_id):
            raise IntegrityError(f"archive {archive_id} failed authentication when it was last read")

    def iter_zip(self, owner_id: str, archive_id: str) -> Iterator[bytes]:
        """The decrypted archive, a standard ZIP file, block by block; every
        block is authenticated and the end of the stream is checked."""
        info, data_key = self._read_meta(owner_id, archive_id)
        decryptor = Cobblestone256Decryptor(
            derive_key(data_key, b"body-key"), context_bytes(b"body", owner_id, archive_id)
        )
        body = self._body(owner_id, archive_id)
        try:
            try:
                for block in self._blocks(body, archive_id):
                    yield decryptor.update(block)
                yield decryptor.finalize()
            except (InvalidTag, ValueError) as error:
                raise IntegrityError(f"archive {archive_id} fails authentication") from error
        finally:
            body.close()

    def find_owner(self, archive_id: str) -> str:
        """The owner of an archive id (admin commands name archives by id only)."""
        if is_archive_id(archive_id):
            owner = self.index_call(self.metadata.find_archive_owner, archive_id)
            if owner is not None:
                return owner
        raise ArchiveNotFound(archive_id)

    def read_all(self, owner_id: str, archive_id: str) -> tuple[ArchiveInfo, bytes]:
        """The whole file, authenticated and its SHA-256 checked, in memory."""
        reader = self.open(owner_id, archive_id, check_sha256=True)
        try:
            return reader.info, b"".join(reader)
        finally:
            reader.close()

    def authenticate(self, owner_id: str, archive_id: str) -> ArchiveInfo:
        """Check every chunk's tag and the stream's end, without inflating or
        keeping anything: a fast pass before a response that cannot be
        aborted halfway (the JSON download)."""
        info, data_key = self._read_meta(owner_id, archive_id)
        self._refuse_if_failed_lately(owner_id, archive_id)
        decryptor = Cobblestone256Decryptor(
            derive_key(data_key, b"body-key"), context_bytes(b"body", owner_id, archive_id)
        )
        plain = bytearray(IO_BLOCK_BYTES + 2 * CHUNK_PLAINTEXT_BYTES)
        body = self._body(owner_id, archive_id)
        try:
            for block in self._blocks(body, archive_id):
                decryptor.update_into(block, plain)
            decryptor.finalize()
        except (InvalidTag, ValueError) as error:
            self._mark_failed(owner_id, archive_id)
            raise IntegrityError(f"archive {archive_id} fails authentication") from error
        finally:
            body.close()
        return info

    def verify(self, owner_id: str, archive_id: str) -> ArchiveInfo:
        """Authenticate the whole archive without keeping its content, and
        check everything the format records (size, CRC-32, SHA-256).

        It reads the archive even if it failed lately (an operator may have
        restored it since); success clears that mark."""
        reader = self._open(owner_id, archive_id, refuse_marked=False, check_sha256=True)
        try:
            for _ in reader:
                pass
        finally:
            reader.close()
        self._clear_failed(owner_id, archive_id)
        return reader.info

    def delete(self, owner_id: str, archive_id: str) -> None:
        """Remove an archive: the index row first, so it vanishes at once
        everywhere; a crash before the blob goes leaves only an orphan."""
        if not is_archive_id(archive_id) or not OWNER_ID.match(owner_id):
            raise ArchiveNotFound(archive_id)
        if not self.index_call(self.metadata.delete_archive, owner_id, archive_id):
            raise ArchiveNotFound(archive_id)
        with self._infos_lock:
            self._infos.pop((owner_id, archive_id), None)
        self._clear_failed(owner_id, archive_id)
        self._update_listing(owner_id, remove=archive_id)
        try:
            self.blobs.delete(owner_id, archive_id)
        except (OSError, BlobStoreError):
            pass  # the orphan sweep removes it later

    def usage(self, owner_id: str) -> int:
        """Bytes the owner's archives take in the blob store (for --quota)."""
        return self.index_call(self.metadata.usage, owner_id)

    def owners(self) -> builtins.list[str]:
        return self.index_call(self.metadata.owners)
