"""End-to-end tests: the real daemon service over real mutual TLS on 127.0.0.1.

Each test builds the service with C{securevault.server.tap.Options} and
C{makeService}, exactly as twistd does, listens on port 0, talks to it with
treq through L{tests.support.tlsclient}, and stops it (listener, then the
worker pool) in cleanup.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from collections.abc import Generator
from typing import Any
from urllib.parse import quote

from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.threadpool import ThreadPool
from twisted.web.client import FileBodyProducer, ResponseNeverReceived

from securevault import __version__
from securevault.core.keys import KeyringFile
from securevault.core.users import UserStore
from securevault.server.tap import Options, TLSListenerService, makeService
from securevault.stores.metadata import SqliteMetadataStore
from tests.support.rows import vault_rows
from tests.support.testcase import AsyncTestCase
from tests.support.tlsclient import (
    PASSWORD,
    ContextCreator,
    Credential,
    TestPKI,
    VaultClient,
    client_for,
    legacy_tls_context,
    read_body,
    read_json,
)

reactor: Any = global_reactor

JSON_TYPE = "application/json; charset=utf-8"
RAW_SIZE = 3 * 1024 * 1024 + 17  # a little over 3 MiB, not a multiple of any block


class VaultServerTestCase(AsyncTestCase):
    """Starts the whole daemon service (pool, sweeper, TLS listener) per test."""

    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:  # type: ignore[override]  # trial waits on a Deferred
        base = self.make_dir()
        self.pki = TestPKI.for_class(type(self), base / "certs")
        self.data_dir = base / "vault-data"
        self.data_dir.mkdir(mode=0o700)
        # The vault's key first (where the daemon looks by default): a vault
        # with users and no key file is refused.
        keyring = KeyringFile(base / "vault-keys" / "master.key").create()
        metadata = SqliteMetadataStore(self.data_dir / "vault.db")  # where the daemon looks by default
        users = UserStore(metadata, vault_rows(metadata, keyring), scrypt_n=2**10)
        users.add("alice", PASSWORD)
        users.add("bob", PASSWORD)
        metadata.close()
        options = Options()
        options.parseOptions(
            [
                "--port", "0",
                "--interface", "127.0.0.1",
                "--cert", str(self.pki.server.cert_path),
                "--key", str(self.pki.server.key_path),
                "--ca-cert", str(self.pki.ca.cert_path),
                "--data-dir", str(self.data_dir),
                "--threads", "2",
            ]
        )  # fmt: skip
        service = makeService(options, reactor)
        assert isinstance(service, MultiService)
        self.service = service
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        listener = next(s for s in service if isinstance(s, TLSListenerService))
        self.port_number = yield _bound_port(listener)

    def client(self, credential: Credential | None, **kwargs: Any) -> VaultClient:
        """A client of this server presenting C{credential} (None: no certificate)."""
        return client_for(
            reactor, self.port_number, self.pki.ca.certificate, credential, cleanup=self.addCleanup, **kwargs
        )


def _bound_port(listener: TLSListenerService) -> Deferred[int]:
    """The port number the listener bound, without consuming the listener's
    own Deferred (stopService needs the port object it carries)."""
    waiting = listener._waitingForPort
    assert waiting is not None
    result: Deferred[int] = Deferred()

    def bound(port: Any) -> Any:
        result.callback(port.getHost().port)
        return port

    waiting.addCallback(bound)
    return result


class WorkflowTests(VaultServerTestCase):
    """A client with a good certificate can use every endpoint of API.md."""

    @inlineCallbacks
    def test_health(self) -> Generator[Deferred[Any], Any, None]:
        """GET /health answers 200 JSON with status and version, no session
        needed, with the contract's headers."""
        client = self.client(self.pki.client_a)
        response = yield client.request("GET", "/health")
        body = yield read_json(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, {"status": "ok", "version": __version__})
        self.assertEqual(response.headers.getRawHeaders("content-type"), [JSON_TYPE])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])

    def test_login_pool(self) -> None:
        """Besides the worker pool (--threads 2) the daemon runs a pool of
        its own for logins (one thread per core, at most --threads),
        started with it; both come before the listener, so they stop after
        it."""
        children = list(self.service)
        pools = [(index, getattr(child, "_pool")) for index, child in enumerate(children) if hasattr(child, "_pool")]
        login_threads = min(2, os.cpu_count() or 1)
        self.assertEqual(
            [(pool.name, pool.max) for _, pool in pools], [("securevault", 2), ("securevault-login", login_threads)]
        )
        self.assertTrue(all(isinstance(pool, ThreadPool) and pool.started for _, pool in pools))
        listener = next(index for index, child in enumerate(children) if isinstance(child, TLSListenerService))
        self.assertLess(max(index for index, _ in pools), listener)

    @inlineCallbacks
    def test_health_verifies_localhost_name(self) -> Generator[Deferred[Any], Any, None]:
        """The server certificate also verifies as C{localhost} (its DNS SAN),
        not only as 127.0.0.1 (its IP SAN)."""
        client = self.client(self.pki.client_a, hostname="localhost")
        response = yield client.request("GET", "/health")
        yield read_body(response)
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_whole_workflow(self) -> Generator[Deferred[Any], Any, None]:
        """Login, JSON upload (twice under one name), a streamed ~3 MiB raw
        upload, list (newest first), JSON and byte-exact raw download, download
        by filename (the newest), delete, and logout all behave as API.md says;
        after logout the session is refused."""
        client = self.client(self.pki.client_a)
        login = yield client.login("alice")
        self.assertEqual(set(login), {"session_id", "expires_at"})

        # JSON upload, twice with the same name: two archives.
        first, second = b"first version\n", b"second version\n"
        uploads = []
        for content in (first, second):
            response = yield client.post_json(
                "/upload-file",
                {"filename": "notes.txt", "content": base64.b64encode(content).decode("ascii")},
            )
            body = yield read_json(response)
            self.assertEqual(response.code, 201, body)
            self.assertEqual(body["filename"], "notes.txt")
            self.assertEqual(body["size"], len(content))
            self.assertEqual(body["sha256"], hashlib.sha256(content).hexdigest())
            uploads.append(body)
        self.assertNotEqual(uploads[0]["id"], uploads[1]["id"])

        # Raw upload, streamed from a body producer, with a non-ASCII name.
        payload = os.urandom(RAW_SIZE)
        raw_name = "résumé 2026 (final).bin"
        response = yield client.request(
            "POST",
            "/upload-file",
            headers={"Content-Type": "application/octet-stream", "X-Filename": quote(raw_name, safe="")},
            data=FileBodyProducer(io.BytesIO(payload)),
        )
        raw = yield read_json(response)
        self.assertEqual(response.code, 201, raw)
        self.assertEqual(
            (raw["filename"], raw["size"], raw["sha256"]),
            (raw_name, RAW_SIZE, hashlib.sha256(payload).hexdigest()),
        )
        self.assertEqual(set(raw), {"id", "filename", "size", "sha256", "created_at"})

        # List: newest first, exactly the three archives.
        response = yield client.request("GET", "/get-files")
        listing = yield read_json(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(listing, {"files": [raw, uploads[1], uploads[0]]})

        # JSON download by id.
        response = yield client.request("GET", "/download-file", params={"id": uploads[0]["id"]})
        body = yield read_json(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), [JSON_TYPE])
        self.assertEqual(base64.b64decode(body["content"]), first)
        self.assertEqual(
            {k: body[k] for k in ("id", "filename", "size", "sha256")},
            {k: uploads[0][k] for k in ("id", "filename", "size", "sha256")},
        )

        # Raw download: byte-exact, with length, disposition and ETag.
        response = yield client.request(
            "GET", "/download-file", params={"id": raw["id"]}, headers={"Accept": "application/octet-stream"}
        )
        downloaded = yield read_body(response)
        self.assertEqual(response.code, 200)
        self.assertTrue(downloaded == payload, "raw download differs from the uploaded bytes")
        # The Agent moves Content-Length (a connection-control header) to .length;
        # a chunked response would have UNKNOWN_LENGTH there.
        self.assertEqual(response.length, RAW_SIZE)
        self.assertEqual(
            response.headers.getRawHeaders("content-disposition"),
            ["attachment; filename*=UTF-8''" + quote(raw_name, safe="")],
        )
        self.assertEqual(response.headers.getRawHeaders("etag"), [f'"{raw["sha256"]}"'])

        # By filename: the newest archive with that name.
        response = yield client.request("GET", "/download-file", params={"filename": "notes.txt"})
        body = yield read_json(response)
        self.assertEqual(response.code, 200)
        self.assertEqual((body["id"], base64.b64decode(body["content"])), (uploads[1]["id"], second))

        # Delete: 204, then the archive is gone from the list and downloads.
        response = yield client.post_json("/delete-file", {"id": raw["id"]})
        self.assertEqual((response.code, (yield read_body(response))), (204, b""))
        response = yield client.request("GET", "/download-file", params={"id": raw["id"]})
        body = yield read_json(response)
        self.assertEqual((response.code, body["error"]), (404, "not_found"))
        response = yield client.request("GET", "/get-files")
        listing = yield read_json(response)
        self.assertEqual([f["id"] for f in listing["files"]], [uploads[1]["id"], uploads[0]["id"]])

        # Logout: 204, then the session is refused.
        response = yield client.request("POST", "/logout")
        self.assertEqual((response.code, (yield read_body(response))), (204, b""))
        response = yield client.request("GET", "/get-files")
        body = yield read_json(response)
        self.assertEqual((response.code, body["error"]), (401, "invalid_session"))
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ["Bearer"])


