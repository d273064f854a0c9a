# -*- test-case-name: tests.server.test_resources,tests.server.test_hostile -*-
"""Site-wide HTTP policy: VaultSite, VaultRequest and the root resource.

VaultRequest replaces twisted.web's body handling: it checks limits as bytes
arrive, refuses oversized bodies from their Content-Length before reading
them, and streams raw uploads to the pool instead of spooling them to an
unencrypted temp file.  It also sets the contract's headers, answers errors
that escape a resource with JSON, and writes one access event per request.
"""

from __future__ import annotations

import io
import time
import uuid
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.server import NOT_DONE_YET, Request

from securevault.core.archive import ArchiveInfo, InvalidFilename, check_filename
from securevault.server.app import SessionRefused, VaultApp, session_id_from_headers
from securevault.server.errors import ApiError, not_found, storage_error
from securevault.server.jsonapi import JSON_CONTENT_TYPE, encode_json, error_body, fail, internal_error
from securevault.server.streaming import UploadStream

# Bodies of requests other than uploads are small JSON objects.
SMALL_BODY_BYTES = 64 * 1024
HEADER_BLOCK_BYTES = 16 * 1024
UPLOAD_PATH = b"/upload-file"

access_log = Logger(namespace="securevault.access")
security_log = Logger(namespace="securevault.security")


def filename_from_raw_upload(request: Request, header: bytes | None) -> str:
    """The filename of a raw upload: C{X-Filename} (percent-encoded UTF-8),
    else the C{filename} query parameter; checked against API.md's rules."""
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


def raw_error_response(error: ApiError, body: bytes | None = None) -> bytes:
    """A whole HTTP/1.1 error response with the contract's headers, for the
    moments before twisted.web has a request to answer with (the connection
    is closed after it)."""
    if body is None:
        body = encode_json(error_body(error))
    headers = [
        (b"Content-Type", JSON_CONTENT_TYPE),
        (b"Content-Length", str(len(body)).encode("ascii")),
        (b"Cache-Control", b"no-store"),
        (b"X-Content-Type-Options", b"nosniff"),
        (b"Server", b"securevault"),
        (b"Connection", b"close"),
        *error.headers.items(),
    ]
    head = b"HTTP/1.1 %d %s\r\n" % (error.status, HTTPStatus(error.status).phrase.encode("ascii"))
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


def media_type(request: Request) -> bytes:
    value = request.getHeader(b"content-type") or b""
    return value.split(b";", 1)[0].strip().lower()


