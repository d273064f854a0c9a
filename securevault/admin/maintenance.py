# -*- test-case-name: tests.admin.test_maintenance -*-
"""Operator jobs over the whole vault: key rotation, verification, export.

Plain blocking code used by C{securevault-admin}.  Each job reports progress
through a callback and is safe to interrupt and run again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from securevault.core.archive import ArchiveNotFound, IntegrityError
from securevault.core.fsutil import fsync_directory, remove_stale_temps, temp_name
from securevault.core.integrity import rewrap_integrity_key
from securevault.core.keybinding import bind_keyring, rebind
from securevault.core.keys import Keyring, KeyringFile, generate_keyring, new_key_id
from securevault.storage import SecureFileStorage

Progress = Callable[[str], None]
# The key a rotation in progress rewraps to (metadata store state).
ROTATION_STATE = "key_rotation"


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class RotationReport:
    new_key_id: str
    retired_key_ids: tuple[str, ...]
    rewrapped: int
    archives: int


def rotate_master_key(
    storage_for: Callable[[Keyring], SecureFileStorage], master_key: Path | KeyringFile, progress: Progress = _quiet
) -> RotationReport:
    """Rewrap every data key under a new master key, then retire the old ones.

    C{storage_for(keyring)} opens the vault's stores with that keyring.
    The key file must open the vault (its key check; see
    L{securevault.core.keybinding}), else L{KeyBindingError} and nothing
    changes.  Steps, each durable before the next: (1) the keyring file gains
    a new current key, keeping the old, and then the key check vouches for
    both, and the vault's integrity key is rewrapped under the new key
    (L{securevault.core.integrity}); (2) every archive's index row is rewrapped; (3) the key check
    vouches for the new key alone, and then the keyring keeps only the new
    key.  At every point the key file on disk shares a vouched-for key with
    the check, so it keeps opening the vault, and a retired key no longer
    does.  A run interrupted anywhere is finished by running it again: step
    (1) is skipped when the keyring already holds more than one key.
    """
    key_file = master_key if isinstance(master_key, KeyringFile) else KeyringFile(master_key)
    remove_stale_temps(key_file.path)
    keyring = key_file.load()
    bind_keyring(keyring, storage_for(keyring).metadata, key_file.path)
    if len(keyring.keys) == 1:
        new_id = new_key_id()
        keys = dict(keyring.keys)
        keys[new_id] = generate_keyring().current_key
        keyring = Keyring(new_id, keys)
        key_file.save(keyring)
        progress(f"new master key {new_id} added; rewrapping data keys")
    else:
        progress(f"resuming an interrupted rotation to key {keyring.current_id}")
    storage = storage_for(keyring)
    rebind(storage.metadata, keyring)
    # The integrity key (row MACs, the audit chain) itself never changes:
    # only its wrapping moves to the new key, before the old one retires.
    if rewrap_integrity_key(keyring, storage.metadata):
        progress("integrity key rewrapped under the new master key")
    # Recorded in the metadata store, where every node and verify can see it.
    storage.metadata.set_state(ROTATION_STATE, keyring.current_id)
    rewrapped = total = 0
    # Sweep until a pass finds nothing left under an old key, so an archive
    # committed by a running daemon during the sweep is not stranded.
    while True:
        changed = 0
        for owner_id in storage.owners():
            for archive_id in storage.archive_ids(owner_id):
                try:
                    if storage.rewrap(owner_id, archive_id, keyring):
                        changed += 1
                except ArchiveNotFound:
                    continue  # deleted meanwhile
                if changed and changed % 100 == 0:
                    progress(f"rewrapped {rewrapped + changed} data keys")
        total = sum(len(storage.archive_ids(o)) for o in storage.owners())
        rewrapped += changed
        if changed == 0:
            break
    retired = tuple(kid for kid in keyring.keys if kid != keyring.current_id)
    only_new = Keyring(keyring.current_id, {keyring.current_id: keyring.current_key})
    # The check first: a copy of the old key file must stop opening the
    # vault before the rotation can be reported done.
    rebind(storage.metadata, only_new)
    key_file.save(only_new)
    remove_stale_temps(key_file.path)
    storage.metadata.set_state(ROTATION_STATE, None)
    progress(f"retired old master key(s) {', '.join(retired) or '-'}")
    return RotationReport(keyring.current_id, retired, rewrapped, total)


@dataclass(frozen=True)
class VerifyFailure:
    owner_id: str
    archive_id: str
    reason: str


def verify_archives(
    storage: SecureFileStorage, owners: list[str] | None = None, progress: Progress = _quiet
) -> tuple[int, list[VerifyFailure]]:
    """Authenticate every archive (of C{owners}, else all); returns the count
    checked and the failures."""
    failures: list[VerifyFailure] = []
    checked = 0
    for owner_id in owners if owners is not None else storage.owners():
        for archive_id in sorted(storage.archive_ids(owner_id)):
            checked += 1
            try:
                storage.verify(owner_id, archive_id)
            except ArchiveNotFound:
                checked -= 1  # deleted meanwhile
            except IntegrityError as error:
                failures.append(VerifyFailure(owner_id, archive_id, str(error)))
            if checked % 100 == 0:
                progress(f"verified {checked} archives")
    return checked, failures


def export_archive(storage: SecureFileStorage, archive_id: str, out: Path) -> int:
    """Write the decrypted standard ZIP of an archive to C{out}; returns its size.

    Written under a temp name and renamed only once fully authenticated, so a
    tampered archive leaves no file behind.
    """
    owner_id = storage.find_owner(archive_id)
    out = Path(out)
    temp = temp_name(out)
    size = 0
    try:
        with open(temp, "xb") as handle:
            for block in storage.iter_zip(owner_id, archive_id):
                handle.write(block)
                size += len(block)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temp, out)  # unlike a rename, never replaces an existing file
    finally:
        temp.unlink(missing_ok=True)
    fsync_directory(out.parent.resolve())
    return size
