# -*- test-case-name: tests.core.test_audit -*-
"""The audit log: security events as a keyed chain of JSON lines.

Each record carries C{prev}, the HMAC-SHA256 (under the audit key, derived
from the vault's integrity key: L{securevault.core.integrity.audit_chain_key})
of the previous line as written.  Removing, editing or inserting a line
breaks the chain at the next one, and nobody without the master key can
rechain it.  The chain's I{head} (its record count and the MAC of its last
line, itself MACed) is kept in the metadata store's named state, apart from
the log, so that a log truncated, emptied, removed or rewound together with
its sidecar C{.head} file no longer matches it: C{securevault-admin audit
verify} reports all of these.

A log begun before keyed chains keeps its plain SHA-256 links; the first
keyed append writes an C{audit_chain_keyed} marker whose C{prev} is the MAC
of the last plain line, and plain links are accepted before it only.

Appends take an exclusive lock and read the current last line, so the
daemon and the admin command can both append to one file.  A batch of
records is one group commit: one write, one fsync, then the head in the
store, then the C{.head} file; a record is durable once
L{AuditLog.append_many} returns.  Plain blocking code: the daemon calls it
in the pool (through L{securevault.server.auditing}).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from securevault.core.fsutil import fsync_directory, write_all, write_atomically

GENESIS = "0" * 64
TAIL_BYTES = 64 * 1024
# The record that starts the keyed chain of a log begun with plain links.
KEYED_MARKER = "audit_chain_keyed"
# Named state in the metadata store: one head per log (see head_state_name).
HEAD_STATE_PREFIX = "audit_head:"


class HeadStore(Protocol):
    """Where the chain's head is kept: the metadata store's named state."""

    def get_state(self, name: str) -> str | None: ...

    def set_state(self, name: str, value: str | None) -> None: ...


def line_hash(line: bytes) -> str:
    """The plain link of a log from before keyed chains."""
    return hashlib.sha256(line).hexdigest()


def line_mac(key: bytes, line: bytes) -> str:
    """The keyed link: HMAC-SHA256 of the line as written, in hex."""
    return hmac.new(key, line, hashlib.sha256).hexdigest()


def head_mac(key: bytes, name: str, records: int, last: str) -> str:
    """The MAC of a head document: binds its count and last link to the
    log it belongs to (C{name}), so that no head can be made up or moved."""
    message = json.dumps(["audit-head", name, records, last], ensure_ascii=True, separators=(",", ":"))
    return hmac.new(key, message.encode("ascii"), hashlib.sha256).hexdigest()


def head_state_name(path: Path) -> str:
    """The store's name for this log's head: this host and the log's
    absolute path, as every node of a cluster shares one store and keeps its
    own log (often at the same path)."""
    return f"{HEAD_STATE_PREFIX}{socket.gethostname()}:{os.path.realpath(path)}"


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
    """The sidecar holding the same head as the store (a witness beside
    the log for a verifier without the store, and what a log written
    without a store relies on)."""
    return path.with_name(path.name + ".head")


@dataclass(frozen=True)
class Head:
    """A chain's head: its record count, and the MAC of its last line
    (C{GENESIS} for none), i.e. the C{prev} its next record will carry."""

    records: int
    last: str


class HeadForged(ValueError):
    """A head document whose MAC does not hold."""


def head_document(key: bytes, name: str, head: Head) -> str:
    """The head as stored: JSON with C{records}, C{last} and C{mac}."""
    return json.dumps(
        {"records": head.records, "last": head.last, "mac": head_mac(key, name, head.records, head.last)},
        sort_keys=True,
    )


def parse_head(key: bytes, name: str, document: str | bytes) -> Head:
    """The head a document names, or L{HeadForged} unless its MAC holds."""
    try:
        fields = json.loads(document)
        records, last, mac = fields["records"], fields["last"], fields["mac"]
        valid = isinstance(records, int) and records >= 0 and isinstance(last, str) and isinstance(mac, str)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid or not hmac.compare_digest(mac, head_mac(key, name, records, last)):
        raise HeadForged("not a head written under this vault's audit key")
    return Head(records, last)


def _read_head_file(path: Path) -> dict[str, Any] | None:
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


def _truncate(fd: int, size: int) -> None:
    """Best effort: cut a failed batch off again, so that the log holds
    whole batches only (a partial line would break the chain)."""
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass


def _encode(record: dict[str, Any]) -> bytes:
    # ASCII-only JSON: a lone surrogate in a hostile username is escaped,
    # never an encoding error that would drop the record.
    return json.dumps(record, ensure_ascii=True, sort_keys=True).encode("ascii")


class AuditLog:
    """Appends records to a JSON-lines file with a keyed chain.

    C{key} is the audit key (L{securevault.core.integrity.audit_chain_key});
    C{heads} the metadata store that keeps the chain's head under
    C{head_name} (default L{head_state_name}).  Without C{heads} the head is
    kept only beside the log, where whoever can rewind the log can rewind it
    too: for tests and tools, never the daemon.
    """

    def __init__(self, path: Path, key: bytes, heads: HeadStore | None = None, *, head_name: str | None = None) -> None:
        self.path = Path(path)
        self.heads = heads
        self.head_name = head_name if head_name is not None else head_state_name(self.path)
        self._key = key
        self._lock = threading.Lock()

    def append(self, event: str, **fields: Any) -> None:
        """Write one record (a batch of one); fields must hold no secret."""
        self.append_many([{"event": event, **fields}])

    def _stored_head(self) -> Head | None:
        """The head as last committed (None: none, or not a valid one)."""
        if self.heads is not None:
            document: str | bytes | None = self.heads.get_state(self.head_name)
        else:
            try:
                document = head_path(self.path).read_bytes()
            except OSError:
                document = None
        if document is None:
            return None
        try:
            return parse_head(self._key, self.head_name, document)
        except HeadForged:
            return None  # rewritten below; verify reports what was there

    def _commit_head(self, head: Head) -> None:
        document = head_document(self._key, self.head_name, head)
        if self.heads is not None:
            self.heads.set_state(self.head_name, document)
        else:
            write_atomically(head_path(self.path), document.encode("ascii"))

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Write C{records} in order as one group commit: one lock, one write,
        one fsync of the log, then the head in the store and beside the log.

        Each record is its fields plus C{prev} and, unless given, C{time};
        fields must hold no secret.  When this returns every record is on
        disk and named by the head; when it raises before the store took the
        head, the log is cut back to where it was (best effort), so the next
        batch still chains cleanly.
        """
        if not records:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._append_locked(fd, records)
            finally:
                os.close(fd)  # releases the lock

    def _append_locked(self, fd: int, records: list[dict[str, Any]]) -> None:
        size = os.fstat(fd).st_size
        last = _last_line(fd)
        previous = GENESIS if last is None else line_mac(self._key, last)
        head = self._stored_head()
        if head is not None and head.last == previous:
            count = head.records
        else:
            count = _count_lines(fd)  # first keyed append, or a head behind after a crash
        now = utc_now()
        if head is None:
            # The chain is not keyed yet (a new log, or one from before keyed
            # chains): name its present end first, so that from now on the
            # store always holds a head for it, even after a crash mid-batch.
            self._commit_head(Head(count, previous))
            if last is not None:
                records = [{"time": now, "event": KEYED_MARKER}, *records]
        lines = []
        for fields in records:
            line = _encode({"time": now, **fields, "prev": previous})
            lines.append(line)
            previous = line_mac(self._key, line)
        committed = False
        try:
            write_all(fd, b"".join(line + b"\n" for line in lines))
            os.fsync(fd)
            if size == 0:
                fsync_directory(self.path.parent)  # a new log's name must survive too
            head = Head(count + len(lines), previous)
            self._commit_head(head)
            committed = True
            if self.heads is not None:
                write_atomically(head_path(self.path), head_document(self._key, self.head_name, head).encode("ascii"))
        except BaseException:
            if not committed:
                _truncate(fd, size)
            raise


