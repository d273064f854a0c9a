# -*- test-case-name: tests.server.test_resources -*-
"""A real VaultApp on a fake clock, fake TLS transports, and a pipeline client.

L{make_app} builds the same collaborators as the daemon (real storage, real
user store, real sessions and throttle) but on a L{MemoryReactorClock} and
with L{run_inline} instead of the worker pool, so a test runs synchronously.

L{VaultClient} drives a real L{VaultSite}: it builds a channel with
C{site.buildProtocol}, connects it to a L{FakeTLSTransport} that presents a
client certificate, feeds raw HTTP bytes and parses what comes back.  That is
the path real traffic takes, C{gotLength}/C{handleContentChunk} included.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL.crypto import X509
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from securevault.admin.pki import PrivateKey, make_ca, make_client_cert
from securevault.core.keys import generate_keyring
from securevault.core.sessions import LoginThrottle, SessionStore
from securevault.core.users import UserStore
from securevault.server.app import VaultApp
from securevault.server.config import DEFAULT_MAX_JSON_BODY_BYTES, DEFAULT_MAX_UPLOAD_BYTES, VaultConfig
from securevault.server.limits import ConnectionLimits, MemoryBudget
from securevault.server.pools import run_inline
from securevault.server.web import VaultSite
from securevault.storage import SecureFileStorage
from securevault.stores.blobs import BODY_SUFFIX, LocalBlobStore
from tests.support.rows import vault_rows

TEST_SCRYPT_N = 2**10
P = ParamSpec("P")
R = TypeVar("R")


class _MakesDirs(Protocol):
    """A test case with SyncTestCase's make_dir()."""

    def make_dir(self) -> Path: ...


# -- certificates ---------------------------------------------------------


@dataclass(frozen=True)
class ClientCert:
    """A client certificate from the test CA, as mutual TLS would verify it."""

    certificate: x509.Certificate
    key: PrivateKey = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """The identity the vault derives: hex SHA-256 of the DER."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def to_pyopenssl(self) -> X509:
        """What a TLS transport's C{getPeerCertificate()} returns."""
        return X509.from_cryptography(self.certificate)


@lru_cache(maxsize=1)
def _test_ca() -> tuple[x509.Certificate, PrivateKey]:
    return make_ca("securevault test CA")


def make_client(name: str, *, not_after: datetime | None = None) -> ClientCert:
    """A fresh client certificate (and so a fresh identity) from the test CA."""
    ca_cert, ca_key = _test_ca()
    certificate, key = make_client_cert(ca_cert, ca_key, name, not_after=not_after)
    return ClientCert(certificate, key)


def make_expiring_client(name: str, seconds: float) -> ClientCert:
    """A client certificate whose notAfter is C{seconds} from now."""
    return make_client(name, not_after=datetime.now(UTC) + timedelta(seconds=seconds))


@lru_cache(maxsize=2)
def default_client(which: int = 0) -> ClientCert:
    """Two long-lived client identities shared by all tests (0 and 1)."""
    return make_client(f"test-client-{which}")


# -- the app ----------------------------------------------------------------


