# -*- test-case-name: tests.server.test_resources,tests.server.test_hostile -*-
"""Site-wide HTTP policy: VaultSite, VaultChannel, VaultRequest, the routes.

VaultRequest replaces twisted.web's body handling: it routes a request to its
endpoint as soon as the head is complete, checks limits as bytes arrive,
refuses oversized bodies from their Content-Length before reading them, and
lets the endpoint take a body as it streams (a raw upload goes to the pool,
never to an unencrypted temp file).  VaultChannel holds the connection
limits and the body and response rates.  Both set the contract's headers,
answer errors that escape a resource with JSON, and write one access event
per request.  What each endpoint does is in L{securevault.resources}.
"""

from __future__ import annotations

import io
import time
import uuid
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from securevault.resources.delete_file import DeleteFileResource
from securevault.resources.download_file import DownloadFileResource
from securevault.resources.get_files import GetFilesResource
from securevault.resources.health import HealthResource
from securevault.resources.login import LoginResource
from securevault.resources.logout import LogoutResource
from securevault.resources.openapi_json import OpenApiResource
from securevault.resources.upload_file import UploadFileResource
from securevault.resources.uploads import UploadItem, UploadsCollection
from securevault.resources.usage import UsageResource
from securevault.server.app import VaultApp
from securevault.server.endpoint import SMALL_BODY_BYTES, JsonEndpoint
from securevault.server.errors import ApiError, busy, not_found, revoked_certificate
from securevault.server.jsonapi import JSON_CONTENT_TYPE, encode_json, error_body, fail, internal_error, status_phrase
from securevault.server.limits import CLOSE_GRACE_SECONDS, RateMeter
from securevault.server.state import RequestState, StatefulRequest
from securevault.server.tls import client_identity
from securevault.server.twisted_private import (
    head_bytes_received,
    pending_request_line,
    request_disconnected,
    skip_form_parsing,
)

HEADER_BLOCK_BYTES = 16 * 1024

access_log = Logger(namespace="securevault.access")
security_log = Logger(namespace="securevault.security")


def request_timeout() -> ApiError:
    return ApiError(408, "request_timeout", "The request body arrived too slowly; the connection is closed.")


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
    head = b"HTTP/1.1 %d %s\r\n" % (error.status, status_phrase(error.status))
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


