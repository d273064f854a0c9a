# -*- test-case-name: tests.server.test_resources -*-
"""The HTTP contract of shared/API.md, endpoint by endpoint, status by status.

Almost every test goes through the full pipeline (L{VaultClient}): raw HTTP
bytes into a real L{VaultSite} channel over a fake mutual-TLS transport, so
that VaultRequest's body handling runs exactly as it does for real traffic.
"""

from __future__ import annotations

import base64
import builtins
import gc
import hashlib
import io
import json
import os
import re
import tracemalloc
import uuid
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, TypeVar
from urllib.parse import quote

from twisted.internet.defer import maybeDeferred
from twisted.logger import capturedLogs
from twisted.web.server import NOT_DONE_YET

from securevault import __version__
from securevault.admin.cli import main as admin_main
from securevault.core.archive import ArchiveInfo, rfc3339
from securevault.core.keybinding import default_master_key
from securevault.core.keys import save_keyring
from securevault.resources.health import HealthResource
from securevault.resources.login import login_capacity, login_threads
from securevault.resources.logout import LogoutResource
from securevault.server.app import VaultApp
from securevault.server.pools import run_inline
from securevault.storage import SecureFileStorage
from tests.support.app import (
    ClientCert,
    Connection,
    ManualRunner,
    Response,
    VaultClient,
    add_user,
    corrupt_archive,
    default_client,
    dummy_request,
    encode_request,
    make_app,
    make_client,
    make_expiring_client,
    owner_files,
    parse_responses,
)
from tests.support.testcase import SyncTestCase

ALICE_PASSWORD = "alice correct horse"
BOB_PASSWORD = "bob battery staple"
JSON_TYPE = "application/json; charset=utf-8"
RFC3339 = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
HEX32 = re.compile(r"\A[0-9a-f]{32}\Z")
OCTETS = (b"Content-Type", b"application/octet-stream")

F = TypeVar("F", bound=Callable[..., Any])


def known_bug(reason: str) -> Callable[[F], F]:
    """Skip a test that pins a bug in securevault/ (trial's C{skip})."""

    def mark(test: F) -> F:
        setattr(test, "skip", "bug: " + reason)
        return test

    return mark


class _VaultTestCase(SyncTestCase):
    """A fresh vault with users alice and bob, each with a client identity."""

    app_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.app, self.clock = make_app(self, **self.app_options)
        self.alice_id = add_user(self.app, "alice", ALICE_PASSWORD)
        self.bob_id = add_user(self.app, "bob", BOB_PASSWORD)
        self.alice_cert = default_client(0)
        self.bob_cert = default_client(1)
        self.client = VaultClient(self.app, self.clock, self)

    # -- helpers -----------------------------------------------------------

    def alice(self) -> str:
        return self.client.session("alice", ALICE_PASSWORD, self.alice_cert)

    def bob(self) -> str:
        return self.client.session("bob", BOB_PASSWORD, self.bob_cert)

    def upload_json(self, session: str, filename: str, content: bytes, cert: ClientCert | None = None) -> Response:
        document = {"filename": filename, "content": base64.b64encode(content).decode("ascii")}
        return self.client.post_json(b"/upload-file", document, session=session, cert=cert)

    def upload_raw(
        self,
        session: str | None,
        filename: str,
        content: bytes,
        *,
        cert: ClientCert | None = None,
        chunk_size: int | None = None,
        in_query: bool = False,
    ) -> Response:
        encoded = quote(filename, safe="").encode("ascii")
        if in_query:
            return self.client.request(
                b"POST",
                b"/upload-file?filename=" + encoded,
                body=content,
                headers=[OCTETS],
                session=session,
                cert=cert,
                chunk_size=chunk_size,
            )
        return self.client.request(
            b"POST",
            b"/upload-file",
            body=content,
            headers=[OCTETS, (b"X-Filename", encoded)],
            session=session,
            cert=cert,
            chunk_size=chunk_size,
        )

    def stored(self, response: Response) -> str:
        """The archive id of a 201 upload."""
        self.assertEqual(response.status, 201, response.body)
        return str(response.json()["id"])

    def download(self, session: str, query: bytes, *, raw: bool = False, cert: ClientCert | None = None) -> Response:
        headers = [(b"Accept", b"application/octet-stream")] if raw else []
        return self.client.get(b"/download-file?" + query, session=session, headers=headers, cert=cert)

    def list_files(self, session: str, cert: ClientCert | None = None) -> list[dict[str, Any]]:
        response = self.client.get(b"/get-files", session=session, cert=cert)
        self.assertEqual(response.status, 200, response.body)
        return list(response.json()["files"])

    def assert_error(self, response: Response, status: int, code: str) -> dict[str, Any]:
        """An error response of the contract: status, JSON, code, message."""
        self.assertEqual((response.status, response.body and response.json().get("error")), (status, code))
        self.assertEqual(response.header("Content-Type"), JSON_TYPE)
        self.assertEqual(response.header("Cache-Control"), "no-store")
        self.assertEqual(response.header("X-Content-Type-Options"), "nosniff")
        body: dict[str, Any] = response.json()
        self.assertIsInstance(body["message"], str)
        self.assertTrue(body["message"])
        expected = {"error", "message", "request_id"} if status == 500 else {"error", "message"}
        self.assertEqual(set(body), expected)
        if status == 500:
            self.assertRegex(body["request_id"], r"\A[0-9a-zA-Z-]{8,}\Z")
        return body

    def assert_invalid_session(self, response: Response) -> None:
        self.assert_error(response, 401, "invalid_session")
        self.assertEqual(response.header("WWW-Authenticate"), "Bearer")


class HealthTests(_VaultTestCase):
    """GET /health."""

    def test_health(self) -> None:
        """/health answers 200 {"status": "ok", "version"} without a session."""
        response = self.client.get(b"/health")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json(), {"status": "ok", "version": __version__})
        self.assertRegex(__version__, r"\A\d+\.\d+\.\d+\Z")
        self.assertEqual(response.header("Content-Type"), JSON_TYPE)
        self.assertEqual(response.header("Content-Length"), str(len(response.body)))

    def test_health_one_resource(self) -> None:
        """HealthResource alone, on a DummyRequest with a fake TLS transport,
        writes the same JSON body."""
        request = dummy_request(self.alice_cert, b"GET", b"/health")
        result = HealthResource(self.app).render(request)  # type: ignore[arg-type]
        self.assertEqual(result, NOT_DONE_YET)
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(json.loads(b"".join(request.written)), {"status": "ok", "version": __version__})
        self.assertEqual(request.finished, 1)

    def test_head(self) -> None:
        """HEAD /health is 200 with the JSON headers and no body."""
        connection = self.client.connect()
        connection.send(b"HEAD /health HTTP/1.1\r\nHost: vault.test\r\n\r\n")
        head, _, rest = connection.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"\r\nContent-Type: application/json; charset=utf-8", head)
        self.assertEqual(rest, b"")

    def test_pipelined(self) -> None:
        """Several requests sent at once on one connection get their responses
        in order."""
        connection = self.client.connect(self.alice_cert)
        login = json.dumps({"username": "alice", "password": ALICE_PASSWORD}).encode()
        connection.send(
            encode_request(b"GET", b"/health")
            + encode_request(b"POST", b"/login", [(b"Content-Type", b"application/json")], login)
            + encode_request(b"GET", b"/nope")
            + encode_request(b"GET", b"/get-files")
        )
        responses = connection.responses()
        self.assertEqual([r.status for r in responses], [200, 200, 404, 401])
        self.assertEqual(responses[0].json()["status"], "ok")
        self.assertIn("session_id", responses[1].json())


