# -*- test-case-name: tests.server.test_pipeline -*-
"""The request pipeline's limits, on a fake clock: one hostile connection
costs a bounded amount and everyone else is served.

Each test drives a real L{VaultSite} channel over a fake mutual-TLS transport
(L{tests.support.app.VaultClient}) and moves time by hand, so the limits of
API.md's Transport section are checked exactly: connection caps (503 busy),
the body and response rates (408, a cut), the close after a refusal, the
memory budget (503 busy), and the routing of bodies to their endpoint.  The
same attacks over real TLS against a real daemon are in
L{tests.server.test_abuse_connections}.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.web.http import HTTPChannel, Request
from twisted.web.test.requesthelper import DummyChannel

from securevault.core.archive import ArchiveReader
from securevault.core.audit import AuditLog
from securevault.server.app import VaultApp
from securevault.server.auditing import AuditTrail
from securevault.server.limits import CLOSE_GRACE_SECONDS, ConnectionLimits, MemoryBudget, RateMeter
from securevault.server.twisted_private import (
    PASS_OVER_SECONDS,
    accept_one_at_a_time,
    head_bytes_received,
    pending_request_line,
    request_disconnected,
)
from securevault.server.web import VaultRequest
from securevault.storage import SecureFileStorage
from tests.support.app import (
    ManualRunner,
    VaultClient,
    add_user,
    corrupt_archive,
    encode_request,
    make_app,
    make_client,
)
from tests.support.rows import TEST_AUDIT_KEY
from tests.support.testcase import SyncTestCase

PASSWORD = "alice correct horse"
OCTETS = (b"Content-Type", b"application/octet-stream")


def login_head(length: int) -> bytes:
    return (
        b"POST /login HTTP/1.1\r\nHost: vault\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )


class _PipelineCase(SyncTestCase):
    def vault(self, **settings: Any) -> tuple[VaultApp, VaultClient]:
        app, clock = make_app(self, **settings)
        add_user(app, "alice", PASSWORD)
        return app, VaultClient(app, clock, self)


class BodyRateTests(_PipelineCase):
    """--min-body-rate over any --idle-timeout window (API.md Transport)."""

    def test_trickled_body_is_408(self) -> None:
        """A login body trickled one byte every 4 s is answered 408
        request_timeout within a window and a quarter, and the connection
        closed; it is no longer held for ever."""
        app, client = self.vault(idle_timeout=10.0)
        connection = client.connect()
        connection.send(login_head(200))
        for _ in range(4):
            connection.send(b"{")
            client.clock.advance(4)
        responses = connection.responses()
        self.assertEqual([r.status for r in responses], [408])
        self.assertEqual(responses[0].json()["error"], "request_timeout")
        self.assertEqual(responses[0].header("connection"), "close")
        self.assertTrue(connection.closed_by_server)

    def test_body_at_the_rate_is_taken(self) -> None:
        """A large body that keeps to the rate is not refused however long
        it takes."""
        app, client = self.vault(idle_timeout=4.0, min_body_rate=1000)
        session = client.session("alice", PASSWORD)
        connection = client.connect()
        data = os.urandom(20_000)
        connection.send(
            b"POST /upload-file HTTP/1.1\r\nHost: v\r\nContent-Type: application/octet-stream\r\n"
            b"X-Filename: slow.bin\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n"
            % (session.encode(), len(data))
        )
        for start in range(0, len(data), 1000):
            connection.send(data[start : start + 1000])
            client.clock.advance(0.5)  # 2000 bytes/s: twice the rate
        responses = connection.responses()
        self.assertEqual([r.status for r in responses], [201])

    def test_client_held_back_by_the_vault_is_not_refused(self) -> None:
        """While the vault itself stops reading (its pool is behind), a body
        that does not move is not the client's fault: no 408."""
        runner = ManualRunner()
        app, client = self.vault(idle_timeout=4.0)
        session = client.session("alice", PASSWORD)
        app.run_blocking = runner
        connection = client.connect()
        head = (
            b"POST /upload-file HTTP/1.1\r\nHost: v\r\nContent-Type: application/octet-stream\r\n"
            b"X-Filename: a.bin\r\nAuthorization: Bearer %s\r\nContent-Length: 10000000\r\n\r\n" % session.encode()
        )
        connection.send(head + os.urandom(5 << 20))  # past the high water mark: reading paused
        self.assertGreater(connection.transport.pause_count, 0)
        client.clock.advance(30)
        self.assertEqual(connection.responses(), [])
        self.assertFalse(connection.closed_by_server)

    def test_slow_reader_is_cut(self) -> None:
        """A download whose client stops reading (the transport's send buffer
        stays full) is cut once a whole window passes below the rate; one
        that reads is not."""
        app, client = self.vault(idle_timeout=4.0)
        session = client.session("alice", PASSWORD)
        upload = client.request(
            b"POST",
            b"/upload-file",
            body=os.urandom(3 << 20),
            headers=[OCTETS, (b"X-Filename", b"big.bin")],
            session=session,
        )
        archive_id = upload.json()["id"].encode()
        reading = client.connect()
        stalled = client.connect()
        # What a transport does when its client reads nothing: past its
        # send buffer, it pauses the channel, and never resumes it.
        transport = stalled.transport
        unbuffered = transport.write

        full: list[bool] = []

        def write(data: bytes) -> None:
            unbuffered(data)
            if len(transport.value()) > 65536 and not full:
                full.append(True)
                stalled.protocol.pauseProducing()

        transport.write = write  # type: ignore[method-assign]
        for connection in (reading, stalled):
            connection.send(
                encode_request(
                    b"GET",
                    b"/download-file?id=" + archive_id,
                    [(b"Accept", b"application/octet-stream"), (b"Authorization", b"Bearer " + session.encode())],
                    None,
                )
            )
        self.assertEqual([r.status for r in reading.responses()], [200])
        for _ in range(6):
            client.clock.advance(1)
        self.assertTrue(stalled.transport.aborted)
        self.assertFalse(reading.transport.aborted)
        stalled.close()
        self.assertEqual(app.budget.held, 0)