class VaultRequest(StatefulRequest):
    """A request with the vault's routing of bodies, limits, headers, errors
    and logging.

    When the head is complete (L{gotLength}), the request is routed once, to
    the endpoint that will answer it; that endpoint says how large a body it
    takes and may take the body itself as it arrives (a raw upload).  Other
    bodies are buffered within the memory budget.  Whatever is refused before
    its body is read is answered at once and the connection closed."""

    defaultContentType = None
    app: VaultApp
    root: RootResource

    def __init__(self, channel: Any, queued: Any = None) -> None:
        super().__init__(channel, queued)
        skip_form_parsing(self)
        self.state = RequestState()
        self.state.refuse = self.refuse
        self.state.pause_body = self._pause_body
        self.state.resume_body = self._resume_body
        self.endpoint: JsonEndpoint | None = None
        self.awaiting_body = False
        self.body_paused = False
        self._body_limit = SMALL_BODY_BYTES
        self._body_bytes = 0
        self._refused = False
        self._started = time.monotonic()
        self._logged = False
        self._processing = False
        self._active = False  # counted in the connections' load

    # -- body handling --------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        """Headers are in: route the request, then decide how its body is
        taken, or refuse it now."""
        limits = self.app.connections
        if limits is not None and not self._active:
            self._active = True
            limits.request_started()
        self.content = io.BytesIO()  # type: ignore[assignment]
        self.method, self.uri = pending_request_line(self.channel)
        self.path, _, query = self.uri.partition(b"?")
        self.args = http.parse_qs(query, keep_blank_values=True) if query else {}
        self.endpoint = endpoint = self.root.route(self.path)
        identity = client_identity(self.transport)
        if identity is not None and self.app.revocations.is_revoked(identity):
            # Revoked after this connection's handshake: no request of it is
            # served again, /health included, and its body is never read.
            security_log.warn(
                "Refused a request over revoked certificate {fingerprint}",
                fingerprint=identity.fingerprint,
                event_kind="revoked_certificate",
            )
            self.app.refusal("revoked_certificate_refused", identity.fingerprint)
            self.refuse(revoked_certificate())
            return
        if endpoint is not None:
            self._body_limit = endpoint.body_limit(self)
        if length is not None and length > self._body_limit:
            self.refuse(ApiError(413, "too_large", f"The body is larger than {self._body_limit} bytes."))
            return
        if length != 0:
            self.awaiting_body = True
            if isinstance(self.channel, VaultChannel):
                self.channel.body_started()
        try:
            receiver = endpoint.receive_body(self) if endpoint is not None else None
        except ApiError as error:
            self.refuse(error)
            return
        if receiver is not None:
            self.state.body = receiver
            return
        if length and not self._reserve(endpoint.body_cost(self, length) if endpoint is not None else length):
            return
        large = self._body_limit > SMALL_BODY_BYTES and (length is None or length > SMALL_BODY_BYTES)
        if large and endpoint is not None and not endpoint.public:
            # A JSON upload may be held in memory up to --max-json-body: only
            # for a caller with a live session, checked before the body.
            self._check_session_first()

    def _reserve(self, size: int) -> bool:
        """Count C{size} more bytes against the memory budget; refuse the
        request (503 busy) when they do not fit."""
        if not self.app.budget.reserve(size):
            self.refuse(busy())
            return False
        self.state.reserved_bytes += size
        return True

    def _check_session_first(self) -> None:
        """Hold the body until the session is found; refuse it unread when
        there is none."""
        self._pause_body()

        def checked(_: object) -> None:
            if not self._refused and not self._processing:
                self._resume_body()

        def refused(failure: Failure) -> None:
            if self._processing:
                return  # the whole body came first: the endpoint answers
            self.refuse(failure.value if isinstance(failure.value, ApiError) else failure)

        self.app.authenticate(self).addCallbacks(checked, refused)

    def _pause_body(self) -> None:
        """Stop reading the body: the vault is behind, not the client (the
        body-rate limit and the idle timeout excuse the client meanwhile)."""
        if self.body_paused:
            return
        self.body_paused = True
        channel = self.channel
        if isinstance(channel, VaultChannel):
            channel.hold_reading()
        elif channel is not None:
            cast(Any, channel.transport).pauseProducing()

    def _resume_body(self) -> None:
        if not self.body_paused:
            return
        self.body_paused = False
        channel = self.channel
        if isinstance(channel, VaultChannel):
            channel.release_reading()
        elif channel is not None:
            cast(Any, channel.transport).resumeProducing()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        if isinstance(self.channel, VaultChannel):
            self.channel.meter.received(len(data))
        if self._body_bytes > self._body_limit:
            self.refuse(ApiError(413, "too_large", f"The body is larger than {self._body_limit} bytes."))
            return
        if self.state.body is not None:
            self.state.body.feed(data)
            return
        if self.channelLength() is None:  # chunked: counted as it comes
            cost = self.endpoint.body_cost(self, len(data)) if self.endpoint is not None else len(data)
            if not self._reserve(cost):
                return
        cast(io.BytesIO, self.content).write(data)

    def channelLength(self) -> int | None:
        """The body's declared length (None: chunked)."""
        channel: Any = self.channel
        return channel.length if channel is not None else None

    def refuse(self, error: ApiError | Failure) -> None:
        """Answer before the body is read, then close the connection, within
        a few seconds whatever the client still sends.

        A L{Failure} is an internal error: logged with a request id that the
        500 body carries too."""
        if self._refused or self.finished:
            return
        self._refused = True
        self.awaiting_body = False
        # The channel answers "Expect: 100-continue" after gotLength returns;
        # a refused body must not be invited.
        self.requestHeaders.removeHeader(b"expect")
        if self.state.body is not None:
            self.state.body.abort()
        if isinstance(error, ApiError):
            body = encode_json(error_body(error))
        else:
            request_id = uuid.uuid4().hex
            access_log.failure(
                "Internal error while taking a body (request {request_id})", error, request_id=request_id
            )
            error = ApiError(500, "internal_error", "The server failed to answer this request.")
            body = encode_json({**error_body(error), "request_id": request_id})
        self.code = error.status
        self.sentLength = len(body)
        self._log_access()
        self._release()
        channel = self.channel
        if isinstance(channel, VaultChannel):
            channel.close_after(raw_error_response(error, body))
        elif channel is not None:
            transport: Any = channel.transport
            transport.write(raw_error_response(error, body))
            channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        self._processing = True
        self.awaiting_body = False
        if isinstance(self.channel, VaultChannel):
            self.channel.response_started()
        super().requestReceived(command, path, version)

    # -- processing -----------------------------------------------------

    def process(self) -> None:
        self.setHeader(b"cache-control", b"no-store")
        self.setHeader(b"x-content-type-options", b"nosniff")
        self.notifyFinish().addBoth(self._done)
        super().process()

    def _done(self, _: object) -> None:
        self._log_access()
        self._release()

    def _release(self) -> None:
        """Give back what this request held of the memory budget, and stop
        counting it as in progress."""
        held, self.state.reserved_bytes = self.state.reserved_bytes, 0
        self.app.budget.release(held)
        if self._active:
            self._active = False
            limits = self.app.connections
            if limits is not None:
                limits.request_ended()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # server.Request.process sets "TwistedWeb/<version>"; no banner.
            self.setHeader(b"server", b"securevault")
        super().write(data)

    def processingFailed(self, reason: Failure) -> None:
        """An exception escaped a resource: a JSON 500, traceback in the log."""
        if self.finished or request_disconnected(self):
            return None
        if self.startedWriting:
            cast(Any, self.transport).abortConnection()
            return None
        internal_error(self, reason)
        return None

    def connectionLost(self, reason: Failure) -> None:
        if self.state.body is not None and not self.finished:
            self.state.body.abort()
        self.awaiting_body = False
        super().connectionLost(reason)
        self._release()

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
        status = self.code if not request_disconnected(self) or self.finished else "aborted"
        user = self.state.user or "-"
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


