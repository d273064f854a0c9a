# -*- test-case-name: tests.server.test_pipeline -*-
"""What the vault knows about one request, typed, in one place.

The pipeline learns things about a request at different moments (the
certificate at the handshake, the session in the pool, the body receiver
when the head is complete, a request id on a 500); they live in one
L{RequestState} instead of ad-hoc attributes set on twisted.web's Request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from weakref import WeakKeyDictionary

from twisted.python.failure import Failure
from twisted.web.server import Request

from securevault.core.sessions import Session
from securevault.server.errors import ApiError
from securevault.server.tls import ClientIdentity


def _nothing() -> None:
    pass


class BodyReceiver(Protocol):
    """Takes a request body as it arrives, instead of twisted.web's buffer
    (a resource returns one from C{receive_body})."""

    def feed(self, data: bytes) -> None:
        """The next bytes of the body, in order."""

    def abort(self) -> None:
        """The request was refused or the client left: keep nothing."""


@dataclass
class RequestState:
    """The vault's view of one request."""

    identity: ClientIdentity | None = None
    session: Session | None = None
    # Who the access log names: the session's user, or the user a login
    # succeeded for.
    user: str | None = None
    body: BodyReceiver | None = None
    request_id: str | None = None
    # Bytes of the memory budget this request holds (body and response buffers).
    reserved_bytes: int = 0
    # Set by the pipeline for a body receiver: stop and restart reading the
    # body (back-pressure; the rate limit excuses the client meanwhile), and
    # refuse the request while its body is still arriving.
    pause_body: Callable[[], None] = _nothing
    resume_body: Callable[[], None] = _nothing
    refuse: Callable[[ApiError | Failure], None] | None = None


class StatefulRequest(Request):
    """A request that carries its state itself (the pipeline's
    VaultRequest).  Its state may refer back to it (the pipeline's callbacks
    do): an ordinary reference cycle, freed with the request."""

    state: RequestState


# Requests that are not ours (twisted.web's DummyRequest in unit tests) get
# their state here.  Such a state must never refer to its request: the
# dictionary's value would then keep its own key alive for ever.
_states: WeakKeyDictionary[Request, RequestState] = WeakKeyDictionary()


def request_state(request: Request) -> RequestState:
    """The state of C{request}, created on first use; it goes with the request."""
    if isinstance(request, StatefulRequest):
        return request.state
    state = _states.get(request)
    if state is None:
        state = _states[request] = RequestState()
    return state
