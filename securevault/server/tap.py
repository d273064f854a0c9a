# -*- test-case-name: tests.server.test_plugin -*-
"""Options and makeService: the composition root of the daemon.

This is the only module that imports the global reactor.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ParamSpec, TypeVar

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from securevault import __version__
from securevault.admin.migration import migrate
from securevault.core.audit import AuditLog
from securevault.core.fsutil import remove_stale_temps
from securevault.core.generation import SharedGeneration, WorkerLoads
from securevault.core.integrity import audit_chain_key, open_rows
from securevault.core.keybinding import locate_master_key, open_master_key
from securevault.core.keys import KeyFileError, KeyringFile
from securevault.core.passphrase import PassphraseError, passphrase_source
from securevault.core.sessions import LoginThrottle, SessionStore
from securevault.core.users import UserError, UserStore
from securevault.resources.login import login_threads
from securevault.server.app import VaultApp
from securevault.server.auditing import AuditTrail
from securevault.server.config import (
    BIND_USER_POLICIES,
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CERT,
    DEFAULT_MAX_JSON_BODY_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MEMORY_BUDGET_BYTES,
    DEFAULT_MIN_BODY_RATE,
    DEFAULT_SESSION_IDLE_SECONDS,
    DEFAULT_SESSION_TTL_SECONDS,
    DEFAULT_UPLOAD_EXPIRY_SECONDS,
    ConfigError,
    VaultConfig,
    parse_duration,
    parse_port,
    parse_size,
    port_from_environment,
)
from securevault.server.heap import trim_heap
from securevault.server.limits import ConnectionLimits, MemoryBudget, usable_descriptors
from securevault.server.metrics import VaultMetrics
from securevault.server.plaintext import PlainHTTPAnsweringTLSFactory, TLSServerEndpoint
from securevault.server.pools import RunBlocking, ThreadPoolService
from securevault.server.revocation import CRLError, revocation_setup
from securevault.server.startup import DataDirLock, claim_data_dir
from securevault.server.supervisor import Supervisor, check_before_workers, workers_metrics_resource
from securevault.server.tls import TLSConfigError, certificate_host, load_ca_certificates, server_tls_options
from securevault.server.twisted_private import accept_one_at_a_time, name_port_tls, pass_over_seconds
from securevault.server.web import VaultSite
from securevault.stores.backends import (
    BackendError,
    blobs_setting,
    check_blobs_url,
    check_metadata_url,
    metadata_setting,
    open_stores,
)
from securevault.stores.metadata import MetadataError

log = Logger(namespace="securevault")

P = ParamSpec("P")
R = TypeVar("R")

SWEEP_INTERVAL_SECONDS = 60.0
REVOCATION_CHECK_SECONDS = 1.0
# How much lower the login pool's threads run (a nice increment, on Linux):
# the most there is, so that however many hash at once, the reactor and the
# worker pool keep nearly all the CPU they ask for.
LOGIN_NICENESS = 19
# Blobs with no index row are looked for once an hour, and removed when
# older than a day: another node may be between its blob and its row.
ORPHAN_SWEEP_EVERY = 60
ORPHAN_GRACE_SECONDS = 24 * 3600.0


def _positive_int(name: str, value: Any) -> int:
    """A count option, parsed; a default passes as it is."""
    if isinstance(value, int):
        return value
    if not re.fullmatch(r"\s*[0-9]+\s*", value) or int(value) <= 0:
        raise ConfigError(f"--{name}: not a positive integer: {value!r}")
    return int(value)


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


def _setting(name: str, parse: Callable[[str], Any], value: Any) -> Any:
    """A size or duration option, parsed; a default passes as it is."""
    if not isinstance(value, str):
        return value
    try:
        return parse(value)
    except ConfigError as error:
        raise ConfigError(f"--{name}: {error}") from None


class Options(usage.Options):
    """twistd securevault [options]: every server option of API.md."""

    synopsis = "[options]"
    longdesc = "An encrypted file vault served over mutual TLS."
    optParameters = [
        ["port", "p", None, "TCP port [default: $PORT, else 5000]."],
        ["interface", None, "0.0.0.0", "Address to listen on."],
        ["cert", None, "certs/server.crt", "Server certificate (PEM)."],
        ["key", None, "certs/server.key", "Server private key (PEM)."],
        ["ca-cert", None, "certs/ca.crt", "CA certificate(s) that client certificates must chain to."],
        [
            "crl",
            None,
            None,
            "CRL file (PEM, one or more CRLs) of revoked client certificates; re-read when it changes and on "
            "SIGHUP [default: ca.crl beside --ca-cert, once it exists].",
        ],
        ["data-dir", None, "vault-data", "Directory holding the master key, audit log and embedded stores."],
        [
            "metadata",
            None,
            None,
            "Metadata store: sqlite (<data-dir>/vault.db), sqlite:///PATH or postgresql://... "
            "[default: $SECUREVAULT_METADATA, else sqlite].",
        ],
        [
            "blobs",
            None,
            None,
            "Blob store: file:///DIR (<data-dir>/archives) or s3://BUCKET/PREFIX, with endpoint, region and "
            "credentials from the usual AWS variables [default: $SECUREVAULT_BLOBS, else <data-dir>/archives].",
        ],
        [
            "master-key",
            None,
            None,
            "Master key file, kept apart from the data [default: the sibling directory of the data directory "
            "named after it, vault-data -> vault-keys/master.key; <data-dir>/master.key if only that exists]. "
            "Created (0600) only for a new vault.",
        ],
        [
            "threads",
            None,
            None,
            "Worker threads [default: CPU count, at least 2].",
        ],
        ["session-idle", None, DEFAULT_SESSION_IDLE_SECONDS, "How long a session lives unused (90, 30m, 12h)."],
        ["session-ttl", None, DEFAULT_SESSION_TTL_SECONDS, "How long a session lives in all (12h)."],
        ["max-upload-size", None, DEFAULT_MAX_UPLOAD_BYTES, "Largest upload (bytes, or 500M, 16G)."],
        ["max-json-body", None, DEFAULT_MAX_JSON_BODY_BYTES, "Largest JSON upload body (64M)."],
        ["idle-timeout", None, DEFAULT_IDLE_TIMEOUT_SECONDS, "Silent clients are dropped after this (60, 2m)."],
        ["quota", None, None, "Stored bytes per user, e.g. 10G [default: none]."],
        [
            "upload-expiry",
            None,
            DEFAULT_UPLOAD_EXPIRY_SECONDS,
            "Resumable uploads without progress are removed after this (24h, 90m).",
        ],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Connections at once, in all.",
        ],
        [
            "max-connections-per-cert",
            None,
            DEFAULT_MAX_CONNECTIONS_PER_CERT,
            "Connections at once per client certificate.",
        ],
        [
            "min-body-rate",
            None,
            DEFAULT_MIN_BODY_RATE,
            "Slowest a request body may arrive or a response be read, bytes/s over any --idle-timeout (16K).",
        ],
        ["memory-budget", None, DEFAULT_MEMORY_BUDGET_BYTES, "Bytes held for bodies, all clients together (512M)."],
        [
            "workers",
            None,
            1,
            "Processes serving the one listening socket, under a supervising parent (see docs/OPERATIONS.md).",
        ],
        ["metrics-port", None, None, "Serve Prometheus metrics on 127.0.0.1:PORT [default: off]."],
        ["audit-log", None, None, "Audit log file [default: <data-dir>/audit.jsonl]."],
        ["bind-user", None, "none", "Certificate names that may log in as a user: none, cn or san."],
        [
            "master-key-passphrase",
            None,
            None,
            "Where a sealed master key's passphrase comes from: prompt, stdin, fd:N or file:PATH "
            "[default: prompt on a terminal].",
        ],
    ]

    def opt_version(self) -> None:
        """Display securevault's version and exit."""
        print(f"securevault {__version__}")
        sys.exit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse as usage.Options does, but a bad option or value ends the
        command with one line on stderr and status 1: twistd and twist would
        print the whole --help above the error, burying it."""
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            raise SystemExit(f"securevault: error: {error}") from None

    def postOptions(self) -> None:
        try:
            for name in ("threads", "max-connections", "max-connections-per-cert", "workers"):
                if self[name] is not None:
                    self[name] = _positive_int(name, self[name])
            for name in ("max-upload-size", "max-json-body", "min-body-rate", "memory-budget", "quota"):
                if self[name] is not None:
                    self[name] = _setting(name, parse_size, self[name])
            for name in ("session-idle", "session-ttl", "idle-timeout", "upload-expiry"):
                self[name] = _setting(name, parse_duration, self[name])
            if self["port"] is None:  # --port, then $PORT, then 5000
                self["port"] = port_from_environment(os.environ)
            else:
                self["port"] = parse_port(str(self["port"]), "--port")
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None
        if self["metrics-port"] is not None:
            try:
                self["metrics-port"] = parse_port(str(self["metrics-port"]), "--metrics-port")
            except ConfigError as error:
                raise usage.UsageError(str(error)) from None
        if self["master-key-passphrase"] is not None:
            try:
                passphrase_source(self["master-key-passphrase"])
            except PassphraseError as error:
                raise usage.UsageError(str(error)) from None
        self["metadata"] = metadata_setting(self["metadata"])
        self["blobs"] = blobs_setting(self["blobs"])
        try:
            check_metadata_url(self["metadata"])
            check_blobs_url(self["blobs"])
        except BackendError as error:
            raise usage.UsageError(str(error)) from None
        if self["bind-user"] not in BIND_USER_POLICIES:
            raise usage.UsageError(f"--bind-user must be one of none, cn, san, not {self['bind-user']!r}")


class DaemonService(MultiService):
    """The daemon's services; every listener binds before anything starts.

    twistd calls C{privilegedStartService} (binding the ports) before
    C{startService}; twist calls only C{startService}, which would start the
    worker pools and timers first and bind last.  A port in use then raised
    SystemExit with pool threads already running, and the interpreter waited
    for them forever.  Binding first, in both, makes a bind failure end the
    process before any thread exists."""

    _privileged = False

    def __init__(self, lock: DataDirLock | None = None) -> None:
        super().__init__()
        self.lock = lock  # held, not used: the lock lasts while its file is open

    def privilegedStartService(self) -> None:
        self._privileged = True
        if self.lock is not None:
            self.lock.record_pid()  # twistd without -n has forked since makeService
        super().privilegedStartService()

    def startService(self) -> None:
        if not self._privileged:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Stop the children; the data directory's lock goes once they all
        have (a process that ends drops it anyway)."""
        stopped: Deferred[None] = super().stopService()

        def release(result: object) -> object:
            if self.lock is not None:
                self.lock.release()
            return result

        stopped.addBoth(release)
        return stopped


