# -*- test-case-name: tests.server.test_crl -*-
"""Revocation without a daemon: loading CRLs, following the file, the TLS
verify callback, and the pipeline refusing connections revoked meanwhile.

The CRL watch runs on a L{MemoryReactorClock} with L{run_inline}, so a poll
happens exactly when the test moves time; the pipeline is driven through
L{tests.support.app.VaultClient} over a fake mutual-TLS transport.  The
same behaviour against a real daemon is in L{tests.server.test_revocation}.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL.crypto import X509
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, capturedLogs

from securevault.admin.pki import PrivateKey, make_ca, make_client_cert, make_crl
from securevault.core.audit import AuditLog
from securevault.server.auditing import AuditTrail
from securevault.server.config import VaultConfig
from securevault.server.pools import run_inline
from securevault.server.revocation import (
    CRL_POLL_SECONDS,
    CRLError,
    CRLWatchService,
    Revocations,
    RevocationState,
    file_signature,
    load_at_start,
    parse_crls,
)
from securevault.server.tap import Options
from securevault.server.tls import ClientCertificateCheck, ClientIdentity
from tests.support.app import ClientCert, VaultClient, add_user, default_client, encode_request, make_app
from tests.support.rows import TEST_AUDIT_KEY
from tests.support.testcase import SyncTestCase

PASSWORD = "alice correct horse"
NOW = datetime.now(UTC)


class _CA:
    """A CA that can issue client certificates and CRLs."""

    def __init__(self, name: str) -> None:
        self.certificate, self.key = make_ca(name)

    def client(self, name: str) -> ClientCert:
        certificate, key = make_client_cert(self.certificate, self.key, name)
        return ClientCert(certificate, key)

    def crl(self, *revoked: x509.Certificate, now: datetime = NOW, next_update: datetime | None = None) -> bytes:
        entries = [
            x509.RevokedCertificateBuilder().serial_number(c.serial_number).revocation_date(now).build()
            for c in revoked
        ]
        return make_crl(self.certificate, self.key, entries, now=now, next_update=next_update).public_bytes(
            Encoding.PEM
        )


def _signed_with(key: PrivateKey, issuer: x509.Certificate) -> bytes:
    """An empty CRL naming C{issuer} but signed with another key."""
    return make_crl(issuer, key, []).public_bytes(Encoding.PEM)


class ParseTests(SyncTestCase):
    """parse_crls and load_at_start: what a CRL file must be."""

    def setUp(self) -> None:
        self.ca, self.other = _CA("CA one"), _CA("CA two")
        self.alice, self.bob = self.ca.client("alice"), self.ca.client("bob")

    def test_revoked_by_issuer_and_serial(self) -> None:
        """A listed certificate is revoked; another of the same CA is not, nor
        one of another CA with the very same serial number."""
        revocations = parse_crls(self.ca.crl(self.alice.certificate), [self.ca.certificate], NOW, "f")
        self.assertTrue(revocations.is_revoked(self.alice.certificate))
        self.assertFalse(revocations.is_revoked(self.bob.certificate))
        twin, _ = make_client_cert(self.other.certificate, self.other.key, "twin")
        twin_identity = ClientIdentity.from_certificate(twin)
        forged = ClientIdentity.from_certificate(self.alice.certificate)
        self.assertTrue(revocations.is_revoked(forged))
        self.assertFalse(revocations.is_revoked(replace(forged, issuer=twin_identity.issuer)))
        self.assertEqual((len(revocations), revocations.crl_count), (1, 1))
        self.assertEqual(revocations.next_update, self.ca.certificate.not_valid_after_utc)

    def test_several_crls_in_one_file(self) -> None:
        """A file may hold the CRLs of several CAs of --ca-cert; each applies
        to its own CA's certificates, and the earliest nextUpdate is kept."""
        stranger = self.other.client("stranger")
        soon = (NOW + timedelta(days=3)).replace(microsecond=0)  # CRL times are whole seconds
        data = self.ca.crl(self.alice.certificate) + b"\n" + self.other.crl(stranger.certificate, next_update=soon)
        revocations = parse_crls(data, [self.ca.certificate, self.other.certificate], NOW, "f")
        self.assertTrue(revocations.is_revoked(self.alice.certificate))
        self.assertTrue(revocations.is_revoked(stranger.certificate))
        self.assertFalse(revocations.is_revoked(self.bob.certificate))
        self.assertEqual((revocations.crl_count, revocations.next_update), (2, soon))

    def test_signed_by_another_ca(self) -> None:
        """A CRL of a CA that is not in --ca-cert, or one naming our CA but
        signed with another key, is an error naming the file."""
        error = self.assertRaises(CRLError, parse_crls, self.other.crl(), [self.ca.certificate], NOW, "/x/ca.crl")
        self.assertIn("/x/ca.crl", str(error))
        self.assertIn("not signed by a CA of --ca-cert", str(error))
        forged = _signed_with(self.other.key, self.ca.certificate)
        self.assertRaises(CRLError, parse_crls, forged, [self.ca.certificate], NOW, "f")
        # One bad CRL spoils the file: nothing half-loaded.
        mixed = self.ca.crl(self.alice.certificate) + forged
        self.assertRaises(CRLError, parse_crls, mixed, [self.ca.certificate], NOW, "f")

    def test_expired(self) -> None:
        """A CRL past its nextUpdate is an error that says when it expired."""
        old = NOW - timedelta(days=30)
        data = self.ca.crl(now=old, next_update=NOW - timedelta(days=1))
        error = self.assertRaises(CRLError, parse_crls, data, [self.ca.certificate], NOW, "f")
        self.assertIn("expired", str(error))

    def test_garbage_and_empty(self) -> None:
        """A file without a PEM CRL, a damaged one, or a DER CRL, is an error."""
        der = x509.load_pem_x509_crl(self.ca.crl()).public_bytes(Encoding.DER)
        pem = self.ca.crl().decode("ascii").splitlines()
        damaged = "\n".join([pem[0], pem[1][:10] + "AAAA" + pem[1][14:], *pem[2:]]).encode("ascii")
        for data in [b"", b"not a crl\n", der, self.ca.certificate.public_bytes(Encoding.PEM), damaged]:
            self.assertRaises(CRLError, parse_crls, data, [self.ca.certificate], NOW, "f")

    def test_delta_crl_refused(self) -> None:
        """Delta CRLs are not understood: refused rather than misread."""
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.certificate.subject)
            .last_update(NOW - timedelta(minutes=1))
            .next_update(NOW + timedelta(days=1))
            .add_extension(x509.DeltaCRLIndicator(1), critical=True)
            .sign(self.ca.key, hashes.SHA256())
        )
        error = self.assertRaises(CRLError, parse_crls, crl.public_bytes(Encoding.PEM), [self.ca.certificate], NOW, "f")
        self.assertIn("delta", str(error))

    def test_load_at_start(self) -> None:
        """A missing default file means no revocations; a missing file named
        by --crl is an error; a present one is read, with its signature."""
        path = self.make_dir() / "ca.crl"
        self.assertEqual(load_at_start(path, [self.ca.certificate], required=False, now=NOW), (Revocations(), None))
        self.assertRaises(CRLError, load_at_start, path, [self.ca.certificate], required=True, now=NOW)
        path.write_bytes(self.ca.crl(self.alice.certificate))
        revocations, signature = load_at_start(path, [self.ca.certificate], required=False, now=NOW)
        self.assertTrue(revocations.is_revoked(self.alice.certificate))
        self.assertEqual(signature, file_signature(path))
        path.write_bytes(b"junk")
        self.assertRaises(CRLError, load_at_start, path, [self.ca.certificate], required=False, now=NOW)


