# -*- test-case-name: tests.server.test_usage -*-
"""GET /usage: what the caller keeps in the vault, against the quota.

C{archives} counts the caller's archives as GET /get-files lists them;
C{stored_bytes} is what the quota counts (bytes in the blob store, encrypted,
after compression); C{quota_bytes} is C{--quota} (null without one);
C{uploads_in_progress} counts the caller's raw uploads streaming on this node
now (with several nodes, each counts its own).
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from securevault.core.sessions import Session
from securevault.server.endpoint import JsonEndpoint
from securevault.server.jsonapi import Reply


class UsageResource(JsonEndpoint):
    allowedMethods = (b"GET", b"HEAD")

    def render_GET(self, request: Request) -> Any:
        app = self.app
        storage = app.storage

        def count(session: Session) -> tuple[int, int]:
            """In the pool: the listing (kept in memory on one node) and the
            index's sum of stored bytes."""
            return len(storage.list(session.user_id)), storage.usage(session.user_id)

        def answer(session: Session, counted: tuple[int, int]) -> Reply:
            archives, stored_bytes = counted
            return Reply(
                200,
                {
                    "archives": archives,
                    "stored_bytes": stored_bytes,
                    "quota_bytes": app.config.quota,
                    "uploads_in_progress": app.uploads.of_owner(session.user_id),
                },
            )

        return self.in_session(request, count, answer)

    render_HEAD = render_GET
