# -*- test-case-name: tests.stores.test_blobs -*-
"""Where archive bytes live: the narrow blob store interface, and the local
directory that is the embedded default.

A blob is one archive's encrypted body, named by its owner and archive id.
The store knows nothing of ZIP, keys or users: it puts a stream atomically,
gets it back as a stream (whole,
or a byte range of it: a ranged download reads only what it needs), deletes it and lists what it holds (for verify and
the orphan sweep).  Plain blocking code, run in the worker pool; the S3
backend is in L{securevault.stores.blobs_s3}.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from securevault.core.fsutil import TEMP_SUFFIX, fsync_directory, write_all

BODY_SUFFIX = ".body"
JOURNAL_SUFFIX = ".journal"
# Ask the kernel to start writeback every so often, so that the fsync at
# commit has little left to do and the dirty page set stays small.  Every
# MiB (was 32): a tus PATCH's 8 MiB piece then fsyncs in 0.9 ms, not 5-6
# (256 MiB in 8 MiB PATCHes: 1.30 -> 1.09 s); a raw upload's final fsync
# waits for 1 MiB at most.
WRITEBACK_EVERY_BYTES = 1 << 20

_OWNER_ID = re.compile(r"\A[0-9A-Za-z_-]{1,64}\Z")
_ARCHIVE_ID = re.compile(r"\A[0-9a-f]{32}\Z")


class BlobNotFound(Exception):
    """No blob has that name."""


class BlobStoreError(Exception):
    """The blob store failed; the message says what, without secrets."""


@dataclass(frozen=True)
class BlobEntry:
    """One stored blob, as listed for verify and the orphan sweep."""

    owner_id: str
    archive_id: str
    size: int
    modified: float  # seconds since the epoch


class BlobWriter(Protocol):
    """One blob being written: nothing is visible until L{commit} returns."""

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes; C{data} may be reused by the caller afterwards."""

    def commit(self) -> int:
        """Make the blob durable and visible under its name; returns its size."""

    def abort(self) -> None:
        """Forget the blob; safe to call twice and after a failed commit."""


class BlobReader(Protocol):
    """A blob read from a position on.  A reader may also offer
    C{readinto(buffer: memoryview) -> int} (the local one does): the archive
    reader then reuses one buffer (L{securevault.core.archive.ArchiveReader})."""

    def read(self, size: int) -> bytes:
        """Up to C{size} next bytes; b"" at the end."""

    def close(self) -> None: ...


class BlobWriters(Protocol):
    """Where an archive writer gets its blob (a L{BlobStore}, or a
    resumable upload's journals)."""

    def writer(self, owner_id: str, archive_id: str) -> BlobWriter: ...


class BlobStore(Protocol):
    """Archive bodies by (owner id, archive id); safe to call from any thread."""

    def writer(self, owner_id: str, archive_id: str) -> BlobWriter: ...

    def reader(self, owner_id: str, archive_id: str) -> BlobReader:
        """Raises L{BlobNotFound} when there is no such blob."""

    def range_reader(self, owner_id: str, archive_id: str, start: int, length: int) -> BlobReader:
        """A reader of the blob's bytes C{start} to C{start + length}, fewer
        when the blob ends first (none when it ends before C{start}), read
        without the bytes before them (a ranged download).  Raises
        L{BlobNotFound} when there is no such blob."""

    def delete(self, owner_id: str, archive_id: str) -> None:
        """Remove the blob; a missing one is not an error."""

    def list(self) -> Iterator[BlobEntry]:
        """Every committed blob, in no particular order."""

    def remove_incomplete(self) -> int:
        """Remove what interrupted writes left behind that only this node
        could have left (local temp files); returns how many."""

    def describe(self) -> str:
        """Where the blobs are, for the start-up line (no credentials)."""


@dataclass(frozen=True)
class JournalEntry:
    """One resumable upload's journal, as listed for the orphan sweep."""

    owner_id: str
    upload_id: str
    archive_id: str
    modified: float  # seconds since the epoch


class JournalWriter(BlobWriter, Protocol):
    """A blob written in the open: durable before it is committed.

    A resumable upload's archive is written as its PATCHes arrive, and each
    PATCH's share of it must outlive a crash before the PATCH is
    acknowledged (L{securevault.staging}).  The journal is that archive's
    temp blob, kept under a name of its own until its upload is gone:
    L{sync} makes what was written so far durable; L{commit} makes the blob
    visible under the archive's name too (the journal stays: the upload's
    pieces point into it until the archive's row replaces them); L{abort}
    only stops writing (what the pieces point to stays)."""

    def sync(self) -> None:
        """Make every byte written so far durable."""


