# -*- test-case-name: tests.server.test_hostile -*-
"""Hypothesis strategies for hostile clients: raw HTTP/1.1 requests, broken
framing, header values with control bytes, bodies of the wrong type for each
endpoint, invalid base64, and filenames that break API.md's rules.

Requests that need a valid session are built as L{HostileRequest} values and
rendered with the session by the test (a strategy cannot know it).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_from_bytes

from hypothesis import strategies as st

ENDPOINTS = [
    b"/health", b"/login", b"/logout", b"/upload-file", b"/get-files", b"/download-file", b"/delete-file", b"/usage",
]  # fmt: skip
ODD_PATHS = [
    b"/", b"*", b"//health", b"/health/", b"/login/x", b"/upload-file/..", b"/%2e%2e/etc/passwd",
    b"/../../etc/passwd", b"/health%00", b"/health;x", b"http://evil.test/health", b"/get-files/%ff",
    b"/download-file/..%2f..%2fmaster.key", b"/\xff\xfe", b"/a" * 200,
]  # fmt: skip
METHODS = [
    b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT", b"PATCH", b"PRI",
    b"get", b"Post", b"G\x00T", b"POST\x7f",
]  # fmt: skip
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 x", b"HTTP/1.10", b"http/1.1", b"HTTP/", b""]
HEADER_NAMES = [
    b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"X-Filename", b"Authorization",
    b"X-Session-ID", b"Cookie", b"Accept", b"Expect", b"Connection", b"Host", b"Content-Encoding",
    b"Range", b"Upgrade",
]  # fmt: skip
HEADER_VALUES = [
    b"", b" ", b"-1", b"1e3", b"0x10", b"99999999999999999999999999", b"5, 5", b" 5", b"+5",
    b"chunked", b"gzip, chunked", b"chunked, chunked", b"identity", b"CHUNKED",
    b"application/json", b"application/octet-stream", b"application/json; charset=utf-16",
    b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded", b"text/plain",
    b"Bearer ", b"Bearer", b"Basic YWxpY2U6cGFzcw==", b"bearer \x00", b"Bearer " + b"A" * 3000,
    b"100-continue", b"close", b"keep-alive, Upgrade", b"h2c", b"bytes=0-1", b"%ff%fe", b"%00",
    b"..%2f..%2fetc", b"\x00", b"\x7f", b"\x85", b"\xc2\x85", b"\xff\xfe\xfd", b"a\rb", b"a\nb",
    b"a\r\n b", b"\x1b[31m",
]  # fmt: skip
CONTENT_TYPES = [
    b"application/json",
    b"application/json; charset=utf-8",
    b"application/json; charset=utf-16",
    b"text/plain",
    b"multipart/form-data; boundary=x",
    b"application/x-www-form-urlencoded",
    b"",
]
LINE_ENDS = [b"\r\n", b"\n", b"\r"]
QUERY_NAMES = [b"id", b"filename", b"session_id", b"session", b"x", b""]

# -- filenames --------------------------------------------------------------

C0_C1 = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]
FILENAME_SPECIALS = [
    "", ".", "..", "../x", "x/..", "a/b", "/etc/passwd", "a\\b", "..\\..\\x", "a\x00b", "\x00",
    "x" * 255, "x" * 256, "é" * 127, "é" * 128, "😀" * 63 + "xyz", "😀" * 64,
    " ", " x ", "\u2028", "\u202e", "\ufeff", "CON", "x.py", "%2e%2e", "~", "*", "?",
]  # fmt: skip

hostile_filenames: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(FILENAME_SPECIALS),
    st.text(st.sampled_from(C0_C1 + ["/", "\\", ".", "a", "é", "\u2028"]), min_size=1, max_size=8),
    st.builds(
        lambda head, bad, tail: head + bad + tail,
        st.text(max_size=20),
        st.sampled_from(C0_C1 + ["/", "\\", "/../", "\x00"]),
        st.text(max_size=20),
    ),
    st.text(min_size=0, max_size=40),
    st.text(st.characters(codec="utf-8"), min_size=250, max_size=260),
)


def contract_allows(filename: str) -> bool:
    """API.md's rule for filenames, written independently of the server's
    check: non-empty, at most 255 UTF-8 bytes, not C{.} or C{..}, and no
    C{/}, C{\\} or control character (category Cc: C0, DEL, C1)."""
    try:
        encoded = filename.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if not filename or len(encoded) > 255 or filename in (".", ".."):
        return False
    return not any(c in "/\\" or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in filename)


# Raw X-Filename / ?filename= values: percent-encoded text, percent-encoded
# arbitrary bytes (invalid UTF-8 included), or bytes straight in the header.
encoded_filenames: st.SearchStrategy[bytes] = st.one_of(
    hostile_filenames.map(lambda name: quote(name, safe="", errors="surrogatepass").encode("ascii")),
    st.binary(max_size=300).map(lambda raw: quote_from_bytes(raw, safe="").encode("ascii")),
    st.sampled_from([b"%ff", b"%c0%af", b"%ed%a0%80", b"%", b"%zz", b"%2", b"a%00b", b"%2e%2e", b"%2F", b"%5c"]),
    st.binary(max_size=40).filter(lambda raw: b"\r" not in raw and b"\n" not in raw),
)

# -- JSON bodies ------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
# A user that exists in the hostile tests' vault (not the one whose session
# the tests use, which must never be throttled).
REAL_USERNAME = "target"

# Strings that may hold lone surrogates: JSON can carry "\ud800", and st.text()
# leaves category Cs out by default.
surrogate_text: st.SearchStrategy[str] = st.text(st.characters(categories=["Cs", "Ll", "Nd", "Zs"]), max_size=20)
INVALID_JSON = [
    b"", b"{", b"}", b"[", b"null", b"nan", b"NaN", b"Infinity", b"{'a': 1}", b'{"a":}', b"\xff\xfe{}",
    b"\x00", b'{"username": "a", "password": "b"', b"[" * 500, b'"\\ud800"',
    b"1" * 5000,
    b'{"filename": "\\ud800", "content": ""}', b'{"id": "\\udc80"}',
]  # fmt: skip

invalid_base64: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(["=", "A", "AA", "AAA", "A===", "!!!!", "AAAA=AAA", "AA AA", "AA\nAA", "é", "\x00", "-_-_"]),
    st.text(max_size=20),
    json_values,
)


@st.composite
def json_bodies(draw: st.DrawFn, endpoint: bytes) -> bytes:
    """A JSON (or not-quite-JSON) body aimed at C{endpoint}."""
    kind = draw(st.sampled_from(["invalid", "any", "shaped"]))
    if kind == "invalid":
        return draw(st.sampled_from(INVALID_JSON))
    if kind == "any":
        return json.dumps(draw(json_values)).encode("utf-8")
    if endpoint == b"/login":
        document: dict[str, Any] = {
            # Mostly the real user, so that odd passwords reach a real hash.
            "username": draw(st.one_of(st.just(REAL_USERNAME), json_values, st.text(max_size=300), surrogate_text)),
            "password": draw(st.one_of(json_values, st.text(max_size=300), surrogate_text)),
        }
    elif endpoint == b"/upload-file":
        content = draw(
            st.one_of(invalid_base64, st.binary(max_size=100).map(lambda b: base64.b64encode(b).decode("ascii")))
        )
        document = {"filename": draw(st.one_of(hostile_filenames, json_values, surrogate_text)), "content": content}
    else:
        document = {"id": draw(st.one_of(json_values, st.text(st.sampled_from("0123456789abcdef./"), max_size=40)))}
    if draw(st.booleans()):
        document[draw(st.text(max_size=8))] = draw(json_values)
    return json.dumps(document).encode("utf-8")


# -- whole requests ---------------------------------------------------------

query_strings: st.SearchStrategy[bytes] = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(QUERY_NAMES), st.binary(max_size=6)),
        st.one_of(encoded_filenames, st.binary(max_size=20)),
    ),
    max_size=3,
).map(lambda pairs: b"&".join(name + b"=" + value for name, value in pairs))

paths: st.SearchStrategy[bytes] = st.one_of(
    st.sampled_from(ENDPOINTS + ODD_PATHS),
    st.builds(lambda path, query: path + b"?" + query, st.sampled_from(ENDPOINTS + ODD_PATHS), query_strings),
    st.binary(max_size=40),
)

header_lines: st.SearchStrategy[bytes] = st.builds(
    lambda name, separator, value: name + separator + value,
    st.one_of(st.sampled_from(HEADER_NAMES), st.binary(max_size=16)),
    st.sampled_from([b": ", b":", b" : ", b"", b"::"]),
    st.one_of(st.sampled_from(HEADER_VALUES), st.binary(max_size=60)),
)


@st.composite
def framed_bodies(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """A body and the headers that frame it — correctly or not."""
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "short", "long", "bad-length", "chunked", "bad-chunked", "none"]))
    if framing == "length":
        return [b"Content-Length: %d" % len(body)], body
    if framing == "short":
        return [b"Content-Length: %d" % max(0, len(body) - draw(st.integers(1, 50)))], body
    if framing == "long":
        return [b"Content-Length: %d" % (len(body) + draw(st.integers(1, 500)))], body
    if framing == "bad-length":
        value = draw(st.sampled_from([b"-1", b"abc", b"1.5", b"", b"99999999999999999999999", b"1 1", b"0x10"]))
        return [b"Content-Length: " + value], body
    if framing == "chunked":
        return [b"Transfer-Encoding: chunked"], b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    if framing == "bad-chunked":
        size = draw(
            st.sampled_from([b"zz", b"-1", b"ffffffffffffffffffff", b"", b"1;" + b"x" * 100, b"%x" % (len(body) + 7)])
        )
        return [b"Transfer-Encoding: chunked"], size + b"\r\n" + body + b"\r\n"
    return [], body


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Anything a hostile client might write on a fresh connection: random
    methods, paths and versions, malformed request lines and header lines,
    control bytes in values, and bodies framed wrongly."""
    method = draw(st.one_of(st.sampled_from(METHODS), st.binary(max_size=10)))
    path = draw(paths)
    version = draw(st.sampled_from(VERSIONS))
    line = draw(
        st.sampled_from(
            [
                method + b" " + path + b" " + version,
                method + b" " + path,
                method + b"  " + path + b"  " + version,
                method + b"\t" + path + b"\t" + version,
                method,
                b"",
            ]
        )
    )
    eol = draw(st.sampled_from(LINE_ENDS))
    headers = draw(st.lists(header_lines, max_size=6))
    if draw(st.booleans()):
        headers.insert(0, b"Host: vault.test")
    framing, body = draw(framed_bodies())
    head = line + eol + b"".join(h + eol for h in headers + framing) + eol
    return head + body


