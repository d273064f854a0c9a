# -*- test-case-name: tests.stores.test_metadata_postgres -*-
"""PostgreSQL for the metadata store, so that several vault nodes can share
users, sessions and the archive index (C{--metadata postgresql://...}).

The SQL is L{securevault.stores.metadata.SqlMetadataStore}'s, shared with SQLite;
this module says how to connect (psycopg 3, a connection per worker thread,
autocommit outside explicit transactions), keeps two nodes starting at once
from racing on the schema, and survives a connection that died while idle (a
server restart, a terminated backend, an idle-session timeout) by
reconnecting once where that is safe.  Nothing here ever names the password.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from securevault.stores.metadata import ADDED_COLUMNS, TABLES, MetadataError, SqlMetadataStore

Connection = psycopg.Connection[TupleRow]

# Serialises schema creation across every node on one database ("svschema").
SCHEMA_LOCK = 0x7376_7363_6865_6D61
# Login attempts are serialised per client certificate under an advisory
# lock keyed by a hash of this prefix and the fingerprint.
LOGIN_LOCK_PREFIX = b"securevault login attempts\0"

# Advisory lock keys of the per-owner quota check: a 64-bit hash of the
# owner id under this prefix (see quota_lock_key).
QUOTA_LOCK_PREFIX = b"securevault/v1/quota\x00"

CONNECT_TIMEOUT = 10  # seconds, when neither the DSN nor PGCONNECT_TIMEOUT sets one
APPLICATION_NAME = "securevault"  # in pg_stat_activity, unless the DSN names one

_BROKEN: tuple[type[BaseException], ...] = (psycopg.OperationalError, psycopg.InterfaceError)
_SECRET_PARAMETERS = ("password", "sslpassword")


def login_lock_key(certificate: str) -> int:
    """The advisory lock (a signed 64-bit key) serialising one certificate's
    login attempts."""
    digest = hashlib.sha256(LOGIN_LOCK_PREFIX + certificate.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _describe(parameters: dict[str, Any]) -> str:
    """C{postgresql://user@host:port/dbname}, never the password."""

    def given(key: str, variable: str) -> str:
        return str(parameters.get(key) or os.environ.get(variable) or "")

    user = given("user", "PGUSER")
    host = str(parameters.get("host") or parameters.get("hostaddr") or os.environ.get("PGHOST") or "")
    port = given("port", "PGPORT")
    dbname = given("dbname", "PGDATABASE") or user
    if ":" in host and "," not in host and not host.startswith("/"):
        host = f"[{host}]"  # IPv6
    elif host.startswith("/"):
        host = quote(host, safe="")  # a Unix socket directory
    where = f"{quote(user, safe='')}@{host}" if user else host
    if port:
        where += f":{port}"
    return f"postgresql://{where}/{quote(dbname, safe='')}"


def quota_lock_key(owner_id: str) -> int:
    """The advisory lock key that serialises C{owner_id}'s quota checks: the
    same on every node (a hash, not Python's salted C{hash}), a signed
    64-bit integer as C{pg_advisory_xact_lock} takes.  Two owners sharing a
    key only wait for each other; they never see each other's usage."""
    digest = hashlib.sha256(QUOTA_LOCK_PREFIX + owner_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresMetadataStore(SqlMetadataStore):
    """L{MetadataStore} on PostgreSQL, shared by every node given one DSN.

    The DSN is a libpq connection string, URL (C{postgresql://...}) or
    C{key=value}; libpq's environment variables (C{PGPASSWORD},
    C{PGSSLMODE}, ...) and C{~/.pgpass} apply as usual.
    """

    placeholder = "%s"
    integrity_errors: tuple[type[BaseException], ...] = (psycopg.IntegrityError,)

    def __init__(self, dsn: str) -> None:
        try:
            self._parameters = conninfo_to_dict(dsn)
        except psycopg.Error:
            # libpq's parse errors may quote the DSN, password and all.
            raise MetadataError(
                "the PostgreSQL metadata DSN is not a valid libpq connection string"
                " (not repeated here: it may hold a password)"
            ) from None
        super().__init__()
        self._dsn = dsn
        self._description = _describe(self._parameters)
        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return self._description

    # -- connecting ---------------------------------------------------------

    def _redact(self, text: str) -> str:
        for key in _SECRET_PARAMETERS:
            secret = self._parameters.get(key)
            if secret:
                text = text.replace(str(secret), "***")
        return text

    def _connect(self) -> Connection:
        defaults: dict[str, Any] = {}
        if "connect_timeout" not in self._parameters and not os.environ.get("PGCONNECT_TIMEOUT"):
            defaults["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in self._parameters and not os.environ.get("PGAPPNAME"):
            defaults["application_name"] = APPLICATION_NAME
        try:
            return psycopg.connect(self._dsn, autocommit=True, **defaults)
        except psycopg.Error as error:
            reason = re.sub(r"\s+", " ", self._redact(str(error))).strip()
            # "from None": the cause would be printed with the traceback, and
            # nothing from libpq leaves here unredacted.
            raise MetadataError(f"cannot connect to the metadata database {self._description}: {reason}") from None

    def _connection(self) -> Connection:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is not None and connection.closed:  # closed is also true once broken
            self._forget_connection()
        result: Connection = super()._connection()
        return result

    def _begin(self, stack: ExitStack) -> Connection:
        """BEGIN on this thread's connection, entered on C{stack}.  If that
        connection turns out to have died while idle (psycopg then marks it
        closed), BEGIN once more on a fresh one: nothing has run yet."""
        connection = self._connection()
        try:
            stack.enter_context(connection.transaction())
            return connection
        except _BROKEN:
            if not connection.closed:
                raise
        self._forget_connection()
        connection = self._connection()
        stack.enter_context(connection.transaction())
        return connection

    # -- transactions ---------------------------------------------------------

    def _broken_errors(self) -> tuple[type[BaseException], ...]:
        return _BROKEN

    def _is_full(self, error: BaseException) -> bool:
        return getattr(error, "sqlstate", None) == "53100"  # disk_full

    @contextmanager
    def _transaction(self, connection: Any, write: bool) -> Iterator[Any]:
        # The connection is autocommit: a read is one statement on its own;
        # a write is BEGIN ... COMMIT (ROLLBACK on any exception), and its
        # BEGIN may replace the connection given (see _begin).  Once a
        # statement has run, a failure is the caller's: a write is never
        # repeated (its commit may or may not have happened), a read is, once,
        # by _query.
        with ExitStack() as stack:
            if write:
                connection = self._begin(stack)
            try:
                yield stack.enter_context(connection.cursor())
            except _BROKEN:
                self._local.lost = connection.closed
                raise

    def _query(self, statement: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read; repeated once, on a fresh connection, if it failed because
        this thread's connection had died (a read is always safe to repeat)."""
        self._local.lost = False
        try:
            return super()._query(statement, parameters)
        except MetadataError:
            if not getattr(self._local, "lost", False):
                raise
        return super()._query(statement, parameters)

    def _lock_owner(self, run: Any, owner_id: str) -> None:
        """A transaction-scoped advisory lock per owner: READ COMMITTED alone
        would let two nodes both read the usage before either inserts.  The
        statements after it see every row committed before it was granted."""
        run("SELECT pg_advisory_xact_lock(?)", (quota_lock_key(owner_id),))

    def _serialise_certificate(self, run: Any, certificate: str) -> None:
        """READ COMMITTED lets two transactions count the same rows and both
        insert: a transaction-scoped advisory lock on the certificate makes
        the count and the insert of one attempt exclusive, on every node,
        and the count (a later statement) sees every attempt committed
        before the lock was granted."""
        run("SELECT pg_advisory_xact_lock(?)", (login_lock_key(certificate),))

    # -- the schema -----------------------------------------------------------

    def _has_column(self, run: Any, table: str, column: str) -> bool:
        """Whether C{table} (in the search path's first schema) has C{column}.
        C{run} is a transaction's runner or L{_query}."""
        result = run(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?",
            (table, column),
        )
        rows = result if isinstance(result, list) else result.fetchall()
        return bool(rows[0][0])

    def _create_schema(self) -> None:
        """Create the tables unless they are there.  Nodes starting at once
        would race in C{CREATE TABLE IF NOT EXISTS}, so the DDL runs under a
        transaction-scoped advisory lock; when the schema already exists no
        DDL runs at all, so the vault's role needs no CREATE privilege then
        (a table added by a newer version is created at its first start)."""
        missing = [table for table in TABLES if not self._query("SELECT to_regclass(?) IS NOT NULL", (table,))[0][0]]
        missing += [
            f"{table}.{column}"
            for table, column, _ in ADDED_COLUMNS
            if not self._has_column(self._query, table, column)
        ]
        if missing or self.get_state("schema") is None:
            with self._write() as run:
                run("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
                self._run_schema(run)
        self._check_schema_version()
