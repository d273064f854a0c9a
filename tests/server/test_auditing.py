# -*- test-case-name: tests.server.test_auditing -*-
"""Tests for L{securevault.server.auditing}: security events written before
their answer, in group commits; refusals coalesced and bounded.

The unit tests drive an L{AuditTrail} with a L{ManualRunner} (a pool that
runs a job only when the test says so) and a L{Clock}; the pipeline tests
give a real L{VaultApp} a trail and send real HTTP bytes through the site.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from securevault.core.audit import AuditLog, verify_chain
from securevault.server.auditing import FLUSH_INTERVAL_SECONDS, AuditTrail
from securevault.server.metrics import VaultMetrics
from securevault.server.pools import RunBlocking, run_inline
from tests.support.app import (
    ManualRunner,
    VaultClient,
    add_user,
    corrupt_archive,
    default_client,
    encode_request,
    make_app,
    make_client,
    owner_files,
)
from tests.support.rows import TEST_AUDIT_KEY
from tests.support.testcase import SyncTestCase

# A POSIX time in the middle of a second, so "within one second" is unambiguous.
START_SECONDS = 1_800_000_000.25
PASSWORD = "correct horse battery"
OCTETS = (b"Content-Type", b"application/octet-stream")


class FlakyAuditLog(AuditLog):
    """A real audit log whose writes fail on demand, as a full or broken disk
    would make them fail (the log is left as it was)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, TEST_AUDIT_KEY)
        self.failing = False
        self.calls = 0

    def append_many(self, records: list[dict[str, Any]]) -> None:
        self.calls += 1
        if self.failing:
            raise OSError(28, "No space left on device")
        super().append_many(records)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of the log, oldest first (none when there is no log)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def outcome(deferred: Deferred[None]) -> str:
    """'pending', 'ok', or the name of the exception it failed with."""
    results: list[object] = []
    deferred.addBoth(results.append)
    if not results:
        return "pending"
    result = results[0]
    if isinstance(result, Failure):
        deferred.addErrback(lambda _: None)
        return result.type.__name__ if result.type is not None else "Failure"
    return "ok"


def run_one(runner: ManualRunner) -> None:
    """Run the oldest job waiting in C{runner} (and only that one)."""
    result, function, args, kwargs = runner.pending.pop(0)
    maybeDeferred(function, *args, **kwargs).chainDeferred(result)


class _TrailTestCase(SyncTestCase):
    """A started trail on a fresh log, a manual pool and a fake clock."""

    max_waiting = 10_000
    max_refusal_keys = 1_000

    def setUp(self) -> None:
        self.path = self.make_dir() / "audit.jsonl"
        self.log = FlakyAuditLog(self.path)
        self.runner = ManualRunner()
        self.clock = Clock()
        self.clock.advance(START_SECONDS)
        self.trail = self.make_trail(self.runner)
        self.trail.startService()

    def make_trail(self, runner: RunBlocking, **kwargs: Any) -> AuditTrail:
        options = {"max_waiting": self.max_waiting, "max_refusal_keys": self.max_refusal_keys, **kwargs}
        return AuditTrail(self.log, runner, self.clock, **options)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def assert_chain_intact(self) -> None:
        count, breaks = verify_chain(self.path, TEST_AUDIT_KEY)
        self.assertEqual((count, breaks), (len(self.records()), []))


