# -*- test-case-name: tests.test_bench_abuse -*-
"""python -m bench.abuse: hostile clients against a real daemon, one row each.

Each attack is what a holder of a valid client certificate (B, "mallory", with
an account of its own) can do to the daemon and to an honest user (certificate
A, "alice").  Every attack gets a fresh daemon and data directory (the PKI is
shared), started as L{bench.env.Securevault} with the attack's extra options,
so one attack's damage does not bleed into the next.  The table gives, per
attack, the figure the attack moves and, where one is defined, its target.

Loopback only; bounded in time (every socket has a timeout, every loop a
deadline), and every daemon is stopped and every directory removed at the end.
A benchmark, not a test: CI runs only a smoke test of one cheap row
(tests/test_bench_abuse.py).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

from bench.clients import LoadSpec, run_load, ssl_context
from bench.env import REPO_ROOT, MiB, Securevault, Workspace, _read_status, cpu_model, free_port, open_files
from bench.load import percentile

ALICE = "alice"
ALICE_PASSWORD = "alice-password-0123"
MALLORY = "mallory"
MALLORY_PASSWORD = "mallory-password-0123"
KiB = 1024
DAEMON_NOFILE = 1024  # the soft fd limit the idle_connections daemon runs with
TRICKLE_IDLE_TIMEOUT = 10


# ---------------------------------------------------------------- HTTP over mutual TLS


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def describe(self) -> str:
        """C{401 invalid_session}: the status and the contract's error code."""
        try:
            code = json.loads(self.body).get("error")
        except (ValueError, AttributeError):
            code = None
        return f"{self.status} {code}" if code else str(self.status)