class SessionBindingTests(VaultServerTestCase):
    """A session is bound to the client certificate it was created with."""

    @inlineCallbacks
    def test_session_refused_with_other_certificate(self) -> Generator[Deferred[Any], Any, None]:
        """Client A's session presented over client B's certificate is 401
        invalid_session with WWW-Authenticate: Bearer; A can still use it."""
        a = self.client(self.pki.client_a)
        yield a.login("alice")
        b = self.client(self.pki.client_b)
        b.session_id = a.session_id
        response = yield b.request("GET", "/get-files")
        body = yield read_json(response)
        self.assertEqual((response.code, body["error"]), (401, "invalid_session"))
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ["Bearer"])
        response = yield a.request("GET", "/get-files")
        body = yield read_json(response)
        self.assertEqual((response.code, body), (200, {"files": []}))

    @inlineCallbacks
    def test_session_refused_via_x_session_id(self) -> Generator[Deferred[Any], Any, None]:
        """The binding holds for the X-Session-ID header too."""
        a = self.client(self.pki.client_a)
        yield a.login("alice")
        b = self.client(self.pki.client_b)
        response = yield b.request("GET", "/get-files", headers={"X-Session-ID": str(a.session_id)})
        body = yield read_json(response)
        self.assertEqual((response.code, body["error"]), (401, "invalid_session"))