def make_app(
    test: _MakesDirs,
    *,
    quota: int | None = None,
    bind_user: str = "none",
    max_json_body: int = DEFAULT_MAX_JSON_BODY_BYTES,
    max_upload_size: int = DEFAULT_MAX_UPLOAD_BYTES,
    clock: MemoryReactorClock | None = None,
    storage_class: type[SecureFileStorage] = SecureFileStorage,
    connections: ConnectionLimits | None = None,
    **settings: Any,
) -> tuple[VaultApp, MemoryReactorClock]:
    """A real VaultApp in a fresh data directory, on a fake clock.

    A new clock starts at the current wall-clock time, so that certificate
    lifetimes (real times) and the session clock agree.  Archive creation
    times come from the same clock, plus a counter so that two uploads in one
    fake second still sort in upload order.  Both pools (C{run_blocking}
    and the logins' C{run_hashing}) are L{run_inline}; a test may swap in a
    L{ManualRunner}.
    """
    if clock is None:
        clock = MemoryReactorClock()
        clock.advance(time.time())
    data_dir = test.make_dir()
    config = VaultConfig(
        port=0,
        interface="127.0.0.1",
        data_dir=data_dir,
        master_key=data_dir / "master.key",
        threads=1,
        max_upload_size=max_upload_size,
        max_json_body=max_json_body,
        quota=quota,
        bind_user=bind_user,
        **settings,
    )
    counter = itertools.count()
    fake_clock = clock

    def clock_ns() -> int:
        return int(fake_clock.seconds()) * 1_000_000_000 + next(counter) % 1_000_000_000

    keyring = generate_keyring()
    storage = storage_class(data_dir, keyring, clock_ns=clock_ns)
    addCleanup = getattr(test, "addCleanup", None)
    if addCleanup is not None:
        addCleanup(storage.metadata.close)
    rows = vault_rows(storage.metadata, keyring)
    app = VaultApp(
        config=config,
        storage=storage,
        users=UserStore(storage.metadata, rows, scrypt_n=TEST_SCRYPT_N),
        sessions=SessionStore(
            storage.metadata, clock.seconds, rows=rows, idle_seconds=config.session_idle, ttl_seconds=config.session_ttl
        ),
        throttle=LoginThrottle(storage.metadata, clock.seconds),
        run_blocking=run_inline,
        run_hashing=run_inline,
        clock=clock.seconds,
        budget=MemoryBudget(config.memory_budget),
        connections=connections,
    )
    return app, clock


def add_user(app: VaultApp, name: str, password: str) -> str:
    """Create a user; returns the user id (the owner id of their archives)."""
    return app.users.add(name, password)


def blob_directory(storage: SecureFileStorage, user_id: str) -> Path:
    """Where the local blob store keeps the user's archive bodies."""
    blobs = storage.blobs
    assert isinstance(blobs, LocalBlobStore), "a test of files on disk needs the local blob store"
    return blobs.root / user_id


def stored_names(storage: SecureFileStorage, user_id: str) -> list[str]:
    """What the vault keeps for the user: every file in their blob directory
    (temp files included) and, named C{<archive id>.meta}, every row of
    theirs in the archive index.  An upload that left nothing behind adds
    nothing here; a committed one adds C{.body} and C{.meta}."""
    directory = blob_directory(storage, user_id)
    files = sorted(entry.name for entry in directory.iterdir()) if directory.is_dir() else []
    rows = [f"{record.archive_id}.meta" for record in storage.metadata.list_archives(user_id)]
    return sorted(files + rows)


def owner_files(app: VaultApp, user_id: str) -> list[str]:
    """L{stored_names} of the app's storage."""
    return stored_names(app.storage, user_id)


def archive_document(storage: SecureFileStorage, user_id: str, archive_id: str) -> str:
    """The archive's index row document (wrapped key and sealed metadata)."""
    record = storage.metadata.get_archive(user_id, archive_id)
    assert record is not None
    return record.document


def set_archive_document(storage: SecureFileStorage, user_id: str, archive_id: str, document: str) -> None:
    """Replace the archive's index row document, as an attacker with write
    access to the metadata store could."""
    record = storage.metadata.get_archive(user_id, archive_id)
    assert record is not None
    storage.metadata.delete_archive(user_id, archive_id)
    storage.metadata.put_archive(dataclasses.replace(record, document=document))


def corrupt_archive(app: VaultApp, user_id: str, archive_id: str, offset: int = -1) -> None:
    """Flip one bit of the archive's encrypted body on disk (default: the last
    byte, which is in the final chunk's tag)."""
    body = blob_directory(app.storage, user_id) / f"{archive_id}{BODY_SUFFIX}"
    data = bytearray(body.read_bytes())
    data[offset] ^= 0x01
    body.write_bytes(bytes(data))


