# -*- test-case-name: tests.test_master_key -*-
"""The master key bound to its vault, against a real C{twistd securevault}
and real C{securevault-admin} runs.

A wrong or missing C{--master-key} used to start the vault with a new key
(archives gone from listings, new uploads under a key nobody kept).  Now the
daemon refuses with one line and creates nothing; a vault whose key is still
inside its data directory starts with a warning; rotation, verify and export
keep working with the key check, which a scale-out vault keeps in its shared
metadata store.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

from securevault.core.keybinding import KEY_CHECK_STATE, keyring_opens
from securevault.core.keys import KeyringFile, load_keyring
from securevault.stores.backends import open_metadata
from tests.support.daemon import (
    WAIT_SECONDS,
    SyncDaemon,
    VaultFixture,
    call,
    child_environment,
    download_sha256,
    list_files,
    login,
    run_admin,
    twistd_argv,
)
from tests.support.postgres import postgres_url
from tests.support.testcase import SyncTestCase
from tests.support.tlsclient import PASSWORD


def start_refused(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a twistd that is expected to refuse to start (bounded in time)."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=child_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        check=False,
    )


def key_files(base: Path) -> dict[Path, bytes]:
    """Every master key file under C{base}, with its content."""
    return {path: path.read_bytes() for path in sorted(base.rglob("*.key")) if path.parent.name != "certs"}


class DaemonKeyTests(SyncTestCase):
    """twistd on a vault made by C{securevault-admin init} and C{user add alice}."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        self.base = self.vault.base
        self.context = self.vault.tls_context()

    def assert_refused(self, result: subprocess.CompletedProcess[str], reason: str) -> None:
        """twistd exited non-zero with one stderr line, "securevault: error:"
        and C{reason}, no traceback, and never listened."""
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertEqual(len(result.stderr.splitlines()), 1, output)
        self.assertTrue(result.stderr.startswith("securevault: error: "), output)
        self.assertIn(reason, result.stderr)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("listening on", output)

    def upload(self, port: int, session: str, filename: str, content: bytes) -> str:
        body = json.dumps({"filename": filename, "content": base64.b64encode(content).decode()}).encode()
        response = call(
            self.context, port, "POST", "/upload-file", body=body,
            headers=[("Content-Type", "application/json")], session=session,
        )  # fmt: skip
        self.assertEqual(response.status, 201, response.body)
        return str(response.json()["id"])

    def test_wrong_key_refused(self) -> None:
        """Given another vault's key file, twistd exits non-zero with one
        line saying that key does not open this vault; no key file is
        created or changed."""
        other = self.base / "elsewhere" / "master.key"
        KeyringFile(other).create()
        before = key_files(self.base)
        result = start_refused(self.vault.argv("--master-key", str(other)), self.base)
        self.assert_refused(result, f"the master key at {other} does not open this vault")
        self.assertEqual(key_files(self.base), before)

    def test_missing_key_refused(self) -> None:
        """A --master-key path with a typo, or the default key file gone, on
        a vault with a user: twistd exits non-zero with one line naming the
        path and saying the key is missing; no key file is created."""
        typo = self.base / "vault-kyes" / "master.key"
        result = start_refused(self.vault.argv("--master-key", str(typo)), self.base)
        self.assert_refused(result, f"the master key file {typo} is missing")
        self.assertFalse(typo.parent.exists())

        saved = self.base / "backup.key"
        self.vault.master_key.rename(saved)
        before = key_files(self.base)
        result = start_refused(self.vault.argv(), self.base)
        self.assert_refused(result, f"the master key file {self.vault.master_key} is missing")
        self.assertEqual(key_files(self.base), before)
        self.assertFalse(self.vault.master_key.exists())

    def test_old_layout_warns_and_serves(self) -> None:
        """A vault whose key is at the old default, inside the data directory
        (and none at the new place), starts with that key, logs a warning
        that a backup of the data is a backup of the key, and serves: login,
        upload, list and download byte-exact.  No key is made at the new
        place."""
        key_dir = self.vault.master_key.parent
        self.vault.master_key.rename(self.vault.data / "master.key")
        key_dir.rmdir()
        daemon = self.vault.start()
        self.addCleanup(daemon.stop)
        port = daemon.wait_listening()
        output = daemon.output()
        self.assertIn(f"The master key {self.vault.data / 'master.key'} is inside the data directory", output)
        self.assertIn("a backup of the data is a backup of the key", output)
        self.assertIn(f"move it to {key_dir / 'master.key'}", output)
        session = login(self.context, port)
        content = os.urandom(50_000)
        archive_id = self.upload(port, session, "old-layout.bin", content)
        self.assertEqual([entry["id"] for entry in list_files(self.context, port, session)], [archive_id])
        self.assertEqual(download_sha256(self.context, port, session, archive_id), hashlib.sha256(content).hexdigest())
        self.assertFalse(key_dir.exists())

    def test_rotate_verify_export_with_the_check(self) -> None:
        """With the key check in place and the daemon running: key rotate
        succeeds, the archive stored before still downloads, verify passes,
        export writes its ZIP; a copy of the retired key file no longer
        opens the vault."""
        daemon = self.vault.start()
        self.addCleanup(daemon.stop)
        port = daemon.wait_listening()
        session = login(self.context, port)
        content = os.urandom(40_000)
        archive_id = self.upload(port, session, "kept.bin", content)
        retired = self.base / "retired.key"
        shutil.copy(self.vault.master_key, retired)
        data = ("--data-dir", str(self.vault.data))

        rotated = run_admin(*data, "key", "rotate", cwd=self.base)
        self.assertEqual(rotated.returncode, 0, rotated.stderr)
        self.assertIn("1 of 1 data keys rewrapped", rotated.stdout)
        self.assertEqual(download_sha256(self.context, port, session, archive_id), hashlib.sha256(content).hexdigest())
        verified = run_admin(*data, "verify", cwd=self.base)
        self.assertEqual(verified.returncode, 0, verified.stderr)
        self.assertIn("1 archives verified, 0 failed", verified.stdout)
        out = self.base / "kept.zip"
        exported = run_admin(*data, "export", archive_id, "--out", str(out), cwd=self.base)
        self.assertEqual(exported.returncode, 0, exported.stderr)
        with zipfile.ZipFile(io.BytesIO(out.read_bytes())) as archive:
            self.assertEqual(archive.read("kept.bin"), content)

        refused = run_admin(*data, "verify", "--master-key", str(retired), cwd=self.base)
        self.assertEqual(refused.returncode, 1, refused.stdout)
        self.assertEqual(
            refused.stderr,
            f"securevault-admin: error: the master key at {retired} does not open this vault; "
            "give the vault's own key file with --master-key\n",
        )


