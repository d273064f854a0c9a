# -*- test-case-name: tests.server.test_openapi -*-
"""Fuzz a live daemon with schemathesis, from its own GET /openapi.json.

Starts C{twistd -n securevault} on 127.0.0.1 (a port the kernel picks) over a
fresh vault (C{securevault-admin init} and a user, as
L{tests.support.daemon.VaultFixture} makes them), logs in over mutual TLS,
fetches the document and runs C{schemathesis run} against the daemon with
the vault's client certificate, its CA and the session as a bearer token.
Exits with schemathesis's status: non-zero when a check fails (a 500, a
status or a body the document does not describe) or the daemon will not
start.  CI runs it after tox (C{.ci/run}, tox env C{fuzz}).

    python tests/fuzz/run_schemathesis.py [--max-examples N] [--seed N] [--keep DIR]

POST /logout is left out: it would end the session the other operations
need, and the fuzzer would then see nothing but 401s.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
if str(REPOSITORY) not in sys.path:  # run as a script: the checkout's tests package
    sys.path.insert(0, str(REPOSITORY))

from tests.support.daemon import VaultFixture, call, login  # noqa: E402

# Every check schemathesis has but positive_data_acceptance ("a request the
# document allows is accepted"): OpenAPI cannot say that /download-file takes
# exactly one of id and filename, nor that a filename is at most 255 UTF-8
# bytes (maxLength counts characters), so the document allows requests the
# server rightly refuses with 400.
CHECKS = "all"
EXCLUDED_CHECKS = "positive_data_acceptance"
# A fuzz run must not wait on the daemon's own slowness: a generous bound.
REQUEST_TIMEOUT_SECONDS = "30"
# The daemon's access line: "METHOD PATH STATUS user=... bytes=... 1.2ms".
ACCESS = re.compile(r"\b([A-Z]+ /[^ ]* (?:\d{3}|aborted)) user=")


def schemathesis_argv(
    document: Path, port: int, fixture: VaultFixture, session: str, max_examples: int, seed: int | None
) -> list[str]:
    """The C{schemathesis run} command line against the daemon on C{port}."""
    certs = fixture.certs
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--schemathesis", "run", str(document),
        "--url", f"https://127.0.0.1:{port}",
        "--request-cert", str(certs / "client.crt"),
        "--request-cert-key", str(certs / "client.key"),
        "--tls-verify", str(certs / "ca.crt"),
        "--header", f"Authorization: Bearer {session}",
        "--checks", CHECKS,
        "--exclude-checks", EXCLUDED_CHECKS,
        "--max-examples", str(max_examples),
        "--exclude-path", "/logout",
        "--workers", "2",
        "--request-timeout", REQUEST_TIMEOUT_SECONDS,
        "--no-shrink",
    ]  # fmt: skip
    if seed is not None:
        argv += ["--seed", str(seed)]
    return argv


def answered(log: str) -> str:
    """What the daemon answered, by method, path and status, from its access
    lines: proof that the fuzzer got past the session check."""
    counts = Counter(match.group(1) for match in ACCESS.finditer(log))
    return "The daemon answered:\n" + "\n".join(f"  {count:5d}  {line}" for line, count in sorted(counts.items()))


def run(base: Path, max_examples: int, seed: int | None) -> int:
    fixture = VaultFixture(base)
    fixture.create()
    daemon = fixture.start()
    try:
        port = daemon.wait_listening()
        context = fixture.tls_context()
        session = login(context, port)
        response = call(context, port, "GET", "/openapi.json")
        if response.status != 200:
            print(f"GET /openapi.json: {response.status} {response.body!r}", file=sys.stderr)
            return 1
        document = base / "openapi.json"
        document.write_text(json.dumps(response.json(), indent=1), encoding="utf-8")
        argv = schemathesis_argv(document, port, fixture, session, max_examples, seed)
        print("+", " ".join(a if not a.startswith("Authorization") else "Authorization: Bearer ..." for a in argv))
        status = subprocess.run(argv, cwd=base, check=False).returncode
        print(answered(daemon.output()))
        if daemon.process.poll() is not None:
            print("The daemon died during the run:\n" + daemon.output(), file=sys.stderr)
            return 1
        return status
    finally:
        daemon.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=25, help="test cases per operation (default 25)")
    parser.add_argument("--seed", type=int, default=None, help="schemathesis's random seed")
    parser.add_argument("--keep", type=Path, default=None, help="run in this directory and keep it")
    options = parser.parse_args(argv)
    if options.keep is not None:
        options.keep.mkdir(parents=True, exist_ok=True)
        return run(options.keep.resolve(), options.max_examples, options.seed)
    with tempfile.TemporaryDirectory(prefix="securevault-fuzz-") as base:
        return run(Path(base), options.max_examples, options.seed)


def run_schemathesis_cli(argv: list[str]) -> None:
    """C{schemathesis ARGV}, in this process, after a workaround.

    CPython 3.11.7 (this project's venv) raises C{SystemError: AST
    constructor recursion depth mismatch} from C{ast.parse} called deep in
    a stack; Hypothesis parses a module's source to print a
    lambda, deep in schemathesis's generation of JSON bodies, and the run
    ends in an error.  Parsing that module once here, at a shallow depth,
    fills Hypothesis's cache so that the deep call never parses."""
    import schemathesis as schemathesis_library
    from hypothesis.internal.reflection import get_pretty_function_description
    from schemathesis.cli import schemathesis
    from schemathesis.generation.jsonschema import strategy

    get_pretty_function_description(strategy._TYPE_CHECKS["null"])
    # A tus PATCH body is raw bytes, as application/octet-stream is.
    schemathesis_library.serializer.alias("application/offset+octet-stream", "application/octet-stream")
    sys.argv = ["schemathesis", *argv]
    schemathesis()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--schemathesis"]:
        run_schemathesis_cli(sys.argv[2:])
    sys.exit(main())
