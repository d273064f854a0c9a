# -*- test-case-name: tests.server.test_byteranges -*-
"""HTTP range requests (RFC 9110 §14): the C{Range} and C{If-Range} headers
of a raw download, parsed into plain values on the reactor thread.

The vault serves one range per request.  Following RFC 9110, a C{Range}
header that is malformed, names another unit, or holds an invalid range-spec
(last-pos before first-pos) is ignored (the whole file, 200); so is a set of
several ranges (a server may ignore any Range; multipart/byteranges is not
offered).  A single range that does not overlap the file is unsatisfiable
(416).  C{If-Range} holds the range to the representation the client has
part of: only a strong match of the archive's ETag keeps the range; anything
else (another ETag, a weak one, a date: the vault sends no Last-Modified)
means the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ByteRange", "if_range_allows", "parse_range", "resolve_range"]

# Digits beyond this are a number larger than any file: clamped, never parsed
# (int() refuses strings of thousands of digits).
MAX_DIGITS = 18
_HUGE: int = 10**MAX_DIGITS
_OWS = b" \t"


@dataclass(frozen=True)
class ByteRange:
    """One range-spec: C{first-last} (C{last} None: to the end), or the
    last C{suffix} bytes (C{first} None)."""

    first: int | None
    last: int | None = None
    suffix: int | None = None


def _number(text: bytes) -> int | None:
    if not text or not text.isdigit():  # 1*DIGIT, ASCII only for bytes
        return None
    if len(text.lstrip(b"0")) > MAX_DIGITS:
        return _HUGE
    return int(text)


def _range_spec(text: bytes) -> ByteRange | None:
    first_text, dash, last_text = text.partition(b"-")
    if not dash:
        return None
    if not first_text:
        suffix = _number(last_text)
        return None if suffix is None else ByteRange(None, suffix=suffix)
    first = _number(first_text)
    if first is None:
        return None
    if not last_text:
        return ByteRange(first)
    last = _number(last_text)
    if last is None or last < first:
        return None  # invalid: the whole header is ignored
    return ByteRange(first, last)


def parse_range(header: bytes | None) -> ByteRange | None:
    """The single byte range a C{Range} header asks for; None when there is
    none to honour (absent, malformed, another unit, an invalid spec, or
    several ranges): then the answer is the whole file."""
    if header is None:
        return None
    unit, equals, range_set = header.strip(_OWS).partition(b"=")
    if not equals or unit.strip(_OWS).lower() != b"bytes":
        return None
    # A list (RFC 9110 §5.6.1): empty elements are allowed and ignored.
    specs = [part.strip(_OWS) for part in range_set.split(b",")]
    specs = [spec for spec in specs if spec]
    if len(specs) != 1:
        return None
    return _range_spec(specs[0])


def resolve_range(wanted: ByteRange, size: int) -> tuple[int, int] | None:
    """The half-open span C{(start, end)} of a file of C{size} bytes that
    C{wanted} selects, or None when it is unsatisfiable (416): a first
    byte at or past the end, a suffix of zero bytes, any range of an empty
    file.  A suffix longer than the file selects the whole file."""
    if wanted.first is None:
        suffix = wanted.suffix or 0
        if suffix == 0 or size == 0:
            return None
        return max(0, size - suffix), size
    if wanted.first >= size:
        return None
    last = size - 1 if wanted.last is None else min(wanted.last, size - 1)
    return wanted.first, last + 1


def if_range_allows(if_range: bytes | None, etag: bytes) -> bool:
    """Whether the range may be served: no C{If-Range}, or one whose entity
    tag is strongly equal to C{etag} (quotes included; a weak tag or a date
    never is)."""
    if if_range is None:
        return True
    return if_range.strip(_OWS) == etag
