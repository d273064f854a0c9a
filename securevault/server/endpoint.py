# -*- test-case-name: tests.server.test_resources -*-
"""JsonEndpoint: the base of every endpoint (method check, exact paths, error
mapping, replies that arrive later and clients that leave meanwhile)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from securevault.core.sessions import Session
from securevault.server.app import VaultApp
from securevault.server.errors import ApiError, not_found
from securevault.server.jsonapi import Reply, fail, write_json
from securevault.server.state import BodyReceiver

R = TypeVar("R")


# Bodies of requests other than uploads are small JSON objects.
SMALL_BODY_BYTES = 64 * 1024


class JsonEndpoint(Resource):
    """Base of every endpoint: method check, error mapping, async replies.

    The pipeline (L{securevault.server.web.VaultRequest}) asks the endpoint
    a request is routed to, as soon as the request head is complete, how
    large a body it takes (L{body_limit}) and whether it takes the body
    itself as it streams in (L{receive_body}); every other body is held in
    memory, within the memory budget, and read in C{render_*}.
    """

    isLeaf = True
    allowedMethods: tuple[bytes, ...] = ()
    # No session needed (mutual TLS still is): /health and the like.
    public = False

    def __init__(self, app: VaultApp) -> None:
        super().__init__()
        self.app = app

    def body_limit(self, request: Request) -> int:
        """The largest body this request may carry; 413 past it."""
        return SMALL_BODY_BYTES

    def body_cost(self, request: Request, size: int) -> int:
        """The memory a buffered body of C{size} bytes costs while this
        endpoint handles it (counted against --memory-budget)."""
        return size

    def receive_body(self, request: Request) -> BodyReceiver | None:
        """A receiver that takes this request's body as it arrives, or None
        to have it buffered.  Called once the head is complete; may raise an
        L{ApiError} to refuse the request before its body is read."""
        return None

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

    def in_session(
        self,
        request: Request,
        work: Callable[[Session], R],
        then: Callable[[Session, R], Reply | Deferred[Reply]],
    ) -> Any:
        """Answer with C{then(session, work(session))}: C{work} runs in the
        pool, in the same pool call that finds the session where it can."""

        def answer(found: tuple[Session, R | None]) -> Reply | Deferred[Reply]:
            return then(found[0], cast(R, found[1]))

        return self.respond_later(request, self.app.with_session(request, work).addCallback(answer))

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
