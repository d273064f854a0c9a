"""One real daemon: C{twistd -n securevault} in a subprocess.

The plugin in C{<repo>/twisted/plugins/} is found because the repository root
is on C{PYTHONPATH}.  twistd is started as C{python -c "...run()"}: the module
C{twisted.scripts.twistd} has no C{__main__} guard, so C{python -m} on it
would do nothing at all.  Each subprocess is watched by plain threads (no
reactor SIGCHLD handling needed, so trial and pytest behave alike) and killed
in cleanup if still running.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Generator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks

from securevault.admin.pki import load_cert
from tests.server.test_startup import make_unwritable
from tests.support.daemon import (
    LISTENING,
    TWISTD,
    WAIT_SECONDS,
    child_environment,
    make_vault,
    read_response,
    request_head,
    twistd_argv,
)
from tests.support.testcase import AsyncTestCase, SyncTestCase
from tests.support.tlsclient import Credential, client_for, read_json

reactor: Any = global_reactor
TWIST = [sys.executable, "-m", "twisted"]  # the twist command


class Daemon:
    """A twistd subprocess whose output is collected by threads.

    C{listening} fires with the bound port when the daemon logs it (or fails
    if the output ends first); C{exited} fires with the return code.
    """

    def __init__(self, argv: list[str], cwd: Path, listening: re.Pattern[str] = LISTENING) -> None:
        self._pattern = listening
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.listening: Deferred[int] = Deferred()
        self.exited: Deferred[int] = Deferred()
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._err_reader = threading.Thread(target=self._drain, args=(self.process.stderr, self.stderr))
        self._out_reader = threading.Thread(target=self._watch)
        self._err_reader.start()
        self._out_reader.start()

    def _drain(self, stream: IO[bytes], lines: list[str]) -> None:
        for raw in stream:
            lines.append(raw.decode("utf-8", "replace"))
        stream.close()

    def _watch(self) -> None:
        """Runs in a thread: reads stdout, reports the port and the exit."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            self.stdout.append(line)
            match = self._pattern.search(line)
            if match is not None:
                reactor.callFromThread(self._fire, self.listening, int(match.group(1)))
        self.process.stdout.close()
        self._err_reader.join()
        code = self.process.wait()
        reactor.callFromThread(self._fire, self.listening, None)
        reactor.callFromThread(self._fire, self.exited, code)

    def _fire(self, deferred: Deferred[Any], value: Any) -> None:
        if deferred.called:
            return
        if value is None:
            deferred.errback(AssertionError(f"twistd ended without listening:\n{self.output()}"))
        else:
            deferred.callback(value)

    def output(self) -> str:
        return "".join(self.stdout) + "--- stderr ---\n" + "".join(self.stderr)

    def wait_listening(self) -> Deferred[int]:
        return self.listening.addTimeout(WAIT_SECONDS, reactor)

    def wait_exited(self) -> Deferred[int]:
        return self.exited.addTimeout(WAIT_SECONDS, reactor)

    def stop(self) -> None:
        """Cleanup: kill the process if it still runs and join the threads."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT_SECONDS)
        self._out_reader.join(WAIT_SECONDS)
        self._err_reader.join(WAIT_SECONDS)


class TwistdTests(AsyncTestCase):
    """C{twistd -n securevault} serves, stops cleanly, and fails loudly."""

    timeout = 60

    def setUp(self) -> None:
        self.base = self.make_dir()
        self.certs, self.data = make_vault(self.base)

    def start(self, *extra: str, port: int = 0, cert: Path | None = None) -> Daemon:
        """Start twistd with this test's certificates and data directory."""
        daemon = Daemon(twistd_argv(self.certs, self.data, *extra, port=port, cert=cert), self.base)
        self.addCleanup(daemon.stop)
        return daemon

    def test_plugin_listed_by_twistd(self) -> None:
        """C{twistd --help}, run outside the repository with PYTHONPATH at it,
        lists the securevault subcommand."""
        result = subprocess.run(
            [*TWISTD, "--help"],
            cwd=self.base,
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"(?m)^\s+securevault\s+An encrypted file vault")

    @inlineCallbacks
    def test_serves_and_stops_cleanly(self) -> Generator[Deferred[Any], Any, None]:
        """The daemon logs its port, serves login, upload and download over
        mutual TLS with the certificates C{securevault-admin init} made, and on
        SIGTERM shuts down cleanly.

        twistd (like C{twist}) re-raises the terminating signal once its
        shutdown is complete (L{twisted.application.app._exitWithSignal}), so
        a clean stop is: the shutdown is logged to the end, nothing goes to
        stderr, no traceback, and the status says "ended by SIGTERM" (-15).
        """
        daemon = self.start()
        port = yield daemon.wait_listening()
        client_credential = Credential.from_files(self.certs / "client.crt", self.certs / "client.key")
        ca = load_cert(self.certs / "ca.crt")
        client = client_for(reactor, port, ca, client_credential, cleanup=self.addCleanup)
        response = yield client.request("GET", "/health")
        self.assertEqual((response.code, (yield read_json(response))["status"]), (200, "ok"))
        yield client.login("alice")
        content = os.urandom(100_000)
        archive_id = yield client.upload_json("daemon.bin", content)
        body = yield client.download_raw(archive_id)
        self.assertTrue(body == content, "downloaded bytes differ")
        yield client.close()

        daemon.process.send_signal(signal.SIGTERM)
        code = yield daemon.wait_exited()
        output = daemon.output()
        self.assertEqual(code, -signal.SIGTERM, output)
        self.assertEqual(daemon.stderr, [], output)
        self.assertNotIn("Traceback", output)
        stdout = "".join(daemon.stdout)
        # "Received SIGTERM" is logged from the signal handler and is not
        # always flushed before exit; the shutdown sequence is what counts.
        for event in (f"(TLS Port {port} Closed)", "Main loop terminated.", "Server Shut Down."):
            self.assertIn(event, stdout)

    @inlineCallbacks
    def test_start_up_line_has_urls_that_work(self) -> Generator[Deferred[Any], Any, None]:
        """Bound to all interfaces, the start-up line names the server
        certificate's first DNS name (https://localhost:PORT for the
        development PKI), not 0.0.0.0, which fails verification; a client
        that verifies that name reaches /health through it.  With
        --metrics-port, a line gives the metrics URL, and it answers."""
        url_line = re.compile(r"listening on https://localhost:(\d+) \(all interfaces, 0\.0\.0\.0:\d+; CA: ")
        argv = twistd_argv(self.certs, self.data, "--interface", "0.0.0.0", "--metrics-port", "0")
        daemon = Daemon(argv, self.base, listening=url_line)
        self.addCleanup(daemon.stop)
        yield daemon.wait_listening()
        output = "".join(daemon.stdout)
        url = re.search(r"listening on (\S+) ", output)
        metrics = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", output)
        assert url is not None and metrics is not None, output

        parts = urlsplit(url.group(1))
        assert parts.hostname is not None and parts.port is not None
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))  # verifies the host name
        context.load_cert_chain(str(self.certs / "client.crt"), str(self.certs / "client.key"))
        with socket.create_connection((parts.hostname, parts.port), timeout=WAIT_SECONDS) as raw:
            with context.wrap_socket(raw, server_hostname=parts.hostname) as sock:
                sock.sendall(request_head("GET", "/health", []))
                response = read_response(sock)
        self.assertEqual((response.status, response.json()["status"]), (200, "ok"))
        with urllib.request.urlopen(metrics.group(1), timeout=WAIT_SECONDS) as scraped:
            self.assertIn(b"securevault_", scraped.read())

    @inlineCallbacks
    def test_one_daemon_per_data_directory(self) -> Generator[Deferred[Any], Any, None]:
        """A second daemon on a data directory in use exits non-zero with one
        stderr line naming the directory and the first daemon's pid, and
        never listens; once the first has stopped, a daemon starts there."""
        first = self.start()
        yield first.wait_listening()
        second = self.start()
        code = yield second.wait_exited()
        output = second.output()
        self.assertNotEqual(code, 0, output)
        self.assertEqual(
            second.stderr,
            [f"securevault: error: another securevault daemon is using {self.data} (pid {first.process.pid})\n"],
            output,
        )
        yield self.assertFailure(second.listening, AssertionError)
        first.process.send_signal(signal.SIGTERM)
        yield first.wait_exited()
        third = self.start()
        yield third.wait_listening()

    @inlineCallbacks
    def test_unwritable_blob_directory(self) -> Generator[Deferred[Any], Any, None]:
        """An archives/ directory the daemon cannot write ends the start with
        one stderr line naming it (it used to be found by the first upload,
        as a 500 with a traceback)."""
        archives = self.data / "archives"
        make_unwritable(self, archives)
        daemon = self.start()
        code = yield daemon.wait_exited()
        output = daemon.output()
        self.assertNotEqual(code, 0, output)
        self.assertEqual(len(daemon.stderr), 1, output)
        self.assertIn(f"securevault: error: the blob directory {archives} is not writable: ", daemon.stderr[0])
        self.assertNotIn("Traceback", output)
        yield self.assertFailure(daemon.listening, AssertionError)

    @inlineCallbacks
    def test_missing_certificate(self) -> Generator[Deferred[Any], Any, None]:
        """A missing certificate file ends twistd with a non-zero status and
        exactly one stderr line naming the file and 'securevault-admin init',
        without a traceback."""
        missing = self.certs / "absent.crt"
        daemon = self.start(cert=missing)
        code = yield daemon.wait_exited()
        output = daemon.output()
        self.assertNotEqual(code, 0, output)
        self.assertEqual(len(daemon.stderr), 1, output)
        self.assertIn(str(missing), daemon.stderr[0])
        self.assertIn("securevault-admin init", daemon.stderr[0])
        self.assertNotIn("Traceback", output)
        yield self.assertFailure(daemon.listening, AssertionError)  # never listened

    @inlineCallbacks
    def test_port_in_use(self) -> Generator[Deferred[Any], Any, None]:
        """A port that is already bound ends the daemon with a non-zero status
        and an error naming the port, instead of running on without one."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        daemon = self.start(port=port)
        code = yield daemon.wait_exited()
        output = daemon.output()
        self.assertNotEqual(code, 0, output)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", output)
        self.assertNotIn("Traceback", output)
        yield self.assertFailure(daemon.listening, AssertionError)  # never listened

    @inlineCallbacks
    def test_port_in_use_twist(self) -> Generator[Deferred[Any], Any, None]:
        """Under C{twist} too, a port that is already bound (the vault's or
        the metrics port) ends the process with status 1 and one stderr line
        naming it.  twist starts services without binding first: the error
        was printed while the worker threads kept the process alive."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        twist_args = twistd_argv(self.certs, self.data, twistd=[])[2:]  # without -n --pidfile=
        for extra, where in (
            (("--port", str(port)), f"127.0.0.1:{port}"),
            (("--metrics-port", str(port)), f"127.0.0.1:{port} (metrics)"),
        ):
            daemon = Daemon([*TWIST, *twist_args, *extra], self.base)
            self.addCleanup(daemon.stop)
            code = yield daemon.wait_exited()
            output = daemon.output()
            self.assertEqual(code, 1, output)
            self.assertEqual(len(daemon.stderr), 1, output)
            self.assertIn(f"securevault: error: cannot listen on {where}:", daemon.stderr[0])
            self.assertNotIn("Traceback", output)
            yield self.assertFailure(daemon.listening, AssertionError)  # never listened


class CommandLineTests(SyncTestCase):
    """What twistd and twist print for securevault's options, before any
    vault exists."""

    def run_command(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            cwd=self.make_dir(),
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )

    def test_bad_value_is_one_line(self) -> None:
        """A bad value of ours makes twistd and twist exit 1 with one line on
        stderr naming the option and the value, and no --help text (twistd
        printed 45 lines of help above it); --help still prints the options
        and exits 0."""
        for command in ([*TWISTD, "-n", "--pidfile="], TWIST):
            result = self.run_command(*command, "securevault", "--quota", "x")
            self.assertEqual(
                (result.returncode, result.stdout, result.stderr),
                (1, "", "securevault: error: --quota: not a size: 'x' (bytes, or with a unit: 64K, 500M, 10G)\n"),
                command,
            )
            helped = self.run_command(*command, "securevault", "--help")
            self.assertEqual(helped.returncode, 0, helped.stderr)
            self.assertIn("--max-upload-size=", helped.stdout)