class VerifyCallbackTests(SyncTestCase):
    """The server context's verify callback consults the revocations in force."""

    def test_revoked_fails_at_any_depth(self) -> None:
        """A revoked certificate fails verification, whether it is the
        client's own or a CA above it; the state is read at each call, so
        a reload needs no new context."""
        ca = _CA("CA")
        alice, bob = ca.client("alice"), ca.client("bob")
        state = RevocationState()
        check = ClientCertificateCheck(state)
        connection: Any = None
        self.assertTrue(check(connection, X509.from_cryptography(alice.certificate), 0, 0, 1))
        state.current = parse_crls(ca.crl(alice.certificate), [ca.certificate], NOW, "f")
        with capturedLogs() as events:
            self.assertFalse(check(connection, X509.from_cryptography(alice.certificate), 0, 0, 1))
        self.assertEqual([e.get("event_kind") for e in events], ["revoked_certificate"])
        self.assertTrue(check(connection, X509.from_cryptography(bob.certificate), 0, 0, 1))
        self.assertFalse(check(connection, X509.from_cryptography(bob.certificate), 20, 0, 0))  # OpenSSL said no
        self.assertTrue(check(connection, X509.from_cryptography(ca.certificate), 0, 1, 1))
        state.current = Revocations(frozenset({(ca.certificate.issuer, ca.certificate.serial_number)}))
        self.assertFalse(check(connection, X509.from_cryptography(ca.certificate), 0, 1, 1))


