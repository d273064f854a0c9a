"""C{twistd securevault --workers 2}: the supervisor and its workers, for real.

Which worker accepts a new connection is the kernel's choice.  To make it
the test's, the other worker is stopped with SIGSTOP (it cannot accept
while stopped; the kernel hands the connection to the one that can) and
continued afterwards; each worker's log lines, prefixed with its number,
say which one answered.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from hashlib import sha256
from pathlib import Path

from securevault.core.generation import SharedGeneration, WorkerLoads
from securevault.server.limits import LOAD_PER_REQUEST
from tests.support.daemon import (
    TWISTD,
    WAIT_SECONDS,
    SyncDaemon,
    VaultFixture,
    call,
    child_environment,
    connect,
    download_sha256,
    list_files,
    login,
    run_admin,
)
from tests.support.testcase import SyncTestCase

STARTED = r"worker (\d+) started, pid (\d+)"
SLOW_PASS_OVER = {"SECUREVAULT_PASS_OVER_SECONDS": "0.5"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connections_held(pid: int, port: int) -> int:
    """How many established TCP connections on local port C{port} process
    C{pid} holds (its socket descriptors, matched in /proc/net/tcp*)."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            established = fields[3] == "01"
            if established and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                held += 1
    return held


def exclusive_locks(pid: int) -> int:
    """How many exclusive file locks process C{pid} holds (/proc/locks):
    SQLite's write and checkpoint locks, the shared generation's flock."""
    held = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: POSIX  ADVISORY  WRITE 1234 fd:01:567 120 120"; a waiter's line has "->".
        if "->" not in fields and len(fields) > 4 and fields[3] == "WRITE" and fields[4] == str(pid):
            held += 1
    return held


def all_stopped(pid: int) -> bool:
    """Whether every thread of C{pid} has stopped (SIGSTOP is delivered
    asynchronously)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # a thread that ended
        if state not in ("T", "t"):
            return False
    return True


def stop_holding_no_lock(pid: int) -> None:
    """SIGSTOP C{pid} at a moment it holds no exclusive lock: a worker
    stopped inside a write transaction (its minute sweep, say) would keep
    the other worker's next write waiting until the test's reads time out
    (seen as a login timing out under pytest).  Retried for up to
    WAIT_SECONDS, then it stays stopped as it is."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        os.kill(pid, signal.SIGSTOP)
        while not all_stopped(pid) and time.monotonic() < deadline:
            time.sleep(0.001)
        if not exclusive_locks(pid) or time.monotonic() >= deadline:
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)


class WorkersTestCase(SyncTestCase):
    """A vault with user alice and a daemon of two workers on it."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        self.context = self.vault.tls_context()

    def start(self, *extra: str, pidfile: Path | None = None, env: dict[str, str] | None = None) -> SyncDaemon:
        argv = self.vault.argv("--workers", "2", *extra)
        if pidfile is not None:
            argv[argv.index("--pidfile=")] = f"--pidfile={pidfile}"
        daemon = SyncDaemon(argv, self.vault.base, env)
        self.addCleanup(daemon.stop)
        self.port = daemon.wait_listening()
        # Both workers past their start-up (which writes to the stores):
        # a worker SIGSTOPped by only() while it held SQLite's write lock
        # kept the other's login waiting past the test's read timeout.
        for number in (1, 2):
            daemon.wait_for(rf"worker {number}: worker {number} \(pid \d+\) serving")
        return daemon

    def worker_pids(self, daemon: SyncDaemon) -> dict[int, int]:
        """The latest pid of each worker, from the parent's log."""
        pids: dict[int, int] = {}
        for match in re.finditer(STARTED, daemon.output()):
            pids[int(match.group(1))] = int(match.group(2))
        return pids

    @contextmanager
    def only(self, daemon: SyncDaemon, number: int) -> Iterator[None]:
        """While inside, worker C{number} alone accepts connections."""
        stopped = [pid for worker, pid in self.worker_pids(daemon).items() if worker != number]
        try:
            for pid in stopped:
                stop_holding_no_lock(pid)
            yield
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)

    def files_status(self, session: str) -> int:
        return call(self.context, self.port, "GET", "/get-files", session=session).status


