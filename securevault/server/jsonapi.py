# -*- test-case-name: tests.server.test_resources -*-
"""The JSON side of the contract: one writer and one failure path.

Every response the vault sends, but the raw download, is written by
L{write_json}; every error goes through L{fail}, which maps it with
L{securevault.server.errors}.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from securevault.server.errors import ApiError, bad_request, unavailable
from securevault.server.state import request_state

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"

log = Logger(namespace="securevault.web")


@dataclass(frozen=True)
class Reply:
    """What an endpoint answers: a status and a JSON body (None: no body)."""

    status: int
    body: Any = None
    headers: dict[bytes, bytes] = field(default_factory=dict)


def encode_json(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# Codes of the contract that http.HTTPStatus does not know (tus checksum).
EXTRA_PHRASES = {460: b"Checksum Mismatch"}


def status_phrase(status: int) -> bytes:
    if status in EXTRA_PHRASES:
        return EXTRA_PHRASES[status]
    return HTTPStatus(status).phrase.encode("ascii")


def write_json(request: Request, status: int, body: Any, headers: dict[bytes, bytes] | None = None) -> None:
    """Answer with a JSON body (or none, for 204) and finish the request."""
    request.setResponseCode(status, status_phrase(status))
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
    request_state(request).request_id = request_id
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


def take_body(request: Request) -> bytes:
    """The buffered body, handed over: the request keeps no copy of it, so
    it is freed as soon as whoever took it is done (a 64 MiB JSON upload is
    not held twice)."""
    content = request.content
    if content is None:
        return b""
    raw = content.getvalue() if isinstance(content, io.BytesIO) else content.read()
    request.content = io.BytesIO()
    return raw


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
