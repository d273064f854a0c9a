# -*- test-case-name: tests.core.test_users -*-
"""User accounts: names, stable random ids and scrypt password hashes.

Plain blocking Python with no Twisted imports: scrypt is deliberately slow
and memory-hungry, so the daemon runs every call in its worker pool.  Users
live in the metadata store, which C{securevault-admin user ...} edits while
the daemons run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from securevault.core.integrity import RowAuthenticator
from securevault.stores.metadata import DuplicateUser, MetadataError, MetadataStore, UserRecord

T = TypeVar("T")

USERS_FORMAT = "securevault-users"
USERS_VERSION = 1

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
PASSWORD_MIN_CHARS = 8
PASSWORD_MAX_CHARS = 1024

DEFAULT_SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32

# Bounds on the parameters read back from the file, so that a corrupted or
# hostile hash cannot make one login allocate gigabytes.
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_R = 32
MAX_SCRYPT_P = 16

# The salt for the decoy hash computed for unknown users.  It is public and
# constant: its only job is to make an unknown user cost one real scrypt.
_DUMMY_SALT = b"securevault-dummy-salt"[:SALT_BYTES]
_DUMMY_HASH = bytes(HASH_BYTES)


class UserError(Exception):
    """A user operation was refused; the message is a sentence for people."""


class UnknownUser(UserError):
    """No user has this name."""


class UserExists(UserError):
    """A user with this name already exists."""


class InvalidUsername(UserError):
    """The name breaks the username rule."""


class InvalidPassword(UserError):
    """The password breaks the password rule."""


class UserFileError(UserError):
    """The users' records cannot be used: the base of the two cases below,
    which a server answers differently, and of a legacy users file that is
    unreadable or malformed (migration)."""


class UserStoreUnavailable(UserFileError):
    """The metadata store holding the users failed (unreachable, broken, or
    full): an outage, not a fault of the request or the data; the daemon
    answers 503 and the same request may work once the store is back."""


class MalformedPasswordHash(UserFileError):
    """A stored password hash is malformed or has unsupported parameters:
    damaged or hostile data that retrying never fixes (a server error)."""


def validate_username(name: object) -> str:
    """Return C{name} if it is 1-64 characters of C{[A-Za-z0-9._@-]}.

    The rule keeps names safe in logs, audit records and file listings.
    """
    if not isinstance(name, str) or not USERNAME_PATTERN.fullmatch(name):
        raise InvalidUsername(
            f"The username {name!r} is not allowed; use 1 to 64 letters, digits, dots, underscores, hyphens or '@'."
        )
    return name


def validate_password(password: object) -> str:
    """Return C{password} if it is a string of 8-1024 characters without NUL."""
    if not isinstance(password, str):
        raise InvalidPassword("The password must be text.")
    if not PASSWORD_MIN_CHARS <= len(password) <= PASSWORD_MAX_CHARS:
        raise InvalidPassword(f"The password must be {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_CHARS} characters long.")
    if "\0" in password:
        raise InvalidPassword("The password must not contain a NUL character.")
    return password


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    # scrypt needs about 128 * r * n bytes; leave headroom for OpenSSL's overhead.
    maxmem = 2 * 128 * r * (n + p) + 2**20
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=HASH_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = DEFAULT_SCRYPT_N) -> str:
    """A self-describing hash C{scrypt$n$r$p$salt$hash} of C{password}.

    The parameters travel with the hash so that raising the cost later does
    not invalidate existing passwords.
    """
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password.encode("utf-8"), salt, n, SCRYPT_R, SCRYPT_P)
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    try:
        scheme, n_text, r_text, p_text, salt_text, hash_text = encoded.split("$")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt = base64.b64decode(salt_text, validate=True)
        digest = base64.b64decode(hash_text, validate=True)
    except (ValueError, AttributeError, binascii.Error) as error:
        raise MalformedPasswordHash("A stored password hash is malformed.") from error
    if (
        scheme != "scrypt"
        or not (2 <= n <= MAX_SCRYPT_N and n & (n - 1) == 0)
        or not 1 <= r <= MAX_SCRYPT_R
        or not 1 <= p <= MAX_SCRYPT_P
        or not salt
        or len(digest) != HASH_BYTES
    ):
        raise MalformedPasswordHash("A stored password hash has unsupported parameters.")
    return n, r, p, salt, digest


def check_password(password: str, encoded: str) -> bool:
    """Whether C{password} matches C{encoded}, using the parameters stored in it."""
    n, r, p, salt, expected = _parse_hash(encoded)
    # A lone surrogate (JSON allows "\ud800") cannot be in a stored password;
    # encoded with surrogatepass it simply fails to match, at the same cost.
    actual = _scrypt(password.encode("utf-8", "surrogatepass"), salt, n, r, p)
    return hmac.compare_digest(actual, expected)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RowRefused(UserError):
    """The user's row fails authentication: it was changed outside
    securevault (see L{securevault.core.integrity})."""


class UserStore:
    """The users of one vault, kept in its metadata store.

    Every node and the admin command see the same users at once: there is
    no file to reload and no signal to send.  Each row carries a MAC
    (C{rows}): a row changed behind securevault's back is refused.
    """

    def __init__(self, store: MetadataStore, rows: RowAuthenticator, *, scrypt_n: int = DEFAULT_SCRYPT_N) -> None:
        if scrypt_n < 2 or scrypt_n & (scrypt_n - 1) or scrypt_n > MAX_SCRYPT_N:
            raise ValueError("scrypt_n must be a power of two between 2 and 2**20")
        self._store = store
        self._rows = rows
        self._scrypt_n = scrypt_n

    def _record(self, name: str) -> UserRecord | None:
        """The user's row, None when absent or when it fails authentication."""
        record = self._call(self._store.get_user, name)
        if record is None or not self._rows.user_ok(record):
            return None
        return record

    def _call(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return function(*args)
        except DuplicateUser:
            raise
        except MetadataError as error:
            raise UserStoreUnavailable(f"The user store cannot be used: {error}.") from error

    # -- operations ----------------------------------------------------------

    def add(self, name: str, password: str) -> str:
        """Create a user with a fresh random id; return the id.

        The id is never derived from the name, so a user removed and added
        again gets a new id and cannot reach the old user's archives.
        """
        validate_username(name)
        validate_password(password)
        encoded = hash_password(password, n=self._scrypt_n)
        user_id = os.urandom(16).hex()
        mac = self._rows.user_mac(name, user_id, encoded)
        try:
            self._call(self._store.add_user, UserRecord(name, user_id, encoded, _now(), mac))
        except DuplicateUser:
            raise UserExists(f"The user {name!r} already exists.") from None
        return user_id

    def import_user(self, name: str, user_id: str, password_hash: str, created_at: str) -> bool:
        """Add a user as it was kept elsewhere (migration); False if present."""
        _parse_hash(password_hash)
        mac = self._rows.user_mac(validate_username(name), user_id, password_hash)
        try:
            self._call(self._store.add_user, UserRecord(name, user_id, password_hash, created_at, mac))
        except DuplicateUser:
            return False
        return True

    def set_password(self, name: str, password: str) -> None:
        """Replace the user's password; their id, and so their archives, stay.

        Refused (L{RowRefused}) for a row that fails authentication: its id
        may be someone else's.  Remove the user and add them again."""
        validate_username(name)
        validate_password(password)
        stored = self._call(self._store.get_user, name)
        if stored is None:
            raise UnknownUser(f"There is no user {name!r}.")
        if not self._rows.user_ok(stored):
            raise RowRefused(
                f"The stored record of user {name!r} fails authentication: it was changed outside securevault. "
                "Nothing was changed; remove the user and add them again."
            )
        encoded = hash_password(password, n=self._scrypt_n)
        mac = self._rows.user_mac(name, stored.user_id, encoded)
        if not self._call(lambda: self._store.set_password_hash(name, encoded, user_id=stored.user_id, mac=mac)):
            raise UnknownUser(f"There is no user {name!r}.")

    def remove(self, name: str) -> None:
        """Delete the user and end their sessions on every node; their
        archives stay stored but nobody can log in to them."""
        validate_username(name)
        if not self._call(self._store.remove_user, name):
            raise UnknownUser(f"There is no user {name!r}.")

    def name_digest(self, name: str) -> str:
        """What a log records for a name that is no user's (see
        L{RowAuthenticator.name_digest})."""
        return self._rows.name_digest(name)

    def names(self) -> list[str]:
        """All user names, sorted."""
        return [record.name for record in self._call(self._store.list_users)]

    def user_ids(self) -> set[str]:
        """The ids of every current user (a removed user's id is not here).
        A row failing authentication counts too: what keeps archives from
        the orphan sweep must not be a row an attacker can break."""
        return {record.user_id for record in self._call(self._store.list_users)}

    def user_id(self, name: str) -> str | None:
        """The user's id, or None when there is no such user (or its row
        fails authentication)."""
        record = self._record(name)
        return None if record is None else record.user_id

    def verify(self, name: str, password: str) -> str | None:
        """The user's id if C{password} is theirs, else None.

        An unknown user, an invalid name and an invalid password all cost one
        scrypt too, so response times do not reveal which names exist.
        """
        # Only a valid name is looked up: a hostile one (a lone surrogate, a
        # NUL) may be more than the store can take as a query parameter.
        known = isinstance(name, str) and USERNAME_PATTERN.fullmatch(name) is not None
        # A row that fails authentication is refused like an unknown name
        # (the same answer, at the same cost), and reported by C{rows}.
        record = self._record(name) if known else None
        valid = isinstance(password, str) and PASSWORD_MIN_CHARS <= len(password) <= PASSWORD_MAX_CHARS
        if record is None or not valid:
            decoy = _scrypt(
                password.encode("utf-8", "replace") if isinstance(password, str) else b"",
                _DUMMY_SALT,
                self._scrypt_n,
                SCRYPT_R,
                SCRYPT_P,
            )
            hmac.compare_digest(decoy, _DUMMY_HASH)
            return None
        if check_password(password, record.password_hash):
            return record.user_id
        return None


def read_legacy_users(path: Path) -> dict[str, dict[str, Any]]:
    """The users of a C{users.json} written before the metadata store (for
    the one-time migration); {} when there is no file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise UserFileError(f"The users file {path} cannot be read: {error.strerror}.") from error
    try:
        document = json.loads(data)
        if document.get("format") != USERS_FORMAT or document.get("version") != USERS_VERSION:
            raise ValueError("wrong format")
        users = document["users"]
        if not isinstance(users, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("password"), str)
            for entry in users.values()
        ):
            raise ValueError("bad entries")
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise UserFileError(f"The users file {path} is malformed.") from error
    return users
