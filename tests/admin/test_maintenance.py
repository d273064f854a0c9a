# -*- test-case-name: tests.admin.test_maintenance -*-
"""Tests for L{securevault.admin.maintenance}: master key rotation (including a
kill at every step), archive verification and export, directly and through
C{securevault-admin}."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import signal
import stat
import subprocess
import sys
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from securevault.admin import cli as admin
from securevault.admin.maintenance import ROTATION_STATE, export_archive, rotate_master_key, verify_archives
from securevault.core.archive import ArchiveNotFound, IntegrityError
from securevault.core.fsutil import TEMP_SUFFIX
from securevault.core.integrity import integrity_key
from securevault.core.keybinding import KEY_CHECK_STATE, default_master_key, keyring_opens, rebind
from securevault.core.keys import Keyring, ensure_keyring, load_keyring
from securevault.core.users import UserStore
from securevault.storage import METADATA_FILE, SecureFileStorage
from securevault.stores.metadata import SqliteMetadataStore
from tests.support.app import archive_document, set_archive_document
from tests.support.rows import vault_rows
from tests.support.testcase import SyncTestCase

REPOSITORY = Path(__file__).parents[2]
OWNER_A = "a" * 32
OWNER_B = "b" * 32
ARCHIVES_PER_ROTATION = 5

# Every durable step of an uninterrupted rotation, in order: the metadata
# store's schema check (a no-op write when the schema is there) of the stores
# the key file is checked against; the keyring file gains the new key; the
# schema check of the stores the rotation works on; the key check vouches for
# the old and the new key; the rotation is recorded in the store; one row per
# archive is rewrapped; the key check vouches for the new key alone; the
# keyring keeps only the new key; the record of the rotation is cleared.
ROTATION_STEPS = (
    "sql",
    "keyring",
    "sql",
    "check",
    "integrity",
    "state",
    *("row",) * ARCHIVES_PER_ROTATION,
    "check",
    "keyring",
    "state",
)

# Runs rotate_master_key on the data directory argv[1] and key file argv[2]
# in a fresh interpreter that kills itself with SIGKILL at the argv[3]-th
# durable step, "before" or "after" it is durable (argv[4]).  A keyring write
# (fsutil.write_atomically) ends in one os.replace: "before" is a kill with
# the temp file complete, not yet renamed.  A metadata store write is one
# SQLite transaction: "before" is a kill after its statements ran, before
# COMMIT.  "after" is a kill between two steps.  The child prints the steps
# it went through, labelled as in ROTATION_STEPS.  The patches live in the
# child only: fault injection around the real code, not a mock of it.
ROTATE_CHILD = """
import json, os, signal, sys
from contextlib import contextmanager
from pathlib import Path
from securevault.admin.maintenance import rotate_master_key
from securevault.core.integrity import INTEGRITY_KEY_STATE
from securevault.core.keybinding import KEY_CHECK_STATE
from securevault.stores.metadata import SqlMetadataStore, SqliteMetadataStore
from securevault.storage import SecureFileStorage

target, when = int(sys.argv[3]), sys.argv[4]
steps = []
label = ["sql"]

def step(kind, phase):
    if phase == "before":
        steps.append(kind)
    if len(steps) == target and when == phase:
        os.kill(os.getpid(), signal.SIGKILL)

real_replace = os.replace

def replace(src, dst):
    step("keyring", "before")
    real_replace(src, dst)
    step("keyring", "after")

real_transaction = SqliteMetadataStore._transaction

@contextmanager
def transaction(self, connection, write):
    with real_transaction(self, connection, write) as cursor:
        yield cursor
        if write:
            step(label[0], "before")
    if write:
        step(label[0], "after")

def labelled(kind, method):
    def call(*args, **kwargs):
        names = {KEY_CHECK_STATE: "check", INTEGRITY_KEY_STATE: "integrity"}
        label[0] = names.get(args[1], kind) if args[1:2] and isinstance(args[1], str) else kind
        try:
            return method(*args, **kwargs)
        finally:
            label[0] = "sql"
    return call

