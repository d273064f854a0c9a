"""The supervisor of C{--workers N}, with fake processes and a fake clock:
who starts when, restarts and their back-off, giving up, forwarding signals,
stopping, and worker output in the log.  tests.test_workers_daemon runs the
real thing."""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from securevault.server.config import VaultConfig
from securevault.server.supervisor import (
    CRASH_LIMIT,
    CRASH_WINDOW_SECONDS,
    LISTEN_FD,
    READY_FD,
    RESTART_DELAYS,
    WORKER_STOP_SECONDS,
    Supervisor,
    WorkerProcess,
)
from tests.support.testcase import SyncTestCase


class FakeProcess:
    """A process transport that records what is sent to it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeReactor(Clock):
    """A clock that spawns fake processes and runs calls at once."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[WorkerProcess, FakeProcess, dict[str, str], dict[int, Any]]] = []
        self.stopped = False
        self._pids = itertools.count(1000)

    def spawnProcess(
        self, protocol: WorkerProcess, executable: str, args: list[str], env: dict[str, str], path: str, childFDs: Any
    ) -> FakeProcess:
        process = FakeProcess(next(self._pids))
        self.spawned.append((protocol, process, env, childFDs))
        protocol.makeConnection(process)
        return process

    def callWhenRunning(self, function: Any, *args: Any) -> None:
        function(*args)

    def callFromThread(self, function: Any, *args: Any) -> None:
        function(*args)

    def stop(self) -> None:
        self.stopped = True


def killed(number: int = 9) -> Failure:
    return Failure(ProcessTerminated(signal=number))


