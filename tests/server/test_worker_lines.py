"""Tests for the lines a worker writes itself (L{securevault.server.worker}):
the same text as Twisted's own formatting, made with less work."""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel, formatEvent, formatTime

from securevault.server.worker import shared_stdout_line
from tests.support.testcase import SyncTestCase


def expected(number: int, event: dict[str, Any]) -> str:
    level = event["log_level"].name
    return "".join(
        f"{formatTime(event['log_time'])} [securevault#{level}] worker {number}: {line}\n"
        for line in formatEvent(event).splitlines()
    )


class WorkerLineTests(SyncTestCase):
    def test_same_text_as_twisted(self) -> None:
        """One-field formats (the access log), several fields, a field the
        event lacks, and times within one second and across seconds all
        read exactly as Twisted formats them."""
        events: list[dict[str, Any]] = [
            {"log_format": "{access_line}", "access_line": "GET /x 200 user=a bytes=9 0.4ms"},
            {"log_format": "worker {number} (pid {pid}) serving", "number": 2, "pid": 41},
            {"log_format": "{missing}"},
            {"log_format": "{n}", "n": 7},
            {"log_format": "line one\nline two"},
        ]
        for when in (1764500000.0, 1764500000.25, 1764500000.99, 1764500001.0, 1764503600.5):
            for event in events:
                event = {**event, "log_level": LogLevel.info, "log_time": when}
                self.assertEqual(shared_stdout_line(3, event), expected(3, event))