class LoginTests(_VaultTestCase):
    """POST /login: sessions, bad bodies, wrong credentials, throttling."""

    def test_login(self) -> None:
        """A good login answers 200 with a UUID4 session id and an RFC 3339
        UTC expiry (the idle timeout, 30 min, from now)."""
        response = self.client.login("alice", ALICE_PASSWORD)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("Content-Type"), JSON_TYPE)
        body = response.json()
        self.assertEqual(set(body), {"session_id", "expires_at"})
        parsed = uuid.UUID(body["session_id"])
        self.assertEqual(parsed.version, 4)
        self.assertEqual(str(parsed), body["session_id"])
        self.assertRegex(body["expires_at"], RFC3339)
        self.assertEqual(body["expires_at"], rfc3339(self.clock.seconds() + 30 * 60))

    def test_sessions_are_distinct(self) -> None:
        """Two logins give two different sessions, both usable."""
        first, second = self.alice(), self.alice()
        self.assertNotEqual(first, second)
        self.list_files(first)
        self.list_files(second)

    def test_bad_bodies(self) -> None:
        """A body that is not JSON, not an object, lacks a field or has a
        non-string field is 400 bad_request."""
        bodies: list[bytes] = [
            b"",
            b"not json",
            b"\xff\xfe{",
            b"[1, 2]",
            b'"alice"',
            b"null",
            b"{}",
            json.dumps({"username": "alice"}).encode(),
            json.dumps({"password": ALICE_PASSWORD}).encode(),
            json.dumps({"username": 1, "password": ALICE_PASSWORD}).encode(),
            json.dumps({"username": "alice", "password": None}).encode(),
            json.dumps({"username": ["alice"], "password": ALICE_PASSWORD}).encode(),
            json.dumps({"username": "alice", "password": {"x": 1}}).encode(),
        ]
        for body in bodies:
            response = self.client.request(
                b"POST", b"/login", body=body, headers=[(b"Content-Type", b"application/json")]
            )
            self.assert_error(response, 400, "bad_request")

    def test_bad_bodies_are_not_failures(self) -> None:
        """Malformed login bodies do not count towards the throttle."""
        for _ in range(6):
            self.assert_error(self.client.request(b"POST", b"/login", body=b"{}"), 400, "bad_request")
        self.assertEqual(self.client.login("alice", ALICE_PASSWORD).status, 200)

    def test_invalid_credentials_identical(self) -> None:
        """An unknown user and a wrong password get the same 401
        invalid_credentials answer, byte for byte (but the Date)."""
        unknown = self.client.login("mallory", ALICE_PASSWORD)
        wrong = self.client.login("alice", "not the password")
        self.assert_error(unknown, 401, "invalid_credentials")
        self.assert_error(wrong, 401, "invalid_credentials")
        self.assertEqual(unknown.body, wrong.body)

        def without_date(response: Response) -> list[tuple[bytes, bytes]]:
            return [(k, v) for k, v in response.headers if k.lower() != b"date"]

        self.assertEqual(without_date(unknown), without_date(wrong))

    def test_throttle_per_certificate_and_username(self) -> None:
        """Five failures for alice from certificate B lock B out of alice for
        5 minutes: even the right password from B gets 429 with Retry-After.
        Alice's own certificate, which has not failed, logs in as alice, and
        B may still log in as bob; after the window B may try alice again."""
        attacker = make_client("attacker")
        for _ in range(5):
            self.assert_error(self.client.login("alice", "wrong password", attacker), 401, "invalid_credentials")
        locked = self.client.login("alice", ALICE_PASSWORD, attacker)
        self.assert_error(locked, 429, "too_many_attempts")
        retry_after = locked.header("Retry-After")
        assert retry_after is not None
        self.assertTrue(0 < int(retry_after) <= 301, retry_after)
        self.assertEqual(self.client.login("alice", ALICE_PASSWORD, self.alice_cert).status, 200)
        self.assertEqual(self.client.login("bob", BOB_PASSWORD, attacker).status, 200)
        self.clock.advance(301)
        self.assertEqual(self.client.login("alice", ALICE_PASSWORD, attacker).status, 200)

    def test_failures_from_many_certificates_never_lock_the_owner(self) -> None:
        """However many other certificates fail for alice, alice's own
        certificate logs in."""
        for index in range(6):
            guesser = make_client(f"guesser{index}")
            for _ in range(5):
                self.assert_error(self.client.login("alice", "wrong password", guesser), 401, "invalid_credentials")
            self.assert_error(self.client.login("alice", ALICE_PASSWORD, guesser), 429, "too_many_attempts")
        self.assertEqual(self.client.login("alice", ALICE_PASSWORD, self.alice_cert).status, 200)

    def test_throttle_hostile_usernames(self) -> None:
        """A username the metadata store could not keep as it is (a lone
        surrogate, a NUL, thousands of characters) is a plain 401, never a
        500, and is still throttled after five failures from a certificate;
        it locks no one else."""
        for index, hostile in enumerate(["\ud800admin", "\udfffadmin", "ali\0ce", "x" * 5000]):
            attacker = make_client(f"hostile{index}")
            for _ in range(5):
                response = self.client.login(hostile, "wrong password", attacker)
                self.assert_error(response, 401, "invalid_credentials")
            locked = self.client.login(hostile, "wrong password", attacker)
            self.assert_error(locked, 429, "too_many_attempts")
        self.assertEqual(self.client.login("alice", ALICE_PASSWORD).status, 200)

    def test_retry_after_counts_down(self) -> None:
        """Retry-After is the time left in the window, in whole seconds."""
        for _ in range(5):
            self.client.login("alice", "wrong password")
        self.clock.advance(100)
        locked = self.client.login("alice", ALICE_PASSWORD)
        self.assert_error(locked, 429, "too_many_attempts")
        self.assertIn(locked.header("Retry-After"), ("200", "201"))

    def test_four_failures_allowed(self) -> None:
        """Four failures are not enough to lock a username, and logins that
        succeed never count: after any number of them the fifth failure is
        still to come."""
        for _ in range(4):
            self.client.login("alice", "wrong password")
        for _ in range(10):
            self.assertEqual(self.client.login("alice", ALICE_PASSWORD).status, 200)
        self.assert_error(self.client.login("alice", "wrong password"), 401, "invalid_credentials")
        self.assert_error(self.client.login("alice", ALICE_PASSWORD), 429, "too_many_attempts")

    def test_throttle_per_certificate(self) -> None:
        """Twenty failures from one client certificate, spread over usernames
        so that none reaches five, lock that certificate: even a good login
        from it is 429, while another certificate still logs in."""
        attacker = make_client("attacker")
        for index in range(20):
            self.assert_error(
                self.client.login(f"guess{index % 5}", "wrong password", attacker), 401, "invalid_credentials"
            )
        locked = self.client.login("bob", BOB_PASSWORD, attacker)
        self.assert_error(locked, 429, "too_many_attempts")
        self.assertIsNotNone(locked.header("Retry-After"))
        self.assertEqual(self.client.login("bob", BOB_PASSWORD, self.bob_cert).status, 200)
        self.clock.advance(301)
        self.assertEqual(self.client.login("bob", BOB_PASSWORD, attacker).status, 200)

    def test_unlock_clears_the_count(self) -> None:
        """securevault-admin user unlock NAME, run against the live vault's
        store, lifts the lock on that username for every certificate at
        once; other usernames stay locked."""
        certificates = [self.alice_cert, make_client("second")]
        for cert in certificates:
            for _ in range(5):
                self.client.login("alice", "wrong password", cert)
                self.client.login("bob", "wrong password", cert)
            self.assert_error(self.client.login("alice", ALICE_PASSWORD, cert), 429, "too_many_attempts")
        # The admin command needs the vault's master key (rows are MACed under it).
        save_keyring(default_master_key(self.app.config.data_dir), self.app.storage.keyring)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = admin_main(["--data-dir", str(self.app.config.data_dir), "user", "unlock", "alice"])
        self.assertEqual((status, err.getvalue()), (0, ""))
        self.assertIn("unlocked user alice", out.getvalue())
        for cert in certificates:
            self.assertEqual(self.client.login("alice", ALICE_PASSWORD, cert).status, 200)
            self.assert_error(self.client.login("bob", BOB_PASSWORD, cert), 429, "too_many_attempts")

    def test_bind_user_cn(self) -> None:
        """With --bind-user cn, a certificate may log in only as the user its
        common name names; otherwise 401 invalid_credentials."""
        app, clock = make_app(self, bind_user="cn")
        add_user(app, "alice", ALICE_PASSWORD)
        client = VaultClient(app, clock, self)
        self.assert_error(client.login("alice", ALICE_PASSWORD, self.alice_cert), 401, "invalid_credentials")
        self.assertEqual(client.login("alice", ALICE_PASSWORD, make_client("alice")).status, 200)

    def test_oversized_login_body(self) -> None:
        """A login body declared larger than 64 KiB is refused 413 at once."""
        connection = self.client.connect()
        connection.send(encode_request(b"POST", b"/login", [(b"Content-Length", b"1000000")]))
        responses = connection.responses()
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], 413, "too_large")
        self.assertTrue(connection.closed_by_server)