class VaultRequest(server.Request):
    """A request with the vault's body limits, headers, errors and logging."""

    defaultContentType = None
    app: VaultApp

    def __init__(self, channel: Any, queued: Any = None) -> None:
        super().__init__(channel, queued)
        # No endpoint takes form submissions; twisted.web's own parser would
        # answer a malformed multipart body with a bare, non-JSON 400.
        self._parsePOSTFormSubmission = False
        self.upload: UploadStream | None = None
        self.vault_user: str | None = None
        self._body_limit = SMALL_BODY_BYTES
        self._body_bytes = 0
        self._refused = False
        self._started = time.monotonic()
        self._logged = False
        self._processing = False

    # -- body handling --------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        """Headers are in: decide how the body is taken, or refuse it now."""
        self.content = io.BytesIO()  # type: ignore[assignment]
        # The method and path are on the channel until requestReceived; this
        # is the hook twisted.web offers before the body (twisted/twisted#4688).
        method = getattr(self.channel, "_command", b"")
        path = getattr(self.channel, "_path", b"").split(b"?", 1)[0]
        config = self.app.config
        raw_upload = method == b"POST" and path == UPLOAD_PATH and media_type(self) == b"application/octet-stream"
        if method == b"POST" and path == UPLOAD_PATH:
            self._body_limit = config.max_upload_size if raw_upload else config.max_json_body
        if length is not None and length > self._body_limit:
            self._refuse(ApiError(413, "too_large", f"The body is larger than {self._body_limit} bytes."))
            return
        if not raw_upload and self._body_limit > SMALL_BODY_BYTES and (length is None or length > SMALL_BODY_BYTES):
            # A JSON upload may be held in memory up to --max-json-body: only
            # for a caller with a live session, checked before the body.
            self._check_session_first()
        if raw_upload:
            try:
                self._start_upload(getattr(self.channel, "_path", b""))
            except ApiError as error:
                self._refuse(error)

    def _check_session_first(self) -> None:
        """Hold the body until the session is found in the store; refuse it
        unread when there is none."""
        transport: Any = self.channel.transport
        transport.pauseProducing()

        def checked(_: object) -> None:
            if not self._refused and not self._processing:
                transport.resumeProducing()

        def refused(failure: Failure) -> None:
            if self._processing:
                return  # the whole body came first: the endpoint answers
            error = failure.value if isinstance(failure.value, ApiError) else failure
            self._refuse(error)

        self.app.authenticate(self).addCallbacks(checked, refused)

    def _start_upload(self, uri: bytes) -> None:
        """Name the upload and open its archive writer in the pool, once the
        session is found there; bytes that arrive meanwhile wait in
        L{UploadStream} (the connection is paused past its high water)."""
        self.uri = uri
        self.path, _, query = uri.partition(b"?")
        self.args = http.parse_qs(query, keep_blank_values=True) if query else {}
        app = self.app
        identity = app.identity(self)
        session_id = session_id_from_headers(self)
        try:
            filename: str | None = filename_from_raw_upload(self, self.getHeader(b"x-filename"))
            filename_error = None
        except ApiError as error:
            filename, filename_error = None, error
        quota = app.config.quota
        storage = app.storage
        owners: list[str] = []

        def open_writer() -> Any:
            session = app.sessions.lookup(session_id, identity.fingerprint) if session_id else None
            if session is None:
                raise SessionRefused()
            self.vault_user = session.username
            if filename_error is not None:
                raise filename_error
            assert filename is not None
            owners.append(session.user_id)
            remaining = None if quota is None else max(0, quota - storage.usage(session.user_id))
            return storage.writer(session.user_id, filename, max_bytes=remaining)

        def discard(info: ArchiveInfo) -> None:
            app.run_blocking(storage.delete, owners[0], info.id).addErrback(lambda _: None)

        transport: Any = self.channel.transport
        self.upload = UploadStream(
            app.run_blocking,
            open_writer,
            pause=transport.pauseProducing,
            resume=transport.resumeProducing,
            on_error=self._upload_failed,
            discard=discard,
        )

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self._body_limit:
            self._refuse(ApiError(413, "too_large", f"The body is larger than {self._body_limit} bytes."))
            return
        if self.upload is not None:
            self.upload.feed(data)
        else:
            cast(io.BytesIO, self.content).write(data)

    def _upload_failed(self, failure: Failure) -> None:
        """The writer failed while the body was still arriving."""
        if failure.check(SessionRefused):
            self.app.refused(self)
        error = storage_error(failure)
        self._refuse(error if isinstance(error, ApiError) else failure)

    def _refuse(self, error: ApiError | Failure) -> None:
        """Answer before the body is read, then close the connection.

        A L{Failure} is an internal error: logged with a request id that the
        500 body carries too."""
        if self._refused:
            return
        self._refused = True
        # The channel answers "Expect: 100-continue" after gotLength returns;
        # a refused body must not be invited.
        self.requestHeaders.removeHeader(b"expect")
        if self.upload is not None:
            self.upload.abort()
        if isinstance(error, ApiError):
            body = encode_json(error_body(error))
        else:
            request_id = uuid.uuid4().hex
            access_log.failure(
                "Internal error while taking an upload (request {request_id})", error, request_id=request_id
            )
            error = ApiError(500, "internal_error", "The server failed to answer this request.")
            body = encode_json({**error_body(error), "request_id": request_id})
        self.code = error.status
        self.sentLength = len(body)
        transport: Any = self.channel.transport
        transport.write(raw_error_response(error, body))
        self.method = getattr(self.channel, "_command", b"-")
        self.path = getattr(self.channel, "_path", b"-").split(b"?", 1)[0]
        self._log_access()
        self.channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        self._processing = True
        super().requestReceived(command, path, version)

    # -- processing -----------------------------------------------------

    def process(self) -> None:
        self.setHeader(b"cache-control", b"no-store")
        self.setHeader(b"x-content-type-options", b"nosniff")
        self.notifyFinish().addBoth(lambda _: self._log_access())
        super().process()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # server.Request.process sets "TwistedWeb/<version>"; no banner.
            self.setHeader(b"server", b"securevault")
        super().write(data)

    def processingFailed(self, reason: Failure) -> None:
        """An exception escaped a resource: a JSON 500, traceback in the log."""
        if self.finished or self._disconnected:
            return None
        if self.startedWriting:
            cast(Any, self.transport).abortConnection()
            return None
        internal_error(self, reason)
        return None

    def connectionLost(self, reason: Failure) -> None:
        if self.upload is not None and not self.finished:
            self.upload.abort()
        super().connectionLost(reason)

    def _log_access(self) -> None:
        if self._logged:
            return
        self._logged = True
        path = (self.path or b"").split(b"?", 1)[0]
        duration = time.monotonic() - self._started
        metrics = self.app.metrics
        if metrics is not None:
            metrics.observe_request(
                path.decode("utf-8", "replace"), self.code, self._body_bytes, self.sentLength, duration
            )
        method = (self.method or b"-").decode("ascii", "replace")
        shown_path = path.decode("utf-8", "replace")[:200]
        status = self.code if not self._disconnected or self.finished else "aborted"
        user = self.vault_user or "-"
        duration_ms = round(duration * 1000, 1)
        # The text is built here, once: the log observer then formats one
        # field instead of six (a fifth of the reactor's time per small
        # request went to formatting this line).  The fields stay for
        # structured observers.
        access_log.info(
            "{access_line}",
            access_line=f"{method} {shown_path} {status} user={user} bytes={self.sentLength} {duration_ms}ms",
            method=method,
            path=shown_path,
            status=status,
            user=user,
            bytes=self.sentLength,
            duration_ms=duration_ms,
            event_kind="access",
        )


