# -*- test-case-name: tests.test_sessions -*-
"""Sessions and login throttling, kept in the metadata store.

Every node of a vault shares them through the store: a session created on
one node works on the others, a logout anywhere ends it everywhere, and
failed logins count across all nodes.  Blocking code, run in the worker
pool, with an injected clock.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass, field
from typing import Callable

from securevault.metadata import MetadataStore, SessionRecord

FAILURES_BEFORE_THROTTLE = 5
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


def session_digest(session_id: str) -> str:
    """What the store keeps instead of the id: its SHA-256.  A stolen copy
    of the store holds no usable session id, and lookups are by a hash the
    client cannot steer."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    """Sessions by id, bound to the certificate they were created with.

    Idle and absolute expiry are checked at each lookup and by L{sweep}.
    """

    def __init__(
        self, store: MetadataStore, clock: Callable[[], float], *, idle_seconds: float, ttl_seconds: float
    ) -> None:
        self._store = store
        self._clock = clock
        self._idle = idle_seconds
        self._ttl = ttl_seconds
        self._touch_interval = min(TOUCH_INTERVAL_SECONDS, idle_seconds / 20)

    def count(self) -> int:
        return self._store.count_sessions()

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
        self._store.put_session(
            SessionRecord(
                session_digest(session.session_id),
                username,
                user_id,
                fingerprint,
                session.created_at,
                session.last_used,
                session.expires_at,
            )
        )
        return session

    def expiry(self, session: Session) -> float:
        """When the session ends if not used again."""
        return min(session.last_used + self._idle, session.expires_at)

    def lookup(self, session_id: str, fingerprint: str) -> Session | None:
        """The live session with that id for that certificate, else None.

        A hit refreshes the idle timer.
        """
        digest = session_digest(session_id)
        record = self._store.get_session(digest)
        if record is None or not hmac.compare_digest(record.digest, digest):
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
        now = self._clock()
        if now >= self.expiry(session):
            self._store.delete_session(digest)
            return None
        if not hmac.compare_digest(record.fingerprint, fingerprint):
            return None
        if now - session.last_used >= self._touch_interval:
            self._store.touch_session(digest, now)
        session.last_used = now
        return session

    def end(self, session_id: str) -> None:
        self._store.delete_session(session_digest(session_id))

    def sweep(self) -> int:
        """Forget expired sessions; returns how many."""
        return self._store.delete_expired_sessions(self._clock(), self._idle)


# A throttle subject longer than this, or one the store cannot keep as text
# (a lone surrogate or a NUL from a hostile JSON username), is counted under
# its digest instead.  Valid usernames and fingerprints are far shorter.
MAX_PLAIN_SUBJECT_CHARS = 128


def throttle_subject(subject: str) -> str:
    """What the store keeps for a subject: the subject itself when it is
    short, encodable text without NUL, else C{"sha256:" + hex digest}, so a
    hostile username is still throttled but never fails the store."""
    if len(subject) <= MAX_PLAIN_SUBJECT_CHARS and "\0" not in subject:
        try:
            subject.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return subject
    return "sha256:" + hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()


class LoginThrottle:
    """Counts failed logins per subject (username, certificate) in a sliding
    window, across every node that shares the store."""

    def __init__(
        self,
        store: MetadataStore,
        clock: Callable[[], float],
        *,
        limit: int = FAILURES_BEFORE_THROTTLE,
        window_seconds: float = THROTTLE_WINDOW_SECONDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._limit = limit
        self._window = window_seconds

    def retry_after(self, *subjects: str) -> int:
        """Seconds until a login for these subjects may be tried; 0 when allowed."""
        wait = 0.0
        now = self._clock()
        for subject in subjects:
            times = self._store.recent_login_failures(throttle_subject(subject), now - self._window, self._limit)
            if len(times) >= self._limit:
                wait = max(wait, times[-1] + self._window - now)
        return int(wait) + 1 if wait > 0 else 0

    def record_failure(self, *subjects: str) -> None:
        self._store.add_login_failures([throttle_subject(subject) for subject in subjects], self._clock())

    def sweep(self) -> int:
        return self._store.forget_login_failures(self._clock() - self._window)
