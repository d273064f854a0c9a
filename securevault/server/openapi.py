# -*- test-case-name: tests.server.test_openapi -*-
"""The OpenAPI 3.1 description of the HTTP contract, served at GET /openapi.json.

One table, L{OPERATIONS}, describes every route of
L{securevault.server.web.build_root} and every method its resource allows:
what it takes, what it answers, and which error codes it may answer with.
L{build_document} turns it into the document.  C{tests.server.test_openapi}
keeps the table and the code from drifting apart (routes, methods, error
codes), and a fuzzer (C{tests/fuzz/run_schemathesis.py}) checks a live
daemon's answers against the document.

Error codes that the pipeline may send for any request (a malformed request,
a head over 16 KiB, a body over the limit or too slow, a full server, a
revoked certificate, an internal error) are listed on every operation; the
rest per operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Every error code the server answers with, and its status.
ERROR_STATUS: dict[str, int] = {
    "bad_request": 400,
    "invalid_filename": 400,
    "invalid_session": 401,
    "invalid_credentials": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "too_large": 413,
    "unsupported_media_type": 415,
    "range_not_satisfiable": 416,
    "too_many_attempts": 429,
    "header_too_large": 431,
    "internal_error": 500,
    "integrity_error": 500,
    "busy": 503,
    "unavailable": 503,
    "insufficient_storage": 507,
    "offset_mismatch": 409,
    "unsupported_version": 412,
    "checksum_mismatch": 460,
}

# What any request may be answered with, whatever its endpoint: framing and
# limits in the pipeline, a certificate revoked since the handshake, a bug.
# (405 method_not_allowed is for the methods a path does not list, 404
# not_found for the paths not listed: neither belongs to an operation.)
PIPELINE_ERRORS = ("bad_request", "invalid_session", "too_large", "header_too_large", "internal_error", "busy")
# Bodies are timed while they arrive (--min-body-rate).
BODY_ERRORS = ("request_timeout",)
# An endpoint that finds a session, or reads or writes a store.
SESSION_ERRORS = ("invalid_session", "forbidden", "unavailable", "insufficient_storage")

HEADER_DOCS: dict[str, tuple[str, dict[str, Any]]] = {
    "Retry-After": ("Seconds to wait before trying again.", {"type": "string", "pattern": "^[0-9]+$"}),
    "WWW-Authenticate": ("Always `Bearer`.", {"type": "string"}),
    "Allow": ("The methods the path allows.", {"type": "string"}),
    "Content-Range": (
        "`bytes a-b/size` on a 206; `bytes */size` on a 416.",
        {"type": "string", "pattern": r"^bytes ([0-9]+-[0-9]+|\*)/[0-9]+$"},
    ),
    "ETag": ("The file's SHA-256 in hex, quoted: a strong validator for If-Range.", {"type": "string"}),
    "Accept-Ranges": ("Always `bytes`.", {"type": "string", "enum": ["bytes"]}),
    "Content-Disposition": ("`attachment; filename*=UTF-8''<percent-encoded name>`.", {"type": "string"}),
    "Tus-Resumable": ("Always `1.0.0`.", {"type": "string", "enum": ["1.0.0"]}),
    "Tus-Version": ("The tus versions served: `1.0.0`.", {"type": "string"}),
    "Tus-Extension": ("`creation,termination,expiration,checksum`.", {"type": "string"}),
    "Tus-Max-Size": ("--max-upload-size, in bytes.", {"type": "string", "pattern": "^[0-9]+$"}),
    "Tus-Checksum-Algorithm": ("`sha1,sha256`.", {"type": "string"}),
    "Location": ("The new upload: `/uploads/<id>`.", {"type": "string"}),
    "Upload-Offset": ("Bytes received and kept so far.", {"type": "string", "pattern": "^[0-9]+$"}),
    "Upload-Length": ("The upload's declared length.", {"type": "string", "pattern": "^[0-9]+$"}),
    "Upload-Expires": ("When the upload is removed without progress (HTTP date).", {"type": "string"}),
    "Upload-Archive-Id": ("The archive the complete upload became.", {"type": "string"}),
}

# Headers an error answer carries, by error code.
ERROR_HEADERS: dict[str, tuple[str, ...]] = {
    "unsupported_version": ("Tus-Version",),
    "invalid_session": ("WWW-Authenticate",),
    "too_many_attempts": ("Retry-After",),
    "busy": ("Retry-After",),
    "unavailable": ("Retry-After",),
    "range_not_satisfiable": ("Content-Range",),
}

ERROR_DESCRIPTIONS: dict[str, str] = {
    "bad_request": "The request is malformed: not valid HTTP/1.1, or a body or parameter of the wrong shape.",
    "invalid_filename": "The filename is empty, over 255 UTF-8 bytes, `.` or `..`, or holds `/`, `\\` or a control character.",
    "invalid_session": "The session is missing, unknown, expired, ended or bound to another certificate, or this connection's certificate was revoked.",
    "invalid_credentials": "Unknown user or wrong password.",
    "forbidden": "No verified client certificate (mutual TLS makes this unreachable in practice).",
    "not_found": "No such path, or no such archive for this user.",
    "method_not_allowed": "The path does not allow this method (the `Allow` header lists those it does).",
    "request_timeout": "The body arrived slower than --min-body-rate; the connection is closed.",
    "too_large": "The body is over the endpoint's limit; refused before it is read when Content-Length says so.",
    "unsupported_media_type": "An upload that is neither application/json nor application/octet-stream.",
    "range_not_satisfiable": "The Range does not overlap the file.",
    "too_many_attempts": "Too many failed logins from this certificate (for this username, or in all).",
    "header_too_large": "The request head is over 16 KiB; the connection is closed.",
    "internal_error": "A bug; the body carries a `request_id` that the server's log names too.",
    "integrity_error": "The archive fails authentication; not one byte of it is sent.",
    "busy": "A bounded resource is full (connections, the memory budget, the login pool).",
    "unavailable": "A store (metadata, blobs, the audit log) cannot be reached.",
    "insufficient_storage": "The quota or the disk is full; nothing partial is kept.",
    "offset_mismatch": "A PATCH whose Upload-Offset is not the upload's current offset (HEAD tells it).",
    "unsupported_version": "A tus request without `Tus-Resumable: 1.0.0`.",
    "checksum_mismatch": "A PATCH body that does not match its Upload-Checksum; it was dropped.",
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


# API.md's filename rule, as far as JSON Schema can say it (the limit is 255
# UTF-8 bytes, which maxLength, counting characters, only approximates).
FILENAME: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "pattern": r"^[^/\\\u0000-\u001f\u007f-\u009f]+$",
    "not": {"enum": [".", ".."]},
    "description": "1 to 255 UTF-8 bytes; not `.` or `..`; no `/`, `\\` or control character (Unicode Cc).",
}

# What a listing entry and a JSON download both say of an archive.
ARCHIVE_FIELDS: dict[str, Any] = {
    "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    "filename": {"type": "string"},
    "size": {"type": "integer", "minimum": 0},
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "enum": sorted(ERROR_STATUS)},
            "message": {"type": "string"},
            "request_id": {"type": "string", "description": "On every 500: the id the server's log names."},
        },
    },
    "Archive": {
        "type": "object",
        "required": [*ARCHIVE_FIELDS, "created_at"],
        "properties": {**ARCHIVE_FIELDS, "created_at": {"type": "string", "format": "date-time"}},
    },
    "FileList": {
        "type": "object",
        "required": ["files"],
        "properties": {"files": {"type": "array", "items": _ref("Archive")}},
    },
    "DownloadJson": {
        "type": "object",
        "required": [*ARCHIVE_FIELDS, "content"],
        "properties": {**ARCHIVE_FIELDS, "content": {"type": "string", "contentEncoding": "base64"}},
    },
    "LoginRequest": {
        "type": "object",
        "required": ["username", "password"],
        "properties": {"username": {"type": "string"}, "password": {"type": "string"}},
    },
    "LoginReply": {
        "type": "object",
        "required": ["session_id", "expires_at"],
        "properties": {
            "session_id": {"type": "string", "format": "uuid"},
            "expires_at": {"type": "string", "format": "date-time"},
        },
    },
    "JsonUpload": {
        "type": "object",
        "required": ["filename", "content"],
        "properties": {
            "filename": FILENAME,
            "content": {"type": "string", "contentEncoding": "base64", "description": "The file's bytes, base64."},
        },
    },
    "DeleteRequest": {
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": "string"}},
    },
    "Usage": {
        "type": "object",
        "required": ["archives", "stored_bytes", "quota_bytes", "uploads_in_progress"],
        "properties": {
            "archives": {"type": "integer", "minimum": 0},
            "stored_bytes": {"type": "integer", "minimum": 0, "description": "Encrypted bytes, as the quota counts."},
            "quota_bytes": {"type": ["integer", "null"], "minimum": 0},
            "uploads_in_progress": {"type": "integer", "minimum": 0},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "version"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}, "version": {"type": "string"}},
    },
    "OpenApiDocument": {"type": "object", "required": ["openapi", "paths"]},
    "UploadCreated": {
        "type": "object",
        "description": "The new upload (tus clients read Location); a length-0 upload is its archive at once.",
        "properties": {
            "upload_id": {"type": "string"},
            "length": {"type": "integer", "minimum": 0},
            "offset": {"type": "integer", "minimum": 0},
            "archive": _ref("Archive"),
        },
    },
}


@dataclass(frozen=True)
class Success:
    """One success answer: its status, what it means, its body."""

    status: int
    description: str
    # media type → schema; empty: no body.
    content: dict[str, dict[str, Any]] = field(default_factory=dict)
    headers: tuple[str, ...] = ()
    # OpenAPI links: where the answer's fields lead (for a stateful fuzzer).
    links: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """One method of one path."""

    summary: str
    description: str
    successes: tuple[Success, ...]
    errors: tuple[str, ...]
    public: bool = False
    parameters: tuple[dict[str, Any], ...] = ()
    # media type → schema.
    request_body: dict[str, dict[str, Any]] | None = None
    body_required: bool = False


JSON = "application/json"
OCTETS = "application/octet-stream"


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": {"type": "string"}}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


def _header(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _head_of(get: Operation) -> Operation:
    """HEAD: GET's answers without their bodies."""
    return Operation(
        summary=get.summary + " (headers only)",
        description="As GET, without the body.",
        successes=tuple(Success(s.status, s.description, {}, s.headers) for s in get.successes),
        errors=get.errors,
        public=get.public,
        parameters=get.parameters,
    )


