# -*- test-case-name: tests.test_crash -*-
"""Crash safety: SIGKILL the real daemon while uploads are in flight.

Each iteration starts several raw uploads over real mutual TLS, paced in
64 KiB pieces by plain threads, and kills the daemon with SIGKILL at a
pseudo-random point (after some number of body bytes, after a short delay,
or right after the first 201).  The daemon is then started again on the same
data directory, and the vault must hold exactly what was promised: every
upload that got its 201 is listed and downloads byte-exact, nothing partial
is listed, no temp file and no body without an index row (an uncommitted
upload) is left, and C{securevault-admin verify} passes.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.daemon import (
    RawResponse,
    SyncDaemon,
    VaultFixture,
    connect,
    download_sha256,
    list_files,
    login,
    raw_upload_head,
    read_response,
)
from tests.support.testcase import SyncTestCase

LOOPS = int(os.environ.get("SECUREVAULT_CRASH_LOOPS", "8"))
UPLOADS_PER_LOOP = 4
PIECE_BYTES = 64 * 1024
MIN_UPLOAD_BYTES = 2 << 20
MAX_UPLOAD_BYTES = 8 << 20
KILL_MODES = ("bytes", "delay", "first_201")
JOIN_SECONDS = 30.0


@dataclass
class Upload:
    """One raw upload driven by its own thread, piece by piece."""

    filename: str
    data: bytes
    start_delay: float
    pace_seconds: float
    progress: threading.Condition
    sent: int = 0
    response: RawResponse | None = None
    error: BaseException | None = None
    done: bool = False
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    @property
    def acknowledged(self) -> bool:
        return self.response is not None and self.response.status == 201

    def run(self, context: ssl.SSLContext, port: int, session: str) -> None:
        """Thread body: send the head, then the body in 64 KiB pieces with a
        pause between them, then read the answer.  A killed daemon shows up
        as an OSError (reset, broken pipe, EOF), recorded in C{error}."""
        try:
            time.sleep(self.start_delay)
            with connect(context, port) as sock:
                sock.sendall(raw_upload_head(self.filename, len(self.data), session))
                view = memoryview(self.data)
                for start in range(0, len(view), PIECE_BYTES):
                    piece = view[start : start + PIECE_BYTES]
                    sock.sendall(piece)
                    with self.progress:
                        self.sent += len(piece)
                        self.progress.notify_all()
                    if self.pace_seconds:
                        time.sleep(self.pace_seconds)
                response = read_response(sock)
            with self.progress:
                self.response = response
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            with self.progress:
                self.error = error
        finally:
            with self.progress:
                self.done = True
                self.progress.notify_all()


@dataclass
class CrashLedger:
    """What the clients know across all iterations."""

    acknowledged: dict[str, str] = field(default_factory=dict)  # archive id → sha256
    sent: dict[str, int] = field(default_factory=dict)  # sha256 → size, every upload started
    downloaded: set[str] = field(default_factory=set)  # archive ids checked byte-exact
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


class CrashTests(SyncTestCase):
    """SIGKILL during concurrent raw uploads loses nothing that was promised
    and keeps nothing that was not."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        self.context = self.vault.tls_context()

    def start(self) -> SyncDaemon:
        daemon = self.vault.start()
        self.addCleanup(daemon.stop)
        return daemon

    def test_kill_during_uploads(self) -> None:
        """Over SECUREVAULT_CRASH_LOOPS iterations (default 8), SIGKILL the
        daemon while 4 raw uploads of 2–8 MiB are in flight — after a random
        number of body bytes, after a random delay, or right after the first
        201 — and restart it on the same data directory: every upload that
        got its 201 is listed with its sha256 and downloads byte-exact; every
        listed archive is one of the uploads, complete (a 201 lost in flight
        may exist, byte-exact); no C{*.tmp} and no C{.body} without an index
        row remain; C{securevault-admin verify} exits 0."""
        ledger = CrashLedger()
        daemon = self.start()
        for n in range(LOOPS):
            rng = random.Random(n)
            port = daemon.wait_listening()
            session = login(self.context, port)
            mode = KILL_MODES[n % len(KILL_MODES)]
            uploads = self.run_and_kill(daemon, port, session, rng, mode, n, ledger)
            for upload in uploads:
                if upload.acknowledged:
                    assert upload.response is not None
                    stored = upload.response.json()
                    self.assertEqual((stored["sha256"], stored["size"]), (upload.sha256, len(upload.data)))
                    ledger.acknowledged[str(stored["id"])] = upload.sha256
                    ledger.count("acknowledged")
                elif upload.response is not None:
                    self.fail(f"upload answered {upload.response.status}: {upload.response.body!r}")
                elif upload.sent == 0:
                    ledger.count("killed_before_body")
                elif upload.sent < len(upload.data):
                    ledger.count("killed_mid_body")
                else:
                    ledger.count("killed_after_body")
            daemon = self.start()
            self.check_after_restart(daemon, ledger, f"iteration {n} ({mode})")
        ledger.count("kills", LOOPS)
        if os.environ.get("SECUREVAULT_CRASH_VERBOSE"):
            print(f"\ncrash ledger: {sorted(ledger.counts.items())}")

    def run_and_kill(
        self,
        daemon: SyncDaemon,
        port: int,
        session: str,
        rng: random.Random,
        mode: str,
        n: int,
        ledger: CrashLedger,
    ) -> list[Upload]:
        """Start the uploads, SIGKILL the daemon at the chosen point, and
        wait for every client thread to notice."""
        progress = threading.Condition()
        uploads = [
            Upload(
                filename=f"crash-{n}-{i}.bin",
                data=rng.randbytes(rng.randint(MIN_UPLOAD_BYTES, MAX_UPLOAD_BYTES)),
                start_delay=rng.uniform(0.0, 0.2),
                pace_seconds=rng.choice([0.0, 0.0005, 0.001, 0.002]),
                progress=progress,
            )
            for i in range(UPLOADS_PER_LOOP)
        ]
        for upload in uploads:
            ledger.sent[upload.sha256] = len(upload.data)
        threads = [
            threading.Thread(target=upload.run, args=(self.context, port, session), daemon=True) for upload in uploads
        ]
        for thread in threads:
            thread.start()
        total = sum(len(upload.data) for upload in uploads)

        def all_done() -> bool:
            return all(upload.done for upload in uploads)

        with progress:
            if mode == "bytes":
                threshold = rng.randint(1, total - 1)
                progress.wait_for(lambda: sum(u.sent for u in uploads) >= threshold or all_done(), JOIN_SECONDS)
            elif mode == "first_201":
                progress.wait_for(lambda: any(u.acknowledged for u in uploads) or all_done(), JOIN_SECONDS)
        if mode == "delay":
            time.sleep(rng.uniform(0.05, 0.8))
        ledger.count(f"mode_{mode}")
        daemon.kill()
        for thread in threads:
            thread.join(JOIN_SECONDS)
            self.assertFalse(thread.is_alive(), "an upload thread hung after the kill")
        return uploads

    def check_after_restart(self, daemon: SyncDaemon, ledger: CrashLedger, label: str) -> None:
        """The restarted vault holds what was promised and nothing partial."""
        port = daemon.wait_listening()
        self.assert_no_debris(self.vault.data, label)
        session = login(self.context, port)
        listed = {str(f["id"]): f for f in list_files(self.context, port, session)}
        for archive_id, sha256 in ledger.acknowledged.items():
            self.assertIn(archive_id, listed, f"{label}: acknowledged upload {archive_id} is gone")
            self.assertEqual(listed[archive_id]["sha256"], sha256, label)
        for archive_id, entry in listed.items():
            expected = ledger.acknowledged.get(archive_id)
            if expected is None:
                # A 201 lost in flight: allowed, but it must be a whole upload.
                self.assertIn(entry["sha256"], ledger.sent, f"{label}: unknown archive {entry!r}")
                self.assertEqual(entry["size"], ledger.sent[entry["sha256"]], label)
                ledger.acknowledged[archive_id] = expected = str(entry["sha256"])
                ledger.count("committed_without_201")
            if archive_id not in ledger.downloaded:
                self.assertEqual(download_sha256(self.context, port, session, archive_id), expected, label)
                ledger.downloaded.add(archive_id)
                ledger.count("downloaded_byte_exact")
        result = self.vault.verify()
        self.assertEqual(result.returncode, 0, f"{label}: verify failed\n{result.stdout}\n{result.stderr}")

    def assert_no_debris(self, data_dir: Path, label: str) -> None:
        """No temp file in the blob store, and every body has its row in the
        archive index (read from the running daemon's SQLite database)."""
        archives = data_dir / "archives"
        if not archives.exists():
            return
        database = sqlite3.connect((data_dir / "vault.db").resolve().as_uri() + "?mode=ro", uri=True)
        try:
            indexed = set(database.execute("SELECT owner_id, archive_id FROM sv_archives").fetchall())
        finally:
            database.close()
        for path in archives.rglob("*"):
            self.assertFalse(path.name.endswith(".tmp"), f"{label}: temp file left: {path}")
            if path.name.endswith(".body"):
                key = (path.parent.name, path.name[: -len(".body")])
                self.assertIn(key, indexed, f"{label}: body without an index row: {path}")
