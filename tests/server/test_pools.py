"""The worker pool service and the two ways code reaches a pool."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from securevault.server.pools import ThreadPoolService, run_inline
from tests.support.testcase import AsyncTestCase, SyncTestCase


class RunInlineTests(SyncTestCase):
    """run_inline: the tests' RunBlocking, synchronous but Deferred-shaped."""

    def test_result(self) -> None:
        """The callable runs at once and its result fires the Deferred."""
        self.assertEqual(self.successResultOf(run_inline(lambda a, b: a + b, 2, b=3)), 5)

    def test_failure(self) -> None:
        """An exception becomes the Deferred's failure, not a raise."""

        def explode() -> None:
            raise ValueError("boom")

        self.failureResultOf(run_inline(explode), ValueError)


class ThreadPoolServiceTests(AsyncTestCase):
    """The daemon's pool starts and stops with its service."""

    def test_start_run_stop(self) -> Deferred[None]:
        """startService starts the pool, work runs off the reactor thread,
        and stopService joins the workers."""
        from twisted.internet import reactor as global_reactor

        reactor: Any = global_reactor
        pool = ThreadPool(minthreads=0, maxthreads=2, name="test")
        service = ThreadPoolService(pool)
        service.startService()
        self.assertTrue(pool.started)
        main = threading.get_ident()

        def check(ident: int) -> None:
            self.assertNotEqual(ident, main)
            service.stopService()
            self.assertFalse(pool.started)
            self.assertFalse(any(thread.is_alive() for thread in pool.threads))

        return deferToThreadPool(reactor, pool, threading.get_ident).addCallback(check)