def _kinds(events: Sequence[LogEvent]) -> list[str]:
    return [str(event["event_kind"]) for event in events if "event_kind" in event]


class WatchTests(SyncTestCase):
    """CRLWatchService follows the file: changes within a poll, SIGHUP at
    once, and a bad file keeps the last good CRL."""

    def setUp(self) -> None:
        self.ca = _CA("CA")
        self.alice, self.bob = self.ca.client("alice"), self.ca.client("bob")
        self.path = self.make_dir() / "ca.crl"
        self.write(self.ca.crl())
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW.timestamp())
        self.state = RevocationState()
        self.signals: list[Any] = []

    def write(self, data: bytes) -> None:
        """Replace the file as the admin command does (a new inode)."""
        temp = self.path.with_name("new.tmp")
        temp.write_bytes(data)
        os.replace(temp, self.path)

    def start(self, *, signals: bool = False) -> CRLWatchService:
        self.state.current, signature = load_at_start(self.path, [self.ca.certificate], required=True, now=NOW)
        service = CRLWatchService(
            self.path,
            [self.ca.certificate],
            self.state,
            run_blocking=run_inline,
            clock=self.clock,
            call_from_signal=self.signals.append if signals else None,
            signature=signature,
        )
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def test_change_applied_at_the_next_poll(self) -> None:
        """A revocation written to the file is in force after one poll
        interval, not before, and the load is logged."""
        self.start()
        self.write(self.ca.crl(self.alice.certificate))
        self.assertFalse(self.state.is_revoked(self.alice.certificate))
        with capturedLogs() as events:
            self.clock.advance(CRL_POLL_SECONDS)
        self.assertTrue(self.state.is_revoked(self.alice.certificate))
        self.assertFalse(self.state.is_revoked(self.bob.certificate))
        self.assertEqual(_kinds(events), ["crl_loaded"])

    def test_unchanged_file_not_read(self) -> None:
        """Polls of an unchanged file log nothing and replace nothing."""
        self.start()
        before = self.state.current
        with capturedLogs() as events:
            for _ in range(5):
                self.clock.advance(CRL_POLL_SECONDS)
        self.assertIs(self.state.current, before)
        self.assertEqual(_kinds(events), [])

    def test_bad_file_keeps_last_good(self) -> None:
        """Garbage, an expired CRL, or no file at all after start: the last
        good CRL stays in force and each problem is logged once."""
        self.write(self.ca.crl(self.alice.certificate))
        self.start()
        with capturedLogs() as events:
            self.write(b"garbage")
            for _ in range(3):
                self.clock.advance(CRL_POLL_SECONDS)
            self.write(self.ca.crl(now=NOW - timedelta(days=9), next_update=NOW - timedelta(days=1)))
            for _ in range(3):
                self.clock.advance(CRL_POLL_SECONDS)
            self.path.unlink()
            for _ in range(3):
                self.clock.advance(CRL_POLL_SECONDS)
        self.assertTrue(self.state.is_revoked(self.alice.certificate))
        self.assertEqual(_kinds(events), ["crl_rejected"] * 3)
        self.assertIn(str(self.path), str(events[0]["error"]))
        self.assertIn("expired", str(events[1]["error"]))
        # A good file later is taken again.
        self.write(self.ca.crl(self.bob.certificate))
        self.clock.advance(CRL_POLL_SECONDS)
        self.assertEqual(
            (self.state.is_revoked(self.alice.certificate), self.state.is_revoked(self.bob.certificate)),
            (False, True),
        )

    def test_expiry_of_the_crl_in_force_is_logged_once(self) -> None:
        """When the CRL in force passes its nextUpdate it stays in force and
        a warning says so, once."""
        self.write(self.ca.crl(self.alice.certificate, next_update=NOW + timedelta(seconds=5)))
        self.start()
        with capturedLogs() as events:
            for _ in range(6):
                self.clock.advance(CRL_POLL_SECONDS)
        self.assertEqual(_kinds(events), ["crl_expired"])
        self.assertTrue(self.state.is_revoked(self.alice.certificate))

    def test_reload_reads_an_unchanged_file(self) -> None:
        """reload (what SIGHUP does) reads the file even when the poll sees
        no change in it."""
        self.state.current = load_at_start(self.path, [self.ca.certificate], required=True, now=NOW)[0]
        self.write(self.ca.crl(self.alice.certificate))
        # A watch that already knows this file's signature, as after a poll.
        service = CRLWatchService(
            self.path,
            [self.ca.certificate],
            self.state,
            run_blocking=run_inline,
            clock=self.clock,
            signature=file_signature(self.path),
        )
        service.startService()
        self.addCleanup(service.stopService)
        for _ in range(3):
            self.clock.advance(CRL_POLL_SECONDS)
        self.assertFalse(self.state.is_revoked(self.alice.certificate))
        self.successResultOf(service.reload())
        self.assertTrue(self.state.is_revoked(self.alice.certificate))

    def test_sighup(self) -> None:
        """SIGHUP schedules a reload on the reactor thread, then calls the
        handler installed before; stopping restores that handler."""
        calls: list[int] = []

        def previous(number: int, frame: FrameType | None) -> None:
            calls.append(number)

        saved = signal.signal(signal.SIGHUP, previous)
        self.addCleanup(signal.signal, signal.SIGHUP, saved)
        service = self.start(signals=True)
        self.write(self.ca.crl(self.alice.certificate))
        signal.raise_signal(signal.SIGHUP)
        self.assertEqual((len(self.signals), calls), (1, [signal.SIGHUP]))
        self.assertFalse(self.state.is_revoked(self.alice.certificate))  # scheduled, not yet run
        with capturedLogs() as events:
            self.signals[0]()  # the reactor runs it
        self.assertTrue(self.state.is_revoked(self.alice.certificate))
        self.assertIn("on SIGHUP", str(events[0]["why"]))
        service.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)


