# -*- test-case-name: tests.test_session_revocation -*-
"""Sessions end at once, on a real daemon, when the operator says so.

API.md Sessions: a session "ends at once (on every node) when the user's
password changes, when the user is removed, [and] when an operator revokes it
(C{securevault-admin session revoke})".  A single node keeps its sessions in
memory too; the admin command runs in another process, so the daemon watches
the store's revocation mark every second.  Each test logs in over real mutual
TLS, acts through the real C{securevault-admin}, and polls the next request
(a few seconds at most; before, a stolen session still worked 65 s after a
password change).
"""

from __future__ import annotations

import time

from tests.support.daemon import PASSWORD, SyncDaemon, VaultFixture, call, login, run_admin
from tests.support.testcase import SyncTestCase

WAIT_SECONDS = 10.0


class SessionRevocationTests(SyncTestCase):
    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        daemon = SyncDaemon(self.vault.argv(), self.vault.base)
        self.addCleanup(daemon.stop)
        self.port = daemon.wait_listening()
        self.context = self.vault.tls_context()

    def admin(self, *argv: str, stdin: str | None = None) -> str:
        result = run_admin("--data-dir", str(self.vault.data), *argv, stdin=stdin, cwd=self.vault.base)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def status(self, session: str) -> int:
        return call(self.context, self.port, "GET", "/get-files", session=session).status

    def assert_ends(self, session: str) -> None:
        """The session is refused (401) within a few seconds."""
        deadline = time.monotonic() + WAIT_SECONDS
        while self.status(session) != 401:
            self.assertLess(time.monotonic(), deadline, "the session still works")
            time.sleep(0.2)

    def test_password_change_ends_sessions(self) -> None:
        """After C{user passwd}, the old session is refused and the new
        password logs in."""
        session = login(self.context, self.port)
        self.assertEqual(self.status(session), 200)
        output = self.admin("user", "passwd", "alice", "--password-stdin", stdin="a brand new password\n")
        self.assertIn("sessions have ended", output)
        self.assert_ends(session)
        fresh = login(self.context, self.port, password="a brand new password")
        self.assertEqual(self.status(fresh), 200)

    def test_list_and_revoke_one(self) -> None:
        """C{session list} shows each session by an ID that is not the
        session id; C{session revoke ID} ends that one only."""
        first = login(self.context, self.port)
        second = login(self.context, self.port)
        listing = self.admin("session", "list", "--user", "alice")
        rows = [line.split() for line in listing.splitlines()[1:] if "alice" in line]
        self.assertEqual(len(rows), 2)
        self.assertNotIn(first, listing)
        self.assertNotIn(second, listing)
        self.admin("session", "revoke", rows[0][0])
        deadline = time.monotonic() + WAIT_SECONDS
        while sorted([self.status(first), self.status(second)]) != [200, 401]:
            self.assertLess(time.monotonic(), deadline, "no session ended")
            time.sleep(0.2)
        self.assertIn("1 sessions", self.admin("session", "list"))

    def test_revoke_by_user_and_remove(self) -> None:
        """C{session revoke --user} ends all of a user's sessions; removing a
        user ends theirs at once too."""
        sessions = [login(self.context, self.port) for _ in range(3)]
        self.assertIn("ended 3 sessions", self.admin("session", "revoke", "--user", "alice"))
        for session in sessions:
            self.assert_ends(session)
        self.admin("user", "add", "bob", "--password-stdin", stdin=PASSWORD + "\n")
        bob = login(self.context, self.port, "bob")
        self.assertEqual(self.status(bob), 200)
        self.admin("user", "remove", "bob")
        self.assert_ends(bob)

    def test_revoke_errors(self) -> None:
        """A short or unknown ID is a clear error, exit 1."""
        short = run_admin("--data-dir", str(self.vault.data), "session", "revoke", "abc", cwd=self.vault.base)
        self.assertEqual(short.returncode, 1)
        self.assertIn("at least 8 hex digits", short.stderr)
        unknown = run_admin("--data-dir", str(self.vault.data), "session", "revoke", "0" * 12, cwd=self.vault.base)
        self.assertEqual(unknown.returncode, 1)
        self.assertIn("No session starts with", unknown.stderr)
