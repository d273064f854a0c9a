# -*- test-case-name: tests.server.test_resources -*-
"""POST /upload-file: one file becomes one encrypted archive.

The raw form (application/octet-stream) streams into the pool while its body
arrives (L{UploadFileResource.receive_body}); the JSON form is buffered within
the memory budget, then parsed and stored in the pool, since a 64 MiB JSON
body would stall the reactor.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from securevault.core.archive import ArchiveInfo, ArchiveWriter, InvalidFilename, check_filename
from securevault.core.sessions import Session
from securevault.server.app import VaultApp
from securevault.server.auditing import AuditUnavailable
from securevault.server.endpoint import JsonEndpoint
from securevault.server.errors import ApiError, bad_request, busy, storage_error
from securevault.server.jsonapi import Reply, decode_json_object, take_body
from securevault.server.state import request_state
from securevault.server.streaming import UPLOAD_BUFFER_BYTES, BodySink, UploadStream, body_stream
from securevault.server.twisted_private import request_disconnected
from securevault.storage import SecureFileStorage

log = Logger(namespace="securevault.security")

JSON_UPLOAD_COST_FACTOR = 3


def parse_json_upload(raw: bytes) -> tuple[str, bytes]:
    """C{{"filename": str, "content": base64}} → name and bytes, else 400."""
    body = decode_json_object(raw)
    filename, content = body.get("filename"), body.get("content")
    if not isinstance(filename, str) or not isinstance(content, str):
        raise bad_request("The fields 'filename' and 'content' must be strings.")
    try:
        check_filename(filename)
    except InvalidFilename as error:
        raise ApiError(400, "invalid_filename", str(error)) from None
    try:
        data = base64.b64decode(content.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise bad_request("The content is not valid base64.") from None
    return filename, data


def store_json_upload(storage: SecureFileStorage, owner_id: str, raw: bytes, quota: int | None) -> ArchiveInfo:
    """Parse and store a JSON upload; runs in the pool."""
    filename, data = parse_json_upload(raw)
    return storage.store(owner_id, filename, data, quota=quota)


def media_type(request: Request) -> bytes:
    value = request.getHeader(b"content-type") or b""
    return value.split(b";", 1)[0].strip().lower()


def filename_from_raw_upload(request: Request) -> str:
    """The filename of a raw upload: C{X-Filename} (percent-encoded UTF-8),
    else the C{filename} query parameter; checked against API.md's rules."""
    header = request.getHeader(b"x-filename")
    raw: bytes | None = None
    if header is not None:
        raw = unquote_to_bytes(header)
    else:
        values = request.args.get(b"filename") if request.args else None
        if values:
            raw = values[0]
    if raw is None:
        raise ApiError(400, "invalid_filename", "Name the file in the X-Filename header.")
    try:
        filename = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_filename", "The filename is not valid UTF-8.") from None
    try:
        check_filename(filename)
    except InvalidFilename as error:
        raise ApiError(400, "invalid_filename", str(error)) from None
    return filename


class UploadFileResource(JsonEndpoint):
    """Both forms of upload.  The raw form is taken as it streams in: this
    resource's L{receive_body} opens the archive writer in the pool once the
    session is found, and feeds it while the body arrives; C{render_POST}
    then only waits for the commit."""

    allowedMethods = (b"POST",)

    def __init__(self, app: VaultApp) -> None:
        super().__init__(app)
        # JSON uploads are parsed and decoded one at a time: each briefly
        # holds about three times its body, and two 60 MiB ones at once
        # would double that peak for no gain (the work is CPU-bound).
        self._decoding = DeferredSemaphore(1)

    def body_limit(self, request: Request) -> int:
        if request.method != b"POST":
            return super().body_limit(request)
        if media_type(request) == b"application/octet-stream":
            return self.app.config.max_upload_size
        return self.app.config.max_json_body

    def body_cost(self, request: Request, size: int) -> int:
        """A JSON upload is held three times over at its peak: the body, its
        text while JSON parses it, then the content string beside the
        decoded bytes."""
        return JSON_UPLOAD_COST_FACTOR * size

    def receive_body(self, request: Request) -> UploadStream[ArchiveInfo] | None:
        if request.method != b"POST" or media_type(request) != b"application/octet-stream":
            return None
        app = self.app
        state = request_state(request)
        if not app.budget.reserve(UPLOAD_BUFFER_BYTES):
            raise busy()
        state.reserved_bytes += UPLOAD_BUFFER_BYTES
        try:
            filename: str | None = filename_from_raw_upload(request)
            filename_error = None
        except ApiError as error:  # answered only to a caller with a session
            filename, filename_error = None, error
        quota = app.config.quota
        storage = app.storage
        owners: list[str] = []

        def open_writer(session: Session) -> ArchiveWriter:
            if filename_error is not None:
                raise filename_error
            assert filename is not None
            owners.append(session.user_id)
            return storage.writer(session.user_id, filename, quota=quota)

        def discard(info: ArchiveInfo) -> None:
            app.run_blocking(storage.delete, owners[0], info.id).addErrback(lambda _: None)

        def counted(found: tuple[Session, BodySink[ArchiveInfo] | None]) -> BodySink[ArchiveInfo]:
            """In progress for GET /usage until the request ends."""
            owner = found[0].user_id
            if not (request.finished or request_disconnected(request)):
                app.uploads.started(owner)
                request.notifyFinish().addBoth(lambda _: app.uploads.ended(owner))
            assert found[1] is not None
            return found[1]

        stream: UploadStream[ArchiveInfo] = body_stream(
            app.run_blocking, state, to_error=storage_error, discard=discard, call_from_thread=app.call_from_thread
        )
        stream.open_with(
            app.with_session(request, lambda session: stream.prime(open_writer(session))).addCallback(counted)
        )
        return stream

    def render_POST(self, request: Request) -> Any:
        app = self.app
        state = request_state(request)
        upload = state.body if isinstance(state.body, UploadStream) else None
        if upload is not None:
            work = upload.finish()
        else:

            def store(session: Session) -> Deferred[ArchiveInfo]:
                if media_type(request) != b"application/json":
                    raise ApiError(
                        415,
                        "unsupported_media_type",
                        "Send application/json or application/octet-stream with X-Filename.",
                    )
                body = take_body(request)
                return self._decoding.run(
                    app.run_blocking, store_json_upload, app.storage, session.user_id, body, app.config.quota
                )

            work = app.authenticate(request).addCallback(store)

        def stored(info: ArchiveInfo) -> Deferred[Reply]:
            log.info(
                "Stored archive {archive_id} ({size} bytes)",
                archive_id=info.id,
                size=info.size,
                event_kind="upload",
            )

            def unrecorded(failure: Failure) -> Failure:
                """The answer is a 503, never a 201: keep no archive the
                client was not told of and the audit log does not name."""
                if failure.check(AuditUnavailable):
                    owner = state.session.user_id if state.session is not None else None
                    if owner is not None:
                        app.run_blocking(app.storage.delete, owner, info.id).addErrback(
                            lambda f: log.failure("Removing an unaudited upload failed", f)
                        )
                return failure

            audited = app.record("upload", request, user=state.user, archive_id=info.id, size=info.size)
            return audited.addCallbacks(lambda _: Reply(201, info.public()), unrecorded)

        return self.respond_later(request, work.addCallbacks(stored, lambda failure: _raise(storage_error(failure))))


def _raise(error: BaseException) -> Any:
    raise error
