# -*- test-case-name: tests.core.test_chunked -*-
"""Tests for L{securevault.core.chunked}: decrypting one chunk of a
Cobblestone-256 stream agrees, byte for byte, with the library's own stream
decryption, and refuses whatever the library refuses."""

from __future__ import annotations

import os
import random

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag

from securevault.core.chunked import (
    CHUNK_CIPHERTEXT_BYTES,
    CHUNK_PLAINTEXT_BYTES,
    HEADER_BYTES,
    ChunkedStream,
    ChunkedStreamError,
    chunk_count,
    chunk_offset,
    ciphertext_size,
    plaintext_size,
    read_plaintext,
)
from tests.support.testcase import SyncTestCase

CONTEXT = b"securevault/v1/body\x00owner\x00" + b"a" * 32
SIZES = [0, 1, 16383, 16384, 16385, 3 * 16384, 3 * 16384 - 1, 3 * 16384 + 1]


def encrypt(key: bytes, plaintext: bytes, context: bytes = CONTEXT) -> bytes:
    """The library's ciphertext, fed in uneven pieces as an upload would."""
    encryptor = Cobblestone256Encryptor(key, context)
    out = []
    view = memoryview(plaintext)
    rng = random.Random(len(plaintext))
    position = 0
    while position < len(view):
        step = rng.randint(1, 40000)
        out.append(encryptor.update(view[position : position + step]))
        position += step
    out.append(encryptor.finalize())
    return b"".join(out)


def library_decrypt(key: bytes, ciphertext: bytes, context: bytes = CONTEXT) -> bytes:
    decryptor = Cobblestone256Decryptor(key, context)
    return decryptor.update(ciphertext) + decryptor.finalize()


def chunks(ciphertext: bytes) -> list[bytes]:
    """The stream's chunks, split by the framing the specification gives."""
    body = ciphertext[HEADER_BYTES:]
    return [body[i : i + CHUNK_CIPHERTEXT_BYTES] for i in range(0, len(body), CHUNK_CIPHERTEXT_BYTES)] or [b""]


def decrypt_all(key: bytes, ciphertext: bytes, context: bytes = CONTEXT) -> bytes:
    """Our whole-stream decryption: every chunk alone, the last one as final."""
    stream = ChunkedStream(key, context, ciphertext[:HEADER_BYTES])
    pieces = chunks(ciphertext)
    return b"".join(
        stream.decrypt_chunk(index, piece, final=index == len(pieces) - 1) for index, piece in enumerate(pieces)
    )