class RefusalTests(_PipelineCase):
    def test_connection_cut_after_refusal(self) -> None:
        """After a refusal sent with "Connection: close" (here a raw upload
        with a bogus session), a client that keeps sending has the connection
        cut within the grace period."""
        app, client = self.vault()
        connection = client.connect()
        connection.send(
            b"POST /upload-file HTTP/1.1\r\nHost: v\r\nContent-Type: application/octet-stream\r\n"
            b"X-Filename: a.bin\r\nAuthorization: Bearer bogus\r\nContent-Length: 100000000\r\n\r\n"
        )
        responses = connection.responses()
        self.assertEqual([r.status for r in responses], [401])
        self.assertEqual(responses[0].header("connection"), "close")
        for _ in range(10):
            connection.send(b"x" * 65536)
        self.assertFalse(connection.transport.aborted)
        client.clock.advance(CLOSE_GRACE_SECONDS)
        self.assertTrue(connection.transport.aborted)


class ConnectionCapTests(_PipelineCase):
    def test_total_cap(self) -> None:
        """Past --max-connections a new connection gets 503 busy with
        Retry-After and is closed; those admitted are served, and a place
        freed is taken again."""
        app, client = self.vault(connections=ConnectionLimits(2, 64))
        first, second = client.connect(), client.connect()
        third = client.connect()
        responses = third.responses()
        self.assertEqual([r.status for r in responses], [503])
        self.assertEqual(responses[0].json()["error"], "busy")
        self.assertEqual(responses[0].header("retry-after"), "1")
        self.assertTrue(third.closed_by_server)
        first.send(encode_request(b"GET", b"/health", [], None))
        self.assertEqual([r.status for r in first.responses()], [200])
        third.close()
        second.close()
        fourth = client.connect()
        fourth.send(encode_request(b"GET", b"/health", [], None))
        self.assertEqual([r.status for r in fourth.responses()], [200])

    def test_per_certificate_cap(self) -> None:
        """Past --max-connections-per-cert one certificate's next connection
        gets 503 busy; another certificate is served as before."""
        app, client = self.vault(connections=ConnectionLimits(100, 3))
        for _ in range(3):
            client.connect()
        extra = client.connect()
        self.assertEqual([r.status for r in extra.responses()], [503])
        device = make_client("bob-device")
        other = client.connect(device)
        other.send(encode_request(b"GET", b"/health", [], None))
        self.assertEqual([r.status for r in other.responses()], [200])
        assert app.connections is not None
        self.assertEqual(app.connections.of_certificate(device.fingerprint), 1)