class RefusalTests(_TrailTestCase):
    """L{AuditTrail.refusal} counts in memory; a timer writes one record per
    certificate, reason and second, at most once per second."""

    def test_flood_from_three_certificates(self) -> None:
        """100,000 refusals from 3 certificates within one second queue no
        pool job; the next flush is one job writing 3 records whose counts
        add up to 100,000, each with its first occurrence's fields."""
        for n in range(100_000):
            self.trail.refusal("session_refused", f"cert-{n % 3}", peer=f"10.0.0.{n % 7}")
        self.assertEqual(self.runner.pending, [])
        self.clock.advance(FLUSH_INTERVAL_SECONDS)
        self.assertEqual(len(self.runner.pending), 1)
        self.assertEqual(self.runner.run_all(), 1)
        records = self.records()
        self.assertEqual(len(records), 3)
        self.assertEqual(sorted(r["fingerprint"] for r in records), ["cert-0", "cert-1", "cert-2"])
        self.assertEqual(sum(r["count"] for r in records), 100_000)
        by_cert = {r["fingerprint"]: r for r in records}
        self.assertEqual(by_cert["cert-0"]["peer"], "10.0.0.0")
        self.assertEqual(by_cert["cert-2"]["peer"], "10.0.0.2")
        self.assertEqual({r["event"] for r in records}, {"session_refused"})
        self.assertEqual({r["time"] for r in records}, {"2027-01-15T08:00:00.250Z"})
        self.assert_chain_intact()

    def test_one_record_per_key_across_flushes(self) -> None:
        """Refusals spread over 3 seconds in steps of 0.1 s are written by at
        most one pool job per second, and no (certificate, reason, second)
        is ever written twice: a second still running waits for the next
        flush."""
        jobs = 0
        for _ in range(30):
            self.trail.refusal("login_failed", "cert-a", user="alice")
            self.trail.refusal("login_throttled", "cert-a", user="alice")
            self.clock.advance(0.1)
            jobs += self.runner.run_all()
        self.trail.stopService()
        jobs += self.runner.run_all()
        self.assertLessEqual(jobs, 4)  # 3 timer flushes and the final one
        records = self.records()
        keys = [(r["fingerprint"], r["event"], r["time"][:19]) for r in records]
        self.assertEqual(len(keys), len(set(keys)), keys)
        for event in ("login_failed", "login_throttled"):
            self.assertEqual(sum(r["count"] for r in records if r["event"] == event), 30)
        self.assert_chain_intact()

    def test_distinct_keys_are_bounded(self) -> None:
        """Past the bound on distinct keys, refusals are only counted: one
        refusals_dropped record carries how many, so memory stays bounded
        whatever the number of certificates."""
        self.trail = self.make_trail(self.runner, max_refusal_keys=10)
        self.trail.startService()
        for n in range(25):
            self.trail.refusal("session_refused", f"cert-{n}")
        self.trail.refusal("session_refused", "cert-0")  # a held key still counts
        self.clock.advance(FLUSH_INTERVAL_SECONDS)
        self.assertEqual(self.runner.run_all(), 1)
        records = self.records()
        refused = [r for r in records if r["event"] == "session_refused"]
        self.assertEqual(len(refused), 10)
        self.assertEqual(sum(r["count"] for r in refused), 11)
        [dropped] = [r for r in records if r["event"] == "refusals_dropped"]
        self.assertEqual(dropped["count"], 15)
        self.assertEqual(len(records), 11)

    def test_keys_stay_bounded_while_the_writer_is_stuck(self) -> None:
        """While a write hangs in the pool, refusals of later seconds wait in
        memory within the same bound: no second job is queued, and what is
        beyond the bound is counted, then written once the writer is free."""
        self.trail = self.make_trail(self.runner, max_refusal_keys=5)
        self.trail.startService()
        self.trail.security("login", user="alice")  # a write that hangs
        for _ in range(4):
            for n in range(3):
                self.trail.refusal("session_refused", f"cert-{n}")
            self.clock.advance(FLUSH_INTERVAL_SECONDS)
        self.assertEqual(len(self.runner.pending), 1)
        self.assertEqual(self.runner.run_all(), 2)
        records = self.records()
        refused = [r for r in records if r["event"] == "session_refused"]
        [dropped] = [r for r in records if r["event"] == "refusals_dropped"]
        self.assertEqual(len(refused), 5)
        self.assertEqual(sum(r["count"] for r in refused) + dropped["count"], 12)
        self.assert_chain_intact()

    def test_no_timer_until_a_refusal(self) -> None:
        """An idle trail schedules nothing; a refusal schedules one flush."""
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.trail.refusal("session_refused", None)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(FLUSH_INTERVAL_SECONDS)
        self.runner.run_all()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        [record] = self.records()
        self.assertEqual((record["event"], record["fingerprint"], record["count"]), ("session_refused", None, 1))

    def test_metrics_count_every_refusal(self) -> None:
        """With metrics, every refusal counts, not every record."""
        metrics = VaultMetrics(active_sessions=lambda: 0.0, pool_queue_depth=lambda: 0.0)
        self.trail.metrics = metrics
        for _ in range(7):
            self.trail.refusal("login_failed", "cert-a", user="alice")
        self.trail.security("integrity_error", archive_id="x")
        text = generate_latest(metrics.registry).decode()
        self.assertIn("securevault_failed_logins_total 7.0", text)
        self.assertIn("securevault_integrity_errors_total 1.0", text)


