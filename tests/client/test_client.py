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
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import unittest
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, ClassVar

from securevault.admin import pki
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
    Usage,
    VaultClient,
    VaultError,
    error_from_response,
    install_verified,
    part_path,
)
from securevault.client.support import certificate_refused
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


def download_records(vault: RunningVault) -> list[dict[str, object]]:
    """The daemon's audit records of downloads, oldest first."""
    lines = (vault.data_dir / "audit.jsonl").read_bytes().splitlines()
    return [record for record in map(json.loads, lines) if record.get("event") == "download"]


def part_name(dest: Path, sha256: str) -> Path:
    """Where the client keeps a partial download of that archive into C{dest}."""
    return dest.parent / f".{dest.name}.{sha256}.part"


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that passes one connection's bytes both ways
    and cuts it (both directions) once C{cut_after} bytes came from the
    server: a network that breaks in the middle of a download."""

    def __init__(self, port: int, cut_after: int) -> None:
        self._target = port
        self._cut_after = cut_after
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """Every connection (the client reconnects to ask again) is cut alike."""
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client), daemon=True).start()

    def _downstream(self, server: socket.socket, client: socket.socket) -> None:
        self._pump(server, client, self._cut_after)
        for end in (client, server):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while limit is None or sent < limit:
                data = source.recv(65536 if limit is None else min(65536, limit - sent))
                if not data:
                    return
                sink.sendall(data)
                sent += len(data)
        except OSError:
            return

    def close(self) -> None:
        for end in self._sockets:
            try:
                end.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
            except OSError:
                pass
            end.close()
        self._thread.join(WAIT_SECONDS)


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
        """Run C{securevault-client ARGV} in the test's work directory, with
        no controlling terminal (as in a script or CI: getpass cannot reach
        /dev/tty)."""
        return subprocess.run(
            [sys.executable, "-m", "securevault.client.cli", *argv],
            cwd=self.work,
            env=self.env if env is None else env,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
            start_new_session=True,
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

    def test_upload_resume_flag(self) -> None:
        """C{upload --resume} uploads through tus and prints the archive as
        a plain upload does; the archive is byte-exact."""
        self.login()
        big = self.work / "resumable.bin"
        big.write_bytes(os.urandom(THREE_MIB))
        result = self.cli("upload", "--resume", str(big))
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        archive_id, size, name = result.stdout.split(None, 2)
        self.assertEqual((size, name.strip()), (str(THREE_MIB), "resumable.bin"))
        back = self.work / "back.bin"
        fetched = self.cli("download", archive_id, "-o", str(back))
        self.assertEqual(fetched.returncode, 0, fetched.stderr)
        self.assertEqual(back.read_bytes(), big.read_bytes())

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

    def test_download_resumes_a_partial_file(self) -> None:
        """A download cut off earlier left the start of the file in its
        .part file (simulated by truncating a finished one): download asks
        the server only for the rest (the audit log records that range),
        checks the whole file's SHA-256 and renames it into place."""
        self.login()
        data = os.urandom(THREE_MIB)
        (self.work / "resume.bin").write_bytes(data)
        archive_id = self.cli("upload", "resume.bin").stdout.split()[0]
        out = self.work / "out"
        out.mkdir()
        dest = out / "resume.bin"
        first = self.cli("download", archive_id, "-o", str(dest))
        self.assertEqual(first.returncode, 0, first.stderr)
        part = part_name(dest, hashlib.sha256(data).hexdigest())
        dest.rename(part)
        with open(part, "r+b") as held:
            held.truncate(1_000_000)
        result = self.cli("download", archive_id, "-o", str(dest))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(dest.read_bytes(), data)
        self.assertEqual(sorted(p.name for p in out.iterdir()), ["resume.bin"])
        self.assertEqual(download_records(self.vault)[-1].get("range"), f"1000000-{THREE_MIB - 1}")

    def test_usage(self) -> None:
        """usage prints a small table, and --json the contract's object."""
        self.login()
        (self.work / "counted.txt").write_bytes(b"count me")
        self.assertEqual(self.cli("upload", "counted.txt").returncode, 0)
        listed = json.loads(self.cli("list", "--json").stdout)
        result = self.cli("usage", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        usage = json.loads(result.stdout)
        self.assertEqual(set(usage), {"archives", "stored_bytes", "quota_bytes", "uploads_in_progress"})
        self.assertEqual((usage["archives"], usage["quota_bytes"]), (len(listed), None))
        self.assertGreater(usage["stored_bytes"], 0)
        table = self.cli("usage")
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertRegex(table.stdout, rf"\Aarchives\s+{len(listed)}\nstored\s+.*\({usage['stored_bytes']} bytes\)\n")
        self.assertRegex(table.stdout, r"quota\s+none\nuploads in progress\s+0\n\Z")

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

    def test_piped_password_without_the_flag(self) -> None:
        """A password piped in without --password-stdin is read from the
        pipe quietly: logged in, nothing on stderr (getpass warned that it
        could not control the echo, and read it anyway)."""
        result = self.cli("login", "--username", "alice", stdin=PASSWORD + "\n")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertTrue(self.session_file.exists())

    def test_configuration_errors_exit_2(self) -> None:
        """A missing certificate, key or CA file, or an http:// URL, is a
        configuration error: exit 2 (as --help says), one line naming the
        file or saying to use https://."""
        for variable, option in (
            ("SECUREVAULT_CERT", "--cert"),
            ("SECUREVAULT_KEY", "--key"),
            ("SECUREVAULT_CA", "--ca"),
        ):
            missing = str(self.work / f"absent-{option[2:]}.pem")
            result = self.cli("list", env={**self.env, variable: missing})
            self.assert_fails(result, 2)
            self.assertIn(missing, result.stderr)
            self.assertIn(f"set it with {option}", result.stderr)
        plain = self.vault.url.replace("https://", "http://")
        result = self.cli("--url", plain, "login", "--username", "alice", "--password-stdin", stdin=PASSWORD + "\n")
        self.assert_fails(result, 2)
        self.assertIn(f"use {self.vault.url!r}", result.stderr)

    def test_download_never_replaces_a_file_without_force(self) -> None:
        """download refuses to replace an existing file, named by -o or by
        the archive's name, before transferring anything (exit 1, one line
        saying --force); with --force it replaces it."""
        self.login()
        (self.work / "report.txt").write_bytes(b"the vault's copy")
        archive_id = self.cli("upload", "report.txt").stdout.split()[0]
        mine = self.work / "mine.txt"
        for argv in (["download", archive_id, "-o", str(mine)], ["download", "--name", "report.txt"]):
            target = mine if "-o" in argv else self.work / "report.txt"
            target.write_bytes(b"my own file")
            refused = self.cli(*argv)
            self.assert_fails(refused, 1)
            self.assertIn("already exists", refused.stderr)
            self.assertIn("--force", refused.stderr)
            self.assertEqual(target.read_bytes(), b"my own file")
            replaced = self.cli(*argv, "--force")
            self.assertEqual(replaced.returncode, 0, replaced.stderr)
            self.assertEqual(target.read_bytes(), b"the vault's copy")
        self.assertEqual([p.name for p in self.work.iterdir() if p.name.endswith(".part")], [])

    def test_refused_certificate_is_named(self) -> None:
        """A client certificate the server refuses (from another CA, or
        expired) exits 7 with a line that says so, not a bare TLS error."""
        other = self.make_dir()
        other_ca, other_ca_key = pki.make_ca("another CA")
        stranger, stranger_key = pki.make_client_cert(other_ca, other_ca_key, "stranger")
        ca_cert = pki.load_cert(self.vault.certs_dir / "ca.crt")
        ca_key = pki.load_key(self.vault.certs_dir / "ca.key")
        now = datetime.now(UTC)
        expired, expired_key = pki.make_client_cert(
            ca_cert, ca_key, "expired", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
        )
        for name, cert, key in (("stranger", stranger, stranger_key), ("expired", expired, expired_key)):
            pki.write_cert(other / f"{name}.crt", cert)
            pki.write_key(other / f"{name}.key", key)
            env = {
                **self.env,
                "SECUREVAULT_CERT": str(other / f"{name}.crt"),
                "SECUREVAULT_KEY": str(other / f"{name}.key"),
            }
            result = self.cli("login", "--username", "alice", "--password-stdin", stdin=PASSWORD + "\n", env=env)
            self.assert_fails(result, 7)
            self.assertIn(
                "the server refused this client certificate (revoked, expired or from another CA?)", result.stderr
            )

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

    def test_resumable_upload_resumes(self) -> None:
        """upload_resumable (tus) interrupted after its first piece sends, when
        run again, only what the vault has not kept, and the archive is
        byte-exact; an empty file becomes its archive at the POST."""
        vault = self.client()
        vault.login("alice", PASSWORD)
        base = self.make_dir()
        data = os.urandom(5 * 65536 + 123)
        source = base / "resumable.bin"
        source.write_bytes(data)
        state = base / "state"

        class Interrupted(Exception):
            pass

        def interrupt(count: int) -> None:
            raise Interrupted()

        self.assertRaises(Interrupted, vault.upload_resumable, source, state, progress=interrupt, chunk_bytes=65536)
        self.assertEqual(len(list(state.iterdir())), 1)  # the upload's URL, kept for the next run
        sent: list[int] = []
        info = vault.upload_resumable(source, state, progress=sent.append, chunk_bytes=65536)
        self.assertEqual(sent[0], 65536)  # acknowledged before the interruption: not sent again
        self.assertEqual(sum(sent), len(data))
        self.assertEqual(info.sha256, hashlib.sha256(data).hexdigest())
        self.assertEqual(list(state.iterdir()), [])
        vault.download(info.id, dest=base / "back.bin")
        self.assertEqual((base / "back.bin").read_bytes(), data)
        (base / "empty.bin").write_bytes(b"")
        self.assertEqual(vault.upload_resumable(base / "empty.bin", state).size, 0)

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

    def test_usage(self) -> None:
        """usage() counts the caller's archives and stored bytes."""
        vault = self.client()
        vault.login("alice", PASSWORD)
        vault.upload_bytes("usage.bin", os.urandom(10_000))
        usage = vault.usage()
        self.assertEqual(usage.archives, len(vault.list()))
        self.assertGreater(usage.stored_bytes, 10_000)
        self.assertEqual((usage.quota_bytes, usage.uploads_in_progress), (None, 0))

    def test_connection_lost_then_resumed(self) -> None:
        """A download whose connection breaks after about 1 MiB (a proxy
        cuts it) keeps the bytes received in its .part file, and
        ConnectionFailed says so; the next download of it asks only for the
        rest, and the whole file is verified and renamed into place."""
        files = self.vault.client_files()
        data = os.urandom(THREE_MIB)
        direct = self.client()
        direct.login("alice", PASSWORD)
        info = direct.upload_bytes("cut.bin", data)
        assert self.vault.port is not None
        proxy = CuttingProxy(self.vault.port, cut_after=1 << 20)
        self.addCleanup(proxy.close)
        cut = VaultClient(f"https://127.0.0.1:{proxy.port}", files["cert"], files["key"], files["ca"])
        self.addCleanup(cut.close)
        cut.session_id = direct.session_id
        dest = self.make_dir() / "cut.bin"
        with self.assertRaises(ConnectionFailed) as raised:
            cut.download(expected=info, dest=dest)
        self.assertIn("download again to resume", raised.exception.message)
        part = part_name(dest, info.sha256)
        held = part.stat().st_size
        self.assertTrue(0 < held < len(data), held)
        self.assertEqual(part.read_bytes(), data[:held])
        self.assertEqual(mode(part), 0o600)
        self.assertFalse(dest.exists())

        progress: list[int] = []
        direct.download(info.id, dest=dest, progress=progress.append)
        self.assertEqual(dest.read_bytes(), data)
        self.assertEqual(progress[0], held)
        self.assertEqual(sum(progress), len(data))
        self.assertFalse(part.exists())
        self.assertEqual(download_records(self.vault)[-1].get("range"), f"{held}-{len(data) - 1}")

    def test_interrupted_then_resumed(self) -> None:
        """A download interrupted (Ctrl-C) after its first block keeps what
        it has; the next one resumes from there."""
        vault = self.client()
        vault.login("alice", PASSWORD)
        data = os.urandom(THREE_MIB)
        info = vault.upload_bytes("interrupted.bin", data)
        dest = self.make_dir() / "interrupted.bin"

        def interrupt(count: int) -> None:
            raise KeyboardInterrupt

        with self.assertRaises(KeyboardInterrupt):
            vault.download(info.id, dest=dest, progress=interrupt)
        vault.close()
        held = part_name(dest, info.sha256).stat().st_size
        self.assertTrue(0 < held < len(data), held)
        vault.download(info.id, dest=dest)
        self.assertEqual(dest.read_bytes(), data)
        self.assertEqual(download_records(self.vault)[-1].get("range"), f"{held}-{len(data) - 1}")

    def test_resumed_bytes_are_verified(self) -> None:
        """A .part file whose bytes are not the archive's (damaged on the
        client's disk) is resumed from, the whole SHA-256 then fails: an
        IntegrityError, and neither the file nor the .part is kept."""
        vault = self.client()
        vault.login("alice", PASSWORD)
        data = os.urandom(200_000)
        info = vault.upload_bytes("damaged.bin", data)
        dest = self.make_dir() / "damaged.bin"
        part = part_name(dest, info.sha256)
        part.write_bytes(b"\x00" * 100_000)
        with self.assertRaises(IntegrityError):
            vault.download(info.id, dest=dest)
        self.assertEqual(list(dest.parent.iterdir()), [])

    def test_stale_part_restarts_from_zero(self) -> None:
        """A .part file of another archive (another ETag) for the same
        destination is offered with If-Range; the server answers 200 with
        the whole file, which replaces it."""
        vault = self.client()
        vault.login("alice", PASSWORD)
        data = os.urandom(200_000)
        info = vault.upload_bytes("fresh.bin", data)
        dest = self.make_dir() / "fresh.bin"
        stale = part_name(dest, "0" * 64)
        stale.write_bytes(os.urandom(50_000))
        progress: list[int] = []
        vault.download(info.id, dest=dest, progress=progress.append)
        self.assertEqual(dest.read_bytes(), data)
        self.assertEqual(sum(progress), len(data))
        self.assertEqual(list(dest.parent.iterdir()), [dest])
        self.assertNotIn("range", download_records(self.vault)[-1])

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

    def test_part_path(self) -> None:
        """A partial download is kept beside its destination, named after it
        and the archive's SHA-256, within 255 bytes however long the name;
        a digest that is not 64 hex digits never becomes part of a path."""
        base = Path("/tmp/x")
        digest = "ab" * 32
        self.assertEqual(part_path(base / "out.bin", digest), base / f".out.bin.{digest}.part")
        self.assertEqual(part_path(base / "o", digest.upper()), base / f".o.{digest}.part")
        long = part_path(base / ("é" * 127), digest)
        assert long is not None
        self.assertEqual(long.parent, base)
        self.assertLessEqual(len(long.name.encode("utf-8")), 255)
        self.assertTrue(long.name.startswith(".éé") and long.name.endswith(f".{digest}.part"))
        for hostile in ["../../etc/passwd", "", "ab" * 31, "zz" * 32, digest + "/x"]:
            self.assertIsNone(part_path(base / "out.bin", hostile), hostile)

    def test_usage_from_json(self) -> None:
        """The /usage answer is read field by field; a malformed one is a
        protocol error."""
        body = {"archives": 2, "stored_bytes": 10, "quota_bytes": None, "uploads_in_progress": 0}
        self.assertEqual(Usage.from_json(body), Usage(2, 10, None, 0))
        self.assertEqual(Usage.from_json(body).to_json(), body)
        self.assertEqual(Usage.from_json({**body, "quota_bytes": 5}).quota_bytes, 5)
        for bad in [[], {**body, "archives": "2"}, {**body, "stored_bytes": True}, {**body, "archives": -1}]:
            with self.assertRaises(VaultError):
                Usage.from_json(bad)
        missing = dict(body)
        del missing["quota_bytes"]
        with self.assertRaises(VaultError):
            Usage.from_json(missing)

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

    def test_certificate_refused(self) -> None:
        """The server's alerts about the client's certificate, and a
        connection cut mid-TLS, read as a refused certificate; a server
        certificate that fails verification, or a refused TCP connection,
        does not."""
        unknown_ca = ssl.SSLError(1, "tlsv1 alert unknown ca")
        unknown_ca.reason = "TLSV1_ALERT_UNKNOWN_CA"
        cipher = ssl.SSLError(1, "sslv3 alert handshake failure")
        cipher.reason = "SSLV3_ALERT_HANDSHAKE_FAILURE"
        self.assertTrue(certificate_refused(unknown_ca))
        self.assertTrue(certificate_refused(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")))
        self.assertFalse(certificate_refused(cipher))
        self.assertFalse(certificate_refused(ssl.SSLCertVerificationError(1, "certificate verify failed")))
        self.assertFalse(certificate_refused(ConnectionRefusedError(111, "Connection refused")))

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
