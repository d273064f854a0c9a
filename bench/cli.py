"""python -m bench: argument handling, setup and clean-up, the report."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.env import (
    NGINX_HINT,
    MiB,
    Nginx,
    Securevault,
    Workspace,
    find_nginx,
    install_nginx,
    machine_header,
    nginx_has_dav,
)
from bench.figures import GROUPS, IMPLIES, Bench


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=("Benchmark securevault against nginx (mutual TLS, WebDAV PUT) on loopback; see bench/README.md."),
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the large random file (default 1024)")
    parser.add_argument(
        "--text-mib", type=int, default=None, help="size of the compressible text file (default: min(size, 256))"
    )
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 1 run, 3 s load figures")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="FIGURE",
        help=f"run only these figures (repeatable or comma-separated): {', '.join(GROUPS)}",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per request-rate figure (default 5)")
    parser.add_argument("--workers", type=int, default=4, help="client processes for request-rate figures (default 4)")
    parser.add_argument(
        "--server-workers",
        default="1",
        metavar="N[,N...]",
        help="besides the main figures, run small-requests and two-downloads against securevault --workers N "
        "and nginx worker_processes N for each N (e.g. 1,2; default 1: no such phase)",
    )
    parser.add_argument("--workdir", default=None, help="parent directory of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--metadata",
        default=None,
        help="run securevault on this metadata store (e.g. postgresql://...; default: embedded SQLite)",
    )
    parser.add_argument(
        "--blobs",
        default=None,
        help="run securevault on this blob store (e.g. s3://bucket/prefix, endpoint from "
        "AWS_ENDPOINT_URL; default: embedded directory)",
    )
    parser.add_argument(
        "--install-nginx", action="store_true", help="when nginx is absent, apt-get update && apt-get install -y nginx"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.runs = 64, 1
        args.duration = args.duration or 3.0
    args.duration = args.duration or 5.0
    if args.size_mib < 1 or args.runs < 1 or args.workers < 1:
        parser.error("--size-mib, --runs and --workers must be positive")
    try:
        args.server_workers = sorted({int(n) for n in args.server_workers.split(",") if n.strip()})
    except ValueError:
        parser.error("--server-workers takes worker counts such as 1,2")
    if not args.server_workers or min(args.server_workers) < 1:
        parser.error("--server-workers takes positive worker counts such as 1,2")
    if args.text_mib is None:
        args.text_mib = min(args.size_mib, 256)
    groups: list[str] = []
    for item in args.only:
        for name in filter(None, (part.strip() for part in item.split(","))):
            if name not in GROUPS:
                parser.error(f"unknown figure {name!r}; choose from {', '.join(GROUPS)}")
            groups += [name, *IMPLIES.get(name, [])]
    args.groups = [g for g in GROUPS if g in groups] if groups else list(GROUPS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nginx = find_nginx()
    if nginx is None:
        print(NGINX_HINT, file=sys.stderr)
        if not args.install_nginx:
            print("(or run with --install-nginx to have the benchmark install it)", file=sys.stderr)
            return 2
        nginx = install_nginx()
        if nginx is None:
            print("nginx installation failed", file=sys.stderr)
            return 2
    if not nginx_has_dav(nginx):
        print(f"{nginx} lacks http_dav_module (needed for PUT); install the nginx package", file=sys.stderr)
        return 2

    header = machine_header(nginx)
    if args.metadata or args.blobs:
        header.append(
            f"stores:       metadata {args.metadata or 'sqlite (embedded)'}, "
            f"blobs {args.blobs or 'directory (embedded)'}"
        )
    for line in header:
        print(line)
    print(
        f"settings:     --size-mib {args.size_mib} --text-mib {args.text_mib} --runs {args.runs} "
        f"figures {','.join(args.groups)}; load figures {args.duration:g} s x {args.workers} client processes"
        + (f"; --server-workers {','.join(map(str, args.server_workers))}" if args.server_workers != [1] else "")
    )
    print(flush=True)

    root = Path(tempfile.mkdtemp(prefix="svbench-", dir=args.workdir))
    store_args = [
        *(["--metadata", args.metadata] if args.metadata else []),
        *(["--blobs", args.blobs] if args.blobs else []),
    ]
    ws = Workspace(root, args.size_mib * MiB, args.text_mib * MiB, store_args=store_args)
    sv = Securevault(ws)
    ng = Nginx(ws, nginx)
    started = time.monotonic()
    bench = None
    try:
        print(
            f"preparing {root}: PKI, user, {args.size_mib} MiB random, 100 MiB random, {args.text_mib} MiB text",
            flush=True,
        )
        ws.prepare()
        sv.start()
        ng.start()
        print(f"securevault pid {sv.pids[0]} on :{sv.port}; nginx pids {ng.pids} on :{ng.port}", flush=True)
        bench = Bench(ws, sv, ng, duration=args.duration, workers=args.workers, log=lambda s: print(s, flush=True))
        bench.setup()
        bench.run(args.groups, args.runs)
        if args.server_workers != [1]:
            # The main daemon goes first: the workers' daemons share its data.
            if bench.api is not None:
                bench.api.close()
            sv.stop()
            ng.stop()
            bench.run_workers(args.server_workers, args.runs, nginx)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    except Exception as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
    finally:
        if bench is not None and bench.api is not None:
            bench.api.close()
        sv.stop()
        ng.stop()
    if bench is None:
        _cleanup(sv, ng, root, args.keep)
        return 1

    elapsed = time.monotonic() - started
    print()
    for line in header:
        print(line)
    print(
        f"settings:     --size-mib {args.size_mib} --runs {args.runs}; medians of {args.runs} interleaved "
        f"run(s); {elapsed / 60:.1f} min"
    )
    print()
    for line in bench.table():
        print(line)
    print()
    print("MB = 10^6 bytes; MiB = 2^20.  ratio = securevault / nginx (or / the named reference).")
    for note in bench.transfer_notes():
        print(note)
    print("Request-rate figures share the machine's cores with the Python client; when client + server")
    print(f"CPU approaches {os.cpu_count()} cores the client is a bottleneck, and nginx's figure is a floor:")
    for note in bench.cpu_notes():
        print("  " + note)
    for note in bench.notes:
        print(note)
    idle = (bench.median("rss_idle", "securevault"), bench.median("rss_idle", "nginx"))
    if None not in idle:
        print(f"idle RSS after warm-up: securevault {idle[0]:.1f} MiB, nginx (all processes) {idle[1]:.1f} MiB")
    if bench.errors:
        print(f"{len(bench.errors)} measurement(s) failed:")
        for failure in bench.errors:
            print("  " + failure)
    _cleanup(sv, ng, root, args.keep)
    return 1 if bench.errors else 0


def _cleanup(sv: Securevault, ng: Nginx, root: Path, keep: bool) -> None:
    sv.stop()
    ng.stop()
    if keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
