# -*- test-case-name: tests.server.test_logging -*-
"""What the vault logs: no secrets in any event, one access event per request.

Every log event is captured over a whole client workflow and serialized the
way a JSON log file would hold it (C{eventAsJSON}), as text and as a repr;
none may contain the password, the session id, the master key, the file
content or the filename.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from twisted.logger import LogEvent, capturedLogs, eventAsJSON, formatEvent

from tests.support.app import VaultClient, add_user, encode_request, make_app
from tests.support.testcase import SyncTestCase

PASSWORD = "Tr0ub4dor-and-3-horses"
OCTETS = (b"Content-Type", b"application/octet-stream")


def serialized(event: LogEvent) -> str:
    """Every way an event might be written out."""
    return "\n".join([eventAsJSON(event), repr(event), formatEvent(event)])


class LoggingTests(SyncTestCase):
    """Log events over a full workflow."""

    def setUp(self) -> None:
        self.app, self.clock = make_app(self)
        add_user(self.app, "alice", PASSWORD)
        self.client = VaultClient(self.app, self.clock, self)
        self.content = b"CONTENT-" + os.urandom(12).hex().encode() + b"-END"
        self.filename = "FILENAME-" + os.urandom(6).hex() + ".txt"
        # (method, path without query, status, user, response)
        self.expected: list[tuple[str, str, int, str, Any]] = []

    def request(self, method: bytes, target: bytes, status: int, user: str, **kwargs: Any) -> Any:
        response = self.client.request(method, target, **kwargs)
        self.assertEqual(response.status, status, response.body)
        self.expected.append((method.decode(), target.split(b"?")[0].decode(), status, user, response))
        return response

    def workflow(self) -> tuple[str, str]:
        """Log in, upload (both forms), list, download (both forms), delete,
        fail a login, log out; returns the session ids."""
        login = json.dumps({"username": "alice", "password": PASSWORD}).encode()
        json_type = [(b"Content-Type", b"application/json")]
        self.request(b"GET", b"/health", 200, "-")
        session = self.request(b"POST", b"/login", 200, "alice", body=login, headers=json_type).json()["session_id"]
        upload = json.dumps({"filename": self.filename, "content": base64.b64encode(self.content).decode()}).encode()
        archive_id = self.request(
            b"POST", b"/upload-file", 201, "alice", body=upload, headers=json_type, session=session
        ).json()["id"]
        self.request(
            b"POST",
            b"/upload-file?filename=" + quote(self.filename).encode(),
            201,
            "alice",
            body=self.content,
            headers=[OCTETS],
            session=session,
        )
        self.request(
            b"POST",
            b"/upload-file",
            201,
            "alice",
            body=self.content,
            headers=[OCTETS, (b"X-Filename", quote(self.filename).encode())],
            session=session,
        )
        self.request(b"GET", b"/get-files", 200, "alice", session=session)
        self.request(b"GET", b"/download-file?id=" + archive_id.encode(), 200, "alice", session=session)
        self.request(
            b"GET",
            b"/download-file?filename=" + quote(self.filename).encode(),
            200,
            "alice",
            session=session,
            headers=[(b"Accept", b"application/octet-stream")],
        )
        self.request(
            b"POST",
            b"/delete-file",
            204,
            "alice",
            body=json.dumps({"id": archive_id}).encode(),
            headers=json_type,
            session=session,
        )
        self.request(b"GET", b"/download-file?id=" + archive_id.encode(), 404, "alice", session=session)
        wrong = json.dumps({"username": "alice", "password": PASSWORD + "x"}).encode()
        self.request(b"POST", b"/login", 401, "-", body=wrong, headers=json_type)
        self.request(b"GET", b"/get-files?session_id=" + session.encode(), 401, "-")
        # A raw upload refused before its body (no session): logged too.
        self.request(
            b"POST",
            b"/upload-file?filename=" + quote(self.filename).encode(),
            401,
            "-",
            headers=[OCTETS, (b"Cookie", b"session_id=" + session.encode())],
            body=self.content,
        )
        self.request(b"POST", b"/logout", 204, "alice", session=session)
        second = self.client.session("alice", PASSWORD)
        self.expected.append(("POST", "/login", 200, "alice", None))
        return session, second

    def secrets(self, sessions: Sequence[str]) -> dict[str, str]:
        key = self.app.storage.keyring.current_key
        secrets = {
            "password": PASSWORD,
            "master key (base64)": base64.b64encode(key).decode(),
            "master key (hex)": key.hex(),
            "content": self.content.decode(),
            "content (base64)": base64.b64encode(self.content).decode(),
            "filename": self.filename,
        }
        for index, session in enumerate(sessions):
            secrets[f"session {index}"] = session
            secrets[f"session {index} (hex)"] = session.replace("-", "")
        return secrets

    def test_no_secrets_logged(self) -> None:
        """No log event of a whole workflow contains the password, a session
        id, the master key, the file content or its name."""
        with capturedLogs() as events:
            sessions = self.workflow()
        # The capture works: the user name (not a secret) is there.
        self.assertTrue(any("alice" in serialized(event) for event in events))
        for event in events:
            text = serialized(event)
            for what, secret in self.secrets(sessions).items():
                self.assertNotIn(secret, text, f"{what} logged in {event.get('log_namespace')}: {text[:300]}")

    def test_access_events(self) -> None:
        """Each request has exactly one access event, in order, with method,
        path without its query string, status, user, bytes sent and
        duration."""
        with capturedLogs() as events:
            self.workflow()
        access = [event for event in events if event.get("event_kind") == "access"]
        self.assertEqual(len(access), len(self.expected))
        for event, (method, path, status, user, response) in zip(access, self.expected, strict=False):
            self.assertEqual(event["log_namespace"], "securevault.access")
            self.assertEqual(
                (event["method"], event["path"], event["status"], event["user"]), (method, path, status, user)
            )
            self.assertNotIn("?", formatEvent(event))
            if response is not None:
                self.assertEqual(event["bytes"], len(response.body))
            self.assertIsInstance(event["duration_ms"], (int, float))
            self.assertGreaterEqual(event["duration_ms"], 0)

    def test_pipelined_access_events(self) -> None:
        """Requests pipelined on one connection each get their own access
        event."""
        connection = self.client.connect()
        with capturedLogs() as events:
            connection.send(encode_request(b"GET", b"/health?x=1") + encode_request(b"GET", b"/nope?y=2"))
        access = [(e["method"], e["path"], e["status"]) for e in events if e.get("event_kind") == "access"]
        self.assertEqual(access, [("GET", "/health", 200), ("GET", "/nope", 404)])