@dataclass(frozen=True)
class ChainBreak:
    """Where the chain breaks: line number (1-based; 0 for the log as a
    whole) and why."""

    line: int
    reason: str


def _first_marker(path: Path) -> int | None:
    for number, line in _lines(path):
        if b'"' + KEYED_MARKER.encode("ascii") + b'"' in line:
            try:
                if json.loads(line).get("event") == KEYED_MARKER:
                    return number
            except (ValueError, AttributeError):
                continue
    return None


def verify_chain(
    path: Path, key: bytes, heads: HeadStore | None = None, *, head_name: str | None = None
) -> tuple[int, list[ChainBreak]]:
    """Check every link and the log's end; returns the record count and the
    breaks found (a missing log with no head anywhere: C{(0, [])}).

    Links after the C{audit_chain_keyed} marker, and in a log without one
    that has a keyed head, must be keyed; plain SHA-256 links are accepted
    before the marker only, or in a log never keyed (no head in the store).
    Each head (the store's, and a keyed C{.head} file) must name the last
    record or an earlier one whose link matches: a kill between a batch's
    fsync and its head update leaves the heads one batch behind, and those
    records are whole and linked.  A log shorter than a head, or whose
    record at a head's position differs, is broken."""
    name = head_name if head_name is not None else head_state_name(path)
    breaks: list[ChainBreak] = []
    pinned: list[tuple[str, Head]] = []  # (where it is kept, head)
    stored: str | None = heads.get_state(name) if heads is not None else None
    if stored is not None:
        try:
            pinned.append(("the metadata store's head", parse_head(key, name, stored)))
        except HeadForged:
            breaks.append(ChainBreak(0, "the metadata store's head for this log is forged or damaged"))
    legacy_head: dict[str, Any] | None = None
    side = _read_head_file(path)
    if side is not None and "mac" in side:
        try:
            pinned.append((f"the head file {head_path(path).name}", parse_head(key, name, json.dumps(side))))
        except HeadForged:
            breaks.append(ChainBreak(0, f"the head file {head_path(path).name} is forged or damaged"))
    elif side is not None:
        legacy_head = side
    if not path.exists():
        for where, head in pinned:
            if head.records:
                breaks.append(ChainBreak(0, f"the log is missing, but {where} records {head.records} records"))
        return 0, breaks
    marker = _first_marker(path)
    if heads is not None and stored is None and (marker is not None or pinned):
        breaks.append(ChainBreak(0, "the metadata store holds no head for this keyed log: it was removed"))
    plain_only = marker is None and not pinned and not breaks  # a log from before keyed chains
    wanted = {head.records for _, head in pinned}
    links: dict[int, str] = {0: GENESIS}
    previous_hash = previous_mac = GENESIS
    legacy_pinned_hash: str | None = None
    count = 0
    for number, line in _lines(path):
        count += 1
        try:
            record = json.loads(line)
            prev = record["prev"]
            event = record.get("event")
        except (ValueError, KeyError, TypeError, AttributeError):
            breaks.append(ChainBreak(number, "not a JSON audit record"))
        else:
            plain = plain_only or (marker is not None and number < marker)
            if prev != (previous_hash if plain else previous_mac):
                breaks.append(
                    ChainBreak(number, "previous-record link does not match: a line was removed, edited or rechained")
                )
            elif event == KEYED_MARKER and marker is not None and number > marker:
                breaks.append(
                    ChainBreak(number, "a second start of the keyed chain: the store's head for this log was lost")
                )
        previous_hash = line_hash(line)
        previous_mac = line_mac(key, line)
        if number in wanted:
            links[number] = previous_mac
        if legacy_head is not None and number == legacy_head["records"]:
            legacy_pinned_hash = previous_hash
    if breaks:
        return count, breaks  # already broken; the heads add little
    for where, head in pinned:
        if head.records > count:
            breaks.append(
                ChainBreak(
                    count,
                    f"the log ends at record {count} but {where} records {head.records}: "
                    "records were removed at the end (truncated, emptied or rewound)",
                )
            )
        elif not hmac.compare_digest(links[head.records], head.last):
            breaks.append(
                ChainBreak(head.records, f"record {head.records} is not the one {where} names: the log was rewritten")
            )
    if plain_only and count:
        if legacy_head is None:
            breaks.append(ChainBreak(count, f"the head file {head_path(path).name} is missing or damaged"))
        elif legacy_head["records"] > count or legacy_head.get("last") != (
            legacy_pinned_hash if legacy_head["records"] else None
        ):
            breaks.append(
                ChainBreak(
                    count,
                    f"the log ends at record {count} but its head records {legacy_head['records']}: "
                    "records were removed or edited at the end",
                )
            )
    return count, breaks


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, raw.rstrip(b"\n")
