# -*- test-case-name: tests.server.test_resources -*-
"""POST /upload-file: one file becomes one encrypted archive.

The raw form (application/octet-stream) was already streaming into the pool
while its body arrived (see VaultRequest); the JSON form is parsed and stored
in the pool, since a 64 MiB JSON body would stall the reactor.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from securevault.core.archive import ArchiveInfo, InvalidFilename, check_filename
from securevault.core.sessions import Session
from securevault.server.app import SessionRefused
from securevault.server.endpoint import JsonEndpoint
from securevault.server.errors import ApiError, bad_request, storage_error
from securevault.server.jsonapi import Reply, decode_json_object
from securevault.storage import SecureFileStorage

log = Logger(namespace="securevault.security")


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
    remaining = None if quota is None else max(0, quota - storage.usage(owner_id))
    return storage.store(owner_id, filename, data, max_bytes=remaining)


class UploadFileResource(JsonEndpoint):
    allowedMethods = (b"POST",)

    def render_POST(self, request: Request) -> Any:
        app = self.app
        upload = getattr(request, "upload", None)
        if upload is not None:
            work = upload.finish()
        else:

            def store(session: Session) -> Deferred[ArchiveInfo]:
                kind = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
                if kind != b"application/json":
                    raise ApiError(
                        415,
                        "unsupported_media_type",
                        "Send application/json or application/octet-stream with X-Filename.",
                    )
                raw = request.content.read() if request.content is not None else b""
                return app.run_blocking(store_json_upload, app.storage, session.user_id, raw, app.config.quota)

            work = app.authenticate(request).addCallback(store)

        def stored(info: ArchiveInfo) -> Reply:
            log.info(
                "Stored archive {archive_id} ({size} bytes)",
                archive_id=info.id,
                size=info.size,
                event_kind="upload",
            )
            app.record("upload", request, user=getattr(request, "vault_user", None), archive_id=info.id, size=info.size)
            return Reply(201, info.public())

        def failed(failure: Failure) -> None:
            if upload is not None and failure.check(SessionRefused):
                app.refused(request)
            raise storage_error(failure)

        return self.respond_later(request, work.addCallbacks(stored, failed))
