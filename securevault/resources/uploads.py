# -*- test-case-name: tests.server.test_uploads -*-
"""Resumable uploads: tus 1.0.0 (core, creation, termination, expiration,
checksum) at /uploads/ and /uploads/<id>.

A PATCH body streams into the pool like a raw upload's (an L{UploadStream}),
but into one encrypted piece of the upload (L{securevault.staging}); the 204
goes out only once the piece is durable and its row committed.  The last
piece makes the upload an archive, in the same pool call.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.server import Request

from securevault.core.archive import ArchiveInfo, IntegrityError, InvalidFilename, check_filename
from securevault.core.sessions import Session
from securevault.server.auditing import AuditUnavailable
from securevault.server.endpoint import JsonEndpoint
from securevault.server.errors import ApiError, busy, not_found, storage_error
from securevault.server.jsonapi import Reply
from securevault.server.state import request_state
from securevault.server.streaming import UPLOAD_BUFFER_BYTES, BodySink, UploadStream, body_stream
from securevault.staging import (
    CHECKSUM_ALGORITHMS,
    ChecksumMismatch,
    LengthExceeded,
    OffsetMismatch,
    PieceResult,
    UploadNotFound,
    UploadStatus,
    is_upload_id,
)

log = Logger(namespace="securevault.security")
R = TypeVar("R")

TUS_VERSION = b"1.0.0"
TUS_EXTENSIONS = b"creation,termination,expiration,checksum"
UPLOADS_PATH = b"/uploads/"
OFFSET_CONTENT_TYPE = b"application/offset+octet-stream"
_CHECKSUM_BYTES = {"sha1": 20, "sha256": 32}


def tus_error(status: int, code: str, message: str, **extra: bytes) -> ApiError:
    """An error of the contract, with the tus header every answer carries."""
    headers = {b"Tus-Resumable": TUS_VERSION}
    headers.update({name.replace("_", "-").encode("ascii"): value for name, value in extra.items()})
    return ApiError(status, code, message, headers)


def check_version(request: Request) -> None:
    """412 unless the request speaks tus 1.0.0 (every request but OPTIONS)."""
    if request.getHeader(b"tus-resumable") != TUS_VERSION:
        raise tus_error(
            412, "unsupported_version", "Send Tus-Resumable: 1.0.0, the version served.", Tus_Version=TUS_VERSION
        )


def parse_count(request: Request, name: bytes) -> int:
    """A non-negative integer header, else 400."""
    raw = request.getHeader(name)
    if raw is None or not raw.isdigit() or len(raw) > 19:
        raise tus_error(400, "bad_request", f"The {name.decode()} header must be a non-negative integer.")
    return int(raw)


def parse_metadata(raw: bytes | None) -> dict[str, bytes]:
    """Upload-Metadata: comma-separated C{key base64value} pairs."""
    result: dict[str, bytes] = {}
    if not raw:
        return result
    for pair in raw.split(b","):
        parts = pair.strip().split(b" ")
        if not parts[0] or len(parts) > 2:
            raise tus_error(400, "bad_request", "Upload-Metadata is not a list of 'key base64' pairs.")
        try:
            key = parts[0].decode("ascii")
            result[key] = base64.b64decode(parts[1], validate=True) if len(parts) == 2 else b""
        except (UnicodeDecodeError, binascii.Error, ValueError):
            raise tus_error(400, "bad_request", "Upload-Metadata values must be base64.") from None
    return result


def filename_from_metadata(request: Request) -> str:
    metadata = parse_metadata(request.getHeader(b"upload-metadata"))
    raw = metadata.get("filename")
    if raw is None:
        raise tus_error(400, "invalid_filename", "Name the file in Upload-Metadata (filename, base64).")
    try:
        filename = raw.decode("utf-8")
        check_filename(filename)
    except UnicodeDecodeError:
        raise tus_error(400, "invalid_filename", "The filename is not valid UTF-8.") from None
    except InvalidFilename as error:
        raise tus_error(400, "invalid_filename", str(error)) from None
    return filename


def parse_checksum(request: Request) -> tuple[str, bytes] | None:
    """Upload-Checksum: C{sha1|sha256 <base64 digest>}; 400 otherwise."""
    raw = request.getHeader(b"upload-checksum")
    if raw is None:
        return None
    algorithm, _, value = raw.strip().partition(b" ")
    name = algorithm.decode("ascii", "replace").lower()
    if name not in CHECKSUM_ALGORITHMS:
        raise tus_error(400, "bad_request", "Upload-Checksum takes sha1 or sha256.")
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise tus_error(400, "bad_request", "The Upload-Checksum digest is not base64.") from None
    if len(digest) != _CHECKSUM_BYTES[name]:
        raise tus_error(400, "bad_request", "The Upload-Checksum digest has the wrong length.")
    return name, digest


def upload_error(failure: Failure) -> BaseException:
    """The contract's answer for a failed tus operation."""
    error = failure.value
    if isinstance(error, UploadNotFound):
        return tus_error(404, "not_found", "No such upload.")
    if isinstance(error, OffsetMismatch):
        return tus_error(409, "offset_mismatch", str(error))
    if isinstance(error, ChecksumMismatch):
        return tus_error(460, "checksum_mismatch", "The body does not match its Upload-Checksum; it was dropped.")
    if isinstance(error, LengthExceeded):
        return tus_error(400, "bad_request", str(error))
    if isinstance(error, IntegrityError):
        return error
    mapped = storage_error(failure)
    if isinstance(mapped, ApiError):
        mapped.headers.setdefault(b"Tus-Resumable", TUS_VERSION)
    return mapped


