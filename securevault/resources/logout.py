# -*- test-case-name: tests.server.test_resources -*-
"""POST /logout: ends the caller's session, on every node."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from securevault.core.sessions import Session
from securevault.server.endpoint import JsonEndpoint
from securevault.server.jsonapi import Reply


class LogoutResource(JsonEndpoint):
    allowedMethods = (b"POST",)

    def render_POST(self, request: Request) -> Any:
        def end(session: Session) -> Deferred[Reply]:
            def ended(_: None) -> Deferred[Reply]:
                return self.app.record("logout", request, user=session.username).addCallback(lambda _: Reply(204))

            return self.app.run_blocking(self.app.sessions.end, session.session_id).addCallback(ended)

        return self.authenticated(request, end)
