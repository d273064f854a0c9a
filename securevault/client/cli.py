# -*- test-case-name: tests.client.test_client -*-
"""C{securevault-client}: move files in and out of a securevault from a shell.

Built on L{securevault.client}.  Commands::

    securevault-client login [--username NAME] [--password-stdin]
    securevault-client upload PATH...
    securevault-client list [--json]
    securevault-client download ID | --name NAME [-o PATH] [--force]
    securevault-client delete ID
    securevault-client usage [--json]
    securevault-client logout

Settings (C{url}, C{cert}, C{key}, C{ca}) come from, in this order of
precedence: the options C{--url}/C{--cert}/C{--key}/C{--ca}; the environment
(C{SECUREVAULT_URL}, C{SECUREVAULT_CERT}, C{SECUREVAULT_KEY},
C{SECUREVAULT_CA}); the TOML file C{$XDG_CONFIG_HOME/securevault/client.toml}
(or C{~/.config/securevault/client.toml}; relative paths in it are relative to
that file); then the defaults C{https://localhost:5000}, C{certs/client.crt},
C{certs/client.key}, C{certs/ca.crt}.

A download cut off midway keeps what it received in C{.<name>.<sha256>.part}
beside the destination; the same download again asks only for the rest
(C{Range} with C{If-Range}) and still checks the whole file's SHA-256.

C{login} keeps the session, with the URL it belongs to, in a 0600 file:
C{$SECUREVAULT_SESSION_FILE}, else C{session.json} next to C{client.toml}
(directory 0700).  C{logout} ends the session and removes the file.

Transfers show a progress bar on standard error when it is a terminal (if
C{tqdm} is installed).  Every failure is one line
C{securevault-client: error: <sentence>} on standard error, and the exit
status says which kind of failure it was:

    0  success
    1  any other error (bad local file, unexpected answer, ...)
    2  usage: bad arguments, a bad configuration file, a missing or
       unreadable certificate, key or CA file, a URL that is not https://
    3  not logged in, invalid or expired session, wrong username or password
    4  no such archive
    5  integrity: the server's archive failed authentication, or the bytes
       received did not match their SHA-256 (nothing is saved then)
    6  too large, quota exceeded or the server's storage is full
    7  connection or TLS failure (refused, unreachable, timed out, handshake
       rejected, connection lost mid-transfer)
    8  too many failed logins; wait before trying again
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import os
import sys
import tempfile
import tomllib
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from securevault import __version__
from securevault.client.library import (
    EXIT_ERROR,
    EXIT_USAGE,
    AuthenticationError,
    FileInfo,
    Progress,
    Session,
    TooManyAttempts,
    Usage,
    VaultClient,
    VaultError,
)

PROG = "securevault-client"
DEFAULTS: Mapping[str, str] = {
    "url": "https://localhost:5000",
    "cert": "certs/client.crt",
    "key": "certs/client.key",
    "ca": "certs/ca.crt",
}
ENVIRONMENT: Mapping[str, str] = {
    "url": "SECUREVAULT_URL",
    "cert": "SECUREVAULT_CERT",
    "key": "SECUREVAULT_KEY",
    "ca": "SECUREVAULT_CA",
}
SESSION_FILE_VARIABLE = "SECUREVAULT_SESSION_FILE"
CONFIG_FILE_NAME = "client.toml"
SESSION_FILE_NAME = "session.json"
CONFIG_DIR_MODE = 0o700
SESSION_FILE_MODE = 0o600

EPILOG = """\
settings: options > environment (SECUREVAULT_URL, SECUREVAULT_CERT,
SECUREVAULT_KEY, SECUREVAULT_CA, SECUREVAULT_SESSION_FILE) >
$XDG_CONFIG_HOME/securevault/client.toml (keys url, cert, key, ca) > defaults.

