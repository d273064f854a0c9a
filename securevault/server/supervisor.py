# -*- test-case-name: tests.test_workers_daemon -*-
"""C{--workers N}: one supervising parent, N worker processes, one socket.

One reactor thread carries all TLS of a process, so one process cannot use
more than about one core for it.  With N > 1 the twistd process becomes a
parent that serves no request itself: it keeps what twistd gives it (the
pidfile, logging, daemonizing), holds the data directory's lock, binds the
listening socket once, and runs N copies of the daemon
(L{securevault.server.worker}) that each accept connections on it (the
kernel hands each new connection to one of them).

The workers share what several nodes share: the metadata store (sessions,
login throttling, quotas, session revocation) and the blob store; each keeps
sessions and listings in memory only while the shared generation
(L{securevault.core.generation}) has not moved.  Each reads the CRL and
follows it; the audit log stays one chain (appends under an exclusive
C{flock}).

The parent:
 - restarts a worker that ends (with a growing delay while they keep
   ending, and gives up, exit status 1, after L{CRASH_LIMIT} ends within
   L{CRASH_WINDOW_SECONDS}, or when one cannot start at all);
 - forwards SIGHUP to every worker (each re-reads the CRL);
 - on stop, sends SIGTERM to every worker and waits for them (SIGKILL after
   L{WORKER_STOP_SECONDS});
 - logs each worker's output line by line, prefixed by its number (when
   twistd logs to standard output the workers write there themselves);
 - with C{--metrics-port}, serves the sum of the workers' series
   (prometheus_client's multiprocess mode, in a private directory it makes
   and removes).

A worker gets its settings as one JSON line on its standard input, never in
its argv or environment (a PostgreSQL URL may hold a password), and keeps
that pipe open: at its end (the parent is gone, however it ended) the
worker stops.  A passphrase-sealed master key is refused with N > 1: the
workers could not ask for the passphrase, and the parent does not keep it.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel
from twisted.python.failure import Failure

import securevault
from securevault.core.keybinding import locate_master_key
from securevault.core.keys import file_is_sealed
from securevault.server.config import VaultConfig
from securevault.server.revocation import RevocationState
from securevault.server.tls import TLSConfigError, load_ca_certificates, server_tls_options

log = Logger(namespace="securevault")

# The worker's file descriptors, besides 0-2: the listening socket, and the
# pipe on which it says once that it serves.
LISTEN_FD = 3
READY_FD = 4
LISTEN_BACKLOG = 50  # as TLSServerEndpoint's
WORKER_STOP_SECONDS = 20.0
CRASH_LIMIT = 5
CRASH_WINDOW_SECONDS = 30.0
# Delay before a restart, by how many ends came within the window before it.
RESTART_DELAYS = (0.0, 0.5, 1.0, 2.0, 4.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def fail(message: str) -> SystemExit:
    return SystemExit(f"securevault: error: {message}")


def bind_listening_socket(interface: str, port: int) -> socket.socket:
    """The vault's listening socket, bound and listening, non-blocking; a
    port that cannot be bound is the same one-line error as without
    workers."""
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        raise fail(f"cannot listen on {interface}:{port}: {error}") from None
    sock.setblocking(False)
    return sock


def describe_end(reason: Failure) -> str:
    """How a process ended, for the log: its status or its signal."""
    value = reason.value
    number = getattr(value, "signal", None)
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"killed by signal {number} ({name})"
    return f"exited with status {getattr(value, 'exitCode', None)}"


class WorkerProcess(ProcessProtocol):
    """One worker, seen from the parent: its output becomes log lines."""

    def __init__(self, supervisor: Supervisor, number: int, spec: bytes) -> None:
        self.supervisor = supervisor
        self.number = number
        self.pid: int | None = None
        self.ready = False
        self._spec = spec
        self._partial: dict[int, bytes] = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.write(self._spec)  # stdin stays open: its end tells the worker to stop

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == READY_FD:
            if not self.ready and data:
                self.ready = True
                self.supervisor.worker_ready(self)
            return
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._emit(childFD, line)

    def _emit(self, childFD: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        level = LogLevel.warn if childFD == 2 else LogLevel.info
        name, _, text = line.partition(" ")
        try:
            level = LogLevel.levelWithName(name)
            line = text
        except InvalidLogLevelError:
            pass
        log.emit(level, "worker {worker}: {line}", worker=self.number, line=line, worker_pid=self.pid)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._partial.items():
            if rest:
                self._emit(childFD, rest)
        self._partial = {}
        self.supervisor.worker_ended(self, reason)


class Supervisor(Service):
    """Binds the socket, runs the workers, restarts and stops them."""

    def __init__(
        self,
        reactor: Any,
        config: VaultConfig,
        options: Mapping[str, Any],
        announce: Callable[[str, int], object],
        *,
        executable: str = sys.executable,
        at_failure: Callable[[], object] | None = None,
        shared_stdout: bool = False,
    ) -> None:
        """C{at_failure} is called once when the supervisor gives up (by
        default: the process's exit status becomes 1).  With
        C{shared_stdout} (twistd logs to standard output) the workers write
        their log lines to the parent's standard output themselves, in the
        parent's format; otherwise each line passes through the parent's log
        (which costs the parent CPU per line: a request's access line)."""
        self._reactor = reactor
        self._config = config
        self._options = dict(options)
        self._announce = announce
        self._executable = executable
        self._shared_stdout = shared_stdout
        self.socket: socket.socket | None = None
        self.metrics_dir: Path | None = None
        self.workers: dict[int, WorkerProcess] = {}
        self._pending: dict[int, Any] = {}  # number -> the delayed call that restarts it
        self._ends: list[float] = []  # when workers ended unasked, within the window
        self._announced = False
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._previous_sighup: Any = None
        self.failed = False
        self._at_failure = at_failure if at_failure is not None else _exit_failed_at_exit

    # -- start -------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.socket = bind_listening_socket(self._config.interface, self._config.port)
        if self._config.metrics_port is not None:
            self.metrics_dir = Path(tempfile.mkdtemp(prefix="securevault-metrics-"))  # 0700

    def startService(self) -> None:
        super().startService()
        try:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        except ValueError:  # not the main thread (an embedding program)
            log.warn("SIGHUP cannot be handled here: it is not forwarded to the workers")
        # The first worker starts alone: it creates the master key of a new
        # vault, migrates and removes crash debris with no other running.
        self._spawn(1, recover=True)

    def _spawn(self, number: int, *, recover: bool) -> None:
        self._pending.pop(number, None)
        if self._stopping:
            return
        assert self.socket is not None
        family = "inet6" if self.socket.family == socket.AF_INET6 else "inet"
        log_to = "stdout" if self._shared_stdout else "parent"
        spec = json.dumps(
            {"options": self._options, "number": number, "recover": recover, "family": family, "log": log_to}
        ).encode("utf-8")
        env = dict(os.environ)
        package_root = str(Path(securevault.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        if self.metrics_dir is not None:
            env[MULTIPROC_ENV] = str(self.metrics_dir)
        else:
            env.pop(MULTIPROC_ENV, None)
        worker = WorkerProcess(self, number, spec + b"\n")
        self._reactor.spawnProcess(
            worker,
            self._executable,
            [self._executable, "-m", "securevault.server.worker"],
            env=env,
            path=os.getcwd(),
            childFDs={
                0: "w",
                1: 1 if self._shared_stdout else "r",
                2: "r",
                LISTEN_FD: self.socket.fileno(),
                READY_FD: "r",
            },
        )
        self.workers[number] = worker
        log.info("worker {worker} started, pid {pid}", worker=number, pid=worker.pid, event_kind="worker_started")

    def worker_ready(self, worker: WorkerProcess) -> None:
        if self._announced or self._stopping:
            return
        if worker.number == 1 and len(self.workers) == 1:
            for number in range(2, self._config.workers + 1):
                self._spawn(number, recover=False)
        if len(self.workers) == self._config.workers and all(w.ready for w in self.workers.values()):
            self._announced = True
            assert self.socket is not None
            host, port = self.socket.getsockname()[:2]
            self._announce(host, port)

    # -- a worker ends -----------------------------------------------------

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self.metrics_dir is not None and worker.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid, str(self.metrics_dir))
        how = describe_end(reason)
        if self._stopping:
            log.info("worker {worker} (pid {pid}) {how}", worker=worker.number, pid=worker.pid, how=how)
            if not self.workers and self._stopped is not None:
                self._stopped.callback(None)
            return
        if not worker.ready and not self._announced:
            self.give_up(f"worker {worker.number} (pid {worker.pid}) could not start: {how}")
            return
        now = self._reactor.seconds()
        self._ends = [t for t in self._ends if now - t < CRASH_WINDOW_SECONDS] + [now]
        if len(self._ends) >= CRASH_LIMIT:
            log.error(
                "worker {worker} (pid {pid}) {how}",
                worker=worker.number,
                pid=worker.pid,
                how=how,
                event_kind="worker_ended",
            )
            self.give_up(f"workers ended {len(self._ends)} times within {CRASH_WINDOW_SECONDS:g} s")
            return
        delay = RESTART_DELAYS[min(len(self._ends) - 1, len(RESTART_DELAYS) - 1)]
        log.warn(
            "worker {worker} (pid {pid}) {how}; restarting it in {delay:g} s",
            worker=worker.number,
            pid=worker.pid,
            how=how,
            delay=delay,
            event_kind="worker_ended",
        )
        self._pending[worker.number] = self._reactor.callLater(delay, self._spawn, worker.number, recover=False)

    def give_up(self, why: str) -> None:
        """Stop the daemon, and make its exit status 1 (twistd has no other
        way to set it than at the interpreter's exit)."""
        if self.failed:
            return
        self.failed = True
        log.critical("{why}: stopping securevault", why=why, event_kind="workers_failed")
        self._at_failure()
        self._reactor.callWhenRunning(self._reactor.stop)

    # -- signals and stop --------------------------------------------------

    def _sighup(self, number: int, frame: FrameType | None) -> None:
        """Python runs signal handlers between bytecodes, maybe inside the
        reactor: the forwarding is only scheduled here."""
        self._reactor.callFromThread(self.forward, "HUP")

    def forward(self, name: str) -> int:
        """Send signal SIG<name> to every worker; returns to how many."""
        sent = 0
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(name)  # type: ignore[union-attr]
                sent += 1
            except ProcessExitedAlready:
                pass
        log.info("SIG{name} forwarded to {count} workers", name=name, count=sent, event_kind="signal_forwarded")
        return sent

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._previous_sighup is not None and signal.getsignal(signal.SIGHUP) == self._sighup:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        stopped: Deferred[None] = Deferred()
        if self.workers:
            self._stopped = stopped
            self.forward("TERM")
            deadline = self._reactor.callLater(WORKER_STOP_SECONDS, self._kill_remaining)
            stopped.addBoth(lambda result: deadline.cancel() if deadline.active() else None)
        else:
            stopped.callback(None)
        stopped.addBoth(self._cleaned)
        return stopped

    def _kill_remaining(self) -> None:
        log.warn(
            "{count} workers still running {seconds:g} s after SIGTERM: killing them",
            count=len(self.workers),
            seconds=WORKER_STOP_SECONDS,
        )
        self.forward("KILL")

    def _cleaned(self, result: object) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None


def _exit_failed_at_exit() -> None:
    atexit.register(_exit_failed)


def _exit_failed() -> None:
    """At the interpreter's exit, after twistd removed its pidfile: status 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class WorkersCollector:
    """The workers' series, summed from the multiprocess directory as it is
    at each scrape (none before the supervisor made it)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        path = self._supervisor.metrics_dir
        if path is None:
            return iter(())
        return iter(MultiProcessCollector(None, path=str(path)).collect())


def workers_metrics_resource(supervisor: Supervisor) -> Any:
    """The parent's /metrics page: every worker's series, summed."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.twisted import MetricsResource

    registry = CollectorRegistry()
    registry.register(WorkersCollector(supervisor))
    return MetricsResource(registry=registry)


def check_before_workers(config: VaultConfig) -> str:
    """What every worker would fail on, checked once in the parent (one
    line, L{SystemExit}); returns the CA's subject for the start-up line."""
    try:
        authorities = load_ca_certificates(config.ca_cert)
        server_tls_options(config.cert, config.key, config.ca_cert, RevocationState())
    except (TLSConfigError, OSError) as error:
        raise fail(str(error)) from None
    key_path = locate_master_key(config.data_dir, config.master_key).path
    if file_is_sealed(key_path):
        raise fail(
            f"--workers {config.workers}: the master key {key_path} is sealed by a passphrase, which worker "
            "processes cannot ask for: run with --workers 1"
        )
    return authorities[0].subject.rfc4514_string()
