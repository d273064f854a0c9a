"""Resumable (tus) upload throughput against a raw upload of the same file.

python -m bench.tus --size-mib 256: one daemon, one random file, uploaded raw
(POST /upload-file) and through tus in 8 MiB PATCHes, in the same run; prints
both throughputs, their ratio (target >= 0.8), and the daemon's peak RSS
during each (target: tus <= raw + 16 MiB).  With --rounds N the pair runs N
times, alternating, and the median ratio is the result (a shared machine's
noise moves single runs a lot); the daemon's CPU seconds per upload and the
median time from a PATCH's last byte sent to its 204 show where time goes,
and the client's CPU with them the CPU bound on the ratio: the client
shares the cores, so tus cannot finish faster than the CPU seconds it needs,
daemon's and client's, spread over every core.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import time
from pathlib import Path

from bench.env import (
    PASSWORD,
    USERNAME,
    MiB,
    PeakRss,
    Securevault,
    Workspace,
    cpu_seconds,
    in_workdir,
    machine_header,
    process_cpu,
    write_random,
)
from bench.ranges import Connection

TARGET_RATIO = 0.8
RSS_MARGIN_MIB = 16.0
PATCH_BYTES = 8 * MiB
TUS = {"Tus-Resumable": "1.0.0"}


def tus_upload(api: Connection, path: Path, waits: list[float] | None = None, *, whole: bool = False) -> str:
    """POST then 8 MiB PATCHes; returns the archive id.  Appends to
    C{waits} each PATCH's time from its last byte handed to the socket to
    its answer.

    Each PATCH body is streamed from the file in 1 MiB blocks, as the raw
    upload streams its body, and the next PATCH's first block is read while
    the server commits this one: the server is never left waiting for the
    client to read its file.  With C{whole}, each body is read whole into
    memory before it is sent, as tuspy does (8 MiB read between two
    PATCHes, with nothing in flight)."""
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
    block_bytes = PATCH_BYTES if whole else MiB
    with open(path, "rb") as source:
        block = b""
        while offset < size:
            length = min(PATCH_BYTES, size - offset)
            api.http.putrequest("PATCH", location, skip_accept_encoding=True)
            for header, value in {**TUS, "Authorization": f"Bearer {api.session}", "Upload-Offset": str(offset),
                                  "Content-Type": "application/offset+octet-stream",
                                  "Content-Length": str(length)}.items():  # fmt: skip
                api.http.putheader(header, value)
            api.http.endheaders()
            left = length
            while left:
                block = block or source.read(min(block_bytes, left))
                api.http.send(block)
                left -= len(block)
                block = b""
            if not whole:  # read ahead while the server commits this PATCH
                block = source.read(min(block_bytes, size - offset - length))
            sent = time.perf_counter()
            response = api.http.getresponse()
            response.read()
            if waits is not None:
                waits.append(time.perf_counter() - sent)
            if response.status != 204:
                raise RuntimeError(f"tus PATCH failed: {response.status}")
            offset = int(response.getheader("Upload-Offset") or 0)
            if offset != source.tell() - len(block):
                raise RuntimeError(f"tus PATCH moved the offset to {offset}, not {source.tell() - len(block)}")
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
    rounds: list[tuple[float, float, float, float, float, float, float, float, float]] = []
    try:
        api = Connection(ws, server.port)
        api.upload(ws.big)  # warm up
        for _ in range(args.rounds):
            cpu, client = cpu_seconds(server.pids), process_cpu()
            with PeakRss(server.pids) as raw_rss:
                started = time.perf_counter()
                api.upload(ws.big)
                raw = time.perf_counter() - started
            raw_cpu, raw_client = cpu_seconds(server.pids) - cpu, process_cpu() - client
            waits: list[float] = []
            cpu, client = cpu_seconds(server.pids), process_cpu()
            with PeakRss(server.pids) as tus_rss:
                started = time.perf_counter()
                archive_id = tus_upload(api, ws.big, waits, whole=args.whole_patches)
                tus = time.perf_counter() - started
            tus_cpu, tus_client = cpu_seconds(server.pids) - cpu, process_cpu() - client
            if not archive_id:
                raise RuntimeError("the last PATCH named no archive")
            rounds.append(
                (raw, tus, raw_rss.mib, tus_rss.mib, raw_cpu, tus_cpu, statistics.median(waits), raw_client, tus_client)
            )
    finally:
        server.stop()
    print()
    for line in machine_header(None):
        print(line)
    client = "each body read whole, then sent" if args.whole_patches else "streamed, next block read ahead"
    print(
        f"file: {args.size_mib} MiB random; tus in {PATCH_BYTES // MiB} MiB PATCHes ({client}); {args.rounds} round(s)"
    )
    cores = os.cpu_count() or 1
    bounds = []
    for raw, tus, raw_mib, tus_mib, raw_cpu, tus_cpu, wait, raw_client, tus_client in rounds:
        print(
            f"raw {raw:7.3f} s ({size / MiB / raw:6.1f} MiB/s, daemon CPU {raw_cpu:5.2f} s, RSS {raw_mib:6.1f} MiB)"
            f"  tus {tus:7.3f} s ({size / MiB / tus:6.1f} MiB/s, daemon CPU {tus_cpu:5.2f} s, RSS {tus_mib:6.1f} MiB,"
            f" median PATCH wait {wait * 1000:4.0f} ms)  ratio {raw / tus:.2f}"
        )
        # The client shares the cores: tus cannot finish before its CPU
        # seconds, daemon's and client's, spread over every core.
        floor = (tus_cpu + tus_client) / cores
        bounds.append(raw / floor)
        print(
            f"    client CPU raw {raw_client:5.2f} s, tus {tus_client:5.2f} s; tus needs {tus_cpu + tus_client:5.2f}"
            f" CPU-s, >= {floor:5.3f} s on {cores} cores: ratio <= {raw / floor:.2f}"
        )
    ratio = statistics.median(raw / tus for raw, tus, *_ in rounds)
    raw_peak = max(row[2] for row in rounds)
    tus_peak = max(row[3] for row in rounds)
    print(f"raw upload:  daemon peak RSS {raw_peak:7.1f} MiB")
    print(f"tus upload:  daemon peak RSS {tus_peak:7.1f} MiB (target <= raw + {RSS_MARGIN_MIB:.0f})")
    print(f"tus/raw throughput: {ratio:.2f} (median; target >= {TARGET_RATIO})")
    print(f"CPU bound on that ratio (median): {statistics.median(bounds):.2f}")
    ok = ratio >= TARGET_RATIO and tus_peak <= raw_peak + RSS_MARGIN_MIB
    print("targets met" if ok else "TARGET MISSED")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="the random file (default 256)")
    parser.add_argument("--rounds", type=int, default=1, help="raw/tus pairs; the median ratio counts (default 1)")
    parser.add_argument(
        "--whole-patches",
        action="store_true",
        help="read each PATCH body whole before sending it, as tuspy does (default: stream it, reading ahead)",
    )
    parser.add_argument("--workdir", default=None, help="parent directory of the temporary directory")
    args = parser.parse_args(argv)
    return in_workdir("securevault-tus-", args.workdir, False, lambda root: run(args, root))


if __name__ == "__main__":
    sys.exit(main())
