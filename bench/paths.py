"""The upload and download paths in-process: CPU-seconds per GiB, no network.

python -m bench.paths --size-mib 512: feeds a random and a compressible file
in 64 KiB pieces (what the reactor hands the upload stream), batched as
L{UploadStream} batches them, through L{ArchiveWriter} into a local blob in
a temporary directory, then reads each back through L{ArchiveReader} as the
download producer does.  Prints CPU-seconds per GiB (user + system of this
process, every thread, from getrusage), MB/s and minor page faults per GiB (fresh large
buffers fault their pages in: the allocation churn this measures), beside
the at-rest floor over the same data (Cobblestone encrypt and decrypt,
SHA-256, CRC-32, and deflate/inflate for the compressible file) and the
cost of each check a download could make beyond the AEAD.  The figures
decide docs/FORMAT.md §6.1; docs/PERFORMANCE.md has the copy table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor

from bench.env import MiB, in_workdir, log_lines_block
from securevault.core.archive import (
    INFLATE_FEED_BYTES,
    ArchiveInfo,
    ArchiveReader,
    ArchiveWriter,
    ciphertext_buffer,
    context_bytes,
    derive_key,
)
from securevault.server.streaming import BLOCK_BYTES, BlockJoiner
from securevault.stores.blobs import LocalBlobStore

GiB = 1 << 30
PIECE_BYTES = 64 * 1024
OWNER = "bench"


@dataclass
class Figure:
    name: str
    cpu: float
    wall: float
    faults: int
    size: int

    def line(self) -> str:
        gib = self.size / GiB
        return (
            f"  {self.name:<44} {self.cpu / gib:6.2f} CPU-s/GiB  {self.size / max(self.wall, 1e-9) / 1e6:8.1f} MB/s"
            f"  {self.faults / gib:9.0f} faults/GiB"
        )


def measure(name: str, size: int, work: Callable[[], object]) -> Figure:
    """C{work} run on a fresh thread, as the worker pool runs it: glibc
    gives threads other arenas than the main one, and their large
    allocations churn differently."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=run, name="bench-paths")
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    thread.start()
    thread.join()
    if failures:
        raise failures[0]
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Figure(name, cpu, time.perf_counter() - wall, after.ru_minflt - before.ru_minflt, size)


class _Index:
    """Just enough of L{SecureFileStorage} for a writer: a blob directory
    and an index row kept in memory."""

    def __init__(self, root: Path) -> None:
        self.blobs = LocalBlobStore(root)
        self.clock_ns = time.time_ns
        self.saved: tuple[ArchiveInfo, bytes] | None = None

    def write_meta(self, owner_id: str, info: ArchiveInfo, data_key: bytes, *, quota: int | None = None) -> None:
        self.saved = (info, data_key)

    def discard_unindexed_blob(self, owner_id: str, archive_id: str) -> None:
        self.blobs.delete(owner_id, archive_id)


def make_pieces(pattern: bytes) -> list[bytes]:
    """C{pattern} in 64 KiB C{bytes} pieces, made once before any figure is
    taken and then reused: making them is the reactor's work."""
    return [pattern[at : at + PIECE_BYTES] for at in range(0, len(pattern), PIECE_BYTES)]


def pieces_of(made: list[bytes], size: int) -> Iterator[bytes]:
    """C{size} bytes of the pieces, repeated."""
    left = size
    while left > 0:
        for piece in made:
            if left <= 0:
                return
            out = piece if len(piece) <= left else piece[:left]
            left -= len(out)
            yield out


def upload(index: _Index, pieces: list[bytes], size: int) -> None:
    writer = ArchiveWriter(index, OWNER, "bench.bin")
    joiner = BlockJoiner()
    batch: list[bytes] = []
    batched = 0
    for piece in pieces_of(pieces, size):
        batch.append(piece)
        batched += len(piece)
        if batched >= BLOCK_BYTES:
            joiner.write(writer, batch)
            batch, batched = [], 0
    if batch:
        joiner.write(writer, batch)
    writer.commit()


def download(index: _Index, check_sha256: bool) -> int:
    assert index.saved is not None
    info, data_key = index.saved
    reader = ArchiveReader(
        index.blobs.reader(OWNER, info.id),
        info,
        derive_key(data_key, b"body-key"),
        context_bytes(b"body", OWNER, info.id),
        check_sha256=check_sha256,
    )
    total = 0
    try:
        while data := reader.read():
            total += len(data)
    finally:
        reader.close()
    if total != info.size:
        raise RuntimeError("download returned the wrong size")
    return total


