# -*- test-case-name: tests.test_storage -*-
"""Tests for L{securevault.storage}: archives round-trip, are a documented
standard format, fail closed when tampered with, and are committed atomically.

Everything goes through the public methods of L{SecureFileStorage}; the
decoder below is an independent implementation of docs/FORMAT.md (the same
code as the snippet there, which L{FormatDocumentTests} also runs).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import os
import re
import sqlite3
import threading
import unicodedata
import zipfile
import zlib
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from securevault.core.archive import (
    ArchiveInfo,
    ArchiveNotFound,
    ArchiveReader,
    ArchiveWriter,
    IntegrityError,
    InvalidFilename,
    QuotaExceeded,
    StorageError,
    check_filename,
    context_bytes,
    derive_key,
)
from securevault.core.generation import SharedGeneration
from securevault.core.keys import Keyring, generate_keyring, new_key_id
from securevault.server.streaming import BlockJoiner
from securevault.storage import SecureFileStorage
from securevault.stores.blobs import BlobStore, LocalBlobStore
from tests.support.app import archive_document, blob_directory, set_archive_document, stored_names
from tests.support.testcase import SyncTestCase

MIB = 1 << 20
OWNER = "alice"
OTHER_OWNER = "bob"
FORMAT_DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
# Observed Cobblestone-256 framing (FORMAT.md §5), used only to aim tampering.
HEADER_BYTES = 56
CHUNK_BYTES = 16384 + 16


# -- the decoder of docs/FORMAT.md §8 (keep in sync with the document) -------


def derive(data_key: bytes, purpose: bytes) -> bytes:
    info = b"securevault/v1/" + purpose
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(data_key)


def context(purpose: bytes, owner_id: str, archive_id: str) -> bytes:
    return b"securevault/v1/%s\x00%s\x00%s" % (purpose, owner_id.encode(), archive_id.encode())


def read_document(data_dir: Path, owner_id: str, archive_id: str) -> Any:
    database_uri = (data_dir / "vault.db").resolve().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(database_uri, uri=True)) as database:
        query = "SELECT document FROM sv_archives WHERE owner_id = ? AND archive_id = ?"
        row = database.execute(query, (owner_id, archive_id)).fetchone()
    if row is None:
        raise LookupError(f"no archive {archive_id} of {owner_id} in the index")
    return json.loads(row[0])


def recover_archive(
    data_dir: Path, key_file: Path, owner_id: str, archive_id: str
) -> tuple[dict[str, Any], str, bytes]:
    document = read_document(data_dir, owner_id, archive_id)
    master_key = base64.b64decode(json.loads(key_file.read_bytes())["keys"][document["key_id"]])
    wrapped = base64.b64decode(document["wrapped_key"])
    data_key = AESGCM(master_key).decrypt(wrapped[:12], wrapped[12:], context(b"data-key", owner_id, archive_id))
    sealed = base64.b64decode(document["metadata"])
    metadata_key = AESGCM(derive(data_key, b"metadata-key"))
    metadata_context = context(b"metadata", owner_id, archive_id)
    metadata = json.loads(metadata_key.decrypt(sealed[:12], sealed[12:], metadata_context))
    body = Cobblestone256Decryptor(derive(data_key, b"body-key"), context(b"body", owner_id, archive_id))
    ciphertext = (data_dir / "archives" / owner_id / f"{archive_id}.body").read_bytes()
    zip_bytes = body.update(ciphertext) + body.finalize()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        (member,) = archive.infolist()
        return metadata, member.filename, archive.read(member)


def decrypt_zip(data_dir: Path, keyring: Keyring, owner_id: str, archive_id: str) -> bytes:
    """The decrypted ZIP stream of an archive, per FORMAT.md, for layout checks."""
    document = read_document(data_dir, owner_id, archive_id)
    wrapped = base64.b64decode(document["wrapped_key"])
    master_key = keyring.keys[document["key_id"]]
    data_key = AESGCM(master_key).decrypt(wrapped[:12], wrapped[12:], context(b"data-key", owner_id, archive_id))
    body = Cobblestone256Decryptor(derive(data_key, b"body-key"), context(b"body", owner_id, archive_id))
    return body.update((data_dir / "archives" / owner_id / f"{archive_id}.body").read_bytes()) + body.finalize()


# -- helpers -------------------------------------------------------------------


def fixed_clock(start_ns: int = 1_780_000_000 * 10**9) -> Callable[[], int]:
    """A clock that moves one second forward at every call."""
    ticks = count()
    return lambda: start_ns + next(ticks) * 10**9


def allowed_filename(name: str) -> bool:
    """API.md's filename rule, written independently of storage.check_filename."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if not 0 < len(encoded) <= 255 or name in (".", ".."):
        return False
    return not any(c in "/\\" or unicodedata.category(c) == "Cc" for c in name)


def function_body(source: str, name: str) -> str:
    """The body of top-level function C{name} in C{source}, whitespace removed."""
    match = re.search(rf"^def {name}\((?:.|\n)*?:\n((?:[ \t]+[^\n]*\n|\n)*)", source, re.MULTILINE)
    assert match is not None, name
    return re.sub(r"\s+", "", match.group(1))


class _StorageMixin(SyncTestCase):
    """A fresh data directory and storage per test."""

    def setUp(self) -> None:
        self.data_dir = self.make_dir()
        self.keyring = generate_keyring()
        self.storage = SecureFileStorage(self.data_dir, self.keyring, clock_ns=fixed_clock())
        self.addCleanup(self.storage.metadata.close)

    def owner_dir(self, owner_id: str = OWNER) -> Path:
        """The owner's directory in the local blob store."""
        return blob_directory(self.storage, owner_id)

    def body_path(self, archive_id: str, owner_id: str = OWNER) -> Path:
        return self.owner_dir(owner_id) / f"{archive_id}.body"

    def document(self, archive_id: str, owner_id: str = OWNER) -> str:
        """The archive's index row document (what the .meta file used to hold)."""
        return archive_document(self.storage, owner_id, archive_id)

    def set_document(self, archive_id: str, document: str, owner_id: str = OWNER) -> None:
        set_archive_document(self.storage, owner_id, archive_id, document)

    def owner_files(self, owner_id: str = OWNER) -> list[str]:
        """Files in the owner's blob directory, plus C{<id>.meta} per index row."""
        return stored_names(self.storage, owner_id)

    def round_trip(self, data: bytes, filename: str = "file.bin") -> ArchiveInfo:
        """Store C{data}, check every way of reading it back, return its info."""
        info = self.storage.store(OWNER, filename, data)
        self.assertEqual(info.filename, filename)
        self.assertEqual(info.size, len(data))
        self.assertEqual(info.sha256, hashlib.sha256(data).hexdigest())
        self.assertEqual(info.stored_bytes, self.body_path(info.id).stat().st_size)
        self.assertEqual(self.storage.info(OWNER, info.id), info)
        read_info, content = self.storage.read_all(OWNER, info.id)
        self.assertEqual(read_info, info)
        self.assertTrue(content == data, "read_all returned other bytes")
        self.assertEqual(self.storage.verify(OWNER, info.id), info)
        return info


# -- round trips -----------------------------------------------------------------


