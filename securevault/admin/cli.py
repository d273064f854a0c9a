# -*- test-case-name: tests.admin.test_admin -*-
"""C{securevault-admin}: the operator's command line.

It works on the files the daemon reads (certificates, master key, users
file) and never talks to a running daemon, so it is plain blocking code.
Every failure is one line C{securevault-admin: error: <sentence>} on stderr
and exit status 1; usage errors keep argparse's exit status 2.
"""

from __future__ import annotations

import argparse
import getpass
import hmac
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from securevault import __version__
from securevault.admin.maintenance import export_archive, rotate_master_key, verify_archives
from securevault.admin.migration import migrate, migrate_users
from securevault.admin.pki import PkiError, format_serial, init_dev_pki, issue_client_cert, revoke_certificate
from securevault.admin.transfer import TransferError, copy_vault
from securevault.core.archive import ArchiveNotFound, IntegrityError, StorageError, rfc3339
from securevault.core.audit import AuditLog, verify_chain
from securevault.core.generation import SharedGeneration
from securevault.core.integrity import RowAuthenticator, audit_chain_key, integrity_key, open_rows
from securevault.core.keybinding import (
    KeyLocation,
    default_master_key,
    locate_master_key,
    open_master_key,
)
from securevault.core.keys import KeyFileError, Keyring, KeyringFile
from securevault.core.passphrase import PassphraseError, passphrase_source
from securevault.core.sessions import (
    DEFAULT_SESSION_IDLE_SECONDS,
    DEFAULT_SESSION_TTL_SECONDS,
    SESSION_HANDLE_CHARS,
    LoginThrottle,
    SessionStore,
    session_handle,
)
from securevault.core.users import (
    UnknownUser,
    UserError,
    UserExists,
    UserStore,
    validate_password,
    validate_username,
)
from securevault.storage import SecureFileStorage
from securevault.stores.backends import (
    BLOBS_ENV,
    METADATA_ENV,
    BackendError,
    Stores,
    blobs_setting,
    metadata_setting,
    open_stores,
)
from securevault.stores.blobs import BlobStoreError
from securevault.stores.metadata import MetadataError

PROG = "securevault-admin"
DEFAULT_DATA_DIR = "vault-data"
DEFAULT_CERTS_DIR = "certs"
MASTER_KEY_HELP = (
    "master key file (default: beside the data directory, in the directory named after it: "
    "vault-data -> vault-keys/master.key; <data-dir>/master.key if only that exists)"
)
# verify --repair leaves blobs younger than this: a node may be between
# writing a blob and committing its index row.
REPAIR_GRACE_SECONDS = 3600.0
DATA_DIR_MODE = 0o700


class AdminError(Exception):
    """An operational failure; the message is printed after C{error:}."""