# -- the pipeline -------------------------------------------------------------


class PipelineTests(SyncTestCase):
    """A connection whose certificate is revoked after its handshake is
    refused from its next request on: 401 invalid_session, then closed."""

    def setUp(self) -> None:
        self.app, clock = make_app(self)
        add_user(self.app, "alice", PASSWORD)
        self.client = VaultClient(self.app, clock, self)
        self.alice = default_client(0)

    def revoke(self, who: ClientCert) -> None:
        identity = ClientIdentity.from_certificate(who.certificate)
        self.app.revocations.current = Revocations(frozenset({(identity.issuer, identity.serial_number)}))

    def test_open_connection_refused_after_revocation(self) -> None:
        """A keep-alive connection logged in before the revocation: its next
        request (with the session) is 401 invalid_session with
        WWW-Authenticate and Connection: close, and the server closes it;
        another certificate is served as before."""
        session = self.client.session("alice", PASSWORD, cert=self.alice)
        connection = self.client.connect(self.alice)
        auth = [(b"Authorization", b"Bearer " + session.encode("ascii"))]
        connection.send(encode_request(b"GET", b"/get-files", auth))
        self.assertEqual([r.status for r in connection.responses()], [200])
        self.revoke(self.alice)
        with capturedLogs() as events:
            connection.send(encode_request(b"GET", b"/get-files", auth))
        responses = connection.responses()
        self.assertEqual([r.status for r in responses], [200, 401])
        self.assertEqual(responses[1].json()["error"], "invalid_session")
        self.assertEqual(responses[1].header("www-authenticate"), "Bearer")
        self.assertEqual(responses[1].header("connection"), "close")
        self.assertTrue(connection.closed_by_server)
        self.assertIn("revoked_certificate", _kinds(events))
        self.assertNotIn(session, json.dumps([str(e) for e in events]))
        self.assertEqual(self.client.get(b"/health", cert=default_client(1)).status, 200)

    def test_every_request_refused(self) -> None:
        """Not only session-bearing requests: /health, /login and an unknown
        path on a revoked connection are refused the same way."""
        self.revoke(self.alice)
        for method, target, body in [
            (b"GET", b"/health", None),
            (b"POST", b"/login", json.dumps({"username": "alice", "password": PASSWORD}).encode()),
            (b"GET", b"/nowhere", None),
        ]:
            response = self.client.request(method, target, body=body, cert=self.alice)
            self.assertEqual((response.status, response.json()["error"]), (401, "invalid_session"), target)

    def test_upload_body_not_taken(self) -> None:
        """A raw upload on a revoked connection is refused from its head:
        no byte of the body is stored, and the refusal is audited."""
        session = self.client.session("alice", PASSWORD, cert=self.alice)
        audit = AuditLog(self.make_dir() / "audit.jsonl", TEST_AUDIT_KEY)
        self.app.audit_trail = AuditTrail(audit, self.app.run_blocking, self.client.clock)
        self.app.audit_trail.startService()
        self.revoke(self.alice)
        connection = self.client.connect(self.alice)
        connection.send(
            b"POST /upload-file HTTP/1.1\r\nHost: v\r\nContent-Type: application/octet-stream\r\n"
            b"X-Filename: a.bin\r\nAuthorization: Bearer " + session.encode("ascii") + b"\r\n"
            b"Content-Length: 10\r\n\r\n0123456789"
        )
        self.assertEqual([r.status for r in connection.responses()], [401])
        self.assertEqual(self.app.storage.metadata.list_archives(self.app.users.user_id("alice") or ""), [])
        self.client.clock.advance(2)  # refusals are written coalesced, once a second
        records = [json.loads(line) for line in audit.path.read_text().splitlines()]
        self.assertEqual(
            [(r["event"], r["fingerprint"]) for r in records], [("revoked_certificate_refused", self.alice.fingerprint)]
        )


class OptionTests(SyncTestCase):
    """--crl: a file named by the operator must exist; by default ca.crl
    beside --ca-cert is followed once it exists."""

    def config(self, *argv: str) -> VaultConfig:
        options = Options()
        options.parseOptions(list(argv))
        return VaultConfig.from_options(options)

    def test_default_beside_ca_cert(self) -> None:
        """Without --crl the CRL is ca.crl in --ca-cert's directory, optional."""
        self.assertEqual((self.config().crl, self.config().crl_required), (Path("certs/ca.crl"), False))
        config = self.config("--ca-cert", "/etc/vault/ca.pem")
        self.assertEqual((config.crl, config.crl_required), (Path("/etc/vault/ca.crl"), False))

    def test_named(self) -> None:
        """--crl FILE is that file, required."""
        config = self.config("--crl", "/x/revoked.pem")
        self.assertEqual((config.crl, config.crl_required), (Path("/x/revoked.pem"), True))