@implementer(IHandshakeListener)
class VaultChannel(http.HTTPChannel):
    """HTTP/1.1 under the vault's connection limits.

    - Connections are capped in all (at once) and per client certificate (at
      the handshake, where the certificate is known): past a cap the client
      gets 503 busy and the connection is closed.
    - The head of each request must arrive whole within the idle timeout
      (the idle timeout alone restarts on every byte, so a client trickling
      one header byte at a time would hold a connection for ever; the TLS
      handshake is under this deadline too).
    - A body must arrive, and a response be read, at --min-body-rate over
      any window of --idle-timeout (twisted.web turns its idle timeout off
      while a request is handled): a trickled body is answered 408, a
      response nobody reads is cut.
    - A refusal sent with "Connection: close" is followed by the close within
      a few seconds, whatever the client still sends.
    """

    app: VaultApp
    _head_deadline: IDelayedCall | None = None
    _rate_call: IDelayedCall | None = None
    _close_call: IDelayedCall | None = None
    _phase: str = "idle"  # "body", "response" or "idle"
    _phase_started = 0.0
    _send_blocked = False
    _counted = False
    _claimed: str | None = None
    _saved_timeout: float | None = None
    _host: Any = None
    meter: RateMeter

    def getHost(self) -> Any:
        """The local address, asked of the socket once per connection:
        twisted.web asks for it on every request, and TCP's answer is a
        getsockname() system call each time."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def connectionMade(self) -> None:
        super().connectionMade()
        config = self.app.config
        self.meter = RateMeter(window_seconds=config.idle_timeout, min_rate=config.min_body_rate)
        limits = self.app.connections
        if limits is not None:
            self._counted = True
            if not limits.open():
                self._turn_away("connections")
                return
        self._arm_head_deadline()
        if config.min_body_rate > 0:
            self._rate_call = self.callLater(self.meter.tick_seconds, self._rate_tick)

    def handshakeCompleted(self) -> None:
        """The client certificate is known: count it against its cap."""
        limits = self.app.connections
        identity = client_identity(self.transport)
        if limits is None or identity is None or self._close_call is not None:
            return
        self._claimed = identity.fingerprint
        if not limits.claim(identity.fingerprint):
            self._turn_away("connections_per_certificate")

    def _turn_away(self, reason: str) -> None:
        """503 busy, then close: a cap is reached; everyone else is served."""
        security_log.warn("Turned a connection away: {reason}", reason=reason, event_kind="busy")
        self.app.refusal(reason, None)
        self.close_after(raw_error_response(busy()))

    def close_after(self, response: bytes) -> None:
        """Send a last response and close; cut the connection after
        L{CLOSE_GRACE_SECONDS} if the client has not let it close by then
        (a client that keeps sending would otherwise keep it open)."""
        self._cancel_head_deadline()
        self._stop_rate()
        transport: Any = self.transport
        if transport is None or self._close_call is not None:
            return
        transport.write(response)
        self.loseConnection()
        self._close_call = self.callLater(CLOSE_GRACE_SECONDS, self._cut)

    def _cut(self) -> None:
        self._close_call = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def hold_reading(self) -> None:
        """Stop reading from the client while the vault catches up; its idle
        timeout stops too (it is not the client that is silent)."""
        self._saved_timeout = self.setTimeout(None)
        transport: Any = self.transport
        if transport is not None:
            transport.pauseProducing()

    def release_reading(self) -> None:
        self.setTimeout(self._saved_timeout)
        transport: Any = self.transport
        if transport is not None:
            transport.resumeProducing()

    # -- request heads ----------------------------------------------------

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
        self._phase = "idle"
        super().requestDone(request)

    # -- rates --------------------------------------------------------------

    def body_started(self) -> None:
        self._begin("body")

    def response_started(self) -> None:
        self._begin("response")

    def _begin(self, phase: str) -> None:
        self._phase = phase
        self._phase_started = self._now()
        self.meter.reset()

    def _now(self) -> float:
        return self.app.clock()

    def write(self, data: bytes) -> None:
        self.meter.sent(len(data))
        super().write(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.meter.sent(sum(len(piece) for piece in iovec))
        super().writeSequence(iovec)

    def pauseProducing(self) -> None:
        """The transport's send buffer is full: the client is not reading."""
        self._send_blocked = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._send_blocked = False
        super().resumeProducing()

    def _rate_tick(self) -> None:
        """Every quarter window: judge the body or response under way."""
        self._rate_call = self.callLater(self.meter.tick_seconds, self._rate_tick)
        request = self.requests[-1] if self.requests else None
        body_request = request if isinstance(request, VaultRequest) and request.awaiting_body else None
        if body_request is not None and body_request.body_paused:
            self.meter.hold()
        judged = self._now() - self._phase_started >= self.meter.window_seconds
        if body_request is not None and self._phase == "body" and judged and self.meter.body_too_slow():
            security_log.warn("Answered 408 to a body that arrived too slowly", event_kind="slow_client")
            self.app.refusal("slow_body", self._claimed)
            body_request.refuse(request_timeout())
            return
        if self._phase == "response" and judged and self._send_blocked and self.meter.response_too_slow():
            security_log.warn("Cut a response that was read too slowly", event_kind="slow_client")
            self.app.refusal("slow_reader", self._claimed)
            self._stop_rate()
            transport: Any = self.transport
            if transport is not None:
                transport.abortConnection()
            return
        self.meter.tick(still_held=body_request is not None and body_request.body_paused)

    def _stop_rate(self) -> None:
        if self._rate_call is not None and self._rate_call.active():
            self._rate_call.cancel()
        self._rate_call = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_head_deadline()
        self._stop_rate()
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        limits = self.app.connections
        if limits is not None and self._counted:
            self._counted = False
            limits.close()
            if self._claimed is not None:
                limits.unclaim(self._claimed)
        super().connectionLost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A single head line over 16 KiB: the same JSON 431, then close."""
        self._refuse_head(ApiError(431, "header_too_large", "The request head is larger than 16 KiB."))

    def _refuse_head(self, error: ApiError) -> None:
        self.close_after(raw_error_response(error))

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Malformed framing, with the contract's JSON error instead of
        twisted.web's bare "400 Bad Request" (a private hook of HTTPChannel,
        the one every framing error goes through): 431 for a head over
        16 KiB, else 400 bad_request; then the connection is closed."""
        if head_bytes_received(self) > self.totalHeadersSize:
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
    """Routes exact paths to the endpoints; everything else is a JSON 404.

    The one routing table: twisted.web's traversal and the pipeline's
    routing of bodies (L{VaultRequest.gotLength}) both read it."""

    def __init__(self, endpoints: dict[bytes, JsonEndpoint]) -> None:
        super().__init__()
        self._routes = {b"/" + name: endpoint for name, endpoint in endpoints.items()}
        self._items: dict[bytes, JsonEndpoint] = {}
        for name, endpoint in endpoints.items():
            self.putChild(name, endpoint)

    def mount_collection(self, name: bytes, collection: JsonEndpoint, item: JsonEndpoint) -> None:
        """C{/name} and C{/name/} go to C{collection}, C{/name/<id>} to
        C{item} (one endpoint for every id; it reads the id from the path)."""
        self._routes[b"/" + name] = self._routes[b"/" + name + b"/"] = collection
        self._items[b"/" + name + b"/"] = item
        self.putChild(name, CollectionResource(collection, item))

    def route(self, path: bytes) -> JsonEndpoint | None:
        """The endpoint a path names, else None."""
        endpoint = self._routes.get(path)
        if endpoint is None:
            for prefix, item in self._items.items():
                if path.startswith(prefix) and b"/" not in path[len(prefix) :]:
                    return item
        return endpoint

    def getChild(self, path: bytes, request: Request) -> resource.Resource:
        return JsonNotFound()

    def render(self, request: Request) -> Any:
        fail(request, not_found())
        return NOT_DONE_YET