def parse_status(head: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return int(match.group(1)) if match else None


class Http:
    """One mutual-TLS HTTP/1.1 connection (kept alive), opened on demand.

    Every socket operation has C{timeout}; a whole response must arrive
    within C{timeout} too.  After any error the connection is dropped and the
    next call opens a new one.
    """

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 10.0, rcvbuf: int | None = None) -> None:
        self.port = port
        self.context = context
        self.timeout = timeout
        self.rcvbuf = rcvbuf
        self.sock: ssl.SSLSocket | None = None
        self.buf = bytearray()

    def open(self) -> ssl.SSLSocket:
        self.close()
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self.rcvbuf is not None:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            raw.settimeout(self.timeout)
            raw.connect(("127.0.0.1", self.port))
            self.sock = self.context.wrap_socket(raw, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            raise
        self.buf = bytearray()
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def _fill(self, deadline: float) -> bool:
        assert self.sock is not None
        if time.monotonic() > deadline:
            raise TimeoutError("no whole response in time")
        data = self.sock.recv(256 * KiB)
        if not data:
            return False
        self.buf += data
        return True

    def read_response(self) -> Response:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\r\n\r\n" not in self.buf:
                if not self._fill(deadline):
                    raise ConnectionResetError("closed before a response")
            end = self.buf.index(b"\r\n\r\n")
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            del self.buf[: end + 4]
            status = int(head[0].split()[1])
            if status != 100:
                break
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            size = int(headers["content-length"])
            while len(self.buf) < size:
                if not self._fill(deadline):
                    raise ConnectionResetError("closed in the body")
            body = bytes(self.buf[:size])
            del self.buf[:size]
        elif "chunked" in headers.get("transfer-encoding", ""):
            parts = []
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill(deadline):
                        raise ConnectionResetError("closed in a chunk")
                end = self.buf.index(b"\r\n")
                size = int(bytes(self.buf[:end]).split(b";")[0], 16)
                while len(self.buf) < end + 2 + size + 2:
                    if not self._fill(deadline):
                        raise ConnectionResetError("closed in a chunk")
                parts.append(bytes(self.buf[end + 2 : end + 2 + size]))
                del self.buf[: end + 2 + size + 2]
                if size == 0:
                    break
            body = b"".join(parts)
        elif headers.get("connection", "").lower() == "close":
            while self._fill(deadline):
                pass
            body = bytes(self.buf)
            self.buf = bytearray()
        else:
            body = b""
        return Response(status, headers, body)

    def call(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Response:
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            head.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        try:
            sock = self.sock or self.open()
            sock.sendall(data + body if len(body) < 64 * KiB else data)
            if len(body) >= 64 * KiB:
                sock.sendall(body)
            response = self.read_response()
        except BaseException:
            self.close()
            raise
        if response.closes:
            self.close()
        return response

    def login(self, username: str, password: str) -> str:
        response = self.call(
            "POST",
            "/login",
            {"Content-Type": "application/json"},
            json.dumps({"username": username, "password": password}).encode(),
        )
        if response.status != 200:
            raise RuntimeError(f"login of {username} answered {response.describe()}")
        return str(json.loads(response.body)["session_id"])


def answer_text(received: bytes) -> str:
    """What a raw socket got back: C{answered 401 invalid_session}, or C{no answer}."""
    status = parse_status(received)
    if status is None:
        return "no answer"
    return "answered " + Response(status, {}, received.partition(b"\r\n\r\n")[2]).describe()


def bearer(session: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {session}"}


def raw_upload_head(session: str, filename: str, length: int) -> bytes:
    return (
        "POST /upload-file HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {session}\r\nContent-Type: application/octet-stream\r\n"
        f"X-Filename: {quote(filename, safe='')}\r\nContent-Length: {length}\r\n\r\n"
    ).encode("latin-1")


def upload(conn: Http, session: str, filename: str, data: bytes) -> Response:
    return conn.call(
        "POST",
        "/upload-file",
        {**bearer(session), "Content-Type": "application/octet-stream", "X-Filename": quote(filename, safe="")},
        data,
    )


def download_path(archive_id: str) -> str:
    return f"/download-file?id={quote(archive_id, safe='')}"


RAW = {"Accept": "application/octet-stream"}


# ---------------------------------------------------------------- measuring


class MemoryWatch:
    """The daemon's VmRSS every 100 ms; kills it past C{limit_mib} (so that a
    runaway daemon cannot take the shared machine down with it)."""

    def __init__(self, pid: int, limit_mib: float, interval: float = 0.1) -> None:
        self.pid = pid
        self.limit_kib = limit_mib * 1024
        self.interval = interval
        self.base_kib = self.read()
        self.peak_kib = self.base_kib
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> int:
        return _read_status(self.pid).get("VmRSS", 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            kib = self.read()
            self.peak_kib = max(self.peak_kib, kib)
            if kib > self.limit_kib and not self.killed:
                self.killed = True
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self.read())

    def growth_mib(self, kib: int | None = None) -> float:
        return ((self.peak_kib if kib is None else kib) - self.base_kib) / 1024

    def peak_text(self) -> str:
        text = f"RSS +{self.growth_mib():.1f} MiB"
        return text + " (killed at the limit)" if self.killed else text


class Prober(threading.Thread):
    """An honest client: one request every C{every} seconds on its own
    kept-alive connection; the time of each (failures count with the time
    they took, a timeout with the whole timeout)."""

    def __init__(self, conn: Http, path: str, headers: dict[str, str], every: float, expect: int = 200) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.path = path
        self.headers = headers
        self.every = every
        self.expect = expect
        self.seconds: list[float] = []
        self.failures: Counter[str] = Counter()
        self.stopping = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.wait(max(0.0, next_at - time.monotonic())):
            next_at = time.monotonic() + self.every
            began = time.perf_counter()
            try:
                response = self.conn.call("GET", self.path, self.headers)
                if response.status != self.expect:
                    self.failures[response.describe()] += 1
            except Exception as error:
                self.failures[error.__class__.__name__] += 1
            self.seconds.append(time.perf_counter() - began)
        self.conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(self.conn.timeout + 5)

    def ms(self, fraction: float) -> float:
        return percentile(self.seconds, fraction) * 1000

    def summary(self) -> str:
        """C{p50 3 / p99 12 ms (n=96)}; a failure counts with the time it took
        (a timeout with the whole timeout, so that p99 is then a floor)."""
        failed = sum(self.failures.values())
        text = f"p50 {self.ms(0.5):.0f} / p99 {self.ms(0.99):.0f} ms (n={len(self.seconds)}"
        return text + (f", {failed} failed)" if failed else ")")

    def max_ms(self) -> float:
        return max(self.seconds, default=float("nan")) * 1000


class QueueWatch(threading.Thread):
    """securevault_pool_queue_depth from --metrics-port every 0.5 s."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.peak: float | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as answer:
                    text = answer.read().decode()
            except Exception:
                continue
            match = re.search(r"^securevault_pool_queue_depth (\S+)$", text, re.M)
            if match:
                self.peak = max(self.peak or 0.0, float(match.group(1)))

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


def audit_records(path: Path) -> list[dict[str, object]]:
    """The audit log's records (a line that is not a JSON object: C{{}})."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return []
    records: list[dict[str, object]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        records.append(record if isinstance(record, dict) else {})
    return records


def audit_events(path: Path) -> list[str]:
    """The event name of each line of the audit log ("?" when it has none)."""
    return [str(record.get("event", "?")) for record in audit_records(path)]


def run_threads(targets: Sequence[Callable[[], None]], join_timeout: float) -> None:
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + join_timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def statuses_text(statuses: Counter[str]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(statuses.items())) or "none"


# ---------------------------------------------------------------- one daemon per attack


@dataclass
class Settings:
    seconds: float
    rss_limit_mib: float
    keep: bool


@dataclass
class Pki:
    certs: Path

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def files(self, name: str) -> tuple[Path, Path]:
        return self.certs / f"{name}.crt", self.certs / f"{name}.key"

    def context(self, name: str) -> ssl.SSLContext:
        cert, key = self.files(name)
        return ssl_context(str(self.ca), str(cert), str(key))


def make_pki(root: Path) -> Pki:
    """The development CA, the server certificate, A (client) and B (mallory)."""
    ws = Workspace(root / "pki-seed", 0, 0)
    ws.certs = root / "certs"
    ws.root.mkdir(parents=True)
    ws.admin("init", "--certs-dir", str(ws.certs))
    ws.admin("cert", "client", MALLORY, "--certs-dir", str(ws.certs))
    shutil.rmtree(ws.root, ignore_errors=True)
    return Pki(ws.certs)


@dataclass
class Vault:
    """A fresh daemon with users alice (certificate A) and mallory (B)."""

    ws: Workspace
    server: Securevault
    pki: Pki
    settings: Settings
    metrics_port: int | None = None
    honest: ssl.SSLContext = field(init=False)
    attacker: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.honest = self.pki.context("client")
        self.attacker = self.pki.context(MALLORY)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        return self.server.pids[0]

    @property
    def audit_log(self) -> Path:
        return self.ws.data / "audit.jsonl"

    def conn(self, honest: bool = True, timeout: float = 10.0, rcvbuf: int | None = None) -> Http:
        return Http(self.port, self.honest if honest else self.attacker, timeout, rcvbuf)

    def memory(self) -> MemoryWatch:
        return MemoryWatch(self.pid, self.settings.rss_limit_mib)

    def honest_file(self) -> tuple[str, str]:
        """alice's session and the id of her 1-byte archive."""
        conn = self.conn()
        try:
            session = conn.login(ALICE, ALICE_PASSWORD)
            response = upload(conn, session, "one-byte.bin", b"x")
            if response.status != 201:
                raise RuntimeError(f"honest upload answered {response.describe()}")
            archive_id = str(json.loads(response.body)["id"])
            # Warm the path once, so that the first probe is not the slowest.
            conn.call("GET", download_path(archive_id), {**bearer(session), **RAW})
            return session, archive_id
        finally:
            conn.close()

    def download_prober(self, session: str, archive_id: str) -> Prober:
        return Prober(self.conn(), download_path(archive_id), {**bearer(session), **RAW}, every=0.2)

    def health_prober(self) -> Prober:
        return Prober(self.conn(), "/health", {}, every=0.1)


@contextmanager
def fresh_vault(
    root: Path, pki: Pki, name: str, settings: Settings, extra_args: Sequence[str], nofile: int | None
) -> Iterator[Vault]:
    ws = Workspace(root / name, 0, 0)
    ws.certs = pki.certs
    ws.root.mkdir(parents=True)
    preexec = None
    if nofile is not None:

        def preexec() -> None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    metrics_port = None
    args = list(extra_args)
    if "--metrics-port" in args:
        metrics_port = int(args[args.index("--metrics-port") + 1])
    server = Securevault(ws, extra_args=args, preexec_fn=preexec)
    try:
        ws.admin("init", "--certs-dir", str(ws.certs))
        ws.admin("user", "add", ALICE, "--password-stdin", stdin=ALICE_PASSWORD + "\n")
        ws.admin("user", "add", MALLORY, "--password-stdin", stdin=MALLORY_PASSWORD + "\n")
        server.start()
        yield Vault(ws, server, pki, settings, metrics_port)
    finally:
        server.stop()
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
        if not settings.keep:
            shutil.rmtree(ws.root, ignore_errors=True)


@dataclass
class Row:
    name: str
    figure: str = "-"
    target: str = "-"
    ok: bool | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------- the attacks


def session_flood(v: Vault, s: Settings) -> Row:
    """8 kept-alive connections of B sending GET /get-files with a bogus
    Bearer as fast as they can, while alice downloads her 1-byte file every
    200 ms and /health is asked every 100 ms."""
    session, archive_id = v.honest_file()
    time.sleep(0.5)  # let the setup's audit records land before counting
    before = len(audit_events(v.audit_log))
    cert, key = v.pki.files(MALLORY)
    spec = LoadSpec(
        ca=str(v.pki.ca),
        cert=str(cert),
        key=str(key),
        port=v.port,
        mode="keepalive",
        method="GET",
        path="/get-files",
        headers=bearer(str(uuid.uuid4())),  # well-formed, unknown: a store lookup each
        body=None,
        duration=s.seconds,
        max_count=10**9,
        expect=401,
        # The abuse rows were measured with http.client's pace; the lean
        # client floods faster (bench/README.md, "The load generator").
        client="http.client",
    )
    probes: list[Prober] = []
    queue = QueueWatch(v.metrics_port) if v.metrics_port else None

    def during(done: threading.Event) -> None:
        probes.extend([v.download_prober(session, archive_id), v.health_prober()])
        for probe in probes:
            probe.start()
        if queue is not None:
            queue.start()
        done.wait(s.seconds + 120)
        for probe in probes:
            probe.stop()
        if queue is not None:
            queue.stop()

    with v.memory() as memory:
        result = run_load(spec, 8, v.server.pids, during=during)
    sent = result.count + result.errors
    # Refusals are audited in the pool: wait until the log stops growing.
    events = audit_events(v.audit_log)
    settle_deadline = time.monotonic() + 30
    while time.monotonic() < settle_deadline:
        time.sleep(1.0)
        later = audit_events(v.audit_log)
        if len(later) == len(events):
            break
        events = later
    honest_events = {"login", "upload", "download", "logout"}
    refusal_lines = sum(1 for event in events[before:] if event not in honest_events)
    download, health = probes
    per_request = refusal_lines / sent if sent else float("nan")
    figure = (
        f"{sent} sent ({result.rate:.0f}/s); {memory.peak_text()}; "
        f"honest dl {download.summary()}; /health max {health.max_ms():.0f} ms; "
        f"audit {per_request:.2f} lines/refusal"
    )
    if queue is not None:
        figure += f"; pool queue peak {queue.peak:.0f}" if queue.peak is not None else "; pool queue n/a"
    notes = [
        f"server CPU {result.server_cpu:.2f} cores, flood clients {result.client_cpu:.2f} cores; "
        f"{result.count} answered 401, {result.errors} otherwise"
        + (f" (first: {result.first_error})" if result.first_error else ""),
        f"audit lines from the flood: {refusal_lines}",
    ]
    if download.failures:
        notes.append(f"honest download failures: {statuses_text(download.failures)}")
    ok = download.ms(0.99) < 500 and memory.growth_mib() < 100 and not memory.killed
    return Row("session_flood", figure, "dl p99 < 500 ms, RSS < 100 MiB", ok, notes)


def trickle_body(v: Vault, s: Settings) -> Row:
    """A login whose body comes 1 byte every 4 s (daemon: --idle-timeout 10)."""
    cap = max(2 * s.seconds, 25.0)
    body = json.dumps({"username": ALICE, "password": ALICE_PASSWORD}).encode()
    sock = v.conn(honest=False, timeout=5).open()
    head = (
        "POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    received = bytearray()
    sent = 0
    closed_at: float | None = None
    how = ""
    began = time.monotonic()
    try:
        sock.sendall(head)
        next_byte = began
        while time.monotonic() - began < cap:
            now = time.monotonic()
            if now >= next_byte and sent < len(body):
                try:
                    sock.sendall(body[sent : sent + 1])
                except OSError as error:
                    closed_at, how = now, f"send failed ({error.__class__.__name__})"
                    break
                sent += 1
                next_byte += 4.0
            wait = max(0.0, min(next_byte, began + cap) - time.monotonic())
            if sock.pending() or select.select([sock], [], [], wait)[0]:
                try:
                    data = sock.recv(64 * KiB)
                except TimeoutError:
                    continue
                except OSError as error:
                    closed_at, how = time.monotonic(), f"reset ({error.__class__.__name__})"
                    break
                if not data:
                    closed_at, how = time.monotonic(), "closed"
                    break
                received += data
    finally:
        sock.close()
    answered = answer_text(bytes(received))
    if closed_at is None:
        figure = f"held >= {cap:.0f} s (cap), {answered}, {sent} body bytes sent"
        ok = False
    else:
        held = closed_at - began
        figure = f"{how} after {held:.1f} s, {answered}, {sent} body bytes sent"
        ok = held < 2 * TRICKLE_IDLE_TIMEOUT
    return Row("trickle_body", figure, f"closed < {2 * TRICKLE_IDLE_TIMEOUT} s (API.md: 408)", ok)


def send_after_refusal(v: Vault, s: Settings) -> Row:
    """A raw upload with a bogus session whose client keeps sending 64 KiB
    pieces after the 401 (which comes with Connection: close)."""
    cap = max(1.5 * s.seconds, 10.0)
    declared = 15 << 30  # under the default --max-upload-size (16 GiB): no 413
    sock = v.conn(honest=False, timeout=1.0).open()
    piece = os.urandom(64 * KiB)
    received = bytearray()
    status: int | None = None
    began = time.monotonic()
    refused_at: float | None = None
    eof_at: float | None = None
    closed_at: float | None = None
    closed_how = ""
    stalled_since: float | None = None
    total = after = 0
    try:
        sock.sendall(raw_upload_head(str(uuid.uuid4()), "refused.bin", declared))
        while total < declared:
            now = time.monotonic()
            if now - (refused_at or began) >= cap:
                break
            while eof_at is None and (sock.pending() or select.select([sock], [], [], 0)[0]):
                try:
                    data = sock.recv(64 * KiB)
                except TimeoutError:
                    break
                except OSError as error:
                    closed_at, closed_how = time.monotonic(), f"reset on read ({error.__class__.__name__})"
                    break
                if not data:
                    eof_at = time.monotonic()
                    break
                received += data
                if status is None:
                    status = parse_status(bytes(received))
                    if status is not None:
                        refused_at = time.monotonic()
            if closed_at is not None:
                break
            try:
                n = sock.send(piece)
            except TimeoutError:
                stalled_since = stalled_since or now
                continue
            except OSError as error:
                closed_at, closed_how = time.monotonic(), f"closed ({error.__class__.__name__} on send)"
                break
            stalled_since = None
            total += n
            if refused_at is not None:
                after += n
    finally:
        sock.close()
    answered = answer_text(bytes(received))
    since = refused_at or began
    notes = [
        f"{total / MiB:.1f} MiB sent in all; {answered}"
        + (f" after {refused_at - began:.2f} s" if refused_at else "")
        + (f"; TLS close_notify/EOF {eof_at - since:.2f} s after it" if eof_at else "; no EOF seen"),
        "bytes 'accepted' include what the kernel buffers on both sides (a few MiB on loopback)",
    ]
    if closed_at is not None:
        held = closed_at - since
        figure = f"{answered}; then accepted {after / MiB:.1f} MiB for {held:.1f} s, {closed_how}"
        ok = held < 5
    elif stalled_since is not None:
        figure = (
            f"{answered}; then accepted {after / MiB:.1f} MiB, stopped reading after "
            f"{stalled_since - since:.1f} s, still open at the {cap:.0f} s cap"
        )
        ok = False
    else:
        figure = f"{answered}; then accepted {after / MiB:.1f} MiB for >= {cap:.0f} s (cap), still open"
        ok = False
    return Row("send_after_refusal", figure, "closed < 5 s after refusal (API.md)", ok, notes)


def idle_connections(v: Vault, s: Settings) -> Row:
    """B opens up to 1,100 idle TLS connections (daemon: soft RLIMIT_NOFILE
    1024) and holds them; then can alice connect and get /health?"""
    held: list[ssl.SSLSocket] = []
    failures: Counter[str] = Counter()
    consecutive = 0
    began = time.monotonic()
    deadline = began + max(s.seconds, 30.0)
    try:
        while len(held) < 1100 and consecutive < 3 and time.monotonic() < deadline:
            conn = v.conn(honest=False, timeout=3.0)
            try:
                held.append(conn.open())
                consecutive = 0
            except Exception as error:
                failures[error.__class__.__name__] += 1
                consecutive += 1
        opened = len(held)
        opening = time.monotonic() - began
        honest = v.conn(timeout=5.0)
        try:
            response = honest.call("GET", "/health")
            result = "ok" if response.status == 200 else response.describe()
        except ConnectionRefusedError:
            result = "refused"
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as error:
            result = f"reset ({error.__class__.__name__})"
        except TimeoutError:
            result = "timeout (5 s)"
        except OSError as error:
            result = error.__class__.__name__
        finally:
            honest.close()
        # Which of them are still open and silent (neither answered nor
        # closed)?  Non-blocking: nothing to read (TLS 1.3 tickets aside) is
        # an open, idle connection.
        answered: Counter[str] = Counter()
        still = 0
        for sock in held:
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            except ssl.SSLWantReadError:
                still += 1
                continue
            except OSError as error:
                answered[error.__class__.__name__] += 1
                continue
            status = parse_status(data)
            answered[str(status) if status else ("closed" if not data else "data")] += 1
    finally:
        for sock in held:
            try:
                sock.close()
            except OSError:
                pass
    figure = f"{still} held ({opened} handshakes done); honest /health: {result}"
    notes = [f"opening took {opening:.1f} s; the daemon's soft RLIMIT_NOFILE is {DAEMON_NOFILE}"]
    if failures:
        notes.append(f"failed attempts: {statuses_text(failures)}")
    if answered:
        notes.append(f"connections the server answered or closed: {statuses_text(answered)}")
    return Row("idle_connections", figure, "honest ok (API.md)", result == "ok", notes)


def json_uploads(v: Vault, s: Settings) -> Row:
    """8 parallel authenticated JSON uploads of a 60 MiB body each (45 MiB
    of random bytes, base64), repeated for the duration."""
    content = base64.b64encode(os.urandom(45 * MiB)).decode("ascii")
    body = json.dumps({"filename": "big.json.bin", "content": content}).encode("ascii")
    del content
    login = v.conn(honest=False)
    session = login.login(MALLORY, MALLORY_PASSWORD)
    login.close()
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    conns = [v.conn(honest=False, timeout=60.0) for _ in range(8)]
    deadline = time.monotonic() + s.seconds

    def uploader(conn: Http) -> None:
        while time.monotonic() < deadline:
            try:
                outcome = conn.call(
                    "POST", "/upload-file", {**bearer(session), "Content-Type": "application/json"}, body
                ).describe()
            except Exception as error:
                outcome = error.__class__.__name__
            with lock:
                statuses[outcome] += 1
        conn.close()

    health = v.health_prober()
    with v.memory() as memory:
        health.start()
        run_threads([partial(uploader, c) for c in conns], s.seconds + 90)
        health.stop()
        for conn in conns:
            conn.close()
    figure = f"{memory.peak_text()}; /health max {health.max_ms():.0f} ms; {statuses_text(statuses)}"
    ok = memory.growth_mib() < 300 and not memory.killed
    return Row("json_uploads", figure, "RSS < 300 MiB", ok, [f"body {len(body) / MiB:.1f} MiB each"])


def slow_readers(v: Vault, s: Settings) -> Row:
    """200 raw downloads of a 64 MiB file started at once by B, each client
    reading 1 byte a second through a 4 KiB receive buffer."""
    conn = v.conn(honest=False, timeout=60.0)
    session = conn.login(MALLORY, MALLORY_PASSWORD)
    response = upload(conn, session, "big.bin", os.urandom(64 * MiB))
    conn.close()
    if response.status != 201:
        raise RuntimeError(f"upload of the 64 MiB file answered {response.describe()}")
    archive_id = str(json.loads(response.body)["id"])
    request = (
        f"GET {download_path(archive_id)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {session}\r\nAccept: application/octet-stream\r\n\r\n"
    ).encode()
    time.sleep(1.0)
    socks: list[ssl.SSLSocket | None] = []
    heads: list[bytearray] = []
    failures: Counter[str] = Counter()
    memory = v.memory()
    try:
        with memory:
            for _ in range(200):
                try:
                    opened = v.conn(honest=False, timeout=5.0, rcvbuf=4096).open()
                except Exception as error:
                    failures[f"connect {error.__class__.__name__}"] += 1
                    continue
                socks.append(opened)
                heads.append(bytearray())
            for i, sock in enumerate(socks):
                assert sock is not None
                try:
                    sock.sendall(request)
                    sock.setblocking(False)
                except OSError as error:
                    failures[f"send {error.__class__.__name__}"] += 1
                    socks[i] = None
            deadline = time.monotonic() + s.seconds
            while time.monotonic() < deadline:
                for i, sock in enumerate(socks):
                    if sock is None:
                        continue
                    try:
                        data = sock.recv(1)
                        if data and b"\r\n\r\n" not in heads[i] and len(heads[i]) < 16 * KiB:
                            # The first record only (it holds the head): it is
                            # already out of the kernel's buffer.
                            heads[i] += data + sock.recv(sock.pending()) if sock.pending() else data
                        elif not data:
                            socks[i] = None
                            failures["closed by the server"] += 1
                    except ssl.SSLWantReadError:
                        pass
                    except OSError as error:
                        socks[i] = None
                        failures[f"{error.__class__.__name__}"] += 1
                time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
            at_end = memory.read()
            still_open = sum(1 for sock in socks if sock is not None)
            for sock in socks:
                if sock is not None:
                    sock.close()
            socks = []
            time.sleep(5.0)
            after_close = memory.read()
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()
    statuses = Counter(str(parse_status(bytes(head)) or "no head yet") for head in heads)
    figure = (
        f"{memory.peak_text()}, +{memory.growth_mib(at_end):.1f} at {s.seconds:.0f} s, "
        f"+{memory.growth_mib(after_close):.1f} 5 s after the clients left; "
        f"{still_open} of {len(heads)} still open at {s.seconds:.0f} s"
    )
    notes = [f"answers: {statuses_text(statuses)}"]
    if failures:
        notes.append(f"closed or failed: {statuses_text(failures)}")
    ok = memory.growth_mib() < 300 and not memory.killed
    return Row("slow_readers", figure, "RSS < 300 MiB", ok, notes)


def login_storm(v: Vault, s: Settings) -> Row:
    """32 threads of B logging in (rightly) in a loop; alice's 1-byte
    download every 200 ms, first without the storm, then during it."""
    session, archive_id = v.honest_file()
    quiet = v.download_prober(session, archive_id)
    quiet.start()
    time.sleep(min(10.0, max(2.0, s.seconds / 2)))
    quiet.stop()
    logins: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + s.seconds

    def stormer() -> None:
        conn = v.conn(honest=False, timeout=30.0)
        body = json.dumps({"username": MALLORY, "password": MALLORY_PASSWORD}).encode()
        while time.monotonic() < deadline:
            try:
                outcome = conn.call("POST", "/login", {"Content-Type": "application/json"}, body).describe()
            except Exception as error:
                outcome = error.__class__.__name__
            with lock:
                logins[outcome] += 1
        conn.close()

    storm = v.download_prober(session, archive_id)
    storm.start()
    run_threads([stormer] * 32, s.seconds + 40)
    storm.stop()
    delay = storm.ms(0.99) - quiet.ms(0.99)
    figure = (
        f"honest dl quiet {quiet.summary()}, storm {storm.summary()}; "
        f"{logins['200']} logins ({logins['200'] / s.seconds:.1f}/s)"
    )
    notes = [f"login answers: {statuses_text(logins)}"]
    return Row("login_storm", figure, "p99 delay <= 100 ms (API.md)", delay <= 100, notes)


def quota_race(v: Vault, s: Settings) -> Row:
    """--quota 1000000: 12 parallel raw uploads of 900 kB by one user."""
    quota = 1_000_000
    conns = [v.conn(honest=False, timeout=60.0) for _ in range(12)]
    session = conns[0].login(MALLORY, MALLORY_PASSWORD)
    for conn in conns:
        conn.open()
    data = os.urandom(900_000)
    start = threading.Barrier(len(conns), timeout=30)
    statuses: Counter[str] = Counter()
    lock = threading.Lock()

    def uploader(conn: Http) -> None:
        start.wait()
        try:
            outcome = upload(conn, session, "race.bin", data).describe()
        except Exception as error:
            outcome = error.__class__.__name__
        with lock:
            statuses[outcome] += 1
        conn.close()

    run_threads([partial(uploader, c) for c in conns], 90)
    lister = v.conn(honest=False)
    listing = lister.call("GET", "/get-files", bearer(session))
    lister.close()
    files = json.loads(listing.body)["files"] if listing.status == 200 else []
    stored = sum(int(f["size"]) for f in files)
    on_disk = sum(p.stat().st_size for p in (v.ws.data / "archives").rglob("*") if p.is_file())
    figure = f"{statuses_text(statuses)}; stored {len(files)} archives, {stored:,} bytes (quota {quota:,})"
    notes = [f"archive files on disk: {on_disk:,} bytes (encrypted)"]
    return Row("quota_race", figure, "stored <= quota (API.md)", stored <= quota, notes)


def throttle_race(v: Vault, s: Settings) -> Row:
    """--threads 16: 20 wrong logins for alice at once from certificate B."""
    conns = [v.conn(honest=False, timeout=30.0) for _ in range(20)]
    for conn in conns:
        conn.open()
    start = threading.Barrier(len(conns), timeout=30)
    statuses: Counter[str] = Counter()
    lock = threading.Lock()

    def guess(conn: Http, i: int) -> None:
        body = json.dumps({"username": ALICE, "password": f"wrong-guess-{i}"}).encode()
        start.wait()
        try:
            outcome = str(conn.call("POST", "/login", {"Content-Type": "application/json"}, body).status)
        except Exception as error:
            outcome = error.__class__.__name__
        with lock:
            statuses[outcome] += 1
        conn.close()

    run_threads([partial(guess, c, i) for i, c in enumerate(conns)], 60)
    checked = statuses["401"]
    figure = f"{checked} answered 401 (guesses checked), {statuses['429']} answered 429"
    others = {k: n for k, n in statuses.items() if k not in ("401", "429")}
    notes = [f"other answers: {statuses_text(Counter(others))}"] if others else []
    return Row("throttle_race", figure, "401 <= 5 (API.md)", checked <= 5, notes)


def owner_lockout(v: Vault, s: Settings) -> Row:
    """5 wrong passwords for alice from B, then alice's own from A."""
    attacker = v.conn(honest=False)
    wrong: Counter[str] = Counter()
    try:
        for i in range(5):
            body = json.dumps({"username": ALICE, "password": f"wrong-{i}"}).encode()
            wrong[attacker.call("POST", "/login", {"Content-Type": "application/json"}, body).describe()] += 1
    finally:
        attacker.close()
    owner = v.conn()
    try:
        body = json.dumps({"username": ALICE, "password": ALICE_PASSWORD}).encode()
        answer = owner.call("POST", "/login", {"Content-Type": "application/json"}, body)
    finally:
        owner.close()
    figure = f"alice got {answer.describe()}"
    notes = [f"the 5 wrong guesses from B: {statuses_text(wrong)}"]
    return Row("owner_lockout", figure, "200", answer.status == 200, notes)


def audit_kill9(v: Vault, s: Settings) -> Row:
    """50 logins by alice answered 200 (4 threads) while mallory logs in on 2
    more (the pool busy, as on a loaded server), then SIGKILL the moment
    alice's last answer is in: how many of her login records reached the
    audit log?"""
    wanted = 50
    lock = threading.Lock()
    state = {"taken": 0, "ok": 0, "background": 0}
    deadline = time.monotonic() + 90
    stopping = threading.Event()

    def login_body(username: str, password: str) -> bytes:
        return json.dumps({"username": username, "password": password}).encode()

    def alice() -> None:
        conn = v.conn(timeout=30.0)
        body = login_body(ALICE, ALICE_PASSWORD)
        while time.monotonic() < deadline:
            with lock:
                if state["taken"] >= wanted:
                    break
                state["taken"] += 1
            try:
                ok = conn.call("POST", "/login", {"Content-Type": "application/json"}, body).status == 200
            except Exception:
                ok = False
            with lock:
                if ok:
                    state["ok"] += 1
                else:
                    state["taken"] -= 1
        conn.close()

    def mallory() -> None:
        conn = v.conn(honest=False, timeout=30.0)
        body = login_body(MALLORY, MALLORY_PASSWORD)
        while not stopping.is_set() and time.monotonic() < deadline:
            try:
                if conn.call("POST", "/login", {"Content-Type": "application/json"}, body).status == 200:
                    with lock:
                        state["background"] += 1
            except Exception:
                pass
        conn.close()

    background = [threading.Thread(target=mallory, daemon=True) for _ in range(2)]
    for thread in background:
        thread.start()
    try:
        run_threads([alice] * 4, 100)
        assert v.server.proc is not None
        v.server.proc.send_signal(signal.SIGKILL)
        v.server.proc.wait(10)
    finally:
        stopping.set()
        for thread in background:
            thread.join(35)
    found = sum(1 for r in audit_records(v.audit_log) if r.get("event") == "login" and r.get("user") == ALICE)
    lost = state["ok"] - found
    figure = f"lost: {state['ok']} - {found} = {lost}"
    notes = [f"mallory's logins answered meanwhile: {state['background']}"]
    return Row("audit_kill9", figure, "0 lost", lost == 0 and state["ok"] == wanted, notes)


TUS_UPLOADS = 40
TUS_SENDERS = 4  # attacker connections, each PATCHing its share of the uploads round-robin
TUS_PATCH_BYTES = 64 * KiB
TUS_UPLOAD_BYTES = 2 * MiB  # each upload's declared length: 32 PATCHes
TUS_ASSEMBLERS = 8  # securevault.staging.MAX_ASSEMBLERS, the bound under attack


def daemon_threads(pid: int) -> int:
    """Threads in /proc/PID/status (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def temp_blob_count(data: Path) -> int:
    """Blob-store temp files: pieces or uploads in flight
    (C{<data>/archives/<owner>/.<id>.body.tmp})."""
    return sum(1 for _ in (data / "archives").glob("*/.*.tmp"))


def journal_file_count(data: Path) -> int:
    return sum(1 for _ in (data / "archives").glob("*/*.journal"))


class TusWatch(threading.Thread):
    """The daemon's thread count, temp blobs and open journals every 50 ms:
    their peaks."""

    def __init__(self, pid: int, data: Path) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.data = data
        self.peak_threads = daemon_threads(pid)
        self.peak_temps = temp_blob_count(data)
        self.peak_journals, self.peak_journal_readers = open_files(pid, ".journal")
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            self.peak_threads = max(self.peak_threads, daemon_threads(self.pid))
            self.peak_temps = max(self.peak_temps, temp_blob_count(self.data))
            # The bound is on journals being written (an assembler each); the
            # slow path reads a journal while its upload finishes.
            writing, reading = open_files(self.pid, ".journal")
            self.peak_journals = max(self.peak_journals, writing)
            self.peak_journal_readers = max(self.peak_journal_readers, reading)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


def tus_held_open(v: Vault, s: Settings) -> Row:
    """Mallory opens 40 tus uploads of 2 MiB and PATCHes them 64 KiB at a
    time, round-robin, on 4 connections (10 uploads each), the 32 rounds
    paced over the duration, to hold the daemon's assemblers (an open
    journal each, and a hashing thread for large PATCHes, at most 8); the last round finishes every upload, and
    each archive is downloaded and compared.  Alice's 1-byte download and
    /health are probed throughout."""
    session_a, archive_a = v.honest_file()
    login = v.conn(honest=False)
    session = login.login(MALLORY, MALLORY_PASSWORD)
    login.close()
    files = [os.urandom(TUS_UPLOAD_BYTES) for _ in range(TUS_UPLOADS)]
    tus = {"Tus-Resumable": "1.0.0", **bearer(session)}
    creator = v.conn(honest=False)
    upload_ids: list[str] = []
    for index in range(TUS_UPLOADS):
        name = base64.b64encode(f"held-{index}.bin".encode()).decode()
        created = creator.call(
            "POST",
            "/uploads/",
            {**tus, "Upload-Length": str(TUS_UPLOAD_BYTES), "Upload-Metadata": f"filename {name}"},
        )
        if created.status != 201:
            raise RuntimeError(f"tus creation answered {created.describe()}")
        upload_ids.append(created.headers["location"].rsplit("/", 1)[1])
    creator.close()
    idle_threads = daemon_threads(v.pid)
    offsets = [0] * TUS_UPLOADS
    archives: dict[int, str] = {}
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + s.seconds

    def patch(conn: Http, index: int, size: int) -> None:
        offset = offsets[index]
        answer = conn.call(
            "PATCH",
            f"/uploads/{upload_ids[index]}",
            {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)},
            files[index][offset : offset + size],
        )
        with lock:
            statuses[answer.describe()] += 1
        if answer.status == 204:
            offsets[index] = int(answer.headers["upload-offset"])
            if "upload-archive-id" in answer.headers:
                archives[index] = answer.headers["upload-archive-id"]

    rounds = TUS_UPLOAD_BYTES // TUS_PATCH_BYTES
    began = time.monotonic()

    def sender(share: range) -> None:
        conn = v.conn(honest=False, timeout=60.0)
        try:
            for round_index in range(rounds):
                # Paced: round k starts k/rounds into the duration (at once if behind).
                time.sleep(max(0.0, began + round_index * s.seconds / rounds - time.monotonic()))
                if time.monotonic() > deadline + 300:
                    break
                for index in share:
                    if offsets[index] < TUS_UPLOAD_BYTES:
                        patch(conn, index, TUS_PATCH_BYTES)
        except Exception as error:
            with lock:
                statuses[error.__class__.__name__] += 1
        finally:
            conn.close()

    share = TUS_UPLOADS // TUS_SENDERS
    probes = [v.download_prober(session_a, archive_a), v.health_prober()]
    watch = TusWatch(v.pid, v.ws.data)
    for probe in probes:
        probe.start()
    watch.start()
    with v.memory() as memory:
        run_threads([partial(sender, range(i * share, (i + 1) * share)) for i in range(TUS_SENDERS)], s.seconds + 300)
    held = time.monotonic() - began
    watch.stop()
    for probe in probes:
        probe.stop()
    exact = 0
    reader = v.conn(honest=False, timeout=60.0)
    for index, archive_id in archives.items():
        answer = reader.call("GET", download_path(archive_id), {**bearer(session), **RAW})
        exact += answer.status == 200 and answer.body == files[index]
    reader.close()
    # Counted once the daemon is idle: a finished upload's pieces and
    # journal go after its last answer.
    left_temps = temp_blob_count(v.ws.data) + journal_file_count(v.ws.data)
    download, health = probes
    patches = sum(n for name, n in statuses.items() if name == "204")
    extra_threads = watch.peak_threads - idle_threads
    figure = (
        f"{memory.peak_text()}; peak threads {watch.peak_threads} (idle {idle_threads}, +{extra_threads}); "
        f"temp blobs at peak {watch.peak_temps}, journals open for writing at peak {watch.peak_journals} "
        f"(+{watch.peak_journal_readers} reading), {left_temps} left; "
        f"{exact}/{TUS_UPLOADS} byte-exact; honest dl {download.summary()}, /health {health.summary()}"
    )
    notes = [
        f"{patches} PATCHes answered 204 in {held:.1f} s by {TUS_SENDERS} connections; answers: {statuses_text(statuses)}",
        f"temp blobs include up to {TUS_SENDERS} pieces in flight (one per attacker connection)",
    ]
    if download.failures or health.failures:
        notes.append(f"honest failures: {statuses_text(download.failures + health.failures)}")
    ok = (
        extra_threads <= TUS_ASSEMBLERS
        and watch.peak_temps <= TUS_SENDERS
        and watch.peak_journals <= TUS_ASSEMBLERS
        and left_temps == 0
        and exact == TUS_UPLOADS
        and not memory.killed
    )
    target = f"threads +<= {TUS_ASSEMBLERS}, journals written <= {TUS_ASSEMBLERS}, temp <= {TUS_SENDERS}, all exact"
    return Row("tus_held_open", figure, target, ok, notes)


@dataclass(frozen=True)
class Attack:
    name: str
    run: Callable[[Vault, Settings], Row]
    daemon_args: Callable[[], list[str]] = list
    nofile: int | None = None


ATTACKS = [
    Attack("session_flood", session_flood, lambda: ["--metrics-port", str(free_port())]),
    Attack("trickle_body", trickle_body, lambda: ["--idle-timeout", str(TRICKLE_IDLE_TIMEOUT)]),
    Attack("send_after_refusal", send_after_refusal),
    Attack("idle_connections", idle_connections, nofile=DAEMON_NOFILE),
    Attack("json_uploads", json_uploads),
    Attack("slow_readers", slow_readers),
    Attack("login_storm", login_storm),
    Attack("quota_race", quota_race, lambda: ["--quota", "1000000"]),
    Attack("throttle_race", throttle_race, lambda: ["--threads", "16"]),
    Attack("owner_lockout", owner_lockout),
    Attack("audit_kill9", audit_kill9),
    Attack("tus_held_open", tus_held_open),
]
NAMES = [attack.name for attack in ATTACKS]


# ---------------------------------------------------------------- report


def table(rows: Sequence[Row]) -> list[str]:
    """The rows as bench/figures.py prints its table (markdown, padded)."""
    header = ("attack", "figure", "target", "ok")
    body = [
        (
            row.name,
            f"FAILED: {row.error}" if row.error else row.figure,
            row.target,
            "-" if row.ok is None or row.error else ("yes" if row.ok else "NO"),
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| " + " | ".join(c.rjust(widths[i]) if i == 3 else c.ljust(widths[i]) for i, c in enumerate(cells)) + " |"
        )

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in body)]


def header_lines(settings: Settings) -> list[str]:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return [
        f"date:         {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine:      {os.uname().machine} ({os.uname().sysname} {os.uname().release}), "
        f"{cpu_model()}, {os.cpu_count()} cores",
        f"python:       {sys.version.split()[0]}  {ssl.OPENSSL_VERSION}",
        f"daemon:       {REPO_ROOT} at {commit or '?'}",
        f"settings:     --seconds {settings.seconds:g} (per attack), RSS limit {settings.rss_limit_mib:g} MiB",
        f"load:         {os.getloadavg()[0]:.1f} (1-minute average at the start; other work on the machine moves figures)",
    ]


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.abuse",
        description="Hostile clients with a valid certificate against a fresh securevault daemon each, "
        "on loopback; one row per attack. See bench/README.md.",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the timed attacks (default 20)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these attacks (repeatable or comma-separated): {', '.join(NAMES)}",
    )
    parser.add_argument(
        "--rss-limit-mib",
        type=float,
        default=4096,
        help="kill a daemon whose RSS passes this, to spare the machine (default 4096)",
    )
    parser.add_argument("--workdir", default=None, help="parent directory of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rss_limit_mib <= 0:
        parser.error("--seconds and --rss-limit-mib must be positive")
    chosen: list[str] = []
    for item in args.only:
        for name in filter(None, (part.strip() for part in item.split(","))):
            if name not in NAMES:
                parser.error(f"unknown attack {name!r}; choose from {', '.join(NAMES)}")
            chosen.append(name)
    args.names = [name for name in NAMES if name in chosen] if chosen else list(NAMES)
    return args


def raise_fd_limit(wanted: int = 4096) -> int:
    """Room for idle_connections' 1,100 client sockets; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    settings = Settings(args.seconds, args.rss_limit_mib, args.keep)
    fd_limit = raise_fd_limit()
    for line in header_lines(settings):
        print(line, file=out)
    if "idle_connections" in args.names and fd_limit < 1200:
        print(f"note: this process may open only {fd_limit} files; idle_connections is capped by it", file=out)
    print(file=out, flush=True)
    root = Path(tempfile.mkdtemp(prefix="svabuse-", dir=args.workdir))
    rows: list[Row] = []
    try:
        pki = make_pki(root)
        for attack in ATTACKS:
            if attack.name not in args.names:
                continue
            print(f"{attack.name} ...", file=out, flush=True)
            began = time.monotonic()
            try:
                with fresh_vault(root, pki, attack.name, settings, attack.daemon_args(), attack.nofile) as vault:
                    row = attack.run(vault, settings)
            except Exception as error:
                row = Row(attack.name, error=f"{error.__class__.__name__}: {error}"[:300])
            row.seconds = time.monotonic() - began
            print(
                f"{attack.name}: {row.error or row.figure} ({row.seconds:.0f} s, load {os.getloadavg()[0]:.1f})",
                file=out,
                flush=True,
            )
            rows.append(row)
    finally:
        if args.keep:
            print(f"kept {root}", file=out)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(file=out)
    for line in table(rows):
        print(line, file=out)
    notes = [f"  {row.name}: {note}" for row in rows for note in row.notes]
    if notes:
        print("\nnotes:", file=out)
        for note in notes:
            print(note, file=out)
    failed = [row.name for row in rows if row.error]
    if failed:
        print(f"\nfailed to run: {', '.join(failed)}", file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
