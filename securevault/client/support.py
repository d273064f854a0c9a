# -*- test-case-name: tests.client.test_client -*-
"""What the client library is made of besides L{securevault.client.VaultClient}:
its errors and exit codes, the file and session records, TLS settings, and
the verify-then-rename step that puts a download in place."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK_BYTES = 1 << 20
DEFAULT_TIMEOUT_SECONDS = 60.0

Progress = Callable[[int], object]
"""Called with the number of bytes just transferred (an increment)."""


# Exit statuses of securevault-client, one per family of failure.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_INTEGRITY = 5
EXIT_STORAGE = 6
EXIT_CONNECTION = 7
EXIT_THROTTLED = 8


class VaultError(Exception):
    """A failed call: the contract's JSON error, or a local failure.

    @ivar status: the HTTP status, or None when no response was received.
    @ivar code: the contract's error code (C{"not_found"}, ...), or a local
        code (C{"connection_failed"}, C{"not_logged_in"}, ...).
    @ivar message: a human sentence.
    """

    exit_code = EXIT_ERROR

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        request_id: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after


class ConfigurationError(VaultError):
    """The client's own settings are unusable: a certificate, key or CA file
    missing or unreadable, or a URL that is not https://."""

    exit_code = EXIT_USAGE


class AuthenticationError(VaultError):
    """Not logged in, an invalid or expired session, or wrong credentials."""

    exit_code = EXIT_AUTH


class NotFoundError(VaultError):
    """No such archive for this user."""

    exit_code = EXIT_NOT_FOUND


class IntegrityError(VaultError):
    """The server's archive failed authentication, or the bytes received do
    not have the SHA-256 the server announced."""

    exit_code = EXIT_INTEGRITY


class StorageLimitError(VaultError):
    """Too large, quota exceeded or the server's disk is full."""

    exit_code = EXIT_STORAGE


class ConnectionFailed(VaultError):
    """No usable connection: refused, unreachable, timed out, TLS failure, or
    the connection dropped mid-transfer."""

    exit_code = EXIT_CONNECTION


class TooManyAttempts(VaultError):
    """Login throttled; C{retry_after} says for how many seconds."""

    exit_code = EXIT_THROTTLED


ERROR_CLASSES: Mapping[str, type[VaultError]] = {
    "invalid_session": AuthenticationError,
    "invalid_credentials": AuthenticationError,
    "not_logged_in": AuthenticationError,
    "not_found": NotFoundError,
    "integrity_error": IntegrityError,
    "too_large": StorageLimitError,
    "insufficient_storage": StorageLimitError,
    "too_many_attempts": TooManyAttempts,
}
"""Contract error code → exception class (anything else: L{VaultError})."""

