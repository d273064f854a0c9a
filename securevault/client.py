# -*- test-case-name: tests.test_client -*-
"""A small synchronous client for a securevault, on the standard library only.

It speaks the HTTP contract of C{shared/API.md} over mutual TLS, on one
persistent HTTPS connection reused across calls (reopened when the server has
closed it).  Uploads and downloads use the raw streaming forms, so memory
stays flat whatever the file size; a download is written to a temporary file
next to its destination and renamed into place only once its SHA-256 matches
what the server announced.

Example::

    from pathlib import Path
    from securevault.client import VaultClient, VaultError

    with VaultClient("https://localhost:5000", cert="certs/client.crt",
                     key="certs/client.key", ca="certs/ca.crt") as vault:
        session = vault.login("alice", "correct horse battery")
        info = vault.upload(Path("report.pdf"))
        for item in vault.list():
            print(item.id, item.size, item.filename)
        vault.download(info.id, dest=Path("copy-of-report.pdf"))
        vault.delete(info.id)
        vault.logout()

A later process can resume a session with C{VaultClient(..., session_id=...)}.
Every failure is a L{VaultError} carrying C{status} (HTTP status, or None when
no response came), C{code} (the contract's error code, or a local one such as
C{"connection_failed"}) and C{message}; its subclasses group the failures a
caller usually treats alike, and C{exit_code} is what C{securevault-client}
exits with for each.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import http.client
import io
import json
import os
import select
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping
from urllib.parse import quote, urlencode, urlsplit

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
class Session:
    """A login: the session id to send as a bearer token, and when it ends."""

    session_id: str
    expires_at: str


def _protocol_error(what: str) -> VaultError:
    return VaultError(f"Unexpected answer from the server: {what}.", code="protocol_error")


def make_tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str],
                     ca: str | os.PathLike[str]) -> ssl.SSLContext:
    """A client context: verifies the server against C{ca} (hostname included),
    presents C{cert}/C{key}, TLS 1.2 at least.

    Unreadable or mismatched files are a L{VaultError} naming the file.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for label, path in (("CA certificate", ca), ("client certificate", cert), ("client key", key)):
        if not os.path.isfile(path):
            raise VaultError(f"The {label} {os.fspath(path)} does not exist.", code="bad_configuration")
    try:
        context.load_verify_locations(cafile=os.fspath(ca))
    except (ssl.SSLError, OSError) as error:
        raise VaultError(f"Cannot load the CA certificate {os.fspath(ca)}: {_reason(error)}.",
                         code="bad_configuration") from None
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (ssl.SSLError, OSError) as error:
        raise VaultError(
            f"Cannot load the client certificate {os.fspath(cert)} with key {os.fspath(key)}: "
            f"{_reason(error)}.",
            code="bad_configuration",
        ) from None
    return context


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
        if not hmac.compare_digest(actual_sha256.lower().encode("ascii"),
                                   expected_sha256.lower().encode("ascii")):
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