_HEALTH = Operation(
    summary="Liveness",
    description="No session needed (mutual TLS still is).",
    successes=(Success(200, "The daemon is up.", {JSON: _ref("Health")}),),
    errors=PIPELINE_ERRORS,
    public=True,
)
_OPENAPI = Operation(
    summary="This document",
    description="No session needed (mutual TLS still is).",
    successes=(Success(200, "The OpenAPI 3.1 document of this server.", {JSON: _ref("OpenApiDocument")}),),
    errors=PIPELINE_ERRORS,
    public=True,
)
_LIST = Operation(
    summary="The caller's archives, newest first",
    description="Only the caller's own archives.",
    successes=(Success(200, "The listing.", {JSON: _ref("FileList")}),),
    errors=PIPELINE_ERRORS + SESSION_ERRORS,
)
_USAGE = Operation(
    summary="What the caller keeps, against the quota",
    description="`stored_bytes` counts encrypted bytes as the quota does; `quota_bytes` is null without "
    "`--quota`; `uploads_in_progress` counts raw uploads streaming on the node that answers.",
    successes=(Success(200, "The caller's usage.", {JSON: _ref("Usage")}),),
    errors=PIPELINE_ERRORS + SESSION_ERRORS,
)

TUS_HEADERS = ("Tus-Resumable",)
TUS_ERRORS = ("unsupported_version",)
_TUS_OPTIONS = Operation(
    summary="What this tus server supports",
    description="No session needed (mutual TLS still is).",
    successes=(
        Success(
            204,
            "The tus capabilities.",
            headers=("Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size", "Tus-Checksum-Algorithm"),
        ),
    ),
    errors=PIPELINE_ERRORS,
    public=True,
)
_UPLOAD_ID = _path("id", "The upload's id, from the Location of its POST.")
_TUS_OPTIONS_ITEM = Operation(
    _TUS_OPTIONS.summary,
    _TUS_OPTIONS.description,
    _TUS_OPTIONS.successes,
    _TUS_OPTIONS.errors,
    public=True,
    parameters=(_UPLOAD_ID,),
)
_TUS_RESUMABLE = _header("Tus-Resumable", "Must be `1.0.0`.")