def build_parser() -> argparse.ArgumentParser:
    """The full command grammar.

    Commands are subparsers so that C{key rotate}, C{verify}, C{export} and
    C{audit verify} can be added later without changing the existing ones.
    """
    parser = argparse.ArgumentParser(prog=PROG, description="Administer a securevault.")
    parser.add_argument("--version", action="version", version=f"securevault {__version__}")
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"the vault's data directory (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--metadata",
        help=f"metadata store: sqlite (default), sqlite:///PATH or postgresql://... (default: ${METADATA_ENV})",
    )
    parser.add_argument(
        "--blobs",
        help=f"blob store: file:///DIR or s3://BUCKET/PREFIX (default: ${BLOBS_ENV}, else <data-dir>/archives)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = commands.add_parser("init", help="create a development PKI and the master key, each only if absent")
    init.add_argument(
        "--certs-dir",
        default=DEFAULT_CERTS_DIR,
        help=f"where certificates go (default: {DEFAULT_CERTS_DIR})",
    )
    init.add_argument(
        "--sealed",
        action="store_true",
        help="protect the new master key with a passphrase (asked twice, or --passphrase-stdin)",
    )
    init.add_argument("--passphrase-stdin", action="store_true", help="read the passphrase from standard input")
    init.add_argument("--master-key", help=MASTER_KEY_HELP)
    init.set_defaults(handler=_init)

    cert = commands.add_parser("cert", help="issue certificates from the development CA")
    cert_commands = cert.add_subparsers(dest="cert_command", metavar="KIND", required=True)
    client = cert_commands.add_parser("client", help="issue another client certificate")
    client.add_argument("name", metavar="NAME", help="certificate name (files NAME.crt, NAME.key)")
    client.add_argument(
        "--certs-dir",
        default=DEFAULT_CERTS_DIR,
        help=f"directory holding ca.crt and ca.key (default: {DEFAULT_CERTS_DIR})",
    )
    client.set_defaults(handler=_cert_client)
    revoke = cert_commands.add_parser("revoke", help="add a certificate to the development CA's CRL (ca.crl)")
    revoke.add_argument(
        "certificate", metavar="NAME|SERIAL", help="certificate name (NAME.crt) or its serial number in hex"
    )
    revoke.add_argument(
        "--certs-dir",
        default=DEFAULT_CERTS_DIR,
        help=f"directory holding ca.crt, ca.key and ca.crl (default: {DEFAULT_CERTS_DIR})",
    )
    revoke.set_defaults(handler=_cert_revoke)

    user = commands.add_parser("user", help="manage user accounts")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    for action, handler, summary in (
        ("add", _user_add, "create a user"),
        ("passwd", _user_passwd, "change a user's password"),
    ):
        sub = user_commands.add_parser(action, help=summary)
        sub.add_argument("name", metavar="NAME")
        sub.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input",
        )
        sub.set_defaults(handler=handler)
        _key_options(sub, "; the passphrase's line comes before the password's")
    remove = user_commands.add_parser("remove", help="delete a user")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=_user_remove)
    _key_options(remove)
    listing = user_commands.add_parser("list", help="list users with their archives and stored bytes")
    listing.set_defaults(handler=_user_list)
    _key_options(listing)
    unlock = user_commands.add_parser(
        "unlock", help="forget a user's failed logins, from every certificate (lifts the login throttle)"
    )
    unlock.add_argument("name", metavar="NAME")
    unlock.add_argument("--audit-log", help="audit log (default: <data-dir>/audit.jsonl)")
    unlock.set_defaults(handler=_user_unlock)
    _key_options(unlock)

    session = commands.add_parser("session", help="list and end sessions (on every node, at once)")
    session_commands = session.add_subparsers(dest="session_command", metavar="ACTION", required=True)
    session_list = session_commands.add_parser("list", help="live sessions, newest first")
    session_list.add_argument("--user", metavar="NAME", help="only this user's sessions")
    session_list.set_defaults(handler=_session_list)
    _key_options(session_list)
    revoke = session_commands.add_parser("revoke", help="end a session (ID from 'session list') or all of a user's")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("id", metavar="ID-PREFIX", nargs="?", help="a session's ID as 'session list' shows it")
    target.add_argument("--user", metavar="NAME", help="end every session of this user")
    revoke.set_defaults(handler=_session_revoke)
    _key_options(revoke)

    key = commands.add_parser("key", help="manage the master key")
    key_commands = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    rotate = key_commands.add_parser(
        "rotate", help="new master key, every data key rewrapped, old key retired (safe to rerun)"
    )
    rotate.add_argument("--master-key", help=MASTER_KEY_HELP)
    rotate.add_argument(
        "--passphrase-stdin", action="store_true", help="a sealed master key's passphrase from standard input"
    )
    rotate.add_argument("--audit-log", help="audit log (default: <data-dir>/audit.jsonl)")
    rotate.set_defaults(handler=_key_rotate)

    verify = commands.add_parser("verify", help="authenticate every archive; exit 1 if any fails")
    verify.add_argument("--user", help="only this user's archives")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="remove blobs that no archive names (debris of a crash between a blob and its index row)",
    )
    verify.add_argument(
        "--grace",
        type=float,
        default=REPAIR_GRACE_SECONDS,
        metavar="SECONDS",
        help=f"with --repair, only blobs older than this; a running node may be mid-upload (default: {REPAIR_GRACE_SECONDS:.0f})",
    )
    verify.add_argument("--master-key", help=MASTER_KEY_HELP)
    verify.add_argument(
        "--passphrase-stdin", action="store_true", help="a sealed master key's passphrase from standard input"
    )
    verify.set_defaults(handler=_verify)

    archive = commands.add_parser("archive", help="the archives (their names need the master key)")
    archive_commands = archive.add_subparsers(dest="archive_command", metavar="ACTION", required=True)
    archive_list = archive_commands.add_parser(
        "list", help="every archive: id, owner, size, bytes stored, date and name, newest first per user"
    )
    archive_list.add_argument("--user", metavar="NAME", help="only this user's archives")
    archive_list.add_argument("--master-key", help="master key file (default: <data-dir>/master.key)")
    archive_list.add_argument(
        "--passphrase-stdin", action="store_true", help="a sealed master key's passphrase from standard input"
    )
    archive_list.set_defaults(handler=_archive_list)

    export = commands.add_parser("export", help="write an archive's decrypted standard ZIP")
    export.add_argument("id", help="archive id")
    export.add_argument("--out", required=True, help="the ZIP file to write (must not exist)")
    export.add_argument("--master-key", help=MASTER_KEY_HELP)
    export.add_argument(
        "--passphrase-stdin", action="store_true", help="a sealed master key's passphrase from standard input"
    )
    export.set_defaults(handler=_export)

    copy = commands.add_parser(
        "copy",
        help="copy every user and archive into other stores (e.g. from one machine to PostgreSQL and S3); "
        "safe to rerun",
    )
    copy.add_argument("--to-metadata", metavar="URL", help="target metadata store (default: the same as the source)")
    copy.add_argument("--to-blobs", metavar="URL", help="target blob store (default: the same as the source)")
    copy.set_defaults(handler=_copy)
    _key_options(copy)

    audit = commands.add_parser("audit", help="the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    audit_verify = audit_commands.add_parser(
        "verify", help="check the keyed chain and the log's end against the metadata store; exit 1 when broken"
    )
    audit_verify.add_argument("--audit-log", help="audit log (default: <data-dir>/audit.jsonl)")
    audit_verify.set_defaults(handler=_audit_verify)
    _key_options(audit_verify)
    return parser


