# -*- test-case-name: tests.test_storage -*-
"""Durable file writes: temp name, fsync, rename, directory fsync.

Plain blocking code, run in the worker pool by the daemon.
"""

from __future__ import annotations

import os
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink inside C{directory} survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def temp_name(path: Path) -> Path:
    """A fresh temp name beside C{path}: C{.NAME.PID.RAND.tmp}."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{TEMP_SUFFIX}")


def remove_stale_temps(path: Path) -> int:
    """Remove temp files a killed L{write_atomically} of C{path} left behind
    (they may hold secrets, such as a retired master key)."""
    removed = 0
    for stale in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
        removed += 1
    if removed:
        fsync_directory(path.parent)
    return removed


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace C{path} with C{data} so that a crash leaves the old or the new
    content, never a mix; the file is created with C{mode}."""
    temp = temp_name(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
