# -*- test-case-name: tests.server.test_resources -*-
"""The contract's error vocabulary: L{ApiError}, and the one mapping from the
vault's own exceptions (store outages, full stores, quota, bad filenames) to
the contract's status and code."""

from __future__ import annotations

from typing import cast

from twisted.logger import Logger
from twisted.python.failure import Failure

from securevault.core.archive import InvalidFilename, QuotaExceeded, StorageFull, StoreUnavailable
from securevault.core.users import UserStoreUnavailable
from securevault.server.auditing import AuditUnavailable
from securevault.stores.blobs import BlobStoreError
from securevault.stores.metadata import MetadataError, MetadataFull

log = Logger(namespace="securevault.web")


class ApiError(Exception):
    """A client fault with the contract's status and error code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def not_found(message: str = "No such resource.") -> ApiError:
    return ApiError(404, "not_found", message)


def invalid_session() -> ApiError:
    return ApiError(
        401,
        "invalid_session",
        "The session is missing, unknown, expired or bound to another certificate.",
        {b"WWW-Authenticate": b"Bearer"},
    )


BUSY_RETRY_SECONDS = 1


def busy(message: str = "The vault is at capacity; try again shortly.") -> ApiError:
    """503 busy with Retry-After: refused at once, nothing done, because a
    bounded resource (connections, the memory budget, the login pool's
    queue) is full."""
    return ApiError(503, "busy", message, {b"Retry-After": str(BUSY_RETRY_SECONDS).encode("ascii")})


def revoked_certificate() -> ApiError:
    """401 invalid_session for a connection whose certificate was revoked
    after its handshake (its sessions end with it)."""
    return ApiError(
        401,
        "invalid_session",
        "The client certificate of this connection has been revoked.",
        {b"WWW-Authenticate": b"Bearer"},
    )


STORE_RETRY_SECONDS = 5


def unavailable(error: BaseException) -> ApiError | None:
    """503 for a store outage (the database or object store unreachable, or
    the audit log unwritable), 507 for a full one; None for anything else (a
    malformed password hash included: that is damaged data, not an outage)."""
    if isinstance(error, UserStoreUnavailable) and isinstance(error.__cause__, MetadataError):
        error = error.__cause__  # seen through the user store: judged by what the store said
    if isinstance(error, (MetadataFull, StorageFull)):
        return ApiError(507, "insufficient_storage", "No space left for the vault's data.")
    if isinstance(error, (StoreUnavailable, MetadataError, BlobStoreError, UserStoreUnavailable, AuditUnavailable)):
        log.warn("A store is unavailable: {error}", error=str(error), event_kind="store_unavailable")
        return ApiError(
            503,
            "unavailable",
            "The vault's storage cannot be reached; try again shortly.",
            {b"Retry-After": str(STORE_RETRY_SECONDS).encode("ascii")},
        )
    return None


def storage_error(failure: Failure) -> ApiError | Exception:
    """The contract's error for a failed store; other failures pass through."""
    error = failure.value
    if isinstance(error, ApiError):
        return error
    if isinstance(error, (QuotaExceeded, StorageFull)):
        return ApiError(507, "insufficient_storage", str(error))
    outage = unavailable(error)
    if outage is not None:
        return outage
    if isinstance(error, InvalidFilename):
        return ApiError(400, "invalid_filename", str(error))
    return cast(Exception, error)