class MemoryBudgetTests(_PipelineCase):
    """--memory-budget: bodies held in memory stay within it (503 busy)."""

    def test_json_body_past_the_budget_is_busy(self) -> None:
        """A JSON upload whose declared body does not fit what is left of the
        budget is answered 503 busy before its body is read; one that fits is
        stored; the budget is whole again afterwards."""
        app, client = self.vault(memory_budget=1 << 20, max_json_body=4 << 20)
        session = client.session("alice", PASSWORD)
        big = json.dumps({"filename": "a", "content": "A" * (2 << 20)}).encode()
        refused = client.request(
            b"POST", b"/upload-file", body=big, headers=[(b"Content-Type", b"application/json")], session=session
        )
        self.assertEqual(refused.status, 503)
        self.assertEqual(refused.json()["error"], "busy")
        small = json.dumps({"filename": "a", "content": "QUJD"}).encode()
        stored = client.request(
            b"POST", b"/upload-file", body=small, headers=[(b"Content-Type", b"application/json")], session=session
        )
        self.assertEqual(stored.status, 201)
        self.assertEqual(app.budget.held, 0)

    def test_chunked_body_counted_as_it_arrives(self) -> None:
        """A chunked body (no declared length) is counted chunk by chunk:
        past the budget, 503 busy."""
        app, client = self.vault(memory_budget=256 << 10, max_json_body=4 << 20)
        session = client.session("alice", PASSWORD)
        body = json.dumps({"filename": "a", "content": "A" * (1 << 20)}).encode()
        response = client.request(
            b"POST",
            b"/upload-file",
            body=body,
            headers=[(b"Content-Type", b"application/json")],
            session=session,
            chunk_size=64 << 10,
        )
        self.assertEqual(response.status, 503)
        self.assertEqual(app.budget.held, 0)

    def test_concurrent_uploads_share_the_budget(self) -> None:
        """Raw uploads each hold a bounded buffer: past the budget the next
        one is 503 busy, and the first ones complete."""
        runner = ManualRunner()
        app, client = self.vault(memory_budget=16 << 20)
        session = client.session("alice", PASSWORD)
        app.run_blocking = runner
        heads = [
            b"POST /upload-file HTTP/1.1\r\nHost: v\r\nContent-Type: application/octet-stream\r\n"
            b"X-Filename: f%d\r\nAuthorization: Bearer %s\r\nContent-Length: 4\r\n\r\n" % (n, session.encode())
            for n in range(3)
        ]
        connections = [client.connect() for _ in heads]
        for connection, head in zip(connections, heads, strict=True):
            connection.send(head)
        statuses = [[r.status for r in c.responses()] for c in connections]
        self.assertEqual(statuses, [[], [], [503]])
        for connection in connections[:2]:
            connection.send(b"data")
        runner.run_all()
        self.assertEqual([[r.status for r in c.responses()] for c in connections[:2]], [[201], [201]])
        self.assertEqual(app.budget.held, 0)


