# -*- test-case-name: tests.admin.test_migration -*-
"""The one-time move from the first release's files to the metadata store.

Before the stores, a vault kept its users in C{users.json} and each
archive's sealed metadata in a C{.meta} file beside its C{.body}.  The
bodies stay where they are (the local blob store uses the same layout);
users and C{.meta} documents become rows.  Each step is idempotent: a
migration killed half-way is finished by the next start, and a file is
removed only after its row is committed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from securevault.core.archive import META_SUFFIX, IntegrityError, is_archive_id
from securevault.core.fsutil import fsync_directory
from securevault.core.users import UserStore, read_legacy_users
from securevault.storage import SecureFileStorage
from securevault.stores.blobs import BODY_SUFFIX, LocalBlobStore
from securevault.stores.metadata import ArchiveRecord, MetadataError

LEGACY_USERS_FILE = "users.json"
MIGRATED_SUFFIX = ".migrated"


@dataclass(frozen=True)
class MigrationReport:
    users: int = 0
    archives: int = 0
    left_in_place: int = 0  # .meta files not moved: blobs are elsewhere

    def __bool__(self) -> bool:
        return bool(self.users or self.archives or self.left_in_place)


def migrate_users(data_dir: Path, users: UserStore) -> int:
    """Move C{users.json} into the store; the file is kept, renamed
    C{users.json.migrated}, so nothing is lost.  Returns how many moved."""
    path = data_dir / LEGACY_USERS_FILE
    legacy = read_legacy_users(path)
    if not path.exists():
        return 0
    moved = 0
    for name, entry in sorted(legacy.items()):
        created_at = str(entry.get("created_at", ""))
        if users.import_user(name, str(entry["id"]), str(entry["password"]), created_at):
            moved += 1
    os.replace(path, path.with_name(LEGACY_USERS_FILE + MIGRATED_SUFFIX))
    fsync_directory(data_dir)
    return moved


def _legacy_meta_files(archives: Path) -> list[tuple[str, str, Path]]:
    found: list[tuple[str, str, Path]] = []
    if not archives.is_dir():
        return found
    for directory in sorted(archives.iterdir()):
        if not directory.is_dir():
            continue
        for entry in sorted(directory.glob(f"*{META_SUFFIX}")):
            archive_id = entry.name[: -len(META_SUFFIX)]
            if is_archive_id(archive_id):
                found.append((directory.name, archive_id, entry))
    return found


def migrate_archives(data_dir: Path, storage: SecureFileStorage) -> tuple[int, int]:
    """Move every C{.meta} document into the archive index, then remove the
    file.  Returns (moved, left in place because the blobs live elsewhere)."""
    legacy = _legacy_meta_files(data_dir / "archives")
    if not legacy:
        return 0, 0
    blobs = storage.blobs
    if not isinstance(blobs, LocalBlobStore) or blobs.root.resolve() != (data_dir / "archives").resolve():
        return 0, len(legacy)
    moved = 0
    touched: set[Path] = set()
    for owner_id, archive_id, meta_path in legacy:
        document = meta_path.read_text("ascii")
        body = meta_path.with_name(archive_id + BODY_SUFFIX)
        stored_bytes = body.stat().st_size if body.exists() else 0
        try:
            document_key = str(json.loads(document)["key_id"])
        except (ValueError, KeyError, TypeError):
            document_key = ""
        record = ArchiveRecord(owner_id, archive_id, meta_path.stat().st_mtime_ns, stored_bytes, document_key, document)
        try:
            # The sealed metadata holds the upload time that orders listings.
            record = ArchiveRecord(
                owner_id, archive_id, storage.unseal(record)[0].created_ns, stored_bytes, document_key, document
            )
        except IntegrityError:
            pass  # moved as it is: verify reports it, as it did before
        if storage.metadata.get_archive(owner_id, archive_id) is None:
            try:
                storage.metadata.put_archive(record)
                moved += 1
            except MetadataError:
                raise
            except Exception:
                if storage.metadata.get_archive(owner_id, archive_id) is None:
                    raise  # not a duplicate from a concurrent start
        meta_path.unlink()
        touched.add(meta_path.parent)
    for directory in touched:
        fsync_directory(directory)
    return moved, 0


def migrate(data_dir: Path, users: UserStore, storage: SecureFileStorage) -> MigrationReport:
    """Both steps; run at start, before crash recovery (which would take the
    legacy bodies, not yet indexed, for debris)."""
    moved_users = migrate_users(data_dir, users)
    moved, left = migrate_archives(data_dir, storage)
    return MigrationReport(moved_users, moved, left)
