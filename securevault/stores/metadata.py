# -*- test-case-name: tests.stores.test_metadata -*-
"""Everything small and transactional: the narrow metadata store interface,
the SQL that implements it, and SQLite, the embedded default.

The store holds users and their password hashes, sessions (by a digest of
their id, never the id), login attempts (for the throttle), the archive index with each
archive's sealed metadata document, and small named state (schema version,
key rotation, the master key check).  It knows nothing of HTTP or cryptography.  Plain blocking
code, run in the worker pool; PostgreSQL is in L{securevault.stores.metadata_postgres}.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SCHEMA_VERSION = "1"


class MetadataError(Exception):
    """The metadata store failed; the message says what, without secrets."""


class MetadataFull(MetadataError):
    """The metadata store's disk is full."""


class DuplicateUser(MetadataError):
    """A user with that name already exists."""


class OverQuota(Exception):
    """An archive row was refused: with it, its owner's archives would take
    more than the quota.  Nothing was inserted.  Not a L{MetadataError}: the
    store works, the request does not fit."""


@dataclass(frozen=True)
class UserRecord:
    name: str
    user_id: str
    password_hash: str
    created_at: str
    mac: str | None = None  # see securevault.core.integrity


@dataclass(frozen=True)
class SessionRecord:
    digest: str  # SHA-256 of the session id, hex: the id itself is never stored
    username: str
    user_id: str
    fingerprint: str
    created_at: float
    last_used: float
    expires_at: float
    mac: str | None = None  # see securevault.core.integrity


@dataclass(frozen=True)
class LoginAttempt:
    """One login attempt, reserved before its password is checked: it counts
    as a failure until the login succeeds and releases it."""

    attempt_id: str  # random: what a successful login releases
    certificate: str  # the client certificate's fingerprint
    account: str  # a digest of the username tried: never the name itself
    at: float


@dataclass(frozen=True)
class UploadRecord:
    """A resumable (tus) upload in progress: its bytes so far are pieces in
    the blob store, each named by a piece row."""

    upload_id: str
    owner_id: str
    length: int  # the declared length (Upload-Length)
    upload_offset: int  # bytes acknowledged so far
    reserved_bytes: int  # counted against the owner's quota until it ends
    expires_at: float  # removed by the sweep after this, unless it progresses
    key_id: str
    document: str  # the upload key wrapped, the filename sealed: docs/FORMAT.md


@dataclass(frozen=True)
class UploadPiece:
    """One acknowledged PATCH body: an encrypted blob of its own."""

    upload_id: str
    piece_offset: int
    length: int
    blob_id: str  # the blob's name beside the owner's archives (32 hex digits)


class UploadGone(Exception):
    """The upload row is not there (finished, deleted or expired)."""


class UploadConflict(Exception):
    """The upload's offset is not where the piece starts (another PATCH won)."""


@dataclass(frozen=True)
class ArchiveRecord:
    owner_id: str
    archive_id: str
    created_ns: int
    stored_bytes: int
    key_id: str
    document: str  # the sealed metadata: see docs/FORMAT.md


