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
        app = self.app
        storage = app.storage

        def listed(infos: list[ArchiveInfo]) -> Reply:
            return Reply(200, {"files": [info.public() for info in infos]})

        def from_memory(session: Session) -> Reply | Deferred[Reply]:
            """One node keeps listings in memory too: no trip to the pool."""
            cached = storage.cached_list(session.user_id)
            if cached is not None:
                return listed(cached)
            return app.run_blocking(storage.list, session.user_id).addCallback(listed)

        if app.sessions.mirrored:
            return self.authenticated(request, from_memory)
        return self.in_session(request, lambda session: storage.list(session.user_id), lambda _, infos: listed(infos))

    render_HEAD = render_GET