class AgreementTests(SyncTestCase):
    """Our per-chunk decryption against cryptography's Cobblestone256Decryptor."""

    def sizes(self) -> list[int]:
        rng = random.Random(20261130)
        return SIZES + [rng.randint(0, 200_000) for _ in range(12)]

    def test_every_chunk_matches_the_library(self) -> None:
        """For many message sizes, each chunk decrypted alone (in any order)
        is exactly the library's plaintext at that chunk's offset, and the
        framing formulas give the stream's real length."""
        for size in self.sizes():
            key = os.urandom(32)
            plaintext = os.urandom(size)
            ciphertext = encrypt(key, plaintext)
            self.assertEqual(len(ciphertext), ciphertext_size(size), size)
            self.assertEqual(plaintext_size(len(ciphertext)), size)
            self.assertEqual(library_decrypt(key, ciphertext), plaintext)
            stream = ChunkedStream(key, CONTEXT, ciphertext[:HEADER_BYTES])
            count = chunk_count(size)
            self.assertEqual(len(chunks(ciphertext)), count, size)
            order = list(range(count))
            random.Random(size).shuffle(order)
            for index in order:
                piece = ciphertext[chunk_offset(index) : chunk_offset(index + 1)]
                got = stream.decrypt_chunk(index, piece, final=index == count - 1)
                expected = plaintext[index * CHUNK_PLAINTEXT_BYTES : (index + 1) * CHUNK_PLAINTEXT_BYTES]
                self.assertEqual(got, expected, (size, index))

    def test_ranges_match_the_library(self) -> None:
        """read_plaintext of any range is the library's plaintext sliced
        there, for ranges on, before and after chunk boundaries, and it
        reads only the chunks the range needs."""
        key = os.urandom(32)
        size = 5 * CHUNK_PLAINTEXT_BYTES + 777
        plaintext = os.urandom(size)
        ciphertext = encrypt(key, plaintext)
        stream = ChunkedStream(key, CONTEXT, ciphertext[:HEADER_BYTES])
        rng = random.Random(7)
        ranges = [(0, 1), (0, size), (size - 1, size), (16383, 16385), (16384, 16385), (16383, 16384)]
        ranges += [(16385, 3 * 16384), (5 * 16384, size), (2 * 16384 - 1, 4 * 16384 + 1), (10, 10)]
        ranges += [tuple(sorted((rng.randint(0, size), rng.randint(0, size)))) for _ in range(30)]  # type: ignore[misc]
        reads: list[tuple[int, int]] = []

        def read_at(offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return ciphertext[offset : offset + length]

        for start, end in ranges:
            for batch in (1, 2, 32):
                reads.clear()
                got = b"".join(read_plaintext(stream, read_at, size, start, end, batch_chunks=batch))
                self.assertEqual(got, plaintext[start:end], (start, end, batch))
                if start == end:
                    self.assertEqual(reads, [])
                    continue
                first, last = start // CHUNK_PLAINTEXT_BYTES, (end - 1) // CHUNK_PLAINTEXT_BYTES
                self.assertEqual(reads[0][0], chunk_offset(first))
                self.assertEqual(
                    sum(length for _, length in reads),
                    min(chunk_offset(last + 1), len(ciphertext)) - chunk_offset(first),
                )


class RefusalTests(SyncTestCase):
    """Whatever the library refuses, per-chunk decryption refuses too."""

    def setUp(self) -> None:
        self.key = os.urandom(32)
        self.plaintext = os.urandom(3 * CHUNK_PLAINTEXT_BYTES + 100)
        self.ciphertext = encrypt(self.key, self.plaintext)
        self.stream = ChunkedStream(self.key, CONTEXT, self.ciphertext[:HEADER_BYTES])

    def assert_both_refuse(self, ciphertext: bytes, key: bytes | None = None, context: bytes = CONTEXT) -> None:
        """The library's stream decryption and ours both fail on C{ciphertext}."""
        key = key or self.key
        with self.assertRaises((InvalidTag, ValueError)):
            library_decrypt(key, ciphertext, context)
        with self.assertRaises(ChunkedStreamError):
            plaintext_size(len(ciphertext))  # an impossible length is refused up front
            decrypt_all(key, ciphertext, context)

    def test_flipped_bit_anywhere(self) -> None:
        """A bit flipped in the salt, the commitment, a chunk's ciphertext or
        a tag is refused, and only that chunk's decryption fails."""
        for position in [0, 23, 24, 55, 56, 100, chunk_offset(1) - 1, chunk_offset(2) + 5, len(self.ciphertext) - 1]:
            damaged = bytearray(self.ciphertext)
            damaged[position] ^= 0x04
            self.assert_both_refuse(bytes(damaged))
        damaged = bytearray(self.ciphertext)
        damaged[chunk_offset(2) + 5] ^= 0x04
        with self.assertRaises(ChunkedStreamError):
            self.stream.decrypt_chunk(2, bytes(damaged[chunk_offset(2) : chunk_offset(3)]), final=False)
        self.assertEqual(
            self.stream.decrypt_chunk(1, bytes(damaged[chunk_offset(1) : chunk_offset(2)]), final=False),
            self.plaintext[CHUNK_PLAINTEXT_BYTES : 2 * CHUNK_PLAINTEXT_BYTES],
        )

    def test_swapped_chunks(self) -> None:
        """Two chunks swapped, or one chunk presented under another index,
        fail: the position is authenticated."""
        first, second = chunks(self.ciphertext)[0], chunks(self.ciphertext)[1]
        swapped = self.ciphertext[:HEADER_BYTES] + second + first + self.ciphertext[chunk_offset(2) :]
        self.assert_both_refuse(swapped)
        with self.assertRaises(ChunkedStreamError):
            self.stream.decrypt_chunk(1, first, final=False)

    def test_chunk_from_another_stream(self) -> None:
        """A chunk taken from another stream under the same key (another salt)
        fails at its own position."""
        other = encrypt(self.key, self.plaintext)
        spliced = self.ciphertext[: chunk_offset(1)] + other[chunk_offset(1) : chunk_offset(2)]
        spliced += self.ciphertext[chunk_offset(2) :]
        self.assert_both_refuse(spliced)

    def test_truncated(self) -> None:
        """A stream cut at a chunk boundary (its last chunk full), inside a
        chunk, inside the header, or emptied, is refused; so is a full chunk
        passed off as the final one, or the final one as a middle chunk."""
        for cut in [chunk_offset(3), chunk_offset(2), chunk_offset(1), chunk_offset(3) + 10, 56, 30, 0]:
            self.assert_both_refuse(self.ciphertext[:cut])
        middle = chunks(self.ciphertext)[2]
        with self.assertRaises(ChunkedStreamError):
            self.stream.decrypt_chunk(2, middle, final=True)
        last = chunks(self.ciphertext)[3]
        with self.assertRaises(ChunkedStreamError):
            self.stream.decrypt_chunk(3, last, final=False)
        with self.assertRaises(ChunkedStreamError):
            self.stream.decrypt_chunk(3, last[:-1], final=True)
        with self.assertRaises(ChunkedStreamError):
            ChunkedStream(self.key, CONTEXT, self.ciphertext[: HEADER_BYTES - 1])

    def test_extended(self) -> None:
        """Bytes appended after the final chunk are refused by both."""
        self.assert_both_refuse(self.ciphertext + b"\x00" * 16)
        self.assert_both_refuse(self.ciphertext + chunks(self.ciphertext)[0])

    def test_wrong_key_or_context(self) -> None:
        """Another key or another context fails at the header, before any
        chunk (the key commitment)."""
        for key, context in [(os.urandom(32), CONTEXT), (self.key, CONTEXT + b"x"), (self.key, b"")]:
            with self.assertRaises((InvalidTag, ValueError)):
                library_decrypt(key, self.ciphertext, context)
            with self.assertRaises(ChunkedStreamError):
                ChunkedStream(key, context, self.ciphertext[:HEADER_BYTES])
        with self.assertRaises(ValueError):
            ChunkedStream(b"short", CONTEXT, self.ciphertext[:HEADER_BYTES])

    def test_range_of_a_short_stream(self) -> None:
        """read_plaintext refuses a stream shorter than the length it was
        told, and a range outside the message."""

        def short(offset: int, length: int) -> bytes:
            return self.ciphertext[offset : offset + length][:-1]

        size = len(self.plaintext)
        with self.assertRaises(ChunkedStreamError):
            b"".join(read_plaintext(self.stream, short, size, size - 5, size))
        with self.assertRaises(ValueError):
            list(read_plaintext(self.stream, short, size, 0, size + 1))

    def test_impossible_lengths(self) -> None:
        """plaintext_size refuses every length a stream cannot have."""
        self.assertEqual(plaintext_size(HEADER_BYTES + 16), 0)
        self.assertEqual(plaintext_size(HEADER_BYTES + CHUNK_CIPHERTEXT_BYTES + 16), CHUNK_PLAINTEXT_BYTES)
        for length in [0, HEADER_BYTES, HEADER_BYTES + 15, HEADER_BYTES + CHUNK_CIPHERTEXT_BYTES]:
            with self.assertRaises(ChunkedStreamError):
                plaintext_size(length)
        with self.assertRaises(ChunkedStreamError):
            plaintext_size(HEADER_BYTES + CHUNK_CIPHERTEXT_BYTES + 15)
