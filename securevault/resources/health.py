# -*- test-case-name: tests.test_resources -*-
"""GET /health: liveness, no session needed (mutual TLS still is)."""

from __future__ import annotations

from typing import Any

from twisted.web.server import NOT_DONE_YET, Request

from securevault import __version__
from securevault.jsonapi import JsonEndpoint, write_json


class HealthResource(JsonEndpoint):
    allowedMethods = (b"GET", b"HEAD")

    def render_GET(self, request: Request) -> Any:
        write_json(request, 200, {"status": "ok", "version": __version__})
        return NOT_DONE_YET

    render_HEAD = render_GET
