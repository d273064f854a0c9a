# -*- test-case-name: tests.test_row_integrity -*-
"""A real daemon refuses user and session rows changed behind its back in
the metadata store (API.md "At rest"; see securevault.core.integrity)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid

from securevault.core.users import hash_password
from securevault.storage import METADATA_FILE
from tests.support.daemon import VaultFixture, call, login
from tests.support.testcase import SyncTestCase
from tests.support.tlsclient import PASSWORD

ATTACKER_PASSWORD = "the attacker's own password"


class RowIntegrityTests(SyncTestCase):
    """Write access to the SQLite file is not a takeover."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        self.context = self.vault.tls_context()
        self.database = self.vault.data / METADATA_FILE

    def sql(self, statement: str, parameters: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.database) as connection:
            rows = connection.execute(statement, parameters).fetchall()
        connection.close()
        return rows

    def login_status(self, port: int, password: str) -> int:
        body = json.dumps({"username": "alice", "password": password}).encode()
        return call(
            self.context, port, "POST", "/login", body=body, headers=[("Content-Type", "application/json")]
        ).status

    def test_replaced_password_hash_is_refused(self) -> None:
        """alice's hash replaced in sv_users while the daemon runs: neither
        the password that fits the new hash nor alice's own logs in (the
        row is refused, as for a wrong password)."""
        daemon = self.vault.start()
        self.addCleanup(daemon.stop)
        port = daemon.wait_listening()
        login(self.context, port)  # alice's row as the vault wrote it works
        self.sql(
            "UPDATE sv_users SET password_hash = ? WHERE name = 'alice'", (hash_password(ATTACKER_PASSWORD, n=2**10),)
        )
        self.assertEqual(self.login_status(port, ATTACKER_PASSWORD), 401)
        self.assertEqual(self.login_status(port, PASSWORD), 401)
        daemon.stop()
        self.assertIn("fails authentication", daemon.output())

    def test_inserted_session_row_is_refused(self) -> None:
        """A session row inserted with the digest of an id the attacker chose
        (its other columns, MAC included, copied from a real session of
        alice) is 401, after a restart that loads the stored sessions too;
        alice's real session still works."""
        daemon = self.vault.start()
        port = daemon.wait_listening()
        real = login(self.context, port)
        daemon.stop()
        chosen = str(uuid.uuid4())
        row = self.sql(
            "SELECT username, user_id, fingerprint, created_at, last_used, expires_at, mac FROM sv_sessions"
        )[0]
        self.sql(
            "INSERT INTO sv_sessions (digest, username, user_id, fingerprint, created_at, last_used, expires_at, mac)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (hashlib.sha256(chosen.encode()).hexdigest(), *row),
        )
        daemon = self.vault.start()
        self.addCleanup(daemon.stop)
        port = daemon.wait_listening()
        self.assertEqual(call(self.context, port, "GET", "/get-files", session=chosen).status, 401)
        self.assertEqual(call(self.context, port, "GET", "/get-files", session=real).status, 200)


class UnknownNameTests(SyncTestCase):
    """A name that is no user's is never written verbatim."""

    def test_password_typed_as_username_is_not_kept(self) -> None:
        """A failed login whose username is a password leaves that string in
        no file under the data directory and nowhere in the daemon's output;
        the failure is still logged, by a keyed digest."""
        vault = VaultFixture(self.make_dir())
        vault.create()
        context = vault.tls_context()
        daemon = vault.start()
        self.addCleanup(daemon.stop)
        port = daemon.wait_listening()
        secret = "Tr0ub4dor-and-3"
        body = json.dumps({"username": secret, "password": PASSWORD}).encode()
        response = call(context, port, "POST", "/login", body=body, headers=[("Content-Type", "application/json")])
        self.assertEqual(response.status, 401)
        daemon.stop()
        self.assertNotIn(secret, daemon.output())
        self.assertIn("unknown user ", daemon.output())
        files = [path for path in vault.data.rglob("*") if path.is_file()]
        self.assertTrue(files)
        for path in files:
            self.assertNotIn(secret.encode(), path.read_bytes(), path)
