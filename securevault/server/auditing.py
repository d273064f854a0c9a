# -*- test-case-name: tests.server.test_auditing -*-
"""The reactor side of the audit log: group commits and coalesced refusals.

Security events (login, logout, upload, download, delete) are answered only
once their record is on disk: L{AuditTrail.security} returns a Deferred that
fires when the record is synced.  At most one write is in the pool at a time;
records that arrive meanwhile wait and go together in the next write (a
group commit), so a login storm costs one fsync per batch, not per login.

Refusals (a 401 for a bad session, a failed or throttled login) are chosen by
the client, who can send them as fast as the network allows.  They are never
a pool job each: L{AuditTrail.refusal} counts them in memory by certificate,
reason and second, and a timer writes one record per key with its count at
most once per second.  The queue of waiting security records and the number
of refusal keys are both bounded, so a flood can neither grow memory nor
queue pool work without bound (past the bounds: 503 for security events, a
C{refusals_dropped} count for refusals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from securevault.core.audit import AuditLog, utc_time
from securevault.server.pools import RunBlocking

if TYPE_CHECKING:
    from securevault.server.metrics import VaultMetrics

log = Logger(namespace="securevault.audit")

# Security records waiting for the next write; past this, security() fails
# at once rather than growing the queue (the request is answered 503).
MAX_WAITING_RECORDS = 10_000
# Distinct (certificate, reason, second) keys held until written; past this,
# refusals are only counted, in one "refusals_dropped" record.
MAX_REFUSAL_KEYS = 1_000
FLUSH_INTERVAL_SECONDS = 1.0

RefusalKey = tuple[str | None, str, int]


class AuditUnavailable(Exception):
    """The audit log cannot take the record (the write failed, the queue is
    full, or the daemon is stopping): the request fails with 503."""


@dataclass
class _Refusal:
    """One coalesced refusal: the first occurrence's record and a count."""

    record: dict[str, Any]
    count: int = 1


@dataclass
class _Waiting:
    """A record waiting for the next write, and who waits for it (None for
    coalesced refusals: nobody waits for those)."""

    record: dict[str, Any]
    done: Deferred[None] | None = field(default=None)