def _key_options(parser: argparse.ArgumentParser, stdin_note: str = "") -> None:
    """--master-key and --passphrase-stdin: the command needs the master key
    (user and session rows are authenticated under it)."""
    parser.add_argument("--master-key", help=MASTER_KEY_HELP)
    parser.add_argument(
        "--passphrase-stdin",
        action="store_true",
        help=f"a sealed master key's passphrase from standard input{stdin_note}",
    )


def read_new_password(
    name: str,
    *,
    from_stdin: bool,
    stdin: TextIO,
    prompt: Callable[[str], str] = getpass.getpass,
) -> str:
    """Read a new password for C{name}: one stdin line, or prompted twice.

    Only the line ending is stripped from stdin, so passwords may begin or end
    with spaces.  The terminal path asks twice because a typo there would
    lock the user out.
    """
    if from_stdin:
        line = stdin.readline()
        if not line:
            raise AdminError("No password was given on standard input.")
        if line.endswith("\n"):
            line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
        return line
    try:
        first = prompt(f"New password for {name}: ")
        second = prompt("Repeat the password: ")
    except EOFError as error:
        raise AdminError("No password was entered.") from error
    if not hmac.compare_digest(first.encode("utf-8"), second.encode("utf-8")):
        raise AdminError("The two passwords do not match; nothing was changed.")
    return first


def _existing_data_dir(args: argparse.Namespace) -> Path:
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise AdminError(f"The data directory {data_dir} does not exist; run '{PROG} init' first or pass --data-dir.")
    return data_dir


