"""python -m bench.ranges: what a ranged download costs against a whole one.

Starts the daemon as ``python -m bench`` does (L{bench.env.Securevault} in a
temporary L{bench.env.Workspace}), uploads a random file of C{--size-mib}
(stored, not deflated: random data does not compress) and a text file of
C{--text-mib} (deflated), then times on one kept-alive mutual-TLS connection,
C{--runs} times each (medians):

 - the whole raw download of the stored archive;
 - a 1-byte range 100 bytes before its end (API.md: the cost grows with the
   range, not the file; target under 1 % of the whole download);
 - a 1 MiB range near its end;
 - for the deflated archive, the whole download and a 1-byte range at its
   end (inflated from the start: about the whole download's cost).

Every body is checked against the file.  The daemon's peak RSS (VmRSS
sampled every 50 ms, VmHWM when it rose) is reported for the ranged requests
and for the whole download.  Loopback only; a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from bench.clients import ssl_context
from bench.env import (
    PASSWORD,
    USERNAME,
    MiB,
    PeakRss,
    Securevault,
    Workspace,
    in_workdir,
    machine_header,
    write_random,
    write_text,
)

TARGET_RATIO = 0.01


class Connection:
    """One kept-alive HTTPS connection with a session."""

    def __init__(self, ws: Workspace, port: int) -> None:
        context = ssl_context(str(ws.ca), str(ws.client_cert), str(ws.client_key))
        self.http = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=600)
        self.session = ""
        credentials = json.dumps({"username": USERNAME, "password": PASSWORD}).encode()
        status, body = self.request("POST", "/login", body=credentials, headers={"Content-Type": "application/json"})
        if status != 200:
            raise RuntimeError(f"login failed: {status} {body[:200]!r}")
        self.session = json.loads(body)["session_id"]

    def request(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        all_headers = dict(headers or {})
        if self.session:
            all_headers["Authorization"] = f"Bearer {self.session}"
        self.http.request(method, path, body=body, headers=all_headers)
        response = self.http.getresponse()
        return response.status, response.read()

    def upload(self, path: Path) -> str:
        """A raw upload streamed from the file; returns the archive id."""
        size = path.stat().st_size
        self.http.putrequest("POST", "/upload-file")
        for name, value in {
            "Authorization": f"Bearer {self.session}",
            "Content-Type": "application/octet-stream",
            "X-Filename": quote(path.name),
            "Content-Length": str(size),
        }.items():
            self.http.putheader(name, value)
        self.http.endheaders()
        with open(path, "rb") as source:
            while block := source.read(4 * MiB):
                self.http.send(block)
        response = self.http.getresponse()
        body = response.read()
        if response.status != 201:
            raise RuntimeError(f"upload failed: {response.status} {body[:200]!r}")
        return str(json.loads(body)["id"])

    def download(self, archive_id: str, range_value: str | None = None) -> tuple[int, str, int]:
        """Status, SHA-256 and length of a raw download, read in 1 MiB blocks."""
        headers = {"Accept": "application/octet-stream"}
        if range_value is not None:
            headers["Range"] = range_value
        headers["Authorization"] = f"Bearer {self.session}"
        self.http.request("GET", f"/download-file?id={archive_id}", headers=headers)
        response = self.http.getresponse()
        digest = hashlib.sha256()
        length = 0
        while block := response.read(MiB):
            digest.update(block)
            length += len(block)
        return response.status, digest.hexdigest(), length


def file_slice_sha256(path: Path, start: int, end: int) -> str:
    with open(path, "rb") as source:
        source.seek(start)
        return hashlib.sha256(source.read(end - start)).hexdigest()


def timed(runs: int, action: Callable[[], None]) -> float:
    """The median wall time of C{runs} calls, in seconds."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def run(args: argparse.Namespace, root: Path) -> int:
    size = args.size_mib * MiB
    text_size = args.text_mib * MiB
    ws = Workspace(root, size=size, text_size=text_size)
    print(f"setting up in {root}: PKI, user, {args.size_mib} MiB random, {args.text_mib} MiB text", flush=True)
    ws.admin("init", "--certs-dir", str(ws.certs))
    ws.admin("user", "add", USERNAME, "--password-stdin", stdin=PASSWORD + "\n")
    write_random(ws.big, size)
    write_text(ws.text, text_size)
    server = Securevault(ws)
    server.start()
    failures: list[str] = []
    try:
        api = Connection(ws, server.port)
        print("uploading", flush=True)
        stored_id = api.upload(ws.big)
        deflated_id = api.upload(ws.text)
        whole_sha = file_slice_sha256(ws.big, 0, size)
        text_sha = file_slice_sha256(ws.text, 0, text_size)

        def check(what: str, got: tuple[int, str, int], status: int, sha256: str, length: int) -> None:
            if got != (status, sha256, length):
                failures.append(f"{what}: got {got[0]}, {got[2]} bytes, expected {status}, {length} bytes")

        one = size - 100
        mib_start = size - 2 * MiB
        one_sha = file_slice_sha256(ws.big, one, one + 1)
        mib_sha = file_slice_sha256(ws.big, mib_start, mib_start + MiB)
        text_one = file_slice_sha256(ws.text, text_size - 1, text_size)

        with PeakRss(server.pids) as ranged_rss:
            range_one = timed(
                args.runs * 5,
                lambda: check("1-byte range", api.download(stored_id, f"bytes={one}-{one}"), 206, one_sha, 1),
            )
            range_mib = timed(
                args.runs * 5,
                lambda: check(
                    "1 MiB range",
                    api.download(stored_id, f"bytes={mib_start}-{mib_start + MiB - 1}"),
                    206,
                    mib_sha,
                    MiB,
                ),
            )
        print("timing whole downloads", flush=True)
        with PeakRss(server.pids) as whole_rss:
            whole = timed(args.runs, lambda: check("whole", api.download(stored_id), 200, whole_sha, size))
        text_whole = timed(args.runs, lambda: check("text whole", api.download(deflated_id), 200, text_sha, text_size))
        text_range = timed(
            args.runs,
            lambda: check(
                "text 1-byte range at the end",
                api.download(deflated_id, f"bytes={text_size - 1}-"),
                206,
                text_one,
                1,
            ),
        )
    finally:
        server.stop()

    ratio = range_one / whole
    print()
    for line in machine_header(None):
        print(line)
    print(f"file:         {args.size_mib} MiB random (stored), {args.text_mib} MiB text (deflated); medians")
    print(f"whole download, stored:           {whole:8.3f} s  ({size / MiB / whole:7.1f} MiB/s)")
    print(f"1-byte range near the end:        {range_one * 1000:8.2f} ms  ({ratio:.4%} of the whole; target < 1 %)")
    print(f"1 MiB range near the end:         {range_mib * 1000:8.2f} ms")
    print(f"whole download, deflated:         {text_whole:8.3f} s")
    print(f"1-byte range at its end:          {text_range:8.3f} s  (inflated from the start)")
    print(f"daemon peak RSS, ranged requests: {ranged_rss.mib:8.1f} MiB")
    print(f"daemon peak RSS, whole download:  {whole_rss.mib:8.1f} MiB")
    ok = ratio < TARGET_RATIO
    print("target met" if ok else "TARGET MISSED")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ranges", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="the random (stored) file (default 1024)")
    parser.add_argument("--text-mib", type=int, default=64, help="the text (deflated) file (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each whole download (ranges: 5 times as many)")
    parser.add_argument("--workdir", default=None, help="parent directory of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (log, data)")
    args = parser.parse_args(argv)
    if args.size_mib < 4 or args.text_mib < 1 or args.runs < 1:
        parser.error("--size-mib must be at least 4, --text-mib and --runs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_workdir("securevault-ranges-", args.workdir, args.keep, lambda root: run(args, root))


if __name__ == "__main__":
    sys.exit(main())
