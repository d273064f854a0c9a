# -*- test-case-name: tests.server.test_resources -*-
"""GET /get-files: the caller's archives, newest first."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from securevault.core.archive import ArchiveInfo
from securevault.core.sessions import Session
from securevault.server.endpoint import JsonEndpoint
from securevault.server.jsonapi import Reply


class GetFilesResource(JsonEndpoint):
    allowedMethods = (b"GET", b"HEAD")

    def render_GET(self, request: Request) -> Any:
        def listed(infos: list[ArchiveInfo]) -> Reply:
            return Reply(200, {"files": [info.public() for info in infos]})

        app = self.app
        storage = app.storage
        if app.sessions.mirrored:  # one node: session and listing may be in memory

            def from_memory(session: Session) -> Reply | Deferred[Reply]:
                cached = storage.cached_list(session.user_id)
                if cached is not None:
                    return listed(cached)
                return app.run_blocking(storage.list, session.user_id).addCallback(listed)

            return self.authenticated(request, from_memory)
        work = app.with_session(request, lambda session: storage.list(session.user_id))
        return self.respond_later(request, work.addCallback(listed))

    render_HEAD = render_GET
