# -*- test-case-name: tests.test_resources -*-
"""POST /logout: ends the caller's session."""

from __future__ import annotations

from typing import Any

from twisted.web.server import NOT_DONE_YET, Request

from securevault.jsonapi import JsonEndpoint, write_json


class LogoutResource(JsonEndpoint):
    allowedMethods = (b"POST",)

    def render_POST(self, request: Request) -> Any:
        session = self.app.authenticate(request)
        self.app.sessions.end(session.session_id)
        self.app.record("logout", request, user=session.username)
        write_json(request, 204, None)
        return NOT_DONE_YET
