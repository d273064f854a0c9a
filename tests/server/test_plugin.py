"""Tests for the twistd plugin and for C{securevault.server.tap.Options} parsing."""

from __future__ import annotations

import os
import sys
import threading
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from twisted.application.service import IServiceMaker
from twisted.internet.defer import Deferred
from twisted.plugin import getPlugins
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SkipTest

from securevault.admin.pki import generate_key, write_cert
from securevault.server import tap
from securevault.server.config import (
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    DEFAULT_MAX_JSON_BODY_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_PORT,
    DEFAULT_SESSION_IDLE_SECONDS,
    DEFAULT_SESSION_TTL_SECONDS,
    ConfigError,
    port_from_environment,
)
from securevault.server.pools import ThreadPoolService
from securevault.server.tls import certificate_host
from tests.support.testcase import AsyncTestCase, SyncTestCase


class PluginTests(SyncTestCase):
    """The plugin in twisted/plugins/ is found and resolves to securevault.server.tap."""

    def test_plugin_is_discovered(self) -> None:
        """getPlugins(IServiceMaker) yields exactly one maker with tapname
        C{securevault}, described, whose options and makeService are tap's."""
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "securevault"]
        self.assertEqual(len(makers), 1)
        maker = makers[0]
        self.assertTrue(maker.description)
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)