os.replace = replace
SqliteMetadataStore._transaction = transaction
SqlMetadataStore.replace_archive_key = labelled("row", SqlMetadataStore.replace_archive_key)
SqlMetadataStore.set_state = labelled("state", SqlMetadataStore.set_state)
data_dir = Path(sys.argv[1])
report = rotate_master_key(lambda keyring: SecureFileStorage(data_dir, keyring), Path(sys.argv[2]))
print(json.dumps({"steps": steps, "new_key_id": report.new_key_id}))
"""


@dataclass
class Vault:
    """A scratch vault: data directory, master key and what was stored."""

    data_dir: Path
    master_key: Path
    original_key_id: str
    # (owner id, archive id) -> (filename, content)
    originals: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)

    def storage(self, keyring: Keyring | None = None) -> SecureFileStorage:
        """A storage over the data dir with C{keyring}, else the key file as it is on disk."""
        return SecureFileStorage(self.data_dir, keyring or load_keyring(self.master_key))

    def row_key_ids(self) -> dict[tuple[str, str], str]:
        """Each archive's master key id, from its index row (the document's
        C{key_id}, checked equal to the row's C{key_id} column)."""
        storage = self.storage()
        try:
            found = {}
            for owner_id in storage.owners():
                for record in storage.metadata.list_archives(owner_id):
                    key_id = str(json.loads(record.document)["key_id"])
                    assert record.key_id == key_id, (record, key_id)
                    found[(owner_id, record.archive_id)] = key_id
            return found
        finally:
            storage.metadata.close()

    def rotation_state(self) -> str | None:
        """The key a rotation in progress is recorded as rewrapping to."""
        storage = self.storage()
        try:
            return storage.metadata.get_state(ROTATION_STATE)
        finally:
            storage.metadata.close()

    def body(self, archive_id: str) -> Path:
        owner_id = next(owner for owner, aid in self.originals if aid == archive_id)
        return self.data_dir / "archives" / owner_id / f"{archive_id}.body"

    def bodies(self) -> dict[Path, bytes]:
        return {path: path.read_bytes() for path in sorted(self.data_dir.glob("archives/*/*.body"))}

    def temp_files(self) -> list[Path]:
        """Temp files in the data directory and beside the key file."""
        found = [*self.data_dir.rglob(f"*{TEMP_SUFFIX}"), *self.master_key.parent.glob(f"*{TEMP_SUFFIX}")]
        return sorted(found)

    def integrity_key(self, keyring: Keyring | None = None) -> bytes:
        """The vault's integrity key, unwrapped with C{keyring}, else the key file on disk."""
        storage = self.storage(keyring)
        try:
            return integrity_key(keyring or load_keyring(self.master_key), storage.metadata)
        finally:
            storage.metadata.close()

    def key_check(self) -> str | None:
        """The key check stored in the vault's metadata store."""
        storage = self.storage()
        try:
            return storage.metadata.get_state(KEY_CHECK_STATE)
        finally:
            storage.metadata.close()


def make_vault(data_dir: Path, contents: dict[str, list[tuple[str, bytes]]], *, bind: bool = True) -> Vault:
    """Create a master key at its default place beside C{data_dir} and store
    C{contents} (owner -> files); with C{bind}, the vault's key check too."""
    data_dir.mkdir(parents=True, exist_ok=True)
    master_key = default_master_key(data_dir)
    keyring, _ = ensure_keyring(master_key)  # made here, or by a test that added users first
    vault = Vault(data_dir, master_key, keyring.current_id)
    storage = SecureFileStorage(data_dir, keyring)
    if bind:
        rebind(storage.metadata, keyring)
        vault_rows(storage.metadata, keyring)  # the integrity key, as a daemon makes it
    for owner_id, files in contents.items():
        for name, data in files:
            info = storage.store(owner_id, name, data)
            vault.originals[(owner_id, info.id)] = (name, data)
    return vault


def sample_contents(owner_a: str = OWNER_A, owner_b: str = OWNER_B) -> dict[str, list[tuple[str, bytes]]]:
    """Five archives over two owners: compressible, incompressible over
    several segments, empty, non-ASCII named."""
    return {
        owner_a: [
            ("notes.txt", b"the quick brown fox\n" * 2000),
            ("random.bin", os.urandom(70_000)),
            ("empty", b""),
        ],
        owner_b: [
            ("résumé ✓.pdf", os.urandom(3000)),
            ("notes.txt", b"other owner, same name\n" * 10),
        ],
    }