def _stores(args: argparse.Namespace) -> Stores:
    """The vault's stores, opened once per command (closed by L{main})."""
    stores: Stores | None = getattr(args, "opened_stores", None)
    if stores is None:
        stores = open_stores(_existing_data_dir(args), metadata_setting(args.metadata), blobs_setting(args.blobs))
        args.opened_stores = stores
    return stores


def _rows(args: argparse.Namespace) -> RowAuthenticator:
    """The vault's row authenticator (the master key is checked first);
    a vault from before row MACs has its rows authenticated now, once."""
    rows: RowAuthenticator | None = getattr(args, "opened_rows", None)
    if rows is None:
        rows, authenticated = open_rows(_keyring(args), _stores(args).metadata)
        if authenticated is not None and any(authenticated):
            print(
                f"{PROG}: authenticated {authenticated[0]} user rows of this vault from before row MACs "
                f"and ended its {authenticated[1]} sessions",
                file=sys.stderr,
            )
        args.opened_rows = rows
    return rows


def _user_store(args: argparse.Namespace) -> UserStore:
    users = UserStore(_stores(args).metadata, _rows(args))
    migrate_users(_existing_data_dir(args), users)  # a vault from before the stores
    return users


def _init(args: argparse.Namespace, out: TextIO) -> None:
    data_dir, certs_dir = Path(args.data_dir), Path(args.certs_dir)
    if not data_dir.exists():
        data_dir.mkdir(parents=True, mode=DATA_DIR_MODE)
        os.chmod(data_dir, DATA_DIR_MODE)  # mkdir's mode is filtered by the umask
        print(f"created directory {data_dir}", file=out)
    created = init_dev_pki(certs_dir)
    location = _key_location(args)
    master_key = location.path
    if not master_key.exists():

        def new_passphrase() -> str | None:
            if not args.sealed:
                return None
            passphrase = read_new_password("the master key", from_stdin=args.passphrase_stdin, stdin=sys.stdin)
            if len(passphrase) < 8:
                raise AdminError("The passphrase must be at least 8 characters long.")
            return passphrase

        # Only for a vault that holds nothing yet; its key check is stored too.
        open_master_key(
            KeyringFile(master_key), _stores(args).metadata, data_dir, create=True, passphrase=new_passphrase
        )
        created.append(master_key)
    elif args.sealed:
        print(f"{master_key} exists and was left as it is (not sealed by this run)", file=out)
    for path in created:
        print(f"created {path}", file=out)
    expected = [certs_dir / f"{stem}.{ext}" for stem in ("ca", "server", "client") for ext in ("crt", "key")]
    expected.append(certs_dir / "ca.crl")
    expected.append(master_key)
    kept = [path for path in expected if path not in created and path.exists()]
    if kept:
        print(f"already present, left unchanged: {', '.join(str(p) for p in kept)}", file=out)
    print(
        f"The master key is {master_key}. Back it up, apart from the data directory {data_dir}: "
        "without it no archive can be read, and with it a copy of the data can.",
        file=out,
    )
    warning = location.warning(data_dir)
    if warning is not None:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)

    admin = PROG if args.data_dir == DEFAULT_DATA_DIR else f"{PROG} --data-dir {data_dir}"
    daemon = "twistd -n securevault"
    if args.data_dir != DEFAULT_DATA_DIR:
        daemon += f" --data-dir {data_dir}"
    if location.given:
        daemon += f" --master-key {master_key}"
    if args.certs_dir != DEFAULT_CERTS_DIR:
        daemon += (
            f" --cert {certs_dir / 'server.crt'} --key {certs_dir / 'server.key'} --ca-cert {certs_dir / 'ca.crt'}"
        )
    print("Next steps:", file=out)
    print(f"  {admin} user add NAME", file=out)
    print(f"  {daemon}", file=out)


def _cert_client(args: argparse.Namespace, out: TextIO) -> None:
    cert_path, key_path = issue_client_cert(Path(args.certs_dir), args.name)
    print(f"created {cert_path}", file=out)
    print(f"created {key_path}", file=out)