class ScaleOutKeyCheckTests(SyncTestCase):
    """Nodes sharing one PostgreSQL metadata store share one key check."""

    def test_check_in_the_shared_store(self) -> None:
        """init on a PostgreSQL vault stores the key check there (not in a
        node's data directory); a node given that key serves; a node given
        another key, or none, refuses to start with one line."""
        metadata = postgres_url(self)
        base = self.make_dir()
        certs, shared = base / "certs", base / "shared"
        store = ("--data-dir", str(shared), "--metadata", metadata)
        result = run_admin(*store, "init", "--certs-dir", str(certs), cwd=base)
        self.assertEqual(result.returncode, 0, result.stderr)
        key = base / "shared-keys" / "master.key"
        self.assertIn(f"created {key}", result.stdout)
        result = run_admin(*store, "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n", cwd=base)
        self.assertEqual(result.returncode, 0, result.stderr)

        opened = open_metadata(base, metadata)
        self.addCleanup(opened.close)
        check = opened.get_state(KEY_CHECK_STATE)
        assert check is not None
        self.assertTrue(keyring_opens(load_keyring(key), check))

        node = SyncDaemon(twistd_argv(certs, base / "node-a", "--metadata", metadata, "--master-key", str(key)), base)
        self.addCleanup(node.stop)
        port = node.wait_listening()
        context = VaultFixture(base).tls_context()
        self.assertEqual(list_files(context, port, login(context, port)), [])
        self.assertFalse((base / "node-a" / "vault.db").exists())

        other = base / "other-keys" / "master.key"
        KeyringFile(other).create()
        for key_file, reason in ((other, "does not open this vault"), (base / "node-b-keys" / "master.key", "missing")):
            refused = start_refused(
                twistd_argv(certs, base / "node-b", "--metadata", metadata, "--master-key", str(key_file)), base
            )
            self.assertNotEqual(refused.returncode, 0, refused.stdout + refused.stderr)
            self.assertEqual(len(refused.stderr.splitlines()), 1, refused.stderr)
            self.assertIn(reason, refused.stderr)
        self.assertFalse((base / "node-b-keys").exists())
        self.assertEqual(opened.get_state(KEY_CHECK_STATE), check)
