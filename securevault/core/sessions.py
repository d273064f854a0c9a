# -*- test-case-name: tests.core.test_sessions -*-
"""Sessions and login throttling, kept in the metadata store.

Every node of a vault shares them through the store: a session created on
one node works on the others, a logout anywhere ends it everywhere, and
failed logins count across all nodes.  Blocking code, run in the worker
pool, with an injected clock.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from securevault.core.generation import SharedGeneration
from securevault.core.integrity import RowAuthenticator
from securevault.stores.metadata import SESSIONS_REVOKED_STATE, LoginAttempt, MetadataStore, SessionRecord

DEFAULT_SESSION_IDLE_SECONDS = 30 * 60
DEFAULT_SESSION_TTL_SECONDS = 12 * 60 * 60
FAILURES_BEFORE_THROTTLE = 5  # from one certificate for one username
CERTIFICATE_FAILURES_BEFORE_THROTTLE = 20  # from one certificate in all
THROTTLE_WINDOW_SECONDS = 5 * 60
# A session's last use is written back at most this often (and at most every
# twentieth of the idle timeout), not on every request: a read per request,
# not a write, while idle expiry stays accurate to a few seconds.
TOUCH_INTERVAL_SECONDS = 5.0


@dataclass
class Session:
    """One login: who, over which client certificate, and until when."""

    session_id: str = field(repr=False)
    username: str
    user_id: str
    fingerprint: str
    created_at: float
    last_used: float
    expires_at: float  # absolute end: TTL or the certificate's notAfter


class _Unsure(enum.Enum):
    ASK_STORE = "ask the store"


# What L{SessionStore.lookup_local} answers when memory cannot decide (a
# shared mirror: a session made on another worker, or one this worker last
# saw before the shared generation moved): look it up with L{lookup}.
ASK_STORE = _Unsure.ASK_STORE


def session_digest(session_id: str) -> str:
    """What the store keeps instead of the id: its SHA-256.  A stolen copy
    of the store holds no usable session id, and lookups are by a hash the
    client cannot steer."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    """Sessions by id, bound to the certificate they were created with.

    Idle and absolute expiry are checked at each lookup and by L{sweep}.

    With C{mirror=True} (one node: SQLite and local blobs) the store is also
    kept in memory, so that L{lookup_local} answers on the reactor thread
    without a trip to the pool: this process is then the only one that
    creates, uses or ends sessions.  The admin command may still delete a
    removed user's sessions from the store; L{sweep} (every minute) drops
    those from memory too.  Several nodes never mirror: every lookup reads
    the shared store, so a logout on one node holds on all at once.

    With C{mirror=True} and a C{generation} (the workers of one node,
    C{--workers N}) the mirror is shared-state aware: an entry is trusted
    only while the sessions slot of the generation still reads what the
    mirror was validated at; L{lookup_local} answers L{ASK_STORE} when it
    cannot decide (a miss, a stale mirror, an entry idle here), and
    L{lookup} (in the pool) then reads the store and refills the mirror.
    L{end} and L{revoke} bump the generation after the store change.
    """

    def __init__(
        self,
        store: MetadataStore,
        clock: Callable[[], float],
        *,
        rows: RowAuthenticator,
        idle_seconds: float,
        ttl_seconds: float,
        mirror: bool = False,
        generation: SharedGeneration | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._rows = rows
        self._idle = idle_seconds
        self._ttl = ttl_seconds
        self._touch_interval = min(TOUCH_INTERVAL_SECONDS, idle_seconds / 20)
        self._mirror: dict[str, SessionRecord] | None = {} if mirror else None
        # Last uses of mirrored sessions not yet written back to the store.
        self._touched: dict[str, float] = {}
        # When each mirrored session was added, in a count of additions: a
        # listing of the store only speaks for sessions added before it began.
        self._added: dict[str, int] = {}
        self._additions = 0
        self._lock = threading.Lock()
        self._revoked_mark: str | None = None
        self._generation = generation
        # The sessions slot's value the mirror is valid at (shared mirror).
        self._validated_at = generation.value() if generation is not None else 0

    @property
    def mirrored(self) -> bool:
        return self._mirror is not None

    def count(self) -> int:
        return self._store.count_sessions()

    def load(self) -> int:
        """Fill the mirror from the store (at start); returns how many."""
        if self._mirror is None:
            return 0
        validated_at = self._generation.value() if self._generation is not None else 0
        self._revoked_mark = self._store.get_state(SESSIONS_REVOKED_STATE)
        # A row that fails authentication never enters the mirror.
        records = [record for record in self._store.list_sessions() if self._rows.session_ok(record)]
        with self._lock:
            self._mirror = {record.digest: record for record in records}
            self._validated_at = validated_at
        return len(records)

    def create(self, username: str, user_id: str, fingerprint: str, certificate_not_after: float) -> Session:
        now = self._clock()
        session = Session(
            session_id=str(uuid.uuid4()),
            username=username,
            user_id=user_id,
            fingerprint=fingerprint,
            created_at=now,
            last_used=now,
            expires_at=min(now + self._ttl, certificate_not_after),
        )
        record = SessionRecord(
            session_digest(session.session_id),
            username,
            user_id,
            fingerprint,
            session.created_at,
            session.last_used,
            session.expires_at,
        )
        record = dataclasses.replace(record, mac=self._rows.session_mac(record))
        self._store.put_session(record)
        with self._lock:
            if self._mirror is not None:
                self._mirror[record.digest] = record
                self._additions += 1
                self._added[record.digest] = self._additions
        return session

    def expiry(self, session: Session) -> float:
        """When the session ends if not used again."""
        return min(session.last_used + self._idle, session.expires_at)

    def _check(self, session_id: str, digest: str, record: SessionRecord | None, fingerprint: str) -> Session | None:
        """The session if C{record} is live, bound to C{fingerprint}, and as
        securevault wrote it (its MAC holds)."""
        if record is None or not hmac.compare_digest(record.digest, digest):
            return None
        if not self._rows.session_ok(record):
            return None
        session = Session(
            session_id,
            record.username,
            record.user_id,
            record.fingerprint,
            record.created_at,
            record.last_used,
            record.expires_at,
        )
        if self._clock() >= self.expiry(session) or not hmac.compare_digest(record.fingerprint, fingerprint):
            return None
        return session

    def lookup_local(self, session_id: str, fingerprint: str) -> Session | None | _Unsure:
        """L{lookup} from the mirror: no I/O, safe on the reactor thread.
        Only for a mirrored store.  A shared mirror (with a generation)
        answers L{ASK_STORE} when memory cannot decide; then call
        L{lookup} in the pool."""
        assert self._mirror is not None, "lookup_local needs mirror=True"
        digest = session_digest(session_id)
        now = self._clock()
        shared = self._generation is not None
        current = self._generation.value() if self._generation is not None else 0
        with self._lock:
            if shared and current != self._validated_at:
                self._forget_mirror(current)
            record = self._mirror.get(digest)
            if record is None and shared:
                return ASK_STORE
            session = self._check(session_id, digest, record, fingerprint)
            if session is None:
                if shared and record is not None:
                    # Idle here, or not this certificate's: the store (and
                    # the other workers' write-backs) decide.
                    self._forget(digest, keep_touch=True)
                    return ASK_STORE
                if record is not None and now >= min(record.last_used + self._idle, record.expires_at):
                    self._forget(digest)  # the store forgets it at the next sweep
                return None
            assert record is not None
            if now > session.last_used:
                self._mirror[digest] = dataclasses.replace(record, last_used=now)
                self._touched[digest] = now
            session.last_used = now
            return session

    def _forget_mirror(self, validated_at: int) -> None:
        """The shared generation moved: nothing in memory is trusted any
        more (last uses still to write back are kept).  Under the lock."""
        assert self._mirror is not None
        self._mirror.clear()
        self._added.clear()
        self._validated_at = validated_at

    def _forget(self, digest: str, *, keep_touch: bool = False) -> None:
        """One session out of the mirror.  Under the lock."""
        assert self._mirror is not None
        self._mirror.pop(digest, None)
        self._added.pop(digest, None)
        if not keep_touch:
            self._touched.pop(digest, None)

    def lookup(self, session_id: str, fingerprint: str) -> Session | None:
        """The live session with that id for that certificate, else None.

        A hit refreshes the idle timer.
        """
        if self._mirror is not None:
            local = self.lookup_local(session_id, fingerprint)
            if local is not ASK_STORE:
                assert not isinstance(local, _Unsure)
                return local
            return self._lookup_shared(session_id, fingerprint)
        digest = session_digest(session_id)
        record = self._store.get_session(digest)
        session = self._check(session_id, digest, record, fingerprint)
        now = self._clock()
        if session is None:
            if record is not None and now >= min(record.last_used + self._idle, record.expires_at):
                self._store.delete_session(digest)
            return None
        if now - session.last_used >= self._touch_interval:
            self._store.touch_session(digest, now)
        session.last_used = now
        return session

    def _lookup_shared(self, session_id: str, fingerprint: str) -> Session | None:
        """A shared mirror's store lookup: the store's row, with its last
        use the later of the store's and this worker's own (not yet written
        back), mirrored when the generation has not moved since the read
        began.  An expired row is left to the sweep: another worker may
        hold a later use of it."""
        assert self._generation is not None and self._mirror is not None
        started_at = self._generation.value()
        digest = session_digest(session_id)
        record = self._store.get_session(digest)
        if record is None:
            return None
        stored_last_used = record.last_used
        with self._lock:
            pending = self._touched.get(digest)
        if pending is not None and pending > record.last_used:
            record = dataclasses.replace(record, last_used=pending)
        session = self._check(session_id, digest, record, fingerprint)
        if session is None:
            return None
        now = self._clock()
        if now - stored_last_used >= self._touch_interval:
            self._store.touch_session(digest, now)
        with self._lock:
            if started_at > self._validated_at:
                self._forget_mirror(started_at)
            if started_at == self._validated_at:
                self._mirror[digest] = dataclasses.replace(record, last_used=now)
                self._additions += 1
                self._added[digest] = self._additions
        session.last_used = now
        return session

    def _bump(self) -> None:
        """Shared state changed under the other workers' mirrors."""
        if self._generation is not None:
            self._generation.bump()

    def end(self, session_id: str) -> None:
        digest = session_digest(session_id)
        with self._lock:
            if self._mirror is not None:
                self._forget(digest)
        self._store.delete_session(digest)
        self._bump()

    def sweep(self) -> int:
        """Forget expired sessions; returns how many.  A mirror writes its
        idle timers back and drops what the store no longer has (a user
        removed by the admin command)."""
        started = self._clock()
        if self._mirror is not None:
            with self._lock:
                touched = list(self._touched.items())
                self._touched = {}
            for digest, last_used in touched:
                self._store.touch_session(digest, last_used)
        removed = self._store.delete_expired_sessions(started, self._idle)
        if self._mirror is not None:
            self._drop_absent()
        return removed

    def _drop_absent(self) -> int:
        """Drop from the mirror what the store no longer has (not sessions
        created meanwhile); returns how many."""
        with self._lock:
            listed_after = self._additions
        present = {record.digest for record in self._store.list_sessions()}
        with self._lock:
            assert self._mirror is not None
            gone = [d for d in self._mirror if d not in present and self._added.get(d, 0) <= listed_after]
            for digest in gone:
                self._forget(digest)
        return len(gone)

    def drop_revoked(self) -> int:
        """A mirror drops at once the sessions ended from outside this
        process (password change, user removal, an operator's revoke: each
        changes the store's revocation mark).  Cheap when nothing changed:
        one read of the mark.  Returns how many were dropped."""
        if self._mirror is None:
            return 0
        mark = self._store.get_state(SESSIONS_REVOKED_STATE)
        if mark == self._revoked_mark:
            return 0
        self._revoked_mark = mark
        return self._drop_absent()

    def revoke(self, *, user_id: str | None = None, digest_prefix: str | None = None) -> int:
        """End sessions by user or by the prefix that L{listing} shows."""
        count = self._store.revoke_sessions(user_id=user_id, digest_prefix=digest_prefix)
        self._bump()
        return count

    def listing(self, user_id: str | None = None) -> list[SessionRecord]:
        """Live sessions, newest first (for the operator: no session id is
        ever shown; records carry the id's digest)."""
        now = self._clock()
        records = [
            record
            for record in self._store.list_sessions()
            if (user_id is None or record.user_id == user_id)
            and self._rows.session_ok(record)
            and now < min(record.last_used + self._idle, record.expires_at)
        ]
        return sorted(records, key=lambda record: record.created_at, reverse=True)