class AuditTrail(Service):
    """Writes security events before their answer, and refusals coalesced.

    C{run_blocking} runs L{AuditLog.append_many} in the pool; C{clock} stamps
    records and drives the refusal timer.  The timer runs while the service
    does (started with the daemon); stopping writes everything still held.
    """

    def __init__(
        self,
        audit_log: AuditLog,
        run_blocking: RunBlocking,
        clock: IReactorTime,
        *,
        metrics: VaultMetrics | None = None,
        max_waiting: int = MAX_WAITING_RECORDS,
        max_refusal_keys: int = MAX_REFUSAL_KEYS,
    ) -> None:
        self.audit_log = audit_log
        self.metrics = metrics
        self._run = run_blocking
        self._clock = clock
        self._max_waiting = max_waiting
        self._max_refusal_keys = max_refusal_keys
        self._waiting: list[_Waiting] = []
        self._refusals: dict[RefusalKey, _Refusal] = {}
        self._due: list[dict[str, Any]] = []  # whole seconds of refusals, ready to write
        self._dropped = 0
        self._writing: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._stopped = False
        self._overflowing = False

    # -- security events ----------------------------------------------------

    def security(self, event: str, **fields: Any) -> Deferred[None]:
        """Queue a security record; fires once it is synced, or fails with
        L{AuditUnavailable} (write failed, queue full, daemon stopping)."""
        self._count(event)
        if self._stopped:
            return fail(AuditUnavailable("The daemon is stopping."))
        if len(self._waiting) >= self._max_waiting:
            if not self._overflowing:
                self._overflowing = True
                log.warn(
                    "The audit queue is full ({count} records): security events are refused",
                    count=len(self._waiting),
                    event_kind="audit_overflow",
                )
            return fail(AuditUnavailable("The audit log is behind."))
        done: Deferred[None] = Deferred()
        self._waiting.append(_Waiting({**fields, "time": self._now(), "event": event}, done))
        self._write_next()
        return done

    # -- refusals -------------------------------------------------------------

    def refusal(self, reason: str, fingerprint: str | None, **fields: Any) -> None:
        """Count a refusal; no pool work.  One record per (certificate, reason,
        second) is written later, with the first occurrence's fields and
        C{count}."""
        self._count(reason)
        now = self._clock.seconds()
        key = (fingerprint, reason, int(now))
        held = self._refusals.get(key)
        if held is not None:
            held.count += 1
            return
        if len(self._refusals) + len(self._due) >= self._max_refusal_keys:
            self._dropped += 1
        else:
            self._refusals[key] = _Refusal(
                {**fields, "time": utc_time(now), "event": reason, "fingerprint": fingerprint}
            )
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and self.running:
            self._timer = self._clock.callLater(FLUSH_INTERVAL_SECONDS, self._tick)

    def _tick(self) -> None:
        """Timer: write the refusals of every finished second (one key is
        never written twice), then wait for more."""
        self._timer = None
        self._collect(before=int(self._clock.seconds()))
        self._write_next()
        if self._refusals or self._dropped:
            self._schedule()

    def _collect(self, before: int | None = None) -> None:
        """Move the refusals of seconds before C{before} (all: None) to the
        records due for writing."""
        for key in [key for key in self._refusals if before is None or key[2] < before]:
            held = self._refusals.pop(key)
            self._due.append({**held.record, "count": held.count})

    # -- the writer -----------------------------------------------------------

    def _take_batch(self) -> list[_Waiting]:
        """Everything ready to write: refusals due, then security records."""
        batch = [_Waiting(record) for record in self._due]
        self._due = []
        if self._dropped:
            batch.append(_Waiting({"time": self._now(), "event": "refusals_dropped", "count": self._dropped}))
            self._dropped = 0
        batch += self._waiting
        self._waiting = []
        self._overflowing = False
        return batch

    def _write_next(self) -> None:
        """Start a write of what is ready, unless one is in flight (then its
        end starts the next one)."""
        if self._writing is not None or self._stopped:
            return
        batch = self._take_batch()
        if not batch:
            return
        # Set before the job runs: a waiter answered synchronously may queue
        # a record, which must wait for the next batch, not start a write.
        writing: Deferred[None] = Deferred()
        self._writing = writing
        self._write(batch).addCallback(lambda _: self._written(writing))

    def _write(self, batch: list[_Waiting]) -> Deferred[None]:
        """One pool job for C{batch}; fires (never fails) once every waiter has
        its answer."""

        def answered(result: None | Failure) -> None:
            if isinstance(result, Failure):
                log.failure(
                    "Could not write {count} audit records ({refusals} refusal records are lost)",
                    result,
                    count=len(batch),
                    refusals=sum(1 for item in batch if item.done is None),
                )
            for item in batch:
                # A waiter cancelled meanwhile (its client left) ignores this.
                if item.done is not None and not item.done.called:
                    if isinstance(result, Failure):
                        item.done.errback(AuditUnavailable("The audit log cannot be written."))
                    else:
                        item.done.callback(None)

        records = [item.record for item in batch]
        return self._run(self.audit_log.append_many, records).addBoth(answered)

    def _written(self, writing: Deferred[None]) -> None:
        self._writing = None
        writing.callback(None)
        self._write_next()

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._refusals or self._dropped:
            self._schedule()

    def stopService(self) -> Deferred[None]:
        """Write everything still held, refusals of this second included, in
        one job submitted now (before the pool stops behind us); fires when
        that write and any in flight are done."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._collect()
        self._stopped = True
        writes = [self._writing] if self._writing is not None else []
        batch = self._take_batch()
        if batch:
            writes.append(self._write(batch))
        if not writes:
            return succeed(None)
        return DeferredList(writes).addCallback(lambda _: None)

    # -- helpers --------------------------------------------------------------

    def _now(self) -> str:
        return utc_time(self._clock.seconds())

    def _count(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.count_event(event)