class MaintenanceTestCase(SyncTestCase):
    """Helpers shared by the rotation, verify and export tests."""

    def assert_reads_back(self, vault: Vault, keyring: Keyring | None = None) -> None:
        """Every stored archive reads back byte-exact with its filename."""
        storage = vault.storage(keyring)
        for (owner_id, archive_id), (name, data) in vault.originals.items():
            info, content = storage.read_all(owner_id, archive_id)
            self.assertEqual((info.filename, content), (name, data), archive_id)

    def run_admin(self, data_dir: Path, *argv: str) -> tuple[int, str, str]:
        """Run C{securevault-admin --data-dir DATA_DIR ARGV...}; return (status, out, err)."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = admin.main(["--data-dir", str(data_dir), *argv])
        return status, out.getvalue(), err.getvalue()


class RotateTests(MaintenanceTestCase):
    """L{rotate_master_key} replaces the master key without touching archive bodies."""

    def setUp(self) -> None:
        self.vault = make_vault(self.make_dir() / "vault-data", sample_contents())

    def test_rotate(self) -> None:
        """After a rotation the key file holds exactly one, new key (mode
        0600); every archive reads back with that key alone; every index row
        names it; no .body file changed; the old key id is reported retired
        and no rotation is recorded as in progress."""
        bodies = self.vault.bodies()
        old = load_keyring(self.vault.master_key)
        self.assertEqual(set(self.vault.row_key_ids().values()), {self.vault.original_key_id})
        report = rotate_master_key(self.vault.storage, self.vault.master_key)
        keyring = load_keyring(self.vault.master_key)
        self.assertEqual(list(keyring.keys), [report.new_key_id])
        self.assertEqual(keyring.current_id, report.new_key_id)
        self.assertNotEqual(report.new_key_id, self.vault.original_key_id)
        self.assertNotEqual(keyring.current_key, old.current_key)
        self.assertEqual(report.retired_key_ids, (self.vault.original_key_id,))
        self.assertEqual((report.rewrapped, report.archives), (5, 5))
        self.assertEqual(stat.S_IMODE(self.vault.master_key.stat().st_mode), 0o600)
        only_new = Keyring(keyring.current_id, {keyring.current_id: keyring.current_key})
        self.assert_reads_back(self.vault, only_new)
        self.assertEqual(self.vault.bodies(), bodies)
        rows = self.vault.row_key_ids()
        self.assertEqual(sorted(rows), sorted(self.vault.originals))
        self.assertEqual(set(rows.values()), {report.new_key_id})
        self.assertIsNone(self.vault.rotation_state())
        self.assertEqual(self.vault.temp_files(), [])

    def test_old_key_no_longer_reads(self) -> None:
        """The retired key alone can no longer unwrap any data key."""
        old = load_keyring(self.vault.master_key)
        rotate_master_key(self.vault.storage, self.vault.master_key)
        storage = self.vault.storage(old)
        for owner_id, archive_id in self.vault.originals:
            self.assertRaises(IntegrityError, storage.read_all, owner_id, archive_id)

    def test_rotate_twice(self) -> None:
        """A second rotation retires the first rotation's key and reads back too."""
        first = rotate_master_key(self.vault.storage, self.vault.master_key)
        second = rotate_master_key(self.vault.storage, self.vault.master_key)
        self.assertEqual(second.retired_key_ids, (first.new_key_id,))
        self.assertEqual(list(load_keyring(self.vault.master_key).keys), [second.new_key_id])
        self.assert_reads_back(self.vault)

    def test_empty_vault(self) -> None:
        """A vault with no archives rotates to one new key."""
        vault = make_vault(self.make_dir() / "empty", {})
        report = rotate_master_key(vault.storage, vault.master_key)
        self.assertEqual((report.rewrapped, report.archives), (0, 0))
        self.assertEqual(list(load_keyring(vault.master_key).keys), [report.new_key_id])

    def test_admin_key_rotate(self) -> None:
        """C{key rotate}: exit 0, a summary line, and a key_rotated audit record
        naming the key ids and holding no key material."""
        old = load_keyring(self.vault.master_key)
        status, out, err = self.run_admin(self.vault.data_dir, "key", "rotate")
        self.assertEqual(status, 0, err)
        new = load_keyring(self.vault.master_key)
        self.assertIn(f"master key rotated to {new.current_id}: 5 of 5", out)
        self.assertIn(self.vault.original_key_id, out)
        audit = (self.vault.data_dir / "audit.jsonl").read_bytes()
        [record] = [json.loads(line) for line in audit.splitlines()]
        self.assertEqual(record["event"], "key_rotated")
        self.assertEqual(record["new_key_id"], new.current_id)
        self.assertEqual(record["retired_key_ids"], [self.vault.original_key_id])
        for key in (old.current_key, new.current_key):
            self.assertNotIn(base64.b64encode(key), audit)
            self.assertNotIn(key.hex().encode(), audit)
        self.assert_reads_back(self.vault)


