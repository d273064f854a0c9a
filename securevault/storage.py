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
import builtins
import binascii
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import secrets
import time
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator, cast

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securevault.fsutil import TEMP_SUFFIX, fsync_directory, write_atomically
from securevault.keys import KeyFileError, Keyring, KeyringFile, UnwrapError

FORMAT_VERSION = 1
META_FORMAT = "securevault-archive"
BODY_SUFFIX = ".body"
META_SUFFIX = ".meta"
DATA_KEY_BYTES = 32
NONCE_BYTES = 12
CHUNK_PLAINTEXT_BYTES = 16384
CHUNK_TAG_BYTES = 16
IO_BLOCK_BYTES = 1 << 20
COMPRESSION_SAMPLE_BYTES = 64 * 1024
COMPRESSION_LEVEL = 1
# Deflate a file only when level 1 shrinks the sample to at most this share.
COMPRESSIBLE_RATIO = 0.9
# Ask the kernel to start writeback every so often, so that the fsync at
# commit has little left to do and the dirty page set stays small.
WRITEBACK_EVERY_BYTES = 32 << 20
MAX_FILENAME_BYTES = 255

_ARCHIVE_ID = re.compile(r"\A[0-9a-f]{32}\Z")
_OWNER_ID = re.compile(r"\A[0-9A-Za-z_-]{1,64}\Z")


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
    return datetime.fromtimestamp(int(timestamp), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _derive(data_key: bytes, purpose: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"securevault/v1/" + purpose).derive(data_key)


def _context(purpose: bytes, owner_id: str, archive_id: str) -> bytes:
    """Binds a ciphertext to its owner and archive, so entries cannot be swapped."""
    return b"securevault/v1/%s\x00%s\x00%s" % (purpose, owner_id.encode(), archive_id.encode())


def _ciphertext_buffer(plaintext_bytes: int) -> bytearray:
    """A buffer large enough for C{update_into} of that many bytes."""
    chunks = plaintext_bytes // CHUNK_PLAINTEXT_BYTES + 2
    return bytearray(plaintext_bytes + CHUNK_PLAINTEXT_BYTES + chunks * CHUNK_TAG_BYTES + 256)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _translate_os_error(error: OSError) -> Exception:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("No space left on the vault's disk.")
    return error


class _Writeback:
    """Starts asynchronous writeback of dirty pages (Linux sync_file_range)."""

    _SYNC_FILE_RANGE_WRITE = 2

    def __init__(self) -> None:
        self._call: Callable[..., int] | None = None
        name = ctypes.util.find_library("c")
        if name:
            try:
                libc = ctypes.CDLL(name, use_errno=True)
                function = libc.sync_file_range
                function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                self._call = function
            except (OSError, AttributeError):
                self._call = None

    def start(self, fd: int) -> None:
        if self._call is not None:
            self._call(fd, 0, 0, self._SYNC_FILE_RANGE_WRITE)
        # Elsewhere the final fsync does all the work.


_writeback = _Writeback()


class _EncryptingSink:
    """The file object zipfile writes to: encrypts and writes to a descriptor.

    It has C{tell} but no C{seek}, so zipfile streams (data descriptors)
    instead of seeking back to patch headers.
    """

    def __init__(self, fd: int, encryptor: Cobblestone256Encryptor) -> None:
        self._fd = fd
        self._encryptor = encryptor
        # One buffer for the life of the upload: a fresh 1 MiB bytearray per
        # write costs more than the encryption itself.
        self._buffer = _ciphertext_buffer(2 * IO_BLOCK_BYTES)
        self.position = 0
        self.ciphertext_bytes = 0
        self._since_writeback = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        size = len(data)
        if size == 0 or self.closed:
            # Once the upload is aborted its descriptor number may belong to
            # another file: whatever zipfile still flushes goes nowhere.
            return size
        if len(self._buffer) < size + 2 * CHUNK_PLAINTEXT_BYTES:
            self._buffer = _ciphertext_buffer(size)
        produced = self._encryptor.update_into(data, self._buffer)
        self._emit(memoryview(self._buffer)[:produced])
        self.position += size
        return size

    def _emit(self, ciphertext: memoryview | bytes) -> None:
        if not ciphertext:
            return
        try:
            _write_all(self._fd, ciphertext)
        except OSError as error:
            raise _translate_os_error(error) from error
        self.ciphertext_bytes += len(ciphertext)
        self._since_writeback += len(ciphertext)
        if self._since_writeback >= WRITEBACK_EVERY_BYTES:
            self._since_writeback = 0
            _writeback.start(self._fd)

    def finish(self) -> None:
        self._emit(self._encryptor.finalize())

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass


class ArchiveWriter:
    """Streams one upload into a new archive.

    Call L{write} any number of times, then L{commit}, or L{abort} at any
    point; never two calls at once.  Nothing is visible until L{commit}
    returns; any failure removes what was written.
    """

    def __init__(
        self,
        storage: "SecureFileStorage",
        owner_id: str,
        filename: str,
        *,
        max_bytes: int | None = None,
    ) -> None:
        check_filename(filename)
        self._storage = storage
        self._owner_id = owner_id
        self._filename = filename
        self._max_bytes = max_bytes
        self.archive_id = secrets.token_hex(16)
        self._created_ns = storage.clock_ns()
        self._directory = storage.owner_directory(owner_id, create=True)
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
        self._body_temp = self._directory / f".{self.archive_id}{BODY_SUFFIX}{TEMP_SUFFIX}"
        self._fd = os.open(self._body_temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        encryptor = Cobblestone256Encryptor(
            _derive(self._data_key, b"body-key"), _context(b"body", owner_id, self.archive_id)
        )
        self._sink = _EncryptingSink(self._fd, encryptor)

    @property
    def size(self) -> int:
        """Plaintext bytes received so far."""
        return self._size

    def write(self, data: bytes) -> None:
        """Add the next bytes of the file."""
        if self._done:
            raise StorageError("write after commit or abort")
        try:
            self._size += len(data)
            self._sha256.update(data)
            if self._zip is None:
                self._sample.append(data)
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
        info = zipfile.ZipInfo(self._filename, time.gmtime(self._created_ns / 1e9)[:6])
        info.compress_type = compression
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
            try:
                os.fsync(self._fd)
            except OSError as error:
                raise _translate_os_error(error) from error
            os.close(self._fd)
            self._fd = -1
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
            body_path = self._directory / f"{self.archive_id}{BODY_SUFFIX}"
            os.replace(self._body_temp, body_path)
            try:
                self._storage.write_meta(self._owner_id, info, self._data_key)
            except BaseException:
                body_path.unlink(missing_ok=True)
                raise
            self._done = True
            return info
        except OSError as error:
            self.abort()
            raise _translate_os_error(error) from error
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Forget the upload and remove its temp file.  Safe to call twice."""
        self._done = True
        self._sink.closed = True
        self._zip = None
        self._member = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._body_temp.unlink(missing_ok=True)


class ArchiveReader:
    """Reads an archive back, returning only authenticated plaintext.

    Each L{read} returns the next bytes of the original file, or C{b""} at the
    end, after the whole stream (the ZIP trailer included) has been
    authenticated and the size and SHA-256 checked.  Any failure raises
    L{IntegrityError}.
    """

    def __init__(self, path: Path, info: ArchiveInfo, body_key: bytes, context: bytes) -> None:
        self.info = info
        self._fd = os.open(path, os.O_RDONLY)
        self._decryptor = Cobblestone256Decryptor(body_key, context)
        self._plain = _ciphertext_buffer(IO_BLOCK_BYTES)
        self._pending = memoryview(b"")
        self._zip_position = 0
        self._data_left = info.compressed_size
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if info.method == "deflated" else None
        self._inflate_input: bytes | memoryview = b""
        self._pending_data = memoryview(b"")
        self._sha256 = hashlib.sha256()
        self._produced = 0
        self._finished = False
        self._eof = False

    def _next_plaintext(self) -> memoryview:
        """Decrypt the next block of the ZIP stream; empty at its end."""
        if self._eof:
            return memoryview(b"")
        ciphertext = os.read(self._fd, IO_BLOCK_BYTES)
        try:
            if not ciphertext:
                self._eof = True
                return memoryview(self._decryptor.finalize())
            produced = self._decryptor.update_into(ciphertext, self._plain)
        except (InvalidTag, ValueError) as error:
            raise IntegrityError("archive fails authentication") from error
        return memoryview(self._plain)[:produced]

    def _next_data(self) -> memoryview:
        """The next slice of the member's (compressed) data."""
        while True:
            if self._pending:
                view, self._pending = self._pending, memoryview(b"")
            else:
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
            if take == 0:
                continue  # trailer: authenticated, discarded
            return view[:take]

    def read(self, size: int = IO_BLOCK_BYTES) -> bytes:
        """The next at most about C{size} bytes of the file; b"" at the end."""
        if self._finished:
            return b""
        while True:
            if self._inflater is not None and self._inflate_input:
                try:
                    out = self._inflater.decompress(self._inflate_input, size)
                except zlib.error as error:
                    raise IntegrityError("archive data does not inflate") from error
                self._inflate_input = self._inflater.unconsumed_tail
                if out:
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
            out = bytes(data)
            self._account(out)
            return out

    def _account(self, out: bytes) -> None:
        self._produced += len(out)
        if self._produced > self.info.size:
            raise IntegrityError("archive holds more data than recorded")
        self._sha256.update(out)

    def _finish(self) -> bytes:
        tail = b""
        if self._inflater is not None:
            tail = self._inflater.flush()
            if tail:
                self._account(tail)
        # Authenticate the rest of the stream: the ZIP trailer and the end marker.
        while not self._eof or self._pending:
            self._pending = memoryview(b"")
            self._next_plaintext()
        if self._produced != self.info.size or self._sha256.hexdigest() != self.info.sha256:
            raise IntegrityError("archive content does not match its recorded digest")
        self._finished = True
        return tail

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read():
            yield chunk

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SecureFileStorage:
    """Archives by owner, encrypted at rest; safe to call from any thread."""

    def __init__(
        self,
        root: Path,
        keyring: Keyring,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
        keyring_file: KeyringFile | None = None,
    ) -> None:
        self.root = Path(root)
        self._keyring = keyring
        self.clock_ns = clock_ns
        self.archives = self.root / "archives"
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
                except KeyFileError:
                    pass  # mid-replacement or damaged: keep the keys we have
        return self._keyring

    # -- layout ---------------------------------------------------------

    def owner_directory(self, owner_id: str, *, create: bool = False) -> Path:
        if not _OWNER_ID.match(owner_id):
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
        key_id, wrapped = self.keyring.wrap(data_key, _context(b"data-key", owner_id, info.id))
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
        sealed = AESGCM(_derive(data_key, b"metadata-key")).encrypt(
            nonce, plaintext, _context(b"metadata", owner_id, info.id)
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
            raise _translate_os_error(error) from error

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
                str(document["key_id"]), wrapped, _context(b"data-key", owner_id, archive_id)
            )
            plaintext = AESGCM(_derive(data_key, b"metadata-key")).decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _context(b"metadata", owner_id, archive_id)
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
        context = _context(b"data-key", owner_id, archive_id)
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
            raise _translate_os_error(error) from error

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
        infos = []
        for archive_id in self.archive_ids(owner_id):
            try:
                infos.append(self._read_meta(owner_id, archive_id)[0])
            except (ArchiveNotFound, IntegrityError):
                continue
        infos.sort(key=lambda info: (info.created_ns, info.id), reverse=True)
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
                _derive(data_key, b"body-key"),
                _context(b"body", owner_id, archive_id),
            )
        except FileNotFoundError as error:
            raise IntegrityError(f"archive {archive_id} has no body") from error

    def iter_zip(self, owner_id: str, archive_id: str) -> Iterator[bytes]:
        """The decrypted archive, a standard ZIP file, block by block; every
        block is authenticated and the end of the stream is checked."""
        info, data_key = self._read_meta(owner_id, archive_id)
        body_path = self._paths(owner_id, archive_id)[0]
        decryptor = Cobblestone256Decryptor(
            _derive(data_key, b"body-key"), _context(b"body", owner_id, archive_id)
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