# path → method (lowercase) → operation: the one description of the API.
OPERATIONS: dict[str, dict[str, Operation]] = {
    "/login": {
        "post": Operation(
            summary="Log in: username and password over a verified client certificate",
            description="Creates a session bound to this client certificate. After 5 failed attempts from one "
            "certificate for one username, or 20 from one certificate in all, within 5 minutes: 429.",
            successes=(Success(200, "A new session.", {JSON: _ref("LoginReply")}),),
            errors=PIPELINE_ERRORS + BODY_ERRORS + ("invalid_credentials", "too_many_attempts") + SESSION_ERRORS,
            public=True,
            request_body={JSON: _ref("LoginRequest")},
            body_required=True,
        )
    },
    "/logout": {
        "post": Operation(
            summary="End the caller's session",
            description="The session ends on every node.",
            successes=(Success(204, "The session is gone."),),
            errors=PIPELINE_ERRORS + BODY_ERRORS + SESSION_ERRORS,
        )
    },
    "/upload-file": {
        "post": Operation(
            summary="Store one file as one encrypted archive",
            description="JSON (`filename`, base64 `content`; up to --max-json-body) or a raw stream "
            "(application/octet-stream; name in X-Filename, percent-encoded UTF-8, or the `filename` query "
            "parameter; up to --max-upload-size and the quota).",
            successes=(
                Success(
                    201,
                    "Stored.",
                    {JSON: _ref("Archive")},
                    links={
                        "DownloadArchive": {
                            "operationId": "get_download_file",
                            "parameters": {"id": "$response.body#/id"},
                        },
                        "DeleteArchive": {
                            "operationId": "post_delete_file",
                            "requestBody": {"id": "$response.body#/id"},
                        },
                    },
                ),
            ),
            errors=PIPELINE_ERRORS
            + BODY_ERRORS
            + SESSION_ERRORS
            + ("invalid_filename", "unsupported_media_type", "insufficient_storage"),
            parameters=(
                _header("X-Filename", "A raw upload's filename, percent-encoded UTF-8."),
                _query("filename", "A raw upload's filename, when X-Filename is absent."),
            ),
            request_body={
                JSON: _ref("JsonUpload"),
                OCTETS: {"type": "string", "format": "binary"},
            },
            body_required=True,
        )
    },
    "/get-files": {"get": _LIST, "head": _head_of(_LIST)},
    "/download-file": {
        "get": Operation(
            summary="One archive's original bytes",
            description="Exactly one of `id` and `filename` (the newest archive of that name). JSON with base64 "
            "content by default; the raw bytes with `Accept: application/octet-stream`, where one Range is "
            "answered 206 (several: 200, the whole file) and If-Range with another ETag gives the whole file.",
            successes=(
                Success(
                    200,
                    "The whole file.",
                    {JSON: _ref("DownloadJson"), OCTETS: {"type": "string", "format": "binary"}},
                    ("ETag", "Accept-Ranges", "Content-Disposition"),
                ),
                Success(
                    206,
                    "The range asked for (raw form only).",
                    {OCTETS: {"type": "string", "format": "binary"}},
                    ("Content-Range", "ETag", "Accept-Ranges", "Content-Disposition"),
                ),
            ),
            errors=PIPELINE_ERRORS + SESSION_ERRORS + ("not_found", "range_not_satisfiable", "integrity_error"),
            parameters=(
                _query("id", "The archive's id."),
                _query("filename", "A filename: its newest archive."),
                _header(
                    "Accept",
                    "`application/octet-stream` for the raw bytes; anything else: JSON.",
                ),
                _header("Range", "One byte range (`bytes=a-b`, `bytes=a-`, `bytes=-n`); raw form only."),
                _header("If-Range", "The ETag the client holds: a Range applies only if it still matches."),
            ),
        )
    },
    "/delete-file": {
        "post": Operation(
            summary="Remove one of the caller's archives",
            description="Another user's archive is indistinguishable from a missing one.",
            successes=(Success(204, "Deleted."),),
            errors=PIPELINE_ERRORS + BODY_ERRORS + SESSION_ERRORS + ("not_found",),
            request_body={JSON: _ref("DeleteRequest")},
            body_required=True,
        )
    },
    "/usage": {"get": _USAGE, "head": _head_of(_USAGE)},
    "/uploads/": {
        "options": _TUS_OPTIONS,
        "post": Operation(
            summary="Create a resumable upload (tus 1.0.0 creation)",
            description="`Upload-Length` and `Upload-Metadata` (`filename` base64). The whole declared length "
            "counts against the quota from now on. A length-0 upload is its (empty) archive at once.",
            successes=(
                Success(201, "Created.", {JSON: _ref("UploadCreated")}, ("Location", "Upload-Expires") + TUS_HEADERS),
            ),
            errors=PIPELINE_ERRORS + SESSION_ERRORS + TUS_ERRORS + ("invalid_filename", "insufficient_storage"),
            parameters=(
                _TUS_RESUMABLE,
                _header("Upload-Length", "The file's length in bytes."),
                _header("Upload-Metadata", "Comma-separated `key base64(value)` pairs; `filename` is required."),
            ),
        ),
    },
    "/uploads/{id}": {
        "head": Operation(
            summary="Where an upload stands",
            description="Its offset, length and expiry; another user's upload is 404.",
            successes=(
                Success(200, "The upload.", headers=("Upload-Offset", "Upload-Length", "Upload-Expires") + TUS_HEADERS),
            ),
            errors=PIPELINE_ERRORS + SESSION_ERRORS + TUS_ERRORS + ("not_found",),
            parameters=(_UPLOAD_ID, _TUS_RESUMABLE),
        ),
        "patch": Operation(
            summary="Send the next bytes of an upload",
            description="`Content-Type: application/offset+octet-stream` at the current `Upload-Offset`, with "
            "an optional `Upload-Checksum` (sha1 or sha256). The last byte turns the upload into an archive, "
            "named by `Upload-Archive-Id`.",
            successes=(
                Success(204, "Kept.", headers=("Upload-Offset", "Upload-Expires", "Upload-Archive-Id") + TUS_HEADERS),
            ),
            errors=PIPELINE_ERRORS
            + BODY_ERRORS
            + SESSION_ERRORS
            + TUS_ERRORS
            + ("not_found", "offset_mismatch", "checksum_mismatch", "unsupported_media_type", "insufficient_storage"),
            parameters=(
                _UPLOAD_ID,
                _TUS_RESUMABLE,
                _header("Upload-Offset", "The upload's current offset."),
                _header("Upload-Checksum", "`sha1 <base64>` or `sha256 <base64>` of this body."),
            ),
            request_body={"application/offset+octet-stream": {"type": "string", "format": "binary"}},
        ),
        "delete": Operation(
            summary="Abandon an upload (tus termination)",
            description="Its bytes are removed; the id is 404 from then on.",
            successes=(Success(204, "Removed.", headers=TUS_HEADERS),),
            errors=PIPELINE_ERRORS + SESSION_ERRORS + TUS_ERRORS + ("not_found",),
            parameters=(_UPLOAD_ID, _TUS_RESUMABLE),
        ),
        "options": _TUS_OPTIONS_ITEM,
    },
    "/health": {"get": _HEALTH, "head": _head_of(_HEALTH)},
    "/openapi.json": {"get": _OPENAPI, "head": _head_of(_OPENAPI)},
}


