# -*- test-case-name: tests.server.test_hostile -*-
"""Hostile input never costs availability.

Hypothesis writes hostile requests — random methods, paths, versions and
header lines, control bytes, wrong framing, wrong JSON types, invalid base64,
hostile filenames, sessions in the URL or a cookie — into the full request
pipeline (a real VaultSite channel over a fake mutual-TLS transport, see
L{tests.support.app}).  For every example: no 500, no traceback or source
path in any body, JSON errors where JSON is claimed, no connection left
hanging past the idle timeout, and a fresh connection still gets
C{GET /health} 200.  Explicit tests cover oversized header blocks, pipelining,
slowloris clients and early 413s.
"""

from __future__ import annotations

import json
import re
import uuid
from urllib.parse import quote

from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from twisted.logger import capturedLogs, formatEvent

from securevault.core.audit import AuditLog
from securevault.server.auditing import FLUSH_INTERVAL_SECONDS, AuditTrail
from securevault.server.pools import run_inline
from tests.strategies import (
    REAL_USERNAME,
    HostileRequest,
    contract_allows,
    endpoint_requests,
    hostile_filenames,
    raw_requests,
)
from tests.support.app import (
    ClientCert,
    Response,
    VaultClient,
    add_user,
    encode_request,
    make_app,
    make_client,
    parse_responses,
)
from tests.support.rows import TEST_AUDIT_KEY
from tests.support.testcase import SyncTestCase

PASSWORD = "hostile correct horse"
SOURCE_PATH = re.compile(rb"/securevault/|\.py\b|File \"")
PROTECTED = [
    (b"GET", b"/get-files"),
    (b"GET", b"/download-file?id=" + b"0" * 32),
    (b"POST", b"/logout"),
    (b"POST", b"/delete-file"),
    (b"POST", b"/upload-file"),
    (b"GET", b"/usage"),
]
# Hypothesis budget: about 200 examples in all.
RAW_EXAMPLES = 70
ENDPOINT_EXAMPLES = 60
FILENAME_EXAMPLES = 50
SESSION_EXAMPLES = 20


def note_event(name: str) -> None:
    """Count an outcome in Hypothesis' statistics (inside @given only)."""
    if currently_in_test_context():
        event(name)