class OptionsTests(SyncTestCase):
    """C{Options} maps the command line (and $PORT) onto settings."""

    def setUp(self) -> None:
        # Options reads os.environ for the default port: run each test with
        # $PORT unset, restoring whatever was there.
        saved = os.environ.pop("PORT", None)
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, "PORT", saved)

    def parse(self, *argv: str) -> dict[str, Any]:
        options = tap.Options()
        options.parseOptions(list(argv))
        return dict(options)

    def assert_one_line(self, function: Any, *args: Any) -> str:
        """C{function(*args)} raises SystemExit with one line that starts
        C{securevault: error:} (printed by Python, status 1); returns it."""
        error = self.assertRaises(SystemExit, function, *args)
        message = str(error.code)
        self.assertTrue(message.startswith("securevault: error: "), message)
        self.assertNotIn("\n", message)
        return message

    def test_defaults(self) -> None:
        """With no arguments and no $PORT, every option of API.md has its
        documented default, and any further option defaults to None (off)."""
        parsed = self.parse()
        expected = {
            "port": DEFAULT_PORT,
            "interface": "0.0.0.0",
            "cert": "certs/server.crt",
            "key": "certs/server.key",
            "ca-cert": "certs/ca.crt",
            "data-dir": "vault-data",
            "master-key": None,
            "threads": None,
            "workers": 1,
            "session-idle": DEFAULT_SESSION_IDLE_SECONDS,
            "session-ttl": DEFAULT_SESSION_TTL_SECONDS,
            "max-upload-size": DEFAULT_MAX_UPLOAD_BYTES,
            "max-json-body": DEFAULT_MAX_JSON_BODY_BYTES,
            "idle-timeout": DEFAULT_IDLE_TIMEOUT_SECONDS,
            "quota": None,
            "metrics-port": None,
            "audit-log": None,
            "bind-user": "none",
            "max-connections": 4096,
            "max-connections-per-cert": 64,
            "min-body-rate": 16384,
            "memory-budget": 512 << 20,
            "upload-expiry": 24 * 3600.0,
        }
        # Options added after this test (e.g. the scale-out store options)
        # must be off by default, so a plain start behaves as API.md says.
        extra = {name: None for name in set(parsed) - set(expected)}
        self.assertEqual(parsed, {**expected, **extra})
        self.assertEqual(DEFAULT_PORT, 5000)
        self.assertEqual(
            (DEFAULT_SESSION_IDLE_SECONDS, DEFAULT_SESSION_TTL_SECONDS, DEFAULT_IDLE_TIMEOUT_SECONDS),
            (30 * 60, 12 * 60 * 60, 60),
        )
        self.assertEqual((DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MAX_JSON_BODY_BYTES), (16 << 30, 64 << 20))

    def test_upload_expiry_units(self) -> None:
        """C{--upload-expiry} takes a duration with a unit, as API.md says."""
        self.assertEqual(self.parse("--upload-expiry", "12h")["upload-expiry"], 12 * 3600.0)
        self.assertEqual(self.parse("--upload-expiry", "90")["upload-expiry"], 90.0)
        self.assertRaises(SystemExit, self.parse, "--upload-expiry", "soon")

    def test_port_option(self) -> None:
        """C{--port 7000} is the integer 7000; nothing else changes."""
        parsed = self.parse("--port", "7000")
        self.assertEqual(parsed, {**self.parse(), "port": 7000})

    def test_port_option_beats_environment(self) -> None:
        """C{--port} wins over $PORT."""
        os.environ["PORT"] = "8080"
        self.addCleanup(os.environ.pop, "PORT", None)
        self.assertEqual(self.parse("--port", "7000")["port"], 7000)

    def test_port_from_environment(self) -> None:
        """Without C{--port}, $PORT is used."""
        os.environ["PORT"] = "8080"
        self.addCleanup(os.environ.pop, "PORT", None)
        self.assertEqual(self.parse()["port"], 8080)

    def test_bad_port_option(self) -> None:
        """A non-numeric or out-of-range C{--port} ends the command with one
        error line quoting it."""
        for value in ("abc", "70000", "-1"):
            error = self.assert_one_line(self.parse, "--port", value)
            self.assertIn(repr(value), error)

    def test_bad_environment_port(self) -> None:
        """A bad $PORT is an error line quoting it, not a traceback."""
        os.environ["PORT"] = "http"
        self.addCleanup(os.environ.pop, "PORT", None)
        self.assertIn("'http'", self.assert_one_line(self.parse))

    def test_bind_user_choices(self) -> None:
        """C{--bind-user} accepts none, cn and san."""
        for policy in ("none", "cn", "san"):
            self.assertEqual(self.parse("--bind-user", policy)["bind-user"], policy)

    def test_bind_user_bogus(self) -> None:
        """Any other C{--bind-user} is an error line naming the choices."""
        self.assertIn("none, cn, san", self.assert_one_line(self.parse, "--bind-user", "bogus"))

    def test_paths_and_numbers(self) -> None:
        """Paths are kept as given; numeric options are converted."""
        parsed = self.parse(
            "--interface", "127.0.0.1",
            "--cert", "/x/s.crt",
            "--key", "/x/s.key",
            "--ca-cert", "/x/ca.crt",
            "--data-dir", "/x/data",
            "--master-key", "/x/mk",
            "--threads", "3",
            "--session-idle", "90",
            "--quota", "1024",
        )  # fmt: skip
        self.assertEqual(
            {k: parsed[k] for k in ("interface", "cert", "key", "ca-cert", "data-dir", "master-key")},
            {
                "interface": "127.0.0.1",
                "cert": "/x/s.crt",
                "key": "/x/s.key",
                "ca-cert": "/x/ca.crt",
                "data-dir": "/x/data",
                "master-key": "/x/mk",
            },
        )
        self.assertEqual((parsed["threads"], parsed["session-idle"], parsed["quota"]), (3, 90.0, 1024))

    def test_non_positive_numbers(self) -> None:
        """Zero thread counts, sizes and durations are errors naming the
        option and the value."""
        for option in ("--threads", "--max-connections", "--max-upload-size", "--quota", "--session-ttl"):
            error = self.assert_one_line(self.parse, option, "0")
            self.assertIn(f"{option}: not a positive", error)
            self.assertIn("'0'", error)

    def test_bad_values_name_the_option(self) -> None:
        """A value that is not a number, size or duration at all ends the
        command with one line: the option, the value and what it takes."""
        cases = {
            "--threads": ("x", "--threads: not a positive integer: 'x'"),
            "--max-connections-per-cert": ("-1", "--max-connections-per-cert: not a positive integer: '-1'"),
            "--quota": ("x", "--quota: not a size: 'x' (bytes, or with a unit: 64K, 500M, 10G)"),
            "--idle-timeout": ("1y", "--idle-timeout: not a duration: '1y'"),
        }
        for option, (value, expected) in cases.items():
            self.assertIn(expected, self.assert_one_line(self.parse, option, value))

    def test_workers(self) -> None:
        """--workers takes a positive count (default 1, today's single
        process); zero or a word is one line naming the option."""
        self.assertEqual(self.parse()["workers"], 1)
        self.assertEqual(self.parse("--workers", "3")["workers"], 3)
        for value in ("0", "abc", "-2"):
            error = self.assert_one_line(self.parse, "--workers", value)
            self.assertIn(f"--workers: not a positive integer: {value!r}", error)

    def test_unknown_option(self) -> None:
        """An option twistd's parser does not know is one line too."""
        self.assertIn("--prot", self.assert_one_line(self.parse, "--prot", "5000"))


