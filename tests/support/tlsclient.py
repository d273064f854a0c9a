"""Certificates and mutual-TLS HTTPS clients for the real-socket tests.

L{TestPKI} builds, with L{securevault.admin.pki}, every certificate the end-to-end
tests need: the vault's CA, a server certificate for C{localhost} and
C{127.0.0.1}, two good client certificates, and four that the server must
refuse (expired, from another CA, self-signed, and from an "impostor" CA that
copies the real CA's subject name but has its own key).

L{VaultClient} is a treq client over an L{Agent} whose L{IPolicyForHTTPS}
returns C{optionsForClientTLS(...)} with (or without) a client certificate,
on a non-persistent L{HTTPConnectionPool} so that every request is a new
connection and a new handshake.  L{legacy_tls_context} builds a client that
speaks at most TLS 1.1, for the "TLS 1.1 refused" case.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import treq
import treq.client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from securevault.admin import pki

CA_NAME = "securevault test CA"
PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class Credential:
    """A certificate and its key, in memory and as PEM files on disk."""

    certificate: x509.Certificate
    key: pki.PrivateKey
    cert_path: Path
    key_path: Path

    @classmethod
    def from_files(cls, cert_path: Path, key_path: Path) -> Credential:
        """Load a PEM certificate and its unencrypted PEM key."""
        return cls(pki.load_cert(cert_path), pki.load_key(key_path), cert_path, key_path)


def _key_pem(key: pki.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_self_signed_client() -> tuple[x509.Certificate, pki.PrivateKey]:
    """A client-auth leaf certificate signed by its own key (no CA at all)."""
    key = pki.generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("self-signed")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


_Pair = tuple[x509.Certificate, pki.PrivateKey]


def _generate() -> dict[str, _Pair]:
    """Every certificate of a test PKI, in memory."""
    ca = pki.make_ca(CA_NAME)
    now = datetime.now(UTC)
    other_ca = pki.make_ca("some other CA")
    # Same subject as the real CA, different key: only the signature tells.
    impostor_ca = pki.make_ca(CA_NAME)
    return {
        "ca": ca,
        "server": pki.make_server_cert(*ca, hostnames=("localhost",), ips=("127.0.0.1",)),
        "client_a": pki.make_client_cert(*ca, "client-a"),
        "client_b": pki.make_client_cert(*ca, "client-b"),
        "expired": pki.make_client_cert(
            *ca, "expired", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
        ),
        "other_ca": other_ca,
        "other_ca_client": pki.make_client_cert(*other_ca, "client-a"),
        "self_signed": make_self_signed_client(),
        "impostor_ca": impostor_ca,
        "impostor_client": pki.make_client_cert(*impostor_ca, "client-a"),
    }


_GENERATED: dict[type, dict[str, _Pair]] = {}


@dataclass(frozen=True)
class TestPKI:
    """A CA, a server certificate and client certificates, written to C{directory}."""

    __test__ = False  # not a pytest test class, despite the name

    directory: Path
    ca: Credential
    server: Credential
    client_a: Credential
    client_b: Credential
    expired: Credential
    other_ca_client: Credential
    self_signed: Credential
    impostor_client: Credential

    @classmethod
    def for_class(cls, owner: type, directory: Path) -> TestPKI:
        """The PKI of test class C{owner} (generated once per class), as files
        under C{directory}."""
        generated = _GENERATED.get(owner)
        if generated is None:
            generated = _GENERATED[owner] = _generate()
        directory.mkdir(parents=True, exist_ok=True)
        credentials: dict[str, Credential] = {}
        for name, (certificate, key) in generated.items():
            cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
            cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(_key_pem(key))
            key_path.chmod(0o600)
            credentials[name] = Credential(certificate, key, cert_path, key_path)
        return cls(
            directory=directory,
            ca=credentials["ca"],
            server=credentials["server"],
            client_a=credentials["client_a"],
            client_b=credentials["client_b"],
            expired=credentials["expired"],
            other_ca_client=credentials["other_ca_client"],
            self_signed=credentials["self_signed"],
            impostor_client=credentials["impostor_client"],
        )


@implementer(IOpenSSLClientConnectionCreator)
class ContextCreator:
    """A client connection creator from a raw pyOpenSSL context (no hostname
    check: used only for handshakes that must fail)."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