class SecurityTests(_TrailTestCase):
    """L{AuditTrail.security} fires once the record is synced; records that
    arrive while a write runs go together in the next one."""

    def test_fires_after_the_write(self) -> None:
        """The Deferred waits for the pool job; once it fires the record is
        in the log, chained, with the fields given."""
        done = self.trail.security("login", user="alice", fingerprint="cert-a")
        self.assertEqual((outcome(done), self.records()), ("pending", []))
        self.runner.run_all()
        self.assertEqual(outcome(done), "ok")
        [record] = self.records()
        self.assertEqual(
            {k: v for k, v in record.items() if k not in ("prev", "time")},
            {"event": "login", "user": "alice", "fingerprint": "cert-a"},
        )
        self.assertEqual(record["time"], "2027-01-15T08:00:00.250Z")
        self.assert_chain_intact()

    def test_group_commit(self) -> None:
        """While one write is in the pool, further events wait: 1 job for the
        first, 1 job for the 49 that came meanwhile, in their order."""
        first = self.trail.security("login", n=0)
        self.assertEqual(len(self.runner.pending), 1)
        rest = [self.trail.security("upload", n=n) for n in range(1, 50)]
        self.assertEqual(len(self.runner.pending), 1)
        self.assertEqual(self.runner.run_all(), 2)
        self.assertEqual({outcome(d) for d in [first, *rest]}, {"ok"})
        self.assertEqual([r["n"] for r in self.records()], list(range(50)))
        self.assertEqual(self.log.calls, 2)
        self.assert_chain_intact()

    def test_failed_write(self) -> None:
        """A write that fails fails every Deferred of its batch with
        AuditUnavailable (and is logged once); the next batch is written
        normally, and the chain stays intact."""
        first = self.trail.security("login", n=0)
        batch = [self.trail.security("upload", n=n) for n in (1, 2, 3)]
        run_one(self.runner)
        self.assertEqual(outcome(first), "ok")
        self.log.failing = True
        run_one(self.runner)
        self.assertEqual([outcome(d) for d in batch], ["AuditUnavailable"] * 3)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.log.failing = False
        later = self.trail.security("logout", n=4)
        self.runner.run_all()
        self.assertEqual(outcome(later), "ok")
        self.assertEqual([r["n"] for r in self.records()], [0, 4])
        self.assert_chain_intact()

    def test_queue_is_bounded(self) -> None:
        """Past the bound of waiting records, security() fails at once with
        AuditUnavailable and queues nothing; once the writer catches up it
        accepts records again."""
        self.trail = self.make_trail(self.runner, max_waiting=3)
        in_flight = self.trail.security("login", n=0)
        waiting = [self.trail.security("login", n=n) for n in (1, 2, 3)]
        refused = self.trail.security("login", n=4)
        self.assertEqual(outcome(refused), "AuditUnavailable")
        self.assertEqual(len(self.runner.pending), 1)
        self.runner.run_all()
        self.assertEqual({outcome(d) for d in [in_flight, *waiting]}, {"ok"})
        again = self.trail.security("login", n=5)
        self.runner.run_all()
        self.assertEqual(outcome(again), "ok")
        self.assertEqual([r["n"] for r in self.records()], [0, 1, 2, 3, 5])

    def test_cancelled_waiter(self) -> None:
        """A waiter cancelled meanwhile (its client left) does not break the
        batch: the record is still written and the others still fire."""
        first = self.trail.security("login", n=0)
        gone = self.trail.security("download", n=1)
        other = self.trail.security("download", n=2)
        gone.cancel()
        self.assertEqual(outcome(gone), "CancelledError")
        self.runner.run_all()
        self.assertEqual((outcome(first), outcome(other)), ("ok", "ok"))
        self.assertEqual([r["n"] for r in self.records()], [0, 1, 2])

    def test_inline_pool(self) -> None:
        """With a pool that answers at once (run_inline), a waiter that queues
        another event from its callback gets it written too, in order."""
        trail = self.make_trail(run_inline)
        chained: list[Deferred[None]] = []
        first = trail.security("login", n=0)
        first.addCallback(lambda _: chained.append(trail.security("upload", n=1)))
        self.assertEqual(outcome(first), "ok")
        self.assertEqual(outcome(chained[0]), "ok")
        self.assertEqual([r["n"] for r in self.records()], [0, 1])


