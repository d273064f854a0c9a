# -*- test-case-name: tests.client.test_client -*-
"""Tests for L{securevault.client} and C{securevault-client}.

The CLI is driven through its entry point (C{python -m
securevault.client.cli}) and the library directly, both against one real
C{twistd -n securevault} per test class over real mutual TLS.  Pure helpers
(verification, settings precedence, error mapping) are tested in-process.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import unittest
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import IO, ClassVar

from securevault.client.cli import (
    Settings,
    UsageError,
    human_size,
    load_config_file,
    main,
    resolve_settings,
    safe_output_name,
)
from securevault.client.library import (
    AuthenticationError,
    ConnectionFailed,
    IntegrityError,
    NotFoundError,
    StorageLimitError,
    TooManyAttempts,
    VaultClient,
    VaultError,
    error_from_response,
    install_verified,
)
from tests.support.testcase import SyncTestCase

REPOSITORY = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"
WAIT_SECONDS = 30.0
LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")
# twisted.scripts.twistd has no __main__ guard, so "python -m" on it does nothing.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
ERROR_LINE = re.compile(r"\Asecurevault-client: error: [^\n]+\n\Z")
THREE_MIB = 3 * 1024 * 1024


def base_environment() -> dict[str, str]:
    """os.environ without anything that would steer the client or daemon,
    and with the repository on PYTHONPATH."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SECUREVAULT_") and k not in ("PORT", "XDG_CONFIG_HOME")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPOSITORY), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    """A local TCP port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def mode(path: Path) -> int:
    """The permission bits of C{path}."""
    return stat.S_IMODE(path.stat().st_mode)


class RunningVault:
    """A development PKI, a user alice and a twistd daemon in C{base}."""

    def __init__(self, base: Path) -> None:
        self.data_dir = base / "vault-data"
        self.certs_dir = base / "certs"
        env = base_environment()
        self._admin(env, base, "init", "--certs-dir", str(self.certs_dir))
        self._admin(env, base, "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
        self.output: list[str] = []
        self._listening = threading.Event()
        self.port: int | None = None
        self.process = subprocess.Popen(
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                "securevault",
                "--port",
                "0",
                "--interface",
                "127.0.0.1",
                "--cert",
                str(self.certs_dir / "server.crt"),
                "--key",
                str(self.certs_dir / "server.key"),
                "--ca-cert",
                str(self.certs_dir / "ca.crt"),
                "--data-dir",
                str(self.data_dir),
            ],
            cwd=base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        # Keep draining the output after the port is known, or the access
        # log would eventually fill the pipe and stall the daemon.
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()
        if not self._listening.wait(WAIT_SECONDS) or self.port is None:
            self.stop()
            raise AssertionError("twistd did not start listening:\n" + "".join(self.output))

    def _admin(self, env: dict[str, str], cwd: Path, *argv: str, stdin: str | None = None) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "securevault.admin.cli", "--data-dir", str(self.data_dir), *argv],
            cwd=cwd,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"securevault-admin {argv} failed: {result.stderr}")

    def _read(self, stream: IO[bytes]) -> None:
        """Runs in a thread: collects the output and notes the bound port."""
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            self.output.append(line)
            match = LISTENING.search(line)
            if match is not None and self.port is None:
                self.port = int(match.group(1))
                self._listening.set()
        stream.close()
        self._listening.set()  # ended, perhaps without listening

    @property
    def url(self) -> str:
        """The daemon's base URL."""
        return f"https://127.0.0.1:{self.port}"

    def client_files(self) -> dict[str, str]:
        """The client certificate, key and CA that C{init} created."""
        return {
            "cert": str(self.certs_dir / "client.crt"),
            "key": str(self.certs_dir / "client.key"),
            "ca": str(self.certs_dir / "ca.crt"),
        }

    def stop(self) -> None:
        """SIGTERM, then wait for the exit and the output reader."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT_SECONDS)
        self._reader.join(WAIT_SECONDS)


class DaemonTestCase(SyncTestCase):
    """One daemon for the whole class, to keep the runtime low; each test
    works in its own temp directory and session file.

    trial does not call C{setUpClass}, so the daemon is started by the first
    C{setUp} and stopped after the class's last test (or by
    C{tearDownClass} under pytest, or at exit when only some tests ran).
    """

    _shared: ClassVar[dict[type, tuple[RunningVault, Path]]] = {}
    _remaining: ClassVar[dict[type, int]] = {}
    vault: RunningVault

    def setUp(self) -> None:
        cls = type(self)
        if cls not in self._shared:
            base = Path(tempfile.mkdtemp(prefix="securevault-client-test-"))
            try:
                self._shared[cls] = (RunningVault(base), base)
            except BaseException:
                shutil.rmtree(base, ignore_errors=True)
                raise
            self._remaining[cls] = len(unittest.TestLoader().getTestCaseNames(cls))
            atexit.register(cls.stop_vault)
        self.vault = self._shared[cls][0]
        self.addCleanup(self._finished)

    def _finished(self) -> None:
        cls = type(self)
        self._remaining[cls] -= 1
        if self._remaining[cls] <= 0:
            cls.stop_vault()

    @classmethod
    def stop_vault(cls) -> None:
        """SIGTERM the class's daemon, if running, and remove its files."""
        shared = cls._shared.pop(cls, None)
        if shared is not None:
            vault, base = shared
            vault.stop()
            shutil.rmtree(base, ignore_errors=True)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stop_vault()