class LoginPoolTests(_VaultTestCase):
    """Logins run in their own bounded pool: while it is behind, other
    endpoints are answered, and logins past its bound are refused at once
    with 503 busy."""

    def setUp(self) -> None:
        super().setUp()
        self.session = self.alice()
        self.runner = ManualRunner()
        self.app.run_hashing = self.runner

    def start_login(self, username: str = "alice", password: str = ALICE_PASSWORD) -> Connection:
        """A login sent on its own connection, not answered yet."""
        connection = self.client.connect(self.alice_cert)
        body = json.dumps({"username": username, "password": password}).encode()
        connection.send(encode_request(b"POST", b"/login", [(b"Content-Type", b"application/json")], body))
        return connection

    def test_other_endpoints_answered_while_logins_wait(self) -> None:
        """With the login pool stuck (its work never runs), GET /health and
        GET /get-files are still answered."""
        waiting = [self.start_login() for _ in range(3)]
        self.assertEqual([connection.responses() for connection in waiting], [[], [], []])
        self.assertEqual(len(self.runner.pending), 3)
        self.assertEqual(self.client.get(b"/health").status, 200)
        self.assertEqual(self.list_files(self.session), [])
        self.runner.run_all()
        self.assertEqual([[r.status for r in connection.responses()] for connection in waiting], [[200]] * 3)

    def test_busy_past_the_bound(self) -> None:
        """Past the login pool's bound (9 logins with one thread: one running,
        eight queued) a login is answered 503 busy with Retry-After: 1 at
        once, without being counted as a failure; a login whose client left
        keeps its place until the pool is done with it; once the pool
        catches up, logins are taken again."""
        waiting = [self.start_login() for _ in range(9)]
        refused = self.client.login("alice", "wrong password")
        self.assert_error(refused, 503, "busy")
        self.assertEqual(refused.header("Retry-After"), "1")
        self.assertEqual(len(self.runner.pending), 9)
        waiting.pop().close()
        self.assert_error(self.client.login("alice", ALICE_PASSWORD), 503, "busy")
        self.assertEqual(self.client.get(b"/health").status, 200)
        self.runner.run_all()
        self.assertEqual([[r.status for r in connection.responses()] for connection in waiting], [[200]] * 8)
        late = self.start_login()
        self.assertEqual(len(self.runner.pending), 1)
        self.runner.run_all()
        self.assertEqual([r.status for r in late.responses()], [200])
        # The refused attempts counted for nothing: five failures still
        # needed for a lock.
        self.app.run_hashing = run_inline
        for _ in range(4):
            self.client.login("alice", "wrong password")
        self.assertEqual(self.client.login("alice", ALICE_PASSWORD).status, 200)


class LogoutTests(_VaultTestCase):
    """POST /logout."""

    def test_logout(self) -> None:
        """Logout answers 204 with no body; the session is then 401."""
        session = self.alice()
        response = self.client.request(b"POST", b"/logout", session=session)
        self.assertEqual(response.status, 204)
        self.assertEqual(response.body, b"")
        self.assertEqual(response.header("Cache-Control"), "no-store")
        self.assertEqual(response.header("X-Content-Type-Options"), "nosniff")
        self.assert_invalid_session(self.client.get(b"/get-files", session=session))
        self.assert_invalid_session(self.client.request(b"POST", b"/logout", session=session))
        self.assertEqual(self.app.sessions.count(), 0)

    def test_logout_ends_only_that_session(self) -> None:
        """Logging out one session leaves the user's other sessions alive."""
        first, second = self.alice(), self.alice()
        self.assertEqual(self.client.request(b"POST", b"/logout", session=first).status, 204)
        self.list_files(second)

    def test_logout_one_resource(self) -> None:
        """LogoutResource alone, on a DummyRequest: 204 and the store forgets
        the session."""
        session = self.alice()
        request = dummy_request(
            self.alice_cert, b"POST", b"/logout", headers={b"authorization": b"Bearer " + session.encode()}
        )
        LogoutResource(self.app).render(request)  # type: ignore[arg-type]
        self.assertEqual(request.responseCode, 204)
        self.assertEqual(self.app.sessions.count(), 0)


class SessionTests(_VaultTestCase):
    """How a session is presented, bound, and how it ends."""

    def protected_requests(self, archive_id: str) -> list[tuple[bytes, bytes, bytes | None, list[tuple[bytes, bytes]]]]:
        """Every endpoint that needs a session, with a valid request."""
        upload = json.dumps({"filename": "x", "content": "eA=="}).encode()
        return [
            (b"POST", b"/logout", b"", []),
            (b"POST", b"/upload-file", upload, [(b"Content-Type", b"application/json")]),
            (b"POST", b"/upload-file", b"raw bytes", [OCTETS, (b"X-Filename", b"x")]),
            (b"GET", b"/get-files", None, []),
            (b"GET", b"/download-file?id=" + archive_id.encode(), None, []),
            (b"GET", b"/download-file?filename=kept", None, [(b"Accept", b"application/octet-stream")]),
            (
                b"POST",
                b"/delete-file",
                json.dumps({"id": archive_id}).encode(),
                [(b"Content-Type", b"application/json")],
            ),
        ]

    def assert_all_refused(
        self, headers: list[tuple[bytes, bytes]], *, cert: ClientCert | None = None, query: bytes = b""
    ) -> None:
        """Every protected request with these credentials is 401, and alice's
        archives are untouched."""
        session = self.alice()
        self.upload_json(session, "kept", b"data")
        before = self.list_files(session)
        for method, target, body, extra in self.protected_requests(before[0]["id"]):
            if query:
                target += (b"&" if b"?" in target else b"?") + query
            response = self.client.request(method, target, body=body, headers=extra + headers, cert=cert)
            self.assert_invalid_session(response)
        self.assertEqual(self.list_files(session), before)

    def test_no_session(self) -> None:
        """Without a session every endpoint but /health and /login is 401
        invalid_session with WWW-Authenticate: Bearer."""
        self.assert_all_refused([])

    def test_unknown_session(self) -> None:
        """An unknown (well-formed) session id is 401 everywhere."""
        self.assert_all_refused([(b"Authorization", b"Bearer " + str(uuid.uuid4()).encode())])

    def test_garbage_session(self) -> None:
        """Malformed Authorization values are 401, not 400 or 500."""
        for value in [b"Bearer", b"Bearer ", b"Basic YWxpY2U6cHc=", b"bearer\xff\xfe", b"Token abc"]:
            response = self.client.get(b"/get-files", headers=[(b"Authorization", value)])
            self.assert_invalid_session(response)

    def test_other_certificate(self) -> None:
        """A session presented over another client certificate is 401."""
        session = self.alice()
        self.assert_all_refused([(b"Authorization", b"Bearer " + session.encode())], cert=self.bob_cert)
        # The rightful holder still uses it.
        self.list_files(session)

    def test_cookie_refused(self) -> None:
        """A session id in a cookie is ignored: 401."""
        session = self.alice().encode()
        for cookie in [b"session_id=" + session, b"session=" + session, b"X-Session-ID=" + session]:
            self.assert_all_refused([(b"Cookie", cookie)])

    def test_query_refused(self) -> None:
        """A session id in the query string is ignored: 401."""
        session = self.alice().encode()
        self.assert_all_refused([], query=b"session_id=" + session)

    def test_x_session_id(self) -> None:
        """X-Session-ID is accepted as well as Authorization: Bearer, and the
        scheme name is case-insensitive."""
        session = self.alice()
        response = self.client.get(b"/get-files", headers=[(b"X-Session-ID", session.encode())])
        self.assertEqual(response.status, 200)
        response = self.client.get(b"/get-files", headers=[(b"Authorization", b"bearer " + session.encode())])
        self.assertEqual(response.status, 200)
        response = self.client.request(
            b"POST",
            b"/upload-file",
            body=b"x",
            headers=[OCTETS, (b"X-Filename", b"raw.txt"), (b"X-Session-ID", session.encode())],
        )
        self.assertEqual(response.status, 201)

    def test_idle_expiry(self) -> None:
        """A session unused for 30 minutes is gone; each use restarts the
        idle timer."""
        session = self.alice()
        self.clock.advance(29 * 60)
        self.list_files(session)
        self.clock.advance(29 * 60)
        self.list_files(session)
        self.clock.advance(30 * 60)
        self.assert_invalid_session(self.client.get(b"/get-files", session=session))
        # Expiry is final, even for the raw upload path.
        self.assert_invalid_session(self.upload_raw(session, "late", b"x"))

    def test_absolute_expiry(self) -> None:
        """A session in constant use still ends 12 hours after login."""
        session = self.alice()
        for _ in range(35):
            self.clock.advance(20 * 60)
            self.list_files(session)
        self.clock.advance(20 * 60)  # 36 * 20 min = 12 h
        self.assert_invalid_session(self.client.get(b"/get-files", session=session))

    def test_certificate_not_after(self) -> None:
        """A session never outlives its client certificate: with a
        certificate valid for 10 more minutes, the session reports that
        expiry and dies with the certificate, before the idle timeout."""
        short = make_expiring_client("short-lived", 600)
        response = self.client.login("alice", ALICE_PASSWORD, short)
        self.assertEqual(response.status, 200)
        body = response.json()
        not_after = short.not_after.timestamp()
        self.assertEqual(body["expires_at"], rfc3339(not_after))
        session = body["session_id"]
        self.clock.advance(not_after - self.clock.seconds() - 60)
        self.list_files(session, cert=short)
        self.clock.advance(61)
        self.assert_invalid_session(self.client.get(b"/get-files", session=session, cert=short))


