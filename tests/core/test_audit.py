# -*- test-case-name: tests.core.test_audit -*-
"""Tests for L{securevault.core.audit}: the hash-chained JSON-lines audit log and
C{securevault-admin audit verify}."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from securevault.admin import cli as admin
from securevault.core.audit import GENESIS, AuditLog, ChainBreak, head_path, line_hash, verify_chain
from tests.support.testcase import SyncTestCase

REPOSITORY = Path(__file__).parents[2]
TIME_PATTERN = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")

# Appends N records from a separate interpreter: argv = path, tag, count.
APPEND_CHILD = """
import sys
from pathlib import Path
from securevault.core.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
for n in range(int(sys.argv[3])):
    log.append("probe", writer=sys.argv[2], n=n)
"""

# Appends a batch of 3 records of ~1 KB under RLIMIT_FSIZE = log size + 100
# bytes, so the write fails part-way (EFBIG); prints the errno or "written".
FULL_DISK_CHILD = """
import resource, sys
from pathlib import Path
from securevault.core.audit import AuditLog
path = Path(sys.argv[1])
limit = path.stat().st_size + 100
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    AuditLog(path).append_many([{"event": "probe", "blob": "x" * 1000, "n": n} for n in range(3)])
except OSError as error:
    print(error.errno)
else:
    print("written")
"""


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _break_lines(path: Path) -> list[int]:
    return [item.line for item in verify_chain(path)[1]]


class AuditLogTestCase(SyncTestCase):
    """A scratch log holding five records, C{n} = 0..4."""

    def setUp(self) -> None:
        self.data_dir = self.make_dir()
        self.path = self.data_dir / "audit.jsonl"
        self.log = AuditLog(self.path)
        for n in range(5):
            self.log.append("upload", user="alice", archive_id=f"{n:032x}", n=n)

    def run_admin(self, *argv: str) -> tuple[int, str, str]:
        """Run C{securevault-admin --data-dir <scratch> ARGV...}; return (status, out, err)."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = admin.main(["--data-dir", str(self.data_dir), *argv])
        return status, out.getvalue(), err.getvalue()


class AppendTests(AuditLogTestCase):
    """L{AuditLog.append} writes one chained JSON line per event."""

    def test_fresh_log_verifies(self) -> None:
        """A log written only by append verifies: every record's C{prev} is the
        hash of the line before, the first one's the genesis value."""
        self.assertEqual(verify_chain(self.path), (5, []))
        lines = _lines(self.path)
        records = [json.loads(line) for line in lines]
        self.assertEqual(records[0]["prev"], GENESIS)
        for before, record in zip(lines, records[1:], strict=False):
            self.assertEqual(record["prev"], line_hash(before))
        self.assertEqual([r["n"] for r in records], list(range(5)))

    def test_record_holds_only_what_is_passed(self) -> None:
        """A record holds the time, the event, the chain link and the fields
        given, nothing else (so no secret can slip in unasked)."""
        path = self.make_dir() / "audit.jsonl"
        AuditLog(path).append("login_failed", user="bob", reason="bad password", attempts=3)
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
        self.assertEqual(verify_chain(self.path), (6, []))
        self.assertEqual(json.loads(_lines(self.path)[-1])["filename"], "résumé ✓.pdf")

    def test_two_instances_alternating(self) -> None:
        """Two AuditLog objects on one file (as the daemon and the admin
        command have) appending in turn keep one valid chain."""
        path = self.make_dir() / "audit.jsonl"
        first, second = AuditLog(path), AuditLog(path)
        for n in range(10):
            (first if n % 2 == 0 else second).append("probe", n=n)
        self.assertEqual(verify_chain(path), (10, []))
        self.assertEqual([json.loads(line)["n"] for line in _lines(path)], list(range(10)))

    def test_two_instances_concurrently(self) -> None:
        """Threads appending through two AuditLog objects at once (so only the
        file lock, not the in-process lock, orders them) keep a valid chain."""
        path = self.make_dir() / "audit.jsonl"
        logs = [AuditLog(path), AuditLog(path)]

        def work(index: int) -> None:
            for n in range(25):
                logs[index % 2].append("probe", writer=index, n=n)

        threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(verify_chain(path), (100, []))

    def test_two_processes_concurrently(self) -> None:
        """Two processes appending to one log at the same time keep a valid
        chain and lose no record."""
        path = self.make_dir() / "audit.jsonl"
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        children = [
            subprocess.Popen([sys.executable, "-c", APPEND_CHILD, str(path), tag, "60"], env=env)
            for tag in ("left", "right")
        ]
        self.assertEqual([child.wait(timeout=60) for child in children], [0, 0])
        self.assertEqual(verify_chain(path), (120, []))
        records = [json.loads(line) for line in _lines(path)]
        for tag in ("left", "right"):
            self.assertEqual([r["n"] for r in records if r["writer"] == tag], list(range(60)))

    def test_large_record(self) -> None:
        """A record longer than the tail the appender reads back is still
        chained correctly by the next append."""
        self.log.append("probe", blob="x" * (100 * 1024))
        self.log.append("probe", n=6)
        self.assertEqual(verify_chain(self.path), (7, []))