exit status:
  0  success
  1  other error
  2  usage or configuration error (also a missing certificate, key or CA
     file, or an http:// URL)
  3  not logged in, invalid/expired session, or wrong username/password
  4  no such archive
  5  integrity error (server archive or local SHA-256 mismatch)
  6  too large, quota exceeded or storage full
  7  connection or TLS failure
  8  too many failed logins
"""


class UsageError(Exception):
    """Bad arguments or configuration: exit status 2."""


@dataclass(frozen=True)
class Settings:
    """Where the vault is and how to reach it, after precedence is applied."""

    url: str
    cert: str
    key: str
    ca: str
    session_file: Path


# -- settings ----------------------------------------------------------------


def config_dir(environ: Mapping[str, str]) -> Path:
    """C{$XDG_CONFIG_HOME/securevault}, else C{~/.config/securevault}.

    A relative C{XDG_CONFIG_HOME} is ignored, as the XDG specification says.
    """
    base = environ.get("XDG_CONFIG_HOME", "")
    if base and os.path.isabs(base):
        return Path(base) / "securevault"
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".config" / "securevault"


def load_config_file(path: Path) -> dict[str, str]:
    """The settings in a C{client.toml}; an absent file is empty.

    Relative certificate paths are made relative to the file's directory, so
    the file means the same thing from any working directory.
    """
    try:
        with open(path, "rb") as stream:
            table = tomllib.load(stream)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"The configuration file {path} is not valid TOML: {error}.") from None
    except OSError as error:
        raise UsageError(f"Cannot read the configuration file {path}: {error.strerror}.") from None
    settings: dict[str, str] = {}
    for name, value in table.items():
        if name not in DEFAULTS:
            raise UsageError(
                f"The configuration file {path} has an unknown key {name!r} (known: {', '.join(DEFAULTS)})."
            )
        if not isinstance(value, str) or not value:
            raise UsageError(f"In the configuration file {path}, {name!r} must be a non-empty string.")
        if name != "url":
            value = str(path.parent / os.path.expanduser(value))
        settings[name] = value
    return settings


def resolve_settings(flags: Mapping[str, Any], environ: Mapping[str, str], config: Mapping[str, str]) -> Settings:
    """Apply the precedence flags > environment > config file > defaults.

    Empty environment variables count as unset.
    """
    chosen: dict[str, str] = {}
    for name, default in DEFAULTS.items():
        flag = flags.get(name)
        from_env = environ.get(ENVIRONMENT[name]) or None
        chosen[name] = flag or from_env or config.get(name) or default
    session_file = environ.get(SESSION_FILE_VARIABLE) or None
    return Settings(
        url=chosen["url"],
        cert=os.path.expanduser(chosen["cert"]),
        key=os.path.expanduser(chosen["key"]),
        ca=os.path.expanduser(chosen["ca"]),
        session_file=(
            Path(os.path.expanduser(session_file)) if session_file else config_dir(environ) / SESSION_FILE_NAME
        ),
    )


# -- the session file --------------------------------------------------------


def save_session(path: Path, url: str, username: str, session: Session) -> None:
    """Write the session atomically to a 0600 file (its directory made 0700
    when this creates it)."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, mode=CONFIG_DIR_MODE)
        os.chmod(path.parent, CONFIG_DIR_MODE)  # mkdir's mode is filtered by the umask
    record = {
        "url": url,
        "username": username,
        "session_id": session.session_id,
        "expires_at": session.expires_at,
    }
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, SESSION_FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_session_file(path: Path) -> dict[str, str] | None:
    """The saved session record, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not (
        isinstance(record, dict) and isinstance(record.get("url"), str) and isinstance(record.get("session_id"), str)
    ):
        raise AuthenticationError(
            f"The session file {path} is damaged; run '{PROG} login' again.", code="not_logged_in"
        )
    return {k: v for k, v in record.items() if isinstance(v, str)}


def load_session(settings: Settings) -> str:
    """The saved session id for C{settings.url}, else an L{AuthenticationError}."""
    record = read_session_file(settings.session_file)
    if record is None:
        raise AuthenticationError(f"Not logged in; run '{PROG} login' first.", code="not_logged_in")
    if record["url"].rstrip("/") != settings.url.rstrip("/"):
        raise AuthenticationError(
            f"The saved session is for {record['url']}, not {settings.url}; run '{PROG} login' first.",
            code="not_logged_in",
        )
    return record["session_id"]


# -- output helpers ----------------------------------------------------------


def printable(text: str) -> str:
    """C{text} with control characters escaped, so that a name from the
    server can never move the cursor or forge another line."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" else ch for ch in text
    )


def human_size(size: int) -> str:
    """1536 → C{1.5 KiB}; bytes below 1 KiB stay exact."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def format_table(files: Sequence[FileInfo]) -> str:
    """The readable listing: id, size, creation time, name (newest first)."""
    rows = [("ID", "SIZE", "CREATED", "NAME")]
    rows += [(f.id, human_size(f.size), f.created_at, printable(f.filename)) for f in files]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for row in rows:
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip())
    return "\n".join(lines)


def safe_output_name(filename: str) -> str:
    """A server-supplied filename reduced to a name that stays in the
    current directory: its last path component, never empty, C{.} or C{..},
    and without control characters."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or any(unicodedata.category(ch) == "Cc" for ch in base):
        raise VaultError(
            f"The archive's name {printable(filename)!r} cannot be used as a local file name; choose one with -o PATH.",
            code="unsafe_filename",
        )
    return base


