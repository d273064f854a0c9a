# -*- test-case-name: tests.core.test_chunked -*-
"""Random access into a Cobblestone-256 stream: decrypt chunk i alone.

The body of every archive is one Cobblestone-256 stream (docs/FORMAT.md §5),
written and read whole by C{cryptography.cobblestone}.  That library (50.x)
decrypts only from the start, so a ranged download would cost as much as the
whole file up to the range.  The stream is the C2SP chunked-encryption
scheme (c2sp.org/chunked-encryption, v1) instantiated with HKDF-SHA-512 and
AES-256-GCM, which is designed for random access:

    key || base nonce || commitment = HKDF-Expand(SHA-512, prk = input key,
        info = "c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM" || 0x00 || salt || context,
        L = 32 + 12 + 32)
    stream  = salt (24) || commitment (32) || chunk_0 || ... || chunk_n
    chunk_i = AES-256-GCM(key, nonce = base nonce XOR i (big-endian), aad = "")
              of 16384 plaintext bytes for i < n, and of 0..16383 for i = n

There is no "last" flag: the final chunk is the one that is short (maybe
empty), so a stream cut at a chunk boundary ends in a full chunk and is
refused.  Each chunk's position is authenticated through its nonce, so a
chunk moved, swapped or taken from another stream fails its tag; the
commitment binds the header to the key and context before any chunk is
touched.

L{ChunkedStream} checks the header, derives the chunk key, and decrypts any
chunk given its index and whether it is the final one; L{read_plaintext} maps
a plaintext byte range to the chunks it needs.  The tests cross-check every
chunk against the library's own stream decryption.  Plain blocking Python,
no Twisted.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = [
    "CHUNK_CIPHERTEXT_BYTES",
    "CHUNK_PLAINTEXT_BYTES",
    "HEADER_BYTES",
    "ChunkedStream",
    "ChunkedStreamError",
    "chunk_count",
    "chunk_offset",
    "ciphertext_size",
    "plaintext_size",
    "read_plaintext",
]

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
TAG_BYTES = 16
SALT_BYTES = 24
COMMITMENT_BYTES = 32
HEADER_BYTES = SALT_BYTES + COMMITMENT_BYTES
CHUNK_PLAINTEXT_BYTES = 16384
CHUNK_CIPHERTEXT_BYTES = CHUNK_PLAINTEXT_BYTES + TAG_BYTES
# The scheme's limit: at most 2**38 chunks (4 PiB).
MAX_CHUNKS = 1 << 38
INFO_PREFIX = b"c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM\x00"
# How many chunks one read of the blob covers (about 512 KiB of ciphertext).
BATCH_CHUNKS = 32


class ChunkedStreamError(Exception):
    """The stream, a chunk or its framing fails authentication (tampered,
    truncated, extended, moved, or under another key or context)."""


def chunk_count(plaintext_bytes: int) -> int:
    """How many chunks a message of that length has (the last one short,
    perhaps empty)."""
    if plaintext_bytes < 0:
        raise ValueError("negative length")
    return plaintext_bytes // CHUNK_PLAINTEXT_BYTES + 1


def ciphertext_size(plaintext_bytes: int) -> int:
    """The stream's length for a message of C{plaintext_bytes}."""
    return HEADER_BYTES + plaintext_bytes + TAG_BYTES * chunk_count(plaintext_bytes)


def plaintext_size(ciphertext_bytes: int) -> int:
    """The message length of a stream of C{ciphertext_bytes}; a length no
    stream can have (too short, or a final chunk that is full or shorter
    than its tag) raises L{ChunkedStreamError}."""
    body = ciphertext_bytes - HEADER_BYTES
    if body < TAG_BYTES:
        raise ChunkedStreamError("the stream is too short")
    full, last = divmod(body, CHUNK_CIPHERTEXT_BYTES)
    if last < TAG_BYTES:
        # Ends on a chunk boundary (truncated) or inside a tag (invalid).
        raise ChunkedStreamError("the stream does not end with a final chunk")
    if full + 1 > MAX_CHUNKS:
        raise ChunkedStreamError("the stream has too many chunks")
    return full * CHUNK_PLAINTEXT_BYTES + last - TAG_BYTES


def chunk_offset(index: int) -> int:
    """Where chunk C{index} starts in the stream."""
    return HEADER_BYTES + index * CHUNK_CIPHERTEXT_BYTES