def _raise(error: BaseException) -> Any:
    raise error


def _http_date(seconds: float) -> bytes:
    return cast(bytes, datetimeToString(int(seconds)))


class _TusEndpoint(JsonEndpoint):
    def render_OPTIONS(self, request: Request) -> Any:
        """What the server supports (no session needed; mutual TLS still is)."""
        headers = {
            b"Tus-Resumable": TUS_VERSION,
            b"Tus-Version": TUS_VERSION,
            b"Tus-Extension": TUS_EXTENSIONS,
            b"Tus-Max-Size": str(self.app.config.max_upload_size).encode("ascii"),
            b"Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS).encode("ascii"),
        }
        return self.respond_later(request, succeed(Reply(204, None, headers)))

    def render(self, request: Request) -> Any:
        request.setHeader(b"tus-resumable", TUS_VERSION)
        return super().render(request)

    def tus_in_session(
        self,
        request: Request,
        work: Callable[[Session], R],
        then: Callable[[Session, R], Reply | Deferred[Reply]],
    ) -> Any:
        """Answer with C{then(session, work(session))} (C{work} in the pool),
        failures in tus terms."""

        def answer(found: tuple[Session, R | None]) -> Reply | Deferred[Reply]:
            return then(found[0], cast(R, found[1]))

        work_done: Deferred[Reply] = self.app.with_session(request, work).addCallback(answer)
        return self.respond_later(request, work_done.addErrback(lambda failure: _raise(upload_error(failure))))

    def audited(self, request: Request, owner_id: str, info: ArchiveInfo, reply: Reply) -> Deferred[Reply]:
        """Write the upload's audit record before the answer; without it
        the archive goes again (the answer is a 503, as for a raw upload)."""
        app = self.app
        log.info("Stored archive {archive_id} ({size} bytes)", archive_id=info.id, size=info.size, event_kind="upload")

        def unrecorded(failure: Failure) -> Failure:
            if failure.check(AuditUnavailable):
                app.run_blocking(app.storage.delete, owner_id, info.id).addErrback(
                    lambda f: log.failure("Removing an unaudited upload failed", f)
                )
            return failure

        state = request_state(request)
        recorded = app.record("upload", request, user=state.user, archive_id=info.id, size=info.size)
        return recorded.addCallbacks(lambda _: reply, unrecorded)


class UploadsCollection(_TusEndpoint):
    """OPTIONS and POST /uploads/ (tus creation)."""

    allowedMethods = (b"OPTIONS", b"POST")

    def render_POST(self, request: Request) -> Any:
        check_version(request)
        if request.getHeader(b"upload-defer-length") is not None:
            raise tus_error(400, "bad_request", "Upload-Defer-Length is not supported: send Upload-Length.")
        length = parse_count(request, b"upload-length")
        limit = self.app.config.max_upload_size
        if length > limit:
            raise tus_error(413, "too_large", f"The upload is larger than {limit} bytes.")
        filename = filename_from_metadata(request)
        app = self.app
        staging = app.staging
        quota = app.config.quota
        now = app.clock()

        def create(session: Session) -> UploadStatus:
            return staging.create(session.user_id, filename, length, now, quota=quota)

        def created(session: Session, status: UploadStatus) -> Reply | Deferred[Reply]:
            location = UPLOADS_PATH + status.upload_id.encode("ascii")
            headers = {b"Location": location, b"Tus-Resumable": TUS_VERSION}
            body: dict[str, Any] = {"upload_id": status.upload_id, "length": status.length, "offset": status.offset}
            if status.archive is None:
                headers[b"Upload-Expires"] = _http_date(status.expires_at)
                return Reply(201, body, headers)
            headers[b"Upload-Archive-Id"] = status.archive.id.encode("ascii")
            body["archive"] = status.archive.public()
            return self.audited(request, session.user_id, status.archive, Reply(201, body, headers))

        return self.tus_in_session(request, create, created)