class DownloadDefectTests(_PipelineCase):
    def test_reader_closed_when_client_leaves_while_opening(self) -> None:
        """A client that disconnects while its archive is being opened in
        the pool leaves no open reader behind."""
        opened: list[ArchiveReader] = []

        class RecordingStorage(SecureFileStorage):
            def open(self, owner_id: str, archive_id: str, *, check_sha256: bool = False) -> ArchiveReader:
                reader = super().open(owner_id, archive_id, check_sha256=check_sha256)
                opened.append(reader)
                return reader

        app, clock = make_app(self, storage_class=RecordingStorage)
        add_user(app, "alice", PASSWORD)
        client = VaultClient(app, clock, self)
        session = client.session("alice", PASSWORD)
        stored = client.request(
            b"POST", b"/upload-file", body=b"x" * 5000, headers=[OCTETS, (b"X-Filename", b"a")], session=session
        )
        runner = ManualRunner()
        app.run_blocking = runner
        connection = client.connect()
        connection.send(
            encode_request(
                b"GET",
                b"/download-file?id=" + stored.json()["id"].encode(),
                [(b"Accept", b"application/octet-stream"), (b"Authorization", b"Bearer " + session.encode())],
                None,
            )
        )
        connection.close()
        runner.run_all()
        self.assertEqual(len(opened), 1)
        self.assertIsNone(getattr(opened[0], "_blob"))

    def test_integrity_failure_mid_stream_is_audited(self) -> None:
        """A raw download that meets a tampered segment after the headers is
        aborted and audited as an integrity error, not as a plain download."""
        app, client = self.vault()
        audit = AuditLog(self.make_dir() / "audit.jsonl", TEST_AUDIT_KEY)
        app.audit_trail = AuditTrail(audit, app.run_blocking, client.clock)
        session = client.session("alice", PASSWORD)
        stored = client.request(
            b"POST", b"/upload-file", body=os.urandom(3 << 20), headers=[OCTETS, (b"X-Filename", b"a")], session=session
        ).json()
        (owner,) = app.storage.owners()
        corrupt_archive(app, owner, stored["id"])
        connection = client.connect()
        connection.send(
            encode_request(
                b"GET",
                b"/download-file?id=" + stored["id"].encode(),
                [(b"Accept", b"application/octet-stream"), (b"Authorization", b"Bearer " + session.encode())],
                None,
            )
        )
        self.assertTrue(connection.transport.aborted)
        events = [json.loads(line)["event"] for line in audit.path.read_text().splitlines()]
        self.assertIn("integrity_error", events)


class HostAddressTests(_PipelineCase):
    def test_local_address_asked_once_per_connection(self) -> None:
        """Requests on one kept-alive connection ask the transport for the
        local address once (each ask was a getsockname() system call)."""
        app, client = self.vault()
        connection = client.connect()
        asked = []
        get_host = connection.transport.getHost

        def counted() -> object:
            asked.append(1)
            return get_host()

        connection.transport.getHost = counted  # type: ignore[method-assign]
        head = encode_request(b"GET", b"/health", [], None).replace(b"Connection: close\r\n", b"")
        for _ in range(3):
            connection.send(head)
            self.assertIn(b"200", connection.transport.value().split(b"\r\n", 1)[0])
            connection.transport.clear()
        self.assertEqual(len(asked), 1)


class LeakTests(_PipelineCase):
    def test_requests_are_freed(self) -> None:
        """A flood of refused requests on one keep-alive connection leaves no
        request alive once answered (their state once kept them alive for
        ever: +200 MiB in a 20 s flood)."""
        app, client = self.vault()
        connection = client.connect()
        gc.collect()
        earlier = {id(o) for o in gc.get_objects() if isinstance(o, VaultRequest)}  # other tests' requests
        head = encode_request(b"GET", b"/get-files", [(b"Authorization", b"Bearer bogus")], None)
        head = head.replace(b"Connection: close\r\n", b"")
        for _ in range(200):
            connection.send(head)
            connection.transport.clear()
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, VaultRequest) and id(o) not in earlier]
        self.assertEqual(alive, [])


