# -*- test-case-name: tests.client.test_client -*-
"""A small synchronous client for a securevault, on the standard library only.

It speaks the HTTP contract of C{shared/API.md} over mutual TLS, on one
persistent HTTPS connection reused across calls (reopened when the server has
closed it).  Uploads and downloads use the raw streaming forms, so memory
stays flat whatever the file size; a download is written to a partial file
next to its destination and renamed into place only once its SHA-256 matches
what the server announced.  A download cut off midway keeps its partial
file, and the next one into the same destination asks only for the rest
(C{Range} with C{If-Range}).

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

import base64
import builtins
import hashlib
import hmac
import http.client
import io
import json
import os
import re
import select
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode, urlsplit

from securevault.client.support import (
    BLOCK_BYTES,
    CERTIFICATE_REFUSED,
    DEFAULT_TIMEOUT_SECONDS,
    EXIT_AUTH,
    EXIT_CONNECTION,
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_STORAGE,
    EXIT_THROTTLED,
    EXIT_USAGE,
    AuthenticationError,
    ConfigurationError,
    ConnectionFailed,
    FileInfo,
    IntegrityError,
    NotFoundError,
    Progress,
    Session,
    StorageLimitError,
    TooManyAttempts,
    Usage,
    VaultError,
    _protocol_error,
    _reason,
    certificate_refused,
    error_from_response,
    file_sha256,
    install_verified,
    make_tls_context,
    parse_etag,
)

__all__ = [
    "VaultClient",
    "Progress",
    "AuthenticationError",
    "BLOCK_BYTES",
    "ConfigurationError",
    "ConnectionFailed",
    "DEFAULT_TIMEOUT_SECONDS",
    "EXIT_AUTH",
    "EXIT_CONNECTION",
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_STORAGE",
    "EXIT_THROTTLED",
    "EXIT_USAGE",
    "FileInfo",
    "IntegrityError",
    "NotFoundError",
    "Session",
    "StorageLimitError",
    "TooManyAttempts",
    "Usage",
    "VaultError",
    "error_from_response",
    "file_sha256",
    "install_verified",
    "make_tls_context",
    "parse_etag",
    "part_path",
]


# Resumable uploads (tus 1.0.0): the size of one PATCH.
TUS_CHUNK_BYTES = 8 << 20
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}


def _upload_state_path(directory: Path, url: str, path: Path, size: int, mtime_ns: int, name: str) -> Path:
    """Where a resumable upload of this file to this vault keeps its URL."""
    key = hashlib.sha256("\0".join([url, str(path), str(size), str(mtime_ns), name]).encode("utf-8", "surrogatepass"))
    return directory / f"upload-{key.hexdigest()[:32]}.json"


def _write_state(path: Path, record: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(record, handle)


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
        if parts.scheme == "http":
            raise ConfigurationError(
                f"The URL {url!r} is http://; a vault speaks only HTTPS with a client certificate: "
                f"use {'https' + url[len('http') :]!r}.",
                code="bad_configuration",
            )
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigurationError(f"The URL {url!r} is not an https:// URL with a host.", code="bad_configuration")
        if parts.query or parts.fragment:
            raise ConfigurationError(f"The URL {url!r} must not have a query or fragment.", code="bad_configuration")
        try:
            port = parts.port or 443
        except ValueError:
            raise ConfigurationError(f"The URL {url!r} has an invalid port.", code="bad_configuration") from None
        self.url = url
        self.session_id = session_id
        self._prefix = parts.path.rstrip("/")
        self._context = make_tls_context(cert, key, ca)
        self._connection = http.client.HTTPSConnection(parts.hostname, port, context=self._context, timeout=timeout)

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

    def upload(
        self, path: str | os.PathLike[str], filename: str | None = None, progress: Progress | None = None
    ) -> FileInfo:
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

    def upload_resumable(
        self,
        path: str | os.PathLike[str],
        state_dir: str | os.PathLike[str],
        filename: str | None = None,
        progress: Progress | None = None,
        *,
        chunk_bytes: int = TUS_CHUNK_BYTES,
    ) -> FileInfo:
        """Upload the file at C{path} with tus 1.0.0 (C{/uploads/}), in
        PATCHes of C{chunk_bytes}, resuming an earlier interrupted upload of
        the same file.

        The upload's URL is kept in a 0600 state file under C{state_dir},
        named after the server, the file's path, size, mtime and name: run
        again after a broken connection (or a restart of the vault) and only
        what the server has not acknowledged is sent.  The archive's SHA-256
        is checked against the file's, as for L{upload}.
        """
        path = Path(path).resolve()
        name = path.name if filename is None else filename
        stat = path.stat()
        state = _upload_state_path(Path(state_dir), self.url, path, stat.st_size, stat.st_mtime_ns, name)
        expected = file_sha256(path)
        url, offset = self._resume_upload(state)
        archive_id: str | None = None
        if url is None:
            url, offset, archive_id = self._create_upload(name, stat.st_size)
            _write_state(state, {"url": url})
        with open(path, "rb") as stream:
            stream.seek(offset)
            if progress is not None and offset:
                progress(offset)
            while archive_id is None:
                chunk = stream.read(chunk_bytes)
                if not chunk and offset < stat.st_size:
                    raise VaultError(f"{path} shrank while it was being uploaded.")
                digest = base64.b64encode(hashlib.sha256(chunk).digest()).decode("ascii")
                response = self._send(
                    "PATCH",
                    url,
                    headers={
                        **TUS_HEADERS,
                        "Content-Type": "application/offset+octet-stream",
                        "Upload-Offset": str(offset),
                        "Upload-Checksum": f"sha256 {digest}",
                        "Content-Length": str(len(chunk)),
                    },
                    body=lambda connection, data=chunk: connection.send(data),  # type: ignore[misc]
                )
                response.read()
                offset = int(response.getheader("Upload-Offset") or offset + len(chunk))
                archive_id = response.getheader("Upload-Archive-Id")
                if progress is not None:
                    progress(len(chunk))
                if archive_id is None and not chunk:
                    raise _protocol_error("the upload ended without an archive id")
        state.unlink(missing_ok=True)
        info = self.stat(archive_id=archive_id)
        if not hmac.compare_digest(info.sha256, expected):
            raise IntegrityError(
                f"The vault stored {info.sha256} for {name}, not the file's {expected}.", code="integrity_error"
            )
        return info

    def _resume_upload(self, state: Path) -> tuple[str | None, int]:
        """The URL and acknowledged offset of an earlier upload of this file,
        or (None, 0) when there is none the server still has."""
        try:
            url = json.loads(state.read_text(encoding="utf-8"))["url"]
        except (OSError, ValueError, KeyError, TypeError):
            return None, 0
        if not isinstance(url, str) or not url.startswith("/uploads/"):
            return None, 0
        try:
            response = self._send("HEAD", url, headers=dict(TUS_HEADERS))
        except NotFoundError:
            state.unlink(missing_ok=True)
            return None, 0
        response.read()
        return url, int(response.getheader("Upload-Offset") or 0)

    def _create_upload(self, name: str, size: int) -> tuple[str, int, str | None]:
        """POST /uploads/: the new upload's path, offset 0, and the archive id
        at once for an empty file."""
        metadata = "filename " + base64.b64encode(name.encode("utf-8")).decode("ascii")
        response = self._send(
            "POST",
            "/uploads/",
            headers={**TUS_HEADERS, "Upload-Length": str(size), "Upload-Metadata": metadata, "Content-Length": "0"},
        )
        response.read()
        location = response.getheader("Location") or ""
        path = urlsplit(location).path
        if not path.startswith(self._prefix + "/uploads/"):
            raise _protocol_error(f"POST /uploads/ answered an unexpected Location {location!r}")
        return path[len(self._prefix) :], 0, response.getheader("Upload-Archive-Id")

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

    def usage(self) -> Usage:
        """C{GET /usage}: the caller's archives, stored bytes, quota and
        uploads in progress."""
        return Usage.from_json(self._call_json("GET", "/usage"))

    def download(
        self,
        archive_id: str | None = None,
        name: str | None = None,
        *,
        dest: Path,
        progress: Progress | None = None,
        expected: FileInfo | None = None,
        overwrite: bool = True,
        resume: bool = True,
    ) -> FileInfo:
        """Download one archive's original bytes into C{dest}, verified.

        The archive is named by C{archive_id}, by C{name} (the newest with that
        filename), or by C{expected}, a listing entry already at hand.  The
        bytes stream into a partial file next to C{dest} while their SHA-256
        is computed; they are renamed into place only if it matches both the
        response's C{ETag} and the listing, otherwise the partial file is
        deleted and L{IntegrityError} raised.  With C{overwrite=False} an
        existing C{dest} is never replaced (C{FileExistsError}).  The file is
        created with mode 0600, as befits the contents of a vault.

        Resuming: the partial file is named after C{dest} and the ETag of the
        bytes it holds (C{.<name>.<sha256>.part}).  When a download is cut
        off (the connection lost, or interrupted) and the server offers
        ranges, that file is kept, and the next download to the same C{dest}
        asks only for the rest (C{Range: bytes=<held>-} with C{If-Range:
        "<its ETag>"}); C{progress} is first told of the bytes already held.
        A 200 instead of 206 (the archive is another one now) starts again
        from zero.  The whole file's SHA-256 is checked either way.
        C{resume=False} ignores and removes a partial file.

        A download that ends short of its length is asked for once more:
        the server aborts a stream that hits a tampered chunk after the
        headers went out, and then answers 500 integrity_error at once, which
        is raised as L{IntegrityError} (and the partial file removed); any
        other answer leaves it a L{ConnectionFailed}.
        """
        info = expected if expected is not None else self.stat(archive_id, name)
        dest = Path(dest)
        held, held_etag = _held_part(dest, info.sha256) if resume else (None, None)
        held_bytes = held.stat().st_size if held is not None else 0
        if held is not None and not 0 < held_bytes < info.size:
            held.unlink(missing_ok=True)  # empty, or as long as the file: nothing to ask for
            held, held_etag, held_bytes = None, None, 0
        if not resume:
            _drop_parts(dest, keep=None)
        headers = {"Accept": "application/octet-stream"}
        if held is not None:
            headers["Range"] = f"bytes={held_bytes}-"
            headers["If-Range"] = f'"{held_etag}"'
        try:
            response = self._send("GET", "/download-file?" + urlencode({"id": info.id}), headers=headers)
        except VaultError as error:
            if held is None or error.status != 416:
                raise
            held.unlink(missing_ok=True)  # the server no longer has those bytes: from zero
            return self.download(expected=info, dest=dest, progress=progress, overwrite=overwrite)
        etag = parse_etag(response.getheader("ETag"))
        if etag is not None and etag != info.sha256.lower():
            self._discard(response)
            raise IntegrityError(
                f"The server announced SHA-256 {etag} for archive {info.id}, but listed {info.sha256}.",
                code="integrity_error",
            )
        offset = 0
        if response.status == 206 and held is not None:
            offset = held_bytes
            wanted = f"bytes {offset}-{info.size - 1}/{info.size}"
            if (response.getheader("Content-Range") or "").strip() != wanted or etag != held_etag:
                self._discard(response)
                held.unlink(missing_ok=True)
                raise _protocol_error(f"the resumed download of {info.id} is not the range {wanted}")
        elif response.status != 200:
            self._discard(response)
            raise _protocol_error(f"HTTP {response.status} for a download")
        length_header = response.getheader("Content-Length")
        if length_header is not None and length_header.strip() != str(info.size - offset):
            self._discard(response)
            raise _protocol_error(
                f"the download of {info.id} is {length_header} bytes, but the listing says {info.size - offset}"
            )
        # Kept after a failure only if the server offers ranges of this very
        # representation: then the next download asks for the rest.
        resumable = resume and etag is not None and (response.getheader("Accept-Ranges") or "").strip() == "bytes"
        part: Path | None
        if held is not None and offset:
            part = held
            fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        else:
            _drop_parts(dest, keep=None)  # bytes of another representation: start from zero
            part = part_path(dest, info.sha256) if resumable else None
            if part is None:
                fd, part_name = tempfile.mkstemp(dir=dest.parent or ".", prefix=f".{dest.name}.", suffix=".part")
                part = Path(part_name)
            else:
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                os.fchmod(fd, 0o600)
        keep = False
        try:
            digest = hashlib.sha256()
            if offset:
                _hash_prefix(part, offset, digest)
                if progress is not None:
                    progress(offset)
            received = 0
            expected_size = info.size - offset
            with os.fdopen(fd, "wb") as out:
                try:
                    while True:
                        try:
                            block = response.read(BLOCK_BYTES)
                        except (OSError, http.client.HTTPException) as error:
                            self._connection.close()
                            out.flush()
                            self._raise_if_integrity_failure(info, offset + received)
                            keep = resumable
                            raise ConnectionFailed(
                                f"The download of {info.id} failed after {offset + received} of {info.size} "
                                f"bytes: {_reason(error)}.{_resume_hint(keep)}",
                                code="connection_failed",
                            ) from None
                        if not block:
                            break
                        out.write(block)
                        digest.update(block)
                        received += len(block)
                        if progress is not None:
                            progress(len(block))
                except KeyboardInterrupt:
                    keep = resumable
                    raise
                finally:
                    out.flush()
                    os.fsync(out.fileno())
            if received != expected_size:
                self._connection.close()
                if received < expected_size:
                    self._raise_if_integrity_failure(info, offset + received)
                    keep = resumable
                raise ConnectionFailed(
                    f"The download of {info.id} stopped after {offset + received} of {info.size} bytes "
                    f"(connection lost, or the server aborted it).{_resume_hint(keep)}",
                    code="connection_failed",
                )
            install_verified(part, dest, info.sha256, actual_sha256=digest.hexdigest(), overwrite=overwrite)
        except BaseException:
            if not keep:
                part.unlink(missing_ok=True)
            raise
        return info

    # -- plumbing ----------------------------------------------------------

    def _raise_if_integrity_failure(self, info: FileInfo, received: int) -> None:
        """After a raw download of C{info} ended short: ask once more, and
        raise L{IntegrityError} if the server now answers 500
        integrity_error (it remembers an archive that failed mid-stream).
        Any other answer, a 200 included, is dropped unread: the caller
        reports the short download as the connection failure it looked like."""
        try:
            response = self._send(
                "GET",
                "/download-file?" + urlencode({"id": info.id}),
                headers={"Accept": "application/octet-stream"},
            )
        except IntegrityError as error:
            if error.status != 500:
                return
            raise IntegrityError(
                f"The download of {info.id} was aborted after {received} of {info.size} bytes: "
                "the server's copy of the archive fails authentication; nothing was saved.",
                status=error.status,
                code=error.code,
                request_id=error.request_id,
            ) from None
        except VaultError:
            return
        self._discard(response)

    def _upload_stream(self, name: str, stream: BinaryIO, size: int, progress: Progress | None) -> FileInfo:
        try:
            encoded = quote(name, safe="")
        except UnicodeEncodeError:
            raise VaultError(
                f"The name {name!r} is not valid UTF-8; give another filename.", code="invalid_filename"
            ) from None
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

    def _call_json(
        self, method: str, path: str, payload: Any = None, *, auth: bool = True, expect: tuple[int, ...] = (200,)
    ) -> Any:
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
        opening = connection.sock is None  # this request makes the TLS handshake
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
                if opening and certificate_refused(error):
                    raise ConnectionFailed(
                        f"Cannot talk to {self.url}: {CERTIFICATE_REFUSED} ({_reason(error)}).",
                        code="certificate_refused",
                    ) from None
                raise ConnectionFailed(
                    f"Cannot talk to {self.url}: {_reason(error)}.", code="connection_failed"
                ) from None
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
            raise ConnectionFailed(
                f"Cannot read the answer from {self.url}: {_reason(error)}.", code="connection_failed"
            ) from None
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


_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
PART_SUFFIX = ".part"
# A partial file's name: "." + the destination's name (cut to fit) + "." +
# the 64 hex digits of the ETag its bytes belong to + ".part".
_PART_NAME_BYTES = 255 - 1 - 1 - 64 - len(PART_SUFFIX)


def _part_stem(dest: Path) -> str:
    """The destination's name, cut (on a character boundary) to fit in a
    partial file's name."""
    return "." + dest.name.encode("utf-8", "surrogateescape")[:_PART_NAME_BYTES].decode("utf-8", "ignore")