class ServiceTests(_TrailTestCase):
    """The trail is a service: stopping it writes everything still held."""

    def test_stop_writes_everything(self) -> None:
        """At stop, the refusals of the current second and the waiting
        security events go out in one job, submitted at once even while a
        write is in flight (the pool stops right after); the stop Deferred
        fires when both are written; later events fail with AuditUnavailable."""
        in_flight = self.trail.security("login", n=0)
        waiting = self.trail.security("logout", n=1)
        for _ in range(5):
            self.trail.refusal("session_refused", "cert-a")
        stopped = self.trail.stopService()
        self.assertEqual(len(self.runner.pending), 2)
        self.assertEqual(outcome(stopped), "pending")
        self.runner.run_all()
        self.assertEqual([outcome(d) for d in (stopped, in_flight, waiting)], ["ok", "ok", "ok"])
        events = [(r["event"], r.get("count")) for r in self.records()]
        self.assertEqual(events, [("login", None), ("session_refused", 5), ("logout", None)])
        self.assertEqual(outcome(self.trail.security("login", n=2)), "AuditUnavailable")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assert_chain_intact()

    def test_stop_idle(self) -> None:
        """Stopping an idle trail queues no job and fires at once."""
        self.assertEqual(outcome(self.trail.stopService()), "ok")
        self.assertEqual(self.runner.pending, [])

    def test_timer_starts_with_the_service(self) -> None:
        """Refusals counted before the service starts are flushed once it
        runs (the daemon starts it with the reactor)."""
        trail = self.make_trail(self.runner)
        trail.refusal("session_refused", "cert-a")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        trail.startService()
        self.addCleanup(trail.stopService)
        self.clock.advance(FLUSH_INTERVAL_SECONDS)
        self.runner.run_all()
        self.assertEqual([r["event"] for r in self.records()], ["session_refused"])