@dataclass(frozen=True)
class HostileRequest:
    """A request aimed at one endpoint, to be sent with or without a session."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes | None
    with_session: bool

    def encode(self, session: str) -> bytes:
        """The request on the wire (C{session} used only if C{with_session})."""
        lines = [self.method + b" " + self.target + b" HTTP/1.1", b"Host: vault.test"]
        lines += [name + b": " + value for name, value in self.headers]
        if self.with_session:
            lines.append(b"Authorization: Bearer " + session.encode("ascii"))
        if self.body is not None:
            lines.append(b"Content-Length: %d" % len(self.body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + (self.body or b"")


# Range header values: valid, invalid, several, huge, hostile.
range_values = st.one_of(
    st.sampled_from(
        [b"bytes=0-0", b"bytes=-1", b"bytes=5-", b"bytes=5-1", b"bytes=0-1,2-3", b"bytes=-0", b"items=0-1",
         b"bytes=" + b"9" * 5000 + b"-", b"bytes=\xff-\x00", b"bytes==", b"bytes=,,,"]
    ),
    st.builds(lambda value: b"bytes=" + value, st.binary(max_size=30)),
)  # fmt: skip


@st.composite
def endpoint_requests(draw: st.DrawFn) -> HostileRequest:
    """Well-framed requests with hostile content for each endpoint: wrong
    types and invalid JSON, invalid base64, hostile filenames in
    C{X-Filename}, C{?filename=} and JSON, junk archive ids."""
    endpoint = draw(st.sampled_from(ENDPOINTS))
    natural = b"GET" if endpoint in (b"/health", b"/get-files", b"/download-file", b"/usage") else b"POST"
    method = draw(st.sampled_from([natural] * 6 + [b"GET", b"POST", b"HEAD", b"PUT"]))
    with_session = draw(st.booleans()) or endpoint == b"/upload-file"
    headers: list[tuple[bytes, bytes]] = []
    target = endpoint
    body: bytes | None = None
    if endpoint == b"/upload-file" and draw(st.booleans()):
        headers.append((b"Content-Type", b"application/octet-stream"))
        name = draw(encoded_filenames)
        if draw(st.booleans()):
            headers.append((b"X-Filename", name))
        else:
            target += b"?filename=" + name
        body = draw(st.binary(max_size=200))
    elif endpoint == b"/download-file":
        target += b"?" + draw(
            st.one_of(
                query_strings,
                st.builds(lambda v: b"id=" + v, st.one_of(encoded_filenames, st.binary(max_size=40))),
                st.builds(lambda v: b"filename=" + v, encoded_filenames),
            )
        )
        if draw(st.booleans()):
            headers.append((b"Accept", b"application/octet-stream"))
        if draw(st.booleans()):
            headers.append((b"Range", draw(range_values)))
            if draw(st.booleans()):
                headers.append((b"If-Range", draw(st.sampled_from([b'"x"', b'W/"x"', b"", b"\x00"]))))
    elif method in (b"POST", b"PUT"):
        headers.append((b"Content-Type", draw(st.sampled_from(CONTENT_TYPES))))
        body = draw(json_bodies(endpoint))
    return HostileRequest(method, target, tuple(headers), body, with_session)
