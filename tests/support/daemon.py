# -*- test-case-name: tests.test_crash -*-
"""A real daemon for synchronous tests, and a plain C{ssl} HTTP client.

L{SyncDaemon} runs C{twistd -n securevault} in a subprocess (as
L{tests.server.test_twistd.Daemon} does, but without the reactor: the listening
port is reported through a L{threading.Event}), so a test can kill it with
SIGKILL, start it again on the same data directory, and talk to it with
blocking sockets from several threads.  L{VaultFixture} is one data
directory made by C{securevault-admin init} with a user C{alice}.

The client side is the standard library only (C{socket}, C{ssl}): a test
controls exactly when each byte of a request goes out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from bench.env import open_files
from tests.support.tlsclient import PASSWORD

# Shared by every daemon test (this module imports no reactor).
REPOSITORY = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 30.0
LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
IO_TIMEOUT_SECONDS = 20.0


def child_environment() -> dict[str, str]:
    """os.environ with the repository first on PYTHONPATH and no $PORT."""
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPOSITORY), env.get("PYTHONPATH")) if p)
    return env


def run_admin(*argv: str, stdin: str | None = None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run C{securevault-admin ARGV} as a subprocess, bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "securevault.admin.cli", *argv],
        cwd=cwd,
        env=child_environment(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS * 2,
        check=False,
    )


def twistd_argv(
    certs: Path, data: Path, *extra: str, port: int = 0, cert: Path | None = None, twistd: list[str] = TWISTD
) -> list[str]:
    """C{twistd -n securevault} on 127.0.0.1 with a vault's certificates and data."""
    return [
        *twistd,
        "-n", "--pidfile=", "securevault",
        "--port", str(port),
        "--interface", "127.0.0.1",
        "--cert", str(cert or certs / "server.crt"),
        "--key", str(certs / "server.key"),
        "--ca-cert", str(certs / "ca.crt"),
        "--data-dir", str(data),
        "--threads", "2",
        *extra,
    ]  # fmt: skip


def make_vault(base: Path) -> tuple[Path, Path]:
    """C{securevault-admin init} and user C{alice} under C{base}; returns the
    certificates and data directories."""
    certs, data = base / "certs", base / "vault-data"
    result = run_admin("--data-dir", str(data), "init", "--certs-dir", str(certs), cwd=base)
    if result.returncode != 0:
        raise AssertionError(result.stderr)
    result = run_admin(
        "--data-dir", str(data), "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n", cwd=base
    )
    if result.returncode != 0:
        raise AssertionError(result.stderr)
    return certs, data


class SyncDaemon:
    """A twistd subprocess; L{wait_listening} blocks until it logs its port."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.port: int | None = None
        self._listening = threading.Event()
        self._new_line = threading.Condition()
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**child_environment(), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._watch, daemon=True)
        self._reader.start()

    def _watch(self) -> None:
        stream: IO[bytes] | None = self.process.stdout
        assert stream is not None
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            match = LISTENING.search(line)
            if match is not None and self.port is None:
                self.port = int(match.group(1))
                self._listening.set()
        stream.close()
        self._listening.set()
        with self._new_line:
            self._ended = True
            self._new_line.notify_all()

    _ended = False

    def wait_for(self, pattern: str, start: int = 0) -> tuple[int, re.Match[str]]:
        """The first output line from index C{start} on that matches
        C{pattern}, and its index; fails if the output ends first or
        nothing matches for too long."""
        compiled = re.compile(pattern)
        with self._new_line:
            index = start
            while True:
                while index < len(self.lines):
                    match = compiled.search(self.lines[index])
                    if match is not None:
                        return index, match
                    index += 1
                if self._ended or not self._new_line.wait(WAIT_SECONDS):
                    raise AssertionError(f"no line matches {pattern!r}:\n{self.output()}")

    def output(self) -> str:
        return "".join(self.lines)

    def wait_listening(self) -> int:
        """The bound port; fails if the daemon ends or is silent too long."""
        if not self._listening.wait(WAIT_SECONDS) or self.port is None:
            raise AssertionError(f"twistd did not listen:\n{self.output()}")
        return self.port

    def kill(self) -> None:
        """SIGKILL, then reap: no shutdown code runs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT_SECONDS)
        self._reader.join(WAIT_SECONDS)

    def stop(self) -> None:
        """Cleanup: kill if still running (idempotent)."""
        self.kill()