# What the operator sees of a session: a prefix of its id's digest (the id
# itself is a secret the vault never stores).
SESSION_HANDLE_CHARS = 12


def session_handle(record: SessionRecord) -> str:
    return record.digest[:SESSION_HANDLE_CHARS]


def account_digest(username: str) -> str:
    """What the throttle keeps for a username: its SHA-256, hex.  The store
    never holds a tried name (a mistyped password, a hostile string of any
    length or encoding), and the admin's unlock finds a name's attempts by
    the same digest."""
    return hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()


class LoginThrottled(Exception):
    """A login refused unchecked: too many recent failures."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"try again in {retry_after} s")
        self.retry_after = retry_after


class LoginThrottle:
    """Failed logins counted per (client certificate, username) and per
    client certificate, in a sliding window, across every node that shares
    the store.

    Failures are never counted per username alone: another certificate's
    failures never lock out a certificate that has not failed itself, so
    nobody can lock the owner out.  An attempt is reserved (recorded as a
    failure) before its password is checked, atomically with the count, so
    concurrent attempts are counted exactly; a login that succeeds releases
    its reservation.
    """

    def __init__(
        self,
        store: MetadataStore,
        clock: Callable[[], float],
        *,
        per_account: int = FAILURES_BEFORE_THROTTLE,
        per_certificate: int = CERTIFICATE_FAILURES_BEFORE_THROTTLE,
        window_seconds: float = THROTTLE_WINDOW_SECONDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._per_account = per_account
        self._per_certificate = per_certificate
        self._window = window_seconds

    def reserve(self, fingerprint: str, username: str) -> str:
        """Reserve an attempt to log in as C{username} over the certificate
        C{fingerprint}; returns its id, for L{release} when the password is
        right.  Raises L{LoginThrottled} when the certificate may not try
        now (nothing is recorded then)."""
        now = self._clock()
        attempt = LoginAttempt(uuid.uuid4().hex, fingerprint, account_digest(username), now)
        oldest = self._store.reserve_login_attempt(
            attempt, now - self._window, self._per_account, self._per_certificate
        )
        if oldest is None:
            return attempt.attempt_id
        wait = oldest + self._window - now
        raise LoginThrottled(int(wait) + 1 if wait > 0 else 1)

    def release(self, attempt_id: str) -> None:
        """The attempt succeeded: it is not a failure."""
        self._store.release_login_attempt(attempt_id)

    def unlock(self, username: str) -> int:
        """Forget every failure for C{username}, from every certificate
        (they no longer count for those certificates either); returns how
        many."""
        return self._store.clear_login_attempts(account_digest(username))

    def sweep(self) -> int:
        return self._store.forget_login_attempts(self._clock() - self._window)