class UploadTests(_VaultTestCase):
    """POST /upload-file, JSON and raw."""

    def assert_file_info(self, body: dict[str, Any], filename: str, content: bytes) -> None:
        self.assertEqual(set(body), {"id", "filename", "size", "sha256", "created_at"})
        self.assertRegex(body["id"], HEX32)
        self.assertEqual(body["filename"], filename)
        self.assertEqual(body["size"], len(content))
        self.assertEqual(body["sha256"], hashlib.sha256(content).hexdigest())
        self.assertRegex(body["created_at"], RFC3339)

    def assert_round_trip(self, session: str, archive_id: str, filename: str, content: bytes) -> None:
        response = self.download(session, b"id=" + archive_id.encode(), raw=True)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, content)
        self.assertEqual([f["filename"] for f in self.list_files(session) if f["id"] == archive_id], [filename])

    def test_json_upload(self) -> None:
        """A JSON upload is 201 with id, filename, size, sha256, created_at."""
        session = self.alice()
        content = os.urandom(3000)
        response = self.upload_json(session, "report.pdf", content)
        self.assertEqual(response.status, 201)
        self.assertEqual(response.header("Content-Type"), JSON_TYPE)
        self.assert_file_info(response.json(), "report.pdf", content)
        self.assertEqual(response.json()["created_at"], rfc3339(self.clock.seconds()))
        self.assert_round_trip(session, response.json()["id"], "report.pdf", content)

    def test_json_upload_charset(self) -> None:
        """application/json with a charset parameter is a JSON upload too."""
        session = self.alice()
        body = json.dumps({"filename": "a.txt", "content": "aGk="}).encode()
        response = self.client.request(
            b"POST",
            b"/upload-file",
            body=body,
            headers=[(b"Content-Type", b"application/json; charset=utf-8")],
            session=session,
        )
        self.assert_file_info(response.json(), "a.txt", b"hi")

    def test_empty_file(self) -> None:
        """An empty file is stored and comes back empty, in both forms."""
        session = self.alice()
        for response in [self.upload_json(session, "empty-json", b""), self.upload_raw(session, "empty-raw", b"")]:
            self.assertEqual(response.status, 201, response.body)
            self.assert_file_info(response.json(), response.json()["filename"], b"")
            archive_id = response.json()["id"].encode()
            raw = self.download(session, b"id=" + archive_id, raw=True)
            self.assertEqual((raw.status, raw.body, raw.header("Content-Length")), (200, b"", "0"))
            self.assertEqual(self.download(session, b"id=" + archive_id).json()["content"], "")

    def test_raw_upload_x_filename(self) -> None:
        """A raw upload named by X-Filename (percent-encoded UTF-8) is 201 and
        keeps the name exactly, spaces and combining marks included."""
        session = self.alice()
        content = os.urandom(5000)
        filename = " Re\u0301sume\u0301 (final) 100%.pdf "
        response = self.upload_raw(session, filename, content)
        self.assertEqual(response.status, 201, response.body)
        self.assert_file_info(response.json(), filename, content)
        self.assert_round_trip(session, response.json()["id"], filename, content)

    def test_raw_upload_query_filename(self) -> None:
        """A raw upload may name the file in the filename query parameter."""
        session = self.alice()
        content = b"query named"
        response = self.upload_raw(session, "plain & simple=1.txt", content, in_query=True)
        self.assertEqual(response.status, 201, response.body)
        self.assert_file_info(response.json(), "plain & simple=1.txt", content)

    def test_raw_upload_query_filename_utf8(self) -> None:
        """A non-ASCII name in the filename query parameter (percent-encoded
        UTF-8) is kept exactly; one that is not UTF-8 is 400."""
        session = self.alice()
        response = self.upload_raw(session, "naïve €.txt", b"x", in_query=True)
        self.assertEqual(response.status, 201, response.body)
        self.assertEqual(response.json()["filename"], "naïve €.txt")
        for value in [b"%FF", b"a%C3", b"a%C2%85b", quote("é" * 128).encode()]:
            response = self.client.request(
                b"POST", b"/upload-file?filename=" + value, body=b"data", headers=[OCTETS], session=session
            )
            self.assert_error(response, 400, "invalid_filename")

    def test_raw_upload_chunked(self) -> None:
        """A raw upload with chunked transfer-encoding is stored whole."""
        session = self.alice()
        content = os.urandom(300_000)
        response = self.upload_raw(session, "chunked.bin", content, chunk_size=7001)
        self.assertEqual(response.status, 201, response.body)
        self.assert_file_info(response.json(), "chunked.bin", content)
        self.assert_round_trip(session, response.json()["id"], "chunked.bin", content)

    def test_raw_upload_large(self) -> None:
        """A raw upload of several MiB (several pool blocks) round-trips."""
        session = self.alice()
        content = os.urandom(3 * 1024 * 1024 + 17)
        response = self.upload_raw(session, "large.bin", content)
        self.assert_file_info(response.json(), "large.bin", content)
        self.assert_round_trip(session, response.json()["id"], "large.bin", content)

    def test_same_name_twice(self) -> None:
        """Uploading the same filename twice creates two archives."""
        session = self.alice()
        first = self.stored(self.upload_json(session, "dup.txt", b"one"))
        second = self.stored(self.upload_raw(session, "dup.txt", b"two"))
        self.assertNotEqual(first, second)
        self.assertEqual(sorted(f["id"] for f in self.list_files(session)), sorted([first, second]))

    def test_longest_names(self) -> None:
        """Names of exactly 255 UTF-8 bytes are accepted in both forms."""
        session = self.alice()
        for name in ["a" * 255, "é" * 127 + "a", "€" * 85]:
            self.assertEqual(len(name.encode()), 255)
            self.assertEqual(self.upload_json(session, name, b"x").json()["filename"], name)
            self.assertEqual(self.upload_raw(session, name, b"x").json()["filename"], name)

    INVALID_NAMES = [
        "",
        ".",
        "..",
        "a/b",
        "/etc/passwd",
        "a\\b",
        "a\x00b",
        "a\x01b",
        "a\nb",
        "a\x7fb",
        "a\x85b",
        "a\x9fb",
        "a" * 256,
        "é" * 128,
    ]

    def test_invalid_filename_json(self) -> None:
        """Invalid names in a JSON upload are 400 invalid_filename, and
        nothing is stored."""
        session = self.alice()
        for name in self.INVALID_NAMES + ["\ud800"]:
            self.assert_error(self.upload_json(session, name, b"data"), 400, "invalid_filename")
        self.assertEqual(self.list_files(session), [])
        self.assertEqual(owner_files(self.app, self.alice_id), [])

    def test_invalid_filename_raw_header(self) -> None:
        """Invalid names in X-Filename, including percent-encodings that are
        not UTF-8, are 400 invalid_filename before the body is read."""
        session = self.alice()
        encoded = [quote(name, safe="").encode() for name in self.INVALID_NAMES]
        encoded += [b"a/b", b"a\\b", b"%2e%2e", b"%2E", b"%FF", b"a%C3", b"%ED%A0%80", b"%C0%AE%C0%AE"]
        for value in encoded:
            connection = self.client.connect()
            connection.send(
                encode_request(
                    b"POST",
                    b"/upload-file",
                    [
                        OCTETS,
                        (b"X-Filename", value),
                        (b"Authorization", b"Bearer " + session.encode()),
                        (b"Content-Length", b"100000"),
                    ],
                )
            )
            responses = connection.responses()
            self.assertEqual(len(responses), 1, value)
            self.assert_error(responses[0], 400, "invalid_filename")
        self.assertEqual(owner_files(self.app, self.alice_id), [])

    def test_invalid_filename_raw_query(self) -> None:
        """Invalid names in the filename query parameter are 400
        invalid_filename."""
        session = self.alice()
        # Non-ASCII ones: see test_raw_upload_query_filename_utf8.
        encoded = [quote(name, safe="").encode() for name in self.INVALID_NAMES if name.isascii()]
        for value in encoded + [b"a/b", b"..", b"a\\b"]:
            response = self.client.request(
                b"POST", b"/upload-file?filename=" + value, body=b"data", headers=[OCTETS], session=session
            )
            self.assert_error(response, 400, "invalid_filename")
        self.assertEqual(owner_files(self.app, self.alice_id), [])

    def test_raw_upload_without_name(self) -> None:
        """A raw upload with no name at all is refused with 400."""
        response = self.client.request(b"POST", b"/upload-file", body=b"data", headers=[OCTETS], session=self.alice())
        self.assertEqual(response.status, 400)

    def test_bad_json_upload(self) -> None:
        """A JSON upload of the wrong shape or with invalid base64 is 400
        bad_request."""
        session = self.alice()
        bodies: list[bytes] = [
            b"",
            b"{not json",
            b"[]",
            b'"x"',
            json.dumps({"filename": "a"}).encode(),
            json.dumps({"content": "eA=="}).encode(),
            json.dumps({"filename": 7, "content": "eA=="}).encode(),
            json.dumps({"filename": "a", "content": 7}).encode(),
            json.dumps({"filename": "a", "content": None}).encode(),
            json.dumps({"filename": "a", "content": "not base64!"}).encode(),
            json.dumps({"filename": "a", "content": "eA="}).encode(),
            json.dumps({"filename": "a", "content": "eA==\n"}).encode(),
            json.dumps({"filename": "a", "content": "ZW5jb2RlZA==é"}, ensure_ascii=False).encode(),
        ]
        for body in bodies:
            response = self.client.request(
                b"POST", b"/upload-file", body=body, headers=[(b"Content-Type", b"application/json")], session=session
            )
            self.assert_error(response, 400, "bad_request")
        self.assertEqual(owner_files(self.app, self.alice_id), [])

    def test_unsupported_media_type(self) -> None:
        """Other content types, or none, are 415 unsupported_media_type."""
        session = self.alice()
        for headers in [
            [(b"Content-Type", b"text/plain")],
            [(b"Content-Type", b"application/x-www-form-urlencoded")],
            [(b"Content-Type", b"application/jsonx")],
            [],
        ]:
            response = self.client.request(b"POST", b"/upload-file", body=b"data", headers=headers, session=session)
            self.assert_error(response, 415, "unsupported_media_type")

    def test_multipart_is_unsupported(self) -> None:
        """A multipart/form-data upload is 415 unsupported_media_type in JSON,
        like any other unsupported type."""
        response = self.client.request(
            b"POST",
            b"/upload-file",
            body=b"data",
            headers=[(b"Content-Type", b"multipart/form-data; boundary=x")],
            session=self.alice(),
        )
        self.assert_error(response, 415, "unsupported_media_type")

    def test_raw_refused_before_body_without_session(self) -> None:
        """A raw upload without a session is answered 401 as soon as its
        headers are in, and the connection is closed."""
        connection = self.client.connect()
        connection.send(
            encode_request(b"POST", b"/upload-file", [OCTETS, (b"X-Filename", b"x"), (b"Content-Length", b"1000000")])
        )
        responses = connection.responses()
        self.assertEqual(len(responses), 1)
        self.assert_invalid_session(responses[0])
        self.assertTrue(connection.closed_by_server)