class SupervisorTests(WorkersTestCase):
    def test_sessions_and_logout_hold_across_workers(self) -> None:
        """Two workers with distinct pids serve the port: a session made
        on one works on the other, a logout on the second ends it on the
        first at once, and the audit log stays one valid chain."""
        daemon = self.start()
        pids = self.worker_pids(daemon)
        self.assertEqual(sorted(pids), [1, 2])
        self.assertNotEqual(pids[1], pids[2])
        self.assertEqual(len(re.findall(r"listening on https://", daemon.output())), 1)
        with self.only(daemon, 1):
            session = login(self.context, self.port)
        daemon.wait_for(r"worker 1: POST /login 200")
        with self.only(daemon, 2):
            self.assertEqual(self.files_status(session), 200)
            logout = call(self.context, self.port, "POST", "/logout", session=session)
            self.assertEqual(logout.status, 204, logout.body)
        daemon.wait_for(r"worker 2: GET /get-files 200")
        daemon.wait_for(r"worker 2: POST /logout 204")
        with self.only(daemon, 1):
            self.assertEqual(self.files_status(session), 401)
        daemon.wait_for(r"worker 1: GET /get-files 401")
        # Both workers append to the audit log at once (most likely: the
        # kernel spreads these connections; the chain must hold either way).
        threads = [threading.Thread(target=login, args=(self.context, self.port)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_SECONDS)
        daemon.process.send_signal(signal.SIGTERM)  # a clean stop writes what is held
        daemon.process.wait(WAIT_SECONDS)
        self.assertEqual(daemon.output().count("POST /login 200"), 7, daemon.output())
        result = run_admin("--data-dir", str(self.vault.data), "audit", "verify", cwd=self.vault.base)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_sessions_mirrored_yet_shared(self) -> None:
        """Workers keep sessions in memory, yet a session made on worker 1
        is served by worker 2 (which asks the store once), and a logout on
        2 is refused on 1 at once, although 1 held it in memory."""
        daemon = self.start()
        with self.only(daemon, 1):
            session = login(self.context, self.port)
            self.assertEqual(self.files_status(session), 200)  # now in 1's memory
        with self.only(daemon, 2):
            self.assertEqual(self.files_status(session), 200)
            self.assertEqual(call(self.context, self.port, "POST", "/logout", session=session).status, 204)
        with self.only(daemon, 1):
            self.assertEqual(self.files_status(session), 401)
        daemon.wait_for(r"worker 1: GET /get-files 401")

    def test_tus_upload_moves_between_workers(self) -> None:
        """A tus upload whose first PATCHes worker 1 took (its archive's
        journal holds their bytes, still open in worker 1) and whose last
        PATCH worker 2 takes: worker 2 finishes it from the pieces and
        worker 1's journal, byte-exact, and the journal is gone after."""
        daemon = self.start()
        session = login(self.context, self.port)
        data = os.urandom(3 * 200_000 + 123)
        tus = ("Tus-Resumable", "1.0.0")

        def patch(offset: int, size: int) -> dict[str, str]:
            answer = call(
                self.context, self.port, "PATCH", location, body=data[offset : offset + size],
                headers=[tus, ("Content-Type", "application/offset+octet-stream"), ("Upload-Offset", str(offset))],
                session=session,
            )  # fmt: skip
            self.assertEqual(answer.status, 204, answer.body)
            return answer.headers

        with self.only(daemon, 1):
            created = call(
                self.context, self.port, "POST", "/uploads/", session=session,
                headers=[tus, ("Upload-Length", str(len(data))), ("Upload-Metadata", "filename bW92ZWQuYmlu")],
            )  # fmt: skip
            self.assertEqual(created.status, 201, created.body)
            location = created.headers["location"]
            patch(0, 200_000)
            patch(200_000, 200_000)
        daemon.wait_for(r"worker 1: PATCH /uploads/\w+ 204")

        def journals() -> list[Path]:
            return sorted((self.vault.data / "archives").glob("*/*.journal"))

        self.assertEqual(len(journals()), 1)
        with self.only(daemon, 2):
            archive_id = patch(400_000, len(data) - 400_000)["upload-archive-id"]
            self.assertEqual(download_sha256(self.context, self.port, session, archive_id), sha256(data).hexdigest())
        daemon.wait_for(r"worker 2: PATCH /uploads/\w+ 204")
        deadline = time.monotonic() + WAIT_SECONDS
        while journals() and time.monotonic() < deadline:
            time.sleep(0.05)  # the finished upload's blobs go after its answer
        self.assertEqual(journals(), [])

    def test_listings_follow_uploads_and_deletes_across_workers(self) -> None:
        """Each worker caches listings, yet an upload on worker 1 is listed
        on worker 2 at once, and a delete on 2 is gone from 1's listing at
        once (both listed before the change, so both had it cached)."""
        daemon = self.start()
        session = login(self.context, self.port)
        for number in (1, 2):
            with self.only(daemon, number):
                self.assertEqual(list_files(self.context, self.port, session), [])
        with self.only(daemon, 1):
            body = json.dumps({"filename": "a.txt", "content": base64.b64encode(b"hello").decode()}).encode()
            upload = call(
                self.context, self.port, "POST", "/upload-file", body=body,
                headers=[("Content-Type", "application/json")], session=session,
            )  # fmt: skip
            self.assertEqual(upload.status, 201, upload.body)
            archive_id = upload.json()["id"]
        daemon.wait_for(r"worker 1: POST /upload-file 201")
        with self.only(daemon, 2):
            self.assertEqual([f["id"] for f in list_files(self.context, self.port, session)], [archive_id])
            body = json.dumps({"id": archive_id}).encode()
            deleted = call(
                self.context, self.port, "POST", "/delete-file", body=body,
                headers=[("Content-Type", "application/json")], session=session,
            )  # fmt: skip
            self.assertEqual(deleted.status, 204, deleted.body)
        daemon.wait_for(r"worker 2: POST /delete-file 204")
        with self.only(daemon, 1):
            self.assertEqual(list_files(self.context, self.port, session), [])
        daemon.wait_for(r"worker 1: GET /get-files 200")

    def test_admin_passwd_ends_sessions_on_both_workers(self) -> None:
        """securevault-admin user passwd (another process) ends the user's
        sessions: both workers, which held the session in memory, refuse it
        once the command has returned."""
        daemon = self.start()
        session = login(self.context, self.port)
        for number in (1, 2):
            with self.only(daemon, number):
                self.assertEqual(self.files_status(session), 200)
        result = run_admin(
            "--data-dir", str(self.vault.data), "user", "passwd", "alice", "--password-stdin",
            stdin="a brand new password 42\n", cwd=self.vault.base,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for number in (1, 2):
            with self.only(daemon, number):
                self.assertEqual(self.files_status(session), 401)
            daemon.wait_for(rf"worker {number}: GET /get-files 401")

    def test_connections_spread_over_workers(self) -> None:
        """Kept-alive connections opened one after another end up evenly
        on the two workers: one holding more leaves the next to the other
        (before, whichever woke first took it, often every one).  The
        pass-over lasts 0.5 s here, not 5 ms: on a loaded machine the other
        worker may take longer than 5 ms to wake."""
        daemon = self.start(env=SLOW_PASS_OVER)
        pids = self.worker_pids(daemon)
        for _ in range(6):
            held = connect(self.context, self.port)  # handshake done: accepted and counted
            self.addCleanup(held.close)
        self.assertEqual([connections_held(pids[number], self.port) for number in (1, 2)], [3, 3])

    def test_a_request_in_progress_outweighs_idle_connections(self) -> None:
        """A worker in the middle of a request is busier than one holding
        idle kept-alive connections: the next three connections all go to
        the other worker (counting connections alone would split them).
        The pass-over lasts 0.5 s here, as above."""
        daemon = self.start(env=SLOW_PASS_OVER)
        pids = self.worker_pids(daemon)
        generation = SharedGeneration.in_data_dir(self.vault.data, create=False)
        assert generation is not None
        self.addCleanup(generation.close)
        # Made before any connection: making one publishes 0 as worker 1's
        # load (as a worker does at its start), which is true only while
        # worker 1 holds nothing.  Made after the request below, it could
        # erase worker 1's load (seen once under a CPU hog: the wait below
        # timed out).
        loads = WorkerLoads(generation, 1, 2)
        busy = connect(self.context, self.port)
        self.addCleanup(busy.close)
        # A head whose body never comes: the request stays in progress.
        busy.sendall(b"POST /login HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
        self.wait_until(lambda: max(loads.of(1), loads.of(2)) > LOAD_PER_REQUEST)
        for _ in range(3):
            idle = connect(self.context, self.port)
            self.addCleanup(idle.close)
        held = sorted(connections_held(pids[number], self.port) for number in (1, 2))
        self.assertEqual(held, [1, 3])

    def test_killed_worker_is_replaced(self) -> None:
        """SIGKILL to a worker: the parent logs its end and starts a new
        one (a new pid), which serves; sessions stay valid."""
        daemon = self.start()
        session = login(self.context, self.port)
        old = self.worker_pids(daemon)
        os.kill(old[1], signal.SIGKILL)
        daemon.wait_for(rf"worker 1 \(pid {old[1]}\) killed by signal 9 \(SIGKILL\); restarting")
        index, _ = daemon.wait_for(r"worker 1 started, pid (\d+)", len(daemon.lines) - 1)
        daemon.wait_for(r"worker 1: worker 1 \(pid \d+\) serving", index)
        new = self.worker_pids(daemon)
        self.assertNotIn(new[1], old.values())
        self.assertEqual(new[2], old[2])
        with self.only(daemon, 1):
            self.assertEqual(self.files_status(session), 200)
        daemon.wait_for(r"worker 1: GET /get-files 200", index)

    def test_sighup_reaches_every_worker(self) -> None:
        """SIGHUP to the parent makes every worker re-read the CRL."""
        daemon = self.start()
        start = len(daemon.lines)
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for(r"SIGHUP forwarded to 2 workers", start)
        daemon.wait_for(r"worker 1: Loaded CRL .* on SIGHUP", start)
        daemon.wait_for(r"worker 2: Loaded CRL .* on SIGHUP", start)

    def test_clean_stop(self) -> None:
        """SIGTERM to the parent stops every worker (status 0), then the
        parent, as without workers (ended by SIGTERM), and the pidfile is
        gone."""
        pidfile = self.vault.base / "twistd.pid"
        daemon = self.start(pidfile=pidfile)
        self.assertEqual(pidfile.read_text().strip(), str(daemon.process.pid))
        pids = self.worker_pids(daemon)
        daemon.process.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.process.wait(WAIT_SECONDS), -signal.SIGTERM, daemon.output())
        for number, pid in pids.items():
            self.assertIn(f"worker {number} (pid {pid}) exited with status 0", daemon.output())
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)
        self.assertFalse(pidfile.exists())

    def test_workers_write_the_parents_log_format_to_shared_stdout(self) -> None:
        """With twistd logging to standard output (-n), a worker's lines
        appear there in the parent's format, whole, with the worker's
        number.  The workers write them themselves: they appear while the
        parent is stopped (SIGSTOP), so the parent spends nothing on them."""
        daemon = self.start()
        os.kill(daemon.process.pid, signal.SIGSTOP)
        try:
            with self.only(daemon, 2):
                self.assertEqual(call(self.context, self.port, "GET", "/health").status, 200)
            daemon.wait_for(r"worker 2: GET /health 200")
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        line = next(line for line in daemon.output().splitlines() if "worker 2: GET /health 200" in line)
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[securevault#info\] worker 2: GET ")

    def test_log_file_lines_pass_through_the_parent(self) -> None:
        """With --logfile (a file twistd rotates), the workers' lines reach
        that file through the parent."""
        logfile = self.vault.base / "vault.log"
        port = free_port()
        argv = self.vault.argv("--workers", "2", "--port", str(port))
        argv.insert(argv.index("-n") + 1, f"--logfile={logfile}")
        daemon = SyncDaemon(argv, self.vault.base)
        self.addCleanup(daemon.stop)

        def logged(pattern: str) -> bool:
            return logfile.exists() and re.search(pattern, logfile.read_text(errors="replace")) is not None

        self.wait_until(lambda: logged(r"listening on https://"))
        self.assertEqual(call(self.context, port, "GET", "/health").status, 200)
        self.wait_until(lambda: logged(r"\[securevault#info\] worker [12]: GET /health 200"))
        self.assertEqual(daemon.output().count("GET /health"), 0)

    def wait_until(self, condition: Callable[[], bool]) -> None:
        """Polls a file the daemon writes (there is no event to wait on)."""
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition():
            if time.monotonic() > deadline:
                self.fail("the daemon did not log the line in time")
            time.sleep(0.05)

    def test_workers_end_with_their_parent(self) -> None:
        """A parent killed with SIGKILL (nothing of it runs) takes its
        workers with it: each sees its standard input end, and stops."""
        daemon = self.start()
        pids = self.worker_pids(daemon)
        watched = [os.pidfd_open(pid) for pid in pids.values()]  # readable once the process has ended
        for fd in watched:
            self.addCleanup(os.close, fd)
        daemon.kill()
        for fd in watched:
            readable, _, _ = select.select([fd], [], [], WAIT_SECONDS)
            self.assertEqual(readable, [fd], daemon.output())

    def test_metrics_sum_the_workers(self) -> None:
        """--metrics-port is served by the parent: the request counter is
        the sum of both workers' requests."""
        metrics_port = free_port()
        daemon = self.start("--metrics-port", str(metrics_port))
        session = login(self.context, self.port)
        for number in (1, 2, 1):
            with self.only(daemon, number):
                self.assertEqual(self.files_status(session), 200)
        daemon.wait_for(r"worker 2: GET /get-files 200")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=WAIT_SECONDS) as page:
            text = page.read().decode()
        counted = re.search(r'securevault_requests_total\{endpoint="/get-files",status="200"\} (\S+)', text)
        self.assertIsNotNone(counted, text)
        assert counted is not None
        self.assertEqual(float(counted.group(1)), 3.0)
        # The gauges are set by the workers (no callback reaches them).
        self.assertRegex(text, r"(?m)^securevault_pool_queue_depth(\{[^}]*\})? 0\.0$")
        self.assertRegex(text, r"(?m)^securevault_active_sessions(\{[^}]*\})? [0-9.]+$")


class WorkersOptionTests(SyncTestCase):
    def test_bad_counts(self) -> None:
        """--workers 0 or abc: one line on stderr and status 1, before
        anything starts."""
        base = self.make_dir()
        for value in ("0", "abc"):
            result = subprocess.run(
                [*TWISTD, "-n", "--pidfile=", "securevault", "--workers", value, "--data-dir", str(base / "d")],
                cwd=base, env=child_environment(), capture_output=True, text=True, timeout=WAIT_SECONDS,
            )  # fmt: skip
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertEqual(result.stderr.strip(), f"securevault: error: --workers: not a positive integer: {value!r}")

    def test_sealed_master_key_refused(self) -> None:
        """A passphrase-sealed master key with --workers 2 is one line and
        status 1: the workers could not ask for the passphrase."""
        base = self.make_dir()
        result = run_admin(
            "--data-dir", str(base / "vault-data"), "init", "--certs-dir", str(base / "certs"), "--sealed",
            "--passphrase-stdin", stdin="correct horse battery staple\n", cwd=base,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        argv = VaultFixture(base).argv("--workers", "2", "--master-key-passphrase", "stdin")
        result = subprocess.run(
            argv, cwd=base, env=child_environment(), capture_output=True, text=True, timeout=WAIT_SECONDS
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("--workers 2: the master key", result.stderr)
        self.assertIn("is sealed by a passphrase", result.stderr)

    def test_busy_port(self) -> None:
        """A port in use is the same one-line error, status 1, as without
        workers, and no worker is started."""
        vault = VaultFixture(self.make_dir())
        vault.create()
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            argv = vault.argv("--workers", "2")
            argv[argv.index("--port") + 1] = str(port)
            result = subprocess.run(
                argv, cwd=vault.base, env=child_environment(), capture_output=True, text=True, timeout=WAIT_SECONDS
            )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}: [Errno 98]", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("worker 1 started", output)
