# -*- test-case-name: tests.admin.test_pki -*-
"""A development PKI: one CA, a server certificate and client certificates.

The daemon requires mutual TLS, so nobody can try it without certificates;
C{securevault-admin init} and C{securevault-admin cert client} build them with
this module.  It is meant for development and small private deployments: the
CA key sits unencrypted next to the certificates (mode 0600), so production
operators are expected to bring their own CA.

Plain blocking code with no Twisted imports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securevault.core.fsutil import fsync_directory, write_all, write_atomically

PrivateKey = CertificateIssuerPrivateKeyTypes
"""Any key that can sign a certificate (the ones we generate are EC P-256)."""

BACKDATE = timedelta(minutes=5)
"""How far C{not_before} defaults into the past, so that a peer whose clock is
a little behind does not reject a certificate made a moment ago."""

CA_LIFETIME = timedelta(days=3650)
LEAF_LIFETIME = timedelta(days=825)
"""The longest leaf lifetime browsers and most TLS stacks still accept."""

CLIENT_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
RESERVED_NAMES = frozenset({"ca", "server"})
"""Names whose files belong to L{init_dev_pki}, not to a client."""

CRL_NAME = "ca.crl"
SERIAL_PATTERN = re.compile(r"(?:0x)?([0-9A-Fa-f]{1,40}(?::[0-9A-Fa-f]{2})*)")
"""A serial as C{openssl x509 -serial} prints it, or with C{0x} or colons."""

CERT_MODE = 0o644
KEY_MODE = 0o600
DIRECTORY_MODE = 0o700


class PkiError(Exception):
    """A certificate or key cannot be made; the message says what to do."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key: small, fast, and accepted by every TLS 1.2+ stack."""
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    """Ed25519/Ed448 sign without a separate hash; everything else uses SHA-256."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _validity(
    not_before: datetime | None, not_after: datetime | None, lifetime: timedelta
) -> tuple[datetime, datetime]:
    start = not_before if not_before is not None else datetime.now(UTC) - BACKDATE
    end = not_after if not_after is not None else start + BACKDATE + lifetime
    if end <= start:
        raise PkiError("A certificate's not_after must be later than its not_before.")
    return start, end


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Name the CA by its own SKI when it has one, so chain building matches."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def make_ca(
    common_name: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA certificate (10 years by default) and its key.

    C{key} lets an existing CA key be reused, e.g. when only C{ca.crt} was lost.
    """
    ca_key: PrivateKey = key if key is not None else generate_key()
    start, end = _validity(not_before, not_after, CA_LIFETIME)
    public_key = ca_key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )
    return cert, ca_key


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    not_before: datetime | None,
    not_after: datetime | None,
) -> tuple[x509.Certificate, PrivateKey]:
    """An end-entity certificate for one extended key usage, signed by the CA."""
    start, end = _validity(not_before, not_after, LEAF_LIFETIME)
    if not_after is None:
        # A default lifetime never outlives the CA that vouches for it.
        end = min(end, ca_cert.not_valid_after_utc)
    key = generate_key()
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )
    return cert, key


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    *,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A server certificate whose SANs let clients verify C{hostnames} and C{ips}."""
    if not hostnames:
        raise PkiError("A server certificate needs at least one hostname.")
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in hostnames]
    sans += [x509.IPAddress(ip_address(ip)) for ip in ips]
    return _make_leaf(
        ca_cert,
        ca_key,
        hostnames[0],
        sans,
        ExtendedKeyUsageOID.SERVER_AUTH,
        not_before,
        not_after,
    )


def make_client_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    *,
    sans: Sequence[str] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A client certificate for mutual TLS.

    The SAN defaults to C{DNSName(common_name)} so that a C{--bind-user san}
    policy has a name to match even when no SANs are given.
    """
    names = list(sans) if sans else [common_name]
    return _make_leaf(
        ca_cert,
        ca_key,
        common_name,
        [x509.DNSName(name) for name in names],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before,
        not_after,
    )


def write_cert(path: Path, cert: x509.Certificate) -> None:
    """Write a PEM certificate, world-readable (mode 0644): it is public."""
    write_atomically(path, cert.public_bytes(serialization.Encoding.PEM), mode=CERT_MODE)
    os.chmod(path, CERT_MODE)  # the umask may have narrowed it


def write_key(path: Path, key: PrivateKey) -> None:
    """Write an unencrypted PKCS#8 PEM key, mode 0600, refusing to overwrite.

    The file is created exclusively with its final mode, so the key is never
    readable by others, not even for a moment, and an existing key (perhaps
    the one a deployed certificate belongs to) is never replaced.
    """
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, KEY_MODE)
    except FileExistsError as error:
        raise PkiError(f"The key file {path} already exists; it was not overwritten.") from error
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    fsync_directory(path.parent)