def _cert_revoke(args: argparse.Namespace, out: TextIO) -> None:
    result = revoke_certificate(Path(args.certs_dir), args.certificate)
    serial = format_serial(result.serial)
    if result.already_revoked:
        print(f"serial {serial} was already revoked in {result.crl_path}; nothing changed", file=out)
        return
    named = f" ({result.certificate})" if result.certificate is not None else ""
    print(f"revoked serial {serial}{named} in {result.crl_path}", file=out)
    print("a running daemon using this CRL refuses it within seconds (at once on SIGHUP)", file=out)


def _user_add(args: argparse.Namespace, out: TextIO) -> None:
    store = _user_store(args)
    # Check what can be checked before asking for a password nobody will use.
    name = validate_username(args.name)
    if store.user_id(name) is not None:
        raise UserExists(f"The user {name!r} already exists.")
    password = validate_password(read_new_password(name, from_stdin=args.password_stdin, stdin=sys.stdin))
    store.add(name, password)
    print(f"added user {name}", file=out)


def _user_passwd(args: argparse.Namespace, out: TextIO) -> None:
    store = _user_store(args)
    name = validate_username(args.name)
    if store.user_id(name) is None:
        raise UnknownUser(f"There is no user {name!r}.")
    password = validate_password(read_new_password(name, from_stdin=args.password_stdin, stdin=sys.stdin))
    store.set_password(name, password)
    _sessions_changed(args)
    print(f"changed the password of user {name}; their sessions have ended", file=out)


def _user_remove(args: argparse.Namespace, out: TextIO) -> None:
    store = _user_store(args)
    store.remove(args.name)
    _sessions_changed(args)
    print(f"removed user {args.name}; their sessions have ended", file=out)


def _user_unlock(args: argparse.Namespace, out: TextIO) -> None:
    """Clear the throttle's count for a username on every node at once (the
    count lives in the metadata store); its certificates' totals drop too."""
    store = _user_store(args)
    name = validate_username(args.name)
    if store.user_id(name) is None:
        raise UnknownUser(f"There is no user {name!r}.")
    cleared = LoginThrottle(_stores(args).metadata, time.time).unlock(name)
    _audit_log(args).append("user_unlocked", user=name, cleared=cleared)
    print(f"unlocked user {name} ({cleared} failed logins forgotten)", file=out)


def printable(text: str) -> str:
    """C{text} with control, format (bidi overrides) and line-separator
    characters escaped: a filename chosen by a user must not move the
    operator's cursor, reorder a line or forge one."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch
        for ch in text
    )


def _table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """Rows as aligned columns (those in C{right} aligned right); the last
    column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


def _user_list(args: argparse.Namespace, out: TextIO) -> None:
    """Names with what each stores: the archive index holds each archive's
    stored size in the clear (the key is needed only to trust the user rows)."""
    store = _user_store(args)
    metadata = _stores(args).metadata
    rows = [("NAME", "ARCHIVES", "STORED", "QUOTA")]
    for name in store.names():
        user_id = store.user_id(name)
        if user_id is None:
            continue  # removed meanwhile
        count = len(metadata.list_archives(user_id))
        rows.append((name, str(count), str(metadata.usage(user_id)), "-"))
    for line in _table(rows, right=(1, 2)):
        print(line, file=out)
    print(
        f"{len(rows) - 1} users; STORED is bytes in the blob store, what --quota limits; "
        "QUOTA is the daemon's --quota, which securevault-admin does not know ('-')",
        file=out,
    )