@dataclass
class VaultFixture:
    """A vault directory: dev PKI, master key and user C{alice}."""

    base: Path

    @property
    def certs(self) -> Path:
        return self.base / "certs"

    @property
    def data(self) -> Path:
        return self.base / "vault-data"

    @property
    def master_key(self) -> Path:
        """Where init puts the key: beside the data directory, not in it."""
        return self.base / "vault-keys" / "master.key"

    def create(self) -> None:
        make_vault(self.base)

    def argv(self, *extra: str, file_size_limit: int | None = None) -> list[str]:
        """twistd's command line; C{file_size_limit} sets RLIMIT_FSIZE in the
        daemon first (writes past it fail with EFBIG: Python ignores SIGXFSZ)."""
        twistd = TWISTD
        if file_size_limit is not None:
            limit = int(file_size_limit)
            twistd = [
                sys.executable,
                "-c",
                f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); " + TWISTD[2],
            ]
        return twistd_argv(self.certs, self.data, *extra, twistd=twistd)

    def start(self, *extra: str, file_size_limit: int | None = None) -> SyncDaemon:
        """A daemon on this vault; the caller stops it (or adds cleanup)."""
        return SyncDaemon(self.argv(*extra, file_size_limit=file_size_limit), self.base)

    def tls_context(self) -> ssl.SSLContext:
        """Trusts the dev CA and presents the dev client certificate."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.certs / "ca.crt"))
        context.load_cert_chain(str(self.certs / "client.crt"), str(self.certs / "client.key"))
        return context

    def verify(self) -> subprocess.CompletedProcess[str]:
        """C{securevault-admin --data-dir D verify}."""
        return run_admin("--data-dir", str(self.data), "verify", cwd=self.base)


# -- a blocking HTTP/1.1 client ---------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(context: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    """A mutual-TLS connection to the daemon, handshake done."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_SECONDS)
    return context.wrap_socket(raw, server_hostname="localhost")


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(sock: ssl.SSLSocket, initial: bytes = b"", *, head_only: bool = False) -> RawResponse:
    """Read one response, framed by Content-Length or the end of the stream
    (C{initial}: bytes of it already read); C{head_only} for the answer to a
    HEAD, whose Content-Length describes a body that is not sent."""
    data = initial
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection ended inside a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"]) if "content-length" in headers else None
    if head_only:
        return RawResponse(status, headers, body)
    while length is None or len(body) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            if length is not None:
                raise ConnectionError(f"body cut short: {len(body)} of {length} bytes")
            break
        body += chunk
    return RawResponse(status, headers, body)


def poll_answer(sock: ssl.SSLSocket) -> bytes:
    """Application bytes the server already sent, without blocking (a TLS 1.3
    session ticket makes the socket readable with no data, so C{select}
    alone cannot tell)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return b""
    finally:
        sock.settimeout(IO_TIMEOUT_SECONDS)


def send_until_answered(sock: ssl.SSLSocket, head: bytes, body: bytes, piece: int = 64 * 1024) -> RawResponse:
    """Send a request in pieces, stopping as soon as the server answers early
    (a refusal is read before the server's close can reset the connection);
    returns the response."""
    sock.sendall(head)
    for start in range(0, len(body), piece):
        early = poll_answer(sock)
        if early:
            return read_response(sock, early)
        try:
            sock.sendall(body[start : start + piece])
        except (BrokenPipeError, ConnectionResetError):
            break
    return read_response(sock)


def call(
    context: ssl.SSLContext,
    port: int,
    method: str,
    target: str,
    *,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    session: str | None = None,
) -> RawResponse:
    """One request on a new connection."""
    all_headers = list(headers)
    if session is not None:
        all_headers.append(("Authorization", f"Bearer {session}"))
    if body or method == "POST":
        all_headers.append(("Content-Length", str(len(body))))
    with connect(context, port) as sock:
        sock.sendall(request_head(method, target, all_headers) + body)
        return read_response(sock, head_only=method == "HEAD")


def login(context: ssl.SSLContext, port: int, username: str = "alice", password: str = PASSWORD) -> str:
    """A session id for C{username}; fails unless the login is 200."""
    body = json.dumps({"username": username, "password": password}).encode()
    response = call(context, port, "POST", "/login", body=body, headers=[("Content-Type", "application/json")])
    if response.status != 200:
        raise AssertionError(f"login: {response.status} {response.body!r}")
    return str(response.json()["session_id"])


def list_files(context: ssl.SSLContext, port: int, session: str) -> list[dict[str, Any]]:
    response = call(context, port, "GET", "/get-files", session=session)
    if response.status != 200:
        raise AssertionError(f"get-files: {response.status} {response.body!r}")
    return list(response.json()["files"])


def download_sha256(context: ssl.SSLContext, port: int, session: str, archive_id: str) -> str:
    """The hex SHA-256 of a raw download (200 required)."""
    response = call(
        context, port, "GET", f"/download-file?id={archive_id}",
        headers=[("Accept", "application/octet-stream")], session=session,
    )  # fmt: skip
    if response.status != 200:
        raise AssertionError(f"download: {response.status} {response.body[:200]!r}")
    return hashlib.sha256(response.body).hexdigest()


def raw_upload_head(filename: str, size: int, session: str) -> bytes:
    """The head of a raw (application/octet-stream) upload of C{size} bytes."""
    return request_head(
        "POST",
        "/upload-file",
        [
            ("Content-Type", "application/octet-stream"),
            ("X-Filename", quote(filename, safe="")),
            ("Content-Length", str(size)),
            ("Authorization", f"Bearer {session}"),
        ],
    )


def open_journals(pid: int | str = "self") -> int:
    """The tus journals process C{pid} holds open for writing: its
    assemblers' archives (an evicted assembler closes its journal; the file
    stays for the slow path, which reads it, until the upload ends)."""
    return open_files(pid, ".journal")[0]