@contextmanager
def progress_bar(total: int, label: str, stream: TextIO) -> Iterator[Progress | None]:
    """A tqdm bar on C{stream} when it is a terminal and tqdm is installed;
    otherwise nothing at all (None)."""
    if not stream.isatty():
        yield None
        return
    try:
        tqdm_module: Any = importlib.import_module("tqdm")
    except ImportError:
        yield None
        return
    bar = tqdm_module.tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=printable(label),
        file=stream,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        yield bar.update
    finally:
        bar.close()


# -- commands ----------------------------------------------------------------


def _client(settings: Settings, session_id: str | None = None) -> VaultClient:
    return VaultClient(settings.url, settings.cert, settings.key, settings.ca, session_id=session_id)


def _session_client(settings: Settings) -> VaultClient:
    """A client with the saved session; the settings are checked first (a
    missing certificate is worth knowing before "not logged in")."""
    vault = _client(settings)
    try:
        vault.session_id = load_session(settings)
    except BaseException:
        vault.close()
        raise
    return vault


def _read_line(stdin: TextIO) -> str | None:
    line = stdin.readline()
    if not line:
        return None
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    return line


def _login(args: argparse.Namespace, settings: Settings, out: TextIO) -> None:
    if args.password_stdin and not args.username:
        raise UsageError("--password-stdin needs --username.")
    username = args.username
    if not username:
        sys.stderr.write("Username: ")
        sys.stderr.flush()
        username = _read_line(sys.stdin)
        if not username:
            raise VaultError("No username was given.")
    if args.password_stdin or not sys.stdin.isatty():
        # Piped in (with or without --password-stdin): read it as a line.
        # getpass would warn that it cannot hide the echo of a pipe, or
        # ignore the pipe and wait at the terminal.
        password = _read_line(sys.stdin)
        if password is None:
            raise VaultError("No password was given on standard input.")
    else:
        try:
            password = getpass.getpass(f"Password for {username}: ")
        except EOFError:
            raise VaultError("No password was entered.") from None
    try:
        previous = read_session_file(settings.session_file)
    except AuthenticationError:
        previous = None
    with _client(settings) as vault:
        session = vault.login(username, password)
        save_session(settings.session_file, settings.url, username, session)
        if previous and previous["url"].rstrip("/") == settings.url.rstrip("/"):
            # Best effort: the replaced session should not stay usable.
            vault.session_id = previous["session_id"]
            try:
                vault.logout()
            except VaultError:
                pass
    print(f"logged in as {printable(username)}; the session expires at {session.expires_at}", file=out)


def _logout(args: argparse.Namespace, settings: Settings, out: TextIO) -> None:
    record = read_session_file(settings.session_file)
    if record is None:
        print("not logged in", file=out)
        return
    # End it on the vault it belongs to; if that vault cannot be reached the
    # error propagates and the file is kept, so that logout can be retried.
    with _client(replace(settings, url=record["url"]), record["session_id"]) as vault:
        try:
            vault.logout()
        except AuthenticationError:
            pass  # already expired or revoked: just forget it
    settings.session_file.unlink(missing_ok=True)
    print("logged out", file=out)


def _upload(args: argparse.Namespace, settings: Settings, out: TextIO) -> None:
    paths = [Path(p) for p in args.paths]
    for path in paths:  # check every file before sending any
        if not path.exists():
            raise VaultError(f"No such file: {path}.")
        if not path.is_file():
            raise VaultError(f"Not a regular file: {path}.")
        if not os.access(path, os.R_OK):
            raise VaultError(f"Cannot read {path}: permission denied.")
    with _session_client(settings) as vault:
        for path in paths:
            with progress_bar(path.stat().st_size, path.name, sys.stderr) as progress:
                if args.resume:
                    info = vault.upload_resumable(path, settings.session_file.parent / "uploads", progress=progress)
                else:
                    info = vault.upload(path, progress=progress)
            print(f"{info.id}  {info.size}  {printable(info.filename)}", file=out, flush=True)


def _list(args: argparse.Namespace, settings: Settings, out: TextIO) -> None:
    with _session_client(settings) as vault:
        files = vault.list()
    if args.json:
        json.dump([f.to_json() for f in files], out, indent=2, ensure_ascii=False)
        out.write("\n")
    elif files:
        print(format_table(files), file=out)
    else:
        print("no files", file=out)