class AppendManyTests(AuditLogTestCase):
    """L{AuditLog.append_many} writes a batch as one group commit."""

    def head(self) -> dict[str, Any]:
        return dict(json.loads(head_path(self.path).read_bytes()))

    def test_batch_chains_and_moves_the_head(self) -> None:
        """A batch of three after five records: eight chained records, in
        order, and the head names the eighth (its count and hash), so the
        batch is committed as a whole."""
        self.log.append_many([{"event": "login", "n": n} for n in (5, 6, 7)])
        self.assertEqual(verify_chain(self.path), (8, []))
        lines = _lines(self.path)
        self.assertEqual([json.loads(line)["n"] for line in lines], list(range(8)))
        self.assertEqual(self.head(), {"records": 8, "last": line_hash(lines[-1])})
        self.assertEqual(stat.S_IMODE(head_path(self.path).stat().st_mode), 0o600)

    def test_record_fields(self) -> None:
        """Each record holds its fields, C{prev}, and C{time}: the one given,
        else the time of writing; the caller's dicts are not changed."""
        given = {"event": "session_refused", "time": "2027-01-15T08:00:00.250Z", "count": 3}
        untimed = {"event": "login", "user": "alice"}
        self.log.append_many([given, untimed])
        first, second = (json.loads(line) for line in _lines(self.path)[-2:])
        self.assertEqual(first, {**given, "prev": line_hash(_lines(self.path)[4])})
        self.assertEqual(set(second), {"event", "user", "time", "prev"})
        self.assertRegex(second["time"], TIME_PATTERN)
        self.assertEqual(untimed, {"event": "login", "user": "alice"})

    def test_empty_batch_writes_nothing(self) -> None:
        """An empty batch leaves the log and its head untouched."""
        before = (self.path.read_bytes(), head_path(self.path).read_bytes())
        self.log.append_many([])
        self.assertEqual((self.path.read_bytes(), head_path(self.path).read_bytes()), before)

    def test_failed_batch_is_cut_back(self) -> None:
        """A batch whose write fails part-way (the file size limit, as a full
        disk would) raises, and leaves the log and head as they were: the
        chain verifies and the next batch appends cleanly."""
        before = (self.path.read_bytes(), head_path(self.path).read_bytes())
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        child = subprocess.run(
            [sys.executable, "-c", FULL_DISK_CHILD, str(self.path)], env=env, capture_output=True, text=True, timeout=60
        )
        self.assertEqual((child.returncode, child.stdout.strip()), (0, "27"), child.stderr)  # EFBIG
        self.assertEqual((self.path.read_bytes(), head_path(self.path).read_bytes()), before)
        self.log.append_many([{"event": "probe", "n": 5}])
        self.assertEqual(verify_chain(self.path), (6, []))

    def test_head_behind_after_a_kill(self) -> None:
        """A kill between a batch's fsync and its head update leaves the head
        naming an earlier record: the log still verifies (the batch is whole
        and chained to it), and the next append brings the head up to date."""
        old_head = head_path(self.path).read_bytes()
        self.log.append_many([{"event": "login", "n": n} for n in (5, 6)])
        head_path(self.path).write_bytes(old_head)
        self.assertEqual(verify_chain(self.path), (7, []))
        self.log.append("logout", n=7)
        self.assertEqual(self.head()["records"], 8)
        self.assertEqual(verify_chain(self.path), (8, []))

    def test_head_behind_does_not_hide_edits(self) -> None:
        """A head behind the log still pins its record: when that record was
        changed (and the lines after relinked), the log is broken."""
        old_head = head_path(self.path).read_bytes()
        lines = _lines(self.path)
        edited = json.loads(lines[4])
        edited["user"] = "mallory"
        lines[4] = json.dumps(edited, sort_keys=True).encode()
        appended = {"time": "2027-01-15T08:00:00.000Z", "event": "login", "prev": line_hash(lines[4])}
        _write_lines(self.path, [*lines, json.dumps(appended, sort_keys=True).encode()])
        head_path(self.path).write_bytes(old_head)
        self.assertNotEqual(_break_lines(self.path), [])