class RoundTripTests(_StorageMixin):
    """What goes in comes out, whatever its size, content or name."""

    def test_empty(self) -> None:
        """An empty file is stored and read back as empty, with its digest."""
        info = self.round_trip(b"", "empty")
        self.assertEqual(info.method, "stored")
        self.assertEqual(info.sha256, hashlib.sha256(b"").hexdigest())

    def test_small(self) -> None:
        """A small file round-trips and its public fields are those of API.md."""
        info = self.round_trip(b"hello, vault\n", "hello.txt")
        self.assertEqual(set(info.public()), {"id", "filename", "size", "sha256", "created_at"})
        self.assertRegex(info.created_at, r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
        self.assertRegex(info.id, r"\A[0-9a-f]{32}\Z")

    def test_large_random(self) -> None:
        """10 MiB of random bytes round-trip, stored uncompressed."""
        data = os.urandom(10 * MIB)
        info = self.round_trip(data, "random.bin")
        self.assertEqual(info.method, "stored")
        self.assertGreater(info.stored_bytes, info.size)

    def test_random_is_stored(self) -> None:
        """Incompressible data is not deflated: the method is "stored"."""
        info = self.round_trip(os.urandom(200 * 1024))
        self.assertEqual(info.method, "stored")
        self.assertEqual(info.compressed_size, info.size)

    def test_compressible_is_deflated(self) -> None:
        """Compressible data is deflated and takes far less room on disk."""
        data = b"All work and no play makes Jack a dull boy.\n" * 50_000
        info = self.round_trip(data, "jack.txt")
        self.assertEqual(info.method, "deflated")
        self.assertLess(info.stored_bytes, info.size // 20)
        self.assertLess(self.storage.usage(OWNER), info.size // 20)

    def test_small_compressible_is_deflated(self) -> None:
        """A compressible file smaller than the compression sample is deflated too."""
        info = self.round_trip(b"a" * 1000, "a.txt")
        self.assertEqual(info.method, "deflated")

    def test_compressible_then_random(self) -> None:
        """A file whose start compresses but whose rest does not still round-trips."""
        self.round_trip(b"z" * (100 * 1024) + os.urandom(300 * 1024))

    def test_non_ascii_names(self) -> None:
        """Non-ASCII filenames round-trip exactly, without normalisation."""
        for name in ["résumé 履歴書.pdf", "📁🔒 notes 😀.txt", "e\u0301", "\u00e9", "Ωμέγα"]:
            info = self.round_trip(name.encode("utf-8") * 3, name)
            self.assertEqual(self.storage.info(OWNER, info.id).filename, name)

    def test_writer_odd_pieces(self) -> None:
        """Data written through writer() in odd-sized pieces is read back whole."""
        for data in [os.urandom(300_001), b"0123456789abcdef" * 20_011]:
            writer = self.storage.writer(OWNER, "pieces.bin")
            position = 0
            sizes = [1, 7, 0, 4093, 16383, 16385, 65537, 3, 100_000]
            while position < len(data):
                size = sizes[position % len(sizes)]
                writer.write(data[position : position + size])
                position += size
            self.assertEqual(writer.size, len(data))
            info = writer.commit()
            self.assertEqual(self.storage.read_all(OWNER, info.id)[1], data)

    def test_reader_chunks(self) -> None:
        """A reader used chunk by chunk returns the file, then b"" for good."""
        data = os.urandom(3 * MIB + 5)
        info = self.storage.store(OWNER, "chunks.bin", data)
        reader = self.storage.open(OWNER, info.id)
        try:
            pieces = []
            while piece := reader.read(64 * 1024):
                pieces.append(piece)
            self.assertEqual(reader.read(), b"")
        finally:
            reader.close()
        self.assertEqual(b"".join(pieces), data)


class ReadSizeTests(_StorageMixin):
    """read(size) keeps each returned piece near the size asked for."""

    def read_sizes(self, info: ArchiveInfo, size: int) -> list[int]:
        reader = self.storage.open(OWNER, info.id)
        try:
            sizes = []
            while piece := reader.read(size):
                sizes.append(len(piece))
            return sizes
        finally:
            reader.close()

    def test_deflated_bounded(self) -> None:
        """Highly compressible data is inflated in pieces of at most the size asked
        for, not all at once (memory stays flat on download)."""
        writer = self.storage.writer(OWNER, "zeros.bin")
        for _ in range(32):
            writer.write(bytes(MIB))
        info = writer.commit()
        self.assertEqual(info.method, "deflated")
        sizes = self.read_sizes(info, 64 * 1024)
        self.assertEqual(sum(sizes), 32 * MIB)
        self.assertLessEqual(max(sizes), 64 * 1024)

    def test_stored_bounded(self) -> None:
        """Stored data is returned in pieces of at most about the size asked for."""
        info = self.storage.store(OWNER, "random.bin", os.urandom(2 * MIB))
        sizes = self.read_sizes(info, 4096)
        self.assertEqual(sum(sizes), 2 * MIB)
        self.assertLessEqual(max(sizes), 16 * 1024)


# -- the format is the documented one -------------------------------------------


class FormatTests(_StorageMixin):
    """The decrypted body is a standard ZIP archive, decodable per FORMAT.md."""

    def check_zip(self, data: bytes, filename: str) -> None:
        info = self.storage.store(OWNER, filename, data)
        key_file = self.data_dir / "master.key"
        key_file.write_bytes(self.keyring.to_json())
        metadata, member_name, content = recover_archive(self.data_dir, key_file, OWNER, info.id)
        self.assertEqual(member_name, filename)
        self.assertTrue(content == data)
        self.assertEqual(
            metadata,
            {
                "filename": filename,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "created_at": info.created_at,
                "created_ns": info.created_ns,
                "method": info.method,
                "data_offset": info.data_offset,
                "compressed_size": info.compressed_size,
                "stored_bytes": info.stored_bytes,
            },
        )
        zip_bytes = decrypt_zip(self.data_dir, self.keyring, OWNER, info.id)
        # The framing FORMAT.md §5 describes.
        self.assertEqual(info.stored_bytes, HEADER_BYTES + len(zip_bytes) + 16 * (len(zip_bytes) // 16384 + 1))
        with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
            self.assertIsNone(archive.testzip())
            (member,) = archive.infolist()
            self.assertEqual(member.file_size, len(data))
            self.assertEqual(member.compress_size, info.compressed_size)
            expected_type = zipfile.ZIP_DEFLATED if info.method == "deflated" else zipfile.ZIP_STORED
            self.assertEqual(member.compress_type, expected_type)
            self.assertTrue(member.flag_bits & 0x08, "no data descriptor")
            self.assertEqual(member.external_attr >> 16, 0o600)
        self.assertEqual(info.data_offset, 30 + len(filename.encode("utf-8")) + 20)
        member_data = zip_bytes[info.data_offset : info.data_offset + info.compressed_size]
        if info.method == "deflated":
            member_data = zlib.decompress(member_data, -zlib.MAX_WBITS)
        self.assertTrue(member_data == data)

    def test_stored_zip(self) -> None:
        """Random data decrypts to a ZIP holding one stored member with the name and bytes."""
        self.check_zip(os.urandom(100_000), "résumé 履歴書.pdf")

    def test_deflated_zip(self) -> None:
        """Compressible data decrypts to a ZIP holding one deflated member."""
        self.check_zip(b"compress me " * 30_000, "big.txt")

    def test_empty_zip(self) -> None:
        """An empty file decrypts to a ZIP holding one empty member."""
        self.check_zip(b"", "📄")

    def test_meta_document(self) -> None:
        """The archive's index row holds exactly the documented fields in its
        document (ASCII JSON), its plain columns agree with the sealed
        metadata, and every file in the data directory is private."""
        info = self.storage.store(OWNER, "x.txt", b"x")
        record = self.storage.metadata.get_archive(OWNER, info.id)
        assert record is not None
        self.assertTrue(record.document.isascii())
        meta = json.loads(record.document)
        self.assertEqual(set(meta), {"format", "version", "key_id", "wrapped_key", "metadata"})
        self.assertEqual((meta["format"], meta["version"]), ("securevault-archive", 1))
        self.assertEqual(meta["key_id"], self.keyring.current_id)
        self.assertEqual(len(base64.b64decode(meta["wrapped_key"])), 12 + 32 + 16)
        self.assertEqual(
            (record.owner_id, record.archive_id, record.created_ns, record.stored_bytes, record.key_id),
            (OWNER, info.id, info.created_ns, info.stored_bytes, meta["key_id"]),
        )
        self.assertEqual(read_document(self.data_dir, OWNER, info.id), meta)
        self.assertEqual(self.owner_files(), sorted([f"{info.id}.body", f"{info.id}.meta"]))
        self.assertEqual(self.owner_dir().stat().st_mode & 0o777, 0o700)
        files = [path for path in self.data_dir.rglob("*") if path.is_file()]
        self.assertIn(self.data_dir / "vault.db", files)
        self.assertIn(self.body_path(info.id), files)
        for path in files:
            self.assertEqual(path.stat().st_mode & 0o077, 0, path)

    def test_nothing_names_the_file(self) -> None:
        """No byte on disk and no path reveals a file's name or content."""
        name, content = "secret-name.txt", b"secret content" * 100
        info = self.storage.store(OWNER, name, content)
        self.assertEqual(self.storage.read_all(OWNER, info.id)[1], content)
        needles = [name.encode(), b"secret content", b"secret-name", name.encode("utf-16-le")]
        paths = [p for p in self.data_dir.rglob("*")]
        self.assertTrue(paths)
        for path in paths:
            self.assertNotIn("secret", str(path))
            if path.is_file():
                raw = path.read_bytes()
                for needle in needles:
                    self.assertNotIn(needle, raw, f"{needle!r} in {path}")


class FormatDocumentTests(_StorageMixin):
    """docs/FORMAT.md's recovery snippet works and matches the test's decoder."""

    def snippet(self) -> str:
        text = FORMAT_DOCUMENT.read_text(encoding="utf-8")
        blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
        self.assertEqual(len(blocks), 1)
        return str(blocks[0])

    def test_snippet_recovers(self) -> None:
        """The snippet in FORMAT.md, run as is, recovers an archive's name and
        bytes: while the vault has the database open (the row still in
        SQLite's write-ahead log, as after a crash) and after it closed it;
        an archive not in the index is a LookupError."""
        data = os.urandom(40_000) + b"tail" * 10_000
        info = self.storage.store(OWNER, "résumé 履歴書.pdf", data)
        key_file = self.data_dir / "master.key"
        key_file.write_bytes(self.keyring.to_json())
        namespace: dict[str, Any] = {}
        exec(compile(self.snippet(), str(FORMAT_DOCUMENT), "exec"), namespace)
        for state in ("open", "closed"):
            if state == "closed":
                self.storage.metadata.close()
            metadata, member_name, content = namespace["recover_archive"](self.data_dir, key_file, OWNER, info.id)
            self.assertEqual(member_name, "résumé 履歴書.pdf", state)
            self.assertEqual(metadata["sha256"], info.sha256, state)
            self.assertTrue(content == data, state)
        self.assertRaises(LookupError, namespace["recover_archive"], self.data_dir, key_file, OTHER_OWNER, info.id)

    def test_snippet_is_the_tests_decoder(self) -> None:
        """The snippet's function bodies are the ones this test module uses (no drift)."""
        snippet = self.snippet()
        source = Path(__file__).read_text(encoding="utf-8")
        for name in ("derive", "context", "read_document", "recover_archive"):
            self.assertEqual(function_body(snippet, name), function_body(source, name), name)


# -- tampering -----------------------------------------------------------------


class TamperingTests(_StorageMixin):
    """Any change to an archive on disk raises IntegrityError and never yields
    bytes that differ from the original."""

    def setUp(self) -> None:
        super().setUp()
        self.data = os.urandom(100 * 1024)
        self.info = self.storage.store(OWNER, "victim.bin", self.data)
        self.body = self.body_path(self.info.id).read_bytes()
        self.meta = self.document(self.info.id)

    def assert_fails_closed(
        self,
        storage: SecureFileStorage | None = None,
        owner_id: str = OWNER,
        archive_id: str | None = None,
        original: bytes | None = None,
    ) -> None:
        """read_all and verify raise IntegrityError; a chunked reader only ever
        returns a prefix of the original before raising."""
        storage = storage or self.storage
        archive_id = archive_id or self.info.id
        original = self.data if original is None else original
        self.assertRaises(IntegrityError, storage.read_all, owner_id, archive_id)
        self.assertRaises(IntegrityError, storage.verify, owner_id, archive_id)
        returned = b""
        with self.assertRaises(IntegrityError):
            reader = storage.open(owner_id, archive_id)
            try:
                while piece := reader.read(4096):
                    returned += piece
            finally:
                reader.close()
        self.assertTrue(original.startswith(returned), "reader returned bytes not in the original")

    def write_body(self, body: bytes) -> None:
        self.body_path(self.info.id).write_bytes(body)

    def test_untouched(self) -> None:
        """The fixture itself reads back (so the failures below are the tampering's)."""
        self.assertEqual(self.storage.read_all(OWNER, self.info.id)[1], self.data)
        self.assertGreater(len(self.body), HEADER_BYTES + 6 * CHUNK_BYTES)

    def test_bit_flips(self) -> None:
        """Flipping one bit in the header, a chunk, a tag or the last byte is detected."""
        size = len(self.body)
        positions = [
            0,
            1,
            31,
            HEADER_BYTES - 1,
            HEADER_BYTES,
            HEADER_BYTES + 16384 + 3,
            HEADER_BYTES + CHUNK_BYTES,
            size // 2,
            size - 17,
            size - 16,
            size - 1,
        ]
        for position in positions:
            for bit in (0x01, 0x80):
                tampered = bytearray(self.body)
                tampered[position] ^= bit
                self.write_body(bytes(tampered))
                self.assert_fails_closed()

    def test_truncation(self) -> None:
        """A body cut short anywhere, chunk boundaries included, is detected."""
        cuts = [
            len(self.body) - 1,
            len(self.body) - 16,
            HEADER_BYTES + 3 * CHUNK_BYTES,
            HEADER_BYTES + CHUNK_BYTES,
            HEADER_BYTES + CHUNK_BYTES - 1,
            HEADER_BYTES + 1,
            HEADER_BYTES,
            10,
            0,
        ]
        for cut in cuts:
            self.write_body(self.body[:cut])
            self.assert_fails_closed()

    def test_appended(self) -> None:
        """Bytes appended after the last chunk are detected."""
        for extra in (b"\x00", os.urandom(16), os.urandom(CHUNK_BYTES)):
            self.write_body(self.body + extra)
            self.assert_fails_closed()

    def test_chunks_swapped(self) -> None:
        """Swapping two ciphertext chunks is detected."""
        first = HEADER_BYTES + CHUNK_BYTES
        second = first + CHUNK_BYTES
        third = second + CHUNK_BYTES
        self.write_body(self.body[:first] + self.body[second:third] + self.body[first:second] + self.body[third:])
        self.assert_fails_closed()

    def test_chunk_duplicated(self) -> None:
        """Replaying a chunk in place of another is detected."""
        first = HEADER_BYTES + CHUNK_BYTES
        self.write_body(self.body[:first] + self.body[HEADER_BYTES:first] + self.body[first + CHUNK_BYTES :])
        self.assert_fails_closed()

    def test_bodies_swapped(self) -> None:
        """Two archives of one owner with their .body files swapped both fail."""
        other_data = os.urandom(100 * 1024)
        other = self.storage.store(OWNER, "other.bin", other_data)
        other_body = self.body_path(other.id).read_bytes()
        self.body_path(other.id).write_bytes(self.body)
        self.write_body(other_body)
        self.assert_fails_closed()
        self.assert_fails_closed(archive_id=other.id, original=other_data)

    def test_body_from_other_owner(self) -> None:
        """Another owner's .body in place of this one's is detected."""
        other = self.storage.store(OTHER_OWNER, "victim.bin", self.data)
        self.write_body(self.body_path(other.id, OTHER_OWNER).read_bytes())
        self.assert_fails_closed()

    def test_archive_moved_to_other_owner(self) -> None:
        """An archive (index row and body) copied to another owner does not
        open there: it is bound to its owner."""
        self.storage.store(OTHER_OWNER, "mine.bin", b"bob's")
        record = self.storage.metadata.get_archive(OWNER, self.info.id)
        assert record is not None
        self.storage.metadata.put_archive(dataclasses.replace(record, owner_id=OTHER_OWNER))
        (self.owner_dir(OTHER_OWNER) / f"{self.info.id}.body").write_bytes(self.body)
        self.assert_fails_closed(owner_id=OTHER_OWNER)
        self.assertEqual([i.filename for i in self.storage.list(OTHER_OWNER)], ["mine.bin"])
        self.assertEqual(self.storage.read_all(OWNER, self.info.id)[1], self.data)

    def replace_meta_field(self, field: str, value: Any) -> None:
        """Rewrite one field of the archive's row document, as someone with
        write access to the metadata store could."""
        document = json.loads(self.meta)
        document[field] = value
        self.set_document(self.info.id, json.dumps(document))

    def test_wrapped_key_replaced(self) -> None:
        """A document whose wrapped key is another archive's, or random, is detected."""
        other = self.storage.store(OWNER, "other.bin", b"other")
        other_meta = json.loads(self.document(other.id))
        wrapped = base64.b64decode(json.loads(self.meta)["wrapped_key"])
        for value in [
            other_meta["wrapped_key"],
            base64.b64encode(os.urandom(60)).decode(),
            base64.b64encode(wrapped[:-1]).decode(),
            "",
            "not base64!",
        ]:
            self.replace_meta_field("wrapped_key", value)
            self.assert_fails_closed()
            self.assertRaises(IntegrityError, self.storage.info, OWNER, self.info.id)

    def test_metadata_flipped(self) -> None:
        """Flipping any one byte of the sealed metadata is detected."""
        sealed = base64.b64decode(json.loads(self.meta)["metadata"])
        for position in (0, 11, 12, len(sealed) // 2, len(sealed) - 1):
            tampered = bytearray(sealed)
            tampered[position] ^= 0x01
            self.replace_meta_field("metadata", base64.b64encode(bytes(tampered)).decode())
            self.assert_fails_closed()

    def test_metadata_from_other_archive(self) -> None:
        """Another archive's sealed metadata in this document is detected."""
        other = self.storage.store(OWNER, "other.bin", b"other")
        self.replace_meta_field("metadata", json.loads(self.document(other.id))["metadata"])
        self.assert_fails_closed()

    def test_document_from_other_archive(self) -> None:
        """Another archive's whole (authentic) document in this row is detected."""
        other = self.storage.store(OWNER, "other.bin", b"other")
        self.set_document(self.info.id, self.document(other.id))
        self.assert_fails_closed()
        self.assertRaises(IntegrityError, self.storage.info, OWNER, self.info.id)
        self.assertEqual([info.id for info in self.storage.list(OWNER)], [other.id])

    def test_meta_garbage(self) -> None:
        """A row document that is not the documented JSON is an integrity error."""
        wrong_version = self.meta.replace('"version": 1', '"version": 2')
        self.assertNotEqual(wrong_version, self.meta)
        for raw in ["", "{", "[]", "null", '"x"', "\x00not json", self.meta[:-1], wrong_version]:
            self.set_document(self.info.id, raw)
            self.assert_fails_closed()
            self.assertEqual(self.storage.list(OWNER), [])

    def test_document_not_text(self) -> None:
        """A document column holding a BLOB or a number instead of text (SQLite
        does not enforce column types) is an integrity error too."""
        for value in [b"\xff\xfe", b"\x00", 7, 1.5]:
            database = sqlite3.connect(self.data_dir / "vault.db")
            try:
                with database:
                    database.execute(
                        "UPDATE sv_archives SET document = ? WHERE owner_id = ? AND archive_id = ?",
                        (value, OWNER, self.info.id),
                    )
            finally:
                database.close()
            self.assert_fails_closed()

    def test_meta_without_body(self) -> None:
        """A committed index row whose body is gone is an integrity error."""
        self.body_path(self.info.id).unlink()
        self.assert_fails_closed()

    def test_wrong_master_key(self) -> None:
        """Under a fresh keyring, or the same key id with another key, nothing opens."""
        fresh = SecureFileStorage(self.data_dir, generate_keyring())
        self.assert_fails_closed(storage=fresh)
        same_id = Keyring(self.keyring.current_id, {self.keyring.current_id: os.urandom(32)})
        self.assert_fails_closed(storage=SecureFileStorage(self.data_dir, same_id))
        self.assertEqual(fresh.list(OWNER), [])

    def test_list_skips_bad_metadata(self) -> None:
        """list() leaves out an archive whose metadata fails, and keeps the
        others, even when it listed the archive before it was tampered with."""
        good = self.storage.store(OWNER, "good.bin", b"good")
        self.assertEqual([info.id for info in self.storage.list(OWNER)], [good.id, self.info.id])
        self.replace_meta_field("wrapped_key", base64.b64encode(os.urandom(60)).decode())
        self.assertEqual([info.id for info in self.storage.list(OWNER)], [good.id])
        self.assertEqual(self.storage.find_newest(OWNER, "good.bin"), good)
        self.assertRaises(ArchiveNotFound, self.storage.find_newest, OWNER, "victim.bin")


# -- not found ---------------------------------------------------------------------


class NotFoundTests(_StorageMixin):
    """Ids that name no archive of the caller's are all simply "not found"."""

    def test_unknown_malformed_and_foreign(self) -> None:
        """Unknown, malformed and other owners' ids raise ArchiveNotFound everywhere."""
        mine = self.storage.store(OWNER, "mine.txt", b"mine")
        theirs = self.storage.store(OTHER_OWNER, "theirs.txt", b"theirs")
        ids = [
            "0" * 32,
            "../x",
            "",
            mine.id.upper(),
            mine.id + "0",
            mine.id[:-1],
            "../" + mine.id,
            f"{mine.id}.meta",
            theirs.id,
            f"../{OTHER_OWNER}/{theirs.id}",
            "\x00",
        ]
        operations: list[Callable[[str, str], object]] = [
            self.storage.info,
            self.storage.open,
            self.storage.read_all,
            self.storage.verify,
            self.storage.delete,
        ]
        for archive_id in ids:
            for operation in operations:
                self.assertRaises(ArchiveNotFound, operation, OWNER, archive_id)
        self.assertEqual(self.storage.read_all(OTHER_OWNER, theirs.id)[1], b"theirs")
        self.assertEqual(self.storage.read_all(OWNER, mine.id)[1], b"mine")

    def test_unknown_owner(self) -> None:
        """An owner who never stored anything has no archives, usage 0, and finds nothing."""
        self.assertEqual(self.storage.list("nobody"), [])
        self.assertEqual(self.storage.usage("nobody"), 0)
        self.assertRaises(ArchiveNotFound, self.storage.read_all, "nobody", "0" * 32)
        self.assertRaises(ArchiveNotFound, self.storage.find_newest, "nobody", "x")

    def test_find_newest_unknown(self) -> None:
        """find_newest of a name never stored raises ArchiveNotFound."""
        self.storage.store(OWNER, "a.txt", b"a")
        self.assertRaises(ArchiveNotFound, self.storage.find_newest, OWNER, "b.txt")
        self.assertRaises(ArchiveNotFound, self.storage.find_newest, OWNER, "A.txt")


# -- atomicity and recovery -----------------------------------------------------


class AtomicityTests(_StorageMixin):
    """Nothing is visible or left behind unless commit() returned."""

    def test_abort_leaves_nothing(self) -> None:
        """writer.abort(), before or after data, leaves no file in the owner's directory."""
        for data in [b"", b"small", os.urandom(300 * 1024)]:
            writer = self.storage.writer(OWNER, "aborted.bin")
            writer.write(data)
            writer.abort()
            writer.abort()
            self.assertEqual(self.owner_files(), [])
            self.assertRaises(StorageError, writer.write, b"more")
            self.assertRaises(StorageError, writer.commit)
        self.assertEqual(self.storage.list(OWNER), [])

    def test_exception_mid_write(self) -> None:
        """A write that raises (before or after the ZIP member started) leaves nothing."""
        for before in [b"", os.urandom(200 * 1024)]:
            writer = self.storage.writer(OWNER, "broken.bin")
            writer.write(before)
            self.assertRaises(TypeError, writer.write, "not bytes")
            self.assertEqual(self.owner_files(), [])
            self.assertRaises(StorageError, writer.commit)
        self.assertEqual(self.storage.list(OWNER), [])

    def test_aborted_writer_is_inert(self) -> None:
        """Once aborted, a writer never writes again, even when garbage-collected
        after another upload has reused its file descriptor."""
        # The ZIP member's plaintext ends 4 bytes short of a 16 KiB chunk, so the
        # data descriptor written by a late finalizer would complete a chunk.
        aborted = self.storage.writer(OWNER, "a.bin")
        aborted.write(os.urandom(16384 * 5 + 16325))
        aborted.abort()
        writer = self.storage.writer(OWNER, "b.bin")
        del aborted
        gc.collect()
        writer.write(b"hello")
        info = writer.commit()
        self.assertEqual(self.storage.read_all(OWNER, info.id)[1], b"hello")

    def test_uncommitted_is_invisible(self) -> None:
        """An uncommitted writer's data is not listed, not counted, not found."""
        writer = self.storage.writer(OWNER, "pending.bin")
        writer.write(os.urandom(200 * 1024))
        self.assertEqual(self.storage.list(OWNER), [])
        self.assertEqual(self.storage.usage(OWNER), 0)
        self.assertRaises(ArchiveNotFound, self.storage.read_all, OWNER, writer.archive_id)
        self.assertRaises(ArchiveNotFound, self.storage.find_newest, OWNER, "pending.bin")
        info = writer.commit()
        self.assertEqual([i.id for i in self.storage.list(OWNER)], [info.id])
        self.assertEqual(self.owner_files(), sorted([f"{info.id}.body", f"{info.id}.meta"]))

    def test_commit_twice(self) -> None:
        """A writer commits once; a second commit raises and keeps the first archive."""
        writer = self.storage.writer(OWNER, "once.bin")
        writer.write(b"once")
        info = writer.commit()
        self.assertRaises(StorageError, writer.commit)
        self.assertRaises(StorageError, writer.write, b"again")
        self.assertEqual(self.storage.read_all(OWNER, info.id)[1], b"once")

    def test_recover(self) -> None:
        """recover() removes blob temp files and blobs without an index row,
        and keeps committed archives (body and row) untouched."""
        self.assertEqual(self.storage.recover(), 0)
        kept = self.storage.store(OWNER, "kept.txt", b"kept" * 1000)
        kept_other = self.storage.store(OTHER_OWNER, "kept.txt", b"other")
        orphan = self.storage.store(OWNER, "orphan.txt", b"orphan")
        # A crash between the blob's rename and the row's commit (or during a
        # delete, after the row went): a body the index does not name.
        self.storage.metadata.delete_archive(OWNER, orphan.id)
        orphan_other = self.storage.store(OTHER_OWNER, "orphan.txt", b"orphan")
        self.storage.metadata.delete_archive(OTHER_OWNER, orphan_other.id)
        crashed = self.storage.writer(OWNER, "crashed.bin")  # a crash mid-upload
        crashed.write(os.urandom(100 * 1024))
        other_temp = self.owner_dir(OTHER_OWNER) / f".{'f' * 32}.body.tmp"
        other_temp.write_bytes(b"junk")
        self.assertEqual(len([n for n in self.owner_files() if n.endswith(".tmp")]), 1)
        self.assertIn(f"{orphan.id}.body", self.owner_files())
        self.assertEqual(self.storage.orphans(None), [(OWNER, orphan.id), (OTHER_OWNER, orphan_other.id)])

        self.assertEqual(self.storage.recover(), 4)

        self.assertEqual(self.owner_files(), sorted([f"{kept.id}.body", f"{kept.id}.meta"]))
        self.assertEqual(self.owner_files(OTHER_OWNER), sorted([f"{kept_other.id}.body", f"{kept_other.id}.meta"]))
        self.assertEqual(self.storage.list(OWNER), [kept])
        self.assertEqual(self.storage.read_all(OWNER, kept.id)[1], b"kept" * 1000)
        self.assertEqual(self.storage.read_all(OTHER_OWNER, kept_other.id)[1], b"other")
        self.assertEqual(self.storage.recover(), 0)
        crashed.abort()

    def test_orphan_grace(self) -> None:
        """With a grace period, the orphan sweep leaves a fresh blob without a
        row alone (another node may be about to commit its row) and removes
        it once it is older; a committed archive is never an orphan."""
        old = self.storage.store(OWNER, "old.txt", b"old")
        orphan = self.storage.store(OWNER, "orphan.txt", b"orphan")
        self.storage.metadata.delete_archive(OWNER, orphan.id)
        self.assertEqual(self.storage.orphans(3600), [])
        self.assertEqual(self.storage.sweep_orphans(3600), 0)
        self.assertIn(f"{orphan.id}.body", self.owner_files())
        two_hours_ago = self.body_path(orphan.id).stat().st_mtime - 7200
        for archive_id in (old.id, orphan.id):
            os.utime(self.body_path(archive_id), (two_hours_ago, two_hours_ago))
        self.assertEqual(self.storage.orphans(3600), [(OWNER, orphan.id)])
        self.assertEqual(self.storage.sweep_orphans(3600), 1)
        self.assertEqual(self.owner_files(), sorted([f"{old.id}.body", f"{old.id}.meta"]))
        self.assertEqual(self.storage.read_all(OWNER, old.id)[1], b"old")

    def test_recover_empty(self) -> None:
        """recover() on a data directory without archives does nothing."""
        self.assertEqual(SecureFileStorage(self.make_dir() / "absent", self.keyring).recover(), 0)
        self.assertEqual(self.storage.recover(), 0)

    def test_quota_exceeded_while_writing(self) -> None:
        """A writer with a small max_bytes raises QuotaExceeded and leaves nothing."""
        writer = self.storage.writer(OWNER, "big.bin", max_bytes=1000)
        data = os.urandom(300 * 1024)
        with self.assertRaises(QuotaExceeded):
            for start in range(0, len(data), 10_000):
                writer.write(data[start : start + 10_000])
        self.assertEqual(self.owner_files(), [])
        self.assertRaises(StorageError, writer.commit)
        self.assertRaises(QuotaExceeded, self.storage.store, OWNER, "big.bin", data, max_bytes=100 * 1024)
        self.assertEqual(self.owner_files(), [])
        self.assertEqual(self.storage.list(OWNER), [])

    def test_quota_checked_at_commit(self) -> None:
        """An upload whose archive would exceed max_bytes raises QuotaExceeded and
        leaves nothing, whether it is smaller than the compression sample or
        only its last chunk and ZIP trailer cross the limit."""
        self.assertRaises(QuotaExceeded, self.storage.store, OWNER, "small.bin", os.urandom(1000), max_bytes=100)
        self.assertEqual(self.owner_files(), [])
        self.assertRaises(QuotaExceeded, self.storage.store, OWNER, "edge.bin", os.urandom(69_800), max_bytes=70_000)
        self.assertEqual(self.owner_files(), [])

    def test_quota_within(self) -> None:
        """An upload whose archive fits in max_bytes is stored and within it."""
        data = os.urandom(200 * 1024)
        info = self.storage.store(OWNER, "fits.bin", data, max_bytes=len(data) + 4096)
        self.assertLessEqual(info.stored_bytes, len(data) + 4096)

    def test_quota_holds_for_parallel_uploads(self) -> None:
        """Six 100 kB uploads opened while the quota was still empty, then
        streamed and committed from parallel threads, store no more than the
        quota in all: under 250 kB exactly two are kept, the other four raise
        QuotaExceeded and leave no blob behind."""
        quota = 250_000
        writers = [self.storage.writer(OWNER, f"f{n}.bin", quota=quota) for n in range(6)]
        barrier = threading.Barrier(len(writers))
        outcomes: list[ArchiveInfo | str] = []
        lock = threading.Lock()

        def upload(n: int) -> None:
            try:
                writers[n].write(os.urandom(100_000))
                barrier.wait(10)
                outcome: ArchiveInfo | str = writers[n].commit()
            except QuotaExceeded:
                outcome = "over quota"
            except BaseException as error:
                outcome = repr(error)
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=upload, args=(n,)) for n in range(len(writers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        kept = [outcome for outcome in outcomes if isinstance(outcome, ArchiveInfo)]
        self.assertEqual(sorted(o for o in outcomes if isinstance(o, str)), ["over quota"] * 4)
        self.assertEqual(len(kept), 2)
        self.assertLessEqual(self.storage.usage(OWNER), quota)
        self.assertEqual(self.storage.usage(OWNER), sum(info.stored_bytes for info in kept))
        self.assertEqual(
            self.owner_files(), sorted(f"{info.id}{suffix}" for info in kept for suffix in (".body", ".meta"))
        )
        self.assertEqual(self.storage.orphans(None), [])

    def test_quota_cuts_off_an_upload_that_cannot_fit(self) -> None:
        """With C{quota}, an upload larger than what is left when it opens is
        refused while it streams, before its commit, and leaves nothing."""
        kept = self.storage.store(OWNER, "kept.bin", os.urandom(100_000), quota=150_000)
        writer = self.storage.writer(OWNER, "big.bin", quota=150_000)
        data = os.urandom(300_000)
        with self.assertRaises(QuotaExceeded):
            for start in range(0, len(data), 10_000):
                writer.write(data[start : start + 10_000])
        self.assertRaises(StorageError, writer.commit)
        self.assertEqual(self.owner_files(), [f"{kept.id}.body", f"{kept.id}.meta"])


# -- operations -------------------------------------------------------------------


class OperationTests(_StorageMixin):
    """delete, list, find_newest, usage and rewrap do what the API needs."""

    def test_delete(self) -> None:
        """delete removes the body and the index row; the archive is then not
        found, others stay."""
        gone = self.storage.store(OWNER, "gone.txt", b"gone")
        stays = self.storage.store(OWNER, "stays.txt", b"stays")
        self.storage.delete(OWNER, gone.id)
        self.assertFalse(self.body_path(gone.id).exists())
        self.assertIsNone(self.storage.metadata.get_archive(OWNER, gone.id))
        self.assertRaises(ArchiveNotFound, self.storage.info, OWNER, gone.id)
        self.assertRaises(ArchiveNotFound, self.storage.delete, OWNER, gone.id)
        self.assertEqual(self.storage.list(OWNER), [stays])
        self.assertEqual(self.owner_files(), sorted([f"{stays.id}.body", f"{stays.id}.meta"]))

    def test_delete_other_owner(self) -> None:
        """An owner cannot delete another owner's archive."""
        theirs = self.storage.store(OTHER_OWNER, "theirs.txt", b"theirs")
        self.assertRaises(ArchiveNotFound, self.storage.delete, OWNER, theirs.id)
        self.assertEqual(self.storage.read_all(OTHER_OWNER, theirs.id)[1], b"theirs")

    def test_list_newest_first(self) -> None:
        """list() returns the owner's archives newest first, and only theirs."""
        stored = [self.storage.store(OWNER, f"f{n}.txt", b"%d" % n) for n in range(5)]
        self.storage.store(OTHER_OWNER, "theirs.txt", b"theirs")
        listed = self.storage.list(OWNER)
        self.assertEqual(listed, list(reversed(stored)))
        times = [info.created_ns for info in listed]
        self.assertEqual(times, sorted(times, reverse=True))
        self.assertEqual(listed[-1].created_at, "2026-05-28T20:26:40Z")

    def test_find_newest(self) -> None:
        """find_newest returns the newest archive with exactly that name."""
        first = self.storage.store(OWNER, "report.pdf", b"v1")
        self.storage.store(OWNER, "other.pdf", b"x")
        second = self.storage.store(OWNER, "report.pdf", b"v2")
        self.storage.store(OWNER, "Report.pdf", b"v3")
        self.storage.store(OTHER_OWNER, "report.pdf", b"theirs")
        self.assertEqual(self.storage.find_newest(OWNER, "report.pdf"), second)
        self.storage.delete(OWNER, second.id)
        self.assertEqual(self.storage.find_newest(OWNER, "report.pdf"), first)

    def test_usage(self) -> None:
        """usage() is the sum of the owner's body sizes and grows with each store."""
        self.assertEqual(self.storage.usage(OWNER), 0)
        total = 0
        for data in [b"", os.urandom(10_000), os.urandom(100_000)]:
            info = self.storage.store(OWNER, "u.bin", data)
            total += info.stored_bytes
            self.assertEqual(self.storage.usage(OWNER), total)
        self.storage.store(OTHER_OWNER, "u.bin", os.urandom(1000))
        self.assertEqual(self.storage.usage(OWNER), total)
        self.storage.delete(OWNER, info.id)
        self.assertEqual(self.storage.usage(OWNER), total - info.stored_bytes)

    def test_rewrap_missing(self) -> None:
        """rewrap of an archive that is not there (say, deleted during a rotation)
        raises ArchiveNotFound, like every other operation."""
        rotating = Keyring("newkey00", {**self.keyring.keys, "newkey00": os.urandom(32)})
        self.assertRaises(ArchiveNotFound, self.storage.rewrap, OWNER, "0" * 32, rotating)

    def test_rewrap(self) -> None:
        """rewrap moves an archive to a new master key without touching its body;
        then only the new key opens it."""
        data = os.urandom(50_000)
        info = self.storage.store(OWNER, "rotate.bin", data)
        body_before = self.body_path(info.id).read_bytes()
        old_id, old_key = self.keyring.current_id, self.keyring.current_key
        new_id, new_key = new_key_id(), os.urandom(32)
        rotating = Keyring(new_id, {old_id: old_key, new_id: new_key})
        during = SecureFileStorage(self.data_dir, rotating)
        self.assertTrue(during.rewrap(OWNER, info.id, rotating))
        self.assertFalse(during.rewrap(OWNER, info.id, rotating))
        self.assertEqual(json.loads(self.document(info.id))["key_id"], new_id)
        record = self.storage.metadata.get_archive(OWNER, info.id)
        assert record is not None
        self.assertEqual(record.key_id, new_id)
        self.assertEqual(self.body_path(info.id).read_bytes(), body_before)
        after = SecureFileStorage(self.data_dir, Keyring(new_id, {new_id: new_key}))
        read_info, content = after.read_all(OWNER, info.id)
        self.assertEqual(read_info, info)
        self.assertEqual(content, data)
        self.assertRaises(IntegrityError, self.storage.read_all, OWNER, info.id)
        self.assertEqual([n for n in self.owner_files() if n.endswith(".tmp")], [])


# -- filenames ----------------------------------------------------------------------


class CheckFilenameTests(SyncTestCase):
    """check_filename enforces API.md's filename rule, nothing more."""

    def test_rejects(self) -> None:
        """Empty, dot names, separators, control characters and >255 bytes are refused."""
        for name in [
            "",
            ".",
            "..",
            "a/b",
            "/",
            "a\\b",
            "a\x00b",
            "\x1f",
            "\x7f",
            "\x85",
            "\x9f",
            "x\n",
            "\t",
            "é" * 128,
            "a" * 256,
            "\ud800",
        ]:
            self.assertRaises(InvalidFilename, check_filename, name)

    def test_accepts(self) -> None:
        """255-byte names, leading dots, spaces and non-ASCII are allowed."""
        for name in [
            "a" * 255,
            "é" * 127 + "a",
            ".bashrc",
            " x ",
            "...",
            ". ",
            "résumé 履歴書.pdf",
            "😀",
            "\u00a0",
            "\u200b",
            'a:b*?<>|"',
        ]:
            check_filename(name)

    def test_invalid_filename_is_value_error(self) -> None:
        """InvalidFilename is a ValueError and a StorageError."""
        self.assertTrue(issubclass(InvalidFilename, ValueError))
        self.assertTrue(issubclass(InvalidFilename, StorageError))

    def test_writer_checks(self) -> None:
        """writer() and store() refuse a bad filename before creating any file
        (beyond the metadata database the storage opened) or row."""
        data_dir = self.make_dir()
        storage = SecureFileStorage(data_dir, generate_keyring())
        self.addCleanup(storage.metadata.close)
        before = sorted(data_dir.rglob("*"))
        self.assertRaises(InvalidFilename, storage.writer, OWNER, "a/b")
        self.assertRaises(InvalidFilename, storage.store, OWNER, "..", b"x")
        self.assertEqual(sorted(data_dir.rglob("*")), before)
        self.assertFalse((data_dir / "archives").exists())
        self.assertEqual(storage.metadata.list_archives(OWNER), [])

    @given(
        st.one_of(
            st.text(),
            st.text(st.characters(categories=["Cc", "Cs", "Zs", "Lo", "So", "Po"]), max_size=300),
            st.text(st.sampled_from(list("éa./\\\x00\x85\x7f ") + ["😀"]), max_size=260),
        )
    )
    def test_rule(self, name: str) -> None:
        """check_filename accepts a name exactly when it satisfies the rule."""
        try:
            check_filename(name)
        except InvalidFilename:
            self.assertFalse(allowed_filename(name), repr(name))
        else:
            self.assertTrue(allowed_filename(name), repr(name))


class ListingTests(SyncTestCase):
    """Listings come from the archive index each time: they follow uploads and
    deletes by any node on the same stores, and the cache of decrypted
    metadata (per row document) never hides a change to a row."""

    def node(self, data_dir: Path, keyring: Keyring, start_ns: int) -> SecureFileStorage:
        """One node's storage on the shared data directory."""
        storage = SecureFileStorage(data_dir, keyring, clock_ns=fixed_clock(start_ns))
        self.addCleanup(storage.metadata.close)
        return storage

    def test_two_nodes(self) -> None:
        """Two storages on one data directory (two nodes): each one's listing,
        read after it has listed before, shows the other's uploads and
        deletes at once, newest first."""
        data_dir, keyring = self.make_dir(), generate_keyring()
        one = self.node(data_dir, keyring, 1_800_000_000 * 10**9)
        two = self.node(data_dir, keyring, 1_800_000_100 * 10**9)
        self.assertEqual((one.list(OWNER), two.list(OWNER)), ([], []))
        first = one.store(OWNER, "first.txt", b"1")
        self.assertEqual(two.list(OWNER), [first])
        self.assertEqual(two.find_newest(OWNER, "first.txt"), first)
        second = two.store(OWNER, "second.txt", b"2")
        self.assertEqual(one.list(OWNER), [second, first])
        self.assertEqual(two.list(OWNER), [second, first])
        self.assertEqual(one.usage(OWNER), first.stored_bytes + second.stored_bytes)
        one.delete(OWNER, second.id)
        self.assertEqual(two.list(OWNER), [first])
        self.assertRaises(ArchiveNotFound, two.info, OWNER, second.id)
        self.assertRaises(ArchiveNotFound, two.find_newest, OWNER, "second.txt")
        two.delete(OWNER, first.id)
        self.assertEqual(one.list(OWNER), [])
        self.assertRaises(ArchiveNotFound, one.read_all, OWNER, first.id)
        self.assertEqual(one.usage(OWNER), 0)
        self.assertEqual(one.list(OTHER_OWNER), [])

    def worker(self, data_dir: Path, keyring: Keyring, start_ns: int) -> SecureFileStorage:
        """One worker of C{--workers N}: listings cached in memory, under
        the node's shared generation."""
        generation = SharedGeneration.in_data_dir(data_dir)
        assert generation is not None
        self.addCleanup(generation.close)
        storage = SecureFileStorage(
            data_dir, keyring, clock_ns=fixed_clock(start_ns), cache_listings=True, generation=generation
        )
        self.addCleanup(storage.metadata.close)
        return storage

    def test_two_workers_cached_listings(self) -> None:
        """Two workers each caching listings in memory (no I/O on a hit):
        an upload or delete on one makes the other's cached listing stale
        at once, so its next cached_list misses and list reads the index;
        a worker's own change keeps its cache, updated."""
        data_dir, keyring = self.make_dir(), generate_keyring()
        one = self.worker(data_dir, keyring, 1_800_000_000 * 10**9)
        two = self.worker(data_dir, keyring, 1_800_000_100 * 10**9)
        self.assertEqual((one.list(OWNER), two.list(OWNER)), ([], []))
        self.assertEqual((one.cached_list(OWNER), two.cached_list(OWNER)), ([], []))
        first = one.store(OWNER, "first.txt", b"1")
        self.assertEqual(one.cached_list(OWNER), [first])
        self.assertIsNone(two.cached_list(OWNER))
        self.assertEqual(two.list(OWNER), [first])
        self.assertEqual(two.cached_list(OWNER), [first])
        two.delete(OWNER, first.id)
        self.assertEqual(two.cached_list(OWNER), [])
        self.assertIsNone(one.cached_list(OWNER))
        self.assertEqual(one.list(OWNER), [])
        self.assertEqual(one.cached_list(OWNER), [])
        self.assertEqual(two.list(OTHER_OWNER), [])
        one.store(OWNER, "again.txt", b"2")
        self.assertEqual(two.cached_list(OTHER_OWNER), [])  # another owner's slot did not move

    def test_tampered_after_listing(self) -> None:
        """A row document tampered with after the storage listed (and so
        decrypted) it is left out of the next listing, not served from
        memory; restored to the original, it is listed again."""
        data_dir, keyring = self.make_dir(), generate_keyring()
        storage = self.node(data_dir, keyring, 1_800_000_000 * 10**9)
        victim = storage.store(OWNER, "victim.txt", b"victim")
        other = storage.store(OWNER, "other.txt", b"other")
        self.assertEqual(storage.list(OWNER), [other, victim])
        original = archive_document(storage, OWNER, victim.id)
        document = json.loads(original)
        sealed = bytearray(base64.b64decode(document["metadata"]))
        sealed[-1] ^= 0x01
        document["metadata"] = base64.b64encode(bytes(sealed)).decode("ascii")
        # Tampering from outside this storage: another connection to the store.
        attacker = self.node(data_dir, generate_keyring(), 0)
        tampered_documents = [json.dumps(document), archive_document(storage, OWNER, other.id), "{}"]
        for tampered in tampered_documents:
            set_archive_document(attacker, OWNER, victim.id, tampered)
            self.assertEqual(storage.list(OWNER), [other], tampered)
            self.assertRaises(ArchiveNotFound, storage.find_newest, OWNER, "victim.txt")
            self.assertRaises(IntegrityError, storage.info, OWNER, victim.id)
        set_archive_document(attacker, OWNER, victim.id, original)
        self.assertEqual(storage.list(OWNER), [other, victim])

    def test_rotation_by_another_node(self) -> None:
        """A node that listed archives before another node rewrapped them
        lists them again only if its keyring opens the new documents: the
        cached metadata of the old documents is not reused."""
        data_dir = self.make_dir()
        old_keyring = generate_keyring()
        new_id = new_key_id()
        rotating = Keyring(new_id, {**old_keyring.keys, new_id: os.urandom(32)})
        stale = self.node(data_dir, old_keyring, 1_800_000_000 * 10**9)
        following = self.node(data_dir, rotating, 1_800_000_100 * 10**9)
        stored = [stale.store(OWNER, f"f{n}.txt", b"%d" % n) for n in range(3)]
        listed = list(reversed(stored))
        self.assertEqual((stale.list(OWNER), following.list(OWNER)), (listed, listed))
        rotator = self.node(data_dir, rotating, 0)
        for info in stored:
            self.assertTrue(rotator.rewrap(OWNER, info.id, rotating))
        self.assertEqual(following.list(OWNER), listed)
        self.assertEqual(stale.list(OWNER), [])


class ListingCacheTests(SyncTestCase):
    """One node (cache_listings) keeps each owner's listing in memory once
    read, following its own uploads and deletes."""

    def make(self) -> SecureFileStorage:
        storage = SecureFileStorage(self.make_dir(), generate_keyring(), clock_ns=fixed_clock(), cache_listings=True)
        self.addCleanup(storage.metadata.close)
        return storage

    def test_no_cache_by_default(self) -> None:
        storage = SecureFileStorage(self.make_dir(), generate_keyring())
        self.addCleanup(storage.metadata.close)
        storage.list("alice")
        self.assertIsNone(storage.cached_list("alice"))

    def test_cache_follows_store_and_delete(self) -> None:
        storage = self.make()
        self.assertIsNone(storage.cached_list("alice"))
        first = storage.store("alice", "a.txt", b"a")
        self.assertEqual([i.id for i in storage.list("alice")], [first.id])
        self.patch(storage.metadata, "list_archives", lambda owner: self.fail("the store was asked"))
        second = storage.store("alice", "b.txt", b"b")
        self.assertEqual([i.id for i in storage.cached_list("alice") or []], [second.id, first.id])
        storage.delete("alice", first.id)
        self.assertEqual([i.id for i in storage.list("alice")], [second.id])

    def test_upload_during_first_listing(self) -> None:
        """An upload that commits while the first listing is read is not
        lost from the cache: the listing is read again."""
        storage = self.make()
        read = storage.metadata.list_archives
        landed: list[str] = []

        def slow_read(owner: str) -> Any:
            rows = read(owner)
            if not landed:
                landed.append(storage.store("alice", "late.txt", b"late").id)
            return rows

        self.patch(storage.metadata, "list_archives", slow_read)
        self.assertEqual([i.id for i in storage.list("alice")], landed)
        self.assertEqual([i.id for i in storage.cached_list("alice") or []], landed)


class CompressionLevelTests(SyncTestCase):
    """Compressible uploads are deflated at level 1, the fast level."""

    def test_level_one(self) -> None:
        """The deflated member is as large as zlib level 1 makes it, not the
        (smaller, three times slower) default level 6."""
        line = b"2026-11-24T17:30:00Z host app[%d]: GET /api/items?id=%d 200 %dms user=u%d\n"
        data = b"".join(line % (i % 977, i, i % 1000, i % 37) for i in range(60000))
        storage = SecureFileStorage(self.make_dir(), generate_keyring())
        info = storage.store(OWNER, "app.log", data)
        self.assertEqual(info.method, "deflated")
        level_one = zlib.compressobj(1, zlib.DEFLATED, -15)
        expected = len(level_one.compress(data) + level_one.flush())
        level_six = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.assertNotEqual(expected, len(level_six.compress(data) + level_six.flush()))
        self.assertEqual(info.compressed_size, expected)


# -- archives that failed authentication while being read --------------------------


class FakeMonotonic:
    """A monotonic clock that moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class IntegrityMarkTests(SyncTestCase):
    """An archive that failed authentication while being read is refused at
    once by the next open, read_all and authenticate, before any byte,
    until a verify succeeds or the mark lapses."""

    def setUp(self) -> None:
        self.data_dir = self.make_dir()
        self.clock = FakeMonotonic()
        self.storage = SecureFileStorage(self.data_dir, generate_keyring(), monotonic=self.clock)
        self.addCleanup(self.storage.metadata.close)

    def tampered(self, size: int = 2 * MIB, name: str = "victim.bin") -> tuple[ArchiveInfo, bytes, bytes]:
        """A random archive with one byte flipped near its end (far past the
        first block a reader returns); returns its info, content and the
        original body."""
        data = os.urandom(size)
        info = self.storage.store(OWNER, name, data)
        body_path = blob_directory(self.storage, OWNER) / f"{info.id}.body"
        original = body_path.read_bytes()
        tampered = bytearray(original)
        tampered[-(size // 8)] ^= 0x01
        body_path.write_bytes(bytes(tampered))
        return info, data, original

    def restore(self, info: ArchiveInfo, body: bytes) -> None:
        (blob_directory(self.storage, OWNER) / f"{info.id}.body").write_bytes(body)

    def read_until_it_fails(self, info: ArchiveInfo, data: bytes, *, some_bytes_first: bool = True) -> None:
        """Stream the archive as a raw download does: authentic bytes come
        first (a prefix of the file; none for an archive smaller than one
        read block), then IntegrityError."""
        reader = self.storage.open(OWNER, info.id)
        returned = b""
        try:
            with self.assertRaises(IntegrityError):
                while piece := reader.read():
                    returned += piece
        finally:
            reader.close()
        self.assertEqual(bool(returned), some_bytes_first)
        self.assertTrue(data.startswith(returned))

    def assert_refused_at_once(self, info: ArchiveInfo) -> None:
        self.assertRaises(IntegrityError, self.storage.open, OWNER, info.id)
        self.assertRaises(IntegrityError, self.storage.read_all, OWNER, info.id)
        self.assertRaises(IntegrityError, self.storage.authenticate, OWNER, info.id)

    def test_failed_read_refuses_the_next_open(self) -> None:
        """After a read failed mid-stream, open, read_all and authenticate
        raise IntegrityError at once, even though the body was restored
        meanwhile (nothing is read)."""
        info, data, original = self.tampered()
        self.read_until_it_fails(info, data)
        self.restore(info, original)
        self.assert_refused_at_once(info)
        self.assertTrue(self.storage.failed_lately(OWNER, info.id))

    def test_verify_clears_the_mark(self) -> None:
        """A verify reads a marked archive all the same; once it succeeds
        (the body was restored) the archive opens again, while a failing
        verify keeps it marked."""
        info, data, original = self.tampered()
        self.read_until_it_fails(info, data)
        self.assertRaises(IntegrityError, self.storage.verify, OWNER, info.id)
        self.assert_refused_at_once(info)
        self.restore(info, original)
        self.assertEqual(self.storage.verify(OWNER, info.id), info)
        self.assertEqual(self.storage.read_all(OWNER, info.id)[1], data)
        self.assertFalse(self.storage.failed_lately(OWNER, info.id))

    def test_failed_authenticate_marks(self) -> None:
        """authenticate (the JSON download's pass) failing marks the archive too."""
        info, _, original = self.tampered()
        self.assertRaises(IntegrityError, self.storage.authenticate, OWNER, info.id)
        self.restore(info, original)
        self.assert_refused_at_once(info)

    def test_mark_lapses(self) -> None:
        """The mark lasts integrity_mark_seconds: after that, the archive is
        read again (an operator may have restored it without this process
        running verify)."""
        info, data, original = self.tampered()
        self.read_until_it_fails(info, data)
        self.restore(info, original)
        self.clock.now += self.storage.integrity_mark_seconds - 1
        self.assert_refused_at_once(info)
        self.clock.now += 1
        self.assertEqual(self.storage.read_all(OWNER, info.id)[1], data)

    def test_marks_are_bounded(self) -> None:
        """Past integrity_mark_entries marks, the oldest is forgotten."""
        self.storage.integrity_mark_entries = 2
        archives = [self.tampered(size=64 * 1024, name=f"f{n}.bin") for n in range(3)]
        for info, data, _ in archives:
            self.read_until_it_fails(info, data, some_bytes_first=False)
        self.assertEqual([self.storage.failed_lately(OWNER, info.id) for info, _, _ in archives], [False, True, True])

    def test_only_authentication_failures_mark(self) -> None:
        """A read after close is the caller's mistake: it raises, but the
        archive is not marked, and an archive of another owner with the same
        id is not affected by a mark."""
        data = os.urandom(100_000)
        info = self.storage.store(OWNER, "fine.bin", data)
        reader = self.storage.open(OWNER, info.id)
        reader.close()
        self.assertRaises(IntegrityError, reader.read)
        self.assertFalse(self.storage.failed_lately(OWNER, info.id))
        self.assertEqual(self.storage.read_all(OWNER, info.id)[1], data)
        self.assertFalse(self.storage.failed_lately(OTHER_OWNER, info.id))


# -- buffer reuse and what a download checks (docs/FORMAT.md §6.1) ---------------


class _Index:
    """What an L{ArchiveWriter} publishes into, keeping the data key so that
    a test can read (and forge) the archive with L{ArchiveReader} itself."""

    def __init__(self, root: Path) -> None:
        self.local = LocalBlobStore(root)
        self.blobs: BlobStore = self.local
        self.clock_ns = fixed_clock()
        self.saved: dict[str, tuple[ArchiveInfo, bytes]] = {}

    def write_meta(self, owner_id: str, info: ArchiveInfo, data_key: bytes, *, quota: int | None = None) -> None:
        self.saved[info.id] = (info, data_key)

    def discard_unindexed_blob(self, owner_id: str, archive_id: str) -> None:
        self.blobs.delete(owner_id, archive_id)

    def reader(self, info: ArchiveInfo, *, check_sha256: bool) -> ArchiveReader:
        data_key = self.saved[info.id][1]
        return ArchiveReader(
            self.blobs.reader(OWNER, info.id),
            info,
            derive_key(data_key, b"body-key"),
            context_bytes(b"body", OWNER, info.id),
            check_sha256=check_sha256,
        )


def compressible(size: int) -> bytes:
    """Log-like lines that deflate level 1 shrinks well below 90 %."""
    lines = b"".join(
        b"2026-11-30T09:%02d:%02d INFO request %08d served in %d ms\n" % (i // 60 % 60, i % 60, i, i % 97)
        for i in range(size // 40 + 1)
    )
    return lines[:size]


def read_everything(reader: ArchiveReader, size: int) -> bytes:
    pieces = []
    try:
        while piece := reader.read(size):
            pieces.append(piece)
    finally:
        reader.close()
    return b"".join(pieces)


class BufferReuseTests(_StorageMixin):
    """The buffers the paths reuse (the upload's join buffer, the reader's
    ciphertext and plaintext buffers) never mix bytes of one block into
    another: byte-exact round trips at every chunk boundary."""

    SIZES = (0, 1, 16383, 16384, 16385, MIB - 1, MIB, MIB + 1, 3 * MIB + 17)

    def check(self, data: bytes, piece: int, per_call: int) -> None:
        writer = self.storage.writer(OWNER, "f.bin")
        pieces = [data[at : at + piece] for at in range(0, len(data), piece)]
        joiner = BlockJoiner()
        for at in range(0, len(pieces), per_call):  # what arrived between two pool calls
            joiner.write(writer, pieces[at : at + per_call])
        info = writer.commit()
        self.assertEqual((info.size, info.sha256), (len(data), hashlib.sha256(data).hexdigest()))
        for size in (4096, 16385, MIB):
            self.assertTrue(read_everything(self.storage.open(OWNER, info.id), size) == data, (len(data), size))
        self.assertEqual(self.storage.verify(OWNER, info.id), info)

    def test_random_round_trips(self) -> None:
        """Stored (incompressible) files come back byte for byte."""
        for size in self.SIZES:
            self.check(os.urandom(size), 65536, 40)

    def test_compressible_round_trips(self) -> None:
        """Deflated files come back byte for byte, with odd piece sizes, and
        in small joined writes (the first ones are held as the sample that
        chooses deflate, while the join buffer is reused)."""
        for size in self.SIZES:
            self.check(compressible(size), 7919, 40)
            self.check(compressible(size), 7919, 3)


class DownloadChecksTests(SyncTestCase):
    """A download relies on the AEAD for every byte, checks a deflated
    member's CRC-32, and leaves the SHA-256 to the client; verify checks it."""

    def setUp(self) -> None:
        self.index = _Index(Path(self.make_dir()))

    def store(self, data: bytes) -> ArchiveInfo:
        writer = ArchiveWriter(self.index, OWNER, "f.log")
        writer.write(data)
        return writer.commit()

    def test_sha256_only_when_asked(self) -> None:
        """A recorded SHA-256 that does not match (a bug of the writer) is
        not seen by a download, which the client checks, but by a reader
        asked for it (admin verify)."""
        for data in (os.urandom(100_000), compressible(100_000)):
            info = dataclasses.replace(self.store(data), sha256="0" * 64)
            self.assertTrue(read_everything(self.index.reader(info, check_sha256=False), MIB) == data)
            with self.assertRaisesRegex(IntegrityError, "digest"):
                read_everything(self.index.reader(info, check_sha256=True), MIB)

    def test_inflate_checked_by_crc32(self) -> None:
        """A deflated member whose authenticated data descriptor holds
        another CRC-32 than inflate's output fails, without the SHA-256."""
        data = compressible(300_000)
        info = self.store(data)
        self.assertEqual(info.method, "deflated")
        data_key = self.index.saved[info.id][1]
        key, ctx = derive_key(data_key, b"body-key"), context_bytes(b"body", OWNER, info.id)
        path = self.index.local.path(OWNER, info.id)
        decryptor = Cobblestone256Decryptor(key, ctx)
        plain = bytearray(decryptor.update(path.read_bytes()) + decryptor.finalize())
        crc_at = info.data_offset + info.compressed_size + 4
        self.assertEqual(plain[crc_at - 4 : crc_at], b"PK\x07\x08")
        plain[crc_at] ^= 0x01
        encryptor = Cobblestone256Encryptor(key, ctx)
        path.write_bytes(encryptor.update(bytes(plain)) + encryptor.finalize())
        with self.assertRaisesRegex(IntegrityError, "CRC-32"):
            read_everything(self.index.reader(info, check_sha256=False), MIB)