class IsolationTests(VaultServerTestCase):
    """One user never sees another user's archives."""

    @inlineCallbacks
    def test_other_users_archive_is_not_found(self) -> Generator[Deferred[Any], Any, None]:
        """Alice's archive id is 404 not_found for bob (download, raw download
        and delete), bob's list is empty, and alice's archive survives."""
        alice = self.client(self.pki.client_a)
        yield alice.login("alice")
        response = yield alice.post_json(
            "/upload-file", {"filename": "secret.txt", "content": base64.b64encode(b"alice only").decode()}
        )
        archive = yield read_json(response)
        self.assertEqual(response.code, 201)

        bob = self.client(self.pki.client_b)
        yield bob.login("bob")
        response = yield bob.request("GET", "/get-files")
        self.assertEqual((response.code, (yield read_json(response))), (200, {"files": []}))
        for headers in ({}, {"Accept": "application/octet-stream"}):
            response = yield bob.request("GET", "/download-file", params={"id": archive["id"]}, headers=headers)
            body = yield read_json(response)
            self.assertEqual((response.code, body["error"]), (404, "not_found"))
        response = yield bob.request("GET", "/download-file", params={"filename": "secret.txt"})
        body = yield read_json(response)
        self.assertEqual((response.code, body["error"]), (404, "not_found"))
        response = yield bob.post_json("/delete-file", {"id": archive["id"]})
        body = yield read_json(response)
        self.assertEqual((response.code, body["error"]), (404, "not_found"))

        response = yield alice.request("GET", "/download-file", params={"id": archive["id"]})
        body = yield read_json(response)
        self.assertEqual((response.code, base64.b64decode(body["content"])), (200, b"alice only"))