def load_cert(path: Path) -> x509.Certificate:
    """Read one PEM certificate; L{PkiError} says which file is wrong."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as error:
        raise PkiError(f"The file {path} is not a PEM certificate.") from error


def load_key(path: Path) -> PrivateKey:
    """Read an unencrypted PEM private key that can sign certificates."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise PkiError(f"The file {path} is not an unencrypted PEM private key.") from error
    if not isinstance(
        key,
        (
            ec.EllipticCurvePrivateKey,
            rsa.RSAPrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        raise PkiError(f"The key in {path} cannot sign certificates.")
    return key


def _public_der(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_ca(certs_dir: Path) -> tuple[x509.Certificate, PrivateKey]:
    """The CA from C{certs_dir}, checked to be a matching certificate and key."""
    cert_path, key_path = certs_dir / "ca.crt", certs_dir / "ca.key"
    if not cert_path.exists():
        raise PkiError(f"There is no CA certificate at {cert_path}; run 'securevault-admin init' first.")
    if not key_path.exists():
        raise PkiError(
            f"There is no CA key at {key_path}, so no certificate can be signed; "
            "run 'securevault-admin init' first or restore the CA key."
        )
    cert, key = load_cert(cert_path), load_key(key_path)
    cert_public = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if cert_public != _public_der(key):
        raise PkiError(f"The CA key {key_path} does not belong to the certificate {cert_path}.")
    return cert, key


def _ensure_directory(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(parents=True, mode=DIRECTORY_MODE)
        os.chmod(directory, DIRECTORY_MODE)  # mkdir's mode is filtered by the umask


def init_dev_pki(certs_dir: Path, client_name: str = "client") -> list[Path]:
    """Create the CA, server and client certificates and keys, and the CA's
    empty CRL (C{ca.crl}), that are absent.

    Existing files are never replaced, so rerunning is safe; a missing leaf is
    signed by the existing CA.  A certificate without its key (or the reverse)
    is refused rather than silently paired with a new, unrelated file.

    @return: the files created now, in creation order.
    """
    _ensure_directory(certs_dir)
    created: list[Path] = []
    ca_crt, ca_key_path = certs_dir / "ca.crt", certs_dir / "ca.key"
    leaves = {
        "server": lambda cert, key: make_server_cert(cert, key),
        client_name: lambda cert, key: make_client_cert(cert, key, client_name),
    }
    for name in leaves:
        crt, key_file = certs_dir / f"{name}.crt", certs_dir / f"{name}.key"
        if crt.exists() != key_file.exists():
            present, absent = (crt, key_file) if crt.exists() else (key_file, crt)
            raise PkiError(
                f"{present} exists but {absent} does not; restore it or remove both so they can be created again."
            )
    missing = [name for name in leaves if not (certs_dir / f"{name}.crt").exists()]

    if not ca_crt.exists() and not ca_key_path.exists() and len(missing) < len(leaves):
        raise PkiError(
            f"Certificates exist in {certs_dir} but the CA that signed them is gone; "
            "remove them too, or restore ca.crt and ca.key."
        )
    if not ca_crt.exists():
        # Reuse a lone ca.key rather than refuse: the certificate can be rebuilt.
        existing_key = load_key(ca_key_path) if ca_key_path.exists() else None
        ca_cert, ca_key = make_ca("securevault development CA", key=existing_key)
        if existing_key is None:
            write_key(ca_key_path, ca_key)
            created.append(ca_key_path)
        write_cert(ca_crt, ca_cert)
        created.append(ca_crt)
    elif missing:
        ca_cert, ca_key = _load_ca(certs_dir)

    for name in missing:
        cert, key = leaves[name](ca_cert, ca_key)
        key_path, cert_path = certs_dir / f"{name}.key", certs_dir / f"{name}.crt"
        write_key(key_path, key)
        write_cert(cert_path, cert)
        created += [cert_path, key_path]
    crl_path = certs_dir / CRL_NAME
    # A CA whose key is kept elsewhere cannot sign a CRL: it is left out then.
    if not crl_path.exists() and ca_key_path.exists():
        ca_cert, ca_key = _load_ca(certs_dir)
        write_crl(crl_path, make_crl(ca_cert, ca_key, []))
        created.append(crl_path)
    return created


def validate_client_name(name: str) -> None:
    """Refuse names that are unsafe as file names or that belong to init."""
    if not CLIENT_NAME_PATTERN.fullmatch(name):
        raise PkiError(
            f"The client name {name!r} is not allowed; use 1 to 64 letters, digits, dots, underscores or hyphens."
        )
    if name in RESERVED_NAMES or name in {".", ".."}:
        raise PkiError(f"The client name {name!r} is reserved; choose another name.")


def issue_client_cert(certs_dir: Path, name: str) -> tuple[Path, Path]:
    """Create C{NAME.crt} and C{NAME.key}, signed by the CA in C{certs_dir}.

    @return: the certificate path and the key path.
    """
    validate_client_name(name)
    cert_path, key_path = certs_dir / f"{name}.crt", certs_dir / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise PkiError(f"{path} already exists; choose another name or remove it first.")
    ca_cert, ca_key = _load_ca(certs_dir)
    cert, key = make_client_cert(ca_cert, ca_key, name)
    write_key(key_path, key)
    write_cert(cert_path, cert)
    return cert_path, key_path


# -- revocation -------------------------------------------------------------


@dataclass(frozen=True)
class RevokeResult:
    """What L{revoke_certificate} did."""

    serial: int
    crl_path: Path
    already_revoked: bool  # True: the CRL listed it already and was left as it was
    certificate: Path | None = None  # the certificate file it was named by, if any


def format_serial(serial: int) -> str:
    """A serial in upper-case hex, as C{openssl x509 -serial} prints it."""
    return f"{serial:X}"


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 0
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    revoked: Sequence[x509.RevokedCertificate],
    *,
    number: int = 1,
    now: datetime | None = None,
    next_update: datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL of C{ca_cert} listing C{revoked}, signed by C{ca_key}.

    Its nextUpdate defaults to the CA's own notAfter: nothing re-issues the
    development CA's CRL on a schedule, and the daemon refuses an expired CRL
    at start, so a short nextUpdate would stop a vault from starting months
    later for no reason.  A CRL is never good longer than its CA anyway.
    """
    issued = now if now is not None else datetime.now(UTC)
    until = next_update if next_update is not None else ca_cert.not_valid_after_utc
    if until <= issued:
        raise PkiError("The CA has expired; it can no longer issue a CRL.")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(issued - BACKDATE)
        .next_update(until)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, _hash_for(ca_key))


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    """Write a PEM CRL atomically, world-readable (mode 0644): it is public,
    and a daemon re-reading it sees the old or the new one, never half."""
    write_atomically(path, crl.public_bytes(serialization.Encoding.PEM), mode=CERT_MODE)
    os.chmod(path, CERT_MODE)  # the umask may have narrowed it


def load_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """The CRL at C{path}, checked to be signed by C{ca_cert}."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as error:
        raise PkiError(f"The file {path} is not a PEM CRL; remove it to start an empty one.") from error
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"The CRL {path} is not signed by this CA; remove it to start an empty one.")
    return crl


def _serial_to_revoke(certs_dir: Path, name_or_serial: str, ca_cert: x509.Certificate) -> tuple[int, Path | None]:
    """C{certs_dir/NAME.crt}'s serial (and that file) when it exists, else a
    hex serial (and None)."""
    if name_or_serial == "ca":
        raise PkiError("A CA cannot revoke its own certificate; for the serial number CA write 0xCA.")
    cert_path = certs_dir / f"{name_or_serial}.crt"
    if CLIENT_NAME_PATTERN.fullmatch(name_or_serial) and cert_path.exists():
        cert = load_cert(cert_path)
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise PkiError(f"{cert_path} was not issued by the CA in {certs_dir}; its CRL cannot revoke it.") from None
        return cert.serial_number, cert_path
    match = SERIAL_PATTERN.fullmatch(name_or_serial)
    if match is None:
        raise PkiError(
            f"There is no certificate {cert_path}, and {name_or_serial!r} is not a serial number in hex; "
            "give a certificate name or its serial (openssl x509 -serial -noout -in FILE)."
        )
    serial = int(match.group(1).replace(":", ""), 16)
    if not 0 < serial < 1 << 159:
        raise PkiError(f"{name_or_serial!r} is not a certificate serial number (1 to 159 bits).")
    if serial == ca_cert.serial_number:
        raise PkiError("That is the serial of the CA itself; a CA cannot revoke its own certificate.")
    return serial, None


def revoke_certificate(certs_dir: Path, name_or_serial: str, *, now: datetime | None = None) -> RevokeResult:
    """Add a certificate to the development CA's CRL (C{certs_dir/ca.crl}).

    C{name_or_serial} is a certificate name (C{certs_dir/NAME.crt}) or a
    serial number in hex, which works without the certificate file (a lost
    laptop's certificate may exist nowhere else).  The CRL is re-signed with
    a higher CRL number and replaced atomically; revoking a certificate it
    already lists changes nothing.
    """
    ca_cert, ca_key = _load_ca(certs_dir)
    serial, certificate = _serial_to_revoke(certs_dir, name_or_serial, ca_cert)
    crl_path = certs_dir / CRL_NAME
    existing = load_crl(crl_path, ca_cert) if crl_path.exists() else None
    entries = list(existing) if existing is not None else []
    if any(entry.serial_number == serial for entry in entries):
        return RevokeResult(serial, crl_path, already_revoked=True, certificate=certificate)
    revoked_at = now if now is not None else datetime.now(UTC)
    entries.append(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at).build())
    write_crl(crl_path, make_crl(ca_cert, ca_key, entries, number=_crl_number(existing) + 1, now=revoked_at))
    return RevokeResult(serial, crl_path, already_revoked=False, certificate=certificate)