class ManualRunner:
    """A L{RunBlocking} whose calls wait until the test runs them, like a
    pool that is behind: lets a test see back-pressure and disconnects
    while work is in flight."""

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, function: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
        result: Deferred[R] = Deferred()
        self.pending.append((result, function, args, kwargs))
        return result

    def run_all(self) -> int:
        """Run queued calls (and those they queue) in order; returns how many."""
        count = 0
        while self.pending:
            result, function, args, kwargs = self.pending.pop(0)
            maybeDeferred(function, *args, **kwargs).chainDeferred(result)
            count += 1
        return count


# -- transports -------------------------------------------------------------


class FakeTLSTransport(StringTransport):
    """A StringTransport that looks like a verified mutual-TLS connection."""

    def __init__(self, client: ClientCert | None) -> None:
        super().__init__(lenient=True)
        self._peer = client.to_pyopenssl() if client is not None else None
        self.aborted = False
        self.pause_count = 0

    def getPeerCertificate(self) -> X509 | None:
        return self._peer

    def pauseProducing(self) -> None:
        self.pause_count += 1
        super().pauseProducing()

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def dummy_request(
    client: ClientCert | None,
    method: bytes = b"GET",
    path: bytes = b"/",
    *,
    headers: dict[bytes, bytes] | None = None,
    body: bytes = b"",
) -> DummyRequest:
    """A DummyRequest whose transport presents C{client}'s certificate, as it
    reaches the endpoint after traversal (the path consumed: C{postpath} empty)."""
    request = DummyRequest([])
    request.prepath = path.lstrip(b"/").split(b"/")
    request.method = method
    setattr(request, "path", path)
    request.uri = path
    setattr(request, "transport", FakeTLSTransport(client))
    setattr(request, "content", BytesIO(body))
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


# -- HTTP/1.1 on the wire -----------------------------------------------------