class UploadItem(_TusEndpoint):
    """HEAD, PATCH and DELETE /uploads/<id>: one endpoint for every id."""

    allowedMethods = (b"HEAD", b"PATCH", b"DELETE", b"OPTIONS")

    @staticmethod
    def upload_id(request: Request) -> str:
        raw = (request.path or b"")[len(UPLOADS_PATH) :]
        try:
            upload_id = raw.decode("ascii")
        except UnicodeDecodeError:
            raise tus_error(404, "not_found", "No such upload.") from None
        if not is_upload_id(upload_id):
            raise tus_error(404, "not_found", "No such upload.")
        return upload_id

    def body_limit(self, request: Request) -> int:
        if request.method == b"PATCH":
            return self.app.config.max_upload_size
        return super().body_limit(request)

    def receive_body(self, request: Request) -> UploadStream[PieceResult] | None:
        """A PATCH body, streamed into one encrypted piece in the pool.  The
        cheap checks refuse it before its body is read; the offset is
        checked in the pool once the session is found."""
        if request.method != b"PATCH":
            return None
        check_version(request)
        content_type = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if content_type != OFFSET_CONTENT_TYPE:
            raise tus_error(415, "unsupported_media_type", "Send Content-Type: application/offset+octet-stream.")
        offset = parse_count(request, b"upload-offset")
        checksum = parse_checksum(request)
        upload_id = self.upload_id(request)
        declared = request.getHeader(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        app = self.app
        state = request_state(request)
        if not app.budget.reserve(UPLOAD_BUFFER_BYTES):
            raise busy()
        state.reserved_bytes += UPLOAD_BUFFER_BYTES
        staging = app.staging
        quota = app.config.quota
        clock = app.clock
        owner: list[str] = []

        def open_piece(session: Session) -> BodySink[PieceResult]:
            owner.append(session.user_id)
            return staging.piece_writer(
                session.user_id, upload_id, offset, declared=length, checksum=checksum, quota=quota, now=clock
            )

        def opened(found: tuple[Session, BodySink[PieceResult] | None]) -> BodySink[PieceResult]:
            assert found[1] is not None
            return found[1]

        stream: UploadStream[PieceResult] = body_stream(
            app.run_blocking,
            state,
            to_error=upload_error,
            # An acknowledged piece stays (tus clients HEAD and go on); a
            # finished upload's pieces go even if its answer cannot.
            discard=lambda result: self.remove_leftover(owner[0], upload_id, result),
            call_from_thread=app.call_from_thread,
        )
        stream.open_with(
            app.with_session(request, lambda session: stream.prime(open_piece(session))).addCallback(opened)
        )
        return stream

    def remove_leftover(self, owner_id: str, upload_id: str, result: PieceResult) -> None:
        """In the pool, after the answer: the blobs of a finished upload's
        pieces and its journal (a directory fsync each, too slow to keep the
        204 waiting)."""
        if result.leftover:
            self.app.run_blocking(
                self.app.staging.remove_upload_blobs, owner_id, upload_id, result.leftover
            ).addErrback(lambda failure: log.failure("Removing a finished upload's pieces failed", failure))

    def render_PATCH(self, request: Request) -> Any:
        state = request_state(request)
        upload = cast(UploadStream[PieceResult], state.body) if isinstance(state.body, UploadStream) else None
        if upload is None:
            raise not_found()

        finished: list[PieceResult] = []

        def answer(result: PieceResult) -> Reply | Deferred[Reply]:
            finished.append(result)
            headers = {
                b"Tus-Resumable": TUS_VERSION,
                b"Upload-Offset": str(result.offset).encode("ascii"),
                b"Upload-Expires": _http_date(result.expires_at),
            }
            if result.archive is None:
                return Reply(204, None, headers)
            headers[b"Upload-Archive-Id"] = result.archive.id.encode("ascii")
            owner = state.session.user_id if state.session is not None else ""
            return self.audited(request, owner, result.archive, Reply(204, None, headers))

        def clean_up(passed: object) -> object:
            if finished and state.session is not None:
                self.remove_leftover(state.session.user_id, self.upload_id(request), finished[0])
            return passed

        work: Deferred[Reply] = upload.finish().addCallback(answer)
        rendered = self.respond_later(request, work.addErrback(lambda failure: _raise(upload_error(failure))))
        work.addBoth(clean_up)  # after the answer went out (respond_later's callbacks come first)
        return rendered

    def render_HEAD(self, request: Request) -> Any:
        check_version(request)
        upload_id = self.upload_id(request)
        staging = self.app.staging
        quota = self.app.config.quota

        def status(session: Session) -> UploadStatus:
            return staging.status(session.user_id, upload_id, quota=quota)

        def answer(session: Session, status: UploadStatus) -> Reply:
            headers = {
                b"Tus-Resumable": TUS_VERSION,
                b"Upload-Offset": str(status.offset).encode("ascii"),
                b"Upload-Length": str(status.length).encode("ascii"),
                b"Upload-Expires": _http_date(status.expires_at),
                b"Cache-Control": b"no-store",
            }
            if status.archive is not None:
                headers[b"Upload-Archive-Id"] = status.archive.id.encode("ascii")
            return Reply(200, None, headers)

        return self.tus_in_session(request, status, answer)

    def render_DELETE(self, request: Request) -> Any:
        check_version(request)
        upload_id = self.upload_id(request)
        staging = self.app.staging

        def delete(session: Session) -> None:
            staging.delete(session.user_id, upload_id)

        def deleted(session: Session, _: None) -> Reply:
            return Reply(204, None, {b"Tus-Resumable": TUS_VERSION})

        return self.tus_in_session(request, delete, deleted)


__all__ = ["UploadsCollection", "UploadItem", "TUS_VERSION"]
