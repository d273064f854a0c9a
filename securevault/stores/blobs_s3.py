# -*- test-case-name: tests.stores.test_blobs_s3 -*-
"""Archive bodies in an S3 bucket (AWS S3, MinIO, Ceph RGW, ...).

Keys are C{<prefix>/<owner id>/<archive id>.body}.  A writer buffers one
part of L{PART_BYTES} at a time and streams larger blobs with a multipart
upload, so memory stays flat whatever the size; a blob is invisible until
C{complete_multipart_upload} (or, for a blob smaller than one part, the
single C{put_object}) at commit.  Reads stream the object's body; a range
read is one C{GetObject} with a C{Range} header.

Plain blocking code, called from the worker pool: one boto3 client is shared
by every thread (clients are thread-safe; sessions are not, so the session is
used only to make it).  Endpoint, region and credentials come from the usual
AWS configuration: C{AWS_ENDPOINT_URL} / C{AWS_ENDPOINT_URL_S3},
C{AWS_DEFAULT_REGION}, C{AWS_ACCESS_KEY_ID}, C{AWS_SECRET_ACCESS_KEY},
C{AWS_PROFILE}, C{~/.aws/config}, instance roles.

Every S3 or connection failure becomes a L{BlobStoreError} whose one-line
message names the operation, the bucket and the S3 error code (never
credentials, never data); a missing blob is L{BlobNotFound}.

Importing this module needs boto3 (C{pip install '.[s3]'} in the checkout): the
ImportError is the sign that it is missing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import boto3.session
import botocore.config
from botocore.exceptions import BotoCoreError, ClientError

from securevault.stores.blobs import (
    BODY_SUFFIX,
    BlobEntry,
    BlobNotFound,
    BlobStoreError,
    check_names,
)

PART_BYTES = 8 << 20  # S3's minimum part size is 5 MiB (except the last)
MAX_PARTS = 10_000  # S3's limit: so a blob is at most about 78 GiB
INCOMPLETE_GRACE_SECONDS = 24 * 3600
MAX_POOL_CONNECTIONS = 32

# Current S3 bucket naming rules (3 to 63 characters, no uppercase).
_BUCKET = re.compile(r"\A[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
# S3's "safe characters" for key names, one path segment at a time.
_PREFIX_SEGMENT = re.compile(r"\A[0-9A-Za-z!_.*'()-]+\Z")
_BOTOCORE_ERRORS = (ClientError, BotoCoreError)
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound", "HTTP 404"})
_RANGE_PAST_END = frozenset({"InvalidRange", "416", "HTTP 416"})


def _check_bucket(bucket: str) -> None:
    if not bucket:
        raise ValueError("The S3 bucket name is empty.")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{bucket!r} is not a valid S3 bucket name (3 to 63 lowercase letters, digits, dots and hyphens)."
        )


def _normalise_prefix(prefix: str) -> str:
    """C{"a/b/"} and C{"/a/b"} become C{"a/b"}; C{""} and C{"/"} stay empty."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    for segment in stripped.split("/"):
        if segment in (".", "..") or not _PREFIX_SEGMENT.match(segment):
            raise ValueError(
                f"The S3 key prefix {prefix!r} is not valid: use non-empty path segments of letters, "
                "digits and !_.*'()- (no '.' or '..')."
            )
    if len(stripped) > 512:
        raise ValueError("The S3 key prefix is longer than 512 characters.")
    return stripped