def error_codes() -> set[str]:
    """Every error code the document names."""
    return set(ERROR_STATUS)


def _error_response(codes: list[str], with_body: bool) -> dict[str, Any]:
    """One status's error answer: the JSON error object, its code one of
    C{codes}, and the headers those codes carry."""
    status_schema = {
        "allOf": [
            _ref("Error"),
            {"type": "object", "properties": {"error": {"type": "string", "enum": codes}}},
        ]
    }
    response: dict[str, Any] = {"description": " ".join(f"`{code}`: {ERROR_DESCRIPTIONS[code]}" for code in codes)}
    if with_body:
        response["content"] = {JSON: {"schema": status_schema}}
    headers = sorted({name for code in codes for name in ERROR_HEADERS.get(code, ())})
    if headers:
        response["headers"] = {name: _header_doc(name) for name in headers}
    return response


def _header_doc(name: str) -> dict[str, Any]:
    description, schema = HEADER_DOCS[name]
    return {"description": description, "schema": schema}


def _operation(path: str, method: str, operation: Operation) -> dict[str, Any]:
    with_body = method != "head"
    responses: dict[str, Any] = {}
    for success in operation.successes:
        answer: dict[str, Any] = {"description": success.description}
        if success.content and with_body:
            answer["content"] = {media: {"schema": schema} for media, schema in success.content.items()}
        if success.headers:
            answer["headers"] = {name: _header_doc(name) for name in success.headers}
        if success.links:
            answer["links"] = success.links
        responses[str(success.status)] = answer
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(operation.errors):
        by_status.setdefault(ERROR_STATUS[code], []).append(code)
    for status in sorted(by_status):
        responses[str(status)] = _error_response(sorted(by_status[status]), with_body)
    document: dict[str, Any] = {
        "operationId": method + path.replace("/", "_").replace("-", "_").replace(".", "_"),
        "summary": operation.summary,
        "description": operation.description,
        "responses": responses,
    }
    if operation.public:
        document["security"] = [{"mutualTLS": []}]
    if operation.parameters:
        document["parameters"] = list(operation.parameters)
    if operation.request_body is not None:
        document["requestBody"] = {
            "required": operation.body_required,
            "content": {media: {"schema": schema} for media, schema in operation.request_body.items()},
        }
    return document


def build_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of L{OPERATIONS}."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "securevault",
            "version": version,
            "description": "An encrypted file vault reached over mutual TLS. Every error is "
            '`{"error": "<code>", "message": "..."}`; a 500 adds `request_id`. Unknown paths are 404 '
            "`not_found`; a method a path does not list is 405 `method_not_allowed` with `Allow`. "
            "Every response carries `Cache-Control: no-store` and `X-Content-Type-Options: nosniff`.",
        },
        "security": [{"mutualTLS": [], "bearer": []}, {"mutualTLS": [], "sessionHeader": []}],
        "paths": {
            path: {method: _operation(path, method, operation) for method, operation in methods.items()}
            for path, methods in OPERATIONS.items()
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "mutualTLS": {
                    "type": "mutualTLS",
                    "description": "A client certificate from the vault's CA; without one the handshake fails.",
                },
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <session_id>` from POST /login.",
                },
                "sessionHeader": {"type": "apiKey", "in": "header", "name": "X-Session-ID"},
            },
        },
    }