class PortFromEnvironmentTests(SyncTestCase):
    """C{port_from_environment} is a pure function of the mapping it gets."""

    def test_unset(self) -> None:
        """No PORT key means 5000."""
        self.assertEqual(port_from_environment({}), 5000)

    def test_blank(self) -> None:
        """An empty or all-blank PORT means 5000."""
        self.assertEqual(port_from_environment({"PORT": ""}), 5000)
        self.assertEqual(port_from_environment({"PORT": " "}), 5000)

    def test_valid(self) -> None:
        """An integer 0-65535 is that port (surrounding blanks ignored)."""
        self.assertEqual(port_from_environment({"PORT": "8080"}), 8080)
        self.assertEqual(port_from_environment({"PORT": " 8080\n"}), 8080)
        self.assertEqual(port_from_environment({"PORT": "0"}), 0)
        self.assertEqual(port_from_environment({"PORT": "65535"}), 65535)

    def test_invalid(self) -> None:
        """Anything else is a ConfigError that quotes the value."""
        for value in ("abc", "70000", "-1", "65536", "80.0", "0x50"):
            error = self.assertRaises(ConfigError, port_from_environment, {"PORT": value})
            self.assertIn(repr(value), str(error))

    def test_only_ascii_decimal_digits(self) -> None:
        """A port is plain ASCII digits: Python-literal underscores and
        non-ASCII digits (which C{int()} accepts) are refused too."""
        for value in ("8_080", "\uff18\uff10\uff18\uff10", "\u0668\u0660"):
            self.assertRaises(ConfigError, port_from_environment, {"PORT": value})


class LoginPoolPriorityTests(AsyncTestCase):
    """The login pool's threads hash passwords at a lower CPU priority, so
    that a login storm leaves the CPU to the reactor and the worker pool."""

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("per-thread nice values are a Linux feature")

    def test_threads_run_lowered(self) -> Deferred[None]:
        """Work sent through in_background_pool runs in the pool's thread at
        a nice value raised by the increment, once per thread; the reactor's
        thread keeps its own."""
        from twisted.internet import reactor

        pool = ThreadPool(minthreads=0, maxthreads=1, name="test-login")
        service = ThreadPoolService(pool)
        service.startService()
        self.addCleanup(service.stopService)
        run = tap.in_background_pool(reactor, pool, 3)
        main = threading.get_native_id()
        base = os.getpriority(os.PRIO_PROCESS, main)

        def niceness() -> tuple[int, int]:
            tid = threading.get_native_id()
            return tid, os.getpriority(os.PRIO_PROCESS, tid)

        def twice(first: tuple[int, int]) -> Deferred[None]:
            def check(second: tuple[int, int]) -> None:
                self.assertNotEqual(first[0], main)
                self.assertEqual(second[0], first[0])  # one thread: lowered once
                self.assertEqual((first[1], second[1]), (min(base + 3, 19), min(base + 3, 19)))
                self.assertEqual(os.getpriority(os.PRIO_PROCESS, main), base)

            return run(niceness).addCallback(check)

        return run(niceness).addCallback(twice)


class ListeningURLTests(SyncTestCase):
    """The start-up line's URL: an address a client can connect to, with a
    name the server certificate vouches for."""

    def write_certificate(self, sans: list[x509.GeneralName]) -> Path:
        """A server certificate with these subjectAltNames, as PEM."""
        key = generate_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "common-name")])
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        path = self.make_dir() / "server.crt"
        write_cert(path, builder.sign(key, hashes.SHA256()))
        return path

    def test_certificate_host(self) -> None:
        """The first DNS name, else the first IP address, else the common
        name; None for a file that is not a certificate."""
        both = self.write_certificate([x509.IPAddress(ip_address("10.0.0.5")), x509.DNSName("vault.example")])
        self.assertEqual(certificate_host(both), "vault.example")
        only_ip = self.write_certificate([x509.IPAddress(ip_address("10.0.0.5"))])
        self.assertEqual(certificate_host(only_ip), "10.0.0.5")
        self.assertEqual(certificate_host(self.write_certificate([])), "common-name")
        self.assertIsNone(certificate_host(self.make_dir() / "absent.crt"))

    def test_url_host(self) -> None:
        """A wildcard address gives way to the certificate's name; one
        address stays itself; IPv6 is bracketed."""
        self.assertEqual(tap.url_host("0.0.0.0", "localhost"), "localhost")
        self.assertEqual(tap.url_host("::", "::1"), "[::1]")
        self.assertEqual(tap.url_host("127.0.0.1", "localhost"), "127.0.0.1")
        self.assertEqual(tap.url_host("::1", "localhost"), "[::1]")


class WorkerLogDestinationTests(SyncTestCase):
    def test_twistd_options_decide(self) -> None:
        """Workers share standard output only when twistd logs plain text
        there: -n without --logfile, or --logfile -; a log file, syslog or a
        custom --logger keep the relay; no twistd parent (an embedding
        program) keeps it too."""
        from twisted.scripts.twistd import ServerOptions

        from securevault.server.tap import Options, twistd_logs_to_stdout

        def decide(*twistd: str) -> bool:
            config = ServerOptions()
            config.parseOptions([*twistd, "securevault", "--data-dir", str(self.make_dir())])
            return twistd_logs_to_stdout(config.subOptions)

        self.assertTrue(decide("-n"))
        self.assertTrue(decide("--logfile", "-"))
        self.assertFalse(decide("-n", "--logfile", "vault.log"))
        self.assertFalse(decide())
        self.assertFalse(decide("-n", "--syslog"))
        self.assertFalse(twistd_logs_to_stdout(Options()))
