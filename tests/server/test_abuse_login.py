# -*- test-case-name: tests.server.test_abuse_login -*-
"""Attacks on POST /login against a real daemon over real mutual TLS.

A guesser with a client certificate sends wrong passwords in parallel: the
throttle must count them exactly (no more than five guesses checked however
many arrive at once), and must lock out only the guessing certificate, never
the owner's.
"""

from __future__ import annotations

import io
import json
import ssl
import threading
from collections import Counter
from contextlib import redirect_stdout

from securevault.admin.cli import main as admin_main
from securevault.resources.login import login_capacity
from tests.support.daemon import VaultFixture, call, login
from tests.support.testcase import SyncTestCase
from tests.support.tlsclient import PASSWORD

# As many as the login pool takes at once with --threads 16 (a thread per
# core, 9 logins each), at most 20: past that the pool answers 503 busy, a
# limit of its own (tests.server.test_resources).
PARALLEL_GUESSES = min(20, login_capacity(16))
JOIN_SECONDS = 60.0


def login_status(context: ssl.SSLContext, port: int, username: str, password: str) -> int:
    """The status of one login on a new connection."""
    body = json.dumps({"username": username, "password": password}).encode()
    return call(context, port, "POST", "/login", body=body, headers=[("Content-Type", "application/json")]).status


class ParallelGuessTests(SyncTestCase):
    """One daemon (--threads 16) with user alice; the attacker holds the
    development client certificate, the owner another one from the same CA."""

    def setUp(self) -> None:
        self.vault = VaultFixture(self.make_dir())
        self.vault.create()
        # securevault-admin cert client owner, in this process (no second
        # interpreter to start).
        with redirect_stdout(io.StringIO()):
            status = admin_main(["cert", "client", "owner", "--certs-dir", str(self.vault.certs)])
        self.assertEqual(status, 0)
        self.attacker = self.vault.tls_context()
        self.owner = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.vault.certs / "ca.crt"))
        self.owner.load_cert_chain(str(self.vault.certs / "owner.crt"), str(self.vault.certs / "owner.key"))
        daemon = self.vault.start("--threads", "16")
        self.addCleanup(daemon.stop)
        self.port = daemon.wait_listening()

    def test_parallel_wrong_logins_counted_exactly(self) -> None:
        """20 wrong logins for alice (18 on 2 cores) sent at once from one
        certificate: five are checked (401), the others refused unchecked
        (429).  Then
        the right password from that certificate is 429 too, while the right
        password from alice's own certificate logs in."""
        start = threading.Barrier(PARALLEL_GUESSES)
        statuses: list[int] = []
        errors: list[BaseException] = []

        def guess(number: int) -> None:
            try:
                start.wait(timeout=JOIN_SECONDS)
                statuses.append(login_status(self.attacker, self.port, "alice", f"wrong password {number}"))
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=guess, args=(number,)) for number in range(PARALLEL_GUESSES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN_SECONDS)
        self.assertEqual(errors, [])
        self.assertEqual(Counter(statuses), Counter({401: 5, 429: PARALLEL_GUESSES - 5}))
        self.assertEqual(login_status(self.attacker, self.port, "alice", PASSWORD), 429)
        self.assertTrue(login(self.owner, self.port, "alice", PASSWORD))
