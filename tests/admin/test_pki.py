# -*- test-case-name: tests.admin.test_pki -*-
"""Tests for L{securevault.admin.pki}: the development CA and its certificates."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from securevault.admin.pki import (
    PkiError,
    format_serial,
    init_dev_pki,
    issue_client_cert,
    load_cert,
    load_key,
    make_ca,
    make_client_cert,
    make_server_cert,
    revoke_certificate,
    write_cert,
    write_key,
)
from tests.support.testcase import SyncTestCase

PKI_FILES = ["ca.crt", "ca.key", "ca.crl", "server.crt", "server.key", "client.crt", "client.key"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Raise unless C{cert} names C{ca_cert} as issuer and its signature verifies."""
    cert.verify_directly_issued_by(ca_cert)


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _dns_names(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.DNSName)


class MakeCertTests(SyncTestCase):
    """The certificate builders produce what mutual TLS and chain checks need."""

    def setUp(self) -> None:
        self.ca_cert, self.ca_key = make_ca("Test CA")

    def test_ca_extensions(self) -> None:
        """The CA is a critical CA=True certificate allowed to sign certificates and CRLs."""
        constraints = self.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = self.ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign)
        self.assertTrue(usage.crl_sign)
        self.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        _assert_signed_by(self.ca_cert, self.ca_cert)

    def test_default_validity(self) -> None:
        """By default the CA starts a few minutes ago and lasts about ten years,
        and a leaf lasts 825 days."""
        now = datetime.now(UTC)
        self.assertLess(self.ca_cert.not_valid_before_utc, now)
        self.assertGreater(self.ca_cert.not_valid_before_utc, now - timedelta(minutes=10))
        self.assertGreater(self.ca_cert.not_valid_after_utc, now + timedelta(days=3649))
        leaf, _ = make_client_cert(self.ca_cert, self.ca_key, "alice")
        lifetime = leaf.not_valid_after_utc - now
        self.assertTrue(timedelta(days=824) < lifetime <= timedelta(days=825))

    def test_explicit_validity(self) -> None:
        """Explicit dates are used as given, which lets tests build expired certificates."""
        start = datetime(2020, 1, 1, tzinfo=UTC)
        end = datetime(2020, 2, 1, tzinfo=UTC)
        cert, _ = make_client_cert(self.ca_cert, self.ca_key, "old", not_before=start, not_after=end)
        self.assertEqual((cert.not_valid_before_utc, cert.not_valid_after_utc), (start, end))

    def test_inverted_validity_refused(self) -> None:
        """A not_after before not_before is an error, not a useless certificate."""
        start = datetime(2020, 1, 1, tzinfo=UTC)
        self.assertRaises(PkiError, make_ca, "CA", not_before=start, not_after=start)

    def test_reuse_ca_key(self) -> None:
        """make_ca with key= certifies that key."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert, returned = make_ca("CA", key=key)
        self.assertIs(returned, key)
        self.assertEqual(cert.public_key(), key.public_key())

    def test_server_cert(self) -> None:
        """The server certificate is for serverAuth, names its hosts and IPs,
        uses the first hostname as CN, and chains to the CA."""
        cert, _ = make_server_cert(
            self.ca_cert, self.ca_key, hostnames=("vault.test", "localhost"), ips=("127.0.0.1", "::1")
        )
        _assert_signed_by(cert, self.ca_cert)
        self.assertEqual(_usages(cert), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertEqual(_dns_names(cert), ["vault.test", "localhost"])
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sans.get_values_for_type(x509.IPAddress), [ip_address("127.0.0.1"), ip_address("::1")])
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "vault.test")
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = self.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.assertEqual(aki.key_identifier, ski.digest)

    def test_client_cert_default_san(self) -> None:
        """A client certificate is for clientAuth and its SAN defaults to its CN."""
        cert, _ = make_client_cert(self.ca_cert, self.ca_key, "alice")
        _assert_signed_by(cert, self.ca_cert)
        self.assertEqual(_usages(cert), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(_dns_names(cert), ["alice"])
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        self.assertFalse(constraints.ca)

    def test_client_cert_explicit_sans(self) -> None:
        """Given SANs replace the default one."""
        cert, _ = make_client_cert(self.ca_cert, self.ca_key, "alice", sans=["a.test", "b.test"])
        self.assertEqual(_dns_names(cert), ["a.test", "b.test"])

    def test_other_ca_does_not_verify(self) -> None:
        """A certificate from another CA fails the signature check against ours."""
        other_cert, other_key = make_ca("Other CA")
        cert, _ = make_client_cert(other_cert, other_key, "mallory")
        self.assertRaises(Exception, _assert_signed_by, cert, self.ca_cert)  # noqa: B017 (any failure will do)


class WriteTests(SyncTestCase):
    """Certificates are public files; keys are private and never overwritten."""

    def test_modes_and_round_trip(self) -> None:
        """write_cert makes a 0644 file and write_key a 0600 file that load back."""
        directory = self.make_dir()
        cert, key = make_ca("CA")
        write_cert(directory / "ca.crt", cert)
        write_key(directory / "ca.key", key)
        self.assertEqual(_mode(directory / "ca.crt"), 0o644)
        self.assertEqual(_mode(directory / "ca.key"), 0o600)
        self.assertEqual(load_cert(directory / "ca.crt"), cert)
        loaded = load_key(directory / "ca.key")
        self.assertEqual(
            loaded.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        )
        self.assertIn(b"BEGIN PRIVATE KEY", (directory / "ca.key").read_bytes())

    def test_key_not_overwritten(self) -> None:
        """write_key refuses an existing file and leaves it as it was."""
        path = self.make_dir() / "x.key"
        path.write_bytes(b"original")
        _, key = make_ca("CA")
        self.assertRaises(PkiError, write_key, path, key)
        self.assertEqual(path.read_bytes(), b"original")


class InitDevPkiTests(SyncTestCase):
    """init_dev_pki creates what is absent and never replaces what exists."""

    def test_creates_everything(self) -> None:
        """In an empty place it creates the directory (0700), all seven files
        (keys 0600), and the leaves chain to the CA."""
        certs = self.make_dir() / "certs"
        created = init_dev_pki(certs, client_name="laptop")
        names = [p.name for p in created]
        self.assertEqual(
            sorted(names),
            sorted(["ca.crt", "ca.key", "ca.crl", "server.crt", "server.key", "laptop.crt", "laptop.key"]),
        )
        self.assertTrue(all(p.is_absolute() for p in created))
        self.assertEqual(_mode(certs), 0o700)
        for path in created:
            self.assertEqual(_mode(path), 0o600 if path.suffix == ".key" else 0o644, path)
        ca = load_cert(certs / "ca.crt")
        server, client = load_cert(certs / "server.crt"), load_cert(certs / "laptop.crt")
        _assert_signed_by(server, ca)
        _assert_signed_by(client, ca)
        self.assertEqual(_usages(client), [ExtendedKeyUsageOID.CLIENT_AUTH])
        cn = client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "laptop")
        self.assertEqual(_dns_names(server), ["localhost"])

    def test_idempotent(self) -> None:
        """A second run creates nothing and changes no byte."""
        certs = self.make_dir()
        init_dev_pki(certs)
        before = {name: (certs / name).read_bytes() for name in PKI_FILES}
        self.assertEqual(init_dev_pki(certs), [])
        self.assertEqual({name: (certs / name).read_bytes() for name in PKI_FILES}, before)

    def test_missing_leaf_signed_by_existing_ca(self) -> None:
        """A deleted client pair is recreated and signed by the existing CA."""
        certs = self.make_dir()
        init_dev_pki(certs)
        ca_bytes = (certs / "ca.crt").read_bytes()
        (certs / "client.crt").unlink()
        (certs / "client.key").unlink()
        created = init_dev_pki(certs)
        self.assertEqual(sorted(p.name for p in created), ["client.crt", "client.key"])
        self.assertEqual((certs / "ca.crt").read_bytes(), ca_bytes)
        _assert_signed_by(load_cert(certs / "client.crt"), load_cert(certs / "ca.crt"))

    def test_half_pair_refused(self) -> None:
        """A certificate without its key is refused rather than paired with a new key."""
        certs = self.make_dir()
        init_dev_pki(certs)
        (certs / "server.key").unlink()
        error = self.assertRaises(PkiError, init_dev_pki, certs)
        self.assertIn("server.key", str(error))

    def test_missing_ca_key_with_missing_leaf(self) -> None:
        """Without ca.key a missing leaf cannot be signed, and the error says so."""
        certs = self.make_dir()
        init_dev_pki(certs)
        (certs / "ca.key").unlink()
        (certs / "client.crt").unlink()
        (certs / "client.key").unlink()
        error = self.assertRaises(PkiError, init_dev_pki, certs)
        self.assertIn("CA key", str(error))


class IssueClientCertTests(SyncTestCase):
    """issue_client_cert adds clients to an existing development CA."""

    def setUp(self) -> None:
        self.certs = self.make_dir()
        init_dev_pki(self.certs)

    def test_issue(self) -> None:
        """NAME.crt/NAME.key are created (key 0600), chain to the CA and are for clientAuth."""
        cert_path, key_path = issue_client_cert(self.certs, "bob.phone")
        self.assertEqual((cert_path, key_path), (self.certs / "bob.phone.crt", self.certs / "bob.phone.key"))
        self.assertEqual(_mode(key_path), 0o600)
        cert = load_cert(cert_path)
        _assert_signed_by(cert, load_cert(self.certs / "ca.crt"))
        self.assertEqual(_usages(cert), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(_dns_names(cert), ["bob.phone"])

    def test_existing_refused(self) -> None:
        """An existing name is refused and its files are left alone."""
        before = (self.certs / "client.key").read_bytes()
        error = self.assertRaises(PkiError, issue_client_cert, self.certs, "client")
        self.assertIn("already exists", str(error))
        self.assertEqual((self.certs / "client.key").read_bytes(), before)

    def test_bad_names_refused(self) -> None:
        """Names that could escape the directory, are empty, too long or reserved are refused."""
        for name in ["", "../evil", "a/b", "x" * 65, "ca", "server", ".", "..", "sp ace", "é"]:
            self.assertRaises(PkiError, issue_client_cert, self.certs, name)
        self.assertEqual(sorted(p.name for p in self.certs.iterdir()), sorted(PKI_FILES))

    def test_no_ca(self) -> None:
        """Without a CA the error tells the operator to run init."""
        error = self.assertRaises(PkiError, issue_client_cert, self.make_dir(), "alice")
        self.assertIn("securevault-admin init", str(error))


def _crl(certs: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((certs / "ca.crl").read_bytes())


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


class DevCrlTests(SyncTestCase):
    """init writes the development CA's empty CRL; an older PKI gets one."""

    def test_init_writes_empty_signed_crl(self) -> None:
        """ca.crl is an empty PEM CRL (mode 0644) signed by the dev CA, good
        until the CA itself expires."""
        certs = self.make_dir()
        init_dev_pki(certs)
        crl, ca = _crl(certs), load_cert(certs / "ca.crt")
        self.assertEqual(len(crl), 0)
        self.assertEqual(crl.issuer, ca.subject)
        self.assertTrue(crl.is_signature_valid(ca.public_key()))  # type: ignore[arg-type]
        self.assertEqual(crl.next_update_utc, ca.not_valid_after_utc)
        self.assertLess(crl.last_update_utc, datetime.now(UTC))
        self.assertEqual(_mode(certs / "ca.crl"), 0o644)

    def test_older_pki_gets_crl(self) -> None:
        """On a PKI made before CRLs, init creates only ca.crl."""
        certs = self.make_dir()
        init_dev_pki(certs)
        (certs / "ca.crl").unlink()
        self.assertEqual(init_dev_pki(certs), [certs / "ca.crl"])
        self.assertEqual(len(_crl(certs)), 0)

    def test_no_ca_key_no_crl(self) -> None:
        """A CA whose key is kept elsewhere gets no CRL, and init does not fail."""
        certs = self.make_dir()
        init_dev_pki(certs)
        (certs / "ca.crl").unlink()
        (certs / "ca.key").unlink()
        self.assertEqual(init_dev_pki(certs), [])
        self.assertFalse((certs / "ca.crl").exists())


