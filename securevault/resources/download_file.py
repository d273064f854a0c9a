# -*- test-case-name: tests.server.test_resources -*-
"""GET /download-file: an archive's original bytes, as JSON or a raw stream.

Both forms stream from the pool through a push producer.  The raw form reads
its first block before sending headers, so an archive that fails at once gets
a JSON 500; a later failure aborts the stream.  The JSON form authenticates
the whole archive first (AES-GCM is fast), because a JSON client must get
either the whole content or a 500.

The raw form honours one C{Range} (RFC 9110; L{securevault.server.byteranges}):
206 with only those bytes, read by L{SecureFileStorage.open_range}, which
decrypts only the chunks they are in (a stored archive) or inflates from the
start (a deflated one).  The range is resolved in the pool, where the
archive's size and ETag are known: 416 when it does not overlap the file, the
whole file when C{If-Range} names another ETag.  The JSON form ignores Range.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from securevault.core.archive import (
    BULK_READ_BLOCK_BYTES,
    IO_BLOCK_BYTES,
    ArchiveInfo,
    ArchiveNotFound,
    IntegrityError,
)
from securevault.core.ranges import PlaintextReader
from securevault.core.sessions import Session
from securevault.server.byteranges import ByteRange, if_range_allows, parse_range, resolve_range
from securevault.server.endpoint import JsonEndpoint
from securevault.server.errors import ApiError, bad_request, busy, not_found
from securevault.server.jsonapi import JSON_CONTENT_TYPE, encode_json, fail, integrity_failure
from securevault.server.state import request_state
from securevault.server.streaming import Base64Encoder, DownloadProducer, base64_length
from securevault.storage import SecureFileStorage

log = Logger(namespace="securevault.security")

# JSON answers up to this size are built whole in the pool.
SMALL_JSON_BYTES = 1 << 20
# What one download holds at most, counted against the memory budget: the
# reader's buffers and two blocks in flight, at the larger size a fast
# download reaches (raw); a JSON answer built whole, with its base64 (JSON).
RAW_BUFFER_BYTES = 2 * BULK_READ_BLOCK_BYTES + IO_BLOCK_BYTES
JSON_BUFFER_BYTES = 3 * SMALL_JSON_BYTES + RAW_BUFFER_BYTES


class RangeNotSatisfiable(Exception):
    """The requested range does not overlap the file (raised in the pool,
    answered 416 on the reactor thread)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


@dataclass
class Opened:
    """What the pool hands back: the archive and how to send it."""

    info: ArchiveInfo
    reader: PlaintextReader | None
    first: bytes
    whole: bytes | None = None
    # The half-open span of a 206 answer; None: the whole file.
    span: tuple[int, int] | None = None


def etag(info: ArchiveInfo) -> bytes:
    """A raw download's strong validator: the file's SHA-256, quoted."""
    return b'"' + info.sha256.encode("ascii") + b'"'


def open_download(
    storage: SecureFileStorage,
    owner_id: str,
    archive_id: str | None,
    filename: str | None,
    raw: bool,
    wanted: ByteRange | None = None,
    if_range: bytes | None = None,
) -> Opened:
    """Find and open the archive (only C{wanted}'s bytes of it, for a raw
    download whose range holds); runs in the pool."""
    if archive_id is None:
        assert filename is not None
        archive_id = storage.find_newest(owner_id, filename).id
    if raw and wanted is not None:
        info = storage.info(owner_id, archive_id)
        if if_range_allows(if_range, etag(info)):
            span = resolve_range(wanted, info.size)
            if span is None:
                raise RangeNotSatisfiable(info.size)
            ranged = storage.open_range(owner_id, archive_id, *span)
            try:
                first = ranged.read()
            except BaseException:
                ranged.close()
                raise
            return Opened(ranged.info, ranged, first, span=span)
    if not raw:
        info = storage.info(owner_id, archive_id)
        if info.size <= SMALL_JSON_BYTES:
            info, content = storage.read_all(owner_id, archive_id)
            return Opened(info, None, b"", whole=content)
        storage.authenticate(owner_id, archive_id)
    reader = storage.open(owner_id, archive_id)
    try:
        first = reader.read()
    except BaseException:
        reader.close()
        raise
    return Opened(reader.info, reader, first)


def content_disposition(filename: str) -> bytes:
    return b"attachment; filename*=UTF-8''" + quote(filename, safe="").encode("ascii")


def wants_raw(request: Request) -> bool:
    accept = (request.getHeader(b"accept") or b"").lower()
    return b"application/octet-stream" in accept


def single_header(request: Request, name: bytes) -> bytes | None:
    """The header's value, or None when it is absent or given more than
    once (a repeated Range or If-Range is not a single validator)."""
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values is not None and len(values) == 1 else None


def range_not_satisfiable(size: int) -> ApiError:
    return ApiError(
        416,
        "range_not_satisfiable",
        f"The requested range is outside the file's {size} bytes.",
        {b"Content-Range": b"bytes */%d" % size, b"Accept-Ranges": b"bytes"},
    )


def single_arg(request: Request, name: bytes) -> str | None:
    args = cast("dict[bytes, list[bytes]]", request.args or {})
    values = args.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise bad_request(f"Give {name.decode()} once.")
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise bad_request(f"The {name.decode()} parameter is not valid UTF-8.") from None