class ListenerService(StreamServerEndpointService):
    """Listens once started; a port that cannot be bound ends the daemon."""

    def __init__(self, endpoint: Any, factory: Any, where: str) -> None:
        super().__init__(endpoint, factory)
        self._where = where
        # A hand-built endpoint service only logs a failed bind and runs on
        # deaf; this private flag makes it raise, as strports.service() does.
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            raise SystemExit(f"securevault: error: cannot listen on {self._where}: {error.socketError}") from None
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        return port


class MetricsListenerService(ListenerService):
    """The metrics listener; logs the URL to scrape."""

    def _listening(self, port: Any) -> Any:
        address = port.getHost()
        log.info(
            "metrics on http://{host}:{port}/metrics",
            host=address.host,
            port=address.port,
            event_kind="metrics_listening",
        )
        return port


WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")


def url_host(bound: str, certificate_name: str | None) -> str:
    """The host of a URL that reaches a listener bound to C{bound} and
    passes verification of its certificate: the address itself when it is
    one address, else the certificate's name (C{0.0.0.0} is no address to
    connect to, nor one a certificate names)."""
    host = bound
    if bound in WILDCARD_ADDRESSES:
        host = certificate_name or socket.gethostname()
    return f"[{host}]" if ":" in host else host


class TLSListenerService(ListenerService):
    """The vault's mutual-TLS listener; logs a URL that works."""

    def __init__(self, endpoint: Any, factory: Any, config: VaultConfig, ca_subject: str) -> None:
        super().__init__(endpoint, factory, f"{config.interface}:{config.port}")
        self._config = config
        self._ca_subject = ca_subject

    def _listening(self, port: Any) -> Any:
        address = port.getHost()
        announce_listening(address.host, address.port, self._config, self._ca_subject)
        return port