def _archive_list(args: argparse.Namespace, out: TextIO) -> None:
    """Every archive with its name: unsealing the names takes the master
    key.  Archives of removed users are listed under their owner id; one
    whose metadata fails authentication is listed, and flagged."""
    storage = _storage(args)
    store = _user_store(args)
    names = {}
    for name in store.names():
        user_id = store.user_id(name)
        if user_id is not None:
            names[user_id] = name
    if args.user:
        user_id = store.user_id(validate_username(args.user))
        if user_id is None:
            raise UnknownUser(f"There is no user {args.user!r}.")
        owners = [user_id]
    else:
        owners = sorted(storage.owners(), key=lambda owner: (owner not in names, names.get(owner, owner)))
    rows = [("ID", "OWNER", "SIZE", "STORED", "CREATED", "NAME")]
    stored = 0
    unreadable = 0
    for owner_id in owners:
        owner = names.get(owner_id, f"(removed user {owner_id})")
        for record in storage.metadata.list_archives(owner_id):
            stored += record.stored_bytes
            try:
                info = storage.unseal(record)[0]
            except IntegrityError:
                unreadable += 1
                rows.append(
                    (
                        record.archive_id,
                        owner,
                        "-",
                        str(record.stored_bytes),
                        rfc3339(record.created_ns / 1e9),
                        "(metadata fails authentication: run verify)",
                    )
                )
                continue
            rows.append(
                (info.id, owner, str(info.size), str(record.stored_bytes), info.created_at, printable(info.filename))
            )
    for line in _table(rows, right=(2, 3)):
        print(line, file=out)
    summary = f"{len(rows) - 1} archives, {stored} bytes stored"
    if unreadable:
        summary += f"; {unreadable} whose metadata fails authentication"
    print(summary, file=out)


def _session_store(args: argparse.Namespace) -> SessionStore:
    # The daemon's --session-idle is not known here: the default applies to
    # what is listed as live; the daemon's sweep removes the rest.
    return SessionStore(
        _stores(args).metadata,
        time.time,
        rows=_rows(args),
        idle_seconds=DEFAULT_SESSION_IDLE_SECONDS,
        ttl_seconds=DEFAULT_SESSION_TTL_SECONDS,
        generation=SharedGeneration.in_data_dir(Path(args.data_dir), create=False),
    )


def _sessions_changed(args: argparse.Namespace) -> None:
    """Sessions ended in the store: the workers of a running daemon
    (C{--workers N}) drop their copies at their next request.  Nothing to
    do when no daemon of workers ever ran here."""
    generation = SharedGeneration.in_data_dir(Path(args.data_dir), create=False)
    if generation is not None:
        generation.bump()
        generation.close()


def _user_id_of(args: argparse.Namespace, name: str) -> str:
    user_id = _user_store(args).user_id(validate_username(name))
    if user_id is None:
        raise UnknownUser(f"There is no user {name!r}.")
    return user_id


def _session_list(args: argparse.Namespace, out: TextIO) -> None:
    user_id = _user_id_of(args, args.user) if args.user else None
    records = _session_store(args).listing(user_id)
    print(
        f"{'ID':<{SESSION_HANDLE_CHARS}}  {'USER':<20} {'CERTIFICATE':<16}  {'CREATED':<20}  {'LAST USED':<20}  EXPIRES",
        file=out,
    )
    for record in records:
        print(
            f"{session_handle(record)}  {record.username:<20} {record.fingerprint[:16]}  "
            f"{rfc3339(record.created_at):<20}  {rfc3339(record.last_used):<20}  {rfc3339(record.expires_at)}",
            file=out,
        )
    print(f"{len(records)} sessions", file=out)


def _session_revoke(args: argparse.Namespace, out: TextIO) -> None:
    sessions = _session_store(args)
    if args.user:
        count = sessions.revoke(user_id=_user_id_of(args, args.user))
        print(f"ended {count} sessions of user {args.user}", file=out)
        return
    prefix = args.id.strip().lower()
    if len(prefix) < 8 or not all(c in "0123456789abcdef" for c in prefix):
        raise AdminError("Give at least 8 hex digits of a session ID, as 'session list' shows it.")
    matching = [r for r in sessions.listing() if r.digest.startswith(prefix)]
    if len(matching) > 1:
        raise AdminError(f"{len(matching)} sessions start with {prefix}: give more of the ID.")
    count = sessions.revoke(digest_prefix=prefix)
    if count == 0:
        raise AdminError(f"No session starts with {prefix}.")
    print(f"ended session {prefix}", file=out)


