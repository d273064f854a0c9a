# -*- test-case-name: tests.admin.test_transfer -*-
"""Copy a whole vault from one pair of stores to another: how a vault
outgrows one machine (SQLite and a directory) for PostgreSQL and S3.

Users (ids and password hashes) and archives (encrypted bodies and their
index rows) are copied as they are: nothing is decrypted or re-encrypted,
so the master key is not needed, and a row's document stays bound to its
owner and archive id.  Each blob is copied, and committed, before its row,
as every upload is.  What the target already has is skipped, so a copy
that was interrupted, or made while the old vault still ran, is finished
by running it again.  The key check goes along (the target opens with
the same master key file, and no other).  Sessions are not copied: users
log in again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from securevault.admin.maintenance import ROTATION_STATE
from securevault.core.archive import IO_BLOCK_BYTES
from securevault.core.integrity import INTEGRITY_KEY_STATE, ROW_MACS_STATE
from securevault.core.keybinding import KEY_CHECK_STATE
from securevault.stores.backends import Stores
from securevault.stores.blobs import BlobNotFound
from securevault.stores.metadata import DuplicateUser

Progress = Callable[[str], None]


class TransferError(Exception):
    """The copy cannot be made; one sentence for people."""


@dataclass(frozen=True)
class TransferReport:
    users: int
    users_present: int
    archives: int
    archives_present: int
    bytes: int
    missing_bodies: tuple[str, ...]


def _quiet(_: str) -> None:
    pass


def copy_vault(source: Stores, target: Stores, progress: Progress = _quiet) -> TransferReport:
    """Copy every user and archive of C{source} into C{target}."""
    if source.metadata.describe() == target.metadata.describe() and source.blobs.describe() == target.blobs.describe():
        raise TransferError("The source and the target are the same stores.")
    rotating = source.metadata.get_state(ROTATION_STATE)
    if rotating is not None:
        raise TransferError(
            f"A master key rotation (to {rotating}) is unfinished; finish it with 'key rotate' before copying."
        )
    check = source.metadata.get_state(KEY_CHECK_STATE)
    if check is not None and target.metadata.add_state(KEY_CHECK_STATE, check) != check:
        raise TransferError("The target stores are bound to another master key (their key check differs).")
    # Rows carry MACs under the source's integrity key: the target gets it
    # (wrapped under the same master key), or is refused if it has another.
    for name in (INTEGRITY_KEY_STATE, ROW_MACS_STATE):
        value = source.metadata.get_state(name)
        if value is not None and target.metadata.add_state(name, value) != value:
            raise TransferError(f"The target stores hold another vault's {name.replace('_', ' ')}.")
    users = present_users = 0
    for user in source.metadata.list_users():
        try:
            target.metadata.add_user(user)
            users += 1
        except DuplicateUser:
            present_users += 1
    progress(f"users: {users} copied, {present_users} already there")

    same_blobs = source.blobs.describe() == target.blobs.describe()
    archives = present = copied_bytes = 0
    missing: list[str] = []
    for owner_id in source.metadata.owners():
        for record in source.metadata.list_archives(owner_id):
            if target.metadata.get_archive(owner_id, record.archive_id) is not None:
                present += 1
                continue
            if same_blobs:  # only the index moves (e.g. SQLite to PostgreSQL, blobs stay)
                target.metadata.put_archive(record)
                archives += 1
                continue
            try:
                reader = source.blobs.reader(owner_id, record.archive_id)
            except BlobNotFound:
                missing.append(record.archive_id)  # verify reports it in the source too
                continue
            writer = target.blobs.writer(owner_id, record.archive_id)
            size = 0
            try:
                while block := reader.read(IO_BLOCK_BYTES):
                    writer.write(block)
                    size += len(block)
                if size != record.stored_bytes:
                    raise TransferError(
                        f"Archive {record.archive_id} has {size} bytes stored, its index says {record.stored_bytes}."
                    )
                writer.commit()
            except BaseException:
                writer.abort()
                raise
            finally:
                reader.close()
            target.metadata.put_archive(record)  # the commit point, as for an upload
            archives += 1
            copied_bytes += size
            if archives % 100 == 0:
                progress(f"archives: {archives} copied ({copied_bytes >> 20} MiB)")
    progress(f"archives: {archives} copied ({copied_bytes >> 20} MiB), {present} already there")
    return TransferReport(users, present_users, archives, present, copied_bytes, tuple(missing))
