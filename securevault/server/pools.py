# -*- test-case-name: tests.server.test_pools -*-
"""The thread pools that run every blocking call, and how code reaches them
(not the worker processes of --workers: see supervisor.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
R = TypeVar("R")


class RunBlocking(Protocol):
    """Runs a blocking callable off the reactor thread; its result comes back
    through the Deferred only."""

    def __call__(self, function: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]: ...


def run_inline(function: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
    """A L{RunBlocking} for tests: runs the call at once, on this thread."""
    return maybeDeferred(function, *args, **kwargs)


class ThreadPoolService(Service):
    """Owns the worker pool: started with the daemon, stopped after the listener."""

    def __init__(self, pool: ThreadPool) -> None:
        self._pool = pool

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()  # joins the workers
