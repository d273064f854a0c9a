"""A fresh PostgreSQL schema per test, on the server named by
C{SECUREVAULT_TEST_POSTGRES}.

Start a throwaway server with C{.ci/postgres} (it prints the DSN) and export
it as C{SECUREVAULT_TEST_POSTGRES}; without it the PostgreSQL tests skip,
unless C{SECUREVAULT_TEST_REQUIRE_BACKENDS} is set (CI), when they fail.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.trial.unittest import SkipTest, SynchronousTestCase

ENVIRONMENT = "SECUREVAULT_TEST_POSTGRES"
REQUIRE = "SECUREVAULT_TEST_REQUIRE_BACKENDS"


def _admin(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    connection = psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="securevault-tests")
    connection.execute("SET lock_timeout = '10s'")
    return connection


def _drop(dsn: str, schema: str) -> None:
    with _admin(dsn) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def postgres_dsn(testcase: SynchronousTestCase) -> str:
    """A DSN whose C{search_path} is a new, empty schema, dropped after the
    test (tests run in parallel under C{trial -j}, so each gets its own).

    Call it before creating stores on it: cleanups run last-in first-out,
    so the stores' C{close} then runs before the schema is dropped.
    """
    dsn = os.environ.get(ENVIRONMENT, "").strip()
    if not dsn:
        message = (
            f"no PostgreSQL to test against: start one with .ci/postgres (it prints a DSN) "
            f"and export {ENVIRONMENT}=<that DSN>"
        )
        if os.environ.get(REQUIRE, "").strip() not in ("", "0"):
            testcase.fail(f"{message} ({REQUIRE} is set, so this must not be skipped)")
        raise SkipTest(message)
    schema = f"sv_test_{secrets.token_hex(8)}"
    try:
        with _admin(dsn) as connection:
            connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    except psycopg.Error as error:
        testcase.fail(f"cannot create a schema on the PostgreSQL at {ENVIRONMENT}: {error}")
    testcase.addCleanup(_drop, dsn, schema)
    options = conninfo_to_dict(dsn).get("options") or ""
    return make_conninfo(dsn, options=f"{options} -c search_path={schema}".strip())


def postgres_url(testcase: SynchronousTestCase) -> str:
    """The test schema's DSN as a postgresql:// URL (what --metadata takes)."""
    parameters = conninfo_to_dict(postgres_dsn(testcase))
    user = quote(str(parameters.get("user", "")), safe="")
    host = parameters.get("host", "127.0.0.1")
    port = parameters.get("port", 5432)
    dbname = quote(str(parameters.get("dbname", "postgres")), safe="")
    options = quote(str(parameters.get("options", "")), safe="")
    return f"postgresql://{user}@{host}:{port}/{dbname}?options={options}"
