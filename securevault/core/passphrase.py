# -*- test-case-name: tests.core.test_keys -*-
"""Where a sealed master key's passphrase comes from: a prompt, standard
input, an inherited file descriptor, or a file."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable

SOURCES_HELP = "prompt, stdin, fd:N or file:PATH"


class PassphraseError(ValueError):
    """The passphrase source is malformed or gave nothing."""


def _first_line(text: str, where: str) -> str:
    line = text.split("\n", 1)[0].rstrip("\r")
    if not line:
        raise PassphraseError(f"no passphrase was read from {where}")
    return line


def passphrase_source(spec: str | None) -> Callable[[], str] | None:
    """A callable reading the passphrase as C{spec} says; None for C{None}
    unless standard input is a terminal, where it prompts."""
    if spec is None:
        return (lambda: getpass.getpass("Master key passphrase: ")) if sys.stdin.isatty() else None
    if spec == "prompt":
        return lambda: getpass.getpass("Master key passphrase: ")
    if spec == "stdin":
        return lambda: _first_line(sys.stdin.readline(), "standard input")
    kind, _, value = spec.partition(":")
    if kind == "fd" and value.isdigit():
        fd = int(value)

        def from_fd() -> str:
            with os.fdopen(fd, "r", encoding="utf-8", closefd=True) as handle:
                return _first_line(handle.read(4096), f"file descriptor {fd}")

        return from_fd
    if kind == "file" and value:

        def from_file() -> str:
            try:
                with open(value, encoding="utf-8") as handle:
                    return _first_line(handle.read(4096), value)
            except OSError as error:
                raise PassphraseError(f"cannot read the passphrase file {value}: {error.strerror}") from None

        return from_file
    raise PassphraseError(f"the passphrase source must be {SOURCES_HELP}, not {spec!r}")