class UploadStreamingTests(_VaultTestCase):
    """Raw uploads stream into the pool: back-pressure and disconnects."""

    def raw_head(self, session: str, length: int) -> bytes:
        return encode_request(
            b"POST",
            b"/upload-file",
            [
                OCTETS,
                (b"X-Filename", b"stream.bin"),
                (b"Authorization", b"Bearer " + session.encode()),
                (b"Content-Length", str(length).encode()),
            ],
        )

    def test_back_pressure(self) -> None:
        """While the pool is behind, the connection is paused once over 4 MiB
        are waiting, and resumed when the pool catches up; the file is stored
        whole."""
        session = self.alice()
        runner = ManualRunner()
        self.app.run_blocking = runner
        content = os.urandom(6 * 1024 * 1024)
        connection = self.client.connect()
        connection.send(self.raw_head(session, len(content)))
        piece = 64 * 1024
        for start in range(0, 5 * 1024 * 1024, piece):
            connection.send(content[start : start + piece])
        self.assertEqual(connection.transport.producerState, "paused")
        self.assertEqual(connection.transport.pause_count, 1)
        runner.run_all()
        self.assertEqual(connection.transport.producerState, "producing")
        for start in range(5 * 1024 * 1024, len(content), piece):
            connection.send(content[start : start + piece])
        runner.run_all()
        [response] = connection.responses()
        self.assertEqual(response.status, 201, response.body)
        self.assertEqual(response.json()["sha256"], hashlib.sha256(content).hexdigest())
        self.app.run_blocking = run_inline
        self.assertEqual(self.download(session, b"id=" + response.json()["id"].encode(), raw=True).body, content)

    def test_opening_call_writes_what_arrived(self) -> None:
        """Bytes that arrived while the pool was opening the archive are
        written by that same pool call, not by another trip through the
        reactor: a body that is all there takes the opening call (which
        writes it) and the commit, two calls in all."""
        session = self.alice()
        runner = ManualRunner()
        self.app.run_blocking = runner
        content = os.urandom(3 * 1024 * 1024 + 5)
        connection = self.client.connect()
        connection.send(self.raw_head(session, len(content)))
        for start in range(0, len(content), 64 * 1024):
            connection.send(content[start : start + 64 * 1024])
        self.assertEqual(runner.run_all(), 2)
        [response] = connection.responses()
        self.assertEqual(response.status, 201, response.body)
        self.assertEqual(response.json()["sha256"], hashlib.sha256(content).hexdigest())

    def test_finished_uploads_hold_no_buffers(self) -> None:
        """A finished upload frees its MiB buffers at once, even while its
        request lives on in a reference cycle until the garbage collector
        runs (a tus upload makes a request per PATCH: 18 such buffers, 10 MiB,
        were alive at once in a 256 MiB upload)."""
        session = self.alice()
        content = os.urandom(3 * 1024 * 1024)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(8):
            connection = self.client.connect()
            connection.send(self.raw_head(session, len(content)))
            for start in range(0, len(content), 256 * 1024):
                connection.send(content[start : start + 256 * 1024])
            [response] = connection.responses()
            self.assertEqual(response.status, 201, response.body)
            connection.close()
        held = tracemalloc.get_traced_memory()[0] - before
        self.assertLess(held, 4 * 1024 * 1024)

    def test_disconnect_mid_upload(self) -> None:
        """A client that leaves in the middle of a raw upload leaves no file,
        temporary or not."""
        session = self.alice()
        connection = self.client.connect()
        connection.send(self.raw_head(session, 3 * 1024 * 1024))
        connection.send(os.urandom(2 * 1024 * 1024))
        connection.close()
        self.assertEqual(owner_files(self.app, self.alice_id), [])
        self.assertEqual(self.list_files(session), [])

    def test_disconnect_while_pool_busy(self) -> None:
        """A client that leaves while its blocks are still in the pool leaves
        no file once the pool has finished them."""
        session = self.alice()
        runner = ManualRunner()
        self.app.run_blocking = runner
        connection = self.client.connect()
        connection.send(self.raw_head(session, 3 * 1024 * 1024))
        connection.send(os.urandom(1024 * 1024))
        runner.run_all()
        connection.send(os.urandom(1024 * 1024 + 10))
        connection.close()
        runner.run_all()
        self.assertEqual(owner_files(self.app, self.alice_id), [])

    def test_disconnect_before_commit_finishes(self) -> None:
        """A client that leaves after sending the whole body, while the
        commit is in the pool, leaves no archive behind: nobody saw a 201."""
        session = self.alice()
        runner = ManualRunner()
        self.app.run_blocking = runner
        connection = self.client.connect()
        connection.send(self.raw_head(session, 1000) + os.urandom(1000))
        while runner.pending and runner.pending[0][1].__name__ != "commit":
            result, function, args, kwargs = runner.pending.pop(0)
            maybeDeferred(function, *args, **kwargs).chainDeferred(result)
        self.assertTrue(runner.pending, "the commit is queued")
        connection.close()
        runner.run_all()
        self.assertEqual(connection.responses(), [])
        self.assertEqual(owner_files(self.app, self.alice_id), [])


