"""The TLS surface of the real daemon, probed with raw handshakes.

The daemon service is started in-process on 127.0.0.1 exactly as
L{tests.server.test_tls_e2e} does (L{VaultServerTestCase}).  Clients here are not
HTTP clients but raw pyOpenSSL connections over memory BIOs, driven over a
blocking socket in a thread (C{deferToThread}), and, where a client library
would refuse to send what we want to test, hand-built TLS records: an SSLv3
ClientHello (this OpenSSL cannot speak SSLv3 at all), a ClientHello offering
DEFLATE compression, and an application-data record sent on the original keys
after a refused renegotiation.

What is checked, each with a real handshake against the real listener:

 - TLS 1.2 with CBC-only suites is refused (the server's handshake_failure
   alert); TLS 1.2 with C{ECDHE-ECDSA-AES128-GCM-SHA256} and TLS 1.3 succeed
   with AEAD suites; a default TLS 1.2 client offer ends on an AEAD suite;
 - SSLv3, TLS 1.0 and TLS 1.1 ClientHellos are refused with a protocol_version
   alert;
 - a client-initiated renegotiation on TLS 1.2 is refused (see
   L{RenegotiationTests} for exactly what the server does);
 - no compression: the server context has C{OP_NO_COMPRESSION} and its
   ServerHello picks the null method when DEFLATE is offered first
   (pyOpenSSL 26 has no C{Connection.get_current_compression});
 - the CertificateRequest names the vault's CA;
 - a certificate from the right CA whose extended key usage lacks clientAuth
   is refused; one with no extended key usage at all is accepted (skipped test,
   reported as a bug).

After every refusal a good client still gets C{/health} on a new connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread

from securevault.admin import pki
from securevault.server.tls import server_tls_options
from tests.server.test_tls_e2e import VaultServerTestCase
from tests.support.tlsclient import Credential, read_json

IO_TIMEOUT = 5.0
"""Seconds a blocking client waits for the server before giving up (a
refusal shows up as an alert or EOF long before that)."""

CBC_ONLY = "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA:AES128-SHA256"
GCM_SUITE = "ECDHE-ECDSA-AES128-GCM-SHA256"
HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"

# Record content types, handshake message types, alerts (RFC 5246).
HANDSHAKE, ALERT, APPLICATION_DATA = 22, 21, 23
SERVER_HELLO = 2
WARNING, FATAL = 1, 2
HANDSHAKE_FAILURE, PROTOCOL_VERSION, NO_RENEGOTIATION = 40, 70, 100
SSL3, TLS10, TLS11, TLS12 = 0x0300, 0x0301, 0x0302, 0x0303

# Suites and extensions of the hand-built ClientHellos.
ECDHE_ECDSA_AES128_GCM_SHA256 = 0xC02B
LEGACY_SUITES = (0x002F, 0x0035, 0x000A, 0xC009, 0xC013)  # AES128-SHA, AES256-SHA, 3DES, ECDHE-*-AES128-SHA
DEFLATE, NULL_COMPRESSION = 1, 0


# ---------------------------------------------------------------- blocking clients


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def client_context(
    credential: Credential | None,
    ca_path: Path | None,
    *,
    minimum: int = SSL.TLS1_2_VERSION,
    maximum: int = SSL.TLS1_3_VERSION,
    ciphers: str | None = None,
) -> SSL.Context:
    """A pyOpenSSL client context limited to C{minimum}..C{maximum}.

    C{ciphers} (TLS 1.2 and below) is applied at OpenSSL security level 0 for
    versions below 1.2, so that the client really offers what it is told to
    instead of refusing locally.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(minimum)
    context.set_max_proto_version(maximum)
    legacy = maximum < SSL.TLS1_2_VERSION
    if ciphers is not None or legacy:
        context.set_cipher_list((ciphers or "DEFAULT").encode("ascii") + (b":@SECLEVEL=0" if legacy else b""))
    if credential is not None:
        context.use_certificate(credential.certificate)
        context.use_privatekey(credential.key)  # type: ignore[arg-type]  # pyOpenSSL takes cryptography keys
    if ca_path is not None:
        context.load_verify_locations(str(ca_path))
        context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    return context