class RevokeTests(SyncTestCase):
    """revoke_certificate adds a certificate to the development CA's CRL."""

    def setUp(self) -> None:
        self.certs = self.make_dir()
        init_dev_pki(self.certs)
        self.ca = load_cert(self.certs / "ca.crt")

    def test_by_name(self) -> None:
        """NAME revokes certs/NAME.crt: the re-signed CRL lists its serial, with
        a higher CRL number."""
        serial = load_cert(self.certs / "client.crt").serial_number
        before = _crl_number(_crl(self.certs))
        result = revoke_certificate(self.certs, "client")
        self.assertEqual(
            (result.serial, result.already_revoked, result.crl_path, result.certificate),
            (serial, False, self.certs / "ca.crl", self.certs / "client.crt"),
        )
        crl = _crl(self.certs)
        self.assertEqual([entry.serial_number for entry in crl], [serial])
        self.assertTrue(crl.is_signature_valid(self.ca.public_key()))  # type: ignore[arg-type]
        self.assertGreater(_crl_number(crl), before)
        self.assertEqual(crl.next_update_utc, self.ca.not_valid_after_utc)
        self.assertEqual(_mode(self.certs / "ca.crl"), 0o644)

    def test_by_serial_without_file(self) -> None:
        """A serial in hex works without any certificate file, in the forms
        openssl prints (upper case), with 0x, lower case or colons; earlier
        entries stay."""
        first = load_cert(self.certs / "client.crt").serial_number
        revoke_certificate(self.certs, "client")
        for text, serial in [("1A2B", 0x1A2B), ("0xdeadbeef", 0xDEADBEEF), ("01:02:03", 0x010203)]:
            result = revoke_certificate(self.certs, text)
            self.assertEqual((result.serial, result.certificate), (serial, None))
        self.assertEqual(
            sorted(entry.serial_number for entry in _crl(self.certs)), sorted([first, 0x1A2B, 0xDEADBEEF, 0x010203])
        )
        self.assertEqual(format_serial(0x1A2B), "1A2B")

    def test_idempotent(self) -> None:
        """Revoking twice (by name, then by serial) changes no byte the second time."""
        serial = revoke_certificate(self.certs, "client").serial
        before = (self.certs / "ca.crl").read_bytes()
        again = revoke_certificate(self.certs, format_serial(serial))
        self.assertEqual((again.serial, again.already_revoked), (serial, True))
        self.assertTrue(revoke_certificate(self.certs, "client").already_revoked)
        self.assertEqual((self.certs / "ca.crl").read_bytes(), before)
        self.assertEqual(len(_crl(self.certs)), 1)

    def test_without_crl_file(self) -> None:
        """A PKI from before CRLs gets its ca.crl on the first revocation."""
        (self.certs / "ca.crl").unlink()
        serial = revoke_certificate(self.certs, "client").serial
        self.assertEqual([entry.serial_number for entry in _crl(self.certs)], [serial])

    def test_refusals(self) -> None:
        """An unknown name (not hex either), the CA itself, a serial out of
        range, a certificate of another CA and a foreign CRL are refused,
        and the CRL is left as it was."""
        before = (self.certs / "ca.crl").read_bytes()
        error = self.assertRaises(PkiError, revoke_certificate, self.certs, "nobody")
        self.assertIn("nobody.crt", str(error))
        self.assertIn("serial", str(error))
        self.assertIn("CA", str(self.assertRaises(PkiError, revoke_certificate, self.certs, "ca")))
        self.assertRaises(PkiError, revoke_certificate, self.certs, format_serial(self.ca.serial_number))
        self.assertRaises(PkiError, revoke_certificate, self.certs, "0")
        self.assertRaises(PkiError, revoke_certificate, self.certs, "F" * 40)
        other_ca, other_key = make_ca("Other CA")
        stranger, _ = make_client_cert(other_ca, other_key, "stranger")
        write_cert(self.certs / "stranger.crt", stranger)
        error = self.assertRaises(PkiError, revoke_certificate, self.certs, "stranger")
        self.assertIn("not issued by", str(error))
        self.assertEqual((self.certs / "ca.crl").read_bytes(), before)
        foreign = self.make_dir()
        init_dev_pki(foreign)
        (self.certs / "ca.crl").write_bytes((foreign / "ca.crl").read_bytes())
        error = self.assertRaises(PkiError, revoke_certificate, self.certs, "client")
        self.assertIn("not signed by this CA", str(error))

    def test_no_ca(self) -> None:
        """Without the CA key nothing can be revoked, and the error says so."""
        (self.certs / "ca.key").unlink()
        error = self.assertRaises(PkiError, revoke_certificate, self.certs, "client")
        self.assertIn("CA key", str(error))
