# -*- test-case-name: tests.test_resources -*-
"""GET /get-files: the caller's archives, newest first."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from securevault.jsonapi import JsonEndpoint, Reply
from securevault.sessions import Session
from securevault.storage import ArchiveInfo


class GetFilesResource(JsonEndpoint):
    allowedMethods = (b"GET", b"HEAD")

    def render_GET(self, request: Request) -> Any:
        def listed(infos: list[ArchiveInfo]) -> Reply:
            return Reply(200, {"files": [info.public() for info in infos]})

        def list_files(session: Session) -> "Deferred[Reply]":
            return self.app.run_blocking(self.app.storage.list, session.user_id).addCallback(listed)

        return self.authenticated(request, list_files)

    render_HEAD = render_GET
