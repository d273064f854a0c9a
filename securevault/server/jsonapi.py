# -*- test-case-name: tests.test_resources -*-
"""The JSON side of the contract: one writer, one error mapping, one base.

Every response the vault sends, but the raw download, is written by
L{write_json}; every error goes through L{fail}.
"""

from __future__ import annotations

import json
import uuid
from http import HTTPStatus
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"

from securevault.blobs import BlobStoreError
from securevault.metadata import MetadataError, MetadataFull
from securevault.storage import InvalidFilename, QuotaExceeded, StorageFull, StoreUnavailable

if TYPE_CHECKING:
    from securevault.app import VaultApp
    from securevault.sessions import Session

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


@dataclass(frozen=True)
class Reply:
    """What an endpoint answers: a status and a JSON body (None: no body)."""

    status: int
    body: Any = None
    headers: dict[bytes, bytes] = field(default_factory=dict)


def encode_json(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_json(request: Request, status: int, body: Any, headers: dict[bytes, bytes] | None = None) -> None:
    """Answer with a JSON body (or none, for 204) and finish the request."""
    request.setResponseCode(status, HTTPStatus(status).phrase.encode("ascii"))
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    if body is None:  # 204: no body, no Content-Length (RFC 9110 §8.6)
        request.responseHeaders.removeHeader(b"content-type")
        request.finish()
        return
    payload = encode_json(body)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"content-length", str(len(payload)).encode("ascii"))
    if request.method != b"HEAD":
        request.write(payload)
    request.finish()


def error_body(error: ApiError) -> dict[str, str]:
    return {"error": error.code, "message": error.message}


def internal_error(request: Request, reason: Failure | BaseException | None) -> None:
    """Log a failure with a fresh request id and answer 500 with that id only."""
    request_id = uuid.uuid4().hex
    failure = reason if isinstance(reason, Failure) else Failure(reason) if reason else Failure()
    log.failure("Internal error while serving request {request_id}", failure, request_id=request_id)
    setattr(request, "request_id", request_id)
    write_json(
        request,
        500,
        {"error": "internal_error", "message": "The server failed to answer this request.", "request_id": request_id},
    )


def integrity_failure(request: Request, archive_id: str) -> None:
    """An archive failed authentication: logged, answered 500 with a request id."""
    request_id = uuid.uuid4().hex
    log.error(
        "Archive {archive_id} fails authentication (request {request_id})",
        archive_id=archive_id,
        request_id=request_id,
    )
    write_json(
        request,
        500,
        {
            "error": "integrity_error",
            "message": "The stored archive failed authentication; no data was sent.",
            "request_id": request_id,
        },
    )


STORE_RETRY_SECONDS = 5


def unavailable(error: BaseException) -> ApiError | None:
    """503 for a store outage (the database or object store unreachable),
    507 for a full one; None for anything else."""
    if isinstance(error, (MetadataFull, StorageFull)):
        return ApiError(507, "insufficient_storage", "No space left for the vault's data.")
    if isinstance(error, (StoreUnavailable, MetadataError, BlobStoreError)):
        log.warn("A store is unavailable: {error}", error=str(error), event_kind="store_unavailable")
        return ApiError(
            503,
            "unavailable",
            "The vault's storage cannot be reached; try again shortly.",
            {b"Retry-After": str(STORE_RETRY_SECONDS).encode("ascii")},
        )
    return None


def fail(request: Request, reason: Failure | BaseException) -> None:
    """The one error mapping: L{ApiError} to its status, a store outage to
    503, anything else to a logged 500."""
    error = reason.value if isinstance(reason, Failure) else reason
    if not isinstance(error, ApiError):
        error = unavailable(error) or error
    if isinstance(error, ApiError):
        write_json(request, error.status, error_body(error), error.headers)
    else:
        internal_error(request, reason)


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


def parse_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, else 400 bad_request."""
    content = request.content
    return decode_json_object(content.read() if content is not None else b"")


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """C{raw} as a JSON object, else 400 bad_request."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad_request("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.")
    return body


def string_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise bad_request(f"The field {name!r} is missing or not a string.")
    return value


class JsonEndpoint(Resource):
    """Base of every endpoint: method check, error mapping, async replies."""

    isLeaf = True
    allowedMethods: tuple[bytes, ...] = ()

    def __init__(self, app: "VaultApp") -> None:
        super().__init__()
        self.app = app

    def render(self, request: Request) -> Any:
        if request.postpath:  # paths match exactly: /health/x and /login/ are unknown
            fail(request, not_found())
            return NOT_DONE_YET
        if request.method not in self.allowedMethods:
            request.setHeader(b"allow", b", ".join(self.allowedMethods))
            fail(request, ApiError(405, "method_not_allowed", "Method not allowed."))
            return NOT_DONE_YET
        try:
            return super().render(request)
        except ApiError as error:  # cheap synchronous validation
            fail(request, error)
            return NOT_DONE_YET

    def authenticated(self, request: Request, then: "Callable[[Session], Reply | Deferred[Reply]]") -> Any:
        """Answer with C{then(session)} once the caller's session is found;
        401 invalid_session when there is none."""
        return self.respond_later(request, self.app.authenticate(request).addCallback(then))

    def respond_later(self, request: Request, work: "Deferred[Reply]") -> Any:
        """Finish the request from C{work}; a client that leaves cancels it."""
        lost: list[Failure] = []

        def left(reason: Failure) -> None:
            lost.append(reason)
            work.cancel()

        request.notifyFinish().addErrback(left)

        def done(reply: Reply) -> None:
            if not lost:
                write_json(request, reply.status, reply.body, reply.headers)

        def failed(reason: Failure) -> None:
            if not lost and not reason.check(CancelledError):
                fail(request, reason)

        work.addCallbacks(done, failed)
        return NOT_DONE_YET
