# -*- test-case-name: tests.server.test_resources -*-
"""VaultApp: the collaborators every endpoint shares, and authentication."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from securevault.core.audit import AuditLog
from securevault.core.sessions import LoginThrottle, Session, SessionStore
from securevault.core.users import UserStore
from securevault.server.config import VaultConfig
from securevault.server.errors import ApiError, invalid_session
from securevault.server.metrics import VaultMetrics
from securevault.server.tls import ClientIdentity, client_identity
from securevault.server.workers import RunBlocking
from securevault.storage import SecureFileStorage

if TYPE_CHECKING:
    from securevault.stores.backends import Stores

log = Logger(namespace="securevault.security")
R = TypeVar("R")


class SessionRefused(ApiError):
    """401 invalid_session, raised in the pool; the reactor side logs it
    with L{VaultApp.refused}."""

    def __init__(self) -> None:
        error = invalid_session()
        super().__init__(error.status, error.code, error.message, error.headers)


@dataclass
class VaultApp:
    """What the resources need; built once by the composition root."""

    config: VaultConfig
    storage: SecureFileStorage
    users: UserStore
    sessions: SessionStore
    throttle: LoginThrottle
    run_blocking: RunBlocking
    clock: Callable[[], float]
    audit: AuditLog | None = None
    metrics: VaultMetrics | None = None
    stores: Stores | None = None
    # Live sessions, as last counted by the sweep or a metrics scrape (both
    # in a pool thread: the reactor thread never asks the store).
    session_count: int = 0

    def record(self, event: str, request: Request | None = None, **fields: Any) -> None:
        """Append a security event to the audit log, in the pool; no secrets."""
        if self.metrics is not None:
            self.metrics.count_event(event)
        if self.audit is None:
            return
        if request is not None:
            identity = getattr(request, "client_identity", None)
            if identity is not None:
                fields.setdefault("fingerprint", identity.fingerprint)
            peer = request.getClientAddress()
            fields.setdefault("peer", getattr(peer, "host", None))
        self.run_blocking(self.audit.append, event, **fields).addErrback(
            lambda failure: log.failure("Could not write the audit log", failure)
        )

    def identity(self, request: Request) -> ClientIdentity:
        """The verified client certificate; mutual TLS guarantees one."""
        identity = getattr(request, "client_identity", None)
        if identity is None:
            # A connection's certificate never changes (no renegotiation):
            # parse it once per connection, not once per request.
            channel = getattr(request, "channel", None)
            identity = getattr(channel, "vault_client_identity", None)
            if identity is None:
                identity = client_identity(request.transport)
                if identity is None:
                    raise ApiError(403, "forbidden", "A verified client certificate is required.")
                if channel is not None:
                    setattr(channel, "vault_client_identity", identity)
            setattr(request, "client_identity", identity)
        return identity

    def authenticate(self, request: Request) -> Deferred[Session]:
        """The caller's session, from the headers only; else a failure with
        401 invalid_session.  The lookup runs in the pool: sessions live in
        the metadata store, shared by every node."""
        try:
            identity, session_id = self._credentials(request)
        except ApiError as error:
            return fail(error)

        def found(session: Session | None) -> Session:
            if session is None:
                raise self.refused(request)
            setattr(request, "vault_user", session.username)
            return session

        if self.sessions.mirrored:  # one node: in memory, no trip to the pool
            return maybeDeferred(found, self.sessions.lookup_local(session_id, identity.fingerprint))
        return self.run_blocking(self.sessions.lookup, session_id, identity.fingerprint).addCallback(found)

    def with_session(self, request: Request, work: Callable[[Session], R]) -> Deferred[R]:
        """C{work(session)} in the pool, in the same pool call that finds the
        caller's session: one trip to the pool, not two, for the requests
        that need nothing else first.  401 invalid_session without one."""
        try:
            identity, session_id = self._credentials(request)
        except ApiError as error:
            return fail(error)
        if self.sessions.mirrored:
            return self.authenticate(request).addCallback(lambda session: self.run_blocking(work, session))
        lookup = self.sessions.lookup

        def in_pool() -> tuple[Session, R]:
            session = lookup(session_id, identity.fingerprint)
            if session is None:
                raise SessionRefused()
            return session, work(session)

        def done(result: tuple[Session, R]) -> R:
            setattr(request, "vault_user", result[0].username)
            return result[1]

        def refused(failure: Failure) -> R:
            failure.trap(SessionRefused)
            raise self.refused(request)

        return self.run_blocking(in_pool).addCallbacks(done, refused)

    def _credentials(self, request: Request) -> tuple[ClientIdentity, str]:
        """The certificate and the session id the request presents; raises
        the 403 or 401 to answer when either is missing."""
        identity = self.identity(request)
        session_id = session_id_from_headers(request)
        if not session_id:
            raise self.refused(request)
        return identity, session_id

    def refused(self, request: Request) -> ApiError:
        """Log and audit a refused session; the 401 to answer with."""
        log.warn(
            "Refused session for certificate {fingerprint}",
            fingerprint=self.identity(request).fingerprint,
            event_kind="refused_session",
        )
        self.record("session_refused", request)
        return invalid_session()


def session_id_from_headers(request: Request) -> str | None:
    """C{Authorization: Bearer <id>} or C{X-Session-ID: <id>}; never the URL
    or a cookie."""
    authorization = request.getHeader(b"authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        raw = value.strip()
    else:
        raw = (request.getHeader(b"x-session-id") or b"").strip()
    try:
        return raw.decode("ascii") or None
    except UnicodeDecodeError:
        return None
