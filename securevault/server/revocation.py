# -*- test-case-name: tests.server.test_crl,tests.server.test_revocation -*-
"""Certificate revocation lists: loaded, checked, watched, and consulted.

The CRL file (C{--crl}) is read at start, where a bad or expired one stops
the daemon, and again whenever it changes (a poll of its inode, size and
times every L{CRL_POLL_SECONDS}) or the daemon gets SIGHUP; a bad file after
start leaves the last good CRL in force and is logged.  The revocations in
force live in one L{RevocationState}, which the TLS verify callback consults
for every handshake (L{securevault.server.tls}) and the pipeline for every
request of connections opened before a revocation
(L{securevault.server.web.VaultRequest}).

Only complete CRLs are understood, and each must be signed by a CA of
C{--ca-cert}; an entry revokes the certificate with that serial number
issued by the CRL's issuer.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from cryptography import x509
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from securevault.server.config import VaultConfig
from securevault.server.pools import RunBlocking

# The contract: a changed file is in force within 10 s.
CRL_POLL_SECONDS = 2.0
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.+?\r?\n-----END X509 CRL-----", re.DOTALL)

log = Logger(namespace="securevault.security")


class CRLError(Exception):
    """A CRL file cannot be used; the message names the file and the reason."""


class Issued(Protocol):
    """What identifies a certificate to a CRL: its issuer and serial number
    (a cryptography certificate, or the connection's L{ClientIdentity})."""

    @property
    def issuer(self) -> x509.Name: ...

    @property
    def serial_number(self) -> int: ...


@dataclass(frozen=True)
class Revocations:
    """The certificates a set of CRLs lists, by issuer and serial number."""

    entries: frozenset[tuple[x509.Name, int]] = frozenset()
    # The earliest nextUpdate of the CRLs (None: no CRL, or none says).
    next_update: datetime | None = None
    crl_count: int = 0

    def is_revoked(self, certificate: Issued) -> bool:
        """Whether a CRL of the certificate's issuer lists its serial."""
        return (certificate.issuer, certificate.serial_number) in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def expired(self, now: datetime) -> bool:
        return self.next_update is not None and self.next_update <= now


NO_REVOCATIONS = Revocations()


def _signed_by_one_of(crl: x509.CertificateRevocationList, authorities: Sequence[x509.Certificate]) -> bool:
    for authority in authorities:
        if authority.subject != crl.issuer:
            continue
        try:
            usage = authority.extensions.get_extension_for_class(x509.KeyUsage).value
            if not usage.crl_sign:
                continue
        except x509.ExtensionNotFound:
            pass
        try:
            if crl.is_signature_valid(authority.public_key()):  # type: ignore[arg-type]
                return True
        except (TypeError, ValueError):  # a key type that cannot sign CRLs
            continue
    return False


def parse_crls(data: bytes, authorities: Sequence[x509.Certificate], now: datetime, source: str) -> Revocations:
    """The revocations of every PEM CRL in C{data}; L{CRLError} unless there
    is at least one and each is complete, signed by one of C{authorities}
    and not past its nextUpdate."""
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise CRLError(f"CRL file {source} holds no PEM CRL (-----BEGIN X509 CRL-----)")
    entries: set[tuple[x509.Name, int]] = set()
    next_updates: list[datetime] = []
    for index, block in enumerate(blocks, start=1):
        try:
            crl = x509.load_pem_x509_crl(block)
            issuer = crl.issuer.rfc4514_string()
        except ValueError as error:
            raise CRLError(f"CRL {index} in {source} cannot be parsed: {error}") from None
        try:
            crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        except x509.ExtensionNotFound:
            pass
        else:
            raise CRLError(f"CRL {index} in {source} ({issuer}) is a delta CRL; give complete CRLs only")
        if not _signed_by_one_of(crl, authorities):
            raise CRLError(f"CRL {index} in {source} ({issuer}) is not signed by a CA of --ca-cert")
        next_update = crl.next_update_utc
        if next_update is not None:
            if next_update <= now:
                raise CRLError(
                    f"CRL {index} in {source} ({issuer}) expired at {next_update:%Y-%m-%d %H:%M:%S} UTC; "
                    "its CA must issue a new one"
                )
            next_updates.append(next_update)
        entries.update((crl.issuer, revoked.serial_number) for revoked in crl)
    return Revocations(frozenset(entries), min(next_updates, default=None), len(blocks))


@dataclass(frozen=True)
class FileSignature:
    """What tells that a file changed without reading it (a rename gives a
    new inode, a write new times, a truncation a new size)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, result: os.stat_result) -> FileSignature:
        return cls(result.st_dev, result.st_ino, result.st_size, result.st_mtime_ns, result.st_ctime_ns)


def file_signature(path: Path) -> FileSignature | None:
    """The signature of C{path}, or None when it does not exist."""
    try:
        return FileSignature.of(path.stat())
    except FileNotFoundError:
        return None


def read_crl_file(
    path: Path, authorities: Sequence[x509.Certificate], now: datetime
) -> tuple[Revocations, FileSignature]:
    """Read and check the CRL file; the signature is of the bytes read (taken
    from the open file, so a replacement racing the read is seen next time)."""
    try:
        with path.open("rb") as handle:
            signature = FileSignature.of(os.fstat(handle.fileno()))
            data = handle.read()
    except FileNotFoundError:
        raise CRLError(f"CRL file {path} does not exist") from None
    except OSError as error:
        raise CRLError(f"cannot read CRL file {path}: {error.strerror}") from None
    return parse_crls(data, authorities, now, str(path)), signature


def load_at_start(
    path: Path, authorities: Sequence[x509.Certificate], *, required: bool, now: datetime
) -> tuple[Revocations, FileSignature | None]:
    """The revocations to start with; L{CRLError} for a bad or expired file,
    or a missing one that was asked for by name (C{required})."""
    if not required and not path.exists():
        return NO_REVOCATIONS, None
    return read_crl_file(path, authorities, now)


class RevocationState:
    """The revocations in force, replaced as a whole on reload.

    Read and replaced on the reactor thread only; the TLS verify callback
    and the pipeline share one instance."""

    def __init__(self, current: Revocations = NO_REVOCATIONS) -> None:
        self.current = current

    def is_revoked(self, certificate: Issued | None) -> bool:
        return certificate is not None and self.current.is_revoked(certificate)


@dataclass(frozen=True)
class _Probe:
    """What a look at the CRL file found (built in the pool)."""

    signature: FileSignature | None
    revocations: Revocations | None = None  # read and good
    error: str | None = None  # read and bad (or unreadable)


def _probe(
    path: Path, known: FileSignature | None, force: bool, authorities: Sequence[x509.Certificate], now: datetime
) -> _Probe:
    """In the pool: stat the file, and read it when it changed or C{force}."""
    signature = file_signature(path)
    if signature is None or (signature == known and not force):
        return _Probe(signature)
    try:
        revocations, signature = read_crl_file(path, authorities, now)
    except CRLError as error:
        return _Probe(signature, error=str(error))
    return _Probe(signature, revocations=revocations)


SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class CRLWatchService(Service):
    """Re-reads the CRL file when it changes and on SIGHUP.

    The file is looked at every L{CRL_POLL_SECONDS} (a stat, in the pool; it
    is read and parsed there too, only when it changed).  A good file
    replaces the revocations in force at once, for new handshakes and for
    the next request of every open connection; a bad, expired or vanished
    one is logged once and the last good CRL stays.  SIGHUP reads the file
    whether it changed or not; twistd leaves SIGHUP alone (it rotates logs
    on SIGUSR1), but a handler found installed is still called after ours.
    """

    def __init__(
        self,
        path: Path,
        authorities: Sequence[x509.Certificate],
        state: RevocationState,
        *,
        run_blocking: RunBlocking,
        clock: IReactorTime,
        call_from_signal: Callable[[Callable[[], object]], object] | None = None,
        signature: FileSignature | None = None,
        interval: float = CRL_POLL_SECONDS,
    ) -> None:
        self.path = path
        self._authorities = list(authorities)
        self._state = state
        self._run_blocking = run_blocking
        self._clock = clock
        self._call_from_signal = call_from_signal
        self._signature = signature
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._lock = DeferredLock()
        self._warned_expired = False
        self._previous_handler: SignalHandler = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(
            lambda failure: log.failure("The CRL watch stopped", failure)
        )
        if self._call_from_signal is not None:
            try:
                self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)
            except ValueError:  # not the main thread (an embedding program): no SIGHUP then
                self._call_from_signal = None
                log.warn("SIGHUP cannot be handled here; the CRL is still re-read when it changes")

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._call_from_signal is not None and signal.getsignal(signal.SIGHUP) == self._sighup:
            signal.signal(signal.SIGHUP, self._previous_handler or signal.SIG_DFL)

    def _tick(self) -> None:
        self.check()

    def _sighup(self, number: int, frame: FrameType | None) -> None:
        """Python runs signal handlers on the main thread between bytecodes,
        maybe inside reactor code: the reload is only scheduled here."""
        assert self._call_from_signal is not None
        self._call_from_signal(self.reload)
        previous = self._previous_handler
        if callable(previous):
            previous(number, frame)

    def reload(self) -> Deferred[None]:
        """Read the file now, changed or not (SIGHUP); after a look already
        under way, if any."""
        return self._lock.run(self._look, True)

    def check(self) -> Deferred[None]:
        """Look at the file and read it if it changed; nothing when a look
        is under way already (the pool may be behind: ticks do not pile up)."""
        if self._lock.locked:
            return succeed(None)
        return self._lock.run(self._look, False)

    def _look(self, force: bool) -> Deferred[None]:
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        work = self._run_blocking(_probe, self.path, self._signature, force, self._authorities, now)
        return work.addCallback(self._apply, now, force).addErrback(
            lambda failure: log.failure("Could not check the CRL file {path}", failure, path=str(self.path))
        )

    def _apply(self, probe: _Probe, now: datetime, forced: bool) -> None:
        changed = probe.signature != self._signature
        self._signature = probe.signature
        current = self._state.current
        if probe.revocations is not None:
            self._state.current = probe.revocations
            self._warned_expired = False
            log.info(
                "Loaded CRL {path}{why}: {count} revoked certificates",
                path=str(self.path),
                why=" on SIGHUP" if forced else "",
                count=len(probe.revocations),
                crls=probe.revocations.crl_count,
                event_kind="crl_loaded",
            )
        elif probe.error is not None:
            log.warn(
                "{error}; the last good CRL stays in force",
                error=probe.error,
                path=str(self.path),
                event_kind="crl_rejected",
            )
        elif probe.signature is None and (changed or forced) and current.crl_count:
            log.warn(
                "CRL file {path} is gone; the last good CRL stays in force",
                path=str(self.path),
                event_kind="crl_rejected",
            )
        in_force = self._state.current
        if in_force.expired(now) and not self._warned_expired:
            self._warned_expired = True
            assert in_force.next_update is not None
            log.warn(
                "The CRL in force (from {path}) expired at {next_update}; it stays in force until replaced",
                path=str(self.path),
                next_update=in_force.next_update.isoformat(),
                event_kind="crl_expired",
            )


def revocation_setup(
    config: VaultConfig, authorities: Sequence[x509.Certificate], reactor: Any
) -> tuple[RevocationState, Callable[[RunBlocking], CRLWatchService] | None]:
    """The CRL in force at start (a bad or expired one is an error now) and
    how to build the service that follows the file, once the pool exists."""
    state = RevocationState()
    if config.crl is None:
        return state, None
    path = config.crl
    now = datetime.fromtimestamp(reactor.seconds(), UTC)
    state.current, signature = load_at_start(path, authorities, required=config.crl_required, now=now)
    if signature is not None:
        log.info("CRL {path}: {count} revoked certificates", path=str(path), count=len(state.current))

    def watch(run_blocking: RunBlocking) -> CRLWatchService:
        return CRLWatchService(
            path,
            authorities,
            state,
            run_blocking=run_blocking,
            clock=reactor,
            call_from_signal=reactor.callFromThread,
            signature=signature,
        )

    return state, watch
