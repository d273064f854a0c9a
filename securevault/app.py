# -*- test-case-name: tests.test_resources -*-
"""VaultApp: the collaborators every endpoint shares, and authentication."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.logger import Logger
from twisted.web.server import Request

from securevault.audit import AuditLog
from securevault.config import VaultConfig
from securevault.metrics import VaultMetrics
from securevault.jsonapi import ApiError, invalid_session
from securevault.sessions import LoginThrottle, Session, SessionStore
from securevault.storage import SecureFileStorage
from securevault.tls import ClientIdentity, client_identity
from securevault.users import UserStore
from securevault.workers import RunBlocking

log = Logger(namespace="securevault.security")


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

    def authenticate(self, request: Request) -> Session:
        """The caller's session, from the headers only; else 401 invalid_session."""
        session_id = session_id_from_headers(request)
        identity = self.identity(request)
        session = self.sessions.lookup(session_id, identity.fingerprint) if session_id else None
        if session is None:
            log.warn(
                "Refused session for certificate {fingerprint}",
                fingerprint=identity.fingerprint,
                event_kind="refused_session",
            )
            self.record("session_refused", request)
            raise invalid_session()
        setattr(request, "vault_user", session.username)
        return session


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