class HandshakeRefusedTests(VaultServerTestCase):
    """Clients without an acceptable certificate, or below TLS 1.2, fail the
    handshake and never get an HTTP response; the server keeps serving."""

    @inlineCallbacks
    def assert_refused(self, client: VaultClient) -> Generator[Deferred[Any], Any, None]:
        """GET /health through C{client} fails with no response, only TLS
        errors or a lost connection; then a good client still gets /health."""
        failure = yield self.assertFailure(client.request("GET", "/health"), ResponseNeverReceived)
        for reason in failure.reasons:
            self.assertIsInstance(reason.value, (SSL.Error, ConnectionLost, ConnectionDone))
        good = self.client(self.pki.client_a)
        response = yield good.request("GET", "/health")
        body = yield read_json(response)
        self.assertEqual((response.code, body["status"]), (200, "ok"))

    def test_no_client_certificate(self) -> Deferred[Any]:
        """A client that presents no certificate is refused."""
        return self.assert_refused(self.client(None))

    def test_certificate_from_other_ca(self) -> Deferred[Any]:
        """A certificate issued by an unrelated CA is refused."""
        return self.assert_refused(self.client(self.pki.other_ca_client))

    def test_expired_certificate(self) -> Deferred[Any]:
        """A certificate from the right CA whose notAfter has passed is refused."""
        return self.assert_refused(self.client(self.pki.expired))

    def test_self_signed_certificate(self) -> Deferred[Any]:
        """A self-signed client certificate is refused."""
        return self.assert_refused(self.client(self.pki.self_signed))

    def test_impostor_ca_certificate(self) -> Deferred[Any]:
        """A certificate whose issuer name equals the real CA's, but signed by
        another key, is refused: the signature, not the name, decides."""
        return self.assert_refused(self.client(self.pki.impostor_client))

    def test_tls_1_1_refused(self) -> Deferred[Any]:
        """A client that speaks at most TLS 1.1 (with a good certificate) is
        refused: TLS 1.2 is the minimum."""
        context = legacy_tls_context(self.pki.ca.cert_path, self.pki.client_a)
        return self.assert_refused(self.client(None, creator=ContextCreator(context)))

    def test_tls_1_1_client_works_against_permissive_server(self) -> None:
        """Control for L{test_tls_1_1_refused}: the same legacy client does
        complete a TLS 1.1 handshake with a server that allows it, so its
        refusal above is the vault's doing, not a local OpenSSL limit."""
        server = SSL.Connection(legacy_tls_context(None, self.pki.server, server=True))
        server.set_accept_state()
        client = SSL.Connection(legacy_tls_context(self.pki.ca.cert_path, self.pki.client_a))
        client.set_connect_state()
        _pump_handshake(client, server)
        self.assertEqual(
            (client.get_protocol_version_name(), server.get_protocol_version_name()), ("TLSv1.1", "TLSv1.1")
        )


def _pump_handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Run a handshake between two memory-BIO connections to completion."""
    done = {id(client): False, id(server): False}
    for _ in range(20):
        for this, other in ((client, server), (server, client)):
            if not done[id(this)]:
                try:
                    this.do_handshake()
                    done[id(this)] = True
                except SSL.WantReadError:
                    pass
            try:
                other.bio_write(this.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            return
    raise AssertionError("the handshake did not complete")
