# -*- test-case-name: tests.core.test_sessions -*-
"""Tests for L{securevault.core.sessions}: SessionStore and LoginThrottle on a
fake clock."""

from __future__ import annotations

import uuid
from pathlib import Path

from twisted.internet.task import Clock

from securevault.core.generation import SharedGeneration
from securevault.core.sessions import (
    ASK_STORE,
    CERTIFICATE_FAILURES_BEFORE_THROTTLE,
    FAILURES_BEFORE_THROTTLE,
    THROTTLE_WINDOW_SECONDS,
    LoginThrottle,
    LoginThrottled,
    Session,
    SessionStore,
    account_digest,
    session_digest,
)
from securevault.stores.metadata import SessionRecord, SqliteMetadataStore
from tests.support.rows import vault_rows
from tests.support.testcase import SyncTestCase


def metadata_store(testcase: SyncTestCase) -> SqliteMetadataStore:
    store = SqliteMetadataStore(testcase.make_dir() / "vault.db")
    testcase.addCleanup(store.close)
    return store


IDLE = 30 * 60.0
TTL = 12 * 60 * 60.0
START = 1_800_000_000.0
FAR_FUTURE = START + 10 * 365 * 86400
CERT_A = "a" * 64
CERT_B = "b" * 64


class SessionStoreTests(SyncTestCase):
    """Creation, lookup, binding, expiry, ending and sweeping of sessions."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.metadata = metadata_store(self)
        self.store = SessionStore(
            self.metadata, self.clock.seconds, rows=vault_rows(self.metadata), idle_seconds=IDLE, ttl_seconds=TTL
        )

    def create(self, username: str = "alice", fingerprint: str = CERT_A, not_after: float = FAR_FUTURE) -> str:
        return self.store.create(username, "id-" + username, fingerprint, not_after).session_id

    def test_create(self) -> None:
        """A new session has a random UUID4 id, its user, its certificate,
        and ends after the idle time unless used."""
        session = self.store.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        self.assertEqual(uuid.UUID(session.session_id).version, 4)
        self.assertEqual(str(uuid.UUID(session.session_id)), session.session_id)
        self.assertEqual((session.username, session.user_id, session.fingerprint), ("alice", "id-alice", CERT_A))
        self.assertEqual((session.created_at, session.last_used), (START, START))
        self.assertEqual(session.expires_at, START + TTL)
        self.assertEqual(self.store.expiry(session), START + IDLE)
        self.assertEqual(self.store.count(), 1)

    def test_ids_are_unique(self) -> None:
        """Every session gets its own id."""
        ids = {self.create() for _ in range(100)}
        self.assertEqual(len(ids), 100)

    def test_id_not_in_repr(self) -> None:
        """A session's repr (as a log line might show it) omits its id."""
        session = self.store.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        self.assertNotIn(session.session_id, repr(session))

    def test_lookup(self) -> None:
        """Lookup by id and certificate finds the session; unknown ids are
        None."""
        session_id = self.create()
        found = self.store.lookup(session_id, CERT_A)
        assert found is not None
        self.assertEqual(found.username, "alice")
        self.assertIsNone(self.store.lookup(str(uuid.uuid4()), CERT_A))
        self.assertIsNone(self.store.lookup("", CERT_A))

    def test_bound_to_certificate(self) -> None:
        """Another certificate's lookup is None, does not refresh the idle
        timer, and does not end the session for its owner."""
        session_id = self.create()
        self.clock.advance(IDLE - 10)
        self.assertIsNone(self.store.lookup(session_id, CERT_B))
        self.assertIsNotNone(self.store.lookup(session_id, CERT_A))
        self.clock.advance(IDLE - 10)
        self.assertIsNone(self.store.lookup(session_id, CERT_B))
        self.clock.advance(5)  # IDLE - 5 since the owner's last use: alive
        self.assertIsNotNone(self.store.lookup(session_id, CERT_A))

    def test_idle_expiry(self) -> None:
        """Unused for the idle time, a session is gone (and forgotten); each
        use restarts the idle timer."""
        session_id = self.create()
        self.clock.advance(IDLE - 1)
        session = self.store.lookup(session_id, CERT_A)
        assert session is not None
        self.assertEqual(self.store.expiry(session), self.clock.seconds() + IDLE)
        self.clock.advance(IDLE - 1)
        self.assertIsNotNone(self.store.lookup(session_id, CERT_A))
        self.clock.advance(IDLE)
        self.assertIsNone(self.store.lookup(session_id, CERT_A))
        self.assertEqual(self.store.count(), 0)

    def test_expiry_is_exclusive(self) -> None:
        """At exactly the expiry instant the session is already gone."""
        session_id = self.create()
        self.clock.advance(IDLE)
        self.assertIsNone(self.store.lookup(session_id, CERT_A))

    def test_absolute_expiry(self) -> None:
        """A session in constant use still ends at its TTL."""
        session_id = self.create()
        used = 0.0
        while used + 600 < TTL:
            self.clock.advance(600)
            used += 600
            self.assertIsNotNone(self.store.lookup(session_id, CERT_A), used)
        self.clock.advance(TTL - used)
        self.assertIsNone(self.store.lookup(session_id, CERT_A))

    def test_expiry_near_ttl(self) -> None:
        """Near its TTL a session reports the TTL, not a later idle time."""
        session_id = self.create()
        for _ in range(int(TTL // 1200) - 1):
            self.clock.advance(1200)
            self.store.lookup(session_id, CERT_A)
        self.clock.advance(1200 - 60)  # TTL - 60
        session = self.store.lookup(session_id, CERT_A)
        assert session is not None
        self.assertEqual(self.store.expiry(session), START + TTL)

    def test_certificate_not_after(self) -> None:
        """A session ends no later than its certificate's notAfter."""
        not_after = START + 600
        session_id = self.create(not_after=not_after)
        session = self.store.lookup(session_id, CERT_A)
        assert session is not None
        self.assertEqual(self.store.expiry(session), not_after)
        self.clock.advance(599)
        self.assertIsNotNone(self.store.lookup(session_id, CERT_A))
        self.clock.advance(1)
        self.assertIsNone(self.store.lookup(session_id, CERT_A))

    def test_expired_certificate(self) -> None:
        """A certificate already past notAfter gives a session that is dead
        on arrival."""
        session_id = self.create(not_after=START - 1)
        self.assertIsNone(self.store.lookup(session_id, CERT_A))

    def test_end(self) -> None:
        """end() forgets one session; ending an unknown id is harmless."""
        first, second = self.create(), self.create()
        self.store.end(first)
        self.store.end(first)
        self.store.end("not a session")
        self.assertIsNone(self.store.lookup(first, CERT_A))
        self.assertIsNotNone(self.store.lookup(second, CERT_A))

    def test_only_digests_are_stored(self) -> None:
        """The store never holds a session id, only its SHA-256: a copy of
        the database gives no usable session."""
        session_id = self.create()
        self.metadata.close()  # checkpoints the WAL into the file
        raw = self.metadata.path.read_bytes()
        self.assertIn(session_digest(session_id).encode(), raw)
        self.assertNotIn(session_id.encode(), raw)
        self.assertIsNotNone(self.store.lookup(session_id, CERT_A))

    def test_shared_by_two_nodes(self) -> None:
        """Two stores on one database are two nodes: a session made on one
        works on the other, and ending it on the other ends it on the first."""
        other = SessionStore(
            SqliteMetadataStore(self.metadata.path),
            self.clock.seconds,
            rows=vault_rows(self.metadata),
            idle_seconds=IDLE,
            ttl_seconds=TTL,
        )
        session_id = self.create()
        self.assertIsNotNone(other.lookup(session_id, CERT_A))
        other.end(session_id)
        self.assertIsNone(self.store.lookup(session_id, CERT_A))

    def test_idle_refresh_is_written_back(self) -> None:
        """Use on one node keeps the session alive on another."""
        other = SessionStore(
            SqliteMetadataStore(self.metadata.path),
            self.clock.seconds,
            rows=vault_rows(self.metadata),
            idle_seconds=IDLE,
            ttl_seconds=TTL,
        )
        session_id = self.create()
        for _ in range(3):
            self.clock.advance(IDLE - 10)
            self.assertIsNotNone(other.lookup(session_id, CERT_A))
        self.assertIsNotNone(self.store.lookup(session_id, CERT_A))

    def test_sweep(self) -> None:
        """sweep() forgets expired sessions, keeps live ones, and says how
        many it removed."""
        old = self.create()
        self.clock.advance(IDLE / 2)
        young = self.create()
        short = self.create(not_after=START + IDLE / 2 + 1)
        self.assertEqual(self.store.sweep(), 0)
        self.clock.advance(IDLE / 2)
        self.assertEqual(self.store.sweep(), 2)
        self.assertEqual(self.store.count(), 1)
        self.assertIsNone(self.store.lookup(old, CERT_A))
        self.assertIsNone(self.store.lookup(short, CERT_A))
        self.assertIsNotNone(self.store.lookup(young, CERT_A))
        self.assertEqual(self.store.sweep(), 0)


class LoginThrottleTests(SyncTestCase):
    """Failed logins counted per (certificate, username) and per certificate
    in a sliding window; an attempt is reserved before its password is
    checked and released when the login succeeds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.metadata = metadata_store(self)
        self.throttle = LoginThrottle(self.metadata, self.clock.seconds)

    def failed(self, certificate: str, username: str, times: int = 1) -> None:
        """Failed attempts: reserved and never released."""
        for _ in range(times):
            self.throttle.reserve(certificate, username)

    def retry_after(self, certificate: str, username: str) -> int:
        """0 when an attempt may be made now (it is released at once, as by
        a successful login), else the Retry-After seconds."""
        try:
            attempt = self.throttle.reserve(certificate, username)
        except LoginThrottled as throttled:
            return throttled.retry_after
        self.throttle.release(attempt)
        return 0

    def test_defaults(self) -> None:
        """The contract's numbers: 5 failures per certificate and username,
        20 per certificate, within 5 minutes."""
        self.assertEqual(
            (FAILURES_BEFORE_THROTTLE, CERTIFICATE_FAILURES_BEFORE_THROTTLE, THROTTLE_WINDOW_SECONDS), (5, 20, 300)
        )

    def test_allowed_below_limit(self) -> None:
        """No failures, or four, leave the certificate free to try the
        username."""
        self.assertEqual(self.retry_after(CERT_A, "alice"), 0)
        self.failed(CERT_A, "alice", times=4)
        self.assertEqual(self.retry_after(CERT_A, "alice"), 0)

    def test_locked_at_limit(self) -> None:
        """The fifth failure locks the pair for the whole window; a refused
        attempt is not recorded, so it does not extend the lock."""
        self.failed(CERT_A, "alice", times=5)
        self.assertIn(self.retry_after(CERT_A, "alice"), (300, 301))
        self.clock.advance(299.5)
        self.assertEqual(self.retry_after(CERT_A, "alice"), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.retry_after(CERT_A, "alice"), 0)

    def test_sliding_window(self) -> None:
        """Failures spread over time count only while within the window: the
        lock lifts when the oldest of the last five leaves it."""
        for _ in range(5):
            self.failed(CERT_A, "alice")
            self.clock.advance(60)
        # Failures at 0, 60, 120, 180, 240; now is 300: the first has left.
        self.assertEqual(self.retry_after(CERT_A, "alice"), 0)
        self.failed(CERT_A, "alice")  # 60, 120, 180, 240, 300
        self.assertIn(self.retry_after(CERT_A, "alice"), (60, 61))

    def test_other_certificates_never_lock_the_owner(self) -> None:
        """Five failures for alice from certificate B lock B for alice only:
        certificate A, which has not failed, may still try alice, and B may
        still try bob."""
        self.failed(CERT_B, "alice", times=5)
        self.assertGreater(self.retry_after(CERT_B, "alice"), 0)
        self.assertEqual(self.retry_after(CERT_A, "alice"), 0)
        self.assertEqual(self.retry_after(CERT_B, "bob"), 0)

    def test_many_certificates_never_lock_the_owner(self) -> None:
        """However many certificates fail for alice, one that has not failed
        is free."""
        for index in range(10):
            self.failed(f"{index:064x}", "alice", times=5)
        self.assertEqual(self.retry_after(CERT_A, "alice"), 0)

    def test_certificate_total(self) -> None:
        """Twenty failures from one certificate, spread over usernames so
        that none reaches five, lock that certificate for every username;
        another certificate is free."""
        for index in range(20):
            self.failed(CERT_A, f"guess{index % 5}")
            self.clock.advance(1)
        self.assertIn(self.retry_after(CERT_A, "bob"), (281, 282))
        self.assertEqual(self.retry_after(CERT_B, "bob"), 0)
        self.clock.advance(281)
        self.assertEqual(self.retry_after(CERT_A, "bob"), 0)

    def test_pair_and_certificate_longest_wait_wins(self) -> None:
        """When both limits are reached the wait is the longer one."""
        for index in range(15):
            self.failed(CERT_A, f"guess{index}")
        self.clock.advance(100)
        self.failed(CERT_A, "alice", times=5)
        # alice: five failures from 100 on; the certificate: twenty from 0.
        self.assertIn(self.retry_after(CERT_A, "alice"), (300, 301))
        self.assertIn(self.retry_after(CERT_A, "carol"), (200, 201))
        self.clock.advance(200)
        self.assertEqual(self.retry_after(CERT_A, "carol"), 0)
        self.assertIn(self.retry_after(CERT_A, "alice"), (100, 101))

    def test_pending_attempts_count(self) -> None:
        """Attempts in progress (reserved, not yet released) count as
        failures: with five in progress a sixth is refused unchecked."""
        attempts = [self.throttle.reserve(CERT_A, "alice") for _ in range(5)]
        with self.assertRaises(LoginThrottled):
            self.throttle.reserve(CERT_A, "alice")
        self.throttle.release(attempts[0])
        self.assertEqual(self.retry_after(CERT_A, "alice"), 0)

    def test_success_is_not_a_failure(self) -> None:
        """Released attempts (successful logins) never add up to a lock."""
        for _ in range(30):
            self.throttle.release(self.throttle.reserve(CERT_A, "alice"))
        self.assertEqual(self.retry_after(CERT_A, "alice"), 0)

    def test_unlock(self) -> None:
        """unlock(name) forgets that username's failures from every
        certificate, and their weight in each certificate's total; other
        usernames' failures stay."""
        self.failed(CERT_A, "alice", times=5)
        self.failed(CERT_B, "alice", times=5)
        for index in range(15):
            self.failed(CERT_A, f"guess{index}")
        self.failed(CERT_B, "bob", times=5)
        self.assertEqual(self.throttle.unlock("alice"), 10)
        self.assertEqual(self.throttle.unlock("alice"), 0)
        self.assertEqual(self.retry_after(CERT_A, "alice"), 0)  # A: 15 failures left
        self.assertEqual(self.retry_after(CERT_B, "alice"), 0)
        self.assertGreater(self.retry_after(CERT_B, "bob"), 0)

    def test_hostile_usernames(self) -> None:
        """A username the store could not keep as text (a lone surrogate, a
        NUL, thousands of characters) is still counted, separately from
        similar names, and the store never holds a tried username."""
        for hostile in ["\ud800admin", "\udfffadmin", "ali\0ce", "x" * 5000]:
            self.failed(CERT_A, hostile, times=4)
            self.assertEqual(self.retry_after(CERT_A, hostile), 0)
            self.failed(CERT_A, hostile)
            self.assertGreater(self.retry_after(CERT_A, hostile), 0)
        self.assertEqual(self.retry_after(CERT_B, "alice"), 0)
        self.failed(CERT_B, "alice")
        rows = self.metadata._query("SELECT account FROM sv_login_attempts")
        self.assertEqual(len(rows), 21)
        self.assertEqual({row[0] for row in rows if "alice" in row[0] or "admin" in row[0] or "xxx" in row[0]}, set())
        self.assertIn((account_digest("alice"),), rows)

    def test_sweep_keeps_live_failures(self) -> None:
        """sweep() forgets only failures outside the window."""
        self.failed(CERT_A, "old", times=5)
        self.clock.advance(200)
        self.failed(CERT_A, "new", times=5)
        self.clock.advance(150)
        self.assertEqual(self.throttle.sweep(), 5)
        self.assertEqual(self.retry_after(CERT_A, "old"), 0)
        self.assertGreater(self.retry_after(CERT_A, "new"), 0)

    def test_custom_limits(self) -> None:
        """The limits and the window are parameters."""
        throttle = LoginThrottle(self.metadata, self.clock.seconds, per_account=2, per_certificate=3, window_seconds=10)
        throttle.reserve(CERT_A, "k")
        throttle.reserve(CERT_A, "k")
        with self.assertRaises(LoginThrottled) as caught:
            throttle.reserve(CERT_A, "k")
        self.assertIn(caught.exception.retry_after, (10, 11))
        throttle.reserve(CERT_A, "j")
        self.assertRaises(LoginThrottled, throttle.reserve, CERT_A, "i")
        self.clock.advance(10)
        throttle.reserve(CERT_A, "k")

    def test_counted_across_nodes(self) -> None:
        """Failures recorded through two stores on one database add up."""
        other_store = SqliteMetadataStore(self.metadata.path)
        self.addCleanup(other_store.close)
        other = LoginThrottle(other_store, self.clock.seconds)
        self.failed(CERT_A, "alice", times=FAILURES_BEFORE_THROTTLE - 1)
        other.reserve(CERT_A, "alice")
        self.assertGreater(self.retry_after(CERT_A, "alice"), 0)


class MirroredSessionTests(SyncTestCase):
    """One node keeps its sessions in memory too: lookups need no I/O, and
    the store stays the record (restarts, the admin command)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.metadata = metadata_store(self)
        self.store = self.make()

    def make(self) -> SessionStore:
        return SessionStore(
            self.metadata,
            self.clock.seconds,
            rows=vault_rows(self.metadata),
            idle_seconds=IDLE,
            ttl_seconds=TTL,
            mirror=True,
        )

    def test_lookup_without_the_store(self) -> None:
        session = self.store.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        self.patch(self.metadata, "get_session", lambda digest: self.fail("the store was asked"))
        found = self.store.lookup_local(session.session_id, CERT_A)
        assert isinstance(found, Session)
        self.assertEqual(found.username, "alice")
        self.assertIsNone(self.store.lookup_local(session.session_id, CERT_B))
        self.assertIsNone(self.store.lookup_local(str(uuid.uuid4()), CERT_A))

    def test_revoked_elsewhere_dropped_at_once(self) -> None:
        """Sessions ended in the store by another process (the admin
        command) leave the mirror at the next drop_revoked, not the next
        sweep; other sessions stay, and nothing is read again until the
        store's revocation mark changes."""
        alice = self.store.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        bob = self.store.create("bob", "id-bob", CERT_B, FAR_FUTURE)
        self.assertEqual(self.store.drop_revoked(), 0)
        self.metadata.revoke_sessions(user_id="id-alice")
        self.assertEqual(self.store.drop_revoked(), 1)
        self.assertIsNone(self.store.lookup_local(alice.session_id, CERT_A))
        self.assertIsNotNone(self.store.lookup_local(bob.session_id, CERT_B))
        self.patch(self.metadata, "list_sessions", lambda: self.fail("listed without a new revocation"))
        self.assertEqual(self.store.drop_revoked(), 0)

    def test_restart_keeps_sessions(self) -> None:
        session = self.store.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        restarted = self.make()
        self.assertIsNone(restarted.lookup_local(session.session_id, CERT_A))  # not loaded yet
        self.assertEqual(restarted.load(), 1)
        self.assertIsNotNone(restarted.lookup_local(session.session_id, CERT_A))

    def test_idle_timer_written_back_at_sweep(self) -> None:
        session = self.store.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        self.clock.advance(IDLE - 10)
        self.assertIsNotNone(self.store.lookup_local(session.session_id, CERT_A))
        self.store.sweep()
        self.clock.advance(IDLE - 10)  # alive only if the use was written back
        restarted = self.make()
        restarted.load()
        self.assertIsNotNone(restarted.lookup_local(session.session_id, CERT_A))

    def test_expiry_and_end(self) -> None:
        first = self.store.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        second = self.store.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        self.store.end(first.session_id)
        self.assertIsNone(self.store.lookup_local(first.session_id, CERT_A))
        self.assertIsNone(self.metadata.get_session(session_digest(first.session_id)))
        self.clock.advance(IDLE)
        self.assertIsNone(self.store.lookup_local(second.session_id, CERT_A))
        self.assertEqual(self.store.sweep(), 1)
        self.assertEqual(self.store.count(), 0)

    def test_removed_user_ends_at_sweep(self) -> None:
        """The admin command removes a user in the store; the mirror drops
        their sessions at the next sweep, and keeps sessions created while
        the sweep ran."""
        from securevault.stores.metadata import UserRecord

        self.metadata.add_user(UserRecord("bob", "id-bob", "h", "t"))
        bob = self.store.create("bob", "id-bob", CERT_A, FAR_FUTURE)
        alice = self.store.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        SqliteMetadataStore(self.metadata.path).remove_user("bob")  # another process
        self.assertIsNotNone(self.store.lookup_local(bob.session_id, CERT_A))
        list_sessions = self.metadata.list_sessions
        late: list[str] = []

        def listed_then_login() -> list[SessionRecord]:
            records = list_sessions()
            late.append(self.store.create("carol", "id-carol", CERT_A, FAR_FUTURE).session_id)
            return records

        self.patch(self.metadata, "list_sessions", listed_then_login)
        self.store.sweep()
        self.assertIsNone(self.store.lookup_local(bob.session_id, CERT_A))
        self.assertIsNotNone(self.store.lookup_local(alice.session_id, CERT_A))
        self.assertIsNotNone(self.store.lookup_local(late[0], CERT_A))


class SharedMirrorTests(SyncTestCase):
    """The workers of one node: each mirrors the shared store's sessions,
    trusting its memory only while the shared generation has not moved."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.metadata = metadata_store(self)
        self.data_dir = data_dir = self.make_dir()
        self.first = self.make(self.metadata, data_dir)
        other = SqliteMetadataStore(self.metadata.path)
        self.addCleanup(other.close)
        self.second = self.make(other, data_dir)
        self.second_metadata = other

    def make(self, metadata: SqliteMetadataStore, data_dir: Path, *, mirror: bool = True) -> SessionStore:
        generation = SharedGeneration.in_data_dir(data_dir)
        assert generation is not None
        self.addCleanup(generation.close)
        store = SessionStore(
            metadata,
            self.clock.seconds,
            rows=vault_rows(metadata),
            idle_seconds=IDLE,
            ttl_seconds=TTL,
            mirror=mirror,
            generation=generation,
        )
        store.load()
        return store

    def test_made_on_one_served_by_the_other(self) -> None:
        """A session made on the first worker is not in the second's memory:
        it asks the store once, then answers from memory."""
        session = self.first.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        self.assertIs(self.second.lookup_local(session.session_id, CERT_A), ASK_STORE)
        found = self.second.lookup(session.session_id, CERT_A)
        assert found is not None
        self.assertEqual(found.username, "alice")
        self.patch(self.second_metadata, "get_session", lambda digest: self.fail("the store was asked"))
        self.assertIsInstance(self.second.lookup_local(session.session_id, CERT_A), Session)

    def test_logout_on_one_ends_it_on_the_other_at_once(self) -> None:
        """A logout on the second worker: the first, which holds the
        session in memory, refuses it at its next lookup."""
        session = self.first.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        self.assertIsInstance(self.first.lookup_local(session.session_id, CERT_A), Session)
        self.second.end(session.session_id)
        self.assertIs(self.first.lookup_local(session.session_id, CERT_A), ASK_STORE)
        self.assertIsNone(self.first.lookup(session.session_id, CERT_A))

    def test_revoke_from_another_process_refused_at_once(self) -> None:
        """An operator's revoke (the admin command: no mirror, same
        generation) is refused by a worker at its next lookup, not at its
        next revocation check."""
        session = self.first.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        other = self.make(self.second_metadata, self.data_dir, mirror=False)
        other.revoke(user_id="id-alice")
        self.assertIsNone(self.first.lookup(session.session_id, CERT_A))

    def test_idle_here_checked_in_the_store(self) -> None:
        """A session idle on the first worker but used on the second (and
        written back by its sweep) is not refused by the first."""
        session = self.first.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        self.assertIsNotNone(self.first.lookup_local(session.session_id, CERT_A))
        self.clock.advance(IDLE - 10)
        self.assertIsNotNone(self.second.lookup(session.session_id, CERT_A))
        self.second.sweep()
        self.clock.advance(20)
        self.assertIs(self.first.lookup_local(session.session_id, CERT_A), ASK_STORE)
        self.assertIsNotNone(self.first.lookup(session.session_id, CERT_A))

    def test_own_unwritten_use_counts_after_the_mirror_is_dropped(self) -> None:
        """A worker's own uses not yet written back still count when a bump
        (another session's logout) drops its mirror: the later of the
        store's last use and its own decides."""
        session = self.first.create("alice", "id-alice", CERT_A, FAR_FUTURE)
        other = self.first.create("bob", "id-bob", CERT_B, FAR_FUTURE)
        self.clock.advance(IDLE - 10)
        self.assertIsInstance(self.first.lookup_local(session.session_id, CERT_A), Session)
        self.second.end(other.session_id)
        self.clock.advance(20)  # idle by the store's copy, not by this worker's use
        self.assertIsNotNone(self.first.lookup(session.session_id, CERT_A))
