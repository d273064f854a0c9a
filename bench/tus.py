"""Resumable (tus) upload throughput against a raw upload of the same file.

python -m bench.tus --size-mib 256: one daemon, one random file, uploaded raw
(POST /upload-file) and through tus in 8 MiB PATCHes, in the same run; prints
both throughputs, their ratio (target >= 0.8), and the daemon's peak RSS
during each (target: tus <= raw + 16 MiB).
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

from bench.env import PASSWORD, USERNAME, MiB, PeakRss, Securevault, Workspace, in_workdir, machine_header, write_random
from bench.ranges import Connection

TARGET_RATIO = 0.8
RSS_MARGIN_MIB = 16.0
PATCH_BYTES = 8 * MiB
TUS = {"Tus-Resumable": "1.0.0"}


def tus_upload(api: Connection, path: Path) -> str:
    """POST then 8 MiB PATCHes; returns the archive id."""
    size = path.stat().st_size
    name = base64.b64encode(path.name.encode()).decode()
    api.http.request(
        "POST",
        "/uploads/",
        headers={**TUS, "Authorization": f"Bearer {api.session}", "Upload-Length": str(size),
                 "Upload-Metadata": f"filename {name}"},
    )  # fmt: skip
    response = api.http.getresponse()
    response.read()
    if response.status != 201:
        raise RuntimeError(f"tus POST failed: {response.status}")
    location = response.getheader("Location") or ""
    offset = 0
    archive_id = ""
    with open(path, "rb") as source:
        while offset < size:
            body = source.read(PATCH_BYTES)
            api.http.request(
                "PATCH",
                location,
                body=body,
                headers={**TUS, "Authorization": f"Bearer {api.session}", "Upload-Offset": str(offset),
                         "Content-Type": "application/offset+octet-stream"},
            )  # fmt: skip
            response = api.http.getresponse()
            response.read()
            if response.status != 204:
                raise RuntimeError(f"tus PATCH failed: {response.status}")
            offset = int(response.getheader("Upload-Offset") or 0)
            archive_id = response.getheader("Upload-Archive-Id") or archive_id
    return archive_id


def run(args: argparse.Namespace, root: Path) -> int:
    size = args.size_mib * MiB
    ws = Workspace(root, size=size, text_size=MiB)
    print(f"setting up in {root}: PKI, user, {args.size_mib} MiB random", flush=True)
    ws.admin("init", "--certs-dir", str(ws.certs))
    ws.admin("user", "add", USERNAME, "--password-stdin", stdin=PASSWORD + "\n")
    write_random(ws.big, size)
    server = Securevault(ws)
    server.start()
    try:
        api = Connection(ws, server.port)
        api.upload(ws.big)  # warm up
        with PeakRss(server.pids) as raw_rss:
            started = time.perf_counter()
            api.upload(ws.big)
            raw = time.perf_counter() - started
        with PeakRss(server.pids) as tus_rss:
            started = time.perf_counter()
            archive_id = tus_upload(api, ws.big)
            tus = time.perf_counter() - started
        if not archive_id:
            raise RuntimeError("the last PATCH named no archive")
    finally:
        server.stop()
    ratio = raw / tus
    print()
    for line in machine_header(None):
        print(line)
    print(f"file: {args.size_mib} MiB random; tus in {PATCH_BYTES // MiB} MiB PATCHes")
    print(f"raw upload:  {raw:8.3f} s  ({size / MiB / raw:7.1f} MiB/s), daemon peak RSS {raw_rss.mib:7.1f} MiB")
    print(f"tus upload:  {tus:8.3f} s  ({size / MiB / tus:7.1f} MiB/s), daemon peak RSS {tus_rss.mib:7.1f} MiB")
    print(f"tus/raw throughput: {ratio:.2f} (target >= {TARGET_RATIO})")
    ok = ratio >= TARGET_RATIO and tus_rss.mib <= raw_rss.mib + RSS_MARGIN_MIB
    print("targets met" if ok else "TARGET MISSED")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="the random file (default 256)")
    parser.add_argument("--workdir", default=None, help="parent directory of the temporary directory")
    args = parser.parse_args(argv)
    return in_workdir("securevault-tus-", args.workdir, False, lambda root: run(args, root))


if __name__ == "__main__":
    sys.exit(main())