class MetadataStore(Protocol):
    """Safe to call from any thread; every method is one transaction."""

    # users
    def add_user(self, record: UserRecord) -> None:
        """Raises L{DuplicateUser} when the name is taken."""

    def get_user(self, name: str) -> UserRecord | None: ...

    def set_password_hash(
        self, name: str, password_hash: str, *, user_id: str | None = None, mac: str | None = None
    ) -> bool:
        """Replace the hash and the row's C{mac}; False when there is no such
        user (or, with C{user_id}, when the row has another id)."""

    def remove_user(self, name: str) -> bool:
        """Remove the user and end their sessions; False when there is none."""

    def list_users(self) -> list[UserRecord]:
        """Sorted by name."""

    def set_user_mac(self, record: UserRecord, mac: str) -> bool:
        """Give a row without a MAC its C{mac}, if it still holds C{record}'s
        name, id and hash (see L{securevault.core.integrity})."""

    # sessions
    def put_session(self, record: SessionRecord) -> None: ...

    def get_session(self, digest: str) -> SessionRecord | None: ...

    def touch_session(self, digest: str, last_used: float) -> None: ...

    def delete_session(self, digest: str) -> None: ...

    def delete_expired_sessions(self, now: float, idle_seconds: float) -> int: ...

    def delete_unauthenticated_sessions(self) -> int:
        """End every session without a MAC; returns how many."""

    def count_sessions(self) -> int: ...

    def list_sessions(self) -> list[SessionRecord]:
        """Every stored session (a single node mirrors them in memory)."""

    def revoke_sessions(self, *, user_id: str | None = None, digest_prefix: str | None = None) -> int:
        """End the sessions of a user, or those whose digest starts with a
        prefix (at least 8 hex digits); returns how many.  Bumps the
        revocation mark (L{SESSIONS_REVOKED_STATE}) in the same transaction."""

    # login throttling
    def reserve_login_attempt(
        self, attempt: LoginAttempt, since: float, per_account: int, per_certificate: int
    ) -> float | None:
        """Record C{attempt} unless its certificate already has
        C{per_account} attempts for its account, or C{per_certificate} in
        all, after C{since}; None when recorded.  Otherwise nothing is
        written and the result is the time of the oldest attempt that must
        leave the window first (the C{per_account}-th or
        C{per_certificate}-th most recent; the later of the two when both
        are full).

        Counting and recording are one transaction, serialised per
        certificate across every node: concurrent attempts never exceed a
        limit."""

    def release_login_attempt(self, attempt_id: str) -> None:
        """Forget an attempt (its login succeeded)."""

    def clear_login_attempts(self, account: str) -> int:
        """Forget every attempt on C{account}, from any certificate (the
        admin's unlock); returns how many."""

    def forget_login_attempts(self, before: float) -> int:
        """Forget attempts at or before C{before}; returns how many."""

    # the archive index
    def put_archive(self, record: ArchiveRecord, quota: int | None = None, finishing_upload: str | None = None) -> None:
        """Insert the row (the commit point of an upload).  With C{quota},
        only if the owner's stored bytes with this archive, plus what the
        owner's resumable uploads reserve, stay within it, checked in the
        insert's transaction and serialised per owner across every node
        sharing the store; else L{OverQuota}.  With C{finishing_upload}, that
        upload's rows go in the same transaction (its reservation is not
        counted); L{UploadGone} if they were already gone."""

    def get_archive(self, owner_id: str, archive_id: str) -> ArchiveRecord | None: ...

    def list_archives(self, owner_id: str) -> list[ArchiveRecord]:
        """Newest first."""

    def delete_archive(self, owner_id: str, archive_id: str) -> bool: ...

    def replace_archive_key(self, owner_id: str, archive_id: str, old_key_id: str, key_id: str, document: str) -> bool:
        """Swap the document if its key is still C{old_key_id} (rotation)."""

    def find_archive_owner(self, archive_id: str) -> str | None: ...

    def owners(self) -> list[str]: ...

    def usage(self, owner_id: str) -> int:
        """Stored bytes of the owner's archives (for --quota)."""

    def reserved(self, owner_id: str) -> int:
        """Bytes the owner's resumable uploads reserve (for --quota)."""

    # resumable uploads
    def put_upload(self, record: UploadRecord, quota: int | None = None) -> None:
        """Insert an upload; with C{quota}, only if its reservation fits
        beside the owner's archives and other reservations (as put_archive),
        else L{OverQuota}."""

    def get_upload(self, owner_id: str, upload_id: str) -> UploadRecord | None: ...

    def add_upload_piece(self, owner_id: str, piece: UploadPiece, expires_at: float) -> int:
        """Record an acknowledged piece and move the upload's offset past it,
        in one transaction; returns the new offset.  L{UploadGone} when the
        upload is not there, L{UploadConflict} when its offset is not
        C{piece.piece_offset}: nothing is written then."""

    def list_upload_pieces(self, upload_id: str) -> list[UploadPiece]:
        """In offset order."""

    def delete_upload(self, owner_id: str, upload_id: str) -> list[UploadPiece] | None:
        """Remove the upload and its piece rows; returns the pieces (whose
        blobs the caller removes), None when there was no such upload."""

    def expired_uploads(self, now: float) -> list[tuple[str, str]]:
        """(owner id, upload id) of the uploads whose C{expires_at} is past."""

    def all_upload_blob_ids(self) -> set[tuple[str, str]]:
        """(owner id, blob id) of every piece, for the orphan sweep."""

    def all_archive_ids(self) -> set[tuple[str, str]]:
        """(owner id, archive id) of every archive, for the orphan sweep."""

    # named state
    def get_state(self, name: str) -> str | None: ...

    def set_state(self, name: str, value: str | None) -> None: ...

    def add_state(self, name: str, value: str) -> str:
        """Set C{name} only if it has no value; returns the value it has
        then (this one, or the one another process stored first)."""

    def describe(self) -> str:
        """Where the store is, for the start-up line (no credentials)."""

    def close(self) -> None: ...


