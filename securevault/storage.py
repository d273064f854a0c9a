# -*- test-case-name: tests.test_storage -*-
"""SecureFileStorage: each upload becomes one ZIP archive, encrypted at rest.

Plain blocking Python with no Twisted import: the daemon runs every call here
in its worker pool.  The on-disk format is described in docs/FORMAT.md.

An archive is two files under C{archives/<owner id>/}:

  - C{<archive id>.body}: the ZIP archive, encrypted as one Cobblestone-256
    stream (AES-256-GCM in 16 KiB chunks, key-committing) under a key derived
    from the archive's random data key;
  - C{<archive id>.meta}: JSON with the data key wrapped by the master key and
    the metadata (filename, size, sha256, ...) encrypted under the data key.

The C{.meta} file is renamed into place last, so its presence is the commit
point; a body without one is debris from a crash and is removed at start.
Master key rotation rewrites only C{.meta} files.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from cryptography.cobblestone import Cobblestone256Decryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securevault.archive import (  # re-exported: the storage API's vocabulary
    BODY_SUFFIX,
    CHUNK_PLAINTEXT_BYTES,
    FORMAT_VERSION,
    IO_BLOCK_BYTES,
    META_FORMAT,
    META_SUFFIX,
    NONCE_BYTES,
    OWNER_ID,
    ArchiveInfo,
    ArchiveNotFound,
    ArchiveReader,
    ArchiveWriter,
    IntegrityError,
    InvalidFilename,
    QuotaExceeded,
    StorageError,
    StorageFull,
    check_filename,
    context_bytes,
    derive_key,
    is_archive_id,
    rfc3339,
    translate_os_error,
)
from securevault.fsutil import TEMP_SUFFIX, fsync_directory, write_atomically
from securevault.keys import KeyFileError, Keyring, KeyringFile, UnwrapError
from securevault.passphrase import PassphraseError

__all__ = [
    "ArchiveInfo",
    "ArchiveNotFound",
    "ArchiveReader",
    "ArchiveWriter",
    "IntegrityError",
    "InvalidFilename",
    "QuotaExceeded",
    "SecureFileStorage",
    "StorageError",
    "StorageFull",
    "check_filename",
    "is_archive_id",
    "rfc3339",
]


def _newest_first(info: ArchiveInfo) -> tuple[int, str]:
    return (-info.created_ns, info.id)


class SecureFileStorage:
    """Archives by owner, encrypted at rest; safe to call from any thread."""

    def __init__(
        self,
        root: Path,
        keyring: Keyring,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
        keyring_file: KeyringFile | None = None,
        cache_listings: bool = False,
    ) -> None:
        self.root = Path(root)
        self._keyring = keyring
        self.clock_ns = clock_ns
        self.archives = self.root / "archives"
        # The daemon keeps each owner's listing in memory once read, updated
        # by its own uploads and deletes (the only writers of archives), so
        # GET /get-files needs no disk and no pool.
        self._listings: dict[str, builtins.list[ArchiveInfo]] | None = {} if cache_listings else None
        self._listings_lock = threading.Lock()
        # Bumped by every change, cached or not: a first listing read while an
        # upload commits must not be cached without it.
        self._listing_versions: dict[str, int] = {}
        # When set, the keyring is reloaded whenever that file changes, so a
        # running daemon follows `securevault-admin key rotate`.
        self._keyring_file = keyring_file
        self._keyring_stamp = self._stamp()

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

    # -- layout ---------------------------------------------------------

    def owner_directory(self, owner_id: str, *, create: bool = False) -> Path:
        if not OWNER_ID.match(owner_id):
            raise ValueError("invalid owner id")
        directory = self.archives / owner_id
        if create and not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fsync_directory(directory.parent)
        return directory

    def _paths(self, owner_id: str, archive_id: str) -> tuple[Path, Path]:
        if not is_archive_id(archive_id):
            raise ArchiveNotFound(archive_id)
        directory = self.owner_directory(owner_id)
        return directory / f"{archive_id}{BODY_SUFFIX}", directory / f"{archive_id}{META_SUFFIX}"

    def recover(self) -> int:
        """Remove what a crash left behind: temp files and bodies that were
        never committed.  Run once at start; returns how many were removed."""
        removed = 0
        if not self.archives.is_dir():
            return 0
        for directory in self.archives.iterdir():
            if not directory.is_dir():
                continue
            for entry in directory.iterdir():
                name = entry.name
                orphan = name.endswith(BODY_SUFFIX) and not entry.with_suffix(META_SUFFIX).exists()
                if name.endswith(TEMP_SUFFIX) or orphan:
                    entry.unlink(missing_ok=True)
                    removed += 1
            if removed:
                fsync_directory(directory)
        return removed

    # -- metadata -------------------------------------------------------

    def write_meta(self, owner_id: str, info: ArchiveInfo, data_key: bytes) -> None:
        """Wrap the data key and seal the metadata; atomically publish."""
        key_id, wrapped = self.keyring.wrap(data_key, context_bytes(b"data-key", owner_id, info.id))
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
        meta_path = self._paths(owner_id, info.id)[1]
        try:
            write_atomically(meta_path, json.dumps(document).encode("ascii"))
        except OSError as error:
            raise translate_os_error(error) from error
        self._update_listing(owner_id, add=info)

    def _update_listing(self, owner_id: str, *, add: ArchiveInfo | None = None, remove: str | None = None) -> None:
        if self._listings is None:
            return
        with self._listings_lock:
            self._listing_versions[owner_id] = self._listing_versions.get(owner_id, 0) + 1
            listing = self._listings.get(owner_id)
            if listing is None:
                return
            listing = [info for info in listing if info.id != remove]
            if add is not None and all(info.id != add.id for info in listing):
                listing.append(add)
                listing.sort(key=_newest_first)
            self._listings[owner_id] = listing

    def cached_list(self, owner_id: str) -> "builtins.list[ArchiveInfo] | None":
        """The owner's listing if it is in memory (no I/O: safe on the reactor
        thread), else None."""
        if self._listings is None:
            return None
        with self._listings_lock:
            listing = self._listings.get(owner_id)
            return None if listing is None else builtins.list(listing)

    def _read_meta(self, owner_id: str, archive_id: str) -> tuple[ArchiveInfo, bytes]:
        """Decrypt an archive's metadata; returns it and the data key."""
        meta_path = self._paths(owner_id, archive_id)[1]
        try:
            raw = meta_path.read_bytes()
        except FileNotFoundError as error:
            raise ArchiveNotFound(archive_id) from error
        try:
            document = json.loads(raw)
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

    def rewrap(self, owner_id: str, archive_id: str, keyring: Keyring) -> bool:
        """Rewrap one archive's data key under C{keyring}'s current key.

        Only the C{.meta} file is rewritten.  Returns False when it already was.
        """
        meta_path = self._paths(owner_id, archive_id)[1]
        context = context_bytes(b"data-key", owner_id, archive_id)
        try:
            document = json.loads(meta_path.read_bytes())
            if document["key_id"] == keyring.current_id:
                return False
            data_key = self.keyring.unwrap(
                str(document["key_id"]), base64.b64decode(document["wrapped_key"], validate=True), context
            )
        except FileNotFoundError as error:
            raise ArchiveNotFound(archive_id) from error
        except (UnwrapError, ValueError, KeyError, TypeError, binascii.Error) as error:
            raise IntegrityError(f"archive {archive_id} data key fails authentication") from error
        key_id, wrapped = keyring.wrap(data_key, context)
        document["key_id"] = key_id
        document["wrapped_key"] = base64.b64encode(wrapped).decode("ascii")
        write_atomically(meta_path, json.dumps(document).encode("ascii"))
        return True

    # -- the operations the API needs ----------------------------------

    def writer(self, owner_id: str, filename: str, *, max_bytes: int | None = None) -> ArchiveWriter:
        """Start a streamed upload; see L{ArchiveWriter}."""
        try:
            return ArchiveWriter(self, owner_id, filename, max_bytes=max_bytes)
        except OSError as error:
            raise translate_os_error(error) from error

    def store(self, owner_id: str, filename: str, data: bytes, *, max_bytes: int | None = None) -> ArchiveInfo:
        """Store a whole file held in memory (the JSON upload form)."""
        writer = self.writer(owner_id, filename, max_bytes=max_bytes)
        view = memoryview(data)
        for start in range(0, len(view), IO_BLOCK_BYTES):
            writer.write(view[start : start + IO_BLOCK_BYTES])  # type: ignore[arg-type]
        return writer.commit()

    def archive_ids(self, owner_id: str) -> list[str]:
        directory = self.owner_directory(owner_id)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        return [
            name[: -len(META_SUFFIX)]
            for name in names
            if name.endswith(META_SUFFIX) and is_archive_id(name[: -len(META_SUFFIX)])
        ]

    def list(self, owner_id: str) -> list[ArchiveInfo]:
        """The owner's archives, newest first.  An archive whose metadata fails
        authentication is left out here (and reported by verify)."""
        while True:
            cached = self.cached_list(owner_id)
            if cached is not None:
                return cached
            with self._listings_lock:
                version = self._listing_versions.get(owner_id, 0)
            infos = self._read_listing(owner_id)
            if self._listings is None:
                return infos
            with self._listings_lock:
                if self._listing_versions.get(owner_id, 0) == version:
                    self._listings.setdefault(owner_id, builtins.list(infos))
                    return infos
            # An upload or delete landed while we read: read again.

    def _read_listing(self, owner_id: str) -> "builtins.list[ArchiveInfo]":
        infos = []
        for archive_id in self.archive_ids(owner_id):
            try:
                infos.append(self._read_meta(owner_id, archive_id)[0])
            except (ArchiveNotFound, IntegrityError):
                continue
        infos.sort(key=_newest_first)
        return infos

    def info(self, owner_id: str, archive_id: str) -> ArchiveInfo:
        return self._read_meta(owner_id, archive_id)[0]

    def find_newest(self, owner_id: str, filename: str) -> ArchiveInfo:
        """The newest archive with exactly that filename."""
        for info in self.list(owner_id):
            if info.filename == filename:
                return info
        raise ArchiveNotFound(filename)

    def open(self, owner_id: str, archive_id: str) -> ArchiveReader:
        """A reader for the archive's original bytes; see L{ArchiveReader}."""
        info, data_key = self._read_meta(owner_id, archive_id)
        body_path = self._paths(owner_id, archive_id)[0]
        try:
            return ArchiveReader(
                body_path,
                info,
                derive_key(data_key, b"body-key"),
                context_bytes(b"body", owner_id, archive_id),
            )
        except FileNotFoundError as error:
            raise IntegrityError(f"archive {archive_id} has no body") from error

    def iter_zip(self, owner_id: str, archive_id: str) -> Iterator[bytes]:
        """The decrypted archive, a standard ZIP file, block by block; every
        block is authenticated and the end of the stream is checked."""
        info, data_key = self._read_meta(owner_id, archive_id)
        body_path = self._paths(owner_id, archive_id)[0]
        decryptor = Cobblestone256Decryptor(
            derive_key(data_key, b"body-key"), context_bytes(b"body", owner_id, archive_id)
        )
        try:
            handle = open(body_path, "rb")
        except FileNotFoundError as error:
            raise IntegrityError(f"archive {archive_id} has no body") from error
        with handle:
            try:
                while block := handle.read(IO_BLOCK_BYTES):
                    yield decryptor.update(block)
                yield decryptor.finalize()
            except (InvalidTag, ValueError) as error:
                raise IntegrityError(f"archive {archive_id} fails authentication") from error

    def find_owner(self, archive_id: str) -> str:
        """The owner of an archive id (admin commands name archives by id only)."""
        if is_archive_id(archive_id):
            for owner_id in self.owners():
                if (self.archives / owner_id / f"{archive_id}{META_SUFFIX}").exists():
                    return owner_id
        raise ArchiveNotFound(archive_id)

    def read_all(self, owner_id: str, archive_id: str) -> tuple[ArchiveInfo, bytes]:
        """The whole file, authenticated, in memory."""
        reader = self.open(owner_id, archive_id)
        try:
            return reader.info, b"".join(reader)
        finally:
            reader.close()

    def authenticate(self, owner_id: str, archive_id: str) -> ArchiveInfo:
        """Check every chunk's tag and the stream's end, without inflating or
        keeping anything: a fast pass before a response that cannot be
        aborted halfway (the JSON download)."""
        info, data_key = self._read_meta(owner_id, archive_id)
        body_path = self._paths(owner_id, archive_id)[0]
        decryptor = Cobblestone256Decryptor(
            derive_key(data_key, b"body-key"), context_bytes(b"body", owner_id, archive_id)
        )
        plain = bytearray(IO_BLOCK_BYTES + 2 * CHUNK_PLAINTEXT_BYTES)
        try:
            with open(body_path, "rb", buffering=0) as handle:
                while block := handle.read(IO_BLOCK_BYTES):
                    decryptor.update_into(block, plain)
                decryptor.finalize()
        except FileNotFoundError as error:
            raise IntegrityError(f"archive {archive_id} has no body") from error
        except (InvalidTag, ValueError) as error:
            raise IntegrityError(f"archive {archive_id} fails authentication") from error
        return info

    def verify(self, owner_id: str, archive_id: str) -> ArchiveInfo:
        """Authenticate the whole archive without keeping its content."""
        reader = self.open(owner_id, archive_id)
        try:
            for _ in reader:
                pass
            return reader.info
        finally:
            reader.close()

    def delete(self, owner_id: str, archive_id: str) -> None:
        """Remove an archive: the metadata first, so it vanishes at once."""
        body_path, meta_path = self._paths(owner_id, archive_id)
        try:
            meta_path.unlink()
        except FileNotFoundError as error:
            raise ArchiveNotFound(archive_id) from error
        self._update_listing(owner_id, remove=archive_id)
        body_path.unlink(missing_ok=True)
        fsync_directory(meta_path.parent)

    def usage(self, owner_id: str) -> int:
        """Bytes the owner's archives take on disk (for --quota)."""
        total = 0
        directory = self.owner_directory(owner_id)
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.endswith(BODY_SUFFIX):
                        total += entry.stat().st_size
        except FileNotFoundError:
            return 0
        return total

    def owners(self) -> "builtins.list[str]":
        if not self.archives.is_dir():
            return []
        return sorted(p.name for p in self.archives.iterdir() if p.is_dir())