class CollectionResource(resource.Resource):
    """A collection's path: itself (with or without the slash) and its items."""

    def __init__(self, collection: JsonEndpoint, item: JsonEndpoint) -> None:
        super().__init__()
        self.collection = collection
        self.item = item

    def getChild(self, path: bytes, request: Request) -> resource.Resource:
        return self.collection if path == b"" else self.item

    def render(self, request: Request) -> Any:
        return self.collection.render(request)


def build_root(app: VaultApp) -> RootResource:
    """The resource tree of API.md: one endpoint per path, and the tus
    collection /uploads/ with its uploads /uploads/<id>."""
    root = RootResource(
        {
            b"login": LoginResource(app),
            b"logout": LogoutResource(app),
            b"upload-file": UploadFileResource(app),
            b"get-files": GetFilesResource(app),
            b"download-file": DownloadFileResource(app),
            b"delete-file": DeleteFileResource(app),
            b"health": HealthResource(app),
            b"usage": UsageResource(app),
            b"openapi.json": OpenApiResource(app),
        }
    )
    root.mount_collection(b"uploads", UploadsCollection(app), UploadItem(app))
    return root


class VaultSite(server.Site):
    """The site: our request and channel classes, idle timeout, no banner."""

    def __init__(self, app: VaultApp, *, reactor: Any = None) -> None:
        root = build_root(app)
        super().__init__(root, timeout=app.config.idle_timeout, reactor=reactor)
        self.app = app
        self.displayTracebacks = False

        class _Request(VaultRequest):
            pass

        _Request.app = app
        _Request.root = root
        self.requestFactory = _Request  # type: ignore[assignment]

        class _Channel(VaultChannel):
            pass

        _Channel.app = app
        # HTTP/1.1 only (no ALPN h2); its header block limit is twisted.web's,
        # HEADER_BLOCK_BYTES.
        self.protocol = _Channel  # type: ignore[method-assign,assignment]

    def log(self, request: Any) -> None:
        """Access events come from VaultRequest, without query strings."""