class SupervisorTests(SyncTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.failures: list[None] = []
        self.announced: list[tuple[str, int]] = []
        capturing = capturedLogs()
        self.events: Sequence[dict[str, Any]] = capturing.__enter__()
        self.addCleanup(capturing.__exit__, None, None, None)
        data = self.make_dir()
        self.config = VaultConfig(port=0, interface="127.0.0.1", workers=2, data_dir=data, cert=Path("no.crt"))
        self.supervisor = Supervisor(
            self.reactor,
            self.config,
            {"port": 0, "workers": 2},
            lambda host, port: self.announced.append((host, port)),
            at_failure=lambda: self.failures.append(None),
        )
        self.supervisor.privilegedStartService()
        self.addCleanup(self._stop_if_running)

    def _stop_if_running(self) -> None:
        if self.supervisor.running:
            stopping = self.supervisor.stopService()
            for worker in list(self.supervisor.workers.values()):
                worker.processEnded(Failure(ProcessDone(0)))
            self.successResultOf(stopping)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event_kind") == kind]

    def start_all(self) -> None:
        self.supervisor.startService()
        self.supervisor.workers[1].childDataReceived(READY_FD, b"ready\n")
        self.supervisor.workers[2].childDataReceived(READY_FD, b"ready\n")

    def test_first_worker_starts_alone(self) -> None:
        """Worker 1 starts alone and removes crash debris; the others start
        once it serves, without; the URL is logged once, when all serve.
        Each gets the options on stdin, the socket as fd 3."""
        self.supervisor.startService()
        self.assertEqual(len(self.reactor.spawned), 1)
        worker, process, env, child_fds = self.reactor.spawned[0]
        spec = json.loads(process.written)
        self.assertEqual((spec["number"], spec["recover"], spec["options"]), (1, True, {"port": 0, "workers": 2}))
        self.assertTrue(process.written.endswith(b"\n"))
        assert self.supervisor.socket is not None
        self.assertEqual(child_fds[LISTEN_FD], self.supervisor.socket.fileno())
        self.assertEqual(self.announced, [])
        worker.childDataReceived(READY_FD, b"ready\n")
        self.assertEqual(len(self.reactor.spawned), 2)
        second = json.loads(self.reactor.spawned[1][1].written)
        self.assertEqual((second["number"], second["recover"]), (2, False))
        self.assertEqual(self.announced, [])
        self.supervisor.workers[2].childDataReceived(READY_FD, b"ready\n")
        self.assertEqual(self.announced, [("127.0.0.1", self.supervisor.socket.getsockname()[1])])

    def test_ended_worker_restarted_with_back_off(self) -> None:
        """A worker that ends is logged with its pid and signal and started
        again, later each time while they keep ending."""
        self.start_all()
        for delay in RESTART_DELAYS[: CRASH_LIMIT - 1]:
            worker = self.supervisor.workers[1]
            count = len(self.reactor.spawned)
            worker.processEnded(killed())
            ended = self.kinds("worker_ended")[-1]
            self.assertEqual(
                (ended["pid"], ended["how"], ended["delay"]), (worker.pid, "killed by signal 9 (SIGKILL)", delay)
            )
            if delay:
                self.reactor.advance(delay - 0.01)
                self.assertEqual(len(self.reactor.spawned), count)
            self.reactor.advance(0.01 if delay else 0)
            self.assertEqual(len(self.reactor.spawned), count + 1)
            self.assertEqual(json.loads(self.reactor.spawned[-1][1].written)["recover"], False)
        self.assertEqual(self.failures, [])
        self.assertFalse(self.reactor.stopped)

    def test_gives_up_when_workers_keep_ending(self) -> None:
        """CRASH_LIMIT ends within the window stop the daemon, status 1."""
        self.start_all()
        for _ in range(CRASH_LIMIT - 1):
            self.supervisor.workers[2].processEnded(Failure(ProcessTerminated(exitCode=3)))
            self.reactor.advance(max(RESTART_DELAYS))
        count = len(self.reactor.spawned)
        self.supervisor.workers[2].processEnded(Failure(ProcessTerminated(exitCode=3)))
        self.assertEqual(self.failures, [None])
        self.assertTrue(self.reactor.stopped)
        self.assertEqual(self.kinds("workers_failed")[0]["log_level"], LogLevel.critical)
        self.reactor.advance(max(RESTART_DELAYS))
        self.assertEqual(len(self.reactor.spawned), count)

    def test_spread_out_ends_never_give_up(self) -> None:
        """Ends further apart than the window are restarted at once, however many."""
        self.start_all()
        for _ in range(CRASH_LIMIT * 2):
            self.supervisor.workers[1].processEnded(killed())
            self.reactor.advance(CRASH_WINDOW_SECONDS)
        self.assertEqual(self.failures, [])
        self.assertEqual(len(self.reactor.spawned), 2 + CRASH_LIMIT * 2)

    def test_worker_that_cannot_start(self) -> None:
        """A worker that ends before it ever served stops the daemon."""
        self.supervisor.startService()
        self.supervisor.workers[1].processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertEqual(self.failures, [None])
        self.assertTrue(self.reactor.stopped)
        self.assertIn("could not start: exited with status 1", self.kinds("workers_failed")[0]["why"])

    def test_stop_terminates_then_kills(self) -> None:
        """Stopping sends SIGTERM to every worker, SIGKILL to those still
        running after WORKER_STOP_SECONDS, restarts none, and is done when
        the last has ended; the socket is closed."""
        self.start_all()
        processes = [process for _, process, _, _ in self.reactor.spawned]
        stopping = self.supervisor.stopService()
        self.assertEqual([p.signals for p in processes], [["TERM"], ["TERM"]])
        self.supervisor.workers[1].processEnded(Failure(ProcessDone(0)))
        self.assertNoResult(stopping)
        self.reactor.advance(WORKER_STOP_SECONDS)
        self.assertEqual([p.signals for p in processes], [["TERM"], ["TERM", "KILL"]])
        self.supervisor.workers[2].processEnded(killed())
        self.successResultOf(stopping)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertIsNone(self.supervisor.socket)

    def test_sighup_forwarded(self) -> None:
        """SIGHUP to the parent is sent on to every worker."""
        self.start_all()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual([p.signals for _, p, _, _ in self.reactor.spawned], [["HUP"], ["HUP"]])

    def test_worker_output_logged_by_line(self) -> None:
        """Each line a worker writes is logged, prefixed by its number, at
        the level it names (stderr lines without one: warn); a last line
        without its newline is logged when the worker ends."""
        self.start_all()
        worker = self.supervisor.workers[2]
        worker.childDataReceived(1, b"warn disk nearly full\ninfo GET /get")
        worker.childDataReceived(1, b"-files 200\ninfo half")
        worker.childDataReceived(2, b"Traceback (most recent call last):\n")
        worker.processEnded(killed(15))
        lines = [(e["log_level"], e["line"]) for e in self.events if e.get("worker") == 2 and "line" in e]
        self.assertEqual(
            lines,
            [
                (LogLevel.warn, "disk nearly full"),
                (LogLevel.info, "GET /get-files 200"),
                (LogLevel.warn, "Traceback (most recent call last):"),
                (LogLevel.info, "half"),
            ],
        )