class _HostileTestCase(SyncTestCase):
    """One vault per test method; the examples of a test share it, as the
    clients of a real daemon share one site."""

    def setUp(self) -> None:
        self.app, self.clock = make_app(self)
        # A username no strategy produces, so hostile logins never throttle it.
        self.username = "owner-" + uuid.uuid4().hex
        self.user_id = add_user(self.app, self.username, PASSWORD)
        add_user(self.app, REAL_USERNAME, PASSWORD)
        self.client = VaultClient(self.app, self.clock, self)
        self.idle = self.app.config.idle_timeout
        self.cert: ClientCert = make_client("hostile-0")
        self.session = self.client.session(self.username, PASSWORD, self.cert)

    def fresh_session(self) -> str:
        """The session, renewed (with a new certificate, in case hostile logins
        throttled this one) if a hostile request ended or expired it."""
        response = self.client.get(b"/get-files", session=self.session, cert=self.cert)
        if response.status != 200:
            self.cert = make_client(f"hostile-{uuid.uuid4().hex[:8]}")
            self.session = self.client.session(self.username, PASSWORD, self.cert)
        return self.session

    # -- the invariants ------------------------------------------------------

    def exchange(self, data: bytes, pieces: int = 1) -> list[Response]:
        """Write C{data} on a fresh connection (in C{pieces} writes), check
        every response, then check that the connection does not outlive the
        idle timeout and that /health still answers on a new connection."""
        connection = self.client.connect(self.cert)
        step = max(1, len(data) // pieces)
        for start in range(0, len(data), step):
            connection.send(data[start : start + step])
            if connection.closed_by_server:
                break
        responses = parse_responses(connection.transport.value())
        for response in responses:
            self.assert_safe(response)
            note_event(f"status {response.status}")
        if not responses:
            note_event("no response")
        if not connection.closed_by_server:
            self.clock.advance(self.idle + 1)
            self.assertTrue(connection.closed_by_server, f"connection open after the idle timeout: {data[:200]!r}")
        # A real transport reports the close; the fake one is told here.
        connection.close()
        self.assert_healthy()
        return responses

    def assert_safe(self, response: Response) -> None:
        """No 500, no traceback or path, JSON errors with error and message."""
        self.assertNotEqual(response.status, 500, response.body)
        self.assertLess(response.status, 500 if response.status != 507 else 600, response.body)
        self.assertNotIn(b"Traceback", response.body)
        if response.status >= 400:
            self.assertIsNone(SOURCE_PATH.search(response.body), response.body)
        content_type = response.header("Content-Type") or ""
        if response.body and content_type.startswith("application/json"):
            document = json.loads(response.body)
            if response.status >= 400:
                self.assertIsInstance(document, dict)
                self.assertIsInstance(document.get("error"), str, response.body)
                self.assertIsInstance(document.get("message"), str, response.body)
        elif response.body and response.status >= 400:
            self.fail(f"a non-JSON error body ({content_type!r}): {response.body[:200]!r}")

    def assert_healthy(self) -> None:
        response = self.client.get(b"/health")
        self.assertEqual((response.status, response.json()["status"]), (200, "ok"))


class HostileRequestTests(_HostileTestCase):
    """Generated hostile requests against the full pipeline."""

    @settings(max_examples=RAW_EXAMPLES)
    @given(raw_requests(), st.integers(min_value=1, max_value=4))
    def test_raw_requests(self, data: bytes, pieces: int) -> None:
        """Random bytes shaped like HTTP — malformed request lines, header
        lines without colons or with control bytes, bad Content-Length,
        broken chunking, random methods and paths — in one or several writes:
        never a 500, a traceback or a path; JSON errors; the connection ends
        by the idle timeout at the latest; /health answers afterwards."""
        self.exchange(data, pieces)

    @settings(max_examples=ENDPOINT_EXAMPLES)
    @given(endpoint_requests())
    def test_endpoint_requests(self, request: HostileRequest) -> None:
        """Well-framed requests with hostile content for each endpoint (JSON
        of the wrong shape or type, invalid JSON and base64, junk ids, hostile
        filenames in X-Filename, ?filename= and JSON), with and without a
        valid session: the same invariants; no file is stored under a name
        API.md forbids."""
        session = self.fresh_session()
        responses = self.exchange(request.encode(session))
        for response in responses:
            if response.status == 201:
                stored = response.json()
                self.assertTrue(contract_allows(stored["filename"]), stored)

    @settings(max_examples=FILENAME_EXAMPLES)
    @given(hostile_filenames, st.sampled_from(["json", "header", "query"]))
    def test_filenames(self, filename: str, form: str) -> None:
        """A filename is stored iff API.md allows it — then it round-trips
        exactly through /get-files — and is otherwise 400 invalid_filename
        (or bad_request for JSON that cannot carry it), in the JSON body,
        in X-Filename (percent-encoded UTF-8) and in ?filename=."""
        session = self.fresh_session()
        try:
            encoded = quote(filename, safe="").encode("ascii")
        except UnicodeEncodeError:
            encoded = quote(filename, safe="", errors="surrogatepass").encode("ascii")
        auth = (b"Authorization", b"Bearer " + session.encode())
        if form == "json":
            body = json.dumps({"filename": filename, "content": "aGk="}).encode()
            data = encode_request(b"POST", b"/upload-file", [(b"Content-Type", b"application/json"), auth], body)
        elif form == "header":
            headers = [(b"Content-Type", b"application/octet-stream"), (b"X-Filename", encoded), auth]
            data = encode_request(b"POST", b"/upload-file", headers, b"hi")
        else:
            headers = [(b"Content-Type", b"application/octet-stream"), auth]
            data = encode_request(b"POST", b"/upload-file?filename=" + encoded, headers, b"hi")
        [response] = self.exchange(data)
        if contract_allows(filename):
            self.assertEqual(response.status, 201, (filename, response.body))
            self.assertEqual(response.json()["filename"], filename)
            listed = self.client.get(b"/get-files", session=session, cert=self.cert).json()["files"]
            self.assertEqual(listed[0]["filename"], filename)
        else:
            self.assertEqual(response.status, 400, (filename, response.body))
            self.assertIn(response.json()["error"], ("invalid_filename", "bad_request"))

    @settings(max_examples=SESSION_EXAMPLES)
    @given(
        st.sampled_from(PROTECTED),
        st.sampled_from(["query", "cookie"]),
        st.sampled_from(["session_id", "session", "sid", "token", "access_token", "Authorization"]),
    )
    def test_session_in_url_or_cookie(self, endpoint: tuple[bytes, bytes], place: str, name: str) -> None:
        """A valid session id in the query string or in a cookie (under any
        usual name) is ignored: every protected endpoint answers 401
        invalid_session."""
        session = self.fresh_session()
        method, target = endpoint
        headers = [(b"Content-Type", b"application/json")]
        if place == "query":
            target += (b"&" if b"?" in target else b"?") + name.encode() + b"=" + session.encode()
        else:
            headers.append((b"Cookie", name.encode() + b"=" + session.encode()))
        body = b'{"id": "' + b"0" * 32 + b'"}' if method == b"POST" else None
        [response] = self.exchange(encode_request(method, target, headers, body))
        self.assertEqual((response.status, response.json()["error"]), (401, "invalid_session"), response.body)

    def test_deeply_nested_json(self) -> None:
        """JSON nested deeper than the parser's recursion limit is 400
        bad_request on every JSON endpoint, like any other invalid JSON."""
        session = self.fresh_session()
        for target in (b"/login", b"/upload-file", b"/delete-file"):
            for body in (b"[" * 5000, b'{"a":' * 5000):
                request = HostileRequest(b"POST", target, ((b"Content-Type", b"application/json"),), body, True)
                [response] = self.exchange(request.encode(session))
                self.assertEqual((response.status, response.json()["error"]), (400, "bad_request"), target)


class HostileLogTests(_HostileTestCase):
    """Hostile usernames reach the logs and the audit trail intact."""

    def failed_login(self, username_json: bytes) -> Response:
        body = b'{"username": "' + username_json + b'", "password": "wrong"}'
        request = HostileRequest(b"POST", b"/login", ((b"Content-Type", b"application/json"),), body, False)
        [response] = self.exchange(request.encode(""))
        return response

    def test_lone_surrogate_password_for_a_real_user(self) -> None:
        """A login for an existing user whose password holds a lone surrogate
        ("\\ud800" in JSON) is 401 invalid_credentials, not a 500."""
        self.cert = make_client("surrogate-password")
        body = b'{"username": "' + REAL_USERNAME.encode() + b'", "password": "\\ud800 hostile"}'
        request = HostileRequest(b"POST", b"/login", ((b"Content-Type", b"application/json"),), body, False)
        [response] = self.exchange(request.encode(""))
        self.assertEqual(response.status, 401, response.body)
        self.assertEqual(json.loads(response.body)["error"], "invalid_credentials")

    def test_log_lines_cannot_be_forged(self) -> None:
        """A username with a newline or a lone surrogate in a failed login
        neither forges a second log line nor makes a text log observer fail:
        every event formats to one line that encodes as UTF-8."""
        cert = make_client("log-forger")
        self.cert = cert
        with capturedLogs() as events:
            for username in (b"mallory\\n2026-01-01T00:00:00Z [securevault] Login by admin", b"\\ud800admin"):
                self.assertEqual(self.failed_login(username).status, 401)
        self.assertTrue(events)
        for logged in events:
            text = formatEvent(logged)
            self.assertNotIn("\n", text)
            text.encode("utf-8")

    def test_audit_records_hostile_username(self) -> None:
        """A failed login whose username holds a lone surrogate is still in
        the audit log (an attacker must not hide failed logins from it), once
        the coalesced refusals of that second are written."""
        audit_path = self.make_dir() / "audit.jsonl"
        trail = AuditTrail(AuditLog(audit_path, TEST_AUDIT_KEY), run_inline, self.clock)
        trail.startService()
        self.addCleanup(trail.stopService)
        self.app.audit_trail = trail
        self.cert = make_client("audit-evader")
        self.assertEqual(self.failed_login(b"\\ud800admin").status, 401)
        self.clock.advance(FLUSH_INTERVAL_SECONDS)
        records = (
            [json.loads(line) for line in audit_path.read_text("utf-8").splitlines()] if audit_path.exists() else []
        )
        self.assertIn("login_failed", [record["event"] for record in records])


class HostileConnectionTests(_HostileTestCase):
    """Connection-level attacks, each followed by /health on a new channel."""

    def test_header_block_too_large(self) -> None:
        """A header block over 16 KiB — one huge header, or many small ones —
        is answered with the JSON 431 header_too_large and the connection
        closed, before the block ends; the site serves others afterwards."""
        for headers in (
            b"X-Big: " + b"a" * (17 * 1024) + b"\r\n",
            b"".join(b"X-%d: %s\r\n" % (i, b"b" * 60) for i in range(300)),
        ):
            connection = self.client.connect()
            connection.send(b"GET /health HTTP/1.1\r\nHost: vault.test\r\n" + headers)
            self.assertTrue(connection.closed_by_server)
            [response] = connection.responses()
            self.assertEqual(response.status, 431)
            self.assertEqual(response.json()["error"], "header_too_large")
            connection.close()
            self.assert_healthy()

    def test_malformed_framing_is_json_400(self) -> None:
        """A request line or header twisted.web cannot parse is answered with
        the contract's JSON 400 bad_request, and the connection closed."""
        for raw in (
            b"NOT A REQUEST\r\n\r\n",
            b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n",
            b"POST /login HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        ):
            connection = self.client.connect()
            connection.send(raw)
            self.assertTrue(connection.closed_by_server)
            [response] = connection.responses()
            self.assertEqual(response.status, 400, raw)
            self.assertEqual(response.json()["error"], "bad_request")
            connection.close()
            self.assert_healthy()

    def test_endless_header_lines(self) -> None:
        """More header lines than twisted.web's 500 are refused and the
        connection closed."""
        connection = self.client.connect()
        connection.send(b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 600)
        self.assertTrue(connection.closed_by_server)
        self.assertNotIn(200, [r.status for r in connection.responses()])
        connection.close()
        self.assert_healthy()

    def test_pipelined(self) -> None:
        """Two GETs in one write are both answered, in order."""
        connection = self.client.connect()
        connection.send(encode_request(b"GET", b"/health") + encode_request(b"GET", b"/nope"))
        responses = connection.responses()
        self.assertEqual([r.status for r in responses], [200, 404])
        self.assertEqual(responses[0].json()["status"], "ok")
        self.assertEqual(responses[1].json()["error"], "not_found")
        connection.close()

    def test_stalled_mid_headers(self) -> None:
        """A client that stops in the middle of its headers is dropped after
        --idle-timeout, while another connection is served meanwhile."""
        stalled = self.client.connect()
        stalled.send(b"GET /health HTTP/1.1\r\nHost: vau")
        self.clock.advance(self.idle / 2)
        self.assertFalse(stalled.closed_by_server)
        self.assert_healthy()
        self.clock.advance(self.idle / 2 + 1)
        self.assertTrue(stalled.closed_by_server)
        self.assertEqual(stalled.transport.value(), b"")
        stalled.close()
        self.assert_healthy()

    def test_trickled_head(self) -> None:
        """A request head trickled one byte per second — each byte within the
        idle timeout, the whole over it — is dropped once the head deadline
        (--idle-timeout) passes, before it is complete."""
        trickler = self.client.connect()
        head = b"GET /health HTTP/1.1\r\nHost: vault.test\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"
        sent = 0
        for byte in head:
            if trickler.closed_by_server:
                break
            trickler.send(bytes([byte]))
            sent += 1
            self.clock.advance(1)
        self.assertTrue(trickler.closed_by_server)
        self.assertLessEqual(sent, self.idle + 1)
        self.assertEqual(trickler.transport.value(), b"")
        trickler.close()
        self.assert_healthy()

    def test_oversized_content_length(self) -> None:
        """A Content-Length over the limit is 413 as soon as the head is in,
        before any body byte, for every endpoint that takes a body."""
        targets: list[tuple[bytes, list[tuple[bytes, bytes]]]] = [
            (b"/login", [(b"Content-Type", b"application/json")]),
            (b"/delete-file", [(b"Content-Type", b"application/json")]),
            (b"/upload-file", [(b"Content-Type", b"application/json")]),
            (b"/upload-file", [(b"Content-Type", b"application/octet-stream"), (b"X-Filename", b"x")]),
        ]
        for target, headers in targets:
            for length in (self.app.config.max_upload_size + 1, 10**30):
                connection = self.client.connect()
                head = encode_request(b"POST", target, headers + [(b"Content-Length", b"%d" % length)])
                connection.send(head)
                [response] = connection.responses()
                self.assertEqual((response.status, response.json()["error"]), (413, "too_large"), target)
                self.assertTrue(connection.closed_by_server)
                connection.close()
        self.assert_healthy()

    def test_chunked_over_limit(self) -> None:
        """A chunked body that crosses the limit of a small-JSON endpoint is
        413 as soon as it does, and the connection is closed."""
        connection = self.client.connect()
        connection.send(
            encode_request(
                b"POST", b"/login", [(b"Content-Type", b"application/json"), (b"Transfer-Encoding", b"chunked")]
            )
        )
        piece = b"x" * 16384
        for _ in range(5):
            if connection.closed_by_server:
                break
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        [response] = connection.responses()
        self.assertEqual((response.status, response.json()["error"]), (413, "too_large"))
        self.assertTrue(connection.closed_by_server)
        connection.close()
        self.assert_healthy()
