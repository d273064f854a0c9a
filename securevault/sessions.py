# -*- test-case-name: tests.test_sessions -*-
"""Sessions and login throttling, in memory, with an injected clock."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

FAILURES_BEFORE_THROTTLE = 5
THROTTLE_WINDOW_SECONDS = 5 * 60


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


def _index(session_id: str) -> bytes:
    """Sessions are found by a digest of their id, so the table's lookup
    timing depends on a hash the client cannot steer, not on the secret."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


class SessionStore:
    """Sessions by id, bound to the certificate they were created with.

    Idle and absolute expiry are checked at each lookup and by L{sweep}.
    """

    def __init__(self, clock: Callable[[], float], *, idle_seconds: float, ttl_seconds: float) -> None:
        self._clock = clock
        self._idle = idle_seconds
        self._ttl = ttl_seconds
        self._sessions: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

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
        self._sessions[_index(session.session_id)] = session
        return session

    def expiry(self, session: Session) -> float:
        """When the session ends if not used again."""
        return min(session.last_used + self._idle, session.expires_at)

    def lookup(self, session_id: str, fingerprint: str) -> Session | None:
        """The live session with that id for that certificate, else None.

        A hit refreshes the idle timer.
        """
        key = _index(session_id)
        session = self._sessions.get(key)
        if session is None or not hmac.compare_digest(session.session_id, session_id):
            return None
        now = self._clock()
        if now >= self.expiry(session):
            del self._sessions[key]
            return None
        if not hmac.compare_digest(session.fingerprint, fingerprint):
            return None
        session.last_used = now
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(_index(session_id), None)

    def end_user(self, user_id: str) -> None:
        for sid in [s for s, v in self._sessions.items() if v.user_id == user_id]:
            del self._sessions[sid]

    def retain_users(self, user_ids: set[str]) -> int:
        """End the sessions of users no longer in C{user_ids} (removed with
        C{securevault-admin user remove}); returns how many."""
        gone = [sid for sid, s in self._sessions.items() if s.user_id not in user_ids]
        for sid in gone:
            del self._sessions[sid]
        return len(gone)

    def sweep(self) -> int:
        """Forget expired sessions; returns how many."""
        now = self._clock()
        dead = [sid for sid, s in self._sessions.items() if now >= self.expiry(s)]
        for sid in dead:
            del self._sessions[sid]
        return len(dead)


class LoginThrottle:
    """Counts failed logins per key (username, certificate) in a sliding window."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        limit: int = FAILURES_BEFORE_THROTTLE,
        window_seconds: float = THROTTLE_WINDOW_SECONDS,
    ) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window_seconds
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self._clock() - self._window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, *keys: str) -> int:
        """Seconds until a login for these keys may be tried; 0 when allowed."""
        wait = 0.0
        now = self._clock()
        for key in keys:
            times = self._recent(key)
            if times is not None and len(times) >= self._limit:
                wait = max(wait, times[-self._limit] + self._window - now)
        return int(wait) + 1 if wait > 0 else 0

    def record_failure(self, *keys: str) -> None:
        now = self._clock()
        for key in keys:
            times = self._failures.setdefault(key, deque())
            times.append(now)
            while len(times) > self._limit:
                times.popleft()

    def sweep(self) -> None:
        for key in list(self._failures):
            self._recent(key)
