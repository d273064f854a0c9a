# -*- test-case-name: tests.server.test_openapi -*-
"""GET /openapi.json: the OpenAPI 3.1 document of this server, no session
needed (mutual TLS still is).  Built once, from L{securevault.server.openapi}."""

from __future__ import annotations

from typing import Any

from twisted.web.server import NOT_DONE_YET, Request

from securevault import __version__
from securevault.server.app import VaultApp
from securevault.server.endpoint import JsonEndpoint
from securevault.server.jsonapi import write_json
from securevault.server.openapi import build_document


class OpenApiResource(JsonEndpoint):
    allowedMethods = (b"GET", b"HEAD")
    public = True

    def __init__(self, app: VaultApp) -> None:
        super().__init__(app)
        self.document = build_document(__version__)

    def render_GET(self, request: Request) -> Any:
        write_json(request, 200, self.document)
        return NOT_DONE_YET

    render_HEAD = render_GET