def legacy_tls_context(ca_path: Path | None, credential: Credential | None, *, server: bool = False) -> SSL.Context:
    """A context that speaks TLS 1.0–1.1 only, at OpenSSL security level 0,
    so that it really offers TLS 1.1 (level 2 would refuse it locally).

    With C{server=True} the credential is the server's own (for the control
    test showing that this client does complete a TLS 1.1 handshake).
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_VERSION)
    context.set_max_proto_version(SSL.TLS1_1_VERSION)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    if credential is not None:
        context.use_certificate(credential.certificate)
        context.use_privatekey(cast(Any, credential.key))
    if ca_path is not None and not server:
        context.load_verify_locations(str(ca_path))
        context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    return context


@implementer(IPolicyForHTTPS)
class MutualTLSPolicy:
    """Trusts only the test CA and presents C{client} (or no certificate)."""

    def __init__(
        self,
        ca: x509.Certificate,
        client: Credential | None,
        *,
        hostname: str | None = None,
        creator: IOpenSSLClientConnectionCreator | None = None,
    ) -> None:
        self._trust = trustRootFromCertificates([Certificate.loadPEM(ca.public_bytes(serialization.Encoding.PEM))])
        # The client pair goes in as cryptography objects: passing it as
        # clientCertificate=PrivateCertificate hands pyOpenSSL its own X509
        # and PKey, which pyOpenSSL 26 deprecates (one warning per handshake).
        self._extra: dict[str, Any] = {}
        if client is not None:
            self._extra = {"certificate": client.certificate, "privateKey": client.key}
        self._hostname = hostname
        self._creator = creator

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        if self._creator is not None:
            return self._creator
        name = self._hostname or hostname.decode("ascii")
        return optionsForClientTLS(name, trustRoot=self._trust, extraCertificateOptions=self._extra)


class VaultClient:
    """A treq client for one vault URL over one TLS policy; each request opens
    a new connection (non-persistent pool), closed by L{close}."""

    def __init__(self, reactor: Any, base_url: str, policy: IPolicyForHTTPS) -> None:
        self.base_url = base_url.rstrip("/")
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=self.pool))
        self.session_id: str | None = None

    def close(self) -> Deferred[object]:
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return]

    def url(self, path: str) -> str:
        return self.base_url + path

    def headers(self, extra: Mapping[str, str] | None = None) -> Headers:
        """The session header (when logged in) plus C{extra}."""
        headers = Headers()
        if self.session_id is not None:
            headers.setRawHeaders("Authorization", [f"Bearer {self.session_id}"])
        for name, value in (extra or {}).items():
            headers.setRawHeaders(name, [value])
        return headers

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Deferred[Any]:
        """Fires with the L{IResponse} to C{method} C{path}."""
        return self.http.request(method, self.url(path), headers=self.headers(headers), data=data, params=params)

    def post_json(self, path: str, body: object) -> Deferred[Any]:
        return self.request(
            "POST",
            path,
            headers={"Content-Type": "application/json"},
            data=json.dumps(body).encode("utf-8"),
        )

    @inlineCallbacks
    def login(self, username: str, password: str = PASSWORD) -> Any:
        """POST /login and keep the session id; fires with the 200 body."""
        response = yield self.post_json("/login", {"username": username, "password": password})
        body = yield read_json(response)
        if response.code != 200:
            raise AssertionError(f"login failed: {response.code} {body!r}")
        self.session_id = body["session_id"]
        return body

    @inlineCallbacks
    def upload_json(self, filename: str, content: bytes) -> Any:
        """POST /upload-file in the JSON form; fires with the new archive id
        (an AssertionError unless 201)."""
        response = yield self.post_json(
            "/upload-file", {"filename": filename, "content": base64.b64encode(content).decode("ascii")}
        )
        stored = yield read_json(response)
        if response.code != 201:
            raise AssertionError(f"upload failed: {response.code} {stored!r}")
        return str(stored["id"])

    @inlineCallbacks
    def download_raw(self, archive_id: str) -> Any:
        """GET /download-file as a raw stream; fires with the bytes (an
        AssertionError unless 200)."""
        response = yield self.request(
            "GET", "/download-file", params={"id": archive_id}, headers={"Accept": "application/octet-stream"}
        )
        body = yield read_body(response)
        if response.code != 200:
            raise AssertionError(f"download failed: {response.code} {bytes(body)[:200]!r}")
        return bytes(body)


@inlineCallbacks
def read_json(response: IResponse) -> Any:
    """The response body parsed as JSON."""
    raw = yield treq.content(response)
    return json.loads(raw)


@inlineCallbacks
def read_body(response: IResponse) -> Any:
    """The response body as bytes."""
    return (yield treq.content(response))


def client_for(
    reactor: Any,
    port: int,
    ca: x509.Certificate,
    client: Credential | None,
    *,
    host: str = "127.0.0.1",
    hostname: str | None = None,
    creator: IOpenSSLClientConnectionCreator | None = None,
    cleanup: Callable[..., object] | None = None,
) -> VaultClient:
    """A L{VaultClient} for C{https://host:port}; its pool is closed by
    C{cleanup} (a test's C{addCleanup}) when given."""
    policy = MutualTLSPolicy(ca, client, hostname=hostname, creator=creator)
    vault = VaultClient(reactor, f"https://{host}:{port}", policy)
    if cleanup is not None:
        cleanup(vault.close)
    return vault
