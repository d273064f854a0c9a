# -*- test-case-name: tests.server.test_tls_surface,tests.server.test_tls_e2e -*-
"""Mutual TLS: the server's CertificateOptions and the client's identity."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from weakref import WeakKeyDictionary

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.logger import Logger

from securevault.server.revocation import RevocationState

log = Logger(namespace="securevault.security")

# Forward-secret AEAD suites only (TLS 1.3 suites are all AEAD).
AEAD_ONLY = AcceptableCiphers.fromOpenSSLCipherString("ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1")


class TLSConfigError(Exception):
    """A certificate, key or CA file is missing or unusable."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(
            f"{what} file {path} does not exist; run 'securevault-admin init' to create a development PKI"
        ) from None
    except OSError as error:
        raise TLSConfigError(f"cannot read {what} file {path}: {error.strerror}") from None


def certificate_host(cert: Path) -> str | None:
    """The name a client should use for the server certificate in C{cert}:
    its first DNS name, else its first IP address (subjectAltName, what
    clients verify), else its common name; None if there is none or the file
    cannot be read (L{server_tls_options} reports that)."""
    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return None
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for kind in (x509.DNSName, x509.IPAddress):
            values = san.get_values_for_type(kind)
            if values:
                return str(values[0])
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def load_ca_certificates(ca: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(ca, "CA certificate"))
    except ValueError as error:
        raise TLSConfigError(f"CA certificate file {ca} holds no PEM certificate: {error}") from None


def server_tls_options(
    cert: Path, key: Path, ca: Path, revocations: RevocationState | None = None
) -> CertificateOptions:
    """Server options that require a client certificate chaining to C{ca},
    and not revoked by the CRLs in force in C{revocations} (consulted at each
    handshake: a reload takes effect without a new context)."""
    try:
        certificate = x509.load_pem_x509_certificate(_read(cert, "server certificate"))
    except ValueError as error:
        raise TLSConfigError(f"server certificate file {cert} is not a PEM certificate: {error}") from None
    try:
        private_key = load_pem_private_key(_read(key, "server key"), password=None)
    except (ValueError, TypeError) as error:
        raise TLSConfigError(f"server key file {key} is not an unencrypted PEM key: {error}") from None
    authorities = load_ca_certificates(ca)
    # Twisted's stubs name pyOpenSSL types, but it takes cryptography objects
    # (and pyOpenSSL 26 warns on its own X509).
    options = CertificateOptions(
        certificate=cast(Any, certificate),
        privateKey=cast(Any, private_key),
        trustRoot=trustRootFromCertificates([Certificate.loadPEM(a.public_bytes(Encoding.PEM)) for a in authorities]),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AEAD_ONLY,
    )
    context = options.getContext()
    for authority in authorities:
        context.add_client_ca(authority)  # advertise which CAs we accept
    # No client-initiated renegotiation; no TLS compression.
    context.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
    # The same flags Twisted sets for a trust root, plus checks OpenSSL
    # leaves out: a client certificate must be meant for client use, and
    # not be revoked.
    context.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
        ClientCertificateCheck(revocations or RevocationState()),
    )
    return options


class ClientCertificateCheck:
    """The verify callback of the server context.

    OpenSSL's own CRL checking (C{X509StoreFlags.CRL_CHECK}) is not used: its
    store keeps every CRL ever added (a reload would need a new context,
    which a listening port cannot take), and it refuses every client of a CA
    that has no CRL.  The CRLs' signatures and dates are checked when they
    are loaded (L{securevault.server.revocation}).
    """

    def __init__(self, revocations: RevocationState) -> None:
        self.revocations = revocations

    def __call__(self, connection: SSL.Connection, certificate: Any, error_number: int, depth: int, ok: int) -> bool:
        """OpenSSL's chain verdict; no certificate of the chain revoked; and
        for the client's own certificate an extended key usage that includes
        clientAuth.

        OpenSSL treats a certificate without the extension as good for any
        use; a vault CA's client certificates must say they are client
        certificates (the development PKI's do).
        """
        if not ok:
            return False
        try:
            parsed = certificate.to_cryptography()
        except ValueError:
            return False
        if self.revocations.is_revoked(parsed):
            log.warn(
                "Refused a revoked client certificate (serial {serial}) at the handshake",
                serial=f"{parsed.serial_number:X}",
                event_kind="revoked_certificate",
            )
            return False
        if depth > 0:
            return True
        try:
            usage = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (x509.ExtensionNotFound, ValueError):
            return False
        return ExtendedKeyUsageOID.CLIENT_AUTH in usage


@dataclass(frozen=True)
class ClientIdentity:
    """The verified client certificate of a connection."""

    fingerprint: str  # hex SHA-256 of the DER
    subject: str
    common_name: str | None
    dns_names: tuple[str, ...]
    not_after: datetime
    # Which certificate it is, to a CRL.
    issuer: x509.Name
    serial_number: int

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate) -> ClientIdentity:
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            dns_names = tuple(san.value.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            dns_names = ()
        return cls(
            fingerprint=certificate.fingerprint(hashes.SHA256()).hex(),
            subject=certificate.subject.rfc4514_string(),
            common_name=str(names[0].value) if names else None,
            dns_names=dns_names,
            not_after=certificate.not_valid_after_utc,
            issuer=certificate.issuer,
            serial_number=certificate.serial_number,
        )

    @property
    def not_after_timestamp(self) -> float:
        return self.not_after.astimezone(UTC).timestamp()


# A connection's certificate never changes (renegotiation is refused): it is
# parsed once per transport, not once per request.
_identities: WeakKeyDictionary[Any, ClientIdentity] = WeakKeyDictionary()


def client_identity(transport: Any) -> ClientIdentity | None:
    """The peer certificate of a TLS transport, or None (no TLS, no cert)."""
    try:
        known = _identities.get(transport)
    except TypeError:  # not weakly referenceable: parse every time
        known = None
    if known is not None:
        return known
    identity = _parse_identity(transport)
    if identity is not None:
        try:
            _identities[transport] = identity
        except TypeError:
            pass
    return identity


def _parse_identity(transport: Any) -> ClientIdentity | None:
    get_peer = getattr(transport, "getPeerCertificate", None)
    if get_peer is None:
        return None
    try:
        peer = get_peer()
    except Exception:
        return None
    if peer is None:
        return None
    return ClientIdentity.from_certificate(peer.to_cryptography())