@dataclass
class TLSClient:
    """A pyOpenSSL client connection over a memory BIO and a blocking socket,
    so that every byte on the wire can also be seen (and forged)."""

    sock: socket.socket
    conn: SSL.Connection
    received: list[bytes] = field(default_factory=list)

    @classmethod
    def open(cls, port: int, context: SSL.Context) -> TLSClient:
        conn = SSL.Connection(context, None)
        conn.set_connect_state()
        conn.set_tlsext_host_name(b"localhost")
        return cls(_connect(port), conn)

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> bytes:
        """Send whatever OpenSSL has queued; returns those bytes."""
        try:
            data = self.conn.bio_read(1 << 20)
        except SSL.WantReadError:
            return b""
        self.sock.sendall(data)
        return data

    def feed(self) -> bool:
        """Read once from the socket into OpenSSL; False at EOF."""
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.received.append(data)
        self.conn.bio_write(data)
        return True

    def handshake(self) -> None:
        """Complete the handshake; raises L{SSL.Error} (an alert from the
        server, or a local failure) or L{EOFError} when the server closes."""
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                self.flush()
                if not self.feed():
                    raise EOFError("server closed the connection during the handshake") from None
        self.flush()

    def request(self, raw: bytes) -> bytes:
        """Send C{raw} over TLS; the decrypted answer until the server closes."""
        self.conn.sendall(raw)
        self.flush()
        answer = b""
        while True:
            try:
                answer += self.conn.recv(1 << 16)
                continue
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                return answer
            if not self.feed():
                return answer


@dataclass(frozen=True)
class Outcome:
    """What a client saw of one handshake (and of one request after it)."""

    error: str | None  # the SSL error (reason strings) or EOF, None on success
    protocol: str | None = None
    cipher: str | None = None
    client_ca_der: tuple[bytes, ...] = ()
    answer: bytes = b""


def handshake_outcome(port: int, context: SSL.Context) -> Outcome:
    """Handshake with C{context}; on success also GET /health over it.
    Blocking: run it with C{deferToThread}."""
    client = TLSClient.open(port, context)
    try:
        try:
            client.handshake()
        except SSL.Error as error:
            return Outcome(error=_reasons(error))
        except (EOFError, ConnectionError) as error:
            return Outcome(error=f"{error.__class__.__name__}: {error}")
        protocol = client.conn.get_protocol_version_name()
        cipher = client.conn.get_cipher_name()
        cas = tuple(name.der() for name in client.conn.get_client_ca_list())
        try:
            answer = client.request(HEALTH_REQUEST)
        except SSL.Error as error:
            # TLS 1.3: the client's side of the handshake ends before the
            # server has checked its certificate; the refusal arrives as an
            # alert on the first read.
            return Outcome(_reasons(error), protocol, cipher, cas)
        return Outcome(None, protocol, cipher, cas, answer)
    finally:
        client.close()


def _reasons(error: SSL.Error) -> str:
    """The reason strings of an OpenSSL error queue, joined."""
    parts = error.args[0] if error.args else []
    if isinstance(parts, list):
        return "; ".join(str(part[-1]) for part in parts) or "SSL error with an empty queue"
    return str(error)


# ---------------------------------------------------------------- raw records


