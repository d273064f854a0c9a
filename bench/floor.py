"""The at-rest floor: CPU-seconds per GiB of the work the vault's format
makes necessary (Cobblestone encryption or decryption, SHA-256, CRC-32,
deflate), measured in this process over the benchmark's own files.

A server cannot store or serve a byte for less than its TLS (nginx's
figure) plus this; issue 14's target is securevault <= 1.25 x (nginx +
floor).  The calls are the ones securevault makes (securevault/core/archive.py):
C{Cobblestone256Encryptor.update_into} on 1 MiB plaintext blocks (the
upload path writes >= 1 MiB batches, zipfile passes them through) and
C{Cobblestone256Decryptor.update_into} on 512 KiB ciphertext blocks (the
download path's blob reads), keys from the same HKDF, C{hashlib.sha256},
C{zlib.crc32} (what zipfile computes on upload) and raw deflate at the
server's level.  CPU is this thread's (C{time.thread_time}) around each call
only: reading the file is not counted.
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor

from securevault.core.archive import (
    COMPRESSION_LEVEL,
    IO_BLOCK_BYTES,
    READ_BLOCK_BYTES,
    ciphertext_buffer,
    context_bytes,
    derive_key,
)

GiB = 1 << 30
WARMUP_BYTES = 64 << 20

# What each direction's path computes per byte today (securevault/core/
# archive.py): an upload encrypts, hashes (SHA-256 for the record) and
# zipfile takes a CRC-32; a raw download of a stored (incompressible) file
# only decrypts: the AEAD authenticates every chunk and the client checks the
# SHA-256 (docs/FORMAT.md section 6.1); CRC-32 is checked only where inflate
# runs.  Every component is printed, so another sum can be recomputed by hand.
UPLOAD_FLOOR = ("encrypt", "sha256", "crc32")
DOWNLOAD_FLOOR = ("decrypt",)
# A deflated upload: deflate, hash and CRC the plaintext, encrypt the
# (smaller) deflated stream; per GiB of the text file.
TEXT_UPLOAD_FLOOR = ("deflate", "sha256", "crc32", "encrypt_deflated")


def _blocks(path: Path, block: int, limit: int | None = None) -> Iterator[memoryview]:
    """The file in blocks of C{block} bytes, read into one reused buffer
    (each view is valid until the next one is taken)."""
    buffer = bytearray(block)
    left = limit if limit is not None else os.path.getsize(path)
    with open(path, "rb", buffering=0) as source:
        while left > 0:
            got = source.readinto(memoryview(buffer)[: min(block, left)])
            if not got:
                return
            left -= got
            yield memoryview(buffer)[:got]


def _ciphers() -> tuple[Cobblestone256Encryptor, Cobblestone256Decryptor]:
    data_key = os.urandom(32)
    key = derive_key(data_key, b"body-key")
    context = context_bytes(b"body", "bench-owner", "0" * 32)
    return Cobblestone256Encryptor(key, context), Cobblestone256Decryptor(key, context)


def measure_random(path: Path, limit: int | None = None) -> tuple[dict[str, float], int]:
    """CPU-seconds of encrypt, decrypt (of that ciphertext), SHA-256 and
    CRC-32 over the file, and the plaintext bytes covered."""
    clock = time.thread_time
    spent: dict[str, float] = defaultdict(float)
    encryptor, decryptor = _ciphers()
    sealed = ciphertext_buffer(IO_BLOCK_BYTES)
    opened = ciphertext_buffer(READ_BLOCK_BYTES)
    sha = hashlib.sha256()
    crc = 0
    total = decrypted = 0
    for block in _blocks(path, IO_BLOCK_BYTES, limit):
        total += len(block)
        t0 = clock()
        produced = encryptor.update_into(block, sealed)
        t1 = clock()
        sha.update(block)
        t2 = clock()
        crc = zlib.crc32(block, crc)
        t3 = clock()
        spent["encrypt"] += t1 - t0
        spent["sha256"] += t2 - t1
        spent["crc32"] += t3 - t2
        ciphertext = memoryview(sealed)[:produced]
        for start in range(0, produced, READ_BLOCK_BYTES):
            t0 = clock()
            decrypted += decryptor.update_into(ciphertext[start : start + READ_BLOCK_BYTES], opened)
            spent["decrypt"] += clock() - t0
    t0 = clock()
    tail = encryptor.finalize()
    spent["encrypt"] += clock() - t0
    t0 = clock()
    decrypted += decryptor.update_into(tail, opened)
    decrypted += len(decryptor.finalize())
    spent["decrypt"] += clock() - t0
    if decrypted != total:
        raise RuntimeError(f"floor: decrypted {decrypted} bytes of {total}")
    return dict(spent), total


def measure_text(path: Path, limit: int | None = None) -> tuple[dict[str, float], int]:
    """CPU-seconds of raw deflate at the server's level, of encrypting the
    deflated stream and of inflating it, over the text file."""
    clock = time.thread_time
    spent: dict[str, float] = defaultdict(float)
    encryptor, _ = _ciphers()
    deflater = zlib.compressobj(COMPRESSION_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    sealed = ciphertext_buffer(IO_BLOCK_BYTES)
    total = inflated = 0

    def seal_and_open(compressed: bytes) -> int:
        t0 = clock()
        for start in range(0, len(compressed), IO_BLOCK_BYTES):
            encryptor.update_into(compressed[start : start + IO_BLOCK_BYTES], sealed)
        t1 = clock()
        out = len(inflater.decompress(compressed))
        spent["encrypt_deflated"] += t1 - t0
        spent["inflate"] += clock() - t1
        return out

    for block in _blocks(path, IO_BLOCK_BYTES, limit):
        total += len(block)
        t0 = clock()
        compressed = deflater.compress(block)
        spent["deflate"] += clock() - t0
        inflated += seal_and_open(compressed)
    t0 = clock()
    compressed = deflater.flush()
    spent["deflate"] += clock() - t0
    inflated += seal_and_open(compressed)
    t0 = clock()
    encryptor.finalize()
    spent["encrypt_deflated"] += clock() - t0
    if inflated != total:
        raise RuntimeError(f"floor: inflated {inflated} bytes of {total}")
    return dict(spent), total


def measure_floor(random_file: Path, text_file: Path | None) -> dict[str, float]:
    """CPU-seconds per GiB of each component, after one warm-up pass over
    the first 64 MiB of each file (imports, allocations, CPU clocks)."""
    measure_random(random_file, WARMUP_BYTES)
    spent, total = measure_random(random_file)
    per_gib = {name: seconds * GiB / total for name, seconds in spent.items()}
    if text_file is not None:
        measure_text(text_file, WARMUP_BYTES)
        spent, total = measure_text(text_file)
        per_gib.update({name: seconds * GiB / total for name, seconds in spent.items()})
    return per_gib


def floor_sum(per_gib: dict[str, float], components: tuple[str, ...]) -> float | None:
    """The sum of those components, or None if one was not measured."""
    if any(name not in per_gib for name in components):
        return None
    return sum(per_gib[name] for name in components)
