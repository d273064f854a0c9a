# -*- test-case-name: tests.test_workers_daemon -*-
"""One worker process of C{--workers N}: C{python -m securevault.server.worker}.

Started by L{securevault.server.supervisor} only.  Its standard input
carries one JSON line (the parent's parsed options, its number, whether it
removes crash debris, the socket's address family) and then stays open; at
its end the parent is gone and the worker stops.  File descriptor 3 is the
listening socket, 4 the pipe on which it says it serves.  Log events go to
standard output, one line each: when the parent logs to standard output
too, the worker shares it and writes finished lines in the parent's format
(so the parent spends nothing per line); otherwise as C{LEVEL text}, which
the parent reads and logs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
from typing import Any

from twisted.logger import FileLogObserver, LogLevel, formatEvent, formatTime, globalLogBeginner

from securevault.server.supervisor import LISTEN_FD, READY_FD

# A format that is one plain field ("{access_line}": the access log's
# lines are built once, in the request) is that field's text: no need for
# formatEvent's parse of the format on every request.
_ONE_FIELD = re.compile(r"\{(\w+)\}")


def _event_text(event: dict[str, Any]) -> str:
    found = _ONE_FIELD.fullmatch(str(event.get("log_format") or ""))
    if found is not None and found.group(1) in event:
        return str(event[found.group(1)])
    return formatEvent(event)


# The last second's stamp: formatTime's format has whole seconds, and it
# works out the local time zone on every call (a tenth of a small request's
# CPU in a worker).  One tuple, replaced whole: safe from any thread.
_last_stamp: tuple[int, str] = (-1, "")


def _stamp(when: float | None) -> str:
    global _last_stamp
    if when is None:
        return formatTime(when)
    second = int(when)
    cached_second, text = _last_stamp
    if cached_second != second:
        text = formatTime(second)
        _last_stamp = (second, text)
    return text


def _event_lines(event: dict[str, Any]) -> tuple[str, list[str]]:
    """An event's level name and its text as lines (a traceback continues
    on the lines after, at the same level)."""
    text = _event_text(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}"
    level: LogLevel = event.get("log_level", LogLevel.info)
    return level.name, text.splitlines() or [""]


def format_line(event: dict[str, Any]) -> str | None:
    """An event as lines of C{LEVEL text}, for the parent to log."""
    level, lines = _event_lines(event)
    return "".join(f"{level} {line}\n" for line in lines)


def shared_stdout_line(number: int, event: dict[str, Any]) -> str | None:
    """An event as the lines the parent would have logged for it
    (C{TIME [securevault#LEVEL] worker N: text}), written by the worker."""
    level, lines = _event_lines(event)
    stamp = _stamp(event.get("log_time"))
    return "".join(f"{stamp} [securevault#{level}] worker {number}: {line}\n" for line in lines)


class _FdWriter:
    """Standard output as a file for L{FileLogObserver}: one C{write} per
    event, so that the lines of several workers sharing the descriptor do
    not interleave within a line."""

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            data = data[os.write(1, data) :]

    def flush(self) -> None:
        pass


def read_parent_end(reactor: Any) -> None:
    """In a thread: wait for the end of standard input (the parent ended,
    or closed it), then stop the reactor."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    reactor.callFromThread(_stop, reactor)


def _stop(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


def main() -> None:
    spec = json.loads(sys.stdin.buffer.readline())
    # Ctrl-C in a terminal reaches the whole process group: the parent
    # stops the workers itself (SIGTERM), in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    number = int(spec["number"])
    if spec.get("log") == "stdout":
        observer = FileLogObserver(_FdWriter(), lambda event: shared_stdout_line(number, event))  # type: ignore[arg-type]
    else:
        observer = FileLogObserver(sys.stdout, format_line)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from twisted.internet import reactor

    from securevault.server.config import VaultConfig
    from securevault.server.tap import worker_service

    def ready() -> None:
        os.write(READY_FD, b"ready\n")
        os.close(READY_FD)

    config = VaultConfig.from_options(spec["options"])
    family = socket.AF_INET6 if spec["family"] == "inet6" else socket.AF_INET
    try:
        service = worker_service(
            config, reactor, fd=LISTEN_FD, family=family, number=number, recover=bool(spec["recover"]),
            ready=ready,
        )  # fmt: skip
    except SystemExit as error:
        print(error, file=sys.stderr)
        sys.exit(1)
    failed = []

    def start() -> None:
        try:
            service.privilegedStartService()
            service.startService()
        except BaseException as error:
            failed.append(error)
            print(f"securevault: error: worker could not start: {error}", file=sys.stderr)
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    threading.Thread(target=read_parent_end, args=(reactor,), daemon=True, name="parent-watch").start()
    reactor.run()
    sys.stdout.flush()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