class CheckFailed(Exception):
    """A check found problems; they were printed; exit status 1."""


def _key_location(args: argparse.Namespace) -> KeyLocation:
    return locate_master_key(Path(args.data_dir), args.master_key)


def _audit_path(args: argparse.Namespace) -> Path:
    return Path(args.audit_log) if args.audit_log else Path(args.data_dir) / "audit.jsonl"


def _audit_key(args: argparse.Namespace) -> bytes:
    """The audit chain's key: from the vault's integrity key, so the master
    key is needed (and checked against the vault) first."""
    return audit_chain_key(integrity_key(_keyring(args), _stores(args).metadata))


def _audit_log(args: argparse.Namespace) -> AuditLog:
    """The audit log, its head kept in the metadata store as the daemon's."""
    return AuditLog(_audit_path(args), _audit_key(args), _stores(args).metadata)


def _key_file(args: argparse.Namespace) -> KeyringFile:
    """The master key file, one per command: a sealed one asks for its
    passphrase once, however often it is loaded."""
    key_file: KeyringFile | None = getattr(args, "opened_key_file", None)
    if key_file is not None:
        return key_file
    if args.passphrase_stdin:
        source = passphrase_source("stdin")
    elif sys.stdin.isatty():
        source = passphrase_source("prompt")
    else:
        # getpass would fall back to /dev/tty and wait there: a script gets
        # a clear error instead.
        def source() -> str:
            raise AdminError("The master key is sealed; give its passphrase with --passphrase-stdin.")

    location = _key_location(args)
    _existing_data_dir(args)
    warning = location.warning(Path(args.data_dir))
    if warning is not None:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    key_file = args.opened_key_file = KeyringFile(location.path, source)
    return key_file


def _keyring(args: argparse.Namespace) -> Keyring:
    """The vault's keyring, refused unless the key file opens this vault
    (see L{securevault.core.keybinding}); an admin command never creates it."""
    opened: Keyring | None = getattr(args, "opened_keyring", None)
    if opened is not None:
        return opened
    data_dir = _existing_data_dir(args)
    key_file = _key_file(args)
    init = PROG if args.data_dir == DEFAULT_DATA_DIR else f"{PROG} --data-dir {data_dir}"
    init += " init"
    if key_file.path != default_master_key(data_dir):
        init += f" --master-key {key_file.path}"
    how_to_create = f"; this vault holds no users or archives yet: create its key with '{init}'"
    keyring = open_master_key(
        key_file, _stores(args).metadata, data_dir, create=False, how_to_create=how_to_create
    ).keyring
    args.opened_keyring = keyring
    return keyring


def _storage(args: argparse.Namespace, keyring: Keyring | None = None) -> SecureFileStorage:
    storage = _stores(args).storage(keyring or _keyring(args))
    migrate(_existing_data_dir(args), _user_store(args), storage)
    return storage


def _progress(message: str) -> None:
    print(message, file=sys.stderr)


def _key_rotate(args: argparse.Namespace, out: TextIO) -> None:
    _keyring(args)  # a missing or foreign key file is refused before anything changes
    audit = _audit_log(args)  # its key survives the rotation; taken while the old key opens it
    report = rotate_master_key(lambda keyring: _storage(args, keyring), _key_file(args), _progress)
    audit.append("key_rotated", new_key_id=report.new_key_id, retired_key_ids=list(report.retired_key_ids))
    print(
        f"master key rotated to {report.new_key_id}: {report.rewrapped} of {report.archives} "
        f"data keys rewrapped, retired {', '.join(report.retired_key_ids) or 'nothing'}",
        file=out,
    )