def part_path(dest: Path, sha256: str) -> Path | None:
    """Where a download of the archive with that SHA-256 into C{dest} keeps
    its bytes until they are verified; None when the server's digest is not
    a digest (it never becomes part of a path then)."""
    sha256 = sha256.lower()
    if not _SHA256.match(sha256):
        return None
    return dest.parent / f"{_part_stem(dest)}.{sha256}{PART_SUFFIX}"


def _parts_of(dest: Path) -> builtins.list[tuple[Path, str]]:
    """The partial files of earlier downloads into C{dest}, with the ETag
    each one's bytes belong to, newest first."""
    stem = _part_stem(dest)
    found = []
    try:
        entries = builtins.list(os.scandir(dest.parent or "."))
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if not name.endswith(PART_SUFFIX):
            continue
        head, _, digest = name[: -len(PART_SUFFIX)].rpartition(".")
        if head == stem and _SHA256.match(digest) and entry.is_file(follow_symlinks=False):
            found.append((entry.stat().st_mtime, Path(entry.path), digest))
    return [(path, digest) for _, path, digest in sorted(found, reverse=True)]


def _held_part(dest: Path, sha256: str) -> tuple[Path | None, str | None]:
    """The partial file of an earlier download of that archive into
    C{dest}, else the newest of another one (its ETag will not match: the
    server answers the whole file, and it is replaced)."""
    parts = _parts_of(dest)
    for path, digest in parts:
        if digest == sha256.lower():
            return path, digest
    return parts[0] if parts else (None, None)


def _drop_parts(dest: Path, keep: Path | None) -> None:
    """Remove the partial files of earlier downloads into C{dest}, but C{keep}."""
    for path, _ in _parts_of(dest):
        if path != keep:
            path.unlink(missing_ok=True)


def _hash_prefix(part: Path, length: int, digest: Any) -> None:
    """Feed the first C{length} bytes already held into C{digest}."""
    with open(part, "rb") as held:
        left = length
        while left > 0:
            block = held.read(min(BLOCK_BYTES, left))
            if not block:
                raise ConnectionFailed(f"The partial file {part} shrank while it was read.", code="file_changed")
            digest.update(block)
            left -= len(block)


def _resume_hint(kept: bool) -> str:
    if kept:
        return " The bytes received are kept: download again to resume."
    return " Nothing was saved."


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