class AuditedEndpointTests(SyncTestCase):
    """The endpoints answer after their security record is synced, 503 when
    it cannot be written, and coalesce refusals."""

    def setUp(self) -> None:
        self.app, self.clock = make_app(self)
        self.alice_id = add_user(self.app, "alice", PASSWORD)
        self.client = VaultClient(self.app, self.clock, self)
        self.path = self.make_dir() / "audit.jsonl"
        self.log = FlakyAuditLog(self.path)
        self.trail = AuditTrail(self.log, run_inline, self.clock)
        self.trail.startService()
        self.addCleanup(self.trail.stopService)
        self.app.audit_trail = self.trail

    def break_log(self) -> None:
        """From now on audit writes fail (their failures are logged)."""
        self.log.failing = True
        self.addCleanup(self.flushLoggedErrors, OSError)

    def events(self) -> list[str]:
        return [r["event"] for r in read_records(self.path)]

    def session(self) -> str:
        return self.client.session("alice", PASSWORD)

    def upload_json(self, session: str, content: bytes) -> Any:
        document = {"filename": "notes.txt", "content": base64.b64encode(content).decode("ascii")}
        return self.client.post_json(b"/upload-file", document, session=session)

    def upload_raw(self, session: str, content: bytes) -> Any:
        headers = [OCTETS, (b"X-Filename", quote("notes.txt").encode("ascii"))]
        return self.client.request(b"POST", b"/upload-file", body=content, headers=headers, session=session)

    def test_login_waits_for_its_record(self) -> None:
        """A login's 200 is sent only once its record is written: while the
        audit write waits in the pool, no response goes out."""
        runner = ManualRunner()
        self.app.audit_trail = AuditTrail(self.log, runner, self.clock)
        connection = self.client.connect()
        body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
        connection.send(encode_request(b"POST", b"/login", [(b"Content-Type", b"application/json")], body))
        self.assertEqual((connection.responses(), self.events()), ([], []))
        self.assertEqual(runner.run_all(), 1)
        [response] = connection.responses()
        self.assertEqual(response.status, 200, response.body)
        [record] = read_records(self.path)
        self.assertEqual((record["event"], record["user"]), ("login", "alice"))
        self.assertEqual(record["fingerprint"], default_client(0).fingerprint)

    def test_security_events_are_recorded(self) -> None:
        """Login, upload, download, delete and logout each leave their record
        by the time their answer arrives."""
        session = self.session()
        archive_id = self.upload_json(session, b"hello").json()["id"]
        self.assertEqual(self.client.get(b"/download-file?id=" + archive_id.encode(), session=session).status, 200)
        self.assertEqual(self.client.post_json(b"/delete-file", {"id": archive_id}, session=session).status, 204)
        self.assertEqual(self.client.request(b"POST", b"/logout", session=session).status, 204)
        self.assertEqual(self.events(), ["login", "upload", "download", "delete", "logout"])

    def test_login_unaudited_is_503(self) -> None:
        """A login whose record cannot be written is 503 unavailable with
        Retry-After, not 200."""
        self.break_log()
        response = self.client.login("alice", PASSWORD)
        self.assertEqual((response.status, response.json()["error"]), (503, "unavailable"))
        self.assertIsNotNone(response.header("Retry-After"))
        self.assertNotIn("session_id", response.json())

    def test_upload_unaudited_keeps_nothing(self) -> None:
        """An upload (JSON or raw) whose record cannot be written is 503, and
        the archive, already stored, is removed: no archive the client was
        not told of and the audit log does not name."""
        session = self.session()
        self.break_log()
        for upload in (self.upload_json, self.upload_raw):
            response = upload(session, b"secret data")
            self.assertEqual((response.status, response.json()["error"]), (503, "unavailable"), upload)
            self.assertEqual(response.header("Retry-After"), "5")
            self.assertEqual(owner_files(self.app, self.alice_id), [], upload)
        self.log.failing = False
        self.assertEqual(self.client.get(b"/get-files", session=session).json()["files"], [])
        self.assertEqual(self.events(), ["login"])

    def test_download_unaudited_sends_nothing(self) -> None:
        """A download (JSON or raw) whose record cannot be written is 503 and
        carries none of the file."""
        session = self.session()
        archive_id = self.upload_json(session, b"the plaintext").json()["id"]
        self.break_log()
        for accept in ([], [(b"Accept", b"application/octet-stream")]):
            response = self.client.get(b"/download-file?id=" + archive_id.encode(), session=session, headers=accept)
            self.assertEqual((response.status, response.json()["error"]), (503, "unavailable"))
            self.assertNotIn(b"the plaintext", response.body)
            self.assertNotIn(base64.b64encode(b"the plaintext"), response.body)

    def test_delete_and_logout_unaudited_are_503(self) -> None:
        """Delete and logout whose records cannot be written are 503."""
        session = self.session()
        archive_id = self.upload_json(session, b"x").json()["id"]
        self.break_log()
        delete = self.client.post_json(b"/delete-file", {"id": archive_id}, session=session)
        logout = self.client.request(b"POST", b"/logout", session=session)
        self.assertEqual([delete.status, logout.status], [503, 503])

    def test_integrity_error_recorded_before_its_500(self) -> None:
        """A download of a corrupted archive is recorded as integrity_error
        before the 500; still a 500 when the record cannot be written."""
        session = self.session()
        archive_id = self.upload_json(session, b"data" * 100).json()["id"]
        corrupt_archive(self.app, self.alice_id, archive_id)
        response = self.client.get(b"/download-file?id=" + archive_id.encode(), session=session)
        self.assertEqual((response.status, response.json()["error"]), (500, "integrity_error"))
        self.assertEqual(self.events()[-1], "integrity_error")
        self.break_log()
        response = self.client.get(b"/download-file?id=" + archive_id.encode(), session=session)
        self.assertEqual((response.status, response.json()["error"]), (500, "integrity_error"))

    def test_refusals_are_coalesced(self) -> None:
        """200 requests with a bogus session and 30 failed logins from one
        certificate queue no audit write; the next flush writes one record
        per reason with its count."""
        cert = make_client("flooder")
        connection = self.client.connect(cert)
        for _ in range(200):
            connection.send(encode_request(b"GET", b"/get-files", [(b"Authorization", b"Bearer bogus")]))
        logins = [self.client.login("alice", "wrong", cert=cert).status for _ in range(30)]
        self.assertEqual([r.status for r in connection.responses()], [401] * 200)
        self.assertEqual(self.log.calls, 0)
        self.clock.advance(FLUSH_INTERVAL_SECONDS)
        self.assertEqual(self.log.calls, 1)
        records = read_records(self.path)
        counts = {r["event"]: r["count"] for r in records}
        expected = {"session_refused": 200, "login_failed": logins.count(401), "login_throttled": logins.count(429)}
        self.assertEqual(counts, expected)
        self.assertEqual(logins.count(401) + logins.count(429), 30)
        self.assertEqual({r["fingerprint"] for r in records}, {cert.fingerprint})