class ChunkedStream:
    """The keys of one Cobblestone-256 stream, from its 56-byte header.

    The header is authenticated here (the key commitment, compared in
    constant time), so a wrong key, a wrong context or a damaged header
    fails before any chunk is decrypted.
    """

    def __init__(self, input_key: bytes, context: bytes, header: bytes) -> None:
        if len(input_key) != KEY_BYTES:
            raise ValueError("Cobblestone-256 takes a 32-byte key")
        if len(header) != HEADER_BYTES:
            raise ChunkedStreamError("the stream header is incomplete")
        salt, commitment = header[:SALT_BYTES], header[SALT_BYTES:]
        derived = HKDFExpand(
            hashes.SHA512(), KEY_BYTES + NONCE_BYTES + COMMITMENT_BYTES, INFO_PREFIX + salt + context
        ).derive(input_key)
        if not hmac.compare_digest(derived[KEY_BYTES + NONCE_BYTES :], commitment):
            raise ChunkedStreamError("the stream header does not match the key and context")
        self._aead = AESGCM(derived[:KEY_BYTES])
        self._base_nonce = int.from_bytes(derived[KEY_BYTES : KEY_BYTES + NONCE_BYTES], "big")

    def decrypt_chunk(self, index: int, ciphertext: bytes | memoryview, *, final: bool) -> bytes:
        """The plaintext of chunk C{index}, authenticated.

        C{final} says whether the caller expects this chunk to end the
        stream: a final chunk must hold fewer than 16384 bytes and any other
        exactly 16384, as the stream decryptor requires, so a full chunk
        passed off as the end (a truncated stream) or a short one passed off
        as a middle chunk fails.
        """
        if not 0 <= index < MAX_CHUNKS:
            raise ChunkedStreamError("chunk index out of range")
        size = len(ciphertext)
        if final:
            if not TAG_BYTES <= size < CHUNK_CIPHERTEXT_BYTES:
                raise ChunkedStreamError(f"final chunk {index} has an impossible length")
        elif size != CHUNK_CIPHERTEXT_BYTES:
            raise ChunkedStreamError(f"chunk {index} is cut short")
        nonce = (self._base_nonce ^ index).to_bytes(NONCE_BYTES, "big")
        try:
            return self._aead.decrypt(nonce, bytes(ciphertext), None)
        except InvalidTag as error:
            raise ChunkedStreamError(f"chunk {index} fails authentication") from error


def read_plaintext(
    stream: ChunkedStream,
    read_at: Callable[[int, int], bytes],
    total_plaintext: int,
    start: int,
    end: int,
    *,
    batch_chunks: int = BATCH_CHUNKS,
) -> Iterator[bytes]:
    """The authenticated plaintext bytes C{start <= i < end} of a stream
    whose message is C{total_plaintext} bytes, read through
    C{read_at(offset, length)} (which may return fewer bytes only at the
    stream's end); one piece per batch of chunks.

    Only the chunks that hold the range are read and decrypted.  The message
    length itself is not checked here: see L{SecureFileStorage.open_range},
    which decrypts the final chunk first.
    """
    if not 0 <= start <= end <= total_plaintext:
        raise ValueError("range outside the message")
    if start == end:
        return
    last_index = chunk_count(total_plaintext) - 1
    first = start // CHUNK_PLAINTEXT_BYTES
    stop = (end - 1) // CHUNK_PLAINTEXT_BYTES  # inclusive
    position = first * CHUNK_PLAINTEXT_BYTES
    for batch_start in range(first, stop + 1, batch_chunks):
        batch_stop = min(stop, batch_start + batch_chunks - 1)
        offset = chunk_offset(batch_start)
        wanted = chunk_offset(batch_stop + 1) - offset
        if batch_stop == last_index:
            wanted = ciphertext_size(total_plaintext) - offset
        ciphertext = memoryview(read_at(offset, wanted))
        if len(ciphertext) != wanted:
            raise ChunkedStreamError("the stream is shorter than its length says")
        pieces = []
        for index in range(batch_start, batch_stop + 1):
            at = (index - batch_start) * CHUNK_CIPHERTEXT_BYTES
            chunk = ciphertext[at : at + CHUNK_CIPHERTEXT_BYTES]
            plain = stream.decrypt_chunk(index, chunk, final=index == last_index)
            low = max(start - position, 0)
            high = min(end - position, len(plain))
            pieces.append(plain[low:high] if (low, high) != (0, len(plain)) else plain)
            position += len(plain)
        yield b"".join(pieces)
