"""Clients: curl for the large transfers, Python for request and handshake rates."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import re
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.env import Workspace, cpu_seconds, process_cpu

CURL_FORMAT = "%{time_total} %{size_upload} %{size_download} %{http_code}"


@dataclass
class CurlResult:
    seconds: float
    uploaded: int
    downloaded: int
    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class ClientError(RuntimeError):
    pass


def curl_command(ws: Workspace, url: str, args: list[str], output: str, max_time: float) -> list[str]:
    return [
        "curl",
        "-sS",
        "--http1.1",
        "--cacert",
        str(ws.ca),
        "--cert",
        str(ws.client_cert),
        "--key",
        str(ws.client_key),
        "--max-time",
        str(int(max_time)),
        "-H",
        "Expect:",
        "-o",
        output,
        "-w",
        CURL_FORMAT,
        *args,
        url,
    ]


def parse_curl(out: str, err: str, body_path: Path | None) -> CurlResult:
    try:
        seconds, up, down, status = out.split()
        result = CurlResult(float(seconds), int(float(up)), int(float(down)), int(status), b"")
    except ValueError:
        raise ClientError(f"curl failed: {err.strip() or out.strip()}") from None
    if body_path is not None and body_path.exists():
        result.body = body_path.read_bytes()
        body_path.unlink()
    if not result.ok:
        raise ClientError(f"HTTP {result.status}: {result.body[:300]!r} {err.strip()}")
    return result


def curl(ws: Workspace, url: str, args: list[str], keep_body: bool = False, max_time: float = 900) -> CurlResult:
    body_path = ws.root / f"curl-body-{threading.get_ident()}" if keep_body else None
    cmd = curl_command(ws, url, args, str(body_path) if body_path else "/dev/null", max_time)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time + 30)
    return parse_curl(out.stdout, out.stderr, body_path)


def curl_parallel(
    ws: Workspace, jobs: list[tuple[str, list[str]]], max_time: float = 900, keep_bodies: bool = True
) -> tuple[float, list[CurlResult]]:
    """Start all curls together; wall-clock seconds until the last one ends.
    Without C{keep_bodies} the answers go to /dev/null (downloads)."""
    procs = []
    bodies: list[Path | None] = []
    start = time.perf_counter()
    for i, (url, args) in enumerate(jobs):
        body = ws.root / f"curl-par-{i}" if keep_bodies else None
        bodies.append(body)
        procs.append(
            subprocess.Popen(
                curl_command(ws, url, args, str(body) if body else "/dev/null", max_time),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=max_time + 30) for p in procs]
    wall = time.perf_counter() - start
    return wall, [parse_curl(o, e, b) for (o, e), b in zip(outs, bodies, strict=False)]


# ---------------------------------------------------------------- Python HTTPS


def ssl_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


class Api:
    """A small persistent JSON client for setup calls (login, delete)."""

    def __init__(self, ws: Workspace, port: int) -> None:
        self.ctx = ssl_context(str(ws.ca), str(ws.client_cert), str(ws.client_key))
        self.port = port
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=self.ctx, timeout=60)
        self.session: str | None = None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.session:
            headers["Authorization"] = f"Bearer {self.session}"
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw

    def login(self, username: str, password: str) -> str:
        status, body = self.call("POST", "/login", {"username": username, "password": password})
        if status != 200:
            raise ClientError(f"login failed: {status} {body}")
        self.session = body["session_id"]
        return self.session

    def delete(self, archive_id: str) -> None:
        status, body = self.call("POST", "/delete-file", {"id": archive_id})
        if status != 204:
            raise ClientError(f"delete failed: {status} {body}")

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------- load generator


@dataclass
class LoadSpec:
    ca: str
    cert: str
    key: str
    port: int
    mode: str  # "keepalive" (one connection, many requests) or "newconn" (one request each)
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    duration: float
    max_count: int  # per worker
    expect: int = 200
    # "lean" (L{LeanConnection}) or "http.client" for kept-alive
    # connections; new connections always go through http.client.
    client: str = "lean"


@dataclass
class LoadResult:
    count: int
    errors: int
    seconds: float
    client_cpu: float  # cores used by the client processes, on average
    server_cpu: float  # cores used by the server processes, on average
    first_error: str | None

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


def prepared_request(spec: LoadSpec) -> bytes:
    """The request of C{spec} as bytes on the wire, built once."""
    lines = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: 127.0.0.1:{spec.port}"]
    lines += [f"{name}: {value}" for name, value in spec.headers.items()]
    if spec.body is not None:
        lines.append(f"Content-Length: {len(spec.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (spec.body or b"")


class LeanConnection:
    """One kept-alive HTTPS connection that sends a prepared request and
    reads the answer with as little Python per request as it can.

    A request-rate figure measures the server only while the client costs
    far less: on 2 cores http.client spent 0.19 ms of CPU per small request,
    half the server's own cost, and the client's core share, not the server,
    set the rate (bench/README.md, "The load generator").  This one spends
    about 0.06 ms.  It reads answers with a Content-Length (or none allowed:
    1xx, 204, 304) and nothing else, which is what both servers send here.
    """

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 30.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self._buffer = bytearray()

    def exchange(self, request: bytes) -> tuple[int, bool]:
        """Send C{request}; the answer's status, and whether the connection
        stays open."""
        self.sock.sendall(request)
        buffer = self._buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(buffer[:end]).lower()
        status = int(head[9:12])
        found = _CONTENT_LENGTH.search(head)
        if found is not None:
            length = int(found.group(1))
        elif status in (204, 304) or status < 200:
            length = 0
        else:
            raise ClientError(f"HTTP {status} without Content-Length")
        total = end + 4 + length
        while len(buffer) < total:
            self._fill()
        del buffer[:total]
        return status, b"\r\nconnection: close" not in head

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buffer += data

    def close(self) -> None:
        self.sock.close()


class _LeanRequests:
    """Kept-alive requests through L{LeanConnection}, reconnecting after an
    answer that closes the connection or a failure."""

    def __init__(self, spec: LoadSpec, context: ssl.SSLContext) -> None:
        self._spec = spec
        self._context = context
        self._request = prepared_request(spec)
        self._conn: LeanConnection | None = LeanConnection(spec.port, context)

    def status(self) -> int:
        if self._conn is None:
            self._conn = LeanConnection(self._spec.port, self._context)
        try:
            status, keep = self._conn.exchange(self._request)
        except Exception:
            self.close()  # the next request opens a new connection
            raise
        if not keep:
            self.close()
        return status

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


class _HttpClientRequests:
    """Requests through http.client: on one kept-alive connection (which
    http.client opens again after a failure), or each on a new one."""

    def __init__(self, spec: LoadSpec, context: ssl.SSLContext) -> None:
        self._spec = spec
        self._context = context
        self._headers = dict(spec.headers)
        self._kept: http.client.HTTPSConnection | None = None
        if spec.mode == "keepalive":
            self._kept = self._connection()
            self._kept.connect()
        else:
            self._headers["Connection"] = "close"

    def _connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self._spec.port, context=self._context, timeout=30)

    def status(self) -> int:
        spec = self._spec
        conn = self._kept or self._connection()
        try:
            conn.request(spec.method, spec.path, body=spec.body, headers=self._headers)
            response = conn.getresponse()
            response.read()
            return response.status
        except Exception:
            conn.close()
            raise
        finally:
            if self._kept is None:
                conn.close()

    def close(self) -> None:
        if self._kept is not None:
            self._kept.close()


def _load_worker(spec: LoadSpec, barrier: Any, queue: Any) -> None:
    count = errors = 0
    first_error = None
    elapsed = cpu = 0.0
    try:
        ctx = ssl_context(spec.ca, spec.cert, spec.key)
        lean = spec.mode == "keepalive" and spec.client == "lean"
        requests = _LeanRequests(spec, ctx) if lean else _HttpClientRequests(spec, ctx)
        barrier.wait(60)
        cpu0 = process_cpu()
        start = time.perf_counter()
        deadline = start + spec.duration
        while count + errors < spec.max_count and time.perf_counter() < deadline:
            try:
                status = requests.status()
            except Exception as error:  # keep going; the count says how many failed
                errors += 1
                first_error = first_error or repr(error)
                continue
            if status == spec.expect:
                count += 1
            else:
                errors += 1
                first_error = first_error or f"HTTP {status}"
        elapsed = time.perf_counter() - start
        cpu = process_cpu() - cpu0
        requests.close()
    except Exception as error:
        errors += 1
        first_error = first_error or repr(error)
        try:
            barrier.abort()
        except Exception:
            pass
    queue.put((count, errors, elapsed, cpu, first_error))


def run_load(spec: LoadSpec, workers: int, server_pids: list[int], during: Any = None) -> LoadResult:
    """C{workers} client processes, started together after connecting.

    Processes rather than threads, so that the client is not held to one
    core by the GIL; the server still shares the machine with it.
    C{during}, if given, is called (in a thread of this process) while the
    load runs, with a threading.Event that is set when the load ends.
    """
    mp = multiprocessing.get_context("fork")
    barrier = mp.Barrier(workers + 1)
    queue = mp.Queue()
    procs = [mp.Process(target=_load_worker, args=(spec, barrier, queue), daemon=True) for _ in range(workers)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(60)
    except threading.BrokenBarrierError:
        pass
    cpu0 = cpu_seconds(server_pids)
    start = time.perf_counter()
    done = threading.Event()
    side = None
    if during is not None:
        side = threading.Thread(target=during, args=(done,), daemon=True)
        side.start()
    results = [queue.get(timeout=spec.duration + 120) for _ in procs]
    wall = time.perf_counter() - start
    done.set()
    if side is not None:
        side.join(30)
    server_cpu = cpu_seconds(server_pids) - cpu0
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    count = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    seconds = max((r[2] for r in results), default=0.0) or wall
    first_error = next((r[4] for r in results if r[4]), None)
    return LoadResult(count, errors, seconds, sum(r[3] for r in results) / wall, server_cpu / wall, first_error)