STATUS_CLASSES: Mapping[int, type[VaultError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    413: StorageLimitError,
    429: TooManyAttempts,
    507: StorageLimitError,
}
"""Fallback by HTTP status, for error bodies that are not the contract's JSON."""


def error_from_response(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> VaultError:
    """The exception for an error response, from its JSON C{error}/C{message}."""
    code, message, request_id = f"http_{status}", "", None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("error"), str):
            code = parsed["error"]
        if isinstance(parsed.get("message"), str):
            message = parsed["message"]
        if isinstance(parsed.get("request_id"), str):
            request_id = parsed["request_id"]
    if not message:
        message = f"The server answered HTTP {status}."
    retry_after = None
    lowered = {name.lower(): value for name, value in (headers or {}).items()}
    raw_retry = lowered.get("retry-after")
    if raw_retry is not None and raw_retry.strip().isdigit():
        retry_after = int(raw_retry.strip())
    cls = ERROR_CLASSES.get(code) or STATUS_CLASSES.get(status, VaultError)
    return cls(message, status=status, code=code, request_id=request_id, retry_after=retry_after)


@dataclass(frozen=True)
class FileInfo:
    """One archive as the server lists it."""

    id: str
    filename: str
    size: int
    sha256: str
    created_at: str

    @classmethod
    def from_json(cls, value: Any) -> FileInfo:
        """Build from a listing or upload answer; a malformed one is a L{VaultError}."""
        if not isinstance(value, dict):
            raise _protocol_error("an archive entry is not a JSON object")
        try:
            info = cls(
                id=value["id"],
                filename=value["filename"],
                size=value["size"],
                sha256=value["sha256"],
                created_at=value.get("created_at", ""),
            )
        except KeyError as missing:
            raise _protocol_error(f"an archive entry lacks {missing}") from None
        if not (
            isinstance(info.id, str)
            and isinstance(info.filename, str)
            and isinstance(info.size, int)
            and not isinstance(info.size, bool)
            and isinstance(info.sha256, str)
            and isinstance(info.created_at, str)
        ):
            raise _protocol_error("an archive entry has fields of the wrong type")
        return info

    def to_json(self) -> dict[str, Any]:
        """The contract's JSON shape."""
        return {
            "id": self.id,
            "filename": self.filename,
            "size": self.size,
            "sha256": self.sha256,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Usage:
    """What the caller keeps in the vault (C{GET /usage})."""

    archives: int
    stored_bytes: int
    quota_bytes: int | None
    uploads_in_progress: int

    @classmethod
    def from_json(cls, value: Any) -> Usage:
        """Build from the answer; a malformed one is a L{VaultError}."""
        if not isinstance(value, dict):
            raise _protocol_error("/usage did not answer a JSON object")

        def count(name: str, *, nullable: bool = False) -> Any:
            item = value.get(name)
            if item is None and nullable and name in value:
                return None
            if not isinstance(item, int) or isinstance(item, bool) or item < 0:
                raise _protocol_error(f"/usage has no count {name!r}")
            return item

        return cls(
            archives=count("archives"),
            stored_bytes=count("stored_bytes"),
            quota_bytes=count("quota_bytes", nullable=True),
            uploads_in_progress=count("uploads_in_progress"),
        )

    def to_json(self) -> dict[str, Any]:
        """The contract's JSON shape."""
        return {
            "archives": self.archives,
            "stored_bytes": self.stored_bytes,
            "quota_bytes": self.quota_bytes,
            "uploads_in_progress": self.uploads_in_progress,
        }


@dataclass(frozen=True)
class Session:
    """A login: the session id to send as a bearer token, and when it ends."""

    session_id: str
    expires_at: str


def _protocol_error(what: str) -> VaultError:
    return VaultError(f"Unexpected answer from the server: {what}.", code="protocol_error")


def make_tls_context(
    cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str]
) -> ssl.SSLContext:
    """A client context: verifies the server against C{ca} (hostname included),
    presents C{cert}/C{key}, TLS 1.2 at least.

    Unreadable or mismatched files are a L{VaultError} naming the file.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for label, path, option in (
        ("CA certificate", ca, "--ca"),
        ("client certificate", cert, "--cert"),
        ("client key", key, "--key"),
    ):
        if not os.path.isfile(path):
            raise ConfigurationError(
                f"The {label} {os.fspath(path)} does not exist (set it with {option}).", code="bad_configuration"
            )
    try:
        context.load_verify_locations(cafile=os.fspath(ca))
    except (ssl.SSLError, OSError) as error:
        raise ConfigurationError(
            f"Cannot load the CA certificate {os.fspath(ca)}: {_reason(error)}.", code="bad_configuration"
        ) from None
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (ssl.SSLError, OSError) as error:
        raise ConfigurationError(
            f"Cannot load the client certificate {os.fspath(cert)} with key {os.fspath(key)}: {_reason(error)}.",
            code="bad_configuration",
        ) from None
    return context


# TLS alerts a server sends when it will not take the client's certificate.
# A revoked one is refused by securevault's verify callback, which OpenSSL
# reports as an internal error.
CERTIFICATE_ALERTS = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_INTERNAL_ERROR",
    }
)
CERTIFICATE_REFUSED = "the server refused this client certificate (revoked, expired or from another CA?)"


def certificate_refused(error: BaseException) -> bool:
    """Whether a failure while opening a connection (the handshake, or the
    first read: in TLS 1.3 the server judges the client's certificate after
    the client's side of the handshake is done) is the server turning the
    client certificate away: one of its alerts for that, or the connection
    cut mid-TLS ("EOF occurred in violation of protocol").  A failure to
    verify the server's certificate is not."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return False
    if isinstance(error, ssl.SSLEOFError):
        return True
    return isinstance(error, ssl.SSLError) and error.reason in CERTIFICATE_ALERTS


def _reason(error: BaseException) -> str:
    """A short, one-line reason for a socket, TLS or HTTP failure."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"server certificate verification failed ({error.verify_message})"
    if isinstance(error, ssl.SSLError):
        reason = error.reason or error.strerror or str(error)
        return f"TLS failure ({reason})"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error) or type(error).__name__
    return " ".join(text.split())


def parse_etag(value: str | None) -> str | None:
    """The sha256 in an C{ETag: "<hex>"} header (weak prefix tolerated)."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"').lower() or None


def install_verified(
    part: Path,
    dest: Path,
    expected_sha256: str,
    *,
    actual_sha256: str | None = None,
    overwrite: bool = True,
) -> None:
    """Move the finished download C{part} to C{dest} if its SHA-256 matches.

    C{actual_sha256} is the digest computed while writing; when None the file
    is hashed here.  On a mismatch C{part} is deleted and L{IntegrityError}
    raised; C{dest} is untouched.  On a match the file is synced, renamed into
    place (refusing to replace an existing C{dest} unless C{overwrite}), and
    the directory synced, so that a crash leaves either the old state or the
    whole verified file.
    """
    try:
        if actual_sha256 is None:
            actual_sha256 = file_sha256(part)
        if not hmac.compare_digest(actual_sha256.lower().encode("ascii"), expected_sha256.lower().encode("ascii")):
            raise IntegrityError(
                f"The downloaded bytes have SHA-256 {actual_sha256}, but the server announced "
                f"{expected_sha256}; nothing was saved.",
                code="integrity_error",
            )
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(part, dest)
        else:
            _link_no_clobber(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _fsync_directory(dest.parent)


def _link_no_clobber(part: Path, dest: Path) -> None:
    """Rename C{part} to C{dest}, failing with FileExistsError if C{dest} exists."""
    try:
        os.link(part, dest)
    except FileExistsError:
        raise
    except OSError:
        # A file system without hard links: check, then rename (racy but rare).
        if os.path.lexists(dest):
            raise FileExistsError(17, "File exists", os.fspath(dest)) from None
        os.replace(part, dest)
        return
    part.unlink()


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()