@runtime_checkable
class JournalStore(Protocol):
    """A blob store that also keeps journals (the local one does; the S3 one
    does not: a multipart upload cannot be read before it completes, so
    there each piece holds its share of the archive itself)."""

    def journal_writer(self, owner_id: str, upload_id: str, archive_id: str) -> JournalWriter: ...

    def journal_reader(self, owner_id: str, upload_id: str, archive_id: str, start: int, length: int) -> BlobReader:
        """The journal's bytes C{start} to C{start + length} (fewer when it
        ends first); L{BlobNotFound} when there is no such journal."""

    def delete_journals(self, owner_id: str, upload_id: str, archive_id: str | None = None) -> None:
        """Remove the upload's journals (with C{archive_id}, that archive's
        only); none is not an error."""

    def journals(self) -> Iterator[JournalEntry]:
        """Every journal, in no particular order."""


def check_names(owner_id: str, archive_id: str) -> None:
    if not _OWNER_ID.match(owner_id) or not _ARCHIVE_ID.match(archive_id):
        raise ValueError("invalid blob name")


class _Writeback:
    """Starts asynchronous writeback of dirty pages (Linux sync_file_range)."""

    _SYNC_FILE_RANGE_WRITE = 2

    def __init__(self) -> None:
        self._call: Callable[..., int] | None = None
        name = ctypes.util.find_library("c")
        if name:
            try:
                function = ctypes.CDLL(name, use_errno=True).sync_file_range
                function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                self._call = function
            except (OSError, AttributeError):
                self._call = None

    def start(self, fd: int) -> None:
        if self._call is not None:  # elsewhere the final fsync does all the work
            self._call(fd, 0, 0, self._SYNC_FILE_RANGE_WRITE)


_writeback = _Writeback()


class LocalBlobWriter:
    """Writes to a temp file beside the final name; commit is fsync + rename
    + directory fsync, so a crash leaves the old state or the new one."""

    def __init__(self, directory: Path, archive_id: str, temp: Path | None = None) -> None:
        self._directory = directory
        self._final = directory / f"{archive_id}{BODY_SUFFIX}"
        self._temp = temp or directory / f".{archive_id}{BODY_SUFFIX}{TEMP_SUFFIX}"
        self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._size = 0
        self._since_writeback = 0

    def write(self, data: bytes | memoryview) -> None:
        if self._fd < 0:
            raise BlobStoreError("write after commit or abort")
        write_all(self._fd, data)
        self._size += len(data)
        self._since_writeback += len(data)
        if self._since_writeback >= WRITEBACK_EVERY_BYTES:
            self._since_writeback = 0
            _writeback.start(self._fd)

    def commit(self) -> int:
        if self._fd < 0:
            raise BlobStoreError("commit after commit or abort")
        try:
            os.fsync(self._fd)
        finally:
            self._close()
        self._publish()
        fsync_directory(self._directory)
        return self._size

    def _publish(self) -> None:
        """Give the durable temp file its final name."""
        os.replace(self._temp, self._final)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        self._close()
        self._temp.unlink(missing_ok=True)


class LocalJournalWriter(LocalBlobWriter):
    """A L{JournalWriter}: the file C{<upload id>.<archive id>.journal}
    beside the owner's blobs, hard-linked to the archive's name at commit,
    so that a crash before the archive's row commits still finds it."""

    def __init__(self, directory: Path, upload_id: str, archive_id: str) -> None:
        super().__init__(directory, archive_id, directory / f"{upload_id}.{archive_id}{JOURNAL_SUFFIX}")
        self._named = False  # the journal's directory entry is durable

    def sync(self) -> None:
        if self._fd < 0:
            raise BlobStoreError("sync after commit or abort")
        os.fdatasync(self._fd)
        if not self._named:
            fsync_directory(self._directory)
            self._named = True

    def _publish(self) -> None:
        """Link, not rename: the journal stays until its upload is gone."""
        os.link(self._temp, self._final)

    def abort(self) -> None:
        self._close()  # the file stays: acknowledged pieces may point into it


