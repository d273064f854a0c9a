# -*- test-case-name: tests.test_bench_cpu -*-
"""The benchmark's CPU accounting (bench/env.py, bench/floor.py,
bench/figures.py): which processes a server is, the at-rest floor, and the
rows and bounds computed from the figures.  The figures themselves are not
checked: they are what the benchmark measures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from bench.clients import LeanConnection, LoadSpec, prepared_request, ssl_context
from bench.env import MiB, Workspace, cpu_crypto_flags, durable_write_rate, process_tree
from bench.figures import DISK, FLOOR, NG, SV, Bench
from bench.floor import DOWNLOAD_FLOOR, UPLOAD_FLOOR, floor_sum, measure_random, measure_text
from tests.support.daemon import SyncDaemon, VaultFixture
from tests.support.testcase import SyncTestCase

GiB = 1 << 30


class _Server:
    """Stands in for a started server: the table reads nothing of it."""

    port = 0
    pids: list[int] = []


def _bench(root: Path) -> Bench:
    ws = Workspace(root, 1 << 20, 1 << 20)
    server: Any = _Server()
    bench = Bench(ws, server, server, duration=1.0, workers=1, log=lambda line: None)
    bench.cores = 2
    return bench


class ProcessTreeTests(SyncTestCase):
    def test_children_and_grandchildren(self) -> None:
        """A server's processes are its own pid first, then every
        descendant: a worker a worker forks is counted too."""
        child = subprocess.Popen(
            ["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        self.addCleanup(os.kill, grandchild, 9)
        tree = process_tree(os.getpid())
        self.assertEqual(tree[0], os.getpid())
        self.assertIn(child.pid, tree)
        self.assertIn(grandchild, tree)


class FloorTests(SyncTestCase):
    def test_components_over_a_file(self) -> None:
        """The floor times encryption, decryption of that ciphertext (checked
        to give back every byte), SHA-256 and CRC-32 over the whole file, and
        deflate, encryption of the deflated stream and inflate over text."""
        path = self.make_dir() / "data"
        path.write_bytes(os.urandom(3 << 20) + b"tail")
        spent, total = measure_random(path)
        self.assertEqual(total, (3 << 20) + 4)
        self.assertEqual(sorted(spent), ["crc32", "decrypt", "encrypt", "sha256"])
        self.assertTrue(all(seconds > 0 for seconds in spent.values()), spent)
        text = self.make_dir() / "text"
        text.write_bytes(b"GET /api/v1/items status=200\n" * 100_000)
        spent, total = measure_text(text)
        self.assertEqual(total, 29 * 100_000)
        self.assertEqual(sorted(spent), ["deflate", "encrypt_deflated", "inflate"])

    def test_sums(self) -> None:
        """Upload floor = encrypt + SHA-256 + CRC-32; download floor =
        decrypt alone (a stored file's download only decrypts: FORMAT.md 6.1);
        a missing component gives no floor rather than a low one."""
        per_gib = {"encrypt": 0.4, "decrypt": 0.5, "sha256": 0.75, "crc32": 0.25}
        self.assertAlmostEqual(floor_sum(per_gib, UPLOAD_FLOOR) or 0, 1.4)
        self.assertAlmostEqual(floor_sum(per_gib, DOWNLOAD_FLOOR) or 0, 0.5)
        self.assertIsNone(floor_sum({"encrypt": 0.4}, UPLOAD_FLOOR))


class TableTests(SyncTestCase):
    def test_cpu_target_rows(self) -> None:
        """The CPU rows hold securevault to 1.25 x (nginx + floor): 4.0 <=
        1.25 x (2.0 + 1.4) = 4.25 passes for upload, 3.0 > 1.25 x (1.0 +
        0.5) = 1.88 fails for download."""
        bench = _bench(self.make_dir())
        for name, value in {"encrypt": 0.4, "decrypt": 0.5, "sha256": 0.75, "crc32": 0.25}.items():
            bench.values["floor_" + name][FLOOR].append(value)
        bench.values["upload_cpu"][SV].append(4.0)
        bench.values["upload_cpu"][NG].append(2.0)
        bench.values["download_cpu"][SV].append(3.0)
        bench.values["download_cpu"][NG].append(1.0)
        rows = {line.split("|")[1].strip(): line for line in bench.table()}
        self.assertRegex(rows["server CPU-s/GiB, upload raw"], r"\|\s+4\.00 \|\s+2\.00 \|.*sv <= 4\.25 \|\s+yes \|$")
        self.assertRegex(rows["server CPU-s/GiB, download raw"], r"\|\s+3\.00 \|\s+1\.00 \|.*sv <= 1\.88 \|\s+NO \|$")
        self.assertRegex(rows["at-rest floor, upload: encrypt+SHA-256+CRC-32 [in-process]"], r"\|\s+1\.40 \|")

    def test_workers_rows(self) -> None:
        """With --server-workers 1,2 the table divides each figure at 2
        workers by the one at 1, for both servers: small requests through
        the lean client against 1.6, through http.client without a target
        (that client, not the server, sets the rate), two downloads against
        1.3."""
        bench = _bench(self.make_dir())
        bench.server_workers = [1, 2]
        for key, one, two in (
            ("small", 1000.0, 1200.0),
            ("small_lean", 1000.0, 1700.0),
            ("two_downloads", 300.0, 330.0),
        ):
            bench.values[f"{key}@w1"][SV].append(one)
            bench.values[f"{key}@w2"][SV].append(two)
            bench.values[f"{key}@w1"][NG].append(one)
            bench.values[f"{key}@w2"][NG].append(2 * one)
        rows = {line.split("|")[1].strip(): line for line in bench.table()}
        self.assertRegex(
            rows["small JSON req/s, lean client, workers 2 / workers 1"],
            r"\|\s+1\.70 \|\s+2\.00 \|.*>= 1\.60 \|\s+yes \|$",
        )
        self.assertRegex(
            rows["small JSON req/s, http.client, workers 2 / workers 1"],
            r"\|\s+1\.20 \|\s+2\.00 \|\s+- \|\s+- \|\s+- \|$",
        )
        self.assertRegex(
            rows["2 raw downloads total MB/s, workers 2 / workers 1"], r"\|\s+1\.10 \|\s+2\.00 \|.*>= 1\.30 \|\s+NO \|$"
        )

    def test_download_bound(self) -> None:
        """The bound is cores / (server + client CPU-s per GB): 2 / (1 + 1
        CPU-s per GiB) = 1.0737 GB/s; the ratio bound divides it by nginx's
        measured speed."""
        bench = _bench(self.make_dir())
        bench.values["download_cpu"][SV].append(1.0)
        bench.values["download_client_cpu"][SV].append(1.0)
        bench.values["download"][NG].append(2147.5)
        notes = "\n".join(bench.transfer_notes())
        self.assertIn("securevault <= 1074 MB/s", notes)
        self.assertIn("download ratio bound = securevault bound / nginx's measured 2148 MB/s = 0.50", notes)

    def test_workers_small_requests_bound(self) -> None:
        """One worker: 1000 req/s on 1.0 server and 0.25 client cores, so
        1000 + 250 us per request; two cores serve at most 1600 req/s =
        1.60 x.  Two workers at 1500 req/s on 1.8 + 0.2 cores: 1200 + 133
        us, at most 1500 req/s = 1.50 x."""
        bench = _bench(self.make_dir())
        bench.server_workers = [1, 2]
        bench.cores = 2
        for at, rate, server, client in (("@w1", 1000.0, 1.0, 0.25), ("@w2", 1500.0, 1.8, 0.2)):
            bench.values["small_lean" + at][SV].append(rate)
            bench.values["small_lean_server_cpu" + at][SV].append(server)
            bench.values["small_lean_client_cpu" + at][SV].append(client)
        notes = "\n".join(bench.cpu_notes())
        self.assertIn("1 worker server 1000 us + client 250 us; 2 workers server 1200 us + client 133 us", notes)
        self.assertIn("2 cores serve at most 1600 req/s = 1.60 x the 1-worker rate; at 2 workers' own, 1.50 x", notes)

    def test_upload_bound_by_the_disk(self) -> None:
        """The upload's ratio bound takes the smaller of the CPU bound and
        the median durable write: 2 / (2 + 1 CPU-s per GiB) = 716 MB/s by
        CPU, 250 by the disk, so 250 / nginx's 500 = 0.50."""
        bench = _bench(self.make_dir())
        bench.values["upload_cpu"][SV].append(2.0)
        bench.values["upload_client_cpu"][SV].append(1.0)
        bench.values["upload"][NG].append(500.0)
        bench.values["durable_write"][DISK].extend([240.0, 250.0, 900.0])
        notes = "\n".join(bench.transfer_notes())
        self.assertIn("securevault <= 716 MB/s", notes)
        self.assertIn("MB/s, each run: 240, 250, 900", notes)
        self.assertIn("median durable write 250) / nginx's measured 500 MB/s = 0.50", notes)

    def test_durable_write_goes_through_the_blob_store_and_leaves_nothing(self) -> None:
        directory = self.make_dir()
        rate = durable_write_rate(directory, 4 * MiB)
        self.assertGreater(rate, 0)
        self.assertEqual(list(directory.iterdir()), [])

    def test_cpu_crypto_flags(self) -> None:
        """The header names the crypto instructions the CPU has and lacks."""
        cpuinfo = "processor\t: 0\nflags\t\t: fpu aes sse2 pclmulqdq avx2\nbugs\t\t: none\n"
        self.assertEqual(cpu_crypto_flags(cpuinfo), "aes pclmulqdq avx2; no vaes vpclmulqdq sha_ni avx512f")
        self.assertEqual(cpu_crypto_flags("processor\t: 0\n"), "flags unknown")


class LeanClientTests(SyncTestCase):
    def test_exchanges_with_a_real_daemon(self) -> None:
        """The load generator's lean client sends a prepared request over
        mutual TLS and reads each whole answer off a kept-alive
        connection: statuses as answered, the connection kept, and a
        C{Connection: close} answer reported as the end of it."""
        vault = VaultFixture(self.make_dir())
        vault.create()
        daemon = SyncDaemon(vault.argv(), vault.base)
        self.addCleanup(daemon.stop)
        port = daemon.wait_listening()
        spec = LoadSpec(
            ca=str(vault.certs / "ca.crt"),
            cert=str(vault.certs / "client.crt"),
            key=str(vault.certs / "client.key"),
            port=port,
            mode="keepalive",
            method="GET",
            path="/get-files",
            headers={"Authorization": "Bearer not-a-session"},
            body=None,
            duration=1.0,
            max_count=10,
        )
        context = ssl_context(spec.ca, spec.cert, spec.key)
        connection = LeanConnection(port, context)
        self.addCleanup(connection.close)
        self.assertEqual(connection.exchange(prepared_request(spec)), (401, True))
        health = prepared_request(LoadSpec(**{**spec.__dict__, "path": "/health", "headers": {}}))
        self.assertEqual(connection.exchange(health), (200, True))
        closing = health.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        self.assertEqual(connection.exchange(closing), (200, False))
