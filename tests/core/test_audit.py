# -*- test-case-name: tests.core.test_audit -*-
"""Tests for L{securevault.core.audit}: the keyed, chained JSON-lines audit
log, its head in the metadata store, and C{securevault-admin audit verify}."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from securevault.admin import cli as admin
from securevault.core.audit import (
    GENESIS,
    KEYED_MARKER,
    AuditLog,
    ChainBreak,
    Head,
    head_document,
    head_path,
    head_state_name,
    line_hash,
    line_mac,
    parse_head,
    verify_chain,
)
from securevault.core.integrity import audit_chain_key, integrity_key
from securevault.core.keys import load_keyring
from securevault.stores.metadata import SqliteMetadataStore
from tests.support.rows import TEST_AUDIT_KEY
from tests.support.testcase import SyncTestCase

REPOSITORY = Path(__file__).parents[2]
TIME_PATTERN = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
OTHER_KEY = b"\xaa" * 32

# Appends N records from a separate interpreter: argv = path, store, tag, count.
APPEND_CHILD = """
import sys
from pathlib import Path
from securevault.core.audit import AuditLog
from securevault.stores.metadata import SqliteMetadataStore
from tests.support.rows import TEST_AUDIT_KEY
log = AuditLog(Path(sys.argv[1]), TEST_AUDIT_KEY, SqliteMetadataStore(Path(sys.argv[2])))
for n in range(int(sys.argv[4])):
    log.append("probe", writer=sys.argv[3], n=n)
"""

# Appends a batch of 3 records of ~1 KB under RLIMIT_FSIZE = log size + 100
# bytes, so the write fails part-way (EFBIG); prints the errno or "written".
FULL_DISK_CHILD = """
import resource, sys
from pathlib import Path
from securevault.core.audit import AuditLog
from securevault.stores.metadata import SqliteMetadataStore
from tests.support.rows import TEST_AUDIT_KEY
path = Path(sys.argv[1])
log = AuditLog(path, TEST_AUDIT_KEY, SqliteMetadataStore(Path(sys.argv[2])))
limit = path.stat().st_size + 100
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    log.append_many([{"event": "probe", "blob": "x" * 1000, "n": n} for n in range(3)])
except OSError as error:
    print(error.errno)
else:
    print("written")
