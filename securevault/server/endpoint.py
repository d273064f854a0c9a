# -*- test-case-name: tests.server.test_resources -*-
"""JsonEndpoint: the base of every endpoint (method check, exact paths, error
mapping, replies that arrive later and clients that leave meanwhile)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from securevault.core.sessions import Session
from securevault.server.app import VaultApp
from securevault.server.errors import ApiError, not_found
from securevault.server.jsonapi import Reply, fail, write_json


class JsonEndpoint(Resource):
    """Base of every endpoint: method check, error mapping, async replies."""

    isLeaf = True
    allowedMethods: tuple[bytes, ...] = ()

    def __init__(self, app: VaultApp) -> None:
        super().__init__()
        self.app = app

    def render(self, request: Request) -> Any:
        if request.postpath:  # paths match exactly: /health/x and /login/ are unknown
            fail(request, not_found())
            return NOT_DONE_YET
        if request.method not in self.allowedMethods:
            request.setHeader(b"allow", b", ".join(self.allowedMethods))
            fail(request, ApiError(405, "method_not_allowed", "Method not allowed."))
            return NOT_DONE_YET
        try:
            return super().render(request)
        except ApiError as error:  # cheap synchronous validation
            fail(request, error)
            return NOT_DONE_YET

    def authenticated(self, request: Request, then: Callable[[Session], Reply | Deferred[Reply]]) -> Any:
        """Answer with C{then(session)} once the caller's session is found;
        401 invalid_session when there is none."""
        return self.respond_later(request, self.app.authenticate(request).addCallback(then))

    def respond_later(self, request: Request, work: Deferred[Reply]) -> Any:
        """Finish the request from C{work}; a client that leaves cancels it."""
        lost: list[Failure] = []

        def left(reason: Failure) -> None:
            lost.append(reason)
            work.cancel()

        request.notifyFinish().addErrback(left)

        def done(reply: Reply) -> None:
            if not lost:
                write_json(request, reply.status, reply.body, reply.headers)

        def failed(reason: Failure) -> None:
            if not lost and not reason.check(CancelledError):
                fail(request, reason)

        work.addCallbacks(done, failed)
        return NOT_DONE_YET