def _error_code(error: Exception) -> str:
    """The S3 error code of a botocore error, or its class name."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status:
            return f"HTTP {status}"
    return type(error).__name__


class S3BlobWriter:
    """One blob being written.  Bytes are copied into a part buffer of at
    most L{PART_BYTES}; a full part is uploaded only when more bytes arrive,
    so the last part is never empty and a blob of at most one part is a
    single C{put_object} at commit, with no multipart upload at all."""

    def __init__(self, store: S3BlobStore, key: str) -> None:
        self._store = store
        self._key = key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._size = 0
        self._open = True

    @property
    def buffered(self) -> int:
        """How many bytes this writer holds in memory now (at most L{PART_BYTES})."""
        return len(self._buffer)

    @property
    def multipart(self) -> bool:
        """Whether a multipart upload has been started for this blob."""
        return self._upload_id is not None

    def write(self, data: bytes | memoryview) -> None:
        if not self._open:
            raise BlobStoreError("write after commit or abort")
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        offset = 0
        while offset < len(view):
            if len(self._buffer) >= PART_BYTES:
                self._upload_part()
            room = PART_BYTES - len(self._buffer)
            piece = view[offset : offset + room]
            self._buffer += piece  # a copy: the caller reuses its buffer
            offset += len(piece)
        self._size += len(view)

    def _upload_part(self) -> None:
        store = self._store
        if self._upload_id is None:
            response = store._call(
                "CreateMultipartUpload",
                store._client.create_multipart_upload,
                Bucket=store.bucket,
                Key=self._key,
                ContentType="application/octet-stream",
            )
            self._upload_id = str(response["UploadId"])
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise BlobStoreError(
                f"S3 UploadPart refused: a blob may have at most {MAX_PARTS} parts of {PART_BYTES >> 20} MiB"
            )
        response = store._call(
            "UploadPart",
            store._client.upload_part,
            Bucket=store.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=self._buffer,
        )
        part: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
        for checksum in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256"):
            if response.get(checksum):
                part[checksum] = response[checksum]
        self._parts.append(part)
        self._buffer = bytearray()

    def commit(self) -> int:
        if not self._open:
            raise BlobStoreError("commit after commit or abort")
        store = self._store
        try:
            if self._upload_id is None:
                store._call(
                    "PutObject",
                    store._client.put_object,
                    Bucket=store.bucket,
                    Key=self._key,
                    Body=self._buffer,
                    ContentType="application/octet-stream",
                )
            else:
                if self._buffer:
                    self._upload_part()
                store._call(
                    "CompleteMultipartUpload",
                    store._client.complete_multipart_upload,
                    Bucket=store.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
                self._upload_id = None
        except BaseException:
            self.abort()
            raise
        self._open = False
        self._buffer = bytearray()
        return self._size

    def abort(self) -> None:
        self._open = False
        self._buffer = bytearray()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            try:
                self._store._client.abort_multipart_upload(Bucket=self._store.bucket, Key=self._key, UploadId=upload_id)
            except Exception:
                # Nothing is visible; remove_incomplete (or the bucket's
                # lifecycle rule) clears what is left.
                pass


class S3BlobReader:
    def __init__(self, store: S3BlobStore, body: Any, *, empty: bool = False) -> None:
        self._store = store
        self._body: Any = body
        self._empty = empty

    def read(self, size: int) -> bytes:
        if self._empty:
            return b""
        if self._body is None:
            raise BlobStoreError("read after close")
        return bytes(self._store._call("GetObject (read)", self._body.read, size))

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:
                pass


class S3BlobStore:
    """Blobs as S3 objects C{<prefix>/<owner id>/<archive id>.body}.

    @param bucket: an existing bucket.
    @param prefix: a key prefix (C{"vault"}, C{"vault/"}: the same), may be empty.
    @param client: a boto3 S3 client; by default one made from the usual AWS
        environment and configuration files.
    @param incomplete_grace_seconds: how old an unfinished multipart upload
        must be before L{remove_incomplete} aborts it.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any = None,
        *,
        incomplete_grace_seconds: float = INCOMPLETE_GRACE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_bucket(bucket)
        self.bucket = bucket
        self.prefix = _normalise_prefix(prefix)
        self.incomplete_grace_seconds = incomplete_grace_seconds
        self._clock = clock
        self._client: Any = client if client is not None else self._make_client()

    @staticmethod
    def _make_client() -> Any:
        config = botocore.config.Config(
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=MAX_POOL_CONNECTIONS,
        )
        return boto3.session.Session().client("s3", config=config)

    @classmethod
    def from_url(cls, url: str, client: Any = None) -> S3BlobStore:
        """A store for C{s3://bucket} or C{s3://bucket/prefix}."""
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise ValueError(f"The blob store URL must start with s3://, not {parts.scheme or 'nothing'}.")
        if "@" in parts.netloc:
            raise ValueError(
                "The s3:// URL must not contain credentials: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or a profile) instead."
            )
        if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
            raise ValueError("The s3:// URL must have no query or fragment: only s3://bucket/prefix.")
        if ":" in parts.netloc:
            raise ValueError(
                "The s3:// URL must name a bucket, not a host and port: set AWS_ENDPOINT_URL for the endpoint."
            )
        if not parts.netloc:
            raise ValueError("The s3:// URL names no bucket: use s3://bucket or s3://bucket/prefix.")
        return cls(parts.netloc, unquote(parts.path), client=client)

    # naming

    def key(self, owner_id: str, archive_id: str) -> str:
        check_names(owner_id, archive_id)
        name = f"{owner_id}/{archive_id}{BODY_SUFFIX}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _list_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _parse_key(self, key: str) -> tuple[str, str] | None:
        """(owner id, archive id) of a key in our layout, else None."""
        start = self._list_prefix()
        if not key.startswith(start) or not key.endswith(BODY_SUFFIX):
            return None
        rest = key[len(start) : -len(BODY_SUFFIX)].split("/")
        if len(rest) != 2:
            return None
        try:
            check_names(rest[0], rest[1])
        except ValueError:
            return None
        return rest[0], rest[1]

    # errors

    def _failure(self, operation: str, error: Exception) -> NoReturn:
        raise BlobStoreError(f"S3 {operation} failed on bucket {self.bucket!r}: {_error_code(error)}") from error

    def _call(self, operation: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except _BOTOCORE_ERRORS as error:
            self._failure(operation, error)

    # the BlobStore interface

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        endpoint = getattr(getattr(self._client, "meta", None), "endpoint_url", None)
        if isinstance(endpoint, str):
            parts = urlsplit(endpoint)
            host = parts.hostname or ""
            if host and not host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
                try:
                    port = parts.port
                except ValueError:
                    port = None
                where += f" at {host}:{port}" if port else f" at {host}"
        return where

    def writer(self, owner_id: str, archive_id: str) -> S3BlobWriter:
        return S3BlobWriter(self, self.key(owner_id, archive_id))

    def reader(self, owner_id: str, archive_id: str) -> S3BlobReader:
        key = self.key(owner_id, archive_id)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _error_code(error) in _NOT_FOUND:
                raise BlobNotFound(f"{owner_id}/{archive_id}") from None
            self._failure("GetObject", error)
        except _BOTOCORE_ERRORS as error:
            self._failure("GetObject", error)
        return S3BlobReader(self, response["Body"])

    def range_reader(self, owner_id: str, archive_id: str, start: int, length: int) -> S3BlobReader:
        """One C{GetObject} with a C{Range} header: only those bytes travel."""
        if start < 0 or length < 0:
            raise ValueError("negative range")
        key = self.key(owner_id, archive_id)
        try:
            if length == 0:
                self._client.head_object(Bucket=self.bucket, Key=key)
                return S3BlobReader(self, None, empty=True)
            response = self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
        except ClientError as error:
            code = _error_code(error)
            if code in _NOT_FOUND:
                raise BlobNotFound(f"{owner_id}/{archive_id}") from None
            if code in _RANGE_PAST_END:
                # The blob ends before start (S3 answers 416); it exists,
                # or the answer would have been 404.
                return S3BlobReader(self, None, empty=True)
            self._failure("GetObject", error)
        except _BOTOCORE_ERRORS as error:
            self._failure("GetObject", error)
        return S3BlobReader(self, response["Body"])

    def delete(self, owner_id: str, archive_id: str) -> None:
        key = self.key(owner_id, archive_id)
        self._call("DeleteObject", self._client.delete_object, Bucket=self.bucket, Key=key)

    def list(self) -> Iterator[BlobEntry]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._list_prefix())
        iterator = iter(pages)
        while True:
            page = self._call("ListObjectsV2", next, iterator, None)
            if page is None:
                return
            for item in page.get("Contents", ()):
                names = self._parse_key(item["Key"])
                if names is not None:
                    yield BlobEntry(names[0], names[1], int(item["Size"]), item["LastModified"].timestamp())

    def remove_incomplete(self) -> int:
        """Abort multipart uploads in our layout started more than
        C{incomplete_grace_seconds} ago (by default a day: other nodes
        sharing the bucket may be mid-upload now); returns how many.

        Operators should also set the bucket lifecycle rule
        C{AbortIncompleteMultipartUpload} (say, after 2 days) as a belt and
        braces: it clears what this misses, such as uploads left under an
        old prefix."""
        cutoff = self._clock() - self.incomplete_grace_seconds
        paginator = self._client.get_paginator("list_multipart_uploads")
        iterator = iter(paginator.paginate(Bucket=self.bucket, Prefix=self._list_prefix()))
        stale: list[tuple[str, str]] = []
        while True:
            page = self._call("ListMultipartUploads", next, iterator, None)
            if page is None:
                break
            for upload in page.get("Uploads", ()):
                if self._parse_key(upload["Key"]) is None:
                    continue
                if upload["Initiated"].timestamp() < cutoff:
                    stale.append((upload["Key"], upload["UploadId"]))
        removed = 0
        for key, upload_id in stale:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as error:
                if _error_code(error) == "NoSuchUpload":
                    continue  # finished or aborted meanwhile
                self._failure("AbortMultipartUpload", error)
            except _BOTOCORE_ERRORS as error:
                self._failure("AbortMultipartUpload", error)
            removed += 1
        return removed
