# -*- test-case-name: tests.server.test_resources -*-
"""GET /health: liveness, no session needed (mutual TLS still is)."""

from __future__ import annotations

from typing import Any

from twisted.web.server import NOT_DONE_YET, Request

from securevault import __version__
from securevault.server.endpoint import JsonEndpoint
from securevault.server.jsonapi import write_json


class HealthResource(JsonEndpoint):
    allowedMethods = (b"GET", b"HEAD")

    def render_GET(self, request: Request) -> Any:
        write_json(request, 200, {"status": "ok", "version": __version__})
        return NOT_DONE_YET

    render_HEAD = render_GET
