# -*- test-case-name: tests.server.test_download_ranges -*-
"""GET /download-file with Range (API.md, "Range"), through the whole
pipeline: 206 with exactly the bytes asked for, 416 when none are, the whole
file when the header is to be ignored or If-Range names another ETag."""

from __future__ import annotations

import base64
import hashlib
import os
from urllib.parse import quote

from tests.server.test_resources import _VaultTestCase
from tests.support.app import Response, corrupt_archive, encode_request

CHUNK = 16384
HEADER_BYTES = 56
CHUNK_BYTES = CHUNK + 16


class RangeTests(_VaultTestCase):
    """One stored (random) archive of a little over five chunks."""

    def setUp(self) -> None:
        super().setUp()
        self.session = self.alice()
        self.content = os.urandom(5 * CHUNK + 1000)
        self.archive_id = self.stored(self.upload_raw(self.session, "backup.bin", self.content))
        self.info = self.app.storage.info(self.alice_id, self.archive_id)
        self.assertEqual(self.info.method, "stored")
        self.etag = '"' + hashlib.sha256(self.content).hexdigest() + '"'

    def ranged(self, range_value: str | None, *, if_range: str | None = None, raw: bool = True) -> Response:
        headers = [(b"Accept", b"application/octet-stream")] if raw else []
        if range_value is not None:
            headers.append((b"Range", range_value.encode("latin-1")))
        if if_range is not None:
            headers.append((b"If-Range", if_range.encode("latin-1")))
        return self.client.get(b"/download-file?id=" + self.archive_id.encode(), session=self.session, headers=headers)

    def assert_partial(self, response: Response, start: int, end: int) -> None:
        """A 206 with the bytes start..end (inclusive) and the raw headers."""
        size = len(self.content)
        self.assertEqual(response.status, 206, response.body[:200])
        self.assertTrue(response.complete)
        self.assertEqual(response.body, self.content[start : end + 1])
        self.assertEqual(response.header("Content-Range"), f"bytes {start}-{end}/{size}")
        self.assertEqual(response.header("Content-Length"), str(end - start + 1))
        self.assertEqual(response.header("Accept-Ranges"), "bytes")
        self.assertEqual(response.header("ETag"), self.etag)
        self.assertEqual(response.header("Content-Type"), "application/octet-stream")
        self.assertEqual(response.header("Content-Disposition"), "attachment; filename*=UTF-8''backup.bin")
        self.assertEqual(response.header("Cache-Control"), "no-store")

    def assert_whole(self, response: Response) -> None:
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, self.content)
        self.assertEqual(response.header("Content-Length"), str(len(self.content)))
        self.assertEqual(response.header("Accept-Ranges"), "bytes")
        self.assertIsNone(response.header("Content-Range"))

    def test_whole_raw_download_advertises_ranges(self) -> None:
        """A raw download without Range is 200 with Accept-Ranges: bytes; the
        JSON form has no Accept-Ranges."""
        self.assert_whole(self.ranged(None))
        self.assertIsNone(self.ranged(None, raw=False).header("Accept-Ranges"))

    def test_chunk_boundaries(self) -> None:
        """Ranges around the file's offsets 16383/16384/16385 and around the
        ZIP's chunk boundaries (shifted by the member's data offset) are
        exact."""
        shift = self.info.data_offset
        for start, end in [
            (16383, 16383),
            (16384, 16384),
            (16385, 16385),
            (16383, 16385),
            (CHUNK - shift - 1, CHUNK - shift),
            (CHUNK - shift, CHUNK - shift),
            (2 * CHUNK - shift - 1, 3 * CHUNK - shift + 1),
            (1000, 4 * CHUNK + 17),
        ]:
            self.assert_partial(self.ranged(f"bytes={start}-{end}"), start, end)

    def test_first_and_last_bytes(self) -> None:
        """The first byte, the last byte (bytes=-1 and by position), a suffix
        longer than the file (the whole file, as 206), an open range and an
        end past the file (clipped)."""
        size = len(self.content)
        self.assert_partial(self.ranged("bytes=0-0"), 0, 0)
        self.assert_partial(self.ranged("bytes=-1"), size - 1, size - 1)
        self.assert_partial(self.ranged(f"bytes={size - 1}-{size - 1}"), size - 1, size - 1)
        self.assert_partial(self.ranged(f"bytes=-{size + 1000}"), 0, size - 1)
        self.assert_partial(self.ranged("bytes=70000-"), 70000, size - 1)
        self.assert_partial(self.ranged(f"bytes=5-{size * 10}"), 5, size - 1)
        self.assert_partial(self.ranged("bytes=-100"), size - 100, size - 1)

    def test_unsatisfiable(self) -> None:
        """A range starting at or past the end, or a zero suffix, is 416
        range_not_satisfiable with Content-Range: bytes */size."""
        size = len(self.content)
        for value in [f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"]:
            response = self.ranged(value)
            self.assert_error(response, 416, "range_not_satisfiable")
            self.assertEqual(response.header("Content-Range"), f"bytes */{size}")

    def test_ignored_ranges(self) -> None:
        """Several ranges, a malformed header, another unit or an invalid
        spec: the whole file, 200."""
        for value in ["bytes=0-1,5-6", "bytes=0-1, -1", "bytes=x-y", "lines=1-2", "bytes=9-3", "bytes 0-5"]:
            self.assert_whole(self.ranged(value))

    def test_if_range(self) -> None:
        """If-Range with the ETag keeps the range (206); another ETag, a weak
        one or a date gives the whole file (200)."""
        self.assert_partial(self.ranged("bytes=10-20", if_range=self.etag), 10, 20)
        other = '"' + "0" * 64 + '"'
        for value in [other, "W/" + self.etag, "Tue, 01 Dec 2026 00:00:00 GMT"]:
            self.assert_whole(self.ranged("bytes=10-20", if_range=value))

    def test_json_form_ignores_range(self) -> None:
        """The JSON form answers 200 with the whole content whatever Range
        says, even an unsatisfiable one."""
        for value in ["bytes=0-9", f"bytes={len(self.content) + 1}-"]:
            response = self.ranged(value, raw=False)
            self.assertEqual(response.status, 200)
            self.assertEqual(base64.b64decode(response.json()["content"]), self.content)

    def test_by_filename(self) -> None:
        """A range of the newest archive named by filename."""
        response = self.client.get(
            b"/download-file?filename=" + quote("backup.bin").encode(),
            session=self.session,
            headers=[(b"Accept", b"application/octet-stream"), (b"Range", b"bytes=100-199")],
        )
        self.assert_partial(response, 100, 199)

    def test_needs_a_session(self) -> None:
        """A range without a session is 401, like any download."""
        response = self.client.get(
            b"/download-file?id=" + self.archive_id.encode(),
            headers=[(b"Accept", b"application/octet-stream"), (b"Range", b"bytes=0-0")],
        )
        self.assert_invalid_session(response)

    def test_tampered_chunk_outside_the_range(self) -> None:
        """A damaged chunk the range does not need does not stop it: only
        the segments the range needs are decrypted.  The whole file then
        fails."""
        corrupt_archive(self.app, self.alice_id, self.archive_id, HEADER_BYTES + 3 * CHUNK_BYTES + 5)
        self.assert_partial(self.ranged("bytes=0-999"), 0, 999)
        self.assert_error(self.ranged(None), 500, "integrity_error")

    def test_tampered_chunk_inside_the_range(self) -> None:
        """A damaged chunk at the start of the range is a JSON 500
        integrity_error before any byte."""
        corrupt_archive(self.app, self.alice_id, self.archive_id, HEADER_BYTES + 3 * CHUNK_BYTES + 5)
        response = self.ranged(f"bytes={3 * CHUNK}-{3 * CHUNK + 10}")
        self.assert_error(response, 500, "integrity_error")
        self.assertNotIn(self.content[3 * CHUNK : 3 * CHUNK + 10], response.body)

    def test_empty_file(self) -> None:
        """Any range of an empty file is 416 with bytes */0; without Range it
        is 200 with no bytes."""
        empty = self.stored(self.upload_raw(self.session, "empty.bin", b""))
        for value in ["bytes=0-", "bytes=0-0", "bytes=-5"]:
            response = self.client.get(
                b"/download-file?id=" + empty.encode(),
                session=self.session,
                headers=[(b"Accept", b"application/octet-stream"), (b"Range", value.encode())],
            )
            self.assert_error(response, 416, "range_not_satisfiable")
            self.assertEqual(response.header("Content-Range"), "bytes */0")


class LargeRangeTests(_VaultTestCase):
    """Ranges over several blocks of the stream, and deflated archives."""

    def range_of(self, session: str, archive_id: str, value: bytes) -> tuple[Response, bool]:
        connection = self.client.connect()
        connection.send(
            encode_request(
                b"GET",
                b"/download-file?id=" + archive_id.encode(),
                [
                    (b"Accept", b"application/octet-stream"),
                    (b"Range", value),
                    (b"Authorization", b"Bearer " + session.encode()),
                ],
            )
        )
        [response] = connection.responses()
        return response, connection.transport.aborted

    def test_tampered_chunk_later_in_the_range_aborts(self) -> None:
        """A damaged chunk a few blocks into a 3 MiB range: the 206 headers
        went out, the stream is aborted, every byte sent is authentic."""
        session = self.alice()
        content = os.urandom(4 << 20)
        archive_id = self.stored(self.upload_raw(session, "big.bin", content))
        corrupt_archive(self.app, self.alice_id, archive_id, HEADER_BYTES + 150 * CHUNK_BYTES)
        response, aborted = self.range_of(session, archive_id, b"bytes=%d-%d" % (CHUNK, (3 << 20) - 1))
        self.assertEqual(response.status, 206)
        self.assertFalse(response.complete)
        self.assertTrue(aborted)
        self.assertTrue(0 < len(response.body) < (3 << 20) - CHUNK)
        self.assertEqual(response.body, content[CHUNK : CHUNK + len(response.body)])

    def test_large_range_streams(self) -> None:
        """A range of several MiB streams whole and exact."""
        session = self.alice()
        content = os.urandom(3 << 20)
        archive_id = self.stored(self.upload_raw(session, "big.bin", content))
        response, aborted = self.range_of(session, archive_id, b"bytes=12345-")
        self.assertEqual((response.status, response.complete, aborted), (206, True, False))
        self.assertEqual(response.body, content[12345:])

    def test_deflated_archive(self) -> None:
        """A compressible file is stored deflated; its ranges are exact too
        (inflated from the start)."""
        session = self.alice()
        content = b"".join(b"log line %09d: all is well\n" % n for n in range(40_000))
        archive_id = self.stored(self.upload_raw(session, "app.log", content))
        self.assertEqual(self.app.storage.info(self.alice_id, archive_id).method, "deflated")
        size = len(content)
        for start, end in [(0, 0), (16383, 16385), (size // 2, size // 2 + 100_000), (size - 1, size - 1)]:
            response, _ = self.range_of(session, archive_id, b"bytes=%d-%d" % (start, end))
            self.assertEqual(response.status, 206)
            self.assertEqual(response.body, content[start : end + 1])
            self.assertEqual(response.header("Content-Range"), f"bytes {start}-{end}/{size}")
        response, _ = self.range_of(session, archive_id, b"bytes=-10")
        self.assertEqual(response.body, content[-10:])
