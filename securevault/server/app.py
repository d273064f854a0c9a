# -*- test-case-name: tests.server.test_resources -*-
"""VaultApp: the collaborators every endpoint shares, and authentication."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from securevault.core.sessions import ASK_STORE, LoginThrottle, Session, SessionStore
from securevault.core.users import UserStore
from securevault.server.auditing import AuditTrail
from securevault.server.config import DEFAULT_MEMORY_BUDGET_BYTES, VaultConfig
from securevault.server.errors import ApiError, invalid_session
from securevault.server.limits import ConnectionLimits, MemoryBudget, UploadsInFlight
from securevault.server.metrics import VaultMetrics
from securevault.server.pools import RunBlocking
from securevault.server.revocation import RevocationState
from securevault.server.state import request_state
from securevault.server.tls import ClientIdentity, client_identity
from securevault.staging import UploadStaging
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


class _WorkFailed(Exception):
    """An endpoint's work failed in the pool after the session was found:
    the session still reaches the request's state (the access log names the
    user), then the work's own error goes on."""

    def __init__(self, session: Session, error: Exception) -> None:
        super().__init__(error)
        self.session = session
        self.error = error


@dataclass
class VaultApp:
    """What the resources need; built once by the composition root."""

    config: VaultConfig
    storage: SecureFileStorage
    users: UserStore
    sessions: SessionStore
    throttle: LoginThrottle
    run_blocking: RunBlocking
    # Password hashing (the whole login: throttle, scrypt, session) has its
    # own bounded pool, so that a login storm cannot starve transfers.
    run_hashing: RunBlocking
    clock: Callable[[], float]
    audit_trail: AuditTrail | None = None
    metrics: VaultMetrics | None = None
    stores: Stores | None = None
    # Live sessions, as last counted by the sweep or a metrics scrape (both
    # in a pool thread: the reactor thread never asks the store).
    session_count: int = 0
    # Bytes held for bodies, across all clients (--memory-budget).
    budget: MemoryBudget = field(default_factory=lambda: MemoryBudget(DEFAULT_MEMORY_BUDGET_BYTES))
    connections: ConnectionLimits | None = None
    # The CRLs in force (replaced on reload; the TLS context shares it).
    revocations: RevocationState = field(default_factory=RevocationState)
    # Raw uploads streaming on this node, per owner (GET /usage).
    uploads: UploadsInFlight = field(default_factory=UploadsInFlight)
    # The reactor's callFromThread: a pool call that streams a body resumes
    # reading it without returning first (None where the pool is inline).
    call_from_thread: Callable[[Callable[[], None]], object] | None = None

    @cached_property
    def staging(self) -> UploadStaging:
        """Resumable uploads (tus), over the same stores."""
        return UploadStaging(self.storage, self.config.upload_expiry)

    def record(self, event: str, request: Request | None = None, **fields: Any) -> Deferred[None]:
        """A security event (login, logout, upload, download, delete,
        integrity_error): fires once its record is synced, so the answer
        waits for it; fails with L{AuditUnavailable} (503) when it cannot be
        written.  No secrets in C{fields}."""
        trail = self.audit_trail
        if trail is None:
            if self.metrics is not None:
                self.metrics.count_event(event)
            return succeed(None)
        return trail.security(event, **self._request_fields(request, fields))

    def refused_event(self, reason: str, request: Request | None = None, **fields: Any) -> None:
        """A refusal (session_refused, login_failed, login_throttled): its
        rate is the client's choice, so it is only counted, and written
        coalesced per certificate, reason and second.  No secrets."""
        fields = self._request_fields(request, fields)
        self.refusal(reason, fields.pop("fingerprint", None), **fields)

    def refusal(self, reason: str, fingerprint: str | None, **fields: Any) -> None:
        """A client turned away (a limit, a bad session, a wrong password):
        counted and coalesced, never queued as work per event."""
        trail = self.audit_trail
        if trail is None:
            if self.metrics is not None:
                self.metrics.count_event(reason)
            return
        trail.refusal(reason, fingerprint, **fields)

    def _request_fields(self, request: Request | None, fields: dict[str, Any]) -> dict[str, Any]:
        """C{fields} plus the client certificate's fingerprint and the peer."""
        if request is not None:
            identity = request_state(request).identity
            if identity is not None:
                fields.setdefault("fingerprint", identity.fingerprint)
            peer = request.getClientAddress()
            fields.setdefault("peer", getattr(peer, "host", None))
        return fields

    def identity(self, request: Request) -> ClientIdentity:
        """The verified client certificate; mutual TLS guarantees one."""
        state = request_state(request)
        if state.identity is None:
            identity = client_identity(request.transport)
            if identity is None:
                raise ApiError(403, "forbidden", "A verified client certificate is required.")
            state.identity = identity
        return state.identity

    def authenticate(self, request: Request) -> Deferred[Session]:
        """The caller's session; else a failure with 401 invalid_session."""
        return self.with_session(request, None).addCallback(lambda found: found[0])

    def with_session(self, request: Request, work: Callable[[Session], R] | None) -> Deferred[tuple[Session, R | None]]:
        """The one session gate every endpoint but the public ones goes
        through.  Finds the caller's session from the headers (never the body),
        then runs C{work(session)} in the pool, in the same pool call as the
        lookup where the session lives only in the store: one trip, not two.
        A session found once is kept in the request's state, so a request
        checked before its body arrived is not looked up again.  401
        invalid_session, audited, when there is none."""
        state = request_state(request)
        lookup = self.sessions.lookup
        known = state.session
        if known is None:
            try:
                identity, session_id = self._credentials(request)
            except ApiError as error:
                return fail(error)
        mirrored = known is not None or self.sessions.mirrored

        def in_pool() -> tuple[Session, R | None]:
            session = known if known is not None else lookup(session_id, identity.fingerprint)
            if session is None:
                raise SessionRefused()
            try:
                return session, (work(session) if work is not None else None)
            except Exception as error:
                raise _WorkFailed(session, error) from error

        def found(result: tuple[Session, R | None]) -> tuple[Session, R | None]:
            state.session = result[0]
            state.user = result[0].username
            return result

        def refused(failure: Failure) -> tuple[Session, R | None]:
            if failure.check(_WorkFailed):
                # The session was found; the endpoint's own work failed.
                wrapped = cast(_WorkFailed, failure.value)
                found((wrapped.session, None))
                raise wrapped.error
            failure.trap(SessionRefused)
            raise self.refused(request)

        if mirrored:  # the session is in memory: look it up here, no trip to the pool for it
            local = known if known is not None else self.sessions.lookup_local(session_id, identity.fingerprint)
            if local is None:
                return fail(self.refused(request))
            if local is not ASK_STORE:  # else a shared mirror could not decide: the store does, below
                session = cast(Session, local)
                found((session, None))
                if work is None:
                    return succeed((session, None))
                return self.run_blocking(work, session).addCallback(lambda result: (session, result))
        return self.run_blocking(in_pool).addCallbacks(found, refused)

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
        self.refused_event("session_refused", request)
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