class DownloadFileResource(JsonEndpoint):
    allowedMethods = (b"GET",)

    def render_GET(self, request: Request) -> Any:
        app = self.app
        raw = wants_raw(request)
        state = request_state(request)
        lost: list[Failure] = []
        try:
            archive_id = single_arg(request, b"id")
            filename = single_arg(request, b"filename")
            if (archive_id is None) == (filename is None):
                raise bad_request("Give exactly one of 'id' and 'filename'.")
            args_error: ApiError | None = None
        except ApiError as error:  # answered only to a caller with a session
            archive_id = filename = None
            args_error = error

        # Range and If-Range are read for the raw form only (the JSON form
        # ignores them); which bytes they select is decided in the pool.
        wanted = parse_range(single_header(request, b"range")) if raw else None
        if_range = single_header(request, b"if-range") if wanted is not None else None
        if wanted is not None and request.requestHeaders.hasHeader(b"if-range") and if_range is None:
            wanted = None  # several If-Range values: none can match

        def open_it(session: Session) -> Opened:
            if args_error is not None:
                raise args_error
            return open_download(app.storage, session.user_id, archive_id, filename, raw, wanted, if_range)

        reserve = RAW_BUFFER_BYTES if raw else JSON_BUFFER_BYTES
        if not app.budget.reserve(reserve):
            fail(request, busy())
            return NOT_DONE_YET
        state.reserved_bytes += reserve
        # Not cancelled when the client leaves: the archive it opens must be
        # closed by whoever gets it (see opened).
        work = app.with_session(request, open_it)
        request.notifyFinish().addErrback(lost.append)

        def opened(found: tuple[Session, Opened | None]) -> None:
            result = found[1]
            assert result is not None

            def close() -> None:
                if result.reader is not None:
                    app.run_blocking(result.reader.close)

            if lost:
                close()
                return
            info = result.info
            log.info("Download of archive {archive_id}", archive_id=info.id, event_kind="download")

            def audited(_: None) -> None:
                """The record is synced: now the bytes may go out."""
                if lost:
                    close()
                    return
                request.setResponseCode(200)
                if raw:
                    self._start_raw(request, result)
                else:
                    self._start_json(request, result)

            def unaudited(reason: Failure) -> None:
                close()
                if not lost:
                    fail(request, reason)  # AuditUnavailable: 503

            fields: dict[str, Any] = {"user": state.user, "archive_id": info.id, "size": info.size}
            if result.span is not None:
                fields["range"] = f"{result.span[0]}-{result.span[1] - 1}"
            audit = app.record("download", request, **fields)
            audit.addCallbacks(audited, unaudited)

        def failed(reason: Failure) -> None:
            if lost or reason.check(CancelledError):
                return
            if reason.check(ArchiveNotFound):
                fail(request, not_found("No such archive."))
            elif reason.check(RangeNotSatisfiable):
                fail(request, range_not_satisfiable(cast(RangeNotSatisfiable, reason.value).size))
            elif reason.check(IntegrityError):

                def answer(_: object) -> None:
                    """A 500 whether or not the record could be written (the
                    trail logs that): the client must learn the archive is bad."""
                    if not lost:
                        integrity_failure(request, archive_id or "(by filename)")

                self._integrity_error(request, archive_id).addBoth(answer)
            else:
                fail(request, reason)

        work.addCallbacks(opened, failed)
        return NOT_DONE_YET

    def _integrity_error(self, request: Request, archive_id: str | None) -> Deferred[None]:
        """Audited and counted, whether the archive failed before the
        headers (a JSON 500) or while streaming (an aborted stream)."""
        return self.app.record("integrity_error", request, user=request_state(request).user, archive_id=archive_id)

    def _producer(self, request: Request, result: Opened, **options: Any) -> DownloadProducer:
        assert result.reader is not None
        archive_id = result.info.id

        def mid_stream() -> None:
            """Headers are out and the stream is aborted: only the record
            is left to do."""
            self._integrity_error(request, archive_id).addErrback(
                lambda failure: log.failure("Could not audit an integrity failure", failure)
            )

        return DownloadProducer(
            self.app.run_blocking,
            result.reader,
            request,
            first=result.first,
            on_integrity_error=mid_stream,
            **options,
        )

    def _start_raw(self, request: Request, result: Opened) -> None:
        info = result.info
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"accept-ranges", b"bytes")
        if result.span is None:
            request.setHeader(b"content-length", str(info.size).encode("ascii"))
        else:
            start, end = result.span
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end - 1, info.size))
            request.setHeader(b"content-length", str(end - start).encode("ascii"))
        request.setHeader(b"content-disposition", content_disposition(info.filename))
        request.setHeader(b"etag", etag(info))
        self._producer(request, result).start()

    def _start_json(self, request: Request, result: Opened) -> None:
        info = result.info
        head = encode_json({k: v for k, v in info.public().items() if k != "created_at"})
        prefix = head[:-1] + b',"content":"'
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        if result.whole is not None:
            payload = prefix + base64.b64encode(result.whole) + b'"}'
            request.setHeader(b"content-length", str(len(payload)).encode("ascii"))
            request.write(payload)
            request.finish()
            return
        length = len(prefix) + base64_length(info.size) + 2
        request.setHeader(b"content-length", str(length).encode("ascii"))
        request.write(prefix)
        encoder = Base64Encoder()
        self._producer(request, result, encode=encoder, suffix=lambda: encoder.flush() + b'"}').start()
