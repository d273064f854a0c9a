# -*- test-case-name: tests.test_resources -*-
"""GET /get-files: the caller's archives, newest first."""

from __future__ import annotations

from typing import Any

from twisted.web.server import NOT_DONE_YET, Request

from securevault.jsonapi import JsonEndpoint, Reply, write_json
from securevault.storage import ArchiveInfo


class GetFilesResource(JsonEndpoint):
    allowedMethods = (b"GET", b"HEAD")

    def render_GET(self, request: Request) -> Any:
        session = self.app.authenticate(request)

        def listed(infos: list[ArchiveInfo]) -> Reply:
            return Reply(200, {"files": [info.public() for info in infos]})

        cached = self.app.storage.cached_list(session.user_id)
        if cached is not None:
            write_json(request, 200, listed(cached).body)
            return NOT_DONE_YET
        work = self.app.run_blocking(self.app.storage.list, session.user_id)
        return self.respond_later(request, work.addCallback(listed))

    render_HEAD = render_GET
