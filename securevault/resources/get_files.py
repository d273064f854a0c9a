# -*- test-case-name: tests.test_resources -*-
"""GET /get-files: the caller's archives, newest first."""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from securevault.jsonapi import JsonEndpoint, Reply
from securevault.storage import ArchiveInfo


class GetFilesResource(JsonEndpoint):
    allowedMethods = (b"GET", b"HEAD")

    def render_GET(self, request: Request) -> Any:
        def listed(infos: list[ArchiveInfo]) -> Reply:
            return Reply(200, {"files": [info.public() for info in infos]})

        storage = self.app.storage
        work = self.app.with_session(request, lambda session: storage.list(session.user_id))
        return self.respond_later(request, work.addCallback(listed))

    render_HEAD = render_GET