class ChainBreakTests(AuditLogTestCase):
    """L{verify_chain} reports the first line whose link does not hold."""

    def test_remove_middle_line(self) -> None:
        """Removing line 3 breaks the chain at the line now in its place."""
        lines = _lines(self.path)
        del lines[2]
        _write_lines(self.path, lines)
        count, breaks = verify_chain(self.path)
        self.assertEqual(count, 4)
        self.assertEqual([b.line for b in breaks], [3])
        self.assertIn("removed or edited", breaks[0].reason)

    def test_edit_field(self) -> None:
        """Editing a field of line 2 (still valid JSON, its own link intact)
        breaks the chain at line 3, the record that hashed the original."""
        lines = _lines(self.path)
        record = json.loads(lines[1])
        record["user"] = "mallory"
        lines[1] = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
        _write_lines(self.path, lines)
        self.assertEqual(_break_lines(self.path), [3])

    def test_edit_single_byte(self) -> None:
        """Changing one byte of line 1 breaks the chain at line 2."""
        lines = _lines(self.path)
        lines[0] = lines[0].replace(b'"n": 0', b'"n": 9')
        _write_lines(self.path, lines)
        self.assertEqual(_break_lines(self.path), [2])

    def test_swap_lines(self) -> None:
        """Swapping lines 2 and 3 breaks every link they touch: lines 2, 3 and 4."""
        lines = _lines(self.path)
        lines[1], lines[2] = lines[2], lines[1]
        _write_lines(self.path, lines)
        self.assertEqual(_break_lines(self.path), [2, 3, 4])

    def test_insert_forged_line(self) -> None:
        """A forged line inserted at 3 with a made-up link breaks at 3 and 4."""
        lines = _lines(self.path)
        forged: dict[str, Any] = {"time": "2026-01-01T00:00:00.000Z", "event": "login", "prev": "f" * 64}
        lines.insert(2, json.dumps(forged, sort_keys=True).encode())
        _write_lines(self.path, lines)
        self.assertEqual(_break_lines(self.path), [3, 4])

    def test_insert_forged_line_with_correct_link(self) -> None:
        """A forged line that links correctly to line 2 is still caught: the
        record after it (now line 4) no longer links to its predecessor."""
        lines = _lines(self.path)
        forged = {"time": "2026-01-01T00:00:00.000Z", "event": "login", "prev": line_hash(lines[1])}
        lines.insert(2, json.dumps(forged, sort_keys=True).encode())
        _write_lines(self.path, lines)
        self.assertEqual(_break_lines(self.path), [4])

    def test_insert_garbage_line(self) -> None:
        """A line that is not JSON is reported as such, and the next line's link breaks too."""
        lines = _lines(self.path)
        lines.insert(1, b"not json at all")
        _write_lines(self.path, lines)
        count, breaks = verify_chain(self.path)
        self.assertEqual(count, 6)
        self.assertEqual(breaks[0], ChainBreak(2, "not a JSON audit record"))
        self.assertEqual([b.line for b in breaks], [2, 3])

    def test_non_object_lines(self) -> None:
        """JSON that is not an object with C{prev} (a list, a string, an object
        without the field) is a break, never an exception."""
        lines = _lines(self.path)
        lines[1:1] = [b"[1, 2]", b'"prev"', b'{"event": "x"}']
        _write_lines(self.path, lines)
        self.assertEqual(_break_lines(self.path), [2, 3, 4, 5])

    def test_remove_first_line(self) -> None:
        """Removing line 1 leaves a first record whose link is not the genesis value."""
        _write_lines(self.path, _lines(self.path)[1:])
        self.assertEqual(_break_lines(self.path), [1])

    def test_edit_or_remove_last_line(self) -> None:
        """Editing or removing the newest record is detected too."""
        lines = _lines(self.path)
        _write_lines(self.path, lines[:-1])
        self.assertNotEqual(_break_lines(self.path), [])

    def test_empty_log(self) -> None:
        """An empty log has no records and no breaks."""
        path = self.make_dir() / "audit.jsonl"
        path.write_bytes(b"")
        self.assertEqual(verify_chain(path), (0, []))


class AuditVerifyCommandTests(AuditLogTestCase):
    """C{securevault-admin audit verify}."""

    def test_intact(self) -> None:
        """An intact log: exit 0 and a count of the records checked."""
        status, out, err = self.run_admin("audit", "verify")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("5 audit records checked, 0 breaks", out)
        self.assertNotIn("BROKEN", out)

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

    def test_explicit_path(self) -> None:
        """--audit-log names another file to check."""
        other = self.make_dir() / "elsewhere.jsonl"
        AuditLog(other).append("probe")
        lines = _lines(self.path)
        lines[0], lines[1] = lines[1], lines[0]
        _write_lines(self.path, lines)
        status, out, err = self.run_admin("audit", "verify", "--audit-log", str(other))
        self.assertEqual((status, err), (0, ""))
        self.assertIn("1 audit records checked, 0 breaks", out)
        self.assertEqual(self.run_admin("audit", "verify")[0], 1)

    def test_missing_log(self) -> None:
        """No audit log: exit 1 with one error line naming the path."""
        self.path.unlink()
        status, out, err = self.run_admin("audit", "verify")
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("securevault-admin: error: "), err)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn(str(self.path), err)
