# -*- test-case-name: tests.server.test_byteranges -*-
"""Tests for L{securevault.server.byteranges}: the Range and If-Range
headers of RFC 9110, parsed and resolved against a file's size."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from securevault.server.byteranges import ByteRange, if_range_allows, parse_range, resolve_range
from tests.support.testcase import SyncTestCase

ETAG = b'"' + b"ab" * 32 + b'"'


class ParseRangeTests(SyncTestCase):
    def test_one_range(self) -> None:
        """The three forms of a single range-spec, with the unit in any case
        and optional whitespace, parse to what they say."""
        cases = {
            b"bytes=0-499": ByteRange(0, 499),
            b"bytes=500-": ByteRange(500),
            b"bytes=-500": ByteRange(None, suffix=500),
            b"Bytes=1-1": ByteRange(1, 1),
            b"BYTES = 7-9 ": ByteRange(7, 9),
            b" bytes=\t3-4,": ByteRange(3, 4),
            b"bytes=, ,0-0": ByteRange(0, 0),
            b"bytes=007-010": ByteRange(7, 10),
            b"bytes=-0": ByteRange(None, suffix=0),
        }
        for header, expected in cases.items():
            self.assertEqual(parse_range(header), expected, header)

    def test_ignored(self) -> None:
        """Absent, malformed, another unit, an invalid spec (last before
        first) and several ranges all mean: no range, the whole file."""
        for header in [
            None,
            b"",
            b"bytes",
            b"bytes=",
            b"bytes=,",
            b"bytes=5",
            b"bytes=a-b",
            b"bytes=1-2-3",
            b"bytes=--5",
            b"bytes=+1-2",
            b"bytes=1 -2",
            b"bytes=0x10-20",
            b"bytes=\xd9\xa1-2",
            b"bytes=5-4",
            b"items=0-5",
            b"bytes 0-5",
            b"bytes=0-1,5-6",
            b"bytes=0-1,-1",
            b"bytes=0-0,0-0",
        ]:
            self.assertIsNone(parse_range(header), header)

    def test_huge_numbers(self) -> None:
        """Numbers of thousands of digits are larger than any file, not an
        error."""
        huge = b"9" * 5000
        wanted = parse_range(b"bytes=" + huge + b"-")
        self.assertIsNotNone(wanted)
        assert wanted is not None
        self.assertIsNone(resolve_range(wanted, 10))
        whole = parse_range(b"bytes=-" + huge)
        assert whole is not None
        self.assertEqual(resolve_range(whole, 10), (0, 10))
        to_end = parse_range(b"bytes=3-" + huge)
        assert to_end is not None
        self.assertEqual(resolve_range(to_end, 10), (3, 10))

    @given(st.binary(max_size=60))
    def test_any_bytes(self, header: bytes) -> None:
        """Any header value parses to nothing or to a range whose span, for
        any size, lies inside the file and is not empty."""
        wanted = parse_range(b"bytes=" + header)
        if wanted is None:
            return
        for size in (0, 1, 2, 1000, 10**12):
            span = resolve_range(wanted, size)
            if span is not None:
                self.assertTrue(0 <= span[0] < span[1] <= size, (header, size, span))

    @given(st.integers(0, 10**15), st.integers(0, 10**15), st.integers(0, 10**15))
    def test_int_range_model(self, first: int, length: int, size: int) -> None:
        """bytes=a-b selects a..min(b, size-1), or nothing when a >= size."""
        last = first + length
        wanted = parse_range(b"bytes=%d-%d" % (first, last))
        self.assertEqual(wanted, ByteRange(first, last))
        assert wanted is not None
        expected = None if first >= size else (first, min(last, size - 1) + 1)
        self.assertEqual(resolve_range(wanted, size), expected)


class ResolveRangeTests(SyncTestCase):
    def test_spans(self) -> None:
        """Spans are half-open; a suffix longer than the file is the whole
        file; past the end, a zero suffix and any range of an empty file are
        unsatisfiable."""
        cases = [
            (ByteRange(0, 0), 10, (0, 1)),
            (ByteRange(9, 9), 10, (9, 10)),
            (ByteRange(9, 100), 10, (9, 10)),
            (ByteRange(5), 10, (5, 10)),
            (ByteRange(None, suffix=1), 10, (9, 10)),
            (ByteRange(None, suffix=10), 10, (0, 10)),
            (ByteRange(None, suffix=11), 10, (0, 10)),
            (ByteRange(10), 10, None),
            (ByteRange(10, 20), 10, None),
            (ByteRange(None, suffix=0), 10, None),
            (ByteRange(0), 0, None),
            (ByteRange(0, 0), 0, None),
            (ByteRange(None, suffix=5), 0, None),
        ]
        for wanted, size, expected in cases:
            self.assertEqual(resolve_range(wanted, size), expected, (wanted, size))


class IfRangeTests(SyncTestCase):
    def test_strong_match_only(self) -> None:
        """No If-Range, or the exact ETag, keeps the range; a weak tag,
        another tag, an unquoted one or a date does not."""
        self.assertTrue(if_range_allows(None, ETAG))
        self.assertTrue(if_range_allows(ETAG, ETAG))
        self.assertTrue(if_range_allows(b" " + ETAG + b" ", ETAG))
        for other in [b"W/" + ETAG, b'"' + b"cd" * 32 + b'"', ETAG.strip(b'"'), b"Tue, 01 Dec 2026 00:00:00 GMT", b""]:
            self.assertFalse(if_range_allows(other, ETAG), other)