@dataclass
class Response:
    """One parsed HTTP response."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool = True  # False: the connection ended before the body did

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower().encode("ascii")
        return [value.decode("latin-1") for key, value in self.headers if key.lower() == wanted]

    def json(self) -> Any:
        return json.loads(self.body)


class IncompleteResponse(Exception):
    """The bytes end inside a response head."""


def parse_responses(data: bytes) -> list[Response]:
    """Every response in C{data}, in order; 100 Continue is skipped.

    A body is framed by Content-Length or chunked encoding; 204 has none.  A
    last response whose body is cut short is returned with C{complete=False}.
    """
    responses: list[Response] = []
    position = 0
    while position < len(data):
        end = data.find(b"\r\n\r\n", position)
        if end < 0:
            raise IncompleteResponse(data[position:])
        head = data[position:end].split(b"\r\n")
        position = end + 4
        version, status_text, *rest = head[0].split(b" ", 2)
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP response: {head[0]!r}")
        status = int(status_text)
        headers = []
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.strip()))
        if status == 100:
            continue
        lookup = {name.lower(): value for name, value in headers}
        body = b""
        complete = True
        if status in (204, 304) or 100 <= status < 200:
            pass
        elif lookup.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            while True:
                line_end = data.find(b"\r\n", position)
                if line_end < 0:
                    complete = False
                    break
                size = int(data[position:line_end].split(b";")[0], 16)
                position = line_end + 2
                if size == 0:
                    trailer_end = data.find(b"\r\n", position)
                    position = (trailer_end + 2) if trailer_end >= 0 else len(data)
                    break
                chunks.append(data[position : position + size])
                if position + size + 2 > len(data):
                    complete = False
                    position = len(data)
                    break
                position += size + 2
            body = b"".join(chunks)
        elif b"content-length" in lookup:
            length = int(lookup[b"content-length"])
            body = data[position : position + length]
            complete = len(body) == length
            position += len(body)
        else:
            body = data[position:]  # framed by the end of the connection
            position = len(data)
        responses.append(Response(status, rest[0] if rest else b"", headers, body, complete))
    return responses


def encode_request(
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes | None = None,
    *,
    chunk_size: int | None = None,
) -> bytes:
    """An HTTP/1.1 request as a client sends it.

    With C{chunk_size} the body goes out with chunked transfer-encoding;
    otherwise a body (even empty, for POST) gets a Content-Length, unless
    C{headers} already frame it (then C{body} is sent as given: a test may
    declare a length and send only the head).
    """
    headers = list(headers)
    framed = any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers)
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: vault.test"]
    lines += [name + b": " + value for name, value in headers]
    payload = b""
    if framed:
        payload = body or b""
    elif chunk_size is not None:
        lines.append(b"Transfer-Encoding: chunked")
        body = body or b""
        for start in range(0, len(body), chunk_size):
            piece = body[start : start + chunk_size]
            payload += b"%x\r\n%s\r\n" % (len(piece), piece)
        payload += b"0\r\n\r\n"
    elif body is not None or method == b"POST":
        body = body or b""
        lines.append(b"Content-Length: %d" % (len(body),))
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


class Connection:
    """One client connection to the site over a fake TLS transport."""

    def __init__(self, site: VaultSite, client: ClientCert | None) -> None:
        self.transport = FakeTLSTransport(client)
        self.protocol: Any = site.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self._closed = False
        if client is not None:  # as the TLS layer tells a handshake listener
            self.protocol.handshakeCompleted()

    def send(self, data: bytes) -> None:
        """Bytes from the client, as the network would deliver them."""
        self.protocol.dataReceived(data)

    def responses(self) -> list[Response]:
        return parse_responses(self.transport.value())

    @property
    def closed_by_server(self) -> bool:
        """Whether the server closed (or aborted) the connection."""
        return bool(self.transport.disconnecting)

    def close(self) -> None:
        """The connection ends (the server learns it is gone)."""
        if not self._closed:
            self._closed = True
            self.protocol.connectionLost(Failure(ConnectionDone("test client left")))


class VaultClient:
    """Sends requests through a real VaultSite, one connection each.

    C{session} adds C{Authorization: Bearer}; C{cert} picks the identity
    (default: identity 0).
    """

    def __init__(self, app: VaultApp, clock: MemoryReactorClock, test: Any) -> None:
        self.app = app
        self.clock = clock
        self.site = VaultSite(app, reactor=clock)
        self._test = test
        self.history: list[tuple[bytes, bytes, Response]] = []

    def connect(self, cert: ClientCert | None = None) -> Connection:
        """An open connection; closed when the test ends."""
        connection = Connection(self.site, cert if cert is not None else default_client(0))
        self._test.addCleanup(connection.close)
        return connection

    def request(
        self,
        method: bytes,
        target: bytes,
        *,
        body: bytes | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
        session: str | None = None,
        cert: ClientCert | None = None,
        chunk_size: int | None = None,
    ) -> Response:
        """One request on a fresh connection; returns its single response."""
        all_headers = list(headers)
        if session is not None:
            all_headers.append((b"Authorization", b"Bearer " + session.encode("ascii")))
        connection = self.connect(cert)
        connection.send(encode_request(method, target, all_headers, body, chunk_size=chunk_size))
        responses = connection.responses()
        connection.close()
        if len(responses) != 1:
            raise AssertionError(f"expected one response, got {len(responses)}: {responses!r}")
        self.history.append((method, target, responses[0]))
        return responses[0]

    def get(self, target: bytes, **kwargs: Any) -> Response:
        return self.request(b"GET", target, **kwargs)

    def post_json(self, target: bytes, document: Any, **kwargs: Any) -> Response:
        headers = [(b"Content-Type", b"application/json")] + list(kwargs.pop("headers", []))
        return self.request(b"POST", target, body=json.dumps(document).encode("utf-8"), headers=headers, **kwargs)

    def login(self, username: str, password: str, cert: ClientCert | None = None) -> Response:
        return self.post_json(b"/login", {"username": username, "password": password}, cert=cert)

    def session(self, username: str, password: str, cert: ClientCert | None = None) -> str:
        """Log in and return the session id; fails unless the login is 200."""
        response = self.login(username, password, cert)
        if response.status != 200:
            raise AssertionError(f"login failed: {response.status} {response.body!r}")
        return str(response.json()["session_id"])
