# -*- test-case-name: tests.test_diskfull -*-
"""Full disk and quota: a write that does not fit answers 507 and leaves
nothing behind, neither a body in the blob store nor a row in the archive
index.

Where the test runs as root, the disk really fills: a 2 MiB tmpfs is mounted
for the test and removed in cleanup.  The data directory, SQLite metadata
database (C{vault.db} and its write-ahead log) included, lives on it and is
created before the test fills it, as a vault's would be.  A full disk under
the database ("database or disk is full") is L{MetadataFull}, which the
storage reports as L{StorageFull}, like a blob that does not fit.  Without
root those tests are skipped and the error is injected instead, with
C{RLIMIT_FSIZE} in a child process (every write past the limit fails with
EFBIG).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest

from securevault.core.archive import StorageFull
from securevault.core.keys import generate_keyring
from securevault.storage import SecureFileStorage
from securevault.stores.metadata import MetadataFull, SqliteMetadataStore
from tests.support.app import Response, VaultClient, add_user, blob_directory, make_app, owner_files, stored_names
from tests.support.daemon import (
    REPOSITORY,
    SyncDaemon,
    VaultFixture,
    call,
    child_environment,
    connect,
    list_files,
    login,
    raw_upload_head,
    send_until_answered,
)
from tests.support.testcase import SyncTestCase

PASSWORD = "disk full password"
OCTETS = (b"Content-Type", b"application/octet-stream")
JSON_TYPE = (b"Content-Type", b"application/json")
PAGE_BYTES = 4096
MiB = 1 << 20


def mount_tmpfs(test: SyncTestCase, size: str, directory: Path | None = None) -> Path:
    """A fresh tmpfs of C{size} mounted on C{directory} (default: a new
    temp directory), unmounted in cleanup; skips the test when that is not
    possible here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise SkipTest("mounting a tmpfs needs root; the RLIMIT_FSIZE tests cover this case")
    if directory is None:
        directory = test.make_dir()  # its removal is registered first, so runs after the umount
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SkipTest(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    test.addCleanup(subprocess.run, ["umount", "-l", str(directory)], check=False)
    return directory


def fill(directory: Path, leave_pages: int) -> Path:
    """Fill the filesystem of C{directory}, then free C{leave_pages} pages."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    block = b"\0" * (64 * 1024)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError:
                try:
                    os.write(fd, b"\0" * PAGE_BYTES)  # the last partial block, page by page
                    continue
                except OSError:
                    break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave_pages * PAGE_BYTES))
    finally:
        os.close(fd)
    return filler


class _OnDirectory:
    """Lets L{make_app} put its data directory where the test says."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def make_dir(self) -> Path:
        path = self._directory / "vault-data"
        path.mkdir()
        return path


class StorageFullTests(SyncTestCase):
    """SecureFileStorage on a real, small filesystem."""

    def setUp(self) -> None:
        self.mount = mount_tmpfs(self, "2m")
        # The metadata database (vault.db) is created here, on the same small
        # filesystem, before any test fills it.
        self.storage = SecureFileStorage(self.mount, generate_keyring())
        self.addCleanup(self.storage.metadata.close)

    def owner_entries(self, owner: str = "owner") -> list[str]:
        """Files in the owner's blob directory and their index rows."""
        return stored_names(self.storage, owner)

    def test_store_over_capacity(self) -> None:
        """Storing 3 MiB on a 2 MiB filesystem raises StorageFull, leaves no
        file in the owner's directory, and a later small store works."""
        with self.assertRaises(StorageFull):
            self.storage.store("owner", "big.bin", os.urandom(3 * MiB))
        self.assertEqual(self.owner_entries(), [])
        data = os.urandom(10_000)
        info = self.storage.store("owner", "small.bin", data)
        self.assertEqual(self.storage.read_all("owner", info.id)[1], data)
        self.assertEqual([i.id for i in self.storage.list("owner")], [info.id])

    def test_streamed_writer_over_capacity(self) -> None:
        """A streamed writer fed past the free space raises StorageFull from
        C{write} and has removed its temp file by then."""
        writer = self.storage.writer("owner", "stream.bin")
        with self.assertRaises(StorageFull):
            for _ in range(48):
                writer.write(os.urandom(64 * 1024))
        self.assertEqual(self.owner_entries(), [])
        writer.abort()  # a second abort is harmless
        self.assertEqual(self.owner_entries(), [])

    def test_every_free_space_boundary(self) -> None:
        """With 0, 1, 2, ... free pages, a 30 kB store either commits whole
        (listed, byte-exact) or raises StorageFull leaving no file and no row
        at all — including when the body fits and only the index row (the
        growth of SQLite's write-ahead log) does not."""
        blob_directory(self.storage, "owner").mkdir(mode=0o700, parents=True)
        data = os.urandom(30_000)
        outcomes: list[str] = []
        metadata_full = []
        for pages in range(20):
            filler = fill(self.mount, pages)
            info = None
            try:
                info = self.storage.store("owner", "edge.bin", data)
            except StorageFull as error:
                outcomes.append("full")
                if isinstance(error.__cause__, MetadataFull):
                    metadata_full.append(pages)
                self.assertEqual(self.owner_entries(), [], f"{pages} free pages")
                self.assertEqual(self.storage.list("owner"), [])
            else:
                outcomes.append("stored")
                self.assertEqual(self.storage.read_all("owner", info.id)[1], data, f"{pages} free pages")
            # Space first: removing the row is itself a write to the database.
            filler.unlink()
            if info is not None:
                self.storage.delete("owner", info.id)
        self.assertIn("full", outcomes)
        self.assertIn("stored", outcomes)
        self.assertEqual(outcomes, sorted(outcomes), "fits only from some free space on")
        self.assertTrue(metadata_full, f"no case where only the row did not fit: {outcomes}")

    def test_metadata_full(self) -> None:
        """With the blobs on a roomy disk and the metadata database on a full
        one, a store writes its body, cannot commit its row, raises
        StorageFull (from MetadataFull) and removes the body; once there is
        space again, a store works."""
        roomy = self.make_dir()
        metadata = SqliteMetadataStore(self.mount / "elsewhere.db")
        self.addCleanup(metadata.close)
        storage = SecureFileStorage(roomy, generate_keyring(), metadata=metadata)
        kept = storage.store("owner", "kept.bin", b"kept")
        filler = fill(self.mount, 0)
        with self.assertRaises(StorageFull) as caught:
            storage.store("owner", "big.bin", os.urandom(300_000))
        self.assertIsInstance(caught.exception.__cause__, MetadataFull)
        self.assertEqual(stored_names(storage, "owner"), sorted([f"{kept.id}.body", f"{kept.id}.meta"]))
        self.assertEqual(storage.list("owner"), [kept])
        self.assertEqual(storage.read_all("owner", kept.id)[1], b"kept")
        filler.unlink()
        data = os.urandom(10_000)
        info = storage.store("owner", "small.bin", data)
        self.assertEqual(storage.read_all("owner", info.id)[1], data)
        self.assertEqual([i.id for i in storage.list("owner")], [info.id, kept.id])

    def test_delete_on_full_disk(self) -> None:
        """A delete that cannot be recorded (no room for the database's log)
        raises StorageFull and leaves the archive whole, row and body; once
        there is space, the delete goes through."""
        data = os.urandom(10_000)
        info = self.storage.store("owner", "keep.bin", data)
        filler = fill(self.mount, 0)
        self.assertRaises(StorageFull, self.storage.delete, "owner", info.id)
        self.assertEqual(self.owner_entries(), sorted([f"{info.id}.body", f"{info.id}.meta"]))
        self.assertEqual(self.storage.read_all("owner", info.id)[1], data)
        filler.unlink()
        self.storage.delete("owner", info.id)
        self.assertEqual(self.owner_entries(), [])
        self.assertEqual(self.storage.list("owner"), [])


class PipelineDiskFullTests(SyncTestCase):
    """Uploads through the full request pipeline onto a full filesystem."""

    def setUp(self) -> None:
        self.mount = mount = mount_tmpfs(self, "2m")
        self.app, self.clock = make_app(_OnDirectory(mount))
        self.alice_id = add_user(self.app, "alice", PASSWORD)
        self.client = VaultClient(self.app, self.clock, self)
        self.session = self.client.session("alice", PASSWORD)

    def assert_507(self, response: Response) -> None:
        self.assertEqual(response.status, 507, response.body)
        self.assertEqual(response.json()["error"], "insufficient_storage")
        self.assertTrue(response.json()["message"])

    def assert_nothing_kept(self) -> None:
        self.assertEqual(owner_files(self.app, self.alice_id), [])
        response = self.client.get(b"/get-files", session=self.session)
        self.assertEqual(response.json(), {"files": []})

    def small_upload_works(self) -> None:
        response = self.client.request(
            b"POST", b"/upload-file", body=b"small", headers=[OCTETS, (b"X-Filename", b"small")],
            session=self.session,
        )  # fmt: skip
        self.assertEqual(response.status, 201, response.body)

    def test_raw_upload_disk_full(self) -> None:
        """A 3 MiB raw upload onto a 2 MiB filesystem is answered 507
        insufficient_storage while its body arrives; nothing is kept, and a
        small upload afterwards is stored."""
        response = self.client.request(
            b"POST", b"/upload-file", body=os.urandom(3 * MiB), headers=[OCTETS, (b"X-Filename", b"big.bin")],
            session=self.session,
        )  # fmt: skip
        self.assert_507(response)
        self.assert_nothing_kept()
        self.small_upload_works()

    def test_raw_chunked_upload_disk_full(self) -> None:
        """The same for a chunked raw upload (no Content-Length)."""
        response = self.client.request(
            b"POST", b"/upload-file", body=os.urandom(3 * MiB), headers=[OCTETS, (b"X-Filename", b"big.bin")],
            session=self.session, chunk_size=256 * 1024,
        )  # fmt: skip
        self.assert_507(response)
        self.assert_nothing_kept()
        self.small_upload_works()

    def test_row_does_not_fit(self) -> None:
        """A small raw upload whose body fits in the last free page but whose
        index row does not (SQLite's log cannot grow) is answered 507
        insufficient_storage; its body is removed; once there is space, the
        same upload is stored."""
        blob_directory(self.app.storage, self.alice_id).mkdir(mode=0o700, parents=True)
        filler = fill(self.mount, 1)
        response = self.client.request(
            b"POST", b"/upload-file", body=b"small", headers=[OCTETS, (b"X-Filename", b"small")],
            session=self.session,
        )  # fmt: skip
        self.assert_507(response)
        self.assert_nothing_kept()
        filler.unlink()
        self.small_upload_works()

    def test_json_upload_disk_full(self) -> None:
        """A JSON upload of 3 MiB onto a 2 MiB filesystem is answered 507
        insufficient_storage; nothing is kept."""
        document = {"filename": "big.json", "content": base64.b64encode(os.urandom(3 * MiB)).decode("ascii")}
        response = self.client.post_json(b"/upload-file", document, session=self.session)
        self.assert_507(response)
        self.assert_nothing_kept()
        self.small_upload_works()


class DaemonDiskFullTests(SyncTestCase):
    """The real daemon, its data directory on a small filesystem or with a
    small --quota: 507 over real mutual TLS, nothing left on disk."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())

    def start(self, *extra: str, file_size_limit: int | None = None) -> int:
        self.vault.create()
        daemon: SyncDaemon = self.vault.start(*extra, file_size_limit=file_size_limit)
        self.addCleanup(daemon.stop)
        self.daemon = daemon
        port = daemon.wait_listening()
        self.context = self.vault.tls_context()
        self.session = login(self.context, port)
        return port

    def raw_upload(self, port: int, size: int) -> Any:
        with connect(self.context, port) as sock:
            return send_until_answered(sock, raw_upload_head("big.bin", size, self.session), os.urandom(size))

    def json_upload(self, port: int, size: int) -> Any:
        document = {"filename": "big.json", "content": base64.b64encode(os.urandom(size)).decode("ascii")}
        return call(
            self.context, port, "POST", "/upload-file", body=json.dumps(document).encode(),
            headers=[("Content-Type", "application/json")], session=self.session,
        )  # fmt: skip

    def assert_507(self, response: Any) -> None:
        self.assertEqual(response.status, 507, response.body)
        self.assertEqual(response.json()["error"], "insufficient_storage")

    def archive_files(self) -> list[str]:
        archives = self.vault.data / "archives"
        return sorted(p.name for p in archives.rglob("*") if p.is_file()) if archives.exists() else []

    def assert_clean_and_usable(self, port: int) -> None:
        """Nothing left behind, a small upload works, verify passes."""
        self.assertEqual(self.archive_files(), [])
        self.assertEqual(list_files(self.context, port, self.session), [])
        small = call(
            self.context, port, "POST", "/upload-file", body=b"small",
            headers=[("Content-Type", "application/octet-stream"), ("X-Filename", "small")], session=self.session,
        )  # fmt: skip
        self.assertEqual(small.status, 201, small.body)
        result = self.vault.verify()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_daemon_disk_full(self) -> None:
        """twistd with its data directory on a 4 MiB tmpfs answers a 6 MiB
        raw upload and a 5 MiB JSON upload with 507 insufficient_storage and
        keeps nothing of either."""
        mount_tmpfs(self, "4m", self.vault.data)
        port = self.start()
        self.assert_507(self.raw_upload(port, 6 * MiB))
        self.assertEqual(self.archive_files(), [])
        self.assert_507(self.json_upload(port, 5 * MiB))
        self.assert_clean_and_usable(port)

    def test_daemon_quota(self) -> None:
        """twistd --quota 100000: a 300 kB raw upload and a 300 kB JSON
        upload are 507 insufficient_storage and leave nothing behind."""
        port = self.start("--quota", "100000")
        self.assert_507(self.raw_upload(port, 300_000))
        self.assertEqual(self.archive_files(), [])
        self.assert_507(self.json_upload(port, 300_000))
        self.assert_clean_and_usable(port)

    def test_daemon_file_size_limit(self) -> None:
        """twistd under RLIMIT_FSIZE 1 MiB (writes past it fail with EFBIG, the
        injected stand-in for a full disk): a 3 MiB raw upload keeps nothing
        and the vault stays usable."""
        port = self.start(file_size_limit=FILE_SIZE_LIMIT_BYTES)
        response = self.raw_upload(port, 3 * MiB)
        self.assertNotEqual(response.status, 201, response.body)
        self.assertNotIn(b"Traceback", response.body)
        self.assert_clean_and_usable(port)

    def test_daemon_file_size_limit_is_507(self) -> None:
        """Under RLIMIT_FSIZE, the failed upload is answered 507
        insufficient_storage like any full disk."""
        port = self.start(file_size_limit=FILE_SIZE_LIMIT_BYTES)
        self.assert_507(self.raw_upload(port, 3 * MiB))


FILE_SIZE_LIMIT_BYTES = 1 * MiB


CHILD_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    from pathlib import Path
    from securevault.core.keys import generate_keyring
    from securevault.storage import SecureFileStorage
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    storage = SecureFileStorage(Path(sys.argv[1]), generate_keyring())
    outcome = {}
    try:
        storage.store("owner", "big.bin", os.urandom(3 * limit))
        outcome["raised"] = None
    except Exception as error:
        outcome["raised"] = type(error).__name__
        outcome["errno"] = getattr(error, "errno", None) or getattr(error.__cause__, "errno", None)
    # What the vault keeps for the owner: files in their blob directory and
    # their index rows (as tests.support.app.stored_names counts them).
    blob_directory = storage.blobs.root / "owner"
    files = [p.name for p in blob_directory.iterdir()] if blob_directory.is_dir() else []
    rows = [r.archive_id + ".meta" for r in storage.metadata.list_archives("owner")]
    outcome["left"] = sorted(files + rows)
    data = os.urandom(1000)
    info = storage.store("owner", "small.bin", data)
    outcome["small_ok"] = storage.read_all("owner", info.id)[1] == data
    print(json.dumps(outcome))
    """
)


class FileSizeLimitTests(SyncTestCase):
    """The write error injected without root: RLIMIT_FSIZE in a child."""

    def run_child(self) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-c", CHILD_SCRIPT, str(self.make_dir()), str(FILE_SIZE_LIMIT_BYTES)],
            cwd=REPOSITORY,
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        outcome: dict[str, Any] = json.loads(result.stdout)
        return outcome

    def test_efbig_leaves_nothing(self) -> None:
        """A store that hits EFBIG fails, leaves no file in the owner's blob
        directory and no index row, and a later small store works."""
        outcome = self.run_child()
        self.assertIsNotNone(outcome["raised"])
        self.assertEqual(outcome["left"], [])
        self.assertTrue(outcome["small_ok"])

    def test_efbig_is_storage_full(self) -> None:
        """A store that hits EFBIG raises StorageFull (so the API says 507)."""
        self.assertEqual(self.run_child()["raised"], "StorageFull")