class ExpectContinueTests(_VaultTestCase):
    """Expect: 100-continue, as curl sends it for large uploads."""

    app_options = {"max_upload_size": 1000}

    def head(self, session: str | None, length: int) -> bytes:
        headers = [
            OCTETS,
            (b"X-Filename", b"c.bin"),
            (b"Expect", b"100-continue"),
            (b"Content-Length", str(length).encode()),
        ]
        if session is not None:
            headers.append((b"Authorization", b"Bearer " + session.encode()))
        return encode_request(b"POST", b"/upload-file", headers)

    def test_continue(self) -> None:
        """An acceptable upload gets 100 Continue, then 201 after the body."""
        connection = self.client.connect()
        connection.send(self.head(self.alice(), 5))
        self.assertEqual(connection.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        connection.send(b"hello")
        [response] = connection.responses()
        self.assertEqual(response.status, 201)

    def test_no_continue_after_refusal(self) -> None:
        """An upload refused from its headers gets only its final response,
        never a 100 Continue after it."""
        for session, length, status in [(self.alice(), 5000, 413), (None, 10, 401)]:
            connection = self.client.connect()
            connection.send(self.head(session, length))
            data = connection.transport.value()
            self.assertTrue(data.startswith(b"HTTP/1.1 %d " % (status,)), data)
            self.assertNotIn(b"100 Continue", data)


class UploadLimitTests(_VaultTestCase):
    """--max-json-body and --max-upload-size, checked as bytes arrive."""

    app_options = {"max_json_body": 1000, "max_upload_size": 2000}

    def headers_only(self, headers: list[tuple[bytes, bytes]], length: int) -> tuple[Any, list[Response]]:
        connection = self.client.connect()
        head = encode_request(b"POST", b"/upload-file", headers + [(b"Content-Length", str(length).encode())])
        connection.send(head)
        return connection, connection.responses()

    def test_json_too_large_declared(self) -> None:
        """A JSON upload whose Content-Length exceeds --max-json-body is 413
        before any body byte is sent, and the connection is closed."""
        session = self.alice().encode()
        connection, responses = self.headers_only(
            [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer " + session)], 1001
        )
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], 413, "too_large")
        self.assertEqual(responses[0].header("Connection"), "close")
        self.assertTrue(connection.closed_by_server)

    def test_json_at_limit(self) -> None:
        """A JSON upload of exactly --max-json-body bytes is accepted."""
        session = self.alice()
        document = {"filename": "x", "content": ""}
        raw = json.dumps(document).encode()
        body = raw[:-1] + b" " * (1000 - len(raw)) + b"}"
        response = self.client.request(
            b"POST", b"/upload-file", body=body, headers=[(b"Content-Type", b"application/json")], session=session
        )
        self.assertEqual(response.status, 201, response.body)

    def test_raw_too_large_declared(self) -> None:
        """A raw upload whose Content-Length exceeds --max-upload-size is 413
        before the body, even before the session is checked."""
        session = self.alice().encode()
        for extra in [[(b"Authorization", b"Bearer " + session)], []]:
            connection, responses = self.headers_only([OCTETS, (b"X-Filename", b"big")] + extra, 2001)
            self.assertEqual(len(responses), 1)
            self.assert_error(responses[0], 413, "too_large")
            self.assertTrue(connection.closed_by_server)
        self.assertEqual(owner_files(self.app, self.alice_id), [])

    def test_raw_at_limit(self) -> None:
        """A raw upload of exactly --max-upload-size bytes is accepted."""
        response = self.upload_raw(self.alice(), "full", os.urandom(2000))
        self.assertEqual(response.status, 201, response.body)

    def test_raw_chunked_too_large(self) -> None:
        """A chunked raw upload is cut off with 413 as soon as it crosses
        --max-upload-size; the connection is closed and nothing is kept."""
        session = self.alice().encode()
        connection = self.client.connect()
        head = encode_request(
            b"POST",
            b"/upload-file",
            [
                OCTETS,
                (b"X-Filename", b"big"),
                (b"Authorization", b"Bearer " + session),
                (b"Transfer-Encoding", b"chunked"),
            ],
        )
        connection.send(head)
        connection.send(b"%x\r\n%s\r\n" % (1500, b"a" * 1500))
        self.assertEqual(connection.responses(), [])
        connection.send(b"%x\r\n%s\r\n" % (1500, b"b" * 1500))
        responses = connection.responses()
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], 413, "too_large")
        self.assertTrue(connection.closed_by_server)
        connection.send(b"0\r\n\r\n")
        self.assertEqual(len(connection.responses()), 1)
        connection.close()
        self.assertEqual(owner_files(self.app, self.alice_id), [])
        self.assertEqual(self.list_files(session.decode()), [])

    def test_json_chunked_too_large(self) -> None:
        """A chunked JSON upload crossing --max-json-body is 413."""
        session = self.alice()
        body = json.dumps({"filename": "x", "content": base64.b64encode(b"z" * 900).decode()}).encode()
        response = self.client.request(
            b"POST",
            b"/upload-file",
            body=body,
            headers=[(b"Content-Type", b"application/json")],
            session=session,
            chunk_size=300,
        )
        self.assert_error(response, 413, "too_large")
        self.assertEqual(owner_files(self.app, self.alice_id), [])


class QuotaTests(_VaultTestCase):
    """--quota: 507 insufficient_storage, nothing partial left."""

    app_options = {"quota": 4096}

    def test_json_over_quota(self) -> None:
        """A JSON upload that does not fit the quota is 507 and leaves no
        file in the owner's directory."""
        session = self.alice()
        self.assert_error(self.upload_json(session, "big", os.urandom(20_000)), 507, "insufficient_storage")
        self.assertEqual(owner_files(self.app, self.alice_id), [])
        self.assertEqual(self.list_files(session), [])

    def test_raw_over_quota(self) -> None:
        """A raw upload that does not fit the quota is 507 and leaves no file
        in the owner's directory, whether it fails at commit or mid-body."""
        session = self.alice()
        for size in [20_000, 3 * 1024 * 1024]:
            response = self.upload_raw(session, "big", os.urandom(size))
            self.assert_error(response, 507, "insufficient_storage")
            self.assertEqual(owner_files(self.app, self.alice_id), [])

    def test_quota_fills_up(self) -> None:
        """Uploads fit until the quota is used; the one that does not fit is
        507 and the earlier ones stay; the quota is per user."""
        session = self.alice()
        first = self.stored(self.upload_raw(session, "first", os.urandom(2500)))
        self.assert_error(self.upload_raw(session, "second", os.urandom(2500)), 507, "insufficient_storage")
        self.assertEqual([f["id"] for f in self.list_files(session)], [first])
        self.assertEqual(len(owner_files(self.app, self.alice_id)), 2)  # .body and .meta
        self.stored(self.upload_raw(self.bob(), "bobs", os.urandom(2500), cert=self.bob_cert))


class GetFilesTests(_VaultTestCase):
    """GET /get-files."""

    def test_empty(self) -> None:
        """A user with no archives gets an empty list."""
        response = self.client.get(b"/get-files", session=self.alice())
        self.assertEqual(response.json(), {"files": []})

    def test_newest_first(self) -> None:
        """Files are listed newest first with the five public fields."""
        session = self.alice()
        ids = []
        for name in ["a", "b", "c"]:
            ids.append(self.stored(self.upload_json(session, name, name.encode())))
            self.clock.advance(1)
        # Same second: the later upload is still listed first.
        ids.append(self.stored(self.upload_raw(session, "d", b"d")))
        ids.append(self.stored(self.upload_raw(session, "e", b"e")))
        files = self.list_files(session)
        self.assertEqual([f["id"] for f in files], ids[::-1])
        self.assertEqual([f["filename"] for f in files], ["e", "d", "c", "b", "a"])
        for entry in files:
            self.assertEqual(set(entry), {"id", "filename", "size", "sha256", "created_at"})
            self.assertEqual(entry["sha256"], hashlib.sha256(entry["filename"].encode()).hexdigest())

    def test_only_own(self) -> None:
        """Each user sees only their own archives."""
        alice, bob = self.alice(), self.bob()
        mine = self.stored(self.upload_json(alice, "alice.txt", b"a"))
        theirs = self.stored(self.upload_json(bob, "bob.txt", b"b", cert=self.bob_cert))
        self.assertEqual([f["id"] for f in self.list_files(alice)], [mine])
        self.assertEqual([f["id"] for f in self.list_files(bob, cert=self.bob_cert)], [theirs])


