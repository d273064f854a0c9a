# -*- test-case-name: tests.test_tus_assemblers -*-
"""The bound on tus assemblers (L{securevault.staging.MAX_ASSEMBLERS}, 8),
attacked over real mutual TLS against a real twistd.

Each live assembler holds an open journal in the daemon
(C{<data>/archives/<owner>/<upload id>.<archive id>.journal}), and a hashing
thread once PATCHes are large; a client that opens more tus
uploads than the bound and PATCHes them round-robin must not hold more of
either than the bound allows, and every upload must still become its archive
byte-exact (the evicted ones on the slow path).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from tests.support.daemon import RawResponse, VaultFixture, call, download_sha256, list_files, login, open_journals
from tests.support.testcase import SyncTestCase

PATCH_BYTES = 64 * 1024
PATCHES = 3
UPLOADS = 12
TUS = ("Tus-Resumable", "1.0.0")
# The bound under attack (securevault.staging.MAX_ASSEMBLERS), written out:
# raising the constant must make this test fail, not move its yardstick.
BOUND = 8


def daemon_threads(pid: int) -> int:
    """The daemon's thread count (Threads in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for {pid}")


def temp_blobs(data: Path) -> list[Path]:
    """The blob store's temp files (a piece or raw upload in flight; none is
    between this test's requests) and journals (the archives of unfinished
    tus uploads)."""
    return sorted([*(data / "archives").glob("*/.*.tmp"), *(data / "archives").glob("*/*.journal")])


class AssemblerBoundTests(SyncTestCase):
    """One session holding more tus uploads open than there may be assemblers."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        self.context = self.vault.tls_context()
        daemon = self.vault.start()
        self.addCleanup(daemon.stop)
        self.port = daemon.wait_listening()
        self.pid = daemon.process.pid
        self.session = login(self.context, self.port)

    def create(self, length: int, filename: str) -> str:
        encoded = base64.b64encode(filename.encode()).decode()
        headers = [TUS, ("Upload-Length", str(length)), ("Upload-Metadata", f"filename {encoded}")]
        created = call(self.context, self.port, "POST", "/uploads/", headers=headers, session=self.session)
        self.assertEqual(created.status, 201, created.body)
        return created.headers["location"].removeprefix("/uploads/")

    def patch(self, upload_id: str, offset: int, body: bytes) -> RawResponse:
        """PATCH C{body} at C{offset}; 204 with the new offset required."""
        headers = [TUS, ("Content-Type", "application/offset+octet-stream"), ("Upload-Offset", str(offset))]
        answer = call(
            self.context, self.port, "PATCH", f"/uploads/{upload_id}", body=body, headers=headers, session=self.session
        )
        self.assertEqual(answer.status, 204, answer.body)
        self.assertEqual(int(answer.headers["upload-offset"]), offset + len(body))
        return answer

    def upload(self, data: bytes, filename: str) -> str:
        """A whole tus upload, one PATCH after the other; its archive id."""
        upload_id = self.create(len(data), filename)
        answer = None
        for offset in range(0, len(data), PATCH_BYTES):
            answer = self.patch(upload_id, offset, data[offset : offset + PATCH_BYTES])
        assert answer is not None
        return answer.headers["upload-archive-id"]

    def test_round_robin_uploads_hold_at_most_the_bound(self) -> None:
        """12 tus uploads of one session, each 3 PATCHes of 64 KiB sent
        round-robin over real TLS: after every PATCH the daemon holds at most
        8 journals open (the bound) and at most 8 threads more
        than when idle; every upload becomes an archive that downloads
        byte-exact; and once all are finished no temp blob or journal is
        left and the assemblers' threads are gone."""
        # Warm up: one tus upload (assembled, committed) and a raw download,
        # so that the worker pools have started the threads they keep.
        warm = os.urandom(2 * PATCH_BYTES)
        warm_id = self.upload(warm, "warm.bin")
        self.assertEqual(
            download_sha256(self.context, self.port, self.session, warm_id), hashlib.sha256(warm).hexdigest()
        )
        idle_threads = daemon_threads(self.pid)
        self.assertEqual(temp_blobs(self.vault.data), [])

        files = [os.urandom(PATCHES * PATCH_BYTES - index) for index in range(UPLOADS)]
        upload_ids = [self.create(len(data), f"held-{index}.bin") for index, data in enumerate(files)]
        archive_ids: dict[int, str] = {}
        peak_threads, peak_temps = idle_threads, 0
        for offset in range(0, PATCHES * PATCH_BYTES, PATCH_BYTES):
            for index, (data, upload_id) in enumerate(zip(files, upload_ids, strict=True)):
                answer = self.patch(upload_id, offset, data[offset : offset + PATCH_BYTES])
                if "upload-archive-id" in answer.headers:
                    archive_ids[index] = answer.headers["upload-archive-id"]
                peak_threads = max(peak_threads, daemon_threads(self.pid))
                peak_temps = max(peak_temps, open_journals(self.pid))
        self.assertLessEqual(peak_temps, BOUND)
        self.assertLessEqual(peak_threads - idle_threads, BOUND)
        # The bound was reached: the attack did hold assemblers.
        self.assertEqual(peak_temps, BOUND)

        self.assertEqual(sorted(archive_ids), list(range(UPLOADS)))
        listed = {f["id"]: (f["filename"], f["size"]) for f in list_files(self.context, self.port, self.session)}
        for index, data in enumerate(files):
            archive_id = archive_ids[index]
            self.assertEqual(listed[archive_id], (f"held-{index}.bin", len(data)))
            self.assertEqual(
                download_sha256(self.context, self.port, self.session, archive_id), hashlib.sha256(data).hexdigest()
            )
        self.assertEqual(temp_blobs(self.vault.data), [])
        self.assertLessEqual(daemon_threads(self.pid), idle_threads)

    def test_refused_first_patches_leave_no_journal(self) -> None:
        """A client that sends an upload's first PATCH again and again with
        a wrong Upload-Checksum, over real TLS: each is refused (460, the
        contract's JSON error) and spoils the archive it started, whose
        journal holds nothing acknowledged and goes with it; no journal
        piles up, nothing is held open, and the upload still finishes
        byte-exact."""
        data = os.urandom(2 * PATCH_BYTES)
        upload_id = self.create(len(data), "refused.bin")
        wrong = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
        headers = [
            TUS,
            ("Content-Type", "application/offset+octet-stream"),
            ("Upload-Offset", "0"),
            ("Upload-Checksum", f"sha256 {wrong}"),
        ]
        for _ in range(6):
            answer = call(
                self.context, self.port, "PATCH", f"/uploads/{upload_id}",
                body=data[:PATCH_BYTES], headers=headers, session=self.session,
            )  # fmt: skip
            self.assertEqual(answer.status, 460, answer.body)
            self.assertEqual(answer.json()["error"], "checksum_mismatch")
        self.assertEqual(temp_blobs(self.vault.data), [])
        self.assertEqual(open_journals(self.pid), 0)
        for offset in range(0, len(data), PATCH_BYTES):
            answer = self.patch(upload_id, offset, data[offset : offset + PATCH_BYTES])
        archive_id = answer.headers["upload-archive-id"]
        self.assertEqual(
            download_sha256(self.context, self.port, self.session, archive_id), hashlib.sha256(data).hexdigest()
        )
