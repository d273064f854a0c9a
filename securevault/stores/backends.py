# -*- test-case-name: tests.stores.test_backends -*-
"""Which stores a vault uses, from two settings: C{--metadata} and C{--blobs}.

Unset, both are the embedded defaults in the data directory (SQLite and a
local directory): nothing else to install or run.  For several nodes they
name shared engines: C{postgresql://...} and C{s3://bucket/prefix}.  The
drivers of those are optional extras, imported only when asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from securevault.core.generation import SharedGeneration
from securevault.core.keys import Keyring, KeyringFile
from securevault.storage import METADATA_FILE, SecureFileStorage
from securevault.stores.blobs import BlobStore, LocalBlobStore
from securevault.stores.metadata import MetadataError, MetadataStore, SqliteMetadataStore

METADATA_ENV = "SECUREVAULT_METADATA"
BLOBS_ENV = "SECUREVAULT_BLOBS"


class BackendError(Exception):
    """A store setting is wrong or its engine unreachable; one line for people."""


def metadata_setting(value: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The C{--metadata} value, else C{$SECUREVAULT_METADATA}, else None."""
    return value or environ.get(METADATA_ENV) or None


def blobs_setting(value: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The C{--blobs} value, else C{$SECUREVAULT_BLOBS}, else None."""
    return value or environ.get(BLOBS_ENV) or None


def check_metadata_url(url: str | None) -> None:
    """Refuse a malformed setting before anything starts."""
    if url is None or url == "sqlite":
        return
    scheme = urlsplit(url).scheme
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise BackendError(
            f"--metadata must be sqlite, sqlite:///PATH or postgresql://..., not a {scheme or 'bare'!r} URL"
        )
    if scheme == "sqlite" and not urlsplit(url).path:
        raise BackendError("--metadata sqlite:///PATH needs a path")


def check_blobs_url(url: str | None) -> None:
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("file", "s3"):
        raise BackendError(f"--blobs must be file:///DIR or s3://BUCKET/PREFIX, not {url!r}")
    if parts.scheme == "s3" and not parts.netloc:
        raise BackendError("--blobs s3://BUCKET/PREFIX needs a bucket name")
    if parts.scheme == "file" and not parts.path:
        raise BackendError("--blobs file:///DIR needs a directory")


def open_metadata(data_dir: Path, url: str | None) -> MetadataStore:
    check_metadata_url(url)
    try:
        if url is None or url == "sqlite":
            return SqliteMetadataStore(data_dir / METADATA_FILE)
        if url.startswith("sqlite:"):
            return SqliteMetadataStore(Path(urlsplit(url).path))
        try:
            from securevault.stores.metadata_postgres import PostgresMetadataStore
        except ImportError as error:
            raise BackendError(
                "the PostgreSQL metadata store needs psycopg: in securevault's checkout, pip install '.[postgresql]'"
            ) from error
        return PostgresMetadataStore(url)
    except MetadataError as error:
        raise BackendError(f"cannot open the metadata store: {error}") from error


def open_blobs(data_dir: Path, url: str | None) -> BlobStore:
    check_blobs_url(url)
    if url is None:
        return LocalBlobStore(data_dir / "archives")
    if url.startswith("file:"):
        return LocalBlobStore(Path(urlsplit(url).path))
    try:
        from securevault.stores.blobs_s3 import S3BlobStore
    except ImportError as error:
        raise BackendError("the S3 blob store needs boto3: in securevault's checkout, pip install '.[s3]'") from error
    try:
        return S3BlobStore.from_url(url)
    except ValueError as error:
        raise BackendError(str(error)) from error


@dataclass
class Stores:
    """The two stores of one vault, and whether they belong to this node alone."""

    data_dir: Path
    metadata: MetadataStore
    blobs: BlobStore

    @property
    def single_node(self) -> bool:
        """Both embedded: no other node can be writing (crash debris can be
        removed at once, without a grace period)."""
        return isinstance(self.metadata, SqliteMetadataStore) and isinstance(self.blobs, LocalBlobStore)

    def storage(
        self,
        keyring: Keyring,
        *,
        keyring_file: KeyringFile | None = None,
        cache_listings: bool = False,
        generation: SharedGeneration | None = None,
    ) -> SecureFileStorage:
        return SecureFileStorage(
            self.data_dir,
            keyring,
            metadata=self.metadata,
            blobs=self.blobs,
            keyring_file=keyring_file,
            cache_listings=cache_listings,
            generation=generation,
        )

    def describe(self) -> str:
        return f"metadata {self.metadata.describe()}, blobs {self.blobs.describe()}"

    def close(self) -> None:
        self.metadata.close()


def open_stores(data_dir: Path, metadata_url: str | None = None, blobs_url: str | None = None) -> Stores:
    """Open (and create) the stores a vault is configured with."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    metadata = open_metadata(data_dir, metadata_url)
    try:
        blobs = open_blobs(data_dir, blobs_url)
    except BaseException:
        metadata.close()
        raise
    return Stores(data_dir, metadata, blobs)