"""


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode("ascii")


def _plain_chain(records: list[dict[str, Any]], previous: str = GENESIS) -> list[bytes]:
    """Lines linked as before keyed chains (or as a forger without the key
    would link them): C{prev} is the SHA-256 of the line before."""
    lines = []
    for record in records:
        line = _encode({"time": "2026-01-01T00:00:00.000Z", **record, "prev": previous})
        lines.append(line)
        previous = line_hash(line)
    return lines


def _keyed_chain(key: bytes, records: list[dict[str, Any]], previous: str = GENESIS) -> list[bytes]:
    lines = []
    for record in records:
        line = _encode({"time": "2026-01-01T00:00:00.000Z", **record, "prev": previous})
        lines.append(line)
        previous = line_mac(key, line)
    return lines


def _write_plain_log(path: Path, lines: list[bytes]) -> None:
    """A log and head file as securevault wrote them before keyed chains."""
    _write_lines(path, lines)
    head_path(path).write_text(json.dumps({"records": len(lines), "last": line_hash(lines[-1])}))


class AuditLogTestCase(SyncTestCase):
    """A scratch log holding five records, C{n} = 0..4, its head in a real
    SQLite metadata store."""

    def setUp(self) -> None:
        self.data_dir = self.make_dir()
        self.path = self.data_dir / "audit.jsonl"
        self.store_path = self.data_dir / "vault.db"
        self.store = SqliteMetadataStore(self.store_path)
        self.addCleanup(self.store.close)
        self.log = self.new_log(self.path)
        for n in range(5):
            self.log.append("upload", user="alice", archive_id=f"{n:032x}", n=n)

    def new_log(self, path: Path, key: bytes = TEST_AUDIT_KEY) -> AuditLog:
        return AuditLog(path, key, self.store)

    def verify(self, path: Path | None = None) -> tuple[int, list[ChainBreak]]:
        return verify_chain(path or self.path, TEST_AUDIT_KEY, self.store)

    def break_lines(self, path: Path | None = None) -> list[int]:
        return [item.line for item in self.verify(path)[1]]

    def store_head(self, path: Path | None = None) -> str | None:
        return self.store.get_state(head_state_name(path or self.path))


class AppendTests(AuditLogTestCase):
    """L{AuditLog.append} writes one chained JSON line per event."""

    def test_fresh_log_verifies(self) -> None:
        """A log written only by append verifies: every record's C{prev} is the
        HMAC-SHA256 of the line before under the audit key, the first one's
        the genesis value."""
        self.assertEqual(self.verify(), (5, []))
        lines = _lines(self.path)
        records = [json.loads(line) for line in lines]
        self.assertEqual(records[0]["prev"], GENESIS)
        for before, record in zip(lines, records[1:], strict=False):
            self.assertEqual(record["prev"], line_mac(TEST_AUDIT_KEY, before))
        self.assertEqual([r["n"] for r in records], list(range(5)))

    def test_record_holds_only_what_is_passed(self) -> None:
        """A record holds the time, the event, the chain link and the fields
        given, nothing else (so no secret can slip in unasked)."""
        path = self.make_dir() / "audit.jsonl"
        self.new_log(path).append("login_failed", user="bob", reason="bad password", attempts=3)
        [line] = _lines(path)
        record = json.loads(line)
        self.assertEqual(set(record), {"time", "event", "prev", "user", "reason", "attempts"})
        self.assertEqual(
            {k: v for k, v in record.items() if k != "time"},
            {
                "event": "login_failed",
                "prev": GENESIS,
                "user": "bob",
                "reason": "bad password",
                "attempts": 3,
            },
        )
        self.assertRegex(record["time"], TIME_PATTERN)

    def test_file_is_private(self) -> None:
        """The audit log is created with mode 0600."""
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_non_ascii_fields(self) -> None:
        """Non-ASCII field values are written as UTF-8 and the chain still verifies."""
        self.log.append("upload", filename="résumé ✓.pdf")
        self.assertEqual(self.verify(), (6, []))
        self.assertEqual(json.loads(_lines(self.path)[-1])["filename"], "résumé ✓.pdf")

    def test_two_instances_alternating(self) -> None:
        """Two AuditLog objects on one file (as the daemon and the admin
        command have) appending in turn keep one valid chain."""
        path = self.make_dir() / "audit.jsonl"
        first, second = self.new_log(path), self.new_log(path)
        for n in range(10):
            (first if n % 2 == 0 else second).append("probe", n=n)
        self.assertEqual(self.verify(path), (10, []))
        self.assertEqual([json.loads(line)["n"] for line in _lines(path)], list(range(10)))

    def test_two_instances_concurrently(self) -> None:
        """Threads appending through two AuditLog objects at once (so only the
        file lock, not the in-process lock, orders them) keep a valid chain."""
        path = self.make_dir() / "audit.jsonl"
        logs = [self.new_log(path), self.new_log(path)]

        def work(index: int) -> None:
            for n in range(25):
                logs[index % 2].append("probe", writer=index, n=n)

        threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(self.verify(path), (100, []))

    def test_two_processes_concurrently(self) -> None:
        """Two processes appending to one log at the same time keep a valid
        chain and lose no record."""
        path = self.make_dir() / "audit.jsonl"
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        children = [
            subprocess.Popen([sys.executable, "-c", APPEND_CHILD, str(path), str(self.store_path), tag, "60"], env=env)
            for tag in ("left", "right")
        ]
        self.assertEqual([child.wait(timeout=60) for child in children], [0, 0])
        self.assertEqual(self.verify(path), (120, []))
        records = [json.loads(line) for line in _lines(path)]
        for tag in ("left", "right"):
            self.assertEqual([r["n"] for r in records if r["writer"] == tag], list(range(60)))

    def test_large_record(self) -> None:
        """A record longer than the tail the appender reads back is still
        chained correctly by the next append."""
        self.log.append("probe", blob="x" * (100 * 1024))
        self.log.append("probe", n=6)
        self.assertEqual(self.verify(), (7, []))


class AppendManyTests(AuditLogTestCase):
    """L{AuditLog.append_many} writes a batch as one group commit."""

    def head(self) -> Head:
        """The store's head for the log (its MAC checked)."""
        document = self.store_head()
        assert document is not None
        return parse_head(TEST_AUDIT_KEY, head_state_name(self.path), document)

    def heads(self) -> tuple[str | None, bytes]:
        """Both copies of the head: the store's and the file beside the log."""
        return self.store_head(), head_path(self.path).read_bytes()

    def set_heads(self, heads: tuple[str | None, bytes]) -> None:
        self.store.set_state(head_state_name(self.path), heads[0])
        head_path(self.path).write_bytes(heads[1])

    def test_batch_chains_and_moves_the_head(self) -> None:
        """A batch of three after five records: eight chained records, in
        order, and the head (in the store, and the same beside the log)
        names the eighth (its count and MAC), so the batch is committed as a
        whole."""
        self.log.append_many([{"event": "login", "n": n} for n in (5, 6, 7)])
        self.assertEqual(self.verify(), (8, []))
        lines = _lines(self.path)
        self.assertEqual([json.loads(line)["n"] for line in lines], list(range(8)))
        self.assertEqual(self.head(), Head(8, line_mac(TEST_AUDIT_KEY, lines[-1])))
        self.assertEqual(head_path(self.path).read_text(), self.store_head())
        self.assertEqual(stat.S_IMODE(head_path(self.path).stat().st_mode), 0o600)

    def test_record_fields(self) -> None:
        """Each record holds its fields, C{prev}, and C{time}: the one given,
        else the time of writing; the caller's dicts are not changed."""
        given = {"event": "session_refused", "time": "2027-01-15T08:00:00.250Z", "count": 3}
        untimed = {"event": "login", "user": "alice"}
        self.log.append_many([given, untimed])
        first, second = (json.loads(line) for line in _lines(self.path)[-2:])
        self.assertEqual(first, {**given, "prev": line_mac(TEST_AUDIT_KEY, _lines(self.path)[4])})
        self.assertEqual(set(second), {"event", "user", "time", "prev"})
        self.assertRegex(second["time"], TIME_PATTERN)
        self.assertEqual(untimed, {"event": "login", "user": "alice"})

    def test_empty_batch_writes_nothing(self) -> None:
        """An empty batch leaves the log and its head untouched."""
        before = (self.path.read_bytes(), self.heads())
        self.log.append_many([])
        self.assertEqual((self.path.read_bytes(), self.heads()), before)

    def test_failed_batch_is_cut_back(self) -> None:
        """A batch whose write fails part-way (the file size limit, as a full
        disk would) raises, and leaves the log and head as they were: the
        chain verifies and the next batch appends cleanly."""
        before = (self.path.read_bytes(), self.heads())
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        child = subprocess.run(
            [sys.executable, "-c", FULL_DISK_CHILD, str(self.path), str(self.store_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((child.returncode, child.stdout.strip()), (0, "27"), child.stderr)  # EFBIG
        self.assertEqual((self.path.read_bytes(), self.heads()), before)
        self.log.append_many([{"event": "probe", "n": 5}])
        self.assertEqual(self.verify(), (6, []))

    def test_head_behind_after_a_kill(self) -> None:
        """A kill between a batch's fsync and its head updates leaves both
        heads naming an earlier record: the log still verifies (the batch is
        whole and chained to it), and the next append brings them up to date."""
        old_heads = self.heads()
        self.log.append_many([{"event": "login", "n": n} for n in (5, 6)])
        self.set_heads(old_heads)
        self.assertEqual(self.verify(), (7, []))
        self.log.append("logout", n=7)
        self.assertEqual(self.head().records, 8)
        self.assertEqual(self.verify(), (8, []))

    def test_head_behind_does_not_hide_edits(self) -> None:
        """A head behind the log still pins its record: when that record was
        changed (and the lines after relinked), the log is broken."""
        old_heads = self.heads()
        self.log.append("login", n=5)
        lines = _lines(self.path)
        edited = json.loads(lines[4])
        edited["user"] = "mallory"
        lines[4] = json.dumps(edited, sort_keys=True).encode()
        lines[5:] = _plain_chain([{"event": "login"}], line_hash(lines[4]))
        _write_lines(self.path, lines)
        self.set_heads(old_heads)
        self.assertNotEqual(self.break_lines(), [])


class ChainBreakTests(AuditLogTestCase):
    """L{verify_chain} reports the first line whose link does not hold."""

    def test_remove_middle_line(self) -> None:
        """Removing line 3 breaks the chain at the line now in its place."""
        lines = _lines(self.path)
        del lines[2]
        _write_lines(self.path, lines)
        count, breaks = self.verify()
        self.assertEqual(count, 4)
        self.assertEqual([b.line for b in breaks], [3])
        self.assertIn("removed, edited", breaks[0].reason)

    def test_edit_field(self) -> None:
        """Editing a field of line 2 (still valid JSON, its own link intact)
        breaks the chain at line 3, the record that hashed the original."""
        lines = _lines(self.path)
        record = json.loads(lines[1])
        record["user"] = "mallory"
        lines[1] = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
        _write_lines(self.path, lines)
        self.assertEqual(self.break_lines(), [3])

    def test_edit_single_byte(self) -> None:
        """Changing one byte of line 1 breaks the chain at line 2."""
        lines = _lines(self.path)
        lines[0] = lines[0].replace(b'"n": 0', b'"n": 9')
        _write_lines(self.path, lines)
        self.assertEqual(self.break_lines(), [2])

    def test_swap_lines(self) -> None:
        """Swapping lines 2 and 3 breaks every link they touch: lines 2, 3 and 4."""
        lines = _lines(self.path)
        lines[1], lines[2] = lines[2], lines[1]
        _write_lines(self.path, lines)
        self.assertEqual(self.break_lines(), [2, 3, 4])

    def test_insert_forged_line(self) -> None:
        """A forged line inserted at 3 with a made-up link breaks at 3 and 4."""
        lines = _lines(self.path)
        forged: dict[str, Any] = {"time": "2026-01-01T00:00:00.000Z", "event": "login", "prev": "f" * 64}
        lines.insert(2, json.dumps(forged, sort_keys=True).encode())
        _write_lines(self.path, lines)
        self.assertEqual(self.break_lines(), [3, 4])

    def test_insert_forged_line_with_correct_link(self) -> None:
        """A forged line that links correctly to line 2 is still caught: the
        record after it (now line 4) no longer links to its predecessor."""
        lines = _lines(self.path)
        forged = {"time": "2026-01-01T00:00:00.000Z", "event": "login", "prev": line_mac(TEST_AUDIT_KEY, lines[1])}
        lines.insert(2, json.dumps(forged, sort_keys=True).encode())
        _write_lines(self.path, lines)
        self.assertEqual(self.break_lines(), [4])

    def test_insert_garbage_line(self) -> None:
        """A line that is not JSON is reported as such, and the next line's link breaks too."""
        lines = _lines(self.path)
        lines.insert(1, b"not json at all")
        _write_lines(self.path, lines)
        count, breaks = self.verify()
        self.assertEqual(count, 6)
        self.assertEqual(breaks[0], ChainBreak(2, "not a JSON audit record"))
        self.assertEqual([b.line for b in breaks], [2, 3])

    def test_non_object_lines(self) -> None:
        """JSON that is not an object with C{prev} (a list, a string, an object
        without the field) is a break, never an exception."""
        lines = _lines(self.path)
        lines[1:1] = [b"[1, 2]", b'"prev"', b'{"event": "x"}']
        _write_lines(self.path, lines)
        self.assertEqual(self.break_lines(), [2, 3, 4, 5])

    def test_remove_first_line(self) -> None:
        """Removing line 1 leaves a first record whose link is not the genesis value."""
        _write_lines(self.path, _lines(self.path)[1:])
        self.assertEqual(self.break_lines(), [1])

    def test_edit_or_remove_last_line(self) -> None:
        """Editing or removing the newest record is detected too."""
        lines = _lines(self.path)
        _write_lines(self.path, lines[:-1])
        self.assertNotEqual(self.break_lines(), [])

    def test_empty_log(self) -> None:
        """An empty log has no records and no breaks."""
        path = self.make_dir() / "audit.jsonl"
        path.write_bytes(b"")
        self.assertEqual(self.verify(path), (0, []))


class ForgeryTests(AuditLogTestCase):
    """What someone who can write the log, but has no master key, tries:
    each is reported, with the head in the metadata store as the witness."""

    def test_deleted_records_rechained_with_sha256(self) -> None:
        """Records deleted, C{prev} recomputed as SHA-256 links and the head
        file rewritten to match (what passed before keyed chains): broken."""
        lines = _lines(self.path)
        kept = [json.loads(line) for line in (lines[0], lines[3], lines[4])]
        forged = _plain_chain([{k: v for k, v in r.items() if k != "prev"} for r in kept])
        _write_plain_log(self.path, forged)
        count, breaks = self.verify()
        self.assertEqual(count, 3)
        self.assertNotEqual(breaks, [])

    def test_rechained_with_another_key(self) -> None:
        """A log rewritten with every link and both heads MACed under another
        key: broken (its links do not hold under the vault's key, and its
        head's MAC does not either)."""
        forger = AuditLog(self.path, OTHER_KEY, self.store)
        records = [json.loads(line) for line in _lines(self.path)[:3]]
        self.path.unlink()
        self.store.set_state(head_state_name(self.path), None)
        head_path(self.path).unlink()
        forger.append_many([{k: v for k, v in r.items() if k != "prev"} for r in records])
        count, breaks = self.verify()
        self.assertEqual(count, 3)
        self.assertIn(ChainBreak(0, "the metadata store's head for this log is forged or damaged"), breaks)

    def test_rechained_with_another_key_under_the_real_head(self) -> None:
        """Links MACed under another key, the store's head left alone: the
        first link after the genesis record breaks."""
        lines = _lines(self.path)
        records = [{k: v for k, v in json.loads(line).items() if k != "prev"} for line in lines]
        _write_lines(self.path, _keyed_chain(OTHER_KEY, records))
        self.assertEqual(self.break_lines(), [2, 3, 4, 5])

    def test_emptied_log(self) -> None:
        """An emptied log, its head file removed: the store's head still
        records five records."""
        self.path.write_bytes(b"")
        head_path(self.path).unlink()
        count, breaks = self.verify()
        self.assertEqual(count, 0)
        self.assertEqual(len(breaks), 1)
        self.assertIn("the metadata store's head records 5", breaks[0].reason)

    def test_missing_log(self) -> None:
        """A removed log (and head file): the store's head says it held five."""
        self.path.unlink()
        head_path(self.path).unlink()
        self.assertEqual(
            self.verify(),
            (0, [ChainBreak(0, "the log is missing, but the metadata store's head records 5 records")]),
        )

    def test_missing_log_never_written(self) -> None:
        """No log and no head anywhere: nothing to check, nothing broken (the
        admin command says there is no log)."""
        self.assertEqual(self.verify(self.make_dir() / "audit.jsonl"), (0, []))

    def test_truncated_log(self) -> None:
        """The last two records cut off: broken."""
        _write_lines(self.path, _lines(self.path)[:3])
        count, breaks = self.verify()
        self.assertEqual(count, 3)
        self.assertNotEqual(breaks, [])
        self.assertTrue(all("records 5" in item.reason for item in breaks), breaks)

    def test_rewound_with_its_head_file(self) -> None:
        """The log and its head file copied away, records appended, then both
        copied back: the store's head is ahead of the log, so broken."""
        saved = self.make_dir()
        shutil.copy(self.path, saved / "audit.jsonl")
        shutil.copy(head_path(self.path), saved / "audit.jsonl.head")
        self.log.append_many([{"event": "delete", "n": n} for n in (5, 6)])
        shutil.copy(saved / "audit.jsonl", self.path)
        shutil.copy(saved / "audit.jsonl.head", head_path(self.path))
        count, breaks = self.verify()
        self.assertEqual(count, 5)
        self.assertEqual(len(breaks), 1)
        self.assertIn("the metadata store's head records 7", breaks[0].reason)

    def test_rewound_head_forged_from_the_log(self) -> None:
        """A truncated log whose heads are set to the count and the C{prev}
        that the removed record carried (readable without the key): the
        heads' own MACs do not hold."""
        lines = _lines(self.path)
        last = json.loads(lines[3])["prev"]
        _write_lines(self.path, lines[:3])
        forged = json.dumps({"records": 3, "last": last, "mac": "0" * 64})
        self.store.set_state(head_state_name(self.path), forged)
        head_path(self.path).write_text(forged)
        self.assertNotEqual(self.verify()[1], [])

    def test_store_head_removed(self) -> None:
        """A keyed log whose head the store no longer holds: broken."""
        self.store.set_state(head_state_name(self.path), None)
        self.assertIn(
            ChainBreak(0, "the metadata store holds no head for this keyed log: it was removed"), self.verify()[1]
        )

    def test_head_of_another_log(self) -> None:
        """A head is bound to its log's name: another log's head copied into
        this log's place does not verify."""
        other = self.make_dir() / "audit.jsonl"
        self.new_log(other).append_many([{"event": "login", "n": n} for n in range(5)])
        self.store.set_state(head_state_name(self.path), self.store_head(other))
        self.assertIn(ChainBreak(0, "the metadata store's head for this log is forged or damaged"), self.verify()[1])


class PlainLogUpgradeTests(AuditLogTestCase):
    """A log from before keyed chains: its plain part is checked as before,
    and its keyed part starts at an C{audit_chain_keyed} marker."""

    def setUp(self) -> None:
        super().setUp()
        self.path = self.make_dir() / "audit.jsonl"
        self.plain = _plain_chain([{"event": "login", "n": n} for n in range(3)])
        _write_plain_log(self.path, self.plain)

    def test_plain_log_verifies_as_before(self) -> None:
        """Not yet appended to by this version: verified as a plain chain."""
        self.assertEqual(self.verify(), (3, []))

    def test_plain_log_edited(self) -> None:
        """Its plain links are still checked."""
        lines = list(self.plain)
        lines[1] = lines[1].replace(b'"n": 1', b'"n": 7')
        _write_lines(self.path, lines)
        self.assertEqual(self.break_lines(), [3])

    def test_first_append_writes_the_marker(self) -> None:
        """The first append starts the keyed chain with a marker whose
        C{prev} is the MAC of the last plain line; the whole log verifies, and
        the store's head names its end."""
        self.new_log(self.path).append("login", n=3)
        lines = _lines(self.path)
        self.assertEqual(lines[:3], self.plain)
        marker, record = json.loads(lines[3]), json.loads(lines[4])
        self.assertEqual((marker["event"], marker["prev"]), (KEYED_MARKER, line_mac(TEST_AUDIT_KEY, self.plain[-1])))
        self.assertEqual(record["prev"], line_mac(TEST_AUDIT_KEY, lines[3]))
        self.assertEqual(self.verify(), (5, []))
        self.new_log(self.path).append("logout", n=4)
        self.assertEqual(self.verify(), (6, []))
        self.assertEqual(sum(b'"audit_chain_keyed"' in line for line in _lines(self.path)), 1)

    def test_plain_links_after_the_marker(self) -> None:
        """A record linked with SHA-256 after the marker is a break."""
        self.new_log(self.path).append("login", n=3)
        lines = _lines(self.path)
        lines += _plain_chain([{"event": "login", "n": 4}], line_hash(lines[-1]))
        _write_lines(self.path, lines)
        self.assertEqual(self.break_lines(), [6])

    def test_plain_part_rewritten_under_the_marker(self) -> None:
        """Plain records removed before the marker (the plain links
        recomputed): the marker's MAC of its predecessor no longer holds."""
        self.new_log(self.path).append("login", n=3)
        lines = _lines(self.path)
        rest = _plain_chain([{"event": "login", "n": n} for n in (0, 2)])
        _write_lines(self.path, [*rest, *lines[3:]])
        self.assertEqual(self.break_lines(), [3])

    def test_second_marker(self) -> None:
        """The store's head removed and the log appended to again: a second
        marker starts another keyed chain, which is reported."""
        self.new_log(self.path).append("login", n=3)
        self.store.set_state(head_state_name(self.path), None)
        self.new_log(self.path).append("login", n=4)
        self.assertEqual(self.break_lines(), [6])

    def test_head_behind_after_a_kill_in_the_first_keyed_batch(self) -> None:
        """A kill after the first keyed batch was synced but before its heads
        moved: the store's head, written before the batch, names the last
        plain record, and the log verifies."""
        self.assertIsNone(self.store_head())
        old_file_head = head_path(self.path).read_bytes()
        self.new_log(self.path).append_many([{"event": "login", "n": 3}])
        name = head_state_name(self.path)
        written_first = head_document(TEST_AUDIT_KEY, name, Head(3, line_mac(TEST_AUDIT_KEY, self.plain[-1])))
        self.store.set_state(name, written_first)
        head_path(self.path).write_bytes(old_file_head)
        self.assertEqual(self.verify(), (5, []))


class AuditVerifyCommandTests(SyncTestCase):
    """C{securevault-admin audit verify}, on a vault with its master key."""

    def setUp(self) -> None:
        base = self.make_dir()
        self.data_dir = base / "vault-data"
        self.path = self.data_dir / "audit.jsonl"
        status, _, err = self.run_admin("init", "--certs-dir", str(base / "certs"))
        self.assertEqual((status, err), (0, ""))
        self.store = SqliteMetadataStore(self.data_dir / "vault.db")
        self.addCleanup(self.store.close)
        keyring = load_keyring(base / "vault-keys" / "master.key")
        self.log = AuditLog(self.path, audit_chain_key(integrity_key(keyring, self.store)), self.store)
        for n in range(5):
            self.log.append("upload", user="alice", n=n)

    def run_admin(self, *argv: str) -> tuple[int, str, str]:
        """Run C{securevault-admin --data-dir <scratch> ARGV...}; return (status, out, err)."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = admin.main(["--data-dir", str(self.data_dir), *argv])
        return status, out.getvalue(), err.getvalue()

    def test_intact(self) -> None:
        """An intact log: exit 0 and a count of the records checked."""
        status, out, err = self.run_admin("audit", "verify")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, "5 audit records checked, 0 breaks\n")

    def test_broken_names_line(self) -> None:
        """A log with a line removed: exit 1 and the output names the broken line."""
        lines = _lines(self.path)
        del lines[1]
        _write_lines(self.path, lines)
        status, out, err = self.run_admin("audit", "verify")
        self.assertEqual(status, 1)
        self.assertIn("BROKEN at line 2:", out)
        self.assertEqual(out.count("BROKEN"), 1)
        self.assertIn("1 breaks", out)

    def test_emptied(self) -> None:
        """An emptied log without its head file: exit 1, one line for the problem."""
        self.path.write_bytes(b"")
        head_path(self.path).unlink()
        status, out, err = self.run_admin("audit", "verify")
        self.assertEqual(status, 1)
        self.assertEqual(out.count("BROKEN"), 1)
        self.assertIn("records 5", out)

    def test_missing_log_with_head(self) -> None:
        """A removed log whose head the store holds: exit 1, reported as broken."""
        self.path.unlink()
        status, out, err = self.run_admin("audit", "verify")
        self.assertEqual(status, 1)
        self.assertIn("BROKEN: the log is missing, but the metadata store's head records 5 records", out)

    def test_explicit_path(self) -> None:
        """--audit-log names another file to check."""
        other = self.make_dir() / "elsewhere.jsonl"
        AuditLog(other, self.log._key, self.store).append("probe")
        lines = _lines(self.path)
        lines[0], lines[1] = lines[1], lines[0]
        _write_lines(self.path, lines)
        status, out, err = self.run_admin("audit", "verify", "--audit-log", str(other))
        self.assertEqual((status, err), (0, ""))
        self.assertIn("1 audit records checked, 0 breaks", out)
        self.assertEqual(self.run_admin("audit", "verify")[0], 1)

    def test_missing_log(self) -> None:
        """No audit log and no head for it: exit 1 with one error line naming the path."""
        path = self.make_dir() / "audit.jsonl"
        status, out, err = self.run_admin("audit", "verify", "--audit-log", str(path))
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("securevault-admin: error: "), err)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn(str(path), err)

    def test_admin_appends_keyed_records(self) -> None:
        """C{user unlock} appends to the same keyed chain (the daemon's key,
        from the master key): the log still verifies."""
        saved = sys.stdin
        sys.stdin = io.StringIO("a long enough password\n")
        self.addCleanup(setattr, sys, "stdin", saved)
        self.assertEqual(self.run_admin("user", "add", "alice", "--password-stdin")[0], 0)
        status, _, err = self.run_admin("user", "unlock", "alice")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(self.run_admin("audit", "verify")[:2], (0, "6 audit records checked, 0 breaks\n"))

    def test_subprocess_forged_and_intact(self) -> None:
        """Through C{python -m securevault.admin}: an intact log exits 0; the
        same log with a record deleted and rechained with SHA-256 (head file
        too) exits 1, naming the first broken link."""
        env = dict(os.environ, PYTHONPATH=str(REPOSITORY))

        def verify() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "securevault.admin", "--data-dir", str(self.data_dir), "audit", "verify"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )

        intact = verify()
        self.assertEqual(
            (intact.returncode, intact.stdout, intact.stderr), (0, "5 audit records checked, 0 breaks\n", "")
        )
        records = [json.loads(line) for line in _lines(self.path)]
        del records[2]
        _write_plain_log(self.path, _plain_chain([{k: v for k, v in r.items() if k != "prev"} for r in records]))
        forged = verify()
        self.assertEqual((forged.returncode, forged.stderr), (1, ""))
        self.assertTrue(forged.stdout.startswith("BROKEN at line 2: "), forged.stdout)
