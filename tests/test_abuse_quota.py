# -*- test-case-name: tests.test_abuse_quota -*-
"""The quota attack, over real mutual TLS against a real daemon: parallel raw
uploads that each fit the quota alone must not together store more than it
(API.md, POST /upload-file: "The quota holds exactly under concurrency")."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tests.support.daemon import (
    RawResponse,
    VaultFixture,
    connect,
    list_files,
    login,
    raw_upload_head,
    read_response,
    run_admin,
)
from tests.support.testcase import SyncTestCase

QUOTA_BYTES = 1_000_000
UPLOAD_BYTES = 900_000
UPLOADS = 12
# Each upload holds back this much of its body until every upload has sent
# the rest: all writers are open (and have seen an empty quota) before any
# of them can commit.
HELD_BACK_BYTES = 1000
JOIN_SECONDS = 60.0


class ParallelQuotaTests(SyncTestCase):
    """twistd --quota 1000000, twelve 900 kB uploads at once."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        daemon = self.vault.start("--quota", str(QUOTA_BYTES))
        self.addCleanup(daemon.stop)
        self.port = daemon.wait_listening()
        self.context = self.vault.tls_context()
        self.session = login(self.context, self.port)

    def bodies(self) -> list[Path]:
        """Every archive body in the data directory, temp files included."""
        archives = self.vault.data / "archives"
        return sorted(path for path in archives.rglob("*") if path.is_file()) if archives.exists() else []

    def parallel_uploads(self) -> list[RawResponse | str]:
        """Twelve raw uploads of 900 kB of random data, each on its own
        connection, released together for their last bytes."""
        barrier = threading.Barrier(UPLOADS)
        answers: list[RawResponse | str] = []
        lock = threading.Lock()

        def upload(n: int) -> None:
            data = os.urandom(UPLOAD_BYTES)
            try:
                with connect(self.context, self.port) as sock:
                    sock.sendall(raw_upload_head(f"part-{n}.bin", len(data), self.session))
                    sock.sendall(data[:-HELD_BACK_BYTES])
                    barrier.wait(JOIN_SECONDS)
                    sock.sendall(data[-HELD_BACK_BYTES:])
                    answer: RawResponse | str = read_response(sock)
            except Exception as error:
                answer = repr(error)
            with lock:
                answers.append(answer)

        threads = [threading.Thread(target=upload, args=(n,)) for n in range(UPLOADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN_SECONDS)
            self.assertFalse(thread.is_alive(), "an upload hung")
        return answers

    def test_parallel_uploads_never_exceed_the_quota(self) -> None:
        """Of twelve parallel 900 kB raw uploads under --quota 1000000
        exactly one is stored (201) and eleven are 507 insufficient_storage;
        the bodies on disk total at most the quota, each one is listed, and
        securevault-admin verify finds every archive sound and no orphan."""
        answers = self.parallel_uploads()
        failures = [answer for answer in answers if isinstance(answer, str)]
        self.assertEqual(failures, [])
        responses = [answer for answer in answers if isinstance(answer, RawResponse)]
        statuses = sorted(response.status for response in responses)
        self.assertEqual(statuses, [201] + [507] * (UPLOADS - 1), [r.body[:200] for r in responses])
        for response in responses:
            if response.status == 507:
                self.assertEqual(response.json()["error"], "insufficient_storage")
        stored = [response.json() for response in responses if response.status == 201]

        listed = list_files(self.context, self.port, self.session)
        self.assertEqual([entry["id"] for entry in listed], [entry["id"] for entry in stored])
        bodies = self.bodies()
        self.assertEqual([path.name for path in bodies], [f"{stored[0]['id']}.body"])
        self.assertLessEqual(sum(path.stat().st_size for path in bodies), QUOTA_BYTES)

        result = run_admin("--data-dir", str(self.vault.data), "verify", "--grace", "0", cwd=self.vault.base)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("1 archives verified, 0 failed", result.stdout)
        self.assertNotIn("ORPHAN", result.stdout)