def _verify(args: argparse.Namespace, out: TextIO) -> None:
    storage = _storage(args)
    names = {}
    store = _user_store(args)
    for name in store.names():
        user_id = store.user_id(name)
        if user_id is not None:
            names[user_id] = name
    owners = None
    if args.user:
        user_id = store.user_id(args.user)
        if user_id is None:
            raise UnknownUser(f"There is no user {args.user!r}.")
        owners = [user_id]
    checked, failures = verify_archives(storage, owners, _progress)
    for failure in failures:
        owner = names.get(failure.owner_id, f"(removed user {failure.owner_id})")
        print(f"FAILED {failure.archive_id} of {owner}: {failure.reason}", file=out)
    print(f"{checked} archives verified, {len(failures)} failed", file=out)
    if not args.user:
        orphans = storage.orphans(args.grace)
        for owner_id, archive_id in orphans:
            if args.repair:
                storage.blobs.delete(owner_id, archive_id)
            action = "removed" if args.repair else "found"
            print(
                f"ORPHAN {archive_id} of {names.get(owner_id, owner_id)}: blob without an index row, {action}", file=out
            )
        if orphans and not args.repair:
            print(f"{len(orphans)} orphaned blobs; remove them with --repair", file=out)
        elif orphans:
            print(f"{len(orphans)} orphaned blobs removed", file=out)
    if failures:
        raise CheckFailed()


def _export(args: argparse.Namespace, out: TextIO) -> None:
    target = Path(args.out)
    if target.exists():
        raise AdminError(f"{target} already exists; choose another --out.")
    try:
        size = export_archive(_storage(args), args.id, target)
    except ArchiveNotFound:
        raise AdminError(f"There is no archive {args.id!r}.") from None
    except IntegrityError as error:
        raise AdminError(f"Archive {args.id} fails authentication ({error}); nothing was written.") from None
    print(f"wrote {target} ({size} bytes)", file=out)


def _copy(args: argparse.Namespace, out: TextIO) -> None:
    if not args.to_metadata and not args.to_blobs:
        raise AdminError("Give --to-metadata, --to-blobs or both.")
    source = _stores(args)
    _user_store(args)  # a first-release vault moves into its own store first
    legacy = list((_existing_data_dir(args) / "archives").glob("*/*.meta"))
    if legacy:
        raise AdminError("This vault still has archives in .meta files: start the daemon on it once first.")
    target = open_stores(
        _existing_data_dir(args),
        args.to_metadata or metadata_setting(args.metadata),
        args.to_blobs or blobs_setting(args.blobs),
    )
    try:
        report = copy_vault(source, target, _progress)
    finally:
        target.close()
    print(
        f"copied {report.users} users ({report.users_present} already there) and {report.archives} archives, "
        f"{report.bytes} bytes ({report.archives_present} already there) to {target.describe()}",
        file=out,
    )
    for archive_id in report.missing_bodies:
        print(f"NOT COPIED {archive_id}: its body is missing in the source (see verify)", file=out)
    if report.missing_bodies:
        raise CheckFailed()


def _audit_verify(args: argparse.Namespace, out: TextIO) -> None:
    path = _audit_path(args)
    count, breaks = verify_chain(path, _audit_key(args), _stores(args).metadata)
    if not path.exists() and not breaks:
        raise AdminError(f"There is no audit log at {path}.")
    for item in breaks:
        where = f" at line {item.line}" if item.line else ""
        print(f"BROKEN{where}: {item.reason}", file=out)
    print(f"{count} audit records checked, {len(breaks)} breaks", file=out)
    if breaks:
        raise CheckFailed()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one admin command and return the process exit status.

    Returns rather than exits (except for argparse's own usage errors and
    C{--help}, whose status is returned too) so tests can call it directly.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    try:
        args.handler(args, sys.stdout)
    except CheckFailed:
        return 1
    except (
        AdminError,
        PkiError,
        UserError,
        KeyFileError,
        PassphraseError,
        BackendError,
        StorageError,
        TransferError,
        MetadataError,
        BlobStoreError,
    ) as error:
        return _fail(str(error))
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        return _fail(f"{error.strerror or error}{where}.")
    except EOFError:
        return _fail("No passphrase could be read (no terminal); give it with --passphrase-stdin.")
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        stores = getattr(args, "opened_stores", None)
        if stores is not None:
            stores.close()
    return 0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
