# -*- test-case-name: tests.server.test_startup -*-
"""Checks before the daemon touches its data: one daemon per data
directory, and every directory it will write is writable.

Both fail at start with one line and a non-zero exit, instead of later and
worse: a second daemon on the same directory shared (and swept) the first
one's SQLite file and temporary files; an unwritable C{archives/} showed up
as a 500 with a traceback at the first upload.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from securevault.core.keybinding import locate_master_key
from securevault.server.config import VaultConfig
from securevault.storage import METADATA_FILE

LOCK_NAME = "daemon.lock"
DATA_DIR_MODE = 0o700


@dataclass
class DataDirLock:
    """An exclusive C{flock} on C{<data-dir>/daemon.lock}, held as long as
    its file descriptor is open: for the daemon's life (the kernel drops it
    when the process ends, however it ends)."""

    path: Path
    fd: int

    def record_pid(self) -> None:
        """Write this process's id into the lock file, for the error of the
        next daemon to name it (again after twistd forks into the
        background: the pid changes)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def release(self) -> None:
        """Close the file, which drops the lock (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fail(message: str) -> SystemExit:
    return SystemExit(f"securevault: error: {message}")


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """Make the data directory if need be and take its lock; another daemon
    holding it is a L{SystemExit} naming its pid."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=DATA_DIR_MODE)
    except OSError as error:
        raise _fail(f"cannot create the data directory {data_dir}: {error.strerror}") from None
    check_writable(data_dir, "the data directory")
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise _fail(f"cannot open {path}: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_pid(fd)
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _fail(f"another securevault daemon is using {data_dir} (pid {holder or 'unknown'})") from None
        raise _fail(f"cannot lock {path}: {error.strerror}") from None
    lock = DataDirLock(path, fd)
    lock.record_pid()
    return lock


def _read_pid(fd: int) -> str | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None


def check_writable(directory: Path, what: str) -> None:
    """Create and remove a file in C{directory} (or, while it does not
    exist, in the nearest ancestor that does, where it would be created):
    permissions, ACLs, read-only mounts and a full inode table all show.
    Failure is a L{SystemExit} naming C{what} and the directory."""
    probe_in = directory
    while not probe_in.exists() and probe_in.parent != probe_in:
        probe_in = probe_in.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".securevault-write-check-", dir=probe_in)
    except OSError as error:
        where = str(directory) if probe_in == directory else f"{directory} (to be created in {probe_in})"
        raise _fail(f"{what} {where} is not writable: {error.strerror or error}") from None
    os.close(fd)
    os.unlink(name)


def check_file_writable(path: Path, what: str) -> None:
    """The directory of a file the daemon writes, and the file itself when
    it exists (opened for appending; nothing is written)."""
    check_writable(path.parent, f"the directory of {what}")
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as error:
            raise _fail(f"{what} {path} is not writable: {error.strerror or error}") from None


def claim_data_dir(config: VaultConfig) -> DataDirLock:
    """Everything the daemon checks before it opens its stores: the data
    directory's lock, then each directory it will write.  Only local paths
    are checked; PostgreSQL and S3 report their own failures at start."""
    lock = lock_data_dir(config.data_dir)
    metadata = config.metadata_url
    if metadata is None or metadata == "sqlite":
        check_file_writable(config.data_dir / METADATA_FILE, "the metadata database")
    elif metadata.startswith("sqlite:"):
        check_file_writable(Path(urlsplit(metadata).path), "the metadata database")
    blobs = config.blobs_url
    if blobs is None:
        check_writable(config.data_dir / "archives", "the blob directory")
    elif blobs.startswith("file:"):
        check_writable(Path(urlsplit(blobs).path), "the blob directory")
    if config.audit_log is not None:
        check_file_writable(config.audit_log, "the audit log")
    master_key = locate_master_key(config.data_dir, config.master_key).path
    if not master_key.exists():
        check_writable(master_key.parent, "the directory of the new master key")
    return lock