class CommandLineTests(DaemonTestCase):
    """C{securevault-client} through its entry point, in a subprocess."""

    def setUp(self) -> None:
        super().setUp()
        self.home = self.make_dir()
        self.work = self.home / "work"
        self.work.mkdir()
        self.session_file = self.home / "state" / "session.json"
        files = self.vault.client_files()
        self.env = base_environment()
        self.env.update(
            SECUREVAULT_URL=self.vault.url,
            SECUREVAULT_CERT=files["cert"],
            SECUREVAULT_KEY=files["key"],
            SECUREVAULT_CA=files["ca"],
            SECUREVAULT_SESSION_FILE=str(self.session_file),
            XDG_CONFIG_HOME=str(self.home / "xdg"),
        )

    def cli(
        self, *argv: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run C{securevault-client ARGV} in the test's work directory."""
        return subprocess.run(
            [sys.executable, "-m", "securevault.client.cli", *argv],
            cwd=self.work,
            env=self.env if env is None else env,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )

    def login(self) -> None:
        """Log alice in through the CLI, password on stdin."""
        result = self.cli("login", "--username", "alice", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual((result.returncode, result.stderr), (0, ""))

    def assert_fails(self, result: subprocess.CompletedProcess[str], status: int) -> None:
        """The command exited C{status} with exactly one error line."""
        self.assertEqual(result.returncode, status, result.stderr)
        self.assertRegex(result.stderr, ERROR_LINE)

    def test_login_saves_private_session(self) -> None:
        """login --password-stdin saves the session and its URL in a 0600
        file inside a 0700 directory, and never the password."""
        self.login()
        self.assertEqual(mode(self.session_file), 0o600)
        self.assertEqual(mode(self.session_file.parent), 0o700)
        record = json.loads(self.session_file.read_text())
        self.assertEqual(record["url"], self.vault.url)
        self.assertNotIn(PASSWORD, self.session_file.read_text())

    def test_wrong_password(self) -> None:
        """A wrong password exits 3 with one error line and saves nothing."""
        result = self.cli("login", "--username", "alice", "--password-stdin", stdin="wrong password\n")
        self.assert_fails(result, 3)
        self.assertFalse(self.session_file.exists())

    def test_upload_list_download(self) -> None:
        """Two uploads print one line each; list shows a table and --json the
        entries; downloads by id and by --name are byte-exact, and a
        default-named download never overwrites an existing file."""
        self.login()
        small = self.work / "notes é.txt"
        small.write_bytes(b"hello, vault\n")
        big = self.work / "big.bin"
        big.write_bytes(os.urandom(THREE_MIB))
        result = self.cli("upload", str(small), str(big))
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        lines = result.stdout.splitlines()
        self.assertEqual(len(lines), 2)
        small_id, small_size, small_name = lines[0].split(None, 2)
        big_id, big_size, big_name = lines[1].split(None, 2)
        self.assertEqual((small_size, small_name), ("13", "notes é.txt"))
        self.assertEqual((big_size, big_name), (str(THREE_MIB), "big.bin"))

        table = self.cli("list")
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertTrue(table.stdout.startswith("ID"))
        self.assertRegex(table.stdout, rf"{big_id}\s+3\.0 MiB\s+\S+Z\s+big\.bin\n")
        self.assertRegex(table.stdout, rf"{small_id}\s+13 B\s+\S+Z\s+notes é\.txt\n")

        listed = self.cli("list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        entries = {entry["id"]: entry for entry in json.loads(listed.stdout)}
        self.assertEqual(entries[big_id]["sha256"], hashlib.sha256(big.read_bytes()).hexdigest())
        self.assertEqual(entries[small_id]["filename"], "notes é.txt")

        out = self.work / "out"
        out.mkdir()
        by_id = self.cli("download", big_id, "-o", str(out / "by-id.bin"))
        self.assertEqual(by_id.returncode, 0, by_id.stderr)
        self.assertEqual((out / "by-id.bin").read_bytes(), big.read_bytes())
        by_name = self.cli("download", "--name", "notes é.txt", "-o", str(out))
        self.assertEqual(by_name.returncode, 0, by_name.stderr)
        self.assertEqual((out / "notes é.txt").read_bytes(), small.read_bytes())
        self.assertEqual([p.name for p in out.iterdir() if p.name.endswith(".part")], [])

        # The default output is the archive's name in the cwd, where big.bin exists.
        again = self.cli("download", "--name", "big.bin")
        self.assert_fails(again, 1)
        self.assertIn("already exists", again.stderr)

    def test_download_aborted_by_a_tampered_archive_exits_5(self) -> None:
        """A 3 MiB archive with a byte flipped near its end: the server sends
        the authentic start, then aborts the stream; the client asks again,
        gets 500 integrity_error, exits 5 (not 7, a connection failure) with
        one error line, and leaves nothing at the destination."""
        self.login()
        (self.work / "victim.bin").write_bytes(os.urandom(THREE_MIB))
        archive_id = self.cli("upload", "victim.bin").stdout.split()[0]
        [body] = (self.vault.data_dir / "archives").glob(f"*/{archive_id}.body")
        tampered = bytearray(body.read_bytes())
        tampered[-(THREE_MIB // 8)] ^= 0x01  # far past the first block the server sends
        body.write_bytes(bytes(tampered))
        out = self.work / "out"
        out.mkdir()
        result = self.cli("download", archive_id, "-o", str(out / "victim.bin"))
        self.assert_fails(result, 5)
        self.assertIn("fails authentication", result.stderr)
        self.assertEqual(list(out.iterdir()), [])

    def test_delete_then_download(self) -> None:
        """After delete, downloading the archive exits 4."""
        self.login()
        (self.work / "gone.txt").write_bytes(b"soon gone")
        archive_id = self.cli("upload", "gone.txt").stdout.split()[0]
        deleted = self.cli("delete", archive_id)
        self.assertEqual((deleted.returncode, deleted.stdout), (0, f"deleted {archive_id}\n"))
        self.assert_fails(self.cli("download", archive_id, "-o", "back.txt"), 4)
        self.assertFalse((self.work / "back.txt").exists())

    def test_logout(self) -> None:
        """logout removes the session file; list then exits 3."""
        self.login()
        result = self.cli("logout")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(self.session_file.exists())
        self.assert_fails(self.cli("list"), 3)

    def test_unreachable(self) -> None:
        """A URL where nothing listens exits 7 with one error line."""
        result = self.cli(
            "--url",
            f"https://127.0.0.1:{free_port()}",
            "login",
            "--username",
            "alice",
            "--password-stdin",
            stdin=PASSWORD + "\n",
        )
        self.assert_fails(result, 7)

    def test_config_file_precedence(self) -> None:
        """client.toml supplies settings over the defaults, the environment
        overrides it, and options override the environment."""
        files = self.vault.client_files()
        config = self.home / "xdg" / "securevault" / "client.toml"
        config.parent.mkdir(parents=True)
        config.write_text(
            f'url = "{self.vault.url}"\ncert = "{files["cert"]}"\nkey = "{files["key"]}"\nca = "{files["ca"]}"\n'
        )
        env = {
            k: v
            for k, v in self.env.items()
            if k not in ("SECUREVAULT_URL", "SECUREVAULT_CERT", "SECUREVAULT_KEY", "SECUREVAULT_CA")
        }
        login = ("login", "--username", "alice", "--password-stdin")
        from_config = self.cli(*login, stdin=PASSWORD + "\n", env=env)
        self.assertEqual(from_config.returncode, 0, from_config.stderr)
        env["SECUREVAULT_URL"] = f"https://127.0.0.1:{free_port()}"
        self.assert_fails(self.cli(*login, stdin=PASSWORD + "\n", env=env), 7)
        from_flag = self.cli("--url", self.vault.url, *login, stdin=PASSWORD + "\n", env=env)
        self.assertEqual(from_flag.returncode, 0, from_flag.stderr)


class LibraryTests(DaemonTestCase):
    """L{VaultClient} used directly."""

    def client(self) -> VaultClient:
        """A library client for the class's daemon, closed in cleanup."""
        files = self.vault.client_files()
        vault = VaultClient(self.vault.url, files["cert"], files["key"], files["ca"])
        self.addCleanup(vault.close)
        return vault

    def test_round_trip(self) -> None:
        """login, upload (bytes and a file, with progress), list, download by
        id and by name, delete and logout work over one kept-alive connection."""
        vault = self.client()
        self.assertEqual(vault.health()["status"], "ok")
        connection = vault._connection.sock
        session = vault.login("alice", PASSWORD)
        self.assertIs(vault._connection.sock, connection)
        self.assertEqual(vault.session_id, session.session_id)

        base = self.make_dir()
        data = os.urandom(THREE_MIB + 5)
        source = base / "source.bin"
        source.write_bytes(data)
        sent: list[int] = []
        uploaded = vault.upload(source, filename="lib.bin", progress=sent.append)
        self.assertEqual(sum(sent), len(data))
        self.assertEqual(uploaded.sha256, hashlib.sha256(data).hexdigest())
        small = vault.upload_bytes("lib-small.txt", b"tiny")
        listed = vault.list()
        self.assertEqual(listed[:2], [small, uploaded])  # newest first

        received: list[int] = []
        info = vault.download(uploaded.id, dest=base / "back.bin", progress=received.append)
        self.assertEqual(info, uploaded)
        self.assertEqual((base / "back.bin").read_bytes(), data)
        self.assertEqual(sum(received), len(data))
        vault.download(name="lib-small.txt", dest=base / "small.txt")
        self.assertEqual((base / "small.txt").read_bytes(), b"tiny")
        self.assertEqual(sorted(p.name for p in base.iterdir()), ["back.bin", "small.txt", "source.bin"])

        vault.delete(uploaded.id)
        with self.assertRaises(NotFoundError):
            vault.download(uploaded.id, dest=base / "again.bin")
        with self.assertRaises(NotFoundError) as raised:
            vault.delete(uploaded.id)
        self.assertEqual((raised.exception.status, raised.exception.code), (404, "not_found"))

        vault.logout()
        self.assertIsNone(vault.session_id)
        vault.session_id = session.session_id
        with self.assertRaises(AuthenticationError) as expired:
            vault.list()
        self.assertEqual(expired.exception.code, "invalid_session")

    def test_wrong_password(self) -> None:
        """Wrong credentials are an AuthenticationError with the contract's code."""
        with self.assertRaises(AuthenticationError) as raised:
            self.client().login("alice", "not the password")
        self.assertEqual((raised.exception.status, raised.exception.code), (401, "invalid_credentials"))
        self.assertEqual(raised.exception.exit_code, 3)

    def test_unreachable(self) -> None:
        """A refused connection is ConnectionFailed (exit status 7)."""
        files = self.vault.client_files()
        vault = VaultClient(f"https://127.0.0.1:{free_port()}", files["cert"], files["key"], files["ca"])
        with self.assertRaises(ConnectionFailed) as raised:
            vault.health()
        self.assertEqual(raised.exception.exit_code, 7)


class VerificationTests(SyncTestCase):
    """install_verified: only bytes with the announced SHA-256 are kept."""

    def test_tampered(self) -> None:
        """A downloaded file whose bytes were altered is deleted, the
        destination is not created, and IntegrityError (exit 5) is raised."""
        base = self.make_dir()
        original = b"the original bytes" * 1000
        part = base / ".out.part"
        part.write_bytes(original[:-1] + b"X")
        with self.assertRaises(IntegrityError) as raised:
            install_verified(part, base / "out", hashlib.sha256(original).hexdigest())
        self.assertEqual(raised.exception.exit_code, 5)
        self.assertEqual(list(base.iterdir()), [])

    def test_matching(self) -> None:
        """Matching bytes are renamed into place; without overwrite an
        existing destination is kept and the temp file removed."""
        base = self.make_dir()
        part = base / ".out.part"
        part.write_bytes(b"good")
        digest = hashlib.sha256(b"good").hexdigest()
        install_verified(part, base / "out", digest)
        self.assertEqual((base / "out").read_bytes(), b"good")
        self.assertFalse(part.exists())
        part.write_bytes(b"good")
        (base / "out").write_bytes(b"mine")
        with self.assertRaises(FileExistsError):
            install_verified(part, base / "out", digest, overwrite=False)
        self.assertEqual((base / "out").read_bytes(), b"mine")
        self.assertFalse(part.exists())


class HelperTests(SyncTestCase):
    """Pure pieces of the client: names, settings, errors."""

    def test_safe_output_name(self) -> None:
        """A server-supplied name keeps only its last component; names that
        would leave or denote the directory are refused."""
        self.assertEqual(safe_output_name("../../etc/passwd"), "passwd")
        self.assertEqual(safe_output_name("dir\\evil.txt"), "evil.txt")
        self.assertEqual(safe_output_name("ok name.txt"), "ok name.txt")
        for bad in ["", ".", "..", "a/..", "x/", "bell\x07"]:
            with self.assertRaises(VaultError, msg=repr(bad)):
                safe_output_name(bad)

    def test_precedence(self) -> None:
        """Options beat the environment, which beats the config file, which
        beats the defaults; empty variables count as unset."""
        flags = {"url": "https://flag", "cert": None, "key": None, "ca": None}
        environ = {
            "SECUREVAULT_URL": "https://env",
            "SECUREVAULT_CERT": "env.crt",
            "SECUREVAULT_KEY": "",
            "SECUREVAULT_SESSION_FILE": "/s/session.json",
        }
        config = {"url": "https://config", "cert": "config.crt", "key": "config.key"}
        self.assertEqual(
            resolve_settings(flags, environ, config),
            Settings("https://flag", "env.crt", "config.key", "certs/ca.crt", Path("/s/session.json")),
        )
        self.assertEqual(
            resolve_settings({}, {"XDG_CONFIG_HOME": "/x", "HOME": "/h"}, {}).session_file,
            Path("/x/securevault/session.json"),
        )
        self.assertEqual(
            resolve_settings({}, {"HOME": "/h"}, {}).session_file,
            Path("/h/.config/securevault/session.json"),
        )

    def test_config_file(self) -> None:
        """Relative paths in client.toml are relative to the file; unknown
        keys and bad TOML are usage errors; a missing file is empty."""
        base = self.make_dir()
        config = base / "client.toml"
        self.assertEqual(load_config_file(config), {})
        config.write_text('url = "https://vault:5000"\ncert = "c.crt"\nca = "/abs/ca.crt"\n')
        self.assertEqual(
            load_config_file(config),
            {"url": "https://vault:5000", "cert": str(base / "c.crt"), "ca": "/abs/ca.crt"},
        )
        config.write_text('cret = "typo"\n')
        self.assertRaises(UsageError, load_config_file, config)
        config.write_text("url = \n")
        self.assertRaises(UsageError, load_config_file, config)

    def test_error_mapping(self) -> None:
        """Each contract error code maps to its exception and exit status."""
        cases = {
            (401, "invalid_session"): (AuthenticationError, 3),
            (401, "invalid_credentials"): (AuthenticationError, 3),
            (404, "not_found"): (NotFoundError, 4),
            (500, "integrity_error"): (IntegrityError, 5),
            (413, "too_large"): (StorageLimitError, 6),
            (507, "insufficient_storage"): (StorageLimitError, 6),
            (429, "too_many_attempts"): (TooManyAttempts, 8),
            (400, "bad_request"): (VaultError, 1),
        }
        for (status, code), (cls, exit_code) in cases.items():
            body = json.dumps({"error": code, "message": "m", "request_id": "r1"}).encode()
            error = error_from_response(status, body, {"retry-after": "7"})
            self.assertIs(type(error), cls)
            self.assertEqual(
                (error.status, error.code, error.message, error.request_id, error.exit_code, error.retry_after),
                (status, code, "m", "r1", exit_code, 7),
            )
        proxy = error_from_response(502, b"<html>Bad Gateway</html>")
        self.assertEqual((type(proxy), proxy.code, proxy.exit_code), (VaultError, "http_502", 1))

    def test_human_size(self) -> None:
        """Sizes print exactly below 1 KiB and with one decimal above."""
        self.assertEqual(
            [human_size(n) for n in (0, 1023, 1536, THREE_MIB, 5 * 1024**4)],
            ["0 B", "1023 B", "1.5 KiB", "3.0 MiB", "5.0 TiB"],
        )

    def test_usage_error(self) -> None:
        """download without ID or --name is a usage error (exit 2), and
        --help documents the exit statuses."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(main(["download"]), 2)
            self.assertEqual(main(["--help"]), 0)
        self.assertIn("one of the arguments ID --name is required", err.getvalue())
        self.assertIn("8  too many failed logins", out.getvalue())
