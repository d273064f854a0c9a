"""The metadata store contract on PostgreSQL, and what only PostgreSQL has:
nodes starting at once, connections that die, credentials kept out of sight.

Needs a server: see L{tests.support.postgres}.
"""

from __future__ import annotations

import secrets
import threading
import time
import traceback

import psycopg
from psycopg.conninfo import make_conninfo

from securevault.stores.metadata import ArchiveRecord, LoginAttempt, MetadataError, MetadataStore, OverQuota, UserRecord
from securevault.stores.metadata_postgres import PostgresMetadataStore, quota_lock_key
from tests.stores.contracts import MetadataStoreContract
from tests.support.postgres import postgres_dsn
from tests.support.testcase import SyncTestCase

PASSWORD = "secret-pw"


class PostgresContractTests(MetadataStoreContract, SyncTestCase):
    def make_store(self) -> MetadataStore:
        self.dsn = postgres_dsn(self)
        return PostgresMetadataStore(self.dsn)

    def reopen_store(self, store: MetadataStore) -> MetadataStore:
        return PostgresMetadataStore(self.dsn)


class PostgresTests(SyncTestCase):
    def _store(self, dsn: str) -> PostgresMetadataStore:
        store = PostgresMetadataStore(dsn)
        self.addCleanup(store.close)
        return store

    def _terminate(self, dsn: str, application_name: str) -> int:
        """End every backend of that application, as a server restart would."""
        with psycopg.connect(dsn, autocommit=True, application_name="securevault-tests") as admin:
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                " WHERE application_name = %s AND pid <> pg_backend_pid()",
                (application_name,),
            ).fetchall()
        self.assertTrue(rows and all(ok for (ok,) in rows), rows)
        return len(rows)

    def _named_dsn(self) -> tuple[str, str]:
        """A fresh schema's DSN whose connections this test alone can find."""
        name = f"sv_test_{secrets.token_hex(6)}"
        return make_conninfo(postgres_dsn(self), application_name=name), name

    def test_nodes_starting_at_once(self) -> None:
        """Two stores creating the schema concurrently both succeed."""
        for _ in range(3):
            dsn = postgres_dsn(self)
            barrier = threading.Barrier(4)
            stores: list[PostgresMetadataStore] = []
            errors: list[BaseException] = []

            def start() -> None:
                try:
                    barrier.wait()
                    stores.append(self._store(dsn))
                except BaseException as error:
                    errors.append(error)

            threads = [threading.Thread(target=start) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.assertEqual(errors, [])
            self.assertEqual(len(stores), 4)
            stores[0].add_user(UserRecord("alice", "a" * 32, "h", "t"))
            self.assertEqual([u.name for u in stores[3].list_users()], ["alice"])
            self.assertEqual(stores[1].get_state("schema"), "1")

    def test_read_after_connections_terminated(self) -> None:
        dsn, name = self._named_dsn()
        store = self._store(dsn)
        store.add_user(UserRecord("alice", "a" * 32, "h", "t"))
        other = threading.Thread(target=store.list_users)  # a second connection
        other.start()
        other.join()
        self.assertEqual(self._terminate(dsn, name), 2)
        self.assertEqual(store.get_user("alice").user_id, "a" * 32)  # type: ignore[union-attr]
        self.assertEqual([u.name for u in store.list_users()], ["alice"])

    def test_write_after_connections_terminated(self) -> None:
        """A transaction that could not even begin is begun again."""
        dsn, name = self._named_dsn()
        store = self._store(dsn)
        self._terminate(dsn, name)
        store.add_user(UserRecord("alice", "a" * 32, "h", "t"))
        self._terminate(dsn, name)
        store.set_state("rotation", "k2")
        self.assertEqual(store.get_state("rotation"), "k2")
        self.assertEqual([u.name for u in store.list_users()], ["alice"])

    def test_connection_lost_mid_transaction(self) -> None:
        """Once a statement has run, the failure is reported, not retried,
        nothing is committed, and the next call reconnects."""
        dsn, name = self._named_dsn()
        store = self._store(dsn)
        with self.assertRaises(MetadataError):
            with store._write() as run:
                run("INSERT INTO sv_state (name, value) VALUES (?, ?)", ("half", "done"))
                self._terminate(dsn, name)
                run("SELECT 1")
        self.assertIsNone(store.get_state("half"))
        store.set_state("whole", "done")
        self.assertEqual(store.get_state("whole"), "done")

    def test_other_errors_are_not_retried(self) -> None:
        store = self._store(postgres_dsn(self))
        with self.assertRaises(psycopg.errors.UndefinedTable):
            store._query("SELECT * FROM sv_no_such_table")
        self.assertEqual(store.list_users(), [])

    def test_unreachable_server(self) -> None:
        """A quick, clear error naming the server and never the password."""
        for dsn in (
            f"host=127.0.0.1 port=1 dbname=vaultdb user=vault password={PASSWORD}",
            f"postgresql://vault:{PASSWORD}@127.0.0.1:1/vaultdb",
        ):
            started = time.monotonic()
            with self.assertRaises(MetadataError) as caught:
                PostgresMetadataStore(dsn)
            self.assertLess(time.monotonic() - started, 5)
            message = str(caught.exception)
            self.assertIn("postgresql://vault@127.0.0.1:1/vaultdb", message)
            self.assertIn("Connection refused", message)
            printed = "".join(traceback.format_exception(caught.exception))
            self.assertNotIn(PASSWORD, printed)

    def test_invalid_dsn_never_echoed(self) -> None:
        for dsn in (f"host=127.0.0.1 password={PASSWORD} port", f"postgresql://vault:{PASSWORD}@[::1/vaultdb"):
            with self.assertRaises(MetadataError) as caught:
                PostgresMetadataStore(dsn)
            self.assertIn("not a valid", str(caught.exception))
            self.assertNotIn(PASSWORD, "".join(traceback.format_exception(caught.exception)))

    def test_describe_has_no_password(self) -> None:
        # the test server trusts every connection, so a password is ignored
        dsn = make_conninfo(postgres_dsn(self), password=PASSWORD)
        store = self._store(dsn)
        description = store.describe()
        self.assertNotIn(PASSWORD, description)
        self.assertTrue(description.startswith("postgresql://"), description)
        info = store._connection().info
        self.assertEqual(description, f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}")

    def test_values_keep_their_types(self) -> None:
        store = self._store(postgres_dsn(self))
        self.assertEqual(store.count_sessions(), 0)
        self.assertIs(type(store.count_sessions()), int)
        self.assertIs(type(store.usage("nobody")), int)
        self.assertIsNone(store.reserve_login_attempt(LoginAttempt("1", "c", "a", 1.5), 0.0, 1, 20))
        self.assertEqual(store.reserve_login_attempt(LoginAttempt("2", "c", "a", 2.5), 0.0, 1, 20), 1.5)

    def test_table_added_by_an_upgrade(self) -> None:
        """A database made before the login-attempts table existed (same
        schema version) gets the table when a store opens it, and keeps its
        data."""
        dsn = postgres_dsn(self)
        old = self._store(dsn)
        old.add_user(UserRecord("alice", "u1", "h", "t"))
        old._execute("DROP TABLE sv_login_attempts")
        store = self._store(dsn)
        self.assertIsNone(store.reserve_login_attempt(LoginAttempt("1", "c", "a", 1.5), 0.0, 5, 20))
        self.assertEqual(store.get_user("alice"), UserRecord("alice", "u1", "h", "t"))

    def test_newer_schema_refused(self) -> None:
        dsn = postgres_dsn(self)
        self._store(dsn).set_state("schema", "99")
        with self.assertRaises(MetadataError) as caught:
            PostgresMetadataStore(dsn)
        self.assertIn("schema version 99", str(caught.exception))

    def test_application_name(self) -> None:
        store = self._store(postgres_dsn(self))
        self.assertEqual(store._query("SHOW application_name"), [("securevault",)])

    def _waiting_for_advisory_lock(self, dsn: str, application_name: str) -> bool:
        """Whether a backend of that application waits for an advisory lock."""
        with psycopg.connect(dsn, autocommit=True, application_name="securevault-tests") as admin:
            rows = admin.execute(
                "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
                " WHERE locktype = 'advisory' AND NOT granted AND application_name = %s",
                (application_name,),
            ).fetchall()
        return bool(rows[0][0])

    def test_quota_check_waits_for_another_nodes_commit(self) -> None:
        """A quota-checked put waits while another node holds the owner's
        quota lock in its own put (here: a row inserted, not yet committed),
        then counts that node's row: the two never both fit in a quota made
        for one."""
        dsn, name = self._named_dsn()
        store = self._store(dsn)
        owner = f"o{secrets.token_hex(4)}"
        outcome: list[BaseException | None] = []

        def put() -> None:
            try:
                store.put_archive(ArchiveRecord(owner, "b" * 32, 2, 600, "k", "{}"), quota=1000)
                outcome.append(None)
            except BaseException as error:
                outcome.append(error)

        with psycopg.connect(dsn, application_name="securevault-tests") as other_node:
            other_node.execute("SELECT pg_advisory_xact_lock(%s)", (quota_lock_key(owner),))
            other_node.execute(
                "INSERT INTO sv_archives (owner_id, archive_id, created_ns, stored_bytes, key_id, document)"
                " VALUES (%s, %s, 1, 600, 'k', '{}')",
                (owner, "a" * 32),
            )
            thread = threading.Thread(target=put)
            thread.start()
            deadline = time.monotonic() + 20
            while thread.is_alive() and not self._waiting_for_advisory_lock(dsn, name):
                self.assertLess(time.monotonic(), deadline, "the put neither waited nor finished")
                time.sleep(0.01)
            other_node.commit()
        thread.join(20)
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], OverQuota)
        self.assertEqual(store.usage(owner), 600)
        self.assertIsNone(store.get_archive(owner, "b" * 32))