class _ListeningPort:
    """What L{accept_one_at_a_time} uses of a C{tcp.Port}."""

    def __init__(self) -> None:
        self.numberAccepts = 100
        self.connected = True
        self.reading = True
        self.accepted: list[int] = []  # numberAccepts at each accepting doRead

    def doRead(self) -> None:
        self.accepted.append(self.numberAccepts)
        self.numberAccepts = 100  # as Twisted's doRead adapts it

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class AcceptTests(SyncTestCase):
    def test_one_connection_per_wake_up(self) -> None:
        """Each wake-up accepts one connection, however many are pending."""
        port = _ListeningPort()
        accept_one_at_a_time(port)
        port.doRead()
        port.doRead()
        self.assertEqual(port.accepted, [1, 1])

    def test_a_busier_worker_passes_a_connection_over_for_a_moment(self) -> None:
        """While another worker is less busy, the port stops reading for a
        moment instead of accepting; then it reads again and takes what is
        still pending whatever the loads, so nothing waits longer.  The
        next connection is judged afresh."""
        port = _ListeningPort()
        clock = Clock()
        accept_one_at_a_time(port, pass_over=lambda: True, call_later=clock.callLater)
        port.doRead()
        self.assertEqual(port.accepted, [])
        self.assertFalse(port.reading)
        clock.advance(PASS_OVER_SECONDS)
        self.assertTrue(port.reading)
        self.assertEqual(port.accepted, [1])
        port.doRead()  # the next connection is passed over again
        self.assertEqual(port.accepted, [1])
        self.assertFalse(port.reading)

    def test_not_busier_accepts_at_once(self) -> None:
        port = _ListeningPort()
        clock = Clock()
        accept_one_at_a_time(port, pass_over=lambda: False, call_later=clock.callLater)
        port.doRead()
        self.assertEqual(port.accepted, [1])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stopped_port_not_restarted(self) -> None:
        """A port that stopped listening while it passed a connection over
        is not made to read again."""
        port = _ListeningPort()
        clock = Clock()
        accept_one_at_a_time(port, pass_over=lambda: True, call_later=clock.callLater)
        port.doRead()
        port.connected = False
        clock.advance(PASS_OVER_SECONDS)
        self.assertFalse(port.reading)
        self.assertEqual(port.accepted, [])


class RoutingTests(SyncTestCase):
    def test_private_twisted_names_still_exist(self) -> None:
        """The private names of Twisted we wrap in one module are still
        there: an upgrade that renames one fails here, not in production."""
        channel = HTTPChannel()
        request = Request(cast(HTTPChannel, DummyChannel()))
        self.assertEqual(pending_request_line(channel), (b"", b""))
        self.assertEqual(head_bytes_received(channel), 0)
        self.assertFalse(request_disconnected(request))
        self.assertTrue(hasattr(request, "_parsePOSTFormSubmission"))
        self.assertTrue(hasattr(HTTPChannel, "_respondToBadRequestAndDisconnect"))

    def test_rate_meter(self) -> None:
        """The meter judges only whole windows, and never a window in which
        the vault held the client back."""
        meter = RateMeter(window_seconds=4, min_rate=100)
        self.assertFalse(meter.body_too_slow())
        for _ in range(3):
            meter.tick(still_held=False)
        self.assertTrue(meter.body_too_slow())
        meter.received(400)
        self.assertFalse(meter.body_too_slow())
        meter.reset()
        meter.hold()
        for _ in range(3):
            meter.tick(still_held=False)
        self.assertFalse(meter.body_too_slow())

    def test_memory_budget(self) -> None:
        budget = MemoryBudget(100)
        self.assertTrue(budget.reserve(60))
        self.assertFalse(budget.reserve(50))
        self.assertEqual(budget.held, 60)
        budget.release(60)
        self.assertTrue(budget.reserve(100))