def _download(args: argparse.Namespace, settings: Settings, out: TextIO) -> None:
    with _session_client(settings) as vault:
        info = vault.stat(args.id, args.name)
        if args.output is None:
            dest = Path(safe_output_name(info.filename))
        else:
            dest = Path(args.output)
            if dest.is_dir():
                dest = dest / safe_output_name(info.filename)
        exists = VaultError(f"{dest} already exists; choose another path with -o PATH, or replace it with --force.")
        if not args.force and os.path.lexists(dest):
            raise exists  # before the transfer, not after it
        try:
            with progress_bar(info.size, info.filename, sys.stderr) as progress:
                vault.download(expected=info, dest=dest, progress=progress, overwrite=args.force)
        except FileExistsError:
            raise exists from None
    print(f"{info.id}  {info.size}  {printable(str(dest))}", file=out)


def format_usage(usage: Usage) -> str:
    """The readable usage: archives, stored bytes against the quota, uploads."""
    stored = f"{human_size(usage.stored_bytes)} ({usage.stored_bytes} bytes)"
    if usage.quota_bytes is None:
        quota = "none"
    else:
        share = 100 * usage.stored_bytes / usage.quota_bytes if usage.quota_bytes else 100.0
        quota = f"{human_size(usage.quota_bytes)} ({usage.quota_bytes} bytes), {share:.1f} % used"
    rows = [
        ("archives", str(usage.archives)),
        ("stored", stored),
        ("quota", quota),
        ("uploads in progress", str(usage.uploads_in_progress)),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _usage(args: argparse.Namespace, settings: Settings, out: TextIO) -> None:
    with _session_client(settings) as vault:
        usage = vault.usage()
    if args.json:
        json.dump(usage.to_json(), out, indent=2)
        out.write("\n")
    else:
        print(format_usage(usage), file=out)


def _delete(args: argparse.Namespace, settings: Settings, out: TextIO) -> None:
    with _session_client(settings) as vault:
        vault.delete(args.id)
    print(f"deleted {args.id}", file=out)


# -- grammar and entry point ---------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--url", default=default, help=f"the vault's URL (default: {DEFAULTS['url']})")
    parser.add_argument("--cert", default=default, help=f"client certificate, PEM (default: {DEFAULTS['cert']})")
    parser.add_argument("--key", default=default, help=f"client private key, PEM (default: {DEFAULTS['key']})")
    parser.add_argument(
        "--ca", default=default, help=f"CA certificate(s) to verify the vault (default: {DEFAULTS['ca']})"
    )


def build_parser() -> argparse.ArgumentParser:
    """The full command grammar; global options are accepted before or after
    the command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Move files in and out of a securevault over mutual TLS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"securevault {__version__}")
    _global_options(parser, None)
    after = argparse.ArgumentParser(add_help=False)
    _global_options(after, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, handler: Callable[..., None]) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            parents=[after],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    login = command("login", "log in and keep the session in a 0600 file", _login)
    login.add_argument("--username", "-u", metavar="NAME", help="user name (prompted for if absent)")
    login.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (also done when it is not a terminal)",
    )

    upload = command("upload", "upload files, one archive each", _upload)
    upload.add_argument("paths", nargs="+", metavar="PATH")
    upload.add_argument(
        "--resume",
        action="store_true",
        help="upload resumably (tus, 8 MiB pieces): run the same command again after an interruption "
        "and only what the vault has not kept is sent",
    )

    listing = command("list", "list your archives, newest first", _list)
    listing.add_argument("--json", action="store_true", help="print the list as JSON")

    download = command("download", "download an archive, verified by SHA-256", _download)
    which = download.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", metavar="ID", help="the archive's id")
    which.add_argument("--name", metavar="NAME", help="the newest archive with this filename")
    download.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="where to save it (default: the archive's filename in the current directory)",
    )
    download.add_argument("--force", action="store_true", help="replace the file if it exists (default: refuse)")

    delete = command("delete", "delete an archive", _delete)
    delete.add_argument("id", metavar="ID")

    usage = command("usage", "your archives and stored bytes, against the quota", _usage)
    usage.add_argument("--json", action="store_true", help="print the usage as JSON")

    command("logout", "end the session and remove the session file", _logout)
    return parser


def describe(error: VaultError) -> str:
    """The one-line message for a failure, with what to do next."""
    message = " ".join(printable(error.message).split())
    if error.code == "invalid_session":
        message += f" Run '{PROG} login'."
    elif isinstance(error, TooManyAttempts) and error.retry_after:
        message += f" Retry in {error.retry_after} s."
    if error.request_id:
        message += f" (request id {printable(error.request_id)})"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run one client command and return the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    try:
        environ = os.environ
        config = load_config_file(config_dir(environ) / CONFIG_FILE_NAME)
        settings = resolve_settings(vars(args), environ, config)
        args.handler(args, settings, sys.stdout)
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except VaultError as error:
        return _fail(describe(error), error.exit_code)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep the
        # interpreter from complaining while it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        return _fail(f"{error.strerror or error}{where}.", EXIT_ERROR)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
