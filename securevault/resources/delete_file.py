# -*- test-case-name: tests.server.test_resources -*-
"""POST /delete-file: removes one of the caller's archives."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from securevault.core.archive import ArchiveNotFound
from securevault.core.sessions import Session
from securevault.server.endpoint import JsonEndpoint
from securevault.server.errors import not_found
from securevault.server.jsonapi import Reply, parse_json_object, string_field

log = Logger(namespace="securevault.security")


class DeleteFileResource(JsonEndpoint):
    allowedMethods = (b"POST",)

    def render_POST(self, request: Request) -> Any:
        return self.authenticated(request, lambda session: self._delete(request, session))

    def _delete(self, request: Request, session: Session) -> Deferred[Reply]:
        archive_id = string_field(parse_json_object(request), "id")

        def deleted(_: None) -> Deferred[Reply]:
            log.info("Deleted archive {archive_id}", archive_id=archive_id, event_kind="delete")
            return self.app.record("delete", request, user=session.username, archive_id=archive_id).addCallback(
                lambda _: Reply(204)
            )

        def missing(failure: Failure) -> Reply:
            failure.trap(ArchiveNotFound)
            raise not_found("No such archive.")

        work = self.app.run_blocking(self.app.storage.delete, session.user_id, archive_id)
        return work.addCallbacks(deleted, missing)