def announce_listening(host: str, port: int, config: VaultConfig, ca_subject: str, workers: str = "") -> None:
    """The start-up line: a URL that works, what is bound, and where."""
    url = f"https://{url_host(host, certificate_host(config.cert))}:{port}"
    bound = ""
    if host in WILDCARD_ADDRESSES:
        bound = f"all interfaces, {host or '0.0.0.0'}:{port}; "
    log.info(
        "securevault {version} listening on {url} ({bound}CA: {ca}; data: {data_dir}{workers})",
        version=__version__,
        url=url,
        bound=bound,
        host=host,
        port=port,
        ca=ca_subject,
        data_dir=str(config.data_dir.resolve()),
        workers=workers,
        event_kind="listening",
    )


def lower_thread_priority(increment: int) -> None:
    """Make the calling thread yield the CPU to the daemon's other threads.
    On Linux a thread is a task with its own nice value; elsewhere this
    would renice the whole process, so it does nothing."""
    if sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        except OSError:
            pass


def in_background_pool(reactor: Any, pool: ThreadPool, niceness: int) -> RunBlocking:
    """A L{RunBlocking} for C{pool} whose threads run C{niceness} lower
    than the reactor and the worker pool: password hashing then takes mostly
    the CPU time they leave, so a login storm barely slows other requests
    (it makes logins slower, and past the login queue's bound they are
    turned away as busy).  A lowered thread that holds a lock others want
    (the GIL between two C calls, SQLite's write lock for a few statements)
    makes them wait for its turn on a CPU: short, since it holds them only
    briefly and scrypt runs without the GIL."""
    lowered = threading.local()

    def run(function: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
        def call() -> R:
            if not getattr(lowered, "done", False):
                lowered.done = True
                lower_thread_priority(niceness)
            return function(*args, **kwargs)

        return deferToThreadPool(reactor, pool, call)

    return run


def build_app(
    config: VaultConfig,
    run_blocking: RunBlocking,
    clock: Any,
    *,
    run_hashing: RunBlocking,
    exclusive: bool = True,
    recover: bool = True,
) -> VaultApp:
    """The shared collaborators, from settings; fails with a one-line reason.
    C{run_blocking} reaches the worker pool, C{run_hashing} the login pool.
    C{exclusive}: no other process serves these stores (not a worker of
    C{--workers N}); workers keep sessions and listings in memory under
    the node's shared generation instead.
    C{recover}: remove crash debris at start (never while another worker
    of this node may be mid-upload)."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    location = locate_master_key(config.data_dir, config.master_key)
    remove_stale_temps(location.path)
    key_file = KeyringFile(location.path, passphrase_source(config.master_key_passphrase))
    stores = open_stores(config.data_dir, config.metadata_url, config.blobs_url)
    try:
        # Before anything reads or writes the vault: the key must be its own.
        master_key = open_master_key(key_file, stores.metadata, config.data_dir, create=True)
        rows, authenticated = open_rows(master_key.keyring, stores.metadata)
    except MetadataError as error:
        stores.close()
        raise BackendError(f"the metadata store failed: {error}") from None
    except BaseException:
        stores.close()
        raise
    keyring = master_key.keyring
    if master_key.created:
        log.info(
            "Created master key {path} for this new vault: back it up, apart from the data directory",
            path=str(location.path),
        )
    elif master_key.bound:
        log.info("The master key {path} is now bound to this vault (key check stored)", path=str(location.path))
    if authenticated is not None and any(authenticated):
        log.warn(
            "Authenticated the {users} user rows of this vault from before row MACs, and ended its "
            "{sessions} sessions; from now on a row changed outside securevault is refused",
            users=authenticated[0],
            sessions=authenticated[1],
        )
    warning = location.warning(config.data_dir)
    if warning is not None:
        log.warn("{warning}", warning=warning[:1].upper() + warning[1:])
    # One node is the only writer of its index and sessions: it keeps them
    # in memory too, and small requests need no trip to the pool.  The
    # workers of one node (--workers N) keep them too, each copy trusted
    # while the node's shared generation has not moved (a file every
    # worker maps); several nodes keep neither.
    generation = SharedGeneration.in_data_dir(config.data_dir) if stores.single_node and not exclusive else None
    storage = stores.storage(keyring, keyring_file=key_file, cache_listings=stores.single_node, generation=generation)
    users = UserStore(stores.metadata, rows)
    # No client is connected yet: migrating and recovering here blocks no
    # one, and both must finish before an upload could start.
    migrated = migrate(config.data_dir, users, storage)
    if migrated.users or migrated.archives:
        log.info(
            "Moved {users} users and {archives} archives from files into the metadata store",
            users=migrated.users,
            archives=migrated.archives,
        )
    if migrated.left_in_place:
        log.warn(
            "{count} archives of {data_dir} stay in its files: the blob store is elsewhere",
            count=migrated.left_in_place,
            data_dir=str(config.data_dir),
        )
    if not recover:
        removed = 0
    elif stores.single_node:
        removed = storage.recover()
    else:
        # Other nodes may be mid-upload: only this node's own debris now;
        # orphans older than the grace period go in the periodic sweep.
        removed = storage.blobs.remove_incomplete()
    if removed:
        log.info("Removed {count} leftover temporary files", count=removed)
    log.info("Stores: {stores}", stores=stores.describe())
    sessions = SessionStore(
        stores.metadata,
        clock.seconds,
        rows=rows,
        idle_seconds=config.session_idle,
        ttl_seconds=config.session_ttl,
        mirror=stores.single_node,
        generation=generation,
    )
    sessions.load()
    max_connections = min(config.max_connections, usable_descriptors())
    if max_connections < config.max_connections:
        log.warn(
            "--max-connections lowered to {count}: the limit on open files allows no more",
            count=max_connections,
        )
    app = VaultApp(
        budget=MemoryBudget(config.memory_budget),
        connections=ConnectionLimits(max_connections, config.max_connections_per_cert),
        config=config,
        storage=storage,
        users=users,
        sessions=sessions,
        throttle=LoginThrottle(stores.metadata, clock.seconds),
        run_blocking=run_blocking,
        run_hashing=run_hashing,
        clock=clock.seconds,
        audit_trail=(
            AuditTrail(AuditLog(config.audit_log, audit_chain_key(rows.key), stores.metadata), run_blocking, clock)
            if config.audit_log
            else None
        ),
        stores=stores,
    )

    def refused(kind: str, user_id: str) -> None:
        """A row failed its MAC (called in a worker thread): said and counted."""
        log.warn(
            "A {kind} row of user id {user_id} fails authentication (changed outside securevault): refused",
            kind=kind,
            user_id=user_id,
        )
        if app.metrics is not None:
            app.metrics.refused_rows.labels(kind=kind).inc()

    rows.on_refused = refused
    return app


def metrics_service(reactor: Any, app: VaultApp, pool: ThreadPool, port: int) -> IService:
    """Prometheus text at http://127.0.0.1:PORT/metrics (loopback only)."""
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    def active_sessions() -> float:
        """Counted in the store at each scrape: the metrics resource is WSGI,
        so this runs in the reactor's thread pool, never the reactor thread.
        The last known count stands in while the store fails (the periodic
        sweep logs that)."""
        try:
            app.session_count = app.sessions.count()
        except MetadataError:
            pass
        return app.session_count

    app.metrics = VaultMetrics(
        active_sessions=active_sessions,
        pool_queue_depth=lambda: pool.q.qsize(),
    )
    if app.audit_trail is not None:
        app.audit_trail.metrics = app.metrics  # the trail counts the events it is given
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=app.metrics.registry))
    endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    return MetricsListenerService(endpoint, Site(root), f"127.0.0.1:{port} (metrics)")


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    """The daemon: worker pools first in (last out), listener last in.
    With C{--workers N} (N > 1) a supervising parent instead, which binds
    the port once and runs N worker processes on it
    (L{securevault.server.supervisor})."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = VaultConfig.from_options(options)
    if config.workers > 1:
        return supervisor_service(options, config, reactor)
    lock = claim_data_dir(config)  # one daemon per data directory, which it can write
    daemon = _vault_daemon(config, reactor, lock, worker=False, recover=True)
    endpoint = TLSServerEndpoint(reactor, config.port, daemon.tls_options, interface=config.interface)
    TLSListenerService(endpoint, daemon.site, config, daemon.ca_subject).setServiceParent(daemon.top)
    return daemon.top


def twistd_logs_to_stdout(options: Any) -> bool:
    """Whether twistd, which parsed C{options} as its subcommand, logs to
    its standard output as plain text (C{-n} without C{--logfile}, or
    C{--logfile -}: the systemd and container way), so that workers can
    write their lines to the same descriptor.  Read from the twistd options
    (C{usage.Options.parent}); anything else (a log file twistd rotates,
    syslog, a custom C{--logger}) keeps the relay through the parent."""
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return False
    if twistd.get("logger") or twistd.get("syslog"):
        return False
    logfile = twistd.get("logfile")
    return bool(logfile == "-" or (twistd.get("nodaemon") and not logfile))


def supervisor_service(options: Mapping[str, Any], config: VaultConfig, reactor: Any) -> IService:
    """The parent of C{--workers N} (L{securevault.server.supervisor}); it
    fails at once, with one line, on what every worker would fail on."""
    lock = claim_data_dir(config)
    try:
        ca_subject = check_before_workers(config)
    except SystemExit:
        lock.release()
        raise
    top = DaemonService(lock)

    def announce(host: str, port: int) -> None:
        announce_listening(host, port, config, ca_subject, f"; {config.workers} workers")

    supervisor = Supervisor(reactor, config, options, announce, shared_stdout=twistd_logs_to_stdout(options))
    if config.metrics_port is not None:
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        root = Resource()
        root.putChild(b"metrics", workers_metrics_resource(supervisor))
        endpoint = TCP4ServerEndpoint(reactor, config.metrics_port, interface="127.0.0.1")
        where = f"127.0.0.1:{config.metrics_port} (metrics)"
        MetricsListenerService(endpoint, Site(root), where).setServiceParent(top)
    supervisor.setServiceParent(top)
    return top


def worker_service(
    config: VaultConfig,
    reactor: Any,
    *,
    fd: int,
    family: socket.AddressFamily,
    number: int,
    recover: bool,
    ready: Callable[[], object],
) -> IService:
    """One worker of C{--workers N}: the same daemon as L{makeService}, but
    it serves the listening socket C{fd} its parent made (and holds the
    data directory's lock for it), keeps sessions and listings in memory
    only while the node's shared generation says no other worker changed
    them (L{SharedGeneration}), and removes crash debris only if
    C{recover} (the first worker, started alone).  C{ready} is called once
    it serves."""
    daemon = _vault_daemon(config, reactor, None, worker=True, recover=recover)
    AdoptedListenerService(reactor, fd, family, daemon, number, ready).setServiceParent(daemon.top)
    return daemon.top


class AdoptedListenerService(Service):
    """Serves a listening socket made by another process (the supervisor),
    wrapped in TLS as L{TLSServerEndpoint} wraps its own."""

    def __init__(
        self, reactor: Any, fd: int, family: socket.AddressFamily, daemon: VaultDaemon, number: int, ready: Any
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._daemon = daemon
        self._number = number
        self._ready = ready
        self._port: Any = None
        self._generation: SharedGeneration | None = None

    def startService(self) -> None:
        super().startService()
        factory = PlainHTTPAnsweringTLSFactory(self._daemon.tls_options, False, self._daemon.site)
        self._port = self._reactor.adoptStreamPort(self._fd, self._family, factory)
        os.close(self._fd)  # adoptStreamPort serves a duplicate
        name_port_tls(self._port)
        accept_one_at_a_time(
            self._port, pass_over=self._pass_over(), call_later=self._reactor.callLater, seconds=pass_over_seconds()
        )
        log.info(
            "worker {number} (pid {pid}) serving",
            number=self._number,
            pid=os.getpid(),
            event_kind="worker_serving",
        )
        self._ready()

    def _pass_over(self) -> Callable[[], bool] | None:
        """Whether to leave the pending connection to a worker holding fewer
        (L{WorkerLoads}); None when there is no other worker or no shared
        file (several nodes)."""
        config = self._daemon.app.config
        connections = self._daemon.app.connections
        if config.workers < 2 or connections is None:
            return None
        generation = SharedGeneration.in_data_dir(config.data_dir)
        if generation is None:
            return None
        self._generation = generation
        loads = WorkerLoads(generation, self._number, config.workers)
        connections.on_load = loads.publish
        return lambda: loads.busier(connections.load)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._generation is not None:
            self._daemon.app.connections.on_load = None  # type: ignore[union-attr]
            self._generation.close()
            self._generation = None
        port, self._port = self._port, None
        if port is None:
            return None
        stopped: Deferred[None] = port.stopListening()
        return stopped


@dataclass
class VaultDaemon:
    """The daemon's services, and what its listener wraps around."""

    top: DaemonService
    app: VaultApp
    site: VaultSite
    tls_options: Any
    ca_subject: str


def _vault_daemon(
    config: VaultConfig, reactor: Any, lock: DataDirLock | None, *, worker: bool, recover: bool
) -> VaultDaemon:
    """Everything but the listener, in the order of L{makeService}."""
    try:
        authorities = load_ca_certificates(config.ca_cert)
        revocations, crl_watch = revocation_setup(config, authorities, reactor)
        tls_options = server_tls_options(config.cert, config.key, config.ca_cert, revocations)
        ca_subject = authorities[0].subject.rfc4514_string()
        top = DaemonService(lock)
        pool = ThreadPool(minthreads=0, maxthreads=config.threads, name="securevault")
        ThreadPoolService(pool).setServiceParent(top)
        # Logins hash passwords in a pool of their own (see resources.login).
        login_pool = ThreadPool(minthreads=0, maxthreads=login_threads(config.threads), name="securevault-login")
        ThreadPoolService(login_pool).setServiceParent(top)
        app = build_app(
            config,
            partial(deferToThreadPool, reactor, pool),
            reactor,
            run_hashing=in_background_pool(reactor, login_pool, LOGIN_NICENESS),
            exclusive=not worker,
            recover=recover,
        )
    except (TLSConfigError, CRLError, KeyFileError, PassphraseError, OSError, BackendError, UserError) as error:
        raise SystemExit(f"securevault: error: {error}") from None
    if app.audit_trail is not None:
        # After the pool, before the listener: stopped after the listener
        # (no new events) and before the pool (its last write still runs).
        app.audit_trail.setServiceParent(top)
    app.revocations = revocations
    app.call_from_thread = reactor.callFromThread

    sweeps = itertools.count()

    def sweep_blocking(now: float) -> int:
        """In the pool: expired sessions and old login failures, now and
        then blobs that no index row names (debris of a crash), and the
        heap memory the threads freed (L{trim_heap})."""
        app.sessions.sweep()
        app.throttle.sweep()
        expired = app.staging.sweep_expired(now)
        if expired:
            log.info("Removed {count} expired resumable uploads", count=expired)
        if next(sweeps) % ORPHAN_SWEEP_EVERY == ORPHAN_SWEEP_EVERY - 1:
            removed = app.storage.sweep_orphans(ORPHAN_GRACE_SECONDS)
            if removed:
                log.info("Removed {count} orphaned blobs", count=removed)
        trim_heap()
        return app.sessions.count()

    def counted(count: int) -> None:
        app.session_count = count
        if worker and app.metrics is not None:
            app.metrics.active_sessions.set(count)

    def sweep() -> None:
        app.run_blocking(sweep_blocking, app.clock()).addCallbacks(
            counted, lambda failure: log.failure("The periodic sweep failed", failure)
        )

    TimerService(SWEEP_INTERVAL_SECONDS, sweep).setServiceParent(top)
    if app.sessions.mirrored:
        # Sessions ended by the admin command (another process) leave this
        # node's memory within a second, not at the next sweep.
        def drop_revoked() -> None:
            app.run_blocking(app.sessions.drop_revoked).addErrback(
                lambda failure: log.failure("Checking for revoked sessions failed", failure)
            )

        TimerService(REVOCATION_CHECK_SECONDS, drop_revoked).setServiceParent(top)
    if config.metrics_port is not None:
        if worker:
            worker_metrics(app, pool).setServiceParent(top)
        else:
            metrics_service(reactor, app, pool, config.metrics_port).setServiceParent(top)
    if crl_watch is not None:
        crl_watch(app.run_blocking).setServiceParent(top)
    site = VaultSite(app, reactor=reactor)
    return VaultDaemon(top, app, site, tls_options, ca_subject)


def worker_metrics(app: VaultApp, pool: ThreadPool) -> IService:
    """A worker's series go to the parent's multiprocess directory
    ($PROMETHEUS_MULTIPROC_DIR), which the parent serves; a gauge there
    holds what the worker last set, so the queue depth is set every second
    here (and the session count at each sweep)."""
    metrics = VaultMetrics()
    app.metrics = metrics
    if app.audit_trail is not None:
        app.audit_trail.metrics = metrics

    def queue_depth() -> None:
        metrics.pool_queue_depth.set(pool.q.qsize())

    return TimerService(REVOCATION_CHECK_SECONDS, queue_depth)
