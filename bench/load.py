"""python -m bench.load: many concurrent clients against one securevault daemon.

Starts the daemon exactly as ``python -m bench`` does (L{bench.env.Securevault}
in a temporary L{bench.env.Workspace} with a development PKI), creates
C{--users} users, then runs C{--clients} threads, each with its own kept-alive
mutual-TLS C{http.client} connection and session, looping over a mix of

 - raw upload of 1-64 KiB of random bytes (201, size and SHA-256 checked),
 - list (200; every archive this client holds is listed, none it deleted),
 - raw download of one of its archives (200, bytes compared),
 - delete of one of its archives (204), occasionally and whenever it holds
   more than C{--keep-files},

until C{--duration} seconds have passed or C{--max-requests} requests were
sent.  The server's VmRSS is sampled every 100 ms.  It prints requests,
errors and p50/p99 latency per kind and RSS at start / peak / end, and exits
1 on any error (non-2xx, wrong answer, byte mismatch, connection failure).

Loopback only.  A benchmark, not a test: nothing in CI runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import random
import ssl
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from bench.clients import ssl_context
from bench.env import PASSWORD, Securevault, Workspace, _read_status, in_workdir

KINDS = ("upload", "list", "download", "delete")
KiB = 1024


@dataclass
class Stats:
    """Counters shared by all client threads (guarded by C{lock})."""

    max_requests: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples: list[str] = field(default_factory=list)
    mismatches: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def take(self) -> bool:
        """Reserve one request; False once C{max_requests} were sent."""
        with self.lock:
            if self.requests >= self.max_requests:
                return False
            self.requests += 1
            return True

    def ok(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)

    def error(self, kind: str, message: str, mismatch: bool = False) -> None:
        with self.lock:
            self.errors[kind] += 1
            self.mismatches += mismatch
            if len(self.samples) < 10:
                self.samples.append(f"{kind}: {message}")


class RequestFailed(Exception):
    """An unexpected answer; C{mismatch} when bytes or metadata differ."""

    def __init__(self, message: str, mismatch: bool = False) -> None:
        super().__init__(message)
        self.mismatch = mismatch


@dataclass
class Client:
    """One simulated user: a kept-alive connection, a session, its archives."""

    port: int
    context: ssl.SSLContext
    username: str
    rng: random.Random
    keep_files: int
    held: dict[str, bytes] = field(default_factory=dict)  # archive id -> content
    deleted: list[str] = field(default_factory=list)
    session: str = ""
    conn: http.client.HTTPSConnection = field(init=False)

    def __post_init__(self) -> None:
        self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=60)

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        all_headers = dict(headers or {})
        if self.session:
            all_headers["Authorization"] = f"Bearer {self.session}"
        self.conn.request(method, path, body=body, headers=all_headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def login(self) -> None:
        status, body = self.call(
            "POST",
            "/login",
            json.dumps({"username": self.username, "password": PASSWORD}).encode(),
            {"Content-Type": "application/json"},
        )
        if status != 200:
            raise RuntimeError(f"login of {self.username} failed: {status} {body[:200]!r}")
        self.session = json.loads(body)["session_id"]

    def choose(self) -> str:
        if not self.held:
            return "upload"
        if len(self.held) > self.keep_files:
            return "delete"
        return self.rng.choices(KINDS, weights=(35, 25, 35, 5))[0]

    def op_upload(self, stats: Stats) -> None:
        content = self.rng.randbytes(self.rng.randint(1 * KiB, 64 * KiB))
        name = f"load-{self.rng.getrandbits(32):08x}.bin"
        status, body = self.call(
            "POST",
            "/upload-file",
            content,
            {"Content-Type": "application/octet-stream", "X-Filename": quote(name, safe="")},
        )
        if status != 201:
            raise RequestFailed(f"{status} {body[:200]!r}")
        answer = json.loads(body)
        if (answer["filename"], answer["size"], answer["sha256"]) != (
            name,
            len(content),
            hashlib.sha256(content).hexdigest(),
        ):
            raise RequestFailed(f"upload answer does not describe the bytes sent: {answer}", mismatch=True)
        self.held[answer["id"]] = content
        with stats.lock:
            stats.bytes_up += len(content)

    def op_list(self, stats: Stats) -> None:
        status, body = self.call("GET", "/get-files")
        if status != 200:
            raise RequestFailed(f"{status} {body[:200]!r}")
        listed = {entry["id"] for entry in json.loads(body)["files"]}
        missing = set(self.held) - listed
        resurrected = listed.intersection(self.deleted)
        if missing or resurrected:
            raise RequestFailed(
                f"listing lacks {sorted(missing)[:3]} or shows deleted {sorted(resurrected)[:3]}", mismatch=True
            )

    def op_download(self, stats: Stats) -> None:
        archive_id = self.rng.choice(list(self.held))
        status, body = self.call(
            "GET", f"/download-file?id={archive_id}", headers={"Accept": "application/octet-stream"}
        )
        if status != 200:
            raise RequestFailed(f"{status} {body[:200]!r}")
        if body != self.held[archive_id]:
            raise RequestFailed(
                f"archive {archive_id}: {len(body)} bytes differ from the {len(self.held[archive_id])} uploaded",
                mismatch=True,
            )
        with stats.lock:
            stats.bytes_down += len(body)

    def op_delete(self, stats: Stats) -> None:
        archive_id = next(iter(self.held))  # the oldest
        status, body = self.call(
            "POST", "/delete-file", json.dumps({"id": archive_id}).encode(), {"Content-Type": "application/json"}
        )
        if status != 204:
            raise RequestFailed(f"{status} {body[:200]!r}")
        del self.held[archive_id]
        self.deleted.append(archive_id)

    def run(self, stats: Stats, start: threading.Barrier, deadline: list[float]) -> None:
        """Loop until the deadline or the request cap; every failure counts."""
        start.wait()
        while time.monotonic() < deadline[0] and stats.take():
            kind = self.choose()
            began = time.perf_counter()
            try:
                getattr(self, f"op_{kind}")(stats)
            except RequestFailed as failure:
                stats.error(kind, str(failure), failure.mismatch)
            except Exception as failure:  # connection errors, bad JSON, ...
                stats.error(kind, f"{failure.__class__.__name__}: {failure}")
                self.conn.close()  # http.client reconnects on the next request
            else:
                stats.ok(kind, time.perf_counter() - began)
        self.conn.close()


class RssSampler:
    """VmRSS of one process every C{interval} seconds, in KiB."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        value = _read_status(self.pid).get("VmRSS", 0)
        self.samples.append(value)
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def report(
    stats: Stats, elapsed: float, clients: int, rss_start: int, rss_peak: int, rss_end: int, timeline: Sequence[int]
) -> list[str]:
    lines = [f"{'kind':<10}{'requests':>10}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}"]
    for kind in KINDS:
        done = stats.latencies.get(kind, [])
        lines.append(
            f"{kind:<10}{len(done) + stats.errors.get(kind, 0):>10}{stats.errors.get(kind, 0):>8}"
            f"{percentile(done, 0.50) * 1000:>10.1f}{percentile(done, 0.99) * 1000:>10.1f}"
        )
    total_errors = sum(stats.errors.values())
    lines += [
        f"{'total':<10}{stats.requests:>10}{total_errors:>8}",
        f"clients {clients}, {elapsed:.1f} s, {stats.requests / elapsed:.0f} req/s, "
        f"{stats.bytes_up / 2**20:.1f} MiB up, {stats.bytes_down / 2**20:.1f} MiB down (all verified)",
        f"errors {total_errors}, byte/metadata mismatches {stats.mismatches}",
        f"server RSS MiB: start {rss_start / 1024:.1f}, peak {rss_peak / 1024:.1f}, end {rss_end / 1024:.1f}",
        "server RSS MiB by tenth of the run: " + " ".join(f"{kib / 1024:.0f}" for kib in timeline),
    ]
    lines += [f"  e.g. {sample}" for sample in stats.samples]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=(
            "Concurrent clients doing mixed small uploads, lists, downloads and deletes against one "
            "securevault daemon on loopback; exits 1 on any error. See bench/README.md."
        ),
    )
    parser.add_argument("--clients", type=int, default=200, help="concurrent client threads (default 200)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument("--users", type=int, default=1, help="users, clients assigned round-robin (default 1)")
    parser.add_argument(
        "--keep-files", type=int, default=5, help="a client deletes its oldest archive when it holds more (default 5)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix and sizes")
    parser.add_argument("--workdir", default=None, help="parent directory of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (log, data)")
    args = parser.parse_args(argv)
    if min(args.clients, args.users, args.max_requests, args.keep_files) < 1 or args.duration <= 0:
        parser.error("--clients, --users, --max-requests, --keep-files and --duration must be positive")
    return args


def run(args: argparse.Namespace, root: Path) -> int:
    ws = Workspace(root, size=0, text_size=0)
    print(f"setting up in {root}: PKI, {args.users} user(s)", flush=True)
    ws.admin("init", "--certs-dir", str(ws.certs))
    users = [f"load{i}" for i in range(args.users)]
    for user in users:
        ws.admin("user", "add", user, "--password-stdin", stdin=PASSWORD + "\n")
    server = Securevault(ws)
    server.start()
    try:
        context = ssl_context(str(ws.ca), str(ws.client_cert), str(ws.client_key))
        rng = random.Random(args.seed)
        clients = [
            Client(server.port, context, users[i % len(users)], random.Random(rng.getrandbits(64)), args.keep_files)
            for i in range(args.clients)
        ]
        print(f"daemon pid {server.pids[0]} on 127.0.0.1:{server.port}; logging in {len(clients)} clients", flush=True)
        for client in clients:
            client.login()
        sampler = RssSampler(server.pids[0])
        rss_start = sampler.sample()
        stats = Stats(args.max_requests)
        barrier = threading.Barrier(len(clients) + 1)
        deadline = [float("inf")]
        threads = [threading.Thread(target=c.run, args=(stats, barrier, deadline), daemon=True) for c in clients]
        for thread in threads:
            thread.start()
        sampler.start()
        deadline[0] = time.monotonic() + args.duration
        began = time.monotonic()
        barrier.wait()
        print(f"running {args.clients} clients for {args.duration:.0f} s", flush=True)
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        sampler.stop()
        rss_end = sampler.sample()
        samples = sampler.samples
        timeline = [samples[min(len(samples) - 1, i * len(samples) // 10)] for i in range(11)]
        for line in report(stats, elapsed, args.clients, rss_start, max(samples), rss_end, timeline):
            print(line)
        failed = sum(stats.errors.values()) > 0 or stats.mismatches > 0 or stats.requests == 0
        print("FAIL" if failed else "OK: no errors, every byte round-tripped")
        return 1 if failed else 0
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_workdir("securevault-load-", args.workdir, args.keep, lambda root: run(args, root))


if __name__ == "__main__":
    sys.exit(main())
