# -*- test-case-name: tests.server.test_resources -*-
"""POST /login: username and password, over a verified client certificate.

A login runs in its own pool (L{VaultApp.run_hashing}, sized by
L{login_threads}): scrypt is slow on purpose, and a storm of logins must
not take the threads that serve transfers.  The logins that pool may hold,
running or queued, are bounded; past that a login is answered 503 busy at
once, before any work.
"""

from __future__ import annotations

import os
import threading
from contextlib import suppress
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from securevault.core.archive import rfc3339
from securevault.core.sessions import LoginThrottled, Session
from securevault.core.users import USERNAME_PATTERN
from securevault.server.app import VaultApp
from securevault.server.endpoint import JsonEndpoint
from securevault.server.errors import ApiError, busy
from securevault.server.jsonapi import Reply, parse_json_object, string_field
from securevault.server.state import request_state
from securevault.server.tls import ClientIdentity

log = Logger(namespace="securevault.security")

INVALID_CREDENTIALS = ApiError(401, "invalid_credentials", "Unknown user or wrong password.")
# Logins that may wait for the login pool, per thread of it (besides those
# running): a deeper queue would only answer later than a client waits.
LOGIN_QUEUE_PER_THREAD = 8


def login_threads(threads: int, cores: int | None = None) -> int:
    """The login pool's size for C{--threads}: one per core, at most
    C{threads}, at least one.  Its threads run at the lowest CPU priority,
    so hashing on every core takes only the CPU that the reactor and the
    data pool leave idle; more threads than cores would only queue in the
    kernel, each holding scrypt's 32 MiB.  (Half of C{--threads} held 2-core
    machines to one hash at a time: 8.5 logins/s where the cores allow 17.)"""
    if cores is None:
        cores = os.cpu_count() or 1
    return max(1, min(threads, cores))


def login_capacity(threads: int) -> int:
    """How many logins may be in the login pool at once, running or queued,
    for C{--threads}."""
    return login_threads(threads) * (1 + LOGIN_QUEUE_PER_THREAD)


def loggable(username: str) -> str:
    """A client-supplied name as it may appear in a log line: at most 64
    characters, control characters and lone surrogates escaped, so it can
    neither forge a line nor break a UTF-8 log file."""
    return repr(username[:64])[1:-1]


def certificate_names_user(identity: ClientIdentity, username: str, policy: str) -> bool:
    """Whether the certificate may log in as C{username} under --bind-user."""
    if policy == "cn":
        return identity.common_name == username
    if policy == "san":
        return username in identity.dns_names
    return True


class LoginResource(JsonEndpoint):
    allowedMethods = (b"POST",)

    def __init__(self, app: VaultApp) -> None:
        super().__init__(app)
        self._capacity = login_capacity(app.config.threads)
        self._in_pool = 0  # logins handed to the pool and not yet finished there
        self._lock = threading.Lock()  # taken on the reactor thread and in the pool

    def _admit(self) -> bool:
        """Count one more login into the pool, unless it is full."""
        with self._lock:
            if self._in_pool >= self._capacity:
                return False
            self._in_pool += 1
            return True

    def _finished(self) -> None:
        with self._lock:
            self._in_pool -= 1

    def render_POST(self, request: Request) -> Any:
        app = self.app
        body = parse_json_object(request)
        username = string_field(body, "username")
        password = string_field(body, "password")
        identity = app.identity(request)

        def recorded_name() -> dict[str, str]:
            """In the pool: how logs may name the user tried.  A name that is
            no user's (a password typed into the wrong field, say) is never
            written: only a short keyed digest, equal for equal names."""
            if USERNAME_PATTERN.fullmatch(username) and app.users.user_id(username) is not None:
                return {"user": username}
            return {"user_digest": app.users.name_digest(username)}

        def attempt() -> tuple[int, Session | None, dict[str, str]]:
            """In the login pool: reserve an attempt with the throttle
            (shared by every node), then check the password; a throttled
            attempt costs no scrypt, and a reservation stays as the failure
            unless the login succeeds.  Returns the seconds to wait (0: not
            throttled) and the new session."""
            try:
                try:
                    reservation = app.throttle.reserve(identity.fingerprint, username)
                except LoginThrottled as throttled:
                    return throttled.retry_after, None, recorded_name()
                try:
                    user_id = app.users.verify(username, password)
                except Exception:
                    # Not a wrong password (the store failed): not a failure.
                    with suppress(Exception):
                        app.throttle.release(reservation)
                    raise
                if user_id is None or not certificate_names_user(identity, username, app.config.bind_user):
                    return 0, None, recorded_name()
                app.throttle.release(reservation)
                session = app.sessions.create(username, user_id, identity.fingerprint, identity.not_after_timestamp)
                return 0, session, {"user": username}
            finally:
                # Here, not when the Deferred fires: a client that leaves
                # cancels its Deferred at once, but the work goes on.
                self._finished()

        def answered(result: tuple[int, Session | None, dict[str, str]]) -> Deferred[Reply]:
            wait, session, name = result
            shown = loggable(name["user"]) if "user" in name else f"unknown user {name['user_digest']}"
            if wait:
                log.warn(
                    "Throttled login for {username} from certificate {fingerprint}",
                    username=shown,
                    fingerprint=identity.fingerprint,
                    event_kind="throttled",
                )
                app.refused_event("login_throttled", request, **name)
                raise ApiError(
                    429,
                    "too_many_attempts",
                    "Too many failed logins; try again later.",
                    {b"Retry-After": str(wait).encode("ascii")},
                )
            if session is None:
                log.warn(
                    "Failed login for {username} from certificate {fingerprint}",
                    username=shown,
                    fingerprint=identity.fingerprint,
                    event_kind="login_failed",
                )
                app.refused_event("login_failed", request, **name)
                raise INVALID_CREDENTIALS
            request_state(request).user = username
            log.info("Login by {username}", username=username, event_kind="login")
            reply = Reply(200, {"session_id": session.session_id, "expires_at": rfc3339(app.sessions.expiry(session))})
            return app.record("login", request, user=username).addCallback(lambda _: reply)

        if not self._admit():
            log.warn(
                "Login refused: {count} logins already in the login pool",
                count=self._capacity,
                event_kind="login_busy",
            )
            raise busy()
        try:
            work = app.run_hashing(attempt)
        except BaseException:
            self._finished()
            raise
        return self.respond_later(request, work.addCallback(answered))