class InterruptedRotateTests(MaintenanceTestCase):
    """A rotation killed with SIGKILL at any step leaves every archive readable
    with the key file on disk, and a rerun finishes the job."""

    def rotate_in_child(self, vault: Vault, target: int, when: str) -> subprocess.CompletedProcess[str]:
        """Run the rotation in a child killed at the TARGET-th rename, WHEN = before/after it."""
        return subprocess.run(
            [sys.executable, "-c", ROTATE_CHILD, str(vault.data_dir), str(vault.master_key)] + [str(target), when],
            env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def test_durable_step_count(self) -> None:
        """An uninterrupted rotation goes through exactly the durable steps of
        ROTATION_STEPS (one keyring write, one row per archive, one final
        keyring write, two key check writes, and the store's bookkeeping):
        the kill points below cover every step.  Afterwards the key check
        vouches for the new key alone."""
        vault = make_vault(self.make_dir() / "vault-data", sample_contents())
        child = self.rotate_in_child(vault, 0, "never")
        self.assertEqual(child.returncode, 0, child.stderr)
        self.assertEqual(tuple(json.loads(child.stdout)["steps"]), ROTATION_STEPS)
        self.assert_reads_back(vault)
        new_key_id = json.loads(child.stdout)["new_key_id"]
        self.assertEqual(list(load_keyring(vault.master_key).keys), [new_key_id])
        self.assertEqual(set(vault.row_key_ids().values()), {new_key_id})
        self.assertIsNone(vault.rotation_state())
        check = vault.key_check()
        assert check is not None
        self.assertEqual(json.loads(check)["keys"].keys(), {new_key_id})

    def test_killed_at_every_step(self) -> None:
        """For each durable step of a rotation, a kill just before it is
        durable (a keyring temp file complete but not renamed; a row's UPDATE
        run but not committed) and just after it: every archive still reads
        with the key file on disk, and the vault's key check still accepts
        that file; exactly the rows committed before the kill are rewrapped,
        each row whole (column and document agree); the leftover temp file
        breaks nothing; a rerun completes, leaves one key that is not the
        original, rewrites no body, every row names the new key and no
        rotation is left recorded, the key check accepts the new key file and
        no longer the original one, and everything reads back byte-exact;
        recover() then clears the archive temp files."""
        contents = sample_contents()
        final_keyring_write = len(ROTATION_STEPS) - ROTATION_STEPS[::-1].index("keyring")
        for target, kind in enumerate(ROTATION_STEPS, start=1):
            for when in ("before", "after"):
                label = f"kill {when} step {target} ({kind})"
                vault = make_vault(self.make_dir() / "vault-data", contents)
                original = load_keyring(vault.master_key)
                original_integrity_key = vault.integrity_key()
                bodies = vault.bodies()
                child = self.rotate_in_child(vault, target, when)
                self.assertEqual(child.returncode, -signal.SIGKILL, f"{label}: {child.stderr}")
                self.assertEqual(len(vault.temp_files()), 1 if (kind, when) == ("keyring", "before") else 0, label)
                self.assert_reads_back(vault)
                check = vault.key_check()
                assert check is not None, label
                self.assertTrue(keyring_opens(load_keyring(vault.master_key), check), label)
                # Row MACs and the audit chain stay checkable with the key file on disk.
                self.assertEqual(vault.integrity_key(), original_integrity_key, label)
                rows_done = ROTATION_STEPS[:target].count("row") - (1 if (kind, when) == ("row", "before") else 0)
                rewrapped = [key for key in vault.row_key_ids().values() if key != vault.original_key_id]
                self.assertEqual(len(rewrapped), rows_done, label)

                report = rotate_master_key(vault.storage, vault.master_key)
                keyring = load_keyring(vault.master_key)
                self.assertEqual(list(keyring.keys), [report.new_key_id], label)
                self.assertNotEqual(report.new_key_id, vault.original_key_id, label)
                if target < final_keyring_write or (target == final_keyring_write and when == "before"):
                    # The child did not finish: the rerun retires the original key.
                    self.assertIn(vault.original_key_id, report.retired_key_ids, label)
                self.assertEqual(set(vault.row_key_ids().values()), {report.new_key_id}, label)
                self.assertIsNone(vault.rotation_state(), label)
                check = vault.key_check()
                assert check is not None, label
                self.assertTrue(keyring_opens(keyring, check), label)
                self.assertFalse(keyring_opens(original, check), label)
                self.assertEqual(vault.integrity_key(keyring), original_integrity_key, label)
                self.assert_reads_back(vault, keyring)
                self.assertEqual(vault.bodies(), bodies, label)
                self.assertEqual(verify_archives(vault.storage()), (5, []), label)
                vault.storage().recover()
                self.assertEqual([p for p in vault.temp_files() if p.parent != vault.master_key.parent], [], label)
                self.assert_reads_back(vault, keyring)

    def test_killed_mid_keyring_write_leaves_no_old_key(self) -> None:
        """A kill while the keyring (old and new key) is being written leaves
        a temp file beside the key file; once the rerun has retired the old
        key, no file in the data directory or beside the key file still holds
        it."""
        vault = make_vault(self.make_dir() / "vault-data", sample_contents())
        old_key = base64.b64encode(load_keyring(vault.master_key).current_key)
        child = self.rotate_in_child(vault, ROTATION_STEPS.index("keyring") + 1, "before")
        self.assertEqual(child.returncode, -signal.SIGKILL, child.stderr)
        self.assertEqual(len(vault.temp_files()), 1)
        rotate_master_key(vault.storage, vault.master_key)
        vault.storage().recover()
        files = [*vault.data_dir.rglob("*"), *vault.master_key.parent.rglob("*")]
        holders = [p for p in files if p.is_file() and old_key in p.read_bytes()]
        self.assertEqual(holders, [])


class VerifyTests(MaintenanceTestCase):
    """L{verify_archives} and C{securevault-admin verify}."""

    def setUp(self) -> None:
        self.vault = make_vault(self.make_dir() / "vault-data", sample_contents())
        self.a_ids = sorted(aid for owner, aid in self.vault.originals if owner == OWNER_A)
        self.b_ids = sorted(aid for owner, aid in self.vault.originals if owner == OWNER_B)

    def flip_byte(self, archive_id: str) -> None:
        path = self.vault.body(archive_id)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    def truncate(self, archive_id: str) -> None:
        path = self.vault.body(archive_id)
        os.truncate(path, path.stat().st_size // 2)

    def test_all_good(self) -> None:
        """An untouched vault: every archive checked, no failure."""
        self.assertEqual(verify_archives(self.vault.storage()), (5, []))
        status, out, err = self.run_admin(self.vault.data_dir, "verify")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("5 archives verified, 0 failed", out)

    def test_flipped_and_truncated(self) -> None:
        """A flipped body byte and a truncated body: exactly those two archives fail."""
        flipped, truncated = self.a_ids[0], self.b_ids[0]
        self.flip_byte(flipped)
        self.truncate(truncated)
        checked, failures = verify_archives(self.vault.storage())
        self.assertEqual(checked, 5)
        self.assertEqual(
            sorted((f.owner_id, f.archive_id) for f in failures),
            sorted([(OWNER_A, flipped), (OWNER_B, truncated)]),
        )

    def test_other_tampering(self) -> None:
        """A missing body, a body swapped in from another archive, an archive
        moved to another owner, a replaced wrapped key and a garbage row
        document are each reported as a failure of that archive."""
        victims = [*self.a_ids, *self.b_ids]
        storage = self.vault.storage()
        archives = self.vault.data_dir / "archives"
        # missing body
        self.vault.body(victims[0]).unlink()
        # body of another archive of the same owner
        self.vault.body(victims[1]).write_bytes(self.vault.body(victims[2]).read_bytes())
        # replaced wrapped key: the wrapped key of another archive
        donor = json.loads(archive_document(storage, OWNER_B, victims[4]))
        document = json.loads(archive_document(storage, OWNER_B, victims[3]))
        document["wrapped_key"] = donor["wrapped_key"]
        set_archive_document(storage, OWNER_B, victims[3], json.dumps(document))
        # garbage metadata
        set_archive_document(storage, OWNER_B, victims[4], "\x00not json")
        checked, failures = verify_archives(self.vault.storage())
        self.assertEqual(checked, 5)
        expected = [victims[0], victims[1], victims[3], victims[4]]
        self.assertEqual(sorted(f.archive_id for f in failures), sorted(expected))
        # an archive moved to another owner (row and body): its context no
        # longer authenticates
        record = storage.metadata.get_archive(OWNER_A, victims[2])
        assert record is not None
        storage.metadata.delete_archive(OWNER_A, victims[2])
        storage.metadata.put_archive(dataclasses.replace(record, owner_id=OWNER_B))
        name = f"{victims[2]}.body"
        (archives / OWNER_A / name).rename(archives / OWNER_B / name)
        checked, failures = verify_archives(self.vault.storage(), [OWNER_B])
        self.assertIn((OWNER_B, victims[2]), [(f.owner_id, f.archive_id) for f in failures])

    def test_admin_names_both(self) -> None:
        """C{verify} prints a line naming each failing archive and exits 1."""
        flipped, truncated = self.a_ids[1], self.b_ids[1]
        self.flip_byte(flipped)
        self.truncate(truncated)
        status, out, err = self.run_admin(self.vault.data_dir, "verify")
        self.assertEqual(status, 1)
        failed = [line for line in out.splitlines() if line.startswith("FAILED")]
        self.assertEqual(len(failed), 2, out)
        self.assertTrue(any(flipped in line for line in failed), out)
        self.assertTrue(any(truncated in line for line in failed), out)
        self.assertIn("5 archives verified, 2 failed", out)

    def test_admin_user_scope(self) -> None:
        """C{verify --user NAME} checks only that user's archives, names the
        user in each failure, and exits 1 only when one of them fails."""
        data_dir = self.make_dir() / "users-vault"
        data_dir.mkdir()
        metadata = SqliteMetadataStore(data_dir / METADATA_FILE)  # where securevault-admin looks
        self.addCleanup(metadata.close)
        keyring, _ = ensure_keyring(default_master_key(data_dir))
        users = UserStore(metadata, vault_rows(metadata, keyring), scrypt_n=2**10)
        alice = users.add("alice", "a long enough password")
        bob = users.add("bob", "another long password")
        vault = make_vault(data_dir, sample_contents(alice, bob))
        bob_ids = [aid for owner, aid in vault.originals if owner == bob]
        path = vault.body(bob_ids[0])
        os.truncate(path, path.stat().st_size - 1)

        status, out, err = self.run_admin(data_dir, "verify", "--user", "alice")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("3 archives verified, 0 failed", out)

        status, out, err = self.run_admin(data_dir, "verify", "--user", "bob")
        self.assertEqual(status, 1)
        self.assertIn(f"FAILED {bob_ids[0]} of bob:", out)
        self.assertIn("2 archives verified, 1 failed", out)

        status, out, err = self.run_admin(data_dir, "verify", "--user", "carol")
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("securevault-admin: error: "), err)
        self.assertIn("carol", err)

    def test_admin_removed_user(self) -> None:
        """A failing archive of an owner not in the user store is still named."""
        self.truncate(self.a_ids[0])
        status, out, err = self.run_admin(self.vault.data_dir, "verify")
        self.assertEqual(status, 1)
        self.assertIn(f"FAILED {self.a_ids[0]} of (removed user {OWNER_A})", out)


class ExportTests(MaintenanceTestCase):
    """L{export_archive} and C{securevault-admin export}."""

    def setUp(self) -> None:
        self.vault = make_vault(self.make_dir() / "vault-data", sample_contents())
        self.out_dir = self.make_dir()

    def assert_zip_holds(self, path: Path, name: str, data: bytes) -> None:
        with zipfile.ZipFile(path) as archive:
            self.assertIsNone(archive.testzip())
            self.assertEqual(archive.namelist(), [name])
            self.assertEqual(archive.read(name), data)

    def test_export_every_archive(self) -> None:
        """Each archive exports as a standard ZIP whose single member has the
        original name and bytes; the returned size is the file's."""
        storage = self.vault.storage()
        for index, ((_owner_id, archive_id), (name, data)) in enumerate(self.vault.originals.items()):
            out = self.out_dir / f"{index}.zip"
            size = export_archive(storage, archive_id, out)
            self.assertEqual(size, out.stat().st_size)
            self.assert_zip_holds(out, name, data)
        self.assertEqual(sorted(p.name for p in self.out_dir.iterdir()), [f"{i}.zip" for i in range(5)])

    def test_export_unknown(self) -> None:
        """An unknown or malformed id raises ArchiveNotFound and writes nothing."""
        storage = self.vault.storage()
        for archive_id in ["0" * 32, "../../master.key", ""]:
            self.assertRaises(ArchiveNotFound, export_archive, storage, archive_id, self.out_dir / "x.zip")
        self.assertEqual(list(self.out_dir.iterdir()), [])

    def test_admin_export(self) -> None:
        """C{export ID --out FILE} writes the ZIP and says where."""
        (owner_id, archive_id), (name, data) = next(iter(self.vault.originals.items()))
        out = self.out_dir / "recovered.zip"
        status, stdout, err = self.run_admin(self.vault.data_dir, "export", archive_id, "--out", str(out))
        self.assertEqual((status, err), (0, ""))
        self.assertIn(f"wrote {out}", stdout)
        self.assert_zip_holds(out, name, data)

    def test_admin_refuses_existing_out(self) -> None:
        """An existing --out is refused with one error line and left unchanged."""
        archive_id = next(iter(self.vault.originals))[1]
        out = self.out_dir / "taken.zip"
        out.write_bytes(b"precious")
        status, stdout, err = self.run_admin(self.vault.data_dir, "export", archive_id, "--out", str(out))
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("securevault-admin: error: "), err)
        self.assertEqual(err.count("\n"), 1)
        self.assertEqual(out.read_bytes(), b"precious")

    def test_admin_unknown_id(self) -> None:
        """An unknown archive id: exit 1, one error line, nothing written."""
        out = self.out_dir / "x.zip"
        status, stdout, err = self.run_admin(self.vault.data_dir, "export", "f" * 32, "--out", str(out))
        self.assertEqual(status, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("f" * 32, err)
        self.assertEqual(list(self.out_dir.iterdir()), [])

    def test_admin_tampered(self) -> None:
        """A tampered archive (flipped byte, truncated body): exit 1, one
        error line naming it, and neither --out nor a temp file is left."""
        ids = [aid for owner, aid in self.vault.originals if owner == OWNER_A]
        flipped, truncated = ids[0], ids[1]
        path = self.vault.body(flipped)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x80
        path.write_bytes(bytes(data))
        path = self.vault.body(truncated)
        os.truncate(path, path.stat().st_size - 20)
        for archive_id in (flipped, truncated):
            out = self.out_dir / "bad.zip"
            status, stdout, err = self.run_admin(self.vault.data_dir, "export", archive_id, "--out", str(out))
            self.assertEqual(status, 1, archive_id)
            self.assertTrue(err.startswith("securevault-admin: error: "), err)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertIn(archive_id, err)
            self.assertEqual(list(self.out_dir.iterdir()), [], archive_id)