def floors(pattern: bytes, size: int, deflate: bool) -> list[Figure]:
    """The work no implementation of the format avoids, and each optional check."""
    figures = []
    key, context = os.urandom(32), b"bench"

    def blocks() -> Iterator[memoryview]:
        view = memoryview(pattern)
        left = size
        while left > 0:
            for at in range(0, len(pattern), BLOCK_BYTES):
                block = view[at : at + min(BLOCK_BYTES, left)]
                left -= len(block)
                yield block
                if left <= 0:
                    return

    def encrypt() -> None:
        encryptor = Cobblestone256Encryptor(key, context)
        out = ciphertext_buffer(BLOCK_BYTES)
        for block in blocks():
            encryptor.update_into(block, out)
        encryptor.finalize()

    # A ciphertext to decrypt: one block's worth, decrypted as often as needed.
    encryptor = Cobblestone256Encryptor(key, context)
    ciphertext = bytearray()
    buffer = ciphertext_buffer(BLOCK_BYTES)
    for block in blocks():
        ciphertext += buffer[: encryptor.update_into(block, buffer)]
        if len(ciphertext) >= 64 * MiB:
            break

    def decrypt() -> None:
        done = 0
        out = ciphertext_buffer(BLOCK_BYTES)
        view = memoryview(ciphertext)
        while done < size:
            decryptor = Cobblestone256Decryptor(key, context)
            for at in range(0, len(view), BLOCK_BYTES):
                done += decryptor.update_into(view[at : at + BLOCK_BYTES], out)
                if done >= size:
                    return
            # (not finalized: the tail is not a whole stream; only throughput counts)

    def sha256() -> None:
        digest = hashlib.sha256()
        for block in blocks():
            digest.update(block)

    def crc32() -> None:
        crc = 0
        for block in blocks():
            crc = zlib.crc32(block, crc)

    figures.append(measure("floor: Cobblestone-256 encrypt", size, encrypt))
    figures.append(measure("floor: Cobblestone-256 decrypt", size, decrypt))
    figures.append(measure("check: SHA-256 of the plaintext", size, sha256))
    figures.append(measure("check: CRC-32 of the plaintext", size, crc32))
    if deflate:
        compressed: list[bytes] = []

        def compress() -> None:
            compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
            for block in blocks():
                piece = compressor.compress(block)
                if sum(map(len, compressed)) < 64 * MiB:
                    compressed.append(piece)
            compressor.flush()

        figures.append(measure("floor: deflate level 1", size, compress))
        stream = b"".join(compressed)

        def inflate() -> None:
            done = 0
            while done < size:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                view = memoryview(stream)
                while view and done < size:
                    feed = view[:INFLATE_FEED_BYTES]
                    done += len(inflater.decompress(feed, BLOCK_BYTES))
                    view = view[len(feed) - len(inflater.unconsumed_tail) :]

        figures.append(measure("floor: inflate", size, inflate))
    return figures


def run(root: Path, size: int, runs: int) -> int:
    random_data = os.urandom(64 * MiB)
    text = log_lines_block(8 * MiB)
    for label, pattern, deflate in (("random", random_data, False), ("text (log lines)", text, True)):
        print(f"{label}, {size // MiB} MiB:")
        for number in range(runs):
            index = _Index(root / f"{label[:4]}-{number}")
            pieces = make_pieces(pattern)
            figures = [measure("upload path (writer + blob)", size, partial(upload, index, pieces, size))]
            del pieces
            assert index.saved is not None
            print(f"  (archive method: {index.saved[0].method}, stored {index.saved[0].stored_bytes} bytes)")
            figures.append(measure("download path, as served (blob + reader)", size, partial(download, index, False)))
            figures.append(measure("download path + SHA-256 (admin verify)", size, partial(download, index, True)))
            for figure in figures:
                print(figure.line())
            index.blobs.delete(OWNER, index.saved[0].id)
        for figure in floors(pattern, size, deflate):
            print(figure.line())
        sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="bytes through each path (default 512)")
    parser.add_argument("--runs", type=int, default=1, help="upload/download runs per file (default 1)")
    parser.add_argument("--workdir", default=None, help="parent directory of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.runs < 1:
        parser.error("--size-mib and --runs must be positive")
    return in_workdir(
        "securevault-paths-", args.workdir, args.keep, lambda root: run(root, args.size_mib * MiB, args.runs)
    )


if __name__ == "__main__":
    raise SystemExit(main())