class DownloadTests(_VaultTestCase):
    """GET /download-file."""

    def test_json_download(self) -> None:
        """The default form is JSON with id, filename, size, sha256 and the
        base64 content."""
        session = self.alice()
        content = os.urandom(10_000)
        archive_id = self.stored(self.upload_raw(session, "photo.jpg", content))
        response = self.download(session, b"id=" + archive_id.encode())
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("Content-Type"), JSON_TYPE)
        self.assertEqual(response.header("Content-Length"), str(len(response.body)))
        body = response.json()
        self.assertEqual(set(body), {"id", "filename", "size", "sha256", "content"})
        self.assertEqual(
            (body["id"], body["filename"], body["size"], body["sha256"]),
            (archive_id, "photo.jpg", len(content), hashlib.sha256(content).hexdigest()),
        )
        self.assertEqual(base64.b64decode(body["content"], validate=True), content)

    def test_json_download_streamed(self) -> None:
        """A JSON download over 1 MiB (streamed as base64) has the right
        Content-Length and content."""
        session = self.alice()
        content = os.urandom((1 << 20) + 1001)
        archive_id = self.stored(self.upload_raw(session, "big.bin", content))
        response = self.download(session, b"id=" + archive_id.encode())
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        self.assertEqual(response.header("Content-Length"), str(len(response.body)))
        self.assertEqual(base64.b64decode(response.json()["content"], validate=True), content)

    def test_raw_download(self) -> None:
        """With Accept: application/octet-stream the bytes come raw, with
        Content-Length, Content-Disposition filename*=UTF-8'' and ETag."""
        session = self.alice()
        content = os.urandom(70_000)
        filename = 'résumé "final"; v2.pdf'
        archive_id = self.stored(self.upload_json(session, filename, content))
        response = self.download(session, b"id=" + archive_id.encode(), raw=True)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, content)
        self.assertEqual(response.header("Content-Type"), "application/octet-stream")
        self.assertEqual(response.header("Content-Length"), str(len(content)))
        self.assertEqual(
            response.header("Content-Disposition"), "attachment; filename*=UTF-8''" + quote(filename, safe="")
        )
        self.assertEqual(response.header("ETag"), '"' + hashlib.sha256(content).hexdigest() + '"')
        self.assertEqual(response.header("Cache-Control"), "no-store")
        self.assertEqual(response.header("X-Content-Type-Options"), "nosniff")

    def test_by_filename(self) -> None:
        """filename= picks the newest archive with exactly that name."""
        session = self.alice()
        self.upload_json(session, "notes.txt", b"old")
        self.clock.advance(5)
        newest = self.stored(self.upload_json(session, "notes.txt", b"new"))
        self.upload_json(session, "notes.txt ", b"other name")
        response = self.download(session, b"filename=notes.txt")
        self.assertEqual(response.status, 200)
        self.assertEqual((response.json()["id"], base64.b64decode(response.json()["content"])), (newest, b"new"))
        raw = self.download(session, b"filename=" + quote("notes.txt ").encode(), raw=True)
        self.assertEqual(raw.body, b"other name")
        self.assert_error(self.download(session, b"filename=NOTES.TXT"), 404, "not_found")

    def test_neither_or_both(self) -> None:
        """Neither or both of id and filename (or one given twice) is 400."""
        session = self.alice()
        archive_id = self.stored(self.upload_json(session, "a", b"a")).encode()
        for query in [
            b"",
            b"other=1",
            b"id=" + archive_id + b"&filename=a",
            b"id=" + archive_id + b"&id=" + archive_id,
        ]:
            self.assert_error(self.download(session, query), 400, "bad_request")
            self.assert_error(self.download(session, query, raw=True), 400, "bad_request")

    def test_not_found(self) -> None:
        """An unknown id, a malformed one and another user's archive all get
        the same 404 body."""
        alice, bob = self.alice(), self.bob()
        theirs = self.stored(self.upload_json(bob, "bob.txt", b"secret", cert=self.bob_cert))
        bodies = set()
        for query in [
            b"id=" + uuid.uuid4().hex.encode(),
            b"id=..%2F..%2Fusers.json",
            b"id=..%2F..%2Fvault.db",
            b"id=" + theirs.encode(),
            b"filename=bob.txt",
        ]:
            for raw in (False, True):
                response = self.download(alice, query, raw=raw)
                self.assert_error(response, 404, "not_found")
                bodies.add(response.body)
        self.assertEqual(len(bodies), 1)

    def test_integrity_error(self) -> None:
        """A corrupted archive body is 500 integrity_error with a request_id,
        in JSON form and raw form, and no content byte is sent."""
        session = self.alice()
        content = b"top secret plaintext " * 50
        archive_id = self.stored(self.upload_json(session, "c.txt", content))
        corrupt_archive(self.app, self.alice_id, archive_id)
        request_ids = set()
        for raw in (False, True):
            response = self.download(session, b"id=" + archive_id.encode(), raw=raw)
            body = self.assert_error(response, 500, "integrity_error")
            self.assertNotIn(b"top secret", response.body)
            request_ids.add(body["request_id"])
        self.assertEqual(len(request_ids), 2)
        # By filename too.
        self.assert_error(self.download(session, b"filename=c.txt", raw=True), 500, "integrity_error")

    def test_integrity_error_after_headers(self) -> None:
        """A raw download whose later block fails authentication is aborted:
        headers went out, the body is cut short, and every byte sent is
        authentic."""
        session = self.alice()
        content = os.urandom(3 * 1024 * 1024)
        archive_id = self.stored(self.upload_raw(session, "big.bin", content))
        corrupt_archive(self.app, self.alice_id, archive_id)
        connection = self.client.connect()
        connection.send(
            encode_request(
                b"GET",
                b"/download-file?id=" + archive_id.encode(),
                [(b"Accept", b"application/octet-stream"), (b"Authorization", b"Bearer " + session.encode())],
            )
        )
        [response] = connection.responses()
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        self.assertTrue(connection.transport.aborted)
        self.assertTrue(0 < len(response.body) < len(content))
        self.assertEqual(response.body, content[: len(response.body)])

    def test_large_json_integrity_error(self) -> None:
        """A JSON download over 1 MiB is authenticated whole before any byte
        is sent: corruption at the end is still a clean 500."""
        session = self.alice()
        content = os.urandom((1 << 20) + 5000)
        archive_id = self.stored(self.upload_raw(session, "big.bin", content))
        corrupt_archive(self.app, self.alice_id, archive_id)
        self.assert_error(self.download(session, b"id=" + archive_id.encode()), 500, "integrity_error")


class DeleteTests(_VaultTestCase):
    """POST /delete-file."""

    def delete(self, session: str, archive_id: Any, cert: ClientCert | None = None) -> Response:
        return self.client.post_json(b"/delete-file", {"id": archive_id}, session=session, cert=cert)

    def test_delete(self) -> None:
        """Delete is 204 with no body; the archive is then 404 everywhere."""
        session = self.alice()
        archive_id = self.stored(self.upload_json(session, "gone.txt", b"bye"))
        response = self.delete(session, archive_id)
        self.assertEqual((response.status, response.body), (204, b""))
        self.assert_error(self.delete(session, archive_id), 404, "not_found")
        self.assert_error(self.download(session, b"id=" + archive_id.encode()), 404, "not_found")
        self.assertEqual(self.list_files(session), [])
        self.assertEqual(owner_files(self.app, self.alice_id), [])

    def test_delete_other_users(self) -> None:
        """Deleting another user's archive is the same 404 as a missing one,
        and the archive stays."""
        alice, bob = self.alice(), self.bob()
        theirs = self.stored(self.upload_json(bob, "bob.txt", b"b", cert=self.bob_cert))
        other = self.delete(alice, theirs)
        missing = self.delete(alice, uuid.uuid4().hex)
        self.assert_error(other, 404, "not_found")
        self.assertEqual(other.body, missing.body)
        self.assertEqual([f["id"] for f in self.list_files(bob, cert=self.bob_cert)], [theirs])

    def test_bad_body(self) -> None:
        """A delete body that is not {"id": <str>} is 400 bad_request."""
        session = self.alice()
        for body in [b"", b"nope", b"[]", b"{}", b'{"id": 5}', b'{"id": null}']:
            response = self.client.request(
                b"POST", b"/delete-file", body=body, headers=[(b"Content-Type", b"application/json")], session=session
            )
            self.assert_error(response, 400, "bad_request")