class VaultClient:
    """A securevault session over one persistent mutual-TLS connection.

    Not thread-safe: use one client per thread.
    """

    def __init__(
        self,
        url: str,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str],
        session_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise VaultError(f"The URL {url!r} is not an https:// URL with a host.", code="bad_configuration")
        if parts.query or parts.fragment:
            raise VaultError(f"The URL {url!r} must not have a query or fragment.", code="bad_configuration")
        try:
            port = parts.port or 443
        except ValueError:
            raise VaultError(f"The URL {url!r} has an invalid port.", code="bad_configuration") from None
        self.url = url
        self.session_id = session_id
        self._prefix = parts.path.rstrip("/")
        self._context = make_tls_context(cert, key, ca)
        self._connection = http.client.HTTPSConnection(
            parts.hostname, port, context=self._context, timeout=timeout
        )

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Close the connection (the session stays valid on the server)."""
        self._connection.close()

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- endpoints ---------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """C{GET /health}: C{{"status": "ok", "version": ...}}; no session needed."""
        body = self._call_json("GET", "/health", auth=False)
        if not isinstance(body, dict):
            raise _protocol_error("/health did not answer a JSON object")
        return body

    def login(self, username: str, password: str) -> Session:
        """Log in; the client keeps the new session id for later calls."""
        body = self._call_json("POST", "/login", {"username": username, "password": password}, auth=False)
        if not (isinstance(body, dict) and isinstance(body.get("session_id"), str)):
            raise _protocol_error("/login did not answer a session id")
        session = Session(body["session_id"], str(body.get("expires_at", "")))
        self.session_id = session.session_id
        return session

    def logout(self) -> None:
        """End the session on the server and forget it here."""
        self._call_json("POST", "/logout", expect=(204,))
        self.session_id = None

    def list(self) -> builtins.list[FileInfo]:
        """The caller's archives, newest first."""
        body = self._call_json("GET", "/get-files")
        if not (isinstance(body, dict) and isinstance(body.get("files"), builtins.list)):
            raise _protocol_error("/get-files did not answer a file list")
        return [FileInfo.from_json(item) for item in body["files"]]

    def delete(self, archive_id: str) -> None:
        """Delete one archive (L{NotFoundError} when there is no such archive)."""
        self._call_json("POST", "/delete-file", {"id": archive_id}, expect=(204,))

    def upload(self, path: str | os.PathLike[str], filename: str | None = None,
               progress: Progress | None = None) -> FileInfo:
        """Stream the file at C{path} as one archive named C{filename}
        (default: the file's own name); C{progress(n)} is called per block sent.

        The server's SHA-256 of what it stored is checked against the bytes
        sent: a mismatch is an L{IntegrityError}.
        """
        path = Path(path)
        name = path.name if filename is None else filename
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            return self._upload_stream(name, stream, size, progress)

    def upload_bytes(self, name: str, data: bytes, progress: Progress | None = None) -> FileInfo:
        """Upload C{data} as one archive named C{name}."""
        return self._upload_stream(name, io.BytesIO(data), len(data), progress)

    def stat(self, archive_id: str | None = None, name: str | None = None) -> FileInfo:
        """The listing entry for an id, or the newest archive named C{name}."""
        if (archive_id is None) == (name is None):
            raise ValueError("Give exactly one of archive_id and name.")
        for info in self.list():  # newest first
            if info.id == archive_id or (archive_id is None and info.filename == name):
                return info
        what = f"id {archive_id}" if archive_id is not None else f"name {name!r}"
        raise NotFoundError(f"There is no archive with {what}.", status=404, code="not_found")

    def download(
        self,
        archive_id: str | None = None,
        name: str | None = None,
        *,
        dest: Path,
        progress: Progress | None = None,
        expected: FileInfo | None = None,
        overwrite: bool = True,
    ) -> FileInfo:
        """Download one archive's original bytes into C{dest}, verified.

        The archive is named by C{archive_id}, by C{name} (the newest with that
        filename), or by C{expected}, a listing entry already at hand.  The
        bytes stream into a temporary file next to C{dest} while their SHA-256
        is computed; they are renamed into place only if it matches both the
        response's C{ETag} and the listing, otherwise the temporary file is
        deleted and L{IntegrityError} raised.  With C{overwrite=False} an
        existing C{dest} is never replaced (C{FileExistsError}).  The file is
        created with mode 0600, as befits the contents of a vault.
        """
        info = expected if expected is not None else self.stat(archive_id, name)
        dest = Path(dest)
        response = self._send(
            "GET",
            "/download-file?" + urlencode({"id": info.id}),
            headers={"Accept": "application/octet-stream"},
        )
        etag = parse_etag(response.getheader("ETag"))
        if etag is not None and etag != info.sha256.lower():
            self._discard(response)
            raise IntegrityError(
                f"The server announced SHA-256 {etag} for archive {info.id}, but listed {info.sha256}.",
                code="integrity_error",
            )
        length_header = response.getheader("Content-Length")
        expected_size = info.size
        if length_header is not None and length_header.strip() != str(info.size):
            self._discard(response)
            raise _protocol_error(
                f"the download of {info.id} is {length_header} bytes, but the listing says {info.size}"
            )
        fd, part_name = tempfile.mkstemp(dir=dest.parent or ".", prefix=f".{dest.name}.", suffix=".part")
        part = Path(part_name)
        try:
            digest = hashlib.sha256()
            received = 0
            with os.fdopen(fd, "wb") as out:
                while True:
                    try:
                        block = response.read(BLOCK_BYTES)
                    except (OSError, http.client.HTTPException) as error:
                        self._connection.close()
                        raise ConnectionFailed(
                            f"The download of {info.id} failed after {received} of {expected_size} "
                            f"bytes: {_reason(error)}.",
                            code="connection_failed",
                        ) from None
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    if progress is not None:
                        progress(len(block))
                out.flush()
                os.fsync(out.fileno())
            if received != expected_size:
                self._connection.close()
                raise ConnectionFailed(
                    f"The download of {info.id} stopped after {received} of {expected_size} bytes "
                    "(connection lost, or the server aborted it); nothing was saved.",
                    code="connection_failed",
                )
            install_verified(part, dest, info.sha256, actual_sha256=digest.hexdigest(), overwrite=overwrite)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return info

    # -- plumbing ----------------------------------------------------------

    def _upload_stream(self, name: str, stream: BinaryIO, size: int, progress: Progress | None) -> FileInfo:
        try:
            encoded = quote(name, safe="")
        except UnicodeEncodeError:
            raise VaultError(f"The name {name!r} is not valid UTF-8; give another filename.",
                             code="invalid_filename") from None
        digest = hashlib.sha256()

        def body(connection: http.client.HTTPSConnection) -> None:
            remaining = size
            while remaining > 0:
                block = stream.read(min(BLOCK_BYTES, remaining))
                if not block:
                    raise VaultError(
                        f"The file {name!r} shrank while it was being uploaded; nothing was stored.",
                        code="file_changed",
                    )
                connection.send(block)
                digest.update(block)
                remaining -= len(block)
                if progress is not None:
                    progress(len(block))

        response = self._send(
            "POST",
            "/upload-file",
            headers={
                "Content-Type": "application/octet-stream",
                "X-Filename": encoded,
                "Content-Length": str(size),
            },
            body=body,
        )
        info = FileInfo.from_json(self._read_json(response, expect=(201,)))
        if info.size != size or info.sha256.lower() != digest.hexdigest():
            raise IntegrityError(
                f"The server stored {info.size} bytes with SHA-256 {info.sha256} for {name!r}, "
                f"but {size} bytes with SHA-256 {digest.hexdigest()} were sent.",
                code="integrity_error",
            )
        return info

    def _call_json(self, method: str, path: str, payload: Any = None, *, auth: bool = True,
                   expect: tuple[int, ...] = (200,)) -> Any:
        headers = {"Accept": "application/json"}
        data: bytes | None = None
        if payload is not None:
            data = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if method == "POST":
            headers["Content-Length"] = str(len(data or b""))

        def body(connection: http.client.HTTPSConnection) -> None:
            if data:
                connection.send(data)

        response = self._send(method, path, headers=headers, body=body, auth=auth)
        return self._read_json(response, expect=expect)

    def _send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        body: Callable[[http.client.HTTPSConnection], None] | None = None,
        auth: bool = True,
    ) -> http.client.HTTPResponse:
        """Send one request and return the response with its body unread.

        Error statuses are raised as L{VaultError}s (body consumed).
        """
        if auth:
            if not self.session_id:
                raise AuthenticationError("Not logged in.", code="not_logged_in")
            headers = {**headers, "Authorization": f"Bearer {self.session_id}"}
        connection = self._connection
        if connection.sock is not None and _connection_dropped(connection.sock):
            connection.close()  # the server closed it while idle: reconnect
        in_body = False
        try:
            connection.putrequest(method, self._prefix + path, skip_accept_encoding=True)
            for header, value in headers.items():
                connection.putheader(header, value)
            connection.endheaders()
            in_body = True
            if body is not None:
                body(connection)
            in_body = False
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            # The server may have answered early (413 before reading the
            # body) and closed; its answer is worth more than the broken pipe.
            early = self._early_response() if in_body else None
            if early is None:
                connection.close()
                raise ConnectionFailed(f"Cannot talk to {self.url}: {_reason(error)}.",
                                       code="connection_failed") from None
            response = early
        except BaseException:
            connection.close()
            raise
        if response.status >= 400:
            try:
                payload = response.read()
            except (OSError, http.client.HTTPException):
                payload = b""
                connection.close()
            raise error_from_response(response.status, payload, _headers(response))
        return response

    def _early_response(self) -> http.client.HTTPResponse | None:
        if self._connection.sock is None:
            return None
        try:
            return self._connection.getresponse()
        except (OSError, http.client.HTTPException):
            return None

    def _read_json(self, response: http.client.HTTPResponse, *, expect: tuple[int, ...]) -> Any:
        try:
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            self._connection.close()
            raise ConnectionFailed(f"Cannot read the answer from {self.url}: {_reason(error)}.",
                                   code="connection_failed") from None
        if response.status not in expect:
            raise _protocol_error(f"HTTP {response.status} where {' or '.join(map(str, expect))} was expected")
        if response.status == 204:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise _protocol_error("the body is not JSON") from None

    def _discard(self, response: http.client.HTTPResponse) -> None:
        """Abandon a response mid-body: the connection cannot be reused."""
        response.close()
        self._connection.close()


def _headers(response: http.client.HTTPResponse) -> dict[str, str]:
    return {name: value for name, value in response.getheaders()}


def _connection_dropped(sock: Any) -> bool:
    """Whether an idle connection has been closed by the server (or has
    unexpected bytes waiting, which makes it unusable too)."""
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