def parse_records(data: bytes) -> list[tuple[int, int, bytes]]:
    """The complete TLS records in C{data}: (content type, version, body)."""
    records = []
    offset = 0
    while offset + 5 <= len(data):
        kind, version, length = struct.unpack(">BHH", data[offset : offset + 5])
        if offset + 5 + length > len(data):
            break
        records.append((kind, version, data[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    return records


def client_hello(
    version: int,
    suites: Sequence[int],
    *,
    compressions: Sequence[int] = (NULL_COMPRESSION,),
    ec_extensions: bool = False,
) -> bytes:
    """A hand-built ClientHello record of C{version} (record and body).

    With C{ec_extensions} it carries supported_groups (P-256),
    ec_point_formats and signature_algorithms, which a TLS 1.2 ECDHE-ECDSA
    handshake needs.
    """
    extensions = b""
    if ec_extensions:
        for number, payload in (
            (0x000A, struct.pack(">HH", 2, 0x0017)),  # supported_groups: secp256r1
            (0x000B, bytes([1, 0])),  # ec_point_formats: uncompressed
            (0x000D, struct.pack(">HHH", 4, 0x0403, 0x0804)),  # ecdsa_secp256r1_sha256, rsa_pss
        ):
            extensions += struct.pack(">HH", number, len(payload)) + payload
    body = struct.pack(">H", version) + os.urandom(32) + b"\x00"
    body += struct.pack(">H", 2 * len(suites)) + b"".join(struct.pack(">H", s) for s in suites)
    body += bytes([len(compressions), *compressions])
    if extensions:
        body += struct.pack(">H", len(extensions)) + extensions
    message = bytes([1]) + len(body).to_bytes(3, "big") + body
    return struct.pack(">BHH", HANDSHAKE, min(version, TLS10), len(message)) + message


def raw_exchange(port: int, hello: bytes) -> tuple[list[tuple[int, int, bytes]], bool]:
    """Send C{hello}; the records received until the server closes the
    connection or has sent a ServerHello, and whether it closed."""
    sock = _connect(port)
    try:
        sock.sendall(hello)
        data = b""
        while True:
            records = parse_records(data)
            if any(kind == HANDSHAKE and body[:1] == bytes([SERVER_HELLO]) for kind, _, body in records):
                return records, False  # answered: no need to wait for more
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return records, True
            data += chunk
    finally:
        sock.close()


def server_hello_fields(body: bytes) -> tuple[int, int, int]:
    """(version, cipher suite, compression method) of a ServerHello message."""
    assert body[0] == SERVER_HELLO
    version = struct.unpack(">H", body[4:6])[0]
    session_id_length = body[38]
    offset = 39 + session_id_length
    suite = struct.unpack(">H", body[offset : offset + 2])[0]
    return version, suite, body[offset + 2]


# ---------------------------------------------------------------- TLS 1.2 AES-GCM by hand


def _p_sha256(secret: bytes, label: bytes, seed: bytes, size: int) -> bytes:
    """The TLS 1.2 PRF with SHA-256 (RFC 5246 section 5)."""
    seed = label + seed
    a, out = seed, b""
    while len(out) < size:
        a = hmac.new(secret, a, hashlib.sha256).digest()
        out += hmac.new(secret, a + seed, hashlib.sha256).digest()
    return out[:size]


@dataclass(frozen=True)
class GCMKeys:
    """The AES-128-GCM record keys of a TLS 1.2 connection (RFC 5288)."""

    client_key: bytes
    server_key: bytes
    client_salt: bytes
    server_salt: bytes

    @classmethod
    def of(cls, conn: SSL.Connection) -> GCMKeys:
        master, client_random, server_random = conn.master_key(), conn.client_random(), conn.server_random()
        assert master is not None and client_random is not None and server_random is not None
        block = _p_sha256(master, b"key expansion", server_random + client_random, 40)
        return cls(block[0:16], block[16:32], block[32:36], block[36:40])

    def seal(self, sequence: int, kind: int, plaintext: bytes) -> bytes:
        """A whole client record of C{kind} carrying C{plaintext}."""
        explicit = struct.pack(">Q", sequence)
        aad = struct.pack(">QBHH", sequence, kind, TLS12, len(plaintext))
        body = explicit + AESGCM(self.client_key).encrypt(self.client_salt + explicit, plaintext, aad)
        return struct.pack(">BHH", kind, TLS12, len(body)) + body

    def open_server(self, kind: int, body: bytes, sequences: range = range(64)) -> tuple[int, bytes]:
        """Decrypt a server record; returns (its sequence number, plaintext).
        The sequence number is found by trying (it is in the AAD only)."""
        for sequence in sequences:
            aad = struct.pack(">QBHH", sequence, kind, TLS12, len(body) - 24)
            try:
                return sequence, AESGCM(self.server_key).decrypt(self.server_salt + body[:8], body[8:], aad)
            except Exception:
                continue
        raise AssertionError("server record does not decrypt with the negotiated keys")


@dataclass(frozen=True)
class RenegotiationTrace:
    """What happened around a client-initiated renegotiation."""

    first_answer: bytes
    client_error: str | None
    server_records: list[tuple[int, bytes]]  # (content type, plaintext) replying to the new ClientHello
    closed_by_server: bool
    answer_on_old_keys: bytes


def renegotiation_trace(port: int, context: SSL.Context) -> RenegotiationTrace:
    """TLS 1.2 with AES-128-GCM, one GET /health, then C{renegotiate()} and
    C{do_handshake()}.  The server's reply to the new ClientHello is decrypted
    by hand; then, as a client that ignores the refusal would, a GET /health is
    sent as an application-data record on the original keys."""
    client = TLSClient.open(port, context)
    try:
        client.handshake()
        keys = GCMKeys.of(client.conn)
        client.conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        client.flush()
        first = b""
        while b"\r\n\r\n" not in first or not first.endswith(b"}"):
            client.feed()
            try:
                first += client.conn.recv(1 << 16)
            except SSL.WantReadError:
                pass
        # Client write sequence: Finished 0, request 1, new ClientHello 2.
        assert client.conn.renegotiate()
        try:
            client.conn.do_handshake()
        except SSL.WantReadError:
            pass
        sent = parse_records(client.flush())
        assert [kind for kind, _, _ in sent] == [HANDSHAKE], sent
        data = client.sock.recv(1 << 16)
        closed = not data
        replies = [(kind, keys.open_server(kind, body)[1]) for kind, _, body in parse_records(data)]
        client.conn.bio_write(data)
        error: str | None = None
        try:
            client.conn.do_handshake()
        except SSL.Error as failure:
            error = _reasons(failure)
        # Ignore the refusal and carry on with the original session.
        client.sock.sendall(keys.seal(3, APPLICATION_DATA, HEALTH_REQUEST))
        answer = b""
        # Until the server's close_notify (an alert record) after its
        # "Connection: close" answer, or EOF.
        while not any(kind == ALERT for kind, _, _ in parse_records(answer)):
            try:
                chunk = client.sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        plain = b"".join(
            keys.open_server(kind, body)[1] for kind, _, body in parse_records(answer) if kind == APPLICATION_DATA
        )
        return RenegotiationTrace(first, error, replies, closed, plain)
    finally:
        client.close()


# ---------------------------------------------------------------- certificates


def issue_client(ca: Credential, usages: Sequence[x509.ObjectIdentifier] | None) -> Credential:
    """A leaf certificate signed by C{ca} with extended key usage C{usages}
    (None: no extendedKeyUsage extension); files are not written."""
    key = pki.generate_key()
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client-a")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    certificate = builder.sign(ca.key, hashes.SHA256())
    return Credential(certificate, key, Path("/nonexistent"), Path("/nonexistent"))


# ---------------------------------------------------------------- tests


class SurfaceTestCase(VaultServerTestCase):
    """The real service per test, plus helpers that run blocking clients."""

    timeout = 20

    def in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThread(function, *args)

    def context(self, credential: Credential | None = None, **kwargs: Any) -> SSL.Context:
        """A client context trusting the test CA and presenting C{credential}
        (client A's by default)."""
        return client_context(credential or self.pki.client_a, self.pki.ca.cert_path, **kwargs)

    @inlineCallbacks
    def assert_health(self) -> Generator[Deferred[Any], Any, None]:
        """A good client still gets /health on a new connection."""
        good = self.client(self.pki.client_a)
        response = yield good.request("GET", "/health")
        body = yield read_json(response)
        self.assertEqual((response.code, body["status"]), (200, "ok"))

    @inlineCallbacks
    def assert_refused(self, context: SSL.Context, *reasons: str) -> Generator[Deferred[Any], Any, None]:
        """A handshake with C{context} fails with an alert from the server
        whose reason string contains one of C{reasons}; /health still works."""
        outcome = yield self.in_thread(handshake_outcome, self.port_number, context)
        self.assertIsNotNone(outcome.error, f"handshake succeeded: {outcome}")
        self.assertTrue(any(reason in outcome.error for reason in reasons), outcome.error)
        self.assertEqual(outcome.answer, b"")
        yield self.assert_health()

    def assert_served(self, outcome: Outcome) -> None:
        self.assertIsNone(outcome.error)
        self.assertTrue(outcome.answer.startswith(b"HTTP/1.1 200 "), outcome.answer[:200])


class CipherSuiteTests(SurfaceTestCase):
    """Only AEAD suites on TLS 1.2; TLS 1.3 is offered."""

    def test_tls12_cbc_only_refused(self) -> Deferred[Any]:
        """A TLS 1.2 client offering only CBC suites gets a handshake_failure
        alert (the client does offer them: the error is the server's alert)."""
        return self.assert_refused(
            self.context(minimum=SSL.TLS1_2_VERSION, maximum=SSL.TLS1_2_VERSION, ciphers=CBC_ONLY),
            "alert handshake failure",
        )

    @inlineCallbacks
    def test_tls12_gcm(self) -> Generator[Deferred[Any], Any, None]:
        """TLS 1.2 with ECDHE-ECDSA-AES128-GCM-SHA256 (the certificates are
        EC P-256) completes and serves /health."""
        context = self.context(minimum=SSL.TLS1_2_VERSION, maximum=SSL.TLS1_2_VERSION, ciphers=GCM_SUITE)
        outcome = yield self.in_thread(handshake_outcome, self.port_number, context)
        self.assert_served(outcome)
        self.assertEqual((outcome.protocol, outcome.cipher), ("TLSv1.2", GCM_SUITE))

    @inlineCallbacks
    def test_tls12_default_offer_ends_on_aead(self) -> Generator[Deferred[Any], Any, None]:
        """A TLS 1.2 client offering everything (CBC included, at security
        level 0) still gets an ECDHE AEAD suite."""
        context = self.context(minimum=SSL.TLS1_2_VERSION, maximum=SSL.TLS1_2_VERSION, ciphers="ALL:@SECLEVEL=0")
        outcome = yield self.in_thread(handshake_outcome, self.port_number, context)
        self.assert_served(outcome)
        self.assertEqual(outcome.protocol, "TLSv1.2")
        self.assertRegex(outcome.cipher, r"^ECDHE-ECDSA-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$")

    @inlineCallbacks
    def test_tls13(self) -> Generator[Deferred[Any], Any, None]:
        """A TLS 1.3 handshake completes with a TLS 1.3 (AEAD) suite."""
        context = self.context(minimum=SSL.TLS1_3_VERSION, maximum=SSL.TLS1_3_VERSION)
        outcome = yield self.in_thread(handshake_outcome, self.port_number, context)
        self.assert_served(outcome)
        self.assertEqual(outcome.protocol, "TLSv1.3")
        self.assertTrue(outcome.cipher.startswith(("TLS_AES_", "TLS_CHACHA20_")), outcome.cipher)


class ProtocolVersionTests(SurfaceTestCase):
    """SSLv3, TLS 1.0 and TLS 1.1 are refused at the handshake."""

    @inlineCallbacks
    def assert_raw_hello_refused(self, version: int) -> Generator[Deferred[Any], Any, None]:
        """A hand-built ClientHello of C{version} gets a fatal
        protocol_version alert in the clear and the connection closed."""
        records, closed = yield self.in_thread(raw_exchange, self.port_number, client_hello(version, LEGACY_SUITES))
        self.assertEqual([(kind, body) for kind, _, body in records], [(ALERT, bytes([FATAL, PROTOCOL_VERSION]))])
        self.assertTrue(closed)
        yield self.assert_health()

    def test_sslv3_hello_refused(self) -> Deferred[Any]:
        """SSLv3 (which this OpenSSL cannot even offer: the ClientHello is
        built by hand) is refused."""
        return self.assert_raw_hello_refused(SSL3)

    def test_tls10_hello_refused(self) -> Deferred[Any]:
        """A hand-built TLS 1.0 ClientHello is refused."""
        return self.assert_raw_hello_refused(TLS10)

    def test_tls11_hello_refused(self) -> Deferred[Any]:
        """A hand-built TLS 1.1 ClientHello is refused."""
        return self.assert_raw_hello_refused(TLS11)

    def test_tls10_client_refused(self) -> Deferred[Any]:
        """An OpenSSL client limited to TLS 1.0 (security level 0, good
        certificate) gets the server's protocol_version alert."""
        return self.assert_refused(
            self.context(minimum=SSL.TLS1_VERSION, maximum=SSL.TLS1_VERSION), "alert protocol version"
        )

    def test_tls11_client_refused(self) -> Deferred[Any]:
        """An OpenSSL client limited to TLS 1.1 gets the same alert."""
        return self.assert_refused(
            self.context(minimum=SSL.TLS1_1_VERSION, maximum=SSL.TLS1_1_VERSION), "alert protocol version"
        )

    @inlineCallbacks
    def test_raw_tls12_hello_answered(self) -> Generator[Deferred[Any], Any, None]:
        """Control for the hand-built hellos: the same builder at TLS 1.2 with
        an AEAD suite gets a ServerHello, so the refusals above are about the
        version, not a malformed message."""
        hello = client_hello(TLS12, (ECDHE_ECDSA_AES128_GCM_SHA256,), ec_extensions=True)
        records, _ = yield self.in_thread(raw_exchange, self.port_number, hello)
        self.assertEqual(records[0][0], HANDSHAKE)
        self.assertEqual(server_hello_fields(records[0][2])[:2], (TLS12, ECDHE_ECDSA_AES128_GCM_SHA256))


class RenegotiationTests(SurfaceTestCase):
    """Client-initiated renegotiation on TLS 1.2 is refused.

    Observed (OpenSSL 3/4 with C{OP_NO_RENEGOTIATION}): the server answers the
    new ClientHello with one encrypted I{warning} alert, no_renegotiation (100),
    sends no ServerHello and does not close the connection.  An OpenSSL client
    treats that as fatal ("no renegotiation").  A client that ignores the
    warning and goes on with the original session keys is still served on
    that connection: RFC 5246 section 7.2.2 makes no_renegotiation a warning
    that leaves the original session in force, so no new keys, certificate or
    parameters are ever taken from the refused handshake.

    OpenSSL 3+ refuses client renegotiation by default too, so these tests
    fail when the server allows it (C{SSL_OP_ALLOW_CLIENT_RENEGOTIATION},
    checked by mutation), not when C{OP_NO_RENEGOTIATION} alone is dropped.
    """

    @inlineCallbacks
    def test_openssl_client_renegotiation_fails(self) -> Generator[Deferred[Any], Any, None]:
        """C{renegotiate()} + C{do_handshake()} fails with "no renegotiation"
        on the client; /health still works on a new connection."""
        context = self.context(
            minimum=SSL.TLS1_2_VERSION, maximum=SSL.TLS1_2_VERSION, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"
        )
        trace = yield self.in_thread(renegotiation_trace, self.port_number, context)
        self.assertTrue(trace.first_answer.startswith(b"HTTP/1.1 200 "), trace.first_answer[:100])
        self.assertIsNotNone(trace.client_error)
        self.assertIn("no renegotiation", trace.client_error)
        yield self.assert_health()

    @inlineCallbacks
    def test_server_refuses_with_warning_and_keeps_original_session(self) -> Generator[Deferred[Any], Any, None]:
        """On the wire: the reply to the renegotiation ClientHello is exactly
        one alert, warning no_renegotiation, and no handshake message; a
        request sent afterwards on the original keys is answered under the
        original session (see the class docstring)."""
        context = self.context(
            minimum=SSL.TLS1_2_VERSION, maximum=SSL.TLS1_2_VERSION, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"
        )
        trace = yield self.in_thread(renegotiation_trace, self.port_number, context)
        self.assertFalse(trace.closed_by_server)
        self.assertEqual(trace.server_records, [(ALERT, bytes([WARNING, NO_RENEGOTIATION]))])
        self.assertTrue(trace.answer_on_old_keys.startswith(b"HTTP/1.1 200 "), trace.answer_on_old_keys[:100])


class CompressionTests(SurfaceTestCase):
    """No TLS compression.  pyOpenSSL 26 has no
    C{Connection.get_current_compression}, so the option and the ServerHello
    are checked instead.  (OpenSSL sets C{OP_NO_COMPRESSION} by default and
    this build has no zlib, so these pass even without the daemon's own
    setting: they guard against a context that turns compression back on.)"""

    def test_server_context_has_no_compression(self) -> None:
        """The daemon's server context sets C{OP_NO_COMPRESSION} (and
        C{OP_NO_RENEGOTIATION})."""
        options = server_tls_options(self.pki.server.cert_path, self.pki.server.key_path, self.pki.ca.cert_path)
        flags = options.getContext().set_options(0)  # returns the options in force; pyOpenSSL has no get_options
        self.assertEqual(flags & SSL.OP_NO_COMPRESSION, SSL.OP_NO_COMPRESSION)
        self.assertEqual(flags & SSL.OP_NO_RENEGOTIATION, SSL.OP_NO_RENEGOTIATION)

    @inlineCallbacks
    def test_server_hello_picks_null_compression(self) -> Generator[Deferred[Any], Any, None]:
        """A TLS 1.2 ClientHello offering DEFLATE first gets a ServerHello
        with the null compression method."""
        hello = client_hello(
            TLS12, (ECDHE_ECDSA_AES128_GCM_SHA256,), compressions=(DEFLATE, NULL_COMPRESSION), ec_extensions=True
        )
        records, _ = yield self.in_thread(raw_exchange, self.port_number, hello)
        self.assertEqual(records[0][0], HANDSHAKE)
        self.assertEqual(server_hello_fields(records[0][2])[2], NULL_COMPRESSION)


class ClientCATests(SurfaceTestCase):
    """The CertificateRequest names the CA the server accepts."""

    @inlineCallbacks
    def test_client_ca_list_names_the_ca(self) -> Generator[Deferred[Any], Any, None]:
        """After a TLS 1.2 and a TLS 1.3 handshake the client's list of
        acceptable CAs is exactly the vault CA's subject."""
        ca_subject = self.pki.ca.certificate.subject.public_bytes()
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            outcome = yield self.in_thread(
                handshake_outcome, self.port_number, self.context(minimum=version, maximum=version)
            )
            self.assert_served(outcome)
            self.assertEqual(outcome.client_ca_der, (ca_subject,))


class ExtendedKeyUsageTests(SurfaceTestCase):
    """Certificates from the right CA that are not meant for client auth.

    Observed: a certificate whose extendedKeyUsage lacks clientAuth
    (serverAuth only, or codeSigning, or even anyExtendedKeyUsage) is refused
    by OpenSSL's "ssl_client" purpose check (alert unsupported_certificate),
    on TLS 1.2 and 1.3; the server's own certificate presented as a client
    certificate is refused the same way.  A certificate with I{no}
    extendedKeyUsage extension is accepted (RFC 5280: no restriction):
    L{test_no_extended_key_usage_refused} is skipped as a bug.
    """

    @inlineCallbacks
    def test_server_auth_only_refused(self) -> Generator[Deferred[Any], Any, None]:
        """A certificate from the vault CA with EKU serverAuth only is refused
        at the handshake on TLS 1.2 and on TLS 1.3."""
        credential = issue_client(self.pki.ca, [ExtendedKeyUsageOID.SERVER_AUTH])
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            yield self.assert_refused(
                self.context(credential, minimum=version, maximum=version), "alert unsupported certificate"
            )

    def test_code_signing_refused(self) -> Deferred[Any]:
        """EKU codeSigning only: refused."""
        credential = issue_client(self.pki.ca, [ExtendedKeyUsageOID.CODE_SIGNING])
        return self.assert_refused(self.context(credential), "alert unsupported certificate")

    def test_server_certificate_as_client_refused(self) -> Deferred[Any]:
        """The server's own certificate (same CA, serverAuth) cannot be used
        as a client certificate."""
        return self.assert_refused(self.context(self.pki.server), "alert unsupported certificate")

    @inlineCallbacks
    def test_client_auth_control(self) -> Generator[Deferred[Any], Any, None]:
        """Control: the same builder with EKU clientAuth is accepted."""
        credential = issue_client(self.pki.ca, [ExtendedKeyUsageOID.CLIENT_AUTH])
        outcome = yield self.in_thread(handshake_outcome, self.port_number, self.context(credential))
        self.assert_served(outcome)

    def test_no_extended_key_usage_refused(self) -> Deferred[Any]:
        """A certificate from the vault CA without any extendedKeyUsage
        extension should be refused at the handshake."""
        credential = issue_client(self.pki.ca, None)
        return self.assert_refused(self.context(credential), "alert unsupported certificate", "alert")
