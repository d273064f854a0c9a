# -*- test-case-name: tests.test_audit -*-
"""The audit log: security events as hash-chained JSON lines.

Each record carries C{prev}, the SHA-256 of the previous line as written, so
removing or editing a line breaks the chain at the next one, which
C{securevault-admin audit verify} reports.  Appends take an exclusive lock
and read the current last line, so the daemon and the admin command can
both append to one file.  Plain blocking code: the daemon calls it in the pool.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

GENESIS = "0" * 64
TAIL_BYTES = 64 * 1024


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _last_line(fd: int) -> bytes | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    start = max(0, size - TAIL_BYTES)
    data = os.pread(fd, size - start, start)
    lines = data.rstrip(b"\n").split(b"\n")
    return lines[-1] if lines and lines[-1] else None


class AuditLog:
    """Appends records to a JSON-lines file with a hash chain."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, event: str, **fields: Any) -> None:
        """Write one record; fields must hold no secret."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                last = _last_line(fd)
                record = {"time": utc_now(), "event": event, **fields}
                record["prev"] = GENESIS if last is None else line_hash(last)
                line = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
                os.write(fd, line + b"\n")
            finally:
                os.close(fd)  # releases the lock


@dataclass(frozen=True)
class ChainBreak:
    """Where the chain breaks: line number (1-based) and why."""

    line: int
    reason: str


def verify_chain(path: Path) -> tuple[int, list[ChainBreak]]:
    """Check every link; returns the record count and the breaks found."""
    breaks: list[ChainBreak] = []
    previous = GENESIS
    count = 0
    for number, line in _lines(path):
        count += 1
        try:
            record = json.loads(line)
            prev = record["prev"]
        except (ValueError, KeyError, TypeError):
            breaks.append(ChainBreak(number, "not a JSON audit record"))
            previous = line_hash(line)
            continue
        if prev != previous:
            breaks.append(ChainBreak(number, "previous-record hash does not match: a line was removed or edited"))
        previous = line_hash(line)
    return count, breaks


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, raw.rstrip(b"\n")