class VaultChannel(http.HTTPChannel):
    """HTTP/1.1 with a deadline for each request head.

    The idle timeout restarts on every byte, so a client trickling one header
    byte at a time would hold a connection for ever; the head of each request
    must arrive whole within the idle timeout.  (The TLS handshake is under
    the idle timeout too: the channel is connected before it starts.)
    """

    _head_deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        if self.timeOut:
            self._head_deadline = self.callLater(self.timeOut, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        # Armed first: finishing may parse a pipelined request's head at once.
        self._arm_head_deadline()
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_head_deadline()
        super().connectionLost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A single head line over 16 KiB: the same JSON 431, then close."""
        self._refuse_head(ApiError(431, "header_too_large", "The request head is larger than 16 KiB."))

    def _refuse_head(self, error: ApiError) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.write(raw_error_response(error))
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Malformed framing, with the contract's JSON error instead of
        twisted.web's bare "400 Bad Request" (a private hook of HTTPChannel,
        the one every framing error goes through): 431 for a head over
        16 KiB, else 400 bad_request; then the connection is closed."""
        if getattr(self, "_receivedHeaderSize", 0) > self.totalHeadersSize:
            error = ApiError(431, "header_too_large", "The request head is larger than 16 KiB.")
        else:
            error = ApiError(400, "bad_request", "The request is not valid HTTP/1.1.")
        self._refuse_head(error)

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        security_log.warn("Dropped a client that sent no complete request head in time", event_kind="slow_client")
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()


class JsonNotFound(resource.Resource):
    """The JSON 404 for every unknown path."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        fail(request, not_found())
        return NOT_DONE_YET


class RootResource(resource.Resource):
    """Routes exact paths to the endpoints; everything else is a JSON 404."""

    def getChild(self, path: bytes, request: Request) -> resource.Resource:
        return JsonNotFound()

    def render(self, request: Request) -> Any:
        fail(request, not_found())
        return NOT_DONE_YET


def build_root(app: VaultApp) -> RootResource:
    """The resource tree of API.md."""
    from securevault.resources.delete_file import DeleteFileResource
    from securevault.resources.download_file import DownloadFileResource
    from securevault.resources.get_files import GetFilesResource
    from securevault.resources.health import HealthResource
    from securevault.resources.login import LoginResource
    from securevault.resources.logout import LogoutResource
    from securevault.resources.upload_file import UploadFileResource

    root = RootResource()
    root.putChild(b"login", LoginResource(app))
    root.putChild(b"logout", LogoutResource(app))
    root.putChild(b"upload-file", UploadFileResource(app))
    root.putChild(b"get-files", GetFilesResource(app))
    root.putChild(b"download-file", DownloadFileResource(app))
    root.putChild(b"delete-file", DeleteFileResource(app))
    root.putChild(b"health", HealthResource(app))
    return root


class VaultSite(server.Site):
    """The site: our request class, idle timeout, no server banner."""

    def __init__(self, app: VaultApp, *, reactor: Any = None) -> None:
        super().__init__(build_root(app), timeout=app.config.idle_timeout, reactor=reactor)
        self.app = app
        self.displayTracebacks = False

        class _Request(VaultRequest):
            pass

        _Request.app = app
        self.requestFactory = _Request  # type: ignore[assignment]
        # HTTP/1.1 only (no ALPN h2), with a deadline for request heads; its
        # header block limit is twisted.web's, HEADER_BLOCK_BYTES.
        self.protocol = VaultChannel  # type: ignore[method-assign,assignment]

    def log(self, request: Any) -> None:
        """Access events come from VaultRequest, without query strings."""