class RoutingTests(_VaultTestCase):
    """Unknown paths, wrong methods, headers on every response, 500s."""

    def test_unknown_path(self) -> None:
        """An unknown path is a JSON 404 not_found."""
        for target in [b"/", b"/nope", b"/HEALTH", b"/upload", b"//health", b"/favicon.ico", b"/nope?x=1"]:
            self.assert_error(self.client.get(target), 404, "not_found")
            self.assert_error(self.client.request(b"POST", target, body=b"{}"), 404, "not_found")

    def test_paths_match_exactly(self) -> None:
        """Extra path segments or a trailing slash are 404: /health/x,
        /login/, /get-files/x, /download-file/."""
        session = self.alice()
        for method, target in [
            (b"GET", b"/health/x"),
            (b"GET", b"/health/"),
            (b"POST", b"/login/"),
            (b"GET", b"/login/"),
            (b"GET", b"/get-files/x"),
            (b"GET", b"/download-file/?id=x"),
            (b"POST", b"/logout/"),
        ]:
            response = self.client.request(method, target, body=b"{}" if method == b"POST" else None, session=session)
            self.assert_error(response, 404, "not_found")
        self.list_files(session)  # /logout/ must not have ended the session

    def test_wrong_method(self) -> None:
        """A known path with the wrong method is 405 method_not_allowed with
        an Allow header."""
        session = self.alice()
        cases = [
            (b"GET", b"/login", "POST"),
            (b"PUT", b"/login", "POST"),
            (b"GET", b"/logout", "POST"),
            (b"GET", b"/upload-file", "POST"),
            (b"POST", b"/get-files", "GET"),
            (b"DELETE", b"/get-files", "GET"),
            (b"POST", b"/download-file?id=x", "GET"),
            (b"GET", b"/delete-file", "POST"),
            (b"DELETE", b"/delete-file", "POST"),
            (b"POST", b"/health", "GET"),
        ]
        for method, target, allowed in cases:
            response = self.client.request(method, target, body=b"{}" if method != b"GET" else None, session=session)
            self.assert_error(response, 405, "method_not_allowed")
            allow = response.header("Allow")
            assert allow is not None
            self.assertIn(allowed, [part.strip() for part in allow.split(",")])
            self.assertNotIn(method.decode(), [part.strip() for part in allow.split(",")])

    def test_headers_on_every_response(self) -> None:
        """Every response carries Cache-Control: no-store and
        X-Content-Type-Options: nosniff, and every response with a body but
        the raw download is application/json; charset=utf-8."""
        session = self.alice()
        self.client.get(b"/health")
        self.client.login("alice", "wrong password")
        self.client.request(b"POST", b"/login", body=b"[]")
        archive_id = self.stored(self.upload_json(session, "h.txt", b"headers"))
        self.stored(self.upload_raw(session, "raw.txt", b"headers"))
        self.upload_raw(session, "..", b"x")
        self.client.request(
            b"POST", b"/upload-file", body=b"x", headers=[(b"Content-Type", b"text/plain")], session=session
        )
        self.client.get(b"/get-files", session=session)
        self.client.get(b"/get-files")
        self.download(session, b"id=" + archive_id.encode())
        self.download(session, b"id=" + archive_id.encode(), raw=True)
        self.download(session, b"")
        self.download(session, b"id=" + uuid.uuid4().hex.encode())
        self.client.get(b"/nope")
        self.client.get(b"/login")
        self.client.post_json(b"/delete-file", {"id": archive_id}, session=session)
        self.client.request(b"POST", b"/logout", session=session)
        statuses = set()
        for method, target, response in self.client.history:
            statuses.add(response.status)
            where = (method, target, response.status)
            self.assertEqual(response.header("Cache-Control"), "no-store", where)
            self.assertEqual(response.header("X-Content-Type-Options"), "nosniff", where)
            if response.header("Content-Type") == "application/octet-stream":
                self.assertEqual(target, b"/download-file?id=" + archive_id.encode())
            elif response.status == 204:
                self.assertEqual(response.body, b"")
            else:
                self.assertEqual(response.header("Content-Type"), JSON_TYPE, where)
                response.json()
        self.assertEqual(statuses, {200, 201, 204, 400, 401, 404, 405, 415})

    def test_no_server_banner(self) -> None:
        """Responses do not reveal the server software's version."""
        response = self.client.get(b"/health")
        self.assertNotIn("Twisted", response.header("Server") or "")

    def test_internal_error(self) -> None:
        """An unexpected exception is a 500 internal_error whose body has a
        request_id and neither traceback, exception nor path; the traceback
        is logged with the same request_id."""

        class ExplodingStorage(SecureFileStorage):
            """A fake whose listing fails unexpectedly."""

            def list(self, owner_id: str) -> builtins.list[ArchiveInfo]:
                raise RuntimeError("disk on fire at /srv/secret/internal/path.py")

        app, clock = make_app(self, storage_class=ExplodingStorage)
        add_user(app, "alice", ALICE_PASSWORD)
        client = VaultClient(app, clock, self)
        session = client.session("alice", ALICE_PASSWORD)
        with capturedLogs() as events:
            response = client.get(b"/get-files", session=session)
        body = self.assert_error(response, 500, "internal_error")
        for secret in [b"Traceback", b"RuntimeError", b"disk on fire", b"/srv", b".py"]:
            self.assertNotIn(secret, response.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0].get("request_id"), body["request_id"])


class HelperTests(SyncTestCase):
    """The response parser of tests.support.app."""

    def test_parse_chunked_and_pipelined(self) -> None:
        """Chunked and Content-Length responses back to back are split; a
        cut-short last body is marked incomplete."""
        data = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n\r\n12345"
        )
        responses = parse_responses(data)
        self.assertEqual(
            [(r.status, r.body, r.complete) for r in responses],
            [(200, b"abcde", True), (204, b"", True), (201, b"12345", False)],
        )

    def test_app_clock(self) -> None:
        """make_app's clock starts at the wall-clock time, so certificate
        lifetimes and sessions agree; identities differ."""
        app, clock = make_app(self)
        self.assertIsInstance(app, VaultApp)
        self.assertGreater(clock.seconds(), 1_700_000_000)
        self.assertNotEqual(default_client(0).fingerprint, default_client(1).fingerprint)


class AnonymousBodyTests(_VaultTestCase):
    """Without a session, nobody makes the server hold a large body."""

    def test_json_upload_without_session_refused_before_body(self) -> None:
        """A JSON upload larger than a small request (64 KiB) is answered 401
        invalid_session from its headers when there is no live session, and
        the connection is closed: an anonymous client cannot make the server
        buffer up to --max-json-body."""
        connection = self.client.connect()
        connection.send(
            encode_request(
                b"POST", b"/upload-file", [(b"Content-Type", b"application/json"), (b"Content-Length", b"500000")]
            )
        )
        responses = connection.responses()
        self.assertEqual(len(responses), 1)
        self.assert_error(responses[0], 401, "invalid_session")
        self.assertTrue(connection.closed_by_server)

    def test_small_json_upload_without_session_is_read_then_refused(self) -> None:
        """A small JSON upload without a session is read and answered 401 in
        the usual way (the connection stays open)."""
        response = self.client.post_json(b"/upload-file", {"filename": "a", "content": ""}, session=None)
        self.assert_error(response, 401, "invalid_session")


class LoginPoolSizeTests(SyncTestCase):
    def test_one_thread_per_core_within_threads(self) -> None:
        """The login pool has a thread per core, never more than --threads,
        never none: on 2 cores with --threads 2, two hashes run at once."""
        self.assertEqual(login_threads(2, cores=2), 2)
        self.assertEqual(login_threads(16, cores=2), 2)
        self.assertEqual(login_threads(2, cores=8), 2)
        self.assertEqual(login_threads(1, cores=1), 1)
        self.assertEqual(login_capacity(2), login_threads(2) * 9)