class LocalBlobReader:
    """The file from C{start}, at most C{length} bytes of it (None: to its end)."""

    def __init__(self, path: Path, start: int = 0, length: int | None = None) -> None:
        if start < 0 or (length is not None and length < 0):
            raise ValueError("negative range")
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as error:
            raise BlobNotFound(path.name) from error
        self._position = start
        self._left = length

    def read(self, size: int) -> bytes:
        if self._left is not None:
            size = min(size, self._left)
            if size <= 0:
                return b""
        data = os.pread(self._fd, size, self._position)
        self._position += len(data)
        if self._left is not None:
            self._left -= len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        """Like L{read} of C{len(buffer)} bytes, into C{buffer}: the reader of
        a download reuses one buffer instead of a fresh bytes per block."""
        if self._left is not None:
            buffer = buffer[: max(0, min(len(buffer), self._left))]
            if not buffer:
                return 0
        count = os.preadv(self._fd, [buffer], self._position)
        self._position += count
        if self._left is not None:
            self._left -= count
        return count

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalBlobStore:
    """Blobs as files: C{<root>/<owner id>/<archive id>.body}, mode 0600."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root.resolve())

    def path(self, owner_id: str, archive_id: str) -> Path:
        check_names(owner_id, archive_id)
        return self.root / owner_id / f"{archive_id}{BODY_SUFFIX}"

    def _directory(self, owner_id: str) -> Path:
        """The owner's directory, made (durably) if it is not there yet."""
        directory = self.root / owner_id
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fsync_directory(directory.parent)
        return directory

    def writer(self, owner_id: str, archive_id: str) -> LocalBlobWriter:
        check_names(owner_id, archive_id)
        return LocalBlobWriter(self._directory(owner_id), archive_id)

    def reader(self, owner_id: str, archive_id: str) -> LocalBlobReader:
        return LocalBlobReader(self.path(owner_id, archive_id))

    def range_reader(self, owner_id: str, archive_id: str, start: int, length: int) -> LocalBlobReader:
        return LocalBlobReader(self.path(owner_id, archive_id), start, length)

    def delete(self, owner_id: str, archive_id: str) -> None:
        path = self.path(owner_id, archive_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_directory(path.parent)

    def _owner_files(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Every file in the owners' directories, with its owner id."""
        if not self.root.is_dir():
            return
        for directory in sorted(self.root.iterdir()):
            if not directory.is_dir() or not _OWNER_ID.match(directory.name):
                continue
            with os.scandir(directory) as entries:
                for entry in entries:
                    yield directory.name, entry

    def list(self) -> Iterator[BlobEntry]:
        for owner_id, entry in self._owner_files():
            archive_id = entry.name[: -len(BODY_SUFFIX)]
            if entry.name.endswith(BODY_SUFFIX) and _ARCHIVE_ID.match(archive_id):
                try:
                    status = entry.stat()
                except FileNotFoundError:
                    continue  # deleted while we listed
                yield BlobEntry(owner_id, archive_id, status.st_size, status.st_mtime)

    # -- journals (L{JournalStore}) -------------------------------------------

    def _journal_path(self, owner_id: str, upload_id: str, archive_id: str) -> Path:
        check_names(owner_id, archive_id)
        check_names(owner_id, upload_id)
        return self.root / owner_id / f"{upload_id}.{archive_id}{JOURNAL_SUFFIX}"

    def journal_writer(self, owner_id: str, upload_id: str, archive_id: str) -> LocalJournalWriter:
        self._journal_path(owner_id, upload_id, archive_id)  # checks the names
        return LocalJournalWriter(self._directory(owner_id), upload_id, archive_id)

    def journal_reader(
        self, owner_id: str, upload_id: str, archive_id: str, start: int, length: int
    ) -> LocalBlobReader:
        return LocalBlobReader(self._journal_path(owner_id, upload_id, archive_id), start, length)

    def delete_journals(self, owner_id: str, upload_id: str, archive_id: str | None = None) -> None:
        check_names(owner_id, upload_id)
        if archive_id is not None:
            check_names(owner_id, archive_id)
        directory = self.root / owner_id
        found = False
        for path in directory.glob(f"{upload_id}.{archive_id or '*'}{JOURNAL_SUFFIX}"):
            path.unlink(missing_ok=True)
            found = True
        if found:
            fsync_directory(directory)

    def journals(self) -> Iterator[JournalEntry]:
        for owner_id, entry in self._owner_files():
            upload_id, _, rest = entry.name.partition(".")
            archive_id = rest[: -len(JOURNAL_SUFFIX)]
            if rest.endswith(JOURNAL_SUFFIX) and _ARCHIVE_ID.match(upload_id) and _ARCHIVE_ID.match(archive_id):
                try:
                    modified = entry.stat().st_mtime
                except FileNotFoundError:
                    continue  # deleted while we listed
                yield JournalEntry(owner_id, upload_id, archive_id, modified)

    def remove_incomplete(self) -> int:
        removed = 0
        if not self.root.is_dir():
            return 0
        for directory in self.root.iterdir():
            if not directory.is_dir():
                continue
            found = 0
            for entry in directory.glob(f"*{TEMP_SUFFIX}"):
                entry.unlink(missing_ok=True)
                found += 1
            if found:
                fsync_directory(directory)
            removed += found
        return removed
