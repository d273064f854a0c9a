# -*- test-case-name: tests.core.test_audit -*-
"""The audit log: security events as hash-chained JSON lines.

Each record carries C{prev}, the SHA-256 of the previous line as written, so
removing or editing a line breaks the chain at the next one, which
C{securevault-admin audit verify} reports.  Appends take an exclusive lock
and read the current last line, so the daemon and the admin command can
both append to one file.  A batch of records is one group commit: one write,
one fsync, then the head file replaced atomically, so a record is durable
once L{AuditLog.append_many} returns.  Plain blocking code: the daemon calls
it in the pool (through L{securevault.server.auditing}).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securevault.core.fsutil import fsync_directory, write_all, write_atomically

GENESIS = "0" * 64
TAIL_BYTES = 64 * 1024


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def utc_time(seconds: float) -> str:
    """A POSIX time as the log writes it: RFC 3339 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def utc_now() -> str:
    return utc_time(time.time())


def _last_line(fd: int) -> bytes | None:
    """The file's last line, however long, read backwards from the end."""
    position = os.fstat(fd).st_size
    tail = b""
    while position > 0:
        start = max(0, position - TAIL_BYTES)
        tail = os.pread(fd, position - start, start) + tail
        position = start
        body = tail[:-1] if tail.endswith(b"\n") else tail
        cut = body.rfind(b"\n")
        if cut >= 0:
            return body[cut + 1 :]
    body = tail[:-1] if tail.endswith(b"\n") else tail
    return body or None


def head_path(path: Path) -> Path:
    """The sidecar naming the chain's last record, so that removing or
    editing records at the end is detected too."""
    return path.with_name(path.name + ".head")


def _read_head(path: Path) -> dict[str, Any] | None:
    try:
        head = json.loads(head_path(path).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(head, dict) or not isinstance(head.get("records"), int):
        return None
    return head


def _count_lines(fd: int) -> int:
    count = 0
    position = 0
    while block := os.pread(fd, 1 << 20, position):
        count += block.count(b"\n")
        position += len(block)
    return count


def _write_head(path: Path, records: int, last_hash: str) -> None:
    """Replace the head atomically and durably (temp, fsync, rename, fsync
    of the directory)."""
    write_atomically(head_path(path), json.dumps({"records": records, "last": last_hash}).encode("ascii"))


def _truncate(fd: int, size: int) -> None:
    """Best effort: cut a failed batch off again, so that the log holds
    whole batches only (a partial line would break the chain)."""
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass


class AuditLog:
    """Appends records to a JSON-lines file with a hash chain."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, event: str, **fields: Any) -> None:
        """Write one record (a batch of one); fields must hold no secret."""
        self.append_many([{"event": event, **fields}])

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Write C{records} in order as one group commit: one lock, one write,
        one fsync of the log, then the head replaced atomically and synced.

        Each record is its fields plus C{prev} and, unless given, C{time};
        fields must hold no secret.  When this returns every record is on
        disk; when it raises, the log is cut back to where it was (best
        effort), so the next batch still chains cleanly.
        """
        if not records:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                last = _last_line(fd)
                previous = GENESIS if last is None else line_hash(last)
                head = _read_head(self.path)
                if head is None or head.get("last") != previous:
                    count = _count_lines(fd)  # first append, or a head behind after a crash
                else:
                    count = head["records"]
                now = utc_now()
                lines = []
                for fields in records:
                    record = {"time": now, **fields, "prev": previous}
                    # ASCII-only JSON: a lone surrogate in a hostile username is escaped,
                    # never an encoding error that would drop the record.
                    line = json.dumps(record, ensure_ascii=True, sort_keys=True).encode("ascii")
                    lines.append(line)
                    previous = line_hash(line)
                try:
                    write_all(fd, b"".join(line + b"\n" for line in lines))
                    os.fsync(fd)
                    if size == 0:
                        fsync_directory(self.path.parent)  # a new log's name must survive too
                    _write_head(self.path, count + len(lines), previous)
                except BaseException:
                    _truncate(fd, size)
                    raise
            finally:
                os.close(fd)  # releases the lock


@dataclass(frozen=True)
class ChainBreak:
    """Where the chain breaks: line number (1-based) and why."""

    line: int
    reason: str


def verify_chain(path: Path) -> tuple[int, list[ChainBreak]]:
    """Check every link; returns the record count and the breaks found.

    The head must name the last record, or an earlier one whose line is
    intact, followed by records that chain to it: a kill between a batch's
    fsync and its head update leaves the head one batch behind, and those
    records are whole and linked.  A log shorter than its head, or whose
    record at the head's position differs, is broken."""
    breaks: list[ChainBreak] = []
    head = _read_head(path)
    pinned = head["records"] if head is not None else None
    pinned_hash: str | None = None
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
        if number == pinned:
            pinned_hash = previous
    if breaks:
        return count, breaks  # already broken; the head adds nothing
    if head is None:
        if count:
            breaks.append(ChainBreak(count, f"the head file {head_path(path).name} is missing or damaged"))
    elif head["records"] > count or head.get("last") != (pinned_hash if head["records"] else None):
        breaks.append(
            ChainBreak(
                count,
                f"the log ends at record {count} but its head records {head['records']}: "
                "records were removed or edited at the end",
            )
        )
    return count, breaks


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, raw.rstrip(b"\n")