# Named state that changes whenever sessions are ended from outside the
# daemon (password change, user removal, an operator's revoke): a node that
# mirrors sessions in memory watches it and drops the revoked ones at once.
SESSIONS_REVOKED_STATE = "sessions_revoked"
MIN_SESSION_PREFIX_CHARS = 8


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sv_users (
        name TEXT PRIMARY KEY,
        user_id TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sv_sessions (
        digest TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        user_id TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        last_used DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sv_sessions_user ON sv_sessions (user_id)",
    # One row per login attempt that has not succeeded (sv_login_failures,
    # its per-subject predecessor, is no longer read: a vault upgraded from
    # it keeps the table, and a node of the previous version may still use it).
    """CREATE TABLE IF NOT EXISTS sv_login_attempts (
        attempt TEXT PRIMARY KEY,
        certificate TEXT NOT NULL,
        account TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sv_login_attempts_certificate ON sv_login_attempts (certificate, account, at)",
    "CREATE INDEX IF NOT EXISTS sv_login_attempts_account ON sv_login_attempts (account)",
    """CREATE TABLE IF NOT EXISTS sv_archives (
        owner_id TEXT NOT NULL,
        archive_id TEXT NOT NULL,
        created_ns BIGINT NOT NULL,
        stored_bytes BIGINT NOT NULL,
        key_id TEXT NOT NULL,
        document TEXT NOT NULL,
        PRIMARY KEY (owner_id, archive_id))""",
    "CREATE INDEX IF NOT EXISTS sv_archives_id ON sv_archives (archive_id)",
    "CREATE INDEX IF NOT EXISTS sv_archives_listing ON sv_archives (owner_id, created_ns)",
    """CREATE TABLE IF NOT EXISTS sv_state (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    # Resumable (tus) uploads in progress and their acknowledged pieces.
    """CREATE TABLE IF NOT EXISTS sv_uploads (
        upload_id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL,
        length BIGINT NOT NULL,
        upload_offset BIGINT NOT NULL,
        reserved_bytes BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        key_id TEXT NOT NULL,
        document TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sv_uploads_owner ON sv_uploads (owner_id)",
    "CREATE INDEX IF NOT EXISTS sv_uploads_expiry ON sv_uploads (expires_at)",
    """CREATE TABLE IF NOT EXISTS sv_upload_pieces (
        upload_id TEXT NOT NULL,
        piece_offset BIGINT NOT NULL,
        length BIGINT NOT NULL,
        blob_id TEXT NOT NULL,
        PRIMARY KEY (upload_id, piece_offset))""",
)
# Every table of SCHEMA: a store missing any of them (an older vault) has
# the schema run again (every statement is IF NOT EXISTS).
TABLES = ("sv_users", "sv_sessions", "sv_login_attempts", "sv_archives", "sv_state", "sv_uploads", "sv_upload_pieces")
# Columns added after their table: (table, column, type).  Nullable, so a
# store of an older vault gains them in place (ALTER TABLE ... ADD COLUMN
# on both engines) and its rows read None until filled in.
ADDED_COLUMNS = (("sv_users", "mac", "TEXT"), ("sv_sessions", "mac", "TEXT"))


def _row(
    record: UserRecord | SessionRecord | LoginAttempt | ArchiveRecord | UploadRecord | UploadPiece,
) -> tuple[Any, ...]:
    """A record's values in its table's column order (the field order)."""
    return tuple(getattr(record, field.name) for field in dataclasses.fields(record))


# The columns of each table, in the order of its record's fields.
_USER_COLUMNS = "name, user_id, password_hash, created_at, mac"
_SESSION_COLUMNS = "digest, username, user_id, fingerprint, created_at, last_used, expires_at, mac"
_ATTEMPT_COLUMNS = "attempt, certificate, account, at"
_ARCHIVE_COLUMNS = "owner_id, archive_id, created_ns, stored_bytes, key_id, document"
_UPLOAD_COLUMNS = "upload_id, owner_id, length, upload_offset, reserved_bytes, expires_at, key_id, document"
_PIECE_COLUMNS = "upload_id, piece_offset, length, blob_id"


class SqlMetadataStore:
    """L{MetadataStore} in portable SQL over a DB-API connection per thread.

    Subclasses say how to connect, how a transaction starts, and which
    placeholder their driver takes; the statements are shared, so SQLite and
    PostgreSQL pass the same contract suite by running the same SQL.
    """

    placeholder = "?"
    integrity_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)

    def __init__(self) -> None:
        self._local = threading.local()
        self._connections: list[Any] = []
        self._connections_lock = threading.Lock()
        self._statements: dict[str, str] = {}

    # -- what a backend provides ------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    @contextmanager
    def _transaction(self, connection: Any, write: bool) -> Iterator[Any]:
        """A cursor in a transaction (C{write}), or for one read statement."""
        raise NotImplementedError
        yield

    def _create_schema(self) -> None:
        with self._write() as run:
            self._run_schema(run)
        self._check_schema_version()

    def _run_schema(self, run: Any) -> None:
        """The tables, and the schema version when the store is new."""
        for statement in SCHEMA:
            run(statement)
        for table, column, kind in ADDED_COLUMNS:
            if not self._has_column(run, table, column):
                run(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        run(
            "INSERT INTO sv_state (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            ("schema", SCHEMA_VERSION),
        )

    def _has_column(self, run: Any, table: str, column: str) -> bool:
        """Whether C{table} has C{column} (SQLite; PostgreSQL overrides)."""
        return any(row[1] == column for row in run(f"PRAGMA table_info({table})").fetchall())

    def _serialise_certificate(self, run: Any, certificate: str) -> None:
        """Inside a write transaction: wait until no other transaction on
        the store counts or records login attempts for C{certificate}.
        SQLite's BEGIN IMMEDIATE already excludes every other writer."""

    def _check_schema_version(self) -> None:
        version = self.get_state("schema")
        if version != SCHEMA_VERSION:
            raise MetadataError(f"the metadata store has schema version {version}, this vault needs {SCHEMA_VERSION}")

    # -- plumbing ---------------------------------------------------------

    def _sql(self, statement: str) -> str:
        converted = self._statements.get(statement)
        if converted is None:
            converted = statement.replace("?", self.placeholder)
            self._statements[statement] = converted
        return converted

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _forget_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with self._connections_lock:
                if connection in self._connections:
                    self._connections.remove(connection)
            try:
                connection.close()
            except Exception:
                pass

    @contextmanager
    def _write(self, write: bool = True) -> Iterator[Any]:
        """A transaction; yields C{run(sql, params) -> cursor}."""
        connection = self._connection()
        try:
            with self._transaction(connection, write) as cursor:

                def run(statement: str, parameters: Sequence[Any] = ()) -> Any:
                    cursor.execute(self._sql(statement), tuple(parameters))
                    return cursor

                yield run
        except self.integrity_errors:
            raise
        except self._broken_errors() as error:
            self._forget_connection()
            if self._is_full(error):
                raise MetadataFull("no space left for the metadata store") from error
            raise MetadataError(f"the metadata store failed: {type(error).__name__}: {error}") from error

    def _broken_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.OperationalError, sqlite3.DatabaseError)

    def _is_full(self, error: BaseException) -> bool:
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL

    def _query(self, statement: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._write(write=False) as run:
            return list(run(statement, parameters).fetchall())

    def _execute(self, statement: str, parameters: Sequence[Any] = ()) -> int:
        with self._write() as run:
            return int(run(statement, parameters).rowcount)

    def close(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.close()
            except Exception:
                pass
        self._local = threading.local()

    # -- users ------------------------------------------------------------

    def add_user(self, record: UserRecord) -> None:
        try:
            self._execute(f"INSERT INTO sv_users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?)", _row(record))
        except self.integrity_errors as error:
            raise DuplicateUser(record.name) from error

    def get_user(self, name: str) -> UserRecord | None:
        rows = self._query(f"SELECT {_USER_COLUMNS} FROM sv_users WHERE name = ?", (name,))
        return UserRecord(*rows[0]) if rows else None

    def set_password_hash(
        self, name: str, password_hash: str, *, user_id: str | None = None, mac: str | None = None
    ) -> bool:
        """A new password ends every session of the user, in the same
        transaction: a stolen session does not outlive the password."""
        with self._write() as run:
            rows = run("SELECT user_id FROM sv_users WHERE name = ?", (name,)).fetchall()
            if not rows or (user_id is not None and rows[0][0] != user_id):
                return False
            run("UPDATE sv_users SET password_hash = ?, mac = ? WHERE name = ?", (password_hash, mac, name))
            run("DELETE FROM sv_sessions WHERE user_id = ?", (rows[0][0],))
            self._mark_revoked(run)
            return True

    def remove_user(self, name: str) -> bool:
        with self._write() as run:
            rows = run("SELECT user_id FROM sv_users WHERE name = ?", (name,)).fetchall()
            if not rows:
                return False
            run("DELETE FROM sv_users WHERE name = ?", (name,))
            run("DELETE FROM sv_sessions WHERE user_id = ?", (rows[0][0],))
            self._mark_revoked(run)
            return True

    def _mark_revoked(self, run: Any) -> None:
        run(
            "INSERT INTO sv_state (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (SESSIONS_REVOKED_STATE, uuid.uuid4().hex),
        )

    def list_users(self) -> list[UserRecord]:
        return [UserRecord(*row) for row in self._query(f"SELECT {_USER_COLUMNS} FROM sv_users ORDER BY name")]

    def set_user_mac(self, record: UserRecord, mac: str) -> bool:
        return (
            self._execute(
                "UPDATE sv_users SET mac = ? WHERE name = ? AND user_id = ? AND password_hash = ? AND mac IS NULL",
                (mac, record.name, record.user_id, record.password_hash),
            )
            > 0
        )

    # -- sessions -----------------------------------------------------------

    def put_session(self, record: SessionRecord) -> None:
        self._execute(f"INSERT INTO sv_sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", _row(record))

    def get_session(self, digest: str) -> SessionRecord | None:
        rows = self._query(f"SELECT {_SESSION_COLUMNS} FROM sv_sessions WHERE digest = ?", (digest,))
        return SessionRecord(*rows[0]) if rows else None

    def touch_session(self, digest: str, last_used: float) -> None:
        self._execute(
            "UPDATE sv_sessions SET last_used = ? WHERE digest = ? AND last_used < ?", (last_used, digest, last_used)
        )

    def delete_session(self, digest: str) -> None:
        self._execute("DELETE FROM sv_sessions WHERE digest = ?", (digest,))

    def delete_expired_sessions(self, now: float, idle_seconds: float) -> int:
        return self._execute(
            "DELETE FROM sv_sessions WHERE expires_at <= ? OR last_used <= ?", (now, now - idle_seconds)
        )

    def delete_unauthenticated_sessions(self) -> int:
        return self._execute("DELETE FROM sv_sessions WHERE mac IS NULL")

    def count_sessions(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM sv_sessions")[0][0])

    def list_sessions(self) -> list[SessionRecord]:
        return [SessionRecord(*row) for row in self._query(f"SELECT {_SESSION_COLUMNS} FROM sv_sessions")]

    def revoke_sessions(self, *, user_id: str | None = None, digest_prefix: str | None = None) -> int:
        if (user_id is None) == (digest_prefix is None):
            raise ValueError("name a user or a session prefix, not both")
        if digest_prefix is not None and (
            len(digest_prefix) < MIN_SESSION_PREFIX_CHARS or not all(c in "0123456789abcdef" for c in digest_prefix)
        ):
            raise ValueError(f"a session prefix is at least {MIN_SESSION_PREFIX_CHARS} lowercase hex digits")
        with self._write() as run:
            if user_id is not None:
                count = run("DELETE FROM sv_sessions WHERE user_id = ?", (user_id,)).rowcount
            else:
                assert digest_prefix is not None
                count = run(
                    "DELETE FROM sv_sessions WHERE substr(digest, 1, ?) = ?", (len(digest_prefix), digest_prefix)
                ).rowcount
            self._mark_revoked(run)
            return int(count)

    # -- login throttling ---------------------------------------------------

    def reserve_login_attempt(
        self, attempt: LoginAttempt, since: float, per_account: int, per_certificate: int
    ) -> float | None:
        with self._write() as run:
            self._serialise_certificate(run, attempt.certificate)
            full: list[float] = []
            for statement, parameters, limit in (
                (
                    "SELECT at FROM sv_login_attempts WHERE certificate = ? AND account = ? AND at > ?"
                    " ORDER BY at DESC LIMIT ?",
                    (attempt.certificate, attempt.account, since, per_account),
                    per_account,
                ),
                (
                    "SELECT at FROM sv_login_attempts WHERE certificate = ? AND at > ? ORDER BY at DESC LIMIT ?",
                    (attempt.certificate, since, per_certificate),
                    per_certificate,
                ),
            ):
                times = [float(row[0]) for row in run(statement, parameters).fetchall()]
                if len(times) >= limit:
                    full.append(times[-1])
            if full:
                return max(full)
            run(f"INSERT INTO sv_login_attempts ({_ATTEMPT_COLUMNS}) VALUES (?, ?, ?, ?)", _row(attempt))
            return None

    def release_login_attempt(self, attempt_id: str) -> None:
        self._execute("DELETE FROM sv_login_attempts WHERE attempt = ?", (attempt_id,))

    def clear_login_attempts(self, account: str) -> int:
        return self._execute("DELETE FROM sv_login_attempts WHERE account = ?", (account,))

    def forget_login_attempts(self, before: float) -> int:
        return self._execute("DELETE FROM sv_login_attempts WHERE at <= ?", (before,))

    # -- the archive index ----------------------------------------------------

    def put_archive(self, record: ArchiveRecord, quota: int | None = None, finishing_upload: str | None = None) -> None:
        insert = f"INSERT INTO sv_archives ({_ARCHIVE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
        if quota is None and finishing_upload is None:
            self._execute(insert, _row(record))
            return
        with self._write() as run:
            # Usage read and row inserted in one transaction that no other
            # upload of this owner can interleave with: parallel uploads
            # never store more than the quota in all.
            self._lock_owner(run, record.owner_id)
            if finishing_upload is not None:
                gone = run(
                    "DELETE FROM sv_uploads WHERE upload_id = ? AND owner_id = ?", (finishing_upload, record.owner_id)
                ).rowcount
                if gone != 1:
                    raise UploadGone(finishing_upload)
                run("DELETE FROM sv_upload_pieces WHERE upload_id = ?", (finishing_upload,))
            if quota is not None:
                used = self._used(run, record.owner_id)
                if used + record.stored_bytes > quota:
                    raise OverQuota(f"{used} + {record.stored_bytes} bytes would exceed the quota of {quota}")
            run(insert, _row(record))

    def _used(self, run: Any, owner_id: str) -> int:
        """Inside a transaction: the owner's archives and reservations."""
        archives = run("SELECT COALESCE(SUM(stored_bytes), 0) FROM sv_archives WHERE owner_id = ?", (owner_id,))
        stored = int(archives.fetchone()[0])
        uploads = run("SELECT COALESCE(SUM(reserved_bytes), 0) FROM sv_uploads WHERE owner_id = ?", (owner_id,))
        return stored + int(uploads.fetchone()[0])

    def _lock_owner(self, run: Any, owner_id: str) -> None:
        """Serialise the quota check of C{owner_id}'s uploads for the rest of
        the transaction.  SQLite needs nothing more: its write transactions
        (BEGIN IMMEDIATE) already exclude each other, across processes too."""

    def get_archive(self, owner_id: str, archive_id: str) -> ArchiveRecord | None:
        rows = self._query(
            f"SELECT {_ARCHIVE_COLUMNS} FROM sv_archives WHERE owner_id = ? AND archive_id = ?",
            (owner_id, archive_id),
        )
        return ArchiveRecord(*rows[0]) if rows else None

    def list_archives(self, owner_id: str) -> list[ArchiveRecord]:
        rows = self._query(
            f"SELECT {_ARCHIVE_COLUMNS} FROM sv_archives WHERE owner_id = ? ORDER BY created_ns DESC, archive_id",
            (owner_id,),
        )
        return [ArchiveRecord(*row) for row in rows]

    def delete_archive(self, owner_id: str, archive_id: str) -> bool:
        return (
            self._execute("DELETE FROM sv_archives WHERE owner_id = ? AND archive_id = ?", (owner_id, archive_id)) > 0
        )

    def replace_archive_key(self, owner_id: str, archive_id: str, old_key_id: str, key_id: str, document: str) -> bool:
        changed = self._execute(
            "UPDATE sv_archives SET key_id = ?, document = ? WHERE owner_id = ? AND archive_id = ? AND key_id = ?",
            (key_id, document, owner_id, archive_id, old_key_id),
        )
        return changed > 0

    def find_archive_owner(self, archive_id: str) -> str | None:
        rows = self._query("SELECT owner_id FROM sv_archives WHERE archive_id = ?", (archive_id,))
        return str(rows[0][0]) if rows else None

    def owners(self) -> list[str]:
        return [str(row[0]) for row in self._query("SELECT DISTINCT owner_id FROM sv_archives ORDER BY owner_id")]

    def usage(self, owner_id: str) -> int:
        rows = self._query("SELECT COALESCE(SUM(stored_bytes), 0) FROM sv_archives WHERE owner_id = ?", (owner_id,))
        return int(rows[0][0])

    def all_archive_ids(self) -> set[tuple[str, str]]:
        return {(str(o), str(a)) for o, a in self._query("SELECT owner_id, archive_id FROM sv_archives")}

    def reserved(self, owner_id: str) -> int:
        rows = self._query("SELECT COALESCE(SUM(reserved_bytes), 0) FROM sv_uploads WHERE owner_id = ?", (owner_id,))
        return int(rows[0][0])

    # -- resumable uploads ------------------------------------------------------

    def put_upload(self, record: UploadRecord, quota: int | None = None) -> None:
        insert = f"INSERT INTO sv_uploads ({_UPLOAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        with self._write() as run:
            if quota is not None:
                self._lock_owner(run, record.owner_id)
                used = self._used(run, record.owner_id)
                if used + record.reserved_bytes > quota:
                    raise OverQuota(f"{used} + {record.reserved_bytes} bytes would exceed the quota of {quota}")
            run(insert, _row(record))

    def get_upload(self, owner_id: str, upload_id: str) -> UploadRecord | None:
        rows = self._query(
            f"SELECT {_UPLOAD_COLUMNS} FROM sv_uploads WHERE upload_id = ? AND owner_id = ?", (upload_id, owner_id)
        )
        return UploadRecord(*rows[0]) if rows else None

    def add_upload_piece(self, owner_id: str, piece: UploadPiece, expires_at: float) -> int:
        with self._write() as run:
            rows = run(
                "SELECT upload_offset, length FROM sv_uploads WHERE upload_id = ? AND owner_id = ?",
                (piece.upload_id, owner_id),
            ).fetchall()
            if not rows:
                raise UploadGone(piece.upload_id)
            offset, length = int(rows[0][0]), int(rows[0][1])
            if offset != piece.piece_offset or offset + piece.length > length:
                raise UploadConflict(piece.upload_id)
            # The update first: on PostgreSQL it locks the row, and a PATCH
            # racing on another node finds the offset moved (no row).
            changed = run(
                "UPDATE sv_uploads SET upload_offset = ?, expires_at = ? WHERE upload_id = ? AND upload_offset = ?",
                (offset + piece.length, expires_at, piece.upload_id, offset),
            ).rowcount
            if changed != 1:
                raise UploadConflict(piece.upload_id)
            run(f"INSERT INTO sv_upload_pieces ({_PIECE_COLUMNS}) VALUES (?, ?, ?, ?)", _row(piece))
            return offset + piece.length

    def list_upload_pieces(self, upload_id: str) -> list[UploadPiece]:
        rows = self._query(
            f"SELECT {_PIECE_COLUMNS} FROM sv_upload_pieces WHERE upload_id = ? ORDER BY piece_offset", (upload_id,)
        )
        return [UploadPiece(str(u), int(o), int(n), str(b)) for u, o, n, b in rows]

    def delete_upload(self, owner_id: str, upload_id: str) -> list[UploadPiece] | None:
        with self._write() as run:
            gone = run("DELETE FROM sv_uploads WHERE upload_id = ? AND owner_id = ?", (upload_id, owner_id)).rowcount
            if gone != 1:
                return None
            rows = run(
                f"SELECT {_PIECE_COLUMNS} FROM sv_upload_pieces WHERE upload_id = ? ORDER BY piece_offset",
                (upload_id,),
            ).fetchall()
            run("DELETE FROM sv_upload_pieces WHERE upload_id = ?", (upload_id,))
            return [UploadPiece(str(u), int(o), int(n), str(b)) for u, o, n, b in rows]

    def expired_uploads(self, now: float) -> list[tuple[str, str]]:
        rows = self._query("SELECT owner_id, upload_id FROM sv_uploads WHERE expires_at <= ?", (now,))
        return [(str(o), str(u)) for o, u in rows]

    def all_upload_blob_ids(self) -> set[tuple[str, str]]:
        rows = self._query(
            "SELECT u.owner_id, p.blob_id FROM sv_upload_pieces p JOIN sv_uploads u ON u.upload_id = p.upload_id"
        )
        return {(str(o), str(b)) for o, b in rows}

    # -- named state ------------------------------------------------------------

    def get_state(self, name: str) -> str | None:
        rows = self._query("SELECT value FROM sv_state WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def set_state(self, name: str, value: str | None) -> None:
        if value is None:
            self._execute("DELETE FROM sv_state WHERE name = ?", (name,))
        else:
            self._execute(
                "INSERT INTO sv_state (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    def add_state(self, name: str, value: str) -> str:
        with self._write() as run:
            run("INSERT INTO sv_state (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (name, value))
            return str(run("SELECT value FROM sv_state WHERE name = ?", (name,)).fetchone()[0])


class SqliteMetadataStore(SqlMetadataStore):
    """The embedded default: one SQLite file in WAL mode, a connection per
    thread, every commit fsync'd (synchronous=FULL): an answered upload
    survives a power cut."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            # Created private before SQLite opens it (no window at the umask;
            # its -wal and -shm files take the database's mode).  Only when
            # absent: closing any descriptor of a database this process has
            # open would drop SQLite's POSIX locks on it.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as error:
            raise MetadataError(f"cannot open the metadata database {self.path}: {error}") from error
        self._create_schema()

    def describe(self) -> str:
        return f"sqlite:{self.path.resolve()}"

    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
        except (sqlite3.Error, OSError) as error:
            raise MetadataError(f"cannot open the metadata database {self.path}: {error}") from error
        return connection

    @contextmanager
    def _transaction(self, connection: Any, write: bool) -> Iterator[Any]:
        cursor = connection.cursor()
        if not write:  # autocommit: one statement, one snapshot, no lock
            yield cursor
            return
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
